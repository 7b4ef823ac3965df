//! The records stream store.
//!
//! `sluice-stream` owns the durable, compacted, ordered log of records between sources and
//! consumers, implementing [`sluice_core::RecordStream`]. The default store is embedded: one
//! SQLite file under the data directory. A networked engine (PostgreSQL, NATS JetStream) can
//! replace it behind the same trait when one machine is outgrown.
//!
//! It must not know about targets, layouts or sources: it stores records, enforces the
//! version guard and compaction, and answers reads by position and filter.
//!
//! The store itself arrives with the records-stream issue; this crate currently exports
//! only the contract it will implement.

pub use sluice_core::RecordStream;

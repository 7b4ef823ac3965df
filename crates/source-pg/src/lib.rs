//! The PostgreSQL source.
//!
//! `sluice-source-pg` owns reading a PostgreSQL database through logical replication
//! (pgoutput): the prerequisite checks with their fixes ([`check`]), the publication and slot
//! ([`ensure_publication_and_slot`]: publication first, adopt what exists, never drop), the
//! keyset-paged backfill, decoding changes into `Record`s ([`PostgresSource`]), and confirming
//! the slot only after the records stream holds them durably. The replication protocol itself
//! (TLS, SCRAM, CopyBoth) is in the private `wire` module.
//!
//! It must not write to targets: it appends to the stream and nothing else.

mod pgoutput;
mod prerequisites;
mod source;
mod tables;
mod values;
mod wire;

pub use prerequisites::{SourceSpec, check, ensure_publication_and_slot, plan};
pub use source::{PostgresSource, SourceOptions};
pub use tables::BackfillProgress;
pub use wire::Lsn;

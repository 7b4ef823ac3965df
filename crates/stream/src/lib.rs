//! The records stream store.
//!
//! `sluice-stream` owns the durable, compacted, ordered log of records between sources and
//! consumers, implementing [`sluice_core::RecordStream`]. The default store, [`EmbeddedStream`],
//! is one SQLite file under the data directory (`stream.sqlite3`, WAL mode, through rusqlite). A
//! networked engine (PostgreSQL, NATS JetStream) can replace it behind the same trait when one
//! machine is outgrown.
//!
//! It must not know about targets, layouts or sources: it stores records, enforces the version
//! guard and compaction, purges tombstones no consumer needs, and answers reads by position and
//! filter.
//!
//! **Durability.** An append returns only after its SQLite transaction commits with
//! `synchronous = FULL` in WAL mode: an acknowledged batch survives a crash of the process and
//! of the machine (as far as the disk honours `fsync`). A batch is all or nothing: a writer
//! killed mid-append leaves none of that batch behind.
//!
//! ```no_run
//! # async fn example() -> sluice_core::Result<()> {
//! use sluice_core::{RecordFilter, RecordStream, Provider, Seq};
//! use sluice_stream::EmbeddedStream;
//!
//! let stream = EmbeddedStream::open("sluice-data").await?;
//! let read = stream.read(&RecordFilter::Provider(Provider::Postgres), Seq::START, 1000).await?;
//! println!("{} records, read through {}", read.entries.len(), read.through);
//! # Ok(()) }
//! ```

mod embedded;
mod tail;

pub use embedded::{EmbeddedStream, FILE_NAME};
pub use sluice_core::RecordStream;

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
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use sluice_core::{Source, SyncId};
//! use sluice_pg::ConnectionSettings;
//! use sluice_source_pg::{PostgresSource, SourceOptions, SourceSpec};
//!
//! let settings = ConnectionSettings::from_url("postgres://sluice_repl@db.internal/app?sslmode=verify-full")?;
//! let spec = SourceSpec { publication: "sluice_publication".into(), slot: "sluice_slot".into(), failover: false, };
//! println!("{}", sluice_source_pg::check(&settings, &spec).await.render()); // each gap, with its fix
//! let stream = Arc::new(sluice_stream::EmbeddedStream::open("/var/lib/sluice").await?);
//! let source = PostgresSource::new("app", SyncId::new_random(), settings, spec, stream, SourceOptions::default());
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! tokio::spawn(async move { source.run(Box::pin(async move { let _ = stopped.await; })).await });
//! // … later: backfill done, changes streaming; stop appends what it holds first.
//! let _ = stop.send(());
//! # Ok(()) }
//! ```

mod pgoutput;
mod prerequisites;
mod source;
mod tables;
mod values;
mod wire;
mod writer;

pub use prerequisites::{SourceSpec, check, ensure_publication_and_slot, plan};
pub use source::{PostgresSource, SourceOptions};
pub use tables::{BackfillProgress, CollectionProgress};
pub use wire::Lsn;
pub use writer::PgWriter;

//! The PostgreSQL target.
//!
//! `sluice-target-pg` owns writing a user's PostgreSQL as the sync user: the consumer-table
//! layout ([`ConsumerTable`]: DDL and column-by-column verification), batch writes with the
//! checkpoint in the same transaction ([`ConsumerTableTarget`], which implements the core
//! `Target` and `Health` traits), and the schema mirror ([`SchemaMirrorTarget`]). Reaching the
//! server (settings, TLS, explained connection failures, catalog queries, the error
//! classifier) is `sluice-pg`'s; [`ConnectionSettings`] and friends are re-exported here.
//!
//! It must not create roles or grant privileges (that is `sluice-provisioning`), and it
//! must never drop or alter an object the sync user does not own: its fixes are printed for
//! the user to run.
//!
//! ```no_run
//! # async fn example() -> Result<(), sluice_core::Error> {
//! use sluice_core::{Batch, ConsumerId, Seq, Target};
//! use sluice_target_pg::{ConnectionSettings, ConsumerTable, ConsumerTableTarget};
//!
//! let settings = ConnectionSettings::from_url("postgres://sluice@db.internal/app?sslmode=verify-full")
//!     .map_err(|e| sluice_core::Error::invalid(e.to_string()))?;
//! let table = ConsumerTable::new("sluice", "records");
//! println!("{}", table.ddl()); // the CREATE TABLE for the user to run
//! let target = ConsumerTableTarget::new("warehouse", settings, table, 1);
//! let consumer = ConsumerId::from("orders");
//! let from = target.checkpoint(&consumer).await?;
//! target.apply(&consumer, &Batch { entries: vec![], through: Seq(from.0 + 1) }).await?;
//! # Ok(()) }
//! ```

mod checkpoint;
mod consumer_table;
mod copy;
mod mirror;
mod newest;

pub use checkpoint::CHECKPOINT_TABLE;
pub use consumer_table::{
    COLUMNS, ConsumerTable, ConsumerTableTarget, Finding, Severity, Verification,
};
/// `COPY`'s binary format as sluice writes consumer-table rows (for benchmarks' baselines).
pub use copy::{binary, pg_micros};
pub use mirror::{JsonCollection, SchemaMirrorTarget, default_table_name};
/// Reaching the server is `sluice-pg`'s; re-exported for the target's callers.
pub use sluice_pg::{ConnectError, ConnectionSettings, SettingsError, catalog, ssl_mode_name};

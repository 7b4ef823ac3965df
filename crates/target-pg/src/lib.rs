//! The PostgreSQL target.
//!
//! `sluice-target-pg` owns talking to a user's PostgreSQL as the sync user: connection
//! settings (TLS modes, certificates, timeouts) in [`ConnectionSettings`], explained connection
//! failures ([`ConnectError`]), the consumer-table layout ([`ConsumerTable`]: DDL and
//! column-by-column verification), batch writes with the checkpoint in the same transaction
//! ([`ConsumerTableTarget`], which implements the core `Target` and `Health` traits), and the
//! compile-checked [`catalog`] queries.
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

mod apply;
pub mod catalog;
mod consumer_table;
mod diagnose;
mod mirror;
mod settings;
mod target;

pub use apply::CHECKPOINT_TABLE;
pub use consumer_table::{COLUMNS, ConsumerTable, Finding, Severity, Verification};
pub use diagnose::ConnectError;
pub use mirror::{JsonCollection, SchemaMirrorTarget, default_table_name};
pub use settings::{ConnectionSettings, SettingsError, ssl_mode_name};
pub use target::ConsumerTableTarget;

//! Reaching PostgreSQL from sluice, for every side that talks to a server (sources, targets,
//! provisioning): connection settings and TLS modes ([`ConnectionSettings`]), explained
//! connection failures ([`ConnectError`]), the compile-checked [`catalog`] queries, and the one
//! error classifier: every SQLSTATE a server returns becomes a [`Condition`] and then a
//! `sluice_core::ErrorClass` here and nowhere else, so a deadlock is "retry" for every caller
//! and a data error is "give up" for every caller. Callers explain the few conditions they know
//! more about (the exact `GRANT` a missing privilege needs) by passing an override; they never
//! match SQLSTATEs themselves.
//!
//! It is not for anything that writes or reads sluice's data: it knows PostgreSQL, not records.
//!
//! ```
//! use sluice_core::ErrorClass;
//! use sluice_pg::{Condition, classify, condition};
//!
//! assert_eq!(condition("40P01", None, "deadlock detected"), Condition::Transient);
//! assert_eq!(condition("22P02", None, "invalid input syntax"), Condition::DataException);
//! let lost = classify(sqlx::Error::PoolTimedOut, "writing a batch", |_, _| None);
//! assert_eq!(lost.class(), ErrorClass::Retry);
//! ```

pub mod catalog;
mod classify;
mod diagnose;
mod settings;
pub mod sqlstate;
pub mod tls;

pub use classify::{Condition, classify, condition};
pub use diagnose::ConnectError;
pub use settings::{ConnectionSettings, SettingsError, ssl_mode_name};

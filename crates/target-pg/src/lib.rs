//! The PostgreSQL target.
//!
//! `sluice-target-pg` owns talking to a user's PostgreSQL as the sync user: connection
//! settings (TLS modes, certificates, timeouts), diagnosing connection failures, the
//! consumer-table and schema-mirror layouts (DDL, verification), batch writes with the
//! checkpoint in the same transaction, and the target's health checks.
//!
//! It must not create roles or grant privileges (that is `sluice-provisioning`), and it
//! must never drop or alter an object the sync user does not own.

pub mod catalog;

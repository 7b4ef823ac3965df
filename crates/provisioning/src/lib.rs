//! Provisioning: roles, grants, ownership and schema lifecycle on a target.
//!
//! `sluice-provisioning` owns every rule about who may do what in the user's database: the
//! sync user (`grant connect, create on database`), the read role (created `with admin` the
//! sync user, or adopted when it exists), the schemas sluice syncs into and their default
//! privileges, the Supabase preset, and the checks that report each gap with the exact SQL that
//! fixes it. It computes a [`Plan`] (ordered statements, each with a reason) from the desired
//! [`SetupSpec`] and the database's current [`State`], then [`apply`]s it with lent admin
//! credentials that are used and dropped — or prints it for the user to run ([`plan`] without a
//! state gives a script that is safe to run twice). Both paths reach the same end state.
//!
//! It must never drop or alter an object the sync user does not own, and never store admin
//! credentials anywhere.
//!
//! ```no_run
//! # async fn example(admin: sluice_pg::ConnectionSettings) -> Result<(), sluice_core::Error> {
//! use sluice_provisioning::{SchemaUse, SetupSpec, apply};
//!
//! let spec = SetupSpec::new("app").schema("stripe", SchemaUse::Owned);
//! let applied = apply(&admin, &spec).await?; // `admin` is dropped by the caller right after
//! print!("{}", applied.plan.script(false));
//! # Ok(()) }
//! ```

mod apply;
mod check;
mod inspect;
mod lifecycle;
mod plan;
mod read_access;
mod spec;

pub use apply::{Applied, apply, is_transient};
pub use check::check;
pub use inspect::{ForeignObject, SchemaState, State, foreign_objects, inspect};
pub use lifecycle::{Renamed, drop_schema, rebuild_schema, rename_schema};
pub use plan::{Plan, Refusal, Step, plan};
pub use read_access::{grant_read, revoke_read};
pub use sluice_core::{CheckReport, Finding};
pub use spec::{Preset, SchemaSpec, SchemaUse, SetupSpec, generate_password};

//! Provisioning: roles, grants, ownership and schema lifecycle on a target.
//!
//! `sluice-provisioning` owns every rule about who may do what in the user's database: the
//! sync user (`grant connect, create on database`), the read role (created `with admin` the
//! sync user), the schemas sluice syncs into and their default privileges, the hosted-database
//! presets, and the checks that report each gap with the exact SQL that fixes it. It computes
//! a plan (ordered statements, each with a reason) and applies it with lent admin credentials
//! that are used and dropped, or prints it for the user to run.
//!
//! It must never drop or alter an object the sync user does not own, and never store admin
//! credentials anywhere.
//!
//! The planner arrives with the provisioning issue.

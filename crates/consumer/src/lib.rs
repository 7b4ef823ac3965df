//! The consumer runtime.
//!
//! `sluice-consumer` owns the loop that forwards records from the [`sluice_core::RecordStream`]
//! into a [`sluice_core::Target`]: read `seq > checkpoint` through the consumer's filter, batch
//! by size and time, apply with the checkpoint in the same transaction, acknowledge, wait for
//! new appends; pause when the target is unreachable and catch up when it returns; report
//! lag and health.
//!
//! It must not issue SQL or know a layout: everything target-specific goes through the
//! `Target` trait, and retries follow the error's class in this one place.
//!
//! The runtime arrives with the consumer issue; this crate currently exports only the
//! contract it will implement.

pub use sluice_core::Consumer;

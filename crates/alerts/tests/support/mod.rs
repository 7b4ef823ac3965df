//! Test helpers shared with the binary's tests.
pub mod smtp;

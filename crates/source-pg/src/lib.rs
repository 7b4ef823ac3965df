//! The PostgreSQL source.
//!
//! `sluice-source-pg` owns reading a PostgreSQL database through logical replication
//! (pgoutput): the prerequisite checks with their fixes ([`check`]), the publication and slot
//! ([`ensure_publication_and_slot`]: publication first, adopt what exists, never drop), and —
//! arriving with the rest of the Postgres-source issue — the keyset-paged backfill, decoding
//! changes into `Record`s, and confirming the slot only after the records stream holds them.
//!
//! It must not write to targets: it appends to the stream and nothing else.

mod prerequisites;

pub use prerequisites::{SourceSpec, check, ensure_publication_and_slot};

//! The PostgreSQL source.
//!
//! `sluice-source-pg` owns reading a PostgreSQL database through logical replication
//! (pgoutput): the prerequisite checks with their fixes, the publication and slot, the
//! keyset-paged backfill, decoding changes into [`sluice_core::Record`]s, and confirming the
//! slot only after the records stream holds the changes durably.
//!
//! It must not write to targets: it appends to the stream and nothing else.
//!
//! The source arrives with the Postgres-source issue.

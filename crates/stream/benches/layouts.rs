//! `cargo xtask bench stream-layouts`: what SQLite costs per appended record for the ways the
//! stream's per-record rows could be laid out, measured side by side in one run, so that a
//! change of the stream's file format is chosen by measurement. Only SQLite's own work is
//! timed: the payloads' JSON text is made before the clock starts, and every layout stores an
//! append's payloads the same way (one LZ4 segment row per append, as the stream does).
//!
//! The layouts:
//! - **today's**: a row per record keyed by its seq, with a unique index on the record's key
//!   (`crates/stream/src/embedded/schema.rs`, without the triggers that count each segment's
//!   live records), written with the stream's multi-row upsert and version guard; with keys
//!   that arrive in order (`cus_00000001`, `cus_00000002`, …) and with keys in no order (as
//!   UUIDs and most SaaS ids are);
//! - **key rows only**: a `WITHOUT ROWID` row per key holding its seq and version, the other
//!   columns packed into the append's segment;
//! - **hashed key rows**: a rowid row per 64-bit hash of the key.
//!
//! Each layout is written twice: every key new, then every key updated (a newer version).
//! `SLUICE_BENCH_RECORDS` (default 200,000) and `SLUICE_BENCH_BATCH` (records per append,
//! default 1000) size the run; `SLUICE_BENCH_PAGE_SIZE` (16384), `SLUICE_BENCH_JOURNAL` (`wal`),
//! `SLUICE_BENCH_CACHE_KIB` (32768) and `SLUICE_BENCH_AUTOCHECKPOINT` (1000 pages) change the
//! file's settings from the stream's; `SLUICE_BENCH_LAYOUT` runs only the layouts whose name
//! holds it (`no order`, say), `SLUICE_BENCH_STATEMENT_ROWS` (100) sets the records per
//! insert statement, and `SLUICE_BENCH_SORTED=1` writes each append's records in key order
//! (each with the seq of its place in the append).

use std::hash::BuildHasher;
use std::time::Instant;

use rusqlite::{Connection, Statement};

/// One way to lay the per-record rows out.
struct Layout {
    name: &'static str,
    schema: &'static str,
    /// `insert into … (columns)`; the values lists and `upsert` follow.
    insert: &'static str,
    /// `on conflict … do update …` with the version guard.
    upsert: &'static str,
    columns: usize,
    /// The record's other columns go into its append's segment.
    packed: bool,
    /// Binds record `i`'s values from parameter `at` on.
    bind: fn(&mut Statement<'_>, usize, Row) -> rusqlite::Result<()>,
    /// Record `i`'s key, for `SLUICE_BENCH_SORTED`.
    key: fn(usize) -> String,
}

/// What a layout binds for one record.
#[derive(Clone, Copy)]
struct Row {
    i: usize,
    seq: i64,
    version: i64,
    segment: i64,
    slot: i64,
}

/// Bytes of other columns per record packed into a segment (the stream's row is about this).
const PACKED_BYTES: usize = 40;

fn key_in_order(i: usize) -> String {
    format!("cus_{i:08}")
}

fn key_in_no_order(i: usize) -> String {
    format!(
        "cus_{:016x}",
        foldhash::fast::FixedState::with_seed(7).hash_one(i)
    )
}

/// Today's row as the stream writes it for an append whose records share their update time
/// (a PostgreSQL source's page or transaction): both times 0, held by the segment.
fn bind_row(st: &mut Statement<'_>, at: usize, row: Row, key: String) -> rusqlite::Result<()> {
    st.raw_bind_parameter(at, row.seq)?;
    st.raw_bind_parameter(at + 1, 1i64)?;
    st.raw_bind_parameter(at + 2, key)?;
    st.raw_bind_parameter(at + 3, row.version)?;
    st.raw_bind_parameter(at + 4, 0i64)?;
    st.raw_bind_parameter(at + 5, 0i64)?;
    st.raw_bind_parameter(at + 6, false)?;
    st.raw_bind_parameter(at + 7, row.segment)?;
    st.raw_bind_parameter(at + 8, row.slot)?;
    st.raw_bind_parameter(at + 9, 0i64)
}

const TODAY_SCHEMA: &str = "
create table segments (id integer primary key, body blob not null);
create table t (seq integer primary key, collection integer not null, upstream_id text not null,
    vmaj integer not null, vmin integer not null, updated integer not null,
    deleted integer not null, segment integer, slot integer, appended integer not null,
    unique (collection, upstream_id));";
const TODAY_INSERT: &str = "insert into t (seq, collection, upstream_id, vmaj, vmin, updated, \
                            deleted, segment, slot, appended)";
const TODAY_UPSERT: &str = "on conflict (collection, upstream_id) do update set \
    seq = excluded.seq, vmaj = excluded.vmaj, vmin = excluded.vmin, updated = excluded.updated, \
    deleted = excluded.deleted, segment = excluded.segment, slot = excluded.slot, \
    appended = excluded.appended \
    where excluded.vmaj > t.vmaj or (excluded.vmaj = t.vmaj and excluded.vmin > t.vmin)";

const LAYOUTS: [Layout; 4] = [
    Layout {
        name: "today's: a row per record, keys in order",
        schema: TODAY_SCHEMA,
        insert: TODAY_INSERT,
        upsert: TODAY_UPSERT,
        columns: 10,
        packed: false,
        bind: |st, at, row| bind_row(st, at, row, key_in_order(row.i)),
        key: key_in_order,
    },
    Layout {
        name: "today's: a row per record, keys in no order",
        schema: TODAY_SCHEMA,
        insert: TODAY_INSERT,
        upsert: TODAY_UPSERT,
        columns: 10,
        packed: false,
        bind: |st, at, row| bind_row(st, at, row, key_in_no_order(row.i)),
        key: key_in_no_order,
    },
    Layout {
        name: "key rows only, keys in order",
        schema: "
create table segments (id integer primary key, body blob not null);
create table t (collection integer not null, upstream_id text not null, seq integer not null,
    vmaj integer not null, vmin integer not null, primary key (collection, upstream_id))
    without rowid;",
        insert: "insert into t (collection, upstream_id, seq, vmaj, vmin)",
        upsert: "on conflict (collection, upstream_id) do update set \
            seq = excluded.seq, vmaj = excluded.vmaj, vmin = excluded.vmin \
            where excluded.vmaj > t.vmaj or (excluded.vmaj = t.vmaj and excluded.vmin > t.vmin)",
        columns: 5,
        packed: true,
        bind: |st, at, row| {
            st.raw_bind_parameter(at, 1i64)?;
            st.raw_bind_parameter(at + 1, key_in_order(row.i))?;
            st.raw_bind_parameter(at + 2, row.seq)?;
            st.raw_bind_parameter(at + 3, row.version)?;
            st.raw_bind_parameter(at + 4, 0i64)
        },
        key: key_in_order,
    },
    Layout {
        name: "hashed key rows, keys in order",
        schema: "
create table segments (id integer primary key, body blob not null);
create table t (h integer primary key, seq integer not null, vmaj integer not null,
    vmin integer not null);",
        insert: "insert into t (h, seq, vmaj, vmin)",
        upsert: "on conflict (h) do update set \
            seq = excluded.seq, vmaj = excluded.vmaj, vmin = excluded.vmin \
            where excluded.vmaj > t.vmaj or (excluded.vmaj = t.vmaj and excluded.vmin > t.vmin)",
        columns: 4,
        packed: true,
        bind: |st, at, row| {
            let hash = foldhash::fast::FixedState::with_seed(7).hash_one(key_in_order(row.i));
            st.raw_bind_parameter(at, hash as i64)?;
            st.raw_bind_parameter(at + 1, row.seq)?;
            st.raw_bind_parameter(at + 2, row.version)?;
            st.raw_bind_parameter(at + 3, 0i64)
        },
        key: key_in_order,
    },
];

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn payload(i: usize, version: i64) -> String {
    format!(
        r#"{{"id":{i},"v":{version},"email":"customer{i}@example.com","name":"Customer {i}","metadata":{{"user_id":"u_{i}","plan":"pro"}},"tags":["a","b","c"],"description":"{i:0>820}"}}"#
    )
}

fn open(path: &std::path::Path, schema: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    let page: u32 = env("SLUICE_BENCH_PAGE_SIZE", 16384);
    let journal: String = env("SLUICE_BENCH_JOURNAL", "wal".to_owned());
    let cache: u32 = env("SLUICE_BENCH_CACHE_KIB", 32768);
    conn.execute_batch(&format!(
        "pragma page_size = {page}; pragma journal_mode = {journal}; pragma synchronous = full; \
         pragma temp_store = memory; pragma cache_size = -{cache}; \
         pragma wal_autocheckpoint = {};",
        env("SLUICE_BENCH_AUTOCHECKPOINT", 1000u32)
    ))?;
    conn.execute_batch(schema)?;
    Ok(conn)
}

/// One append: the payloads (and, when `packed`, the other columns) as one LZ4 segment row;
/// its id.
fn segment(conn: &Connection, texts: &[String], packed: bool) -> rusqlite::Result<i64> {
    let mut raw = Vec::with_capacity(texts.iter().map(String::len).sum::<usize>() + 64);
    for text in texts {
        raw.extend_from_slice(text.as_bytes());
        if packed {
            raw.extend_from_slice(&[0; PACKED_BYTES]);
        }
    }
    let body = lz4_flex::block::compress_prepend_size(&raw);
    conn.prepare_cached("insert into segments (body) values (?)")?
        .execute([body])?;
    Ok(conn.last_insert_rowid())
}

/// Writes every record of `layout` twice (new, then updated); the records per second of each.
fn measure(layout: &Layout, n: usize, batch: usize) -> rusqlite::Result<[f64; 2]> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut conn = open(&dir.path().join("stream.sqlite3"), layout.schema)?;
    let one = format!("({})", vec!["?"; layout.columns].join(","));
    let statement = |rows: usize| {
        let values = vec![one.as_str(); rows].join(",");
        format!("{} values {values} {}", layout.insert, layout.upsert)
    };
    let statement_rows: usize = env("SLUICE_BENCH_STATEMENT_ROWS", 100).max(1);
    let sorted = env("SLUICE_BENCH_SORTED", 0u8) == 1;
    let mut seq = 0i64;
    let mut rates = [0.0; 2];
    for (round, rate) in rates.iter_mut().enumerate() {
        let version = round as i64 + 1;
        let texts: Vec<String> = (0..n).map(|i| payload(i, version)).collect();
        let started = Instant::now();
        for (b, chunk) in texts.chunks(batch).enumerate() {
            let tx = conn.transaction()?;
            let segment = segment(&tx, chunk, layout.packed)?;
            // The append's records in the order they are written: as given, or by key (each
            // keeps the seq of its place in the append).
            let first = b * batch;
            let mut order: Vec<usize> = (0..chunk.len()).collect();
            if sorted {
                order.sort_by_cached_key(|&slot| (layout.key)(first + slot));
            }
            for rows in order.chunks(statement_rows) {
                let mut st = tx.prepare_cached(&statement(rows.len()))?;
                for (j, &slot) in rows.iter().enumerate() {
                    let row = Row {
                        i: first + slot,
                        seq: seq + 1 + slot as i64,
                        version,
                        segment,
                        slot: slot as i64,
                    };
                    (layout.bind)(&mut st, 1 + j * layout.columns, row)?;
                }
                st.raw_execute()?;
            }
            seq += chunk.len() as i64;
            tx.commit()?;
        }
        *rate = n as f64 / started.elapsed().as_secs_f64();
    }
    Ok(rates)
}

fn main() {
    let n: usize = env("SLUICE_BENCH_RECORDS", 200_000);
    let batch: usize = env("SLUICE_BENCH_BATCH", 1000).max(1);
    println!(
        "stream layouts: {n} records of ~{} B payloads, appends of {batch}, SQLite's work only\n",
        payload(0, 1).len()
    );
    println!(
        "{:<46} {:>12} {:>10} {:>12} {:>10}",
        "layout", "new rec/s", "us/rec", "updates/s", "us/rec"
    );
    let only: String = env("SLUICE_BENCH_LAYOUT", String::new());
    for layout in LAYOUTS.iter().filter(|l| l.name.contains(only.as_str())) {
        let [new, updated] = measure(layout, n, batch).expect("SQLite failed");
        println!(
            "{:<46} {new:>12.0} {:>10.2} {updated:>12.0} {:>10.2}",
            layout.name,
            1e6 / new,
            1e6 / updated
        );
    }
}

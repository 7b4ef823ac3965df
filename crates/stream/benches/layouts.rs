//! `cargo xtask bench stream-layouts`: what SQLite costs per record for the ways the stream's
//! per-record rows could be laid out, measured side by side in one run, so that a change of
//! the stream's file format is chosen by measurement. Only SQLite's own work (and the
//! segments' LZ4) is timed: the payloads' JSON text is made before the clock starts, and every
//! layout stores an append's payloads the same way (one LZ4 segment per append, its counts
//! and its body in two rows, as the stream does).
//!
//! The layouts:
//! - **today's**: a row per record keyed by its seq, with a unique index on the record's key
//!   (`crates/stream/src/embedded/schema.rs`, with its trigger counting each segment's live
//!   records), written with the stream's multi-row upsert and version guard; with keys that
//!   arrive in order (`cus_00000001`, `cus_00000002`, …) and with keys in no order (as UUIDs
//!   and most SaaS ids are). A read takes rows by seq and each row's payload from its segment;
//! - **key rows only**: a `WITHOUT ROWID` row per key holding its seq, version and segment,
//!   the record's key and other columns packed into the append's segment beside its payload.
//!   What that layout must do besides, and today's need not, is counted too: a replaced record's
//!   seq goes into a table of dead seqs (its trigger, beside the live count's), and a read
//!   walks the segments in order, takes each one's dead seqs with one range scan, and unpacks
//!   the live records;
//! - **hashed key rows**: a rowid row per 64-bit hash of the key, otherwise as key rows only.
//!
//! Each layout is written three times: every key new, then every key updated (a newer
//! version), then every other key updated again; and read three times, from the start, after
//! each of the first two writes and after the third (where every other record of the second
//! write's segments is dead). `SLUICE_BENCH_RECORDS` (default 200,000) and
//! `SLUICE_BENCH_BATCH` (records per append, default 1000) size the run;
//! `SLUICE_BENCH_PAGE_SIZE` (16384), `SLUICE_BENCH_JOURNAL` (`wal`), `SLUICE_BENCH_CACHE_KIB`
//! (32768) and `SLUICE_BENCH_AUTOCHECKPOINT` (1000 pages) change the file's settings from the
//! stream's; `SLUICE_BENCH_LAYOUT` runs only the layouts whose name holds it (`no order`,
//! say), `SLUICE_BENCH_STATEMENT_ROWS` (100) sets the records per insert statement,
//! `SLUICE_BENCH_SORTED=1` writes each append's records in key order (each with the seq of its
//! place in the append), and `SLUICE_BENCH_PAYLOAD_BYTES` (~1,000) sets the payloads' size.

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
    /// The record's key and other columns go into its append's segment, and reads walk the
    /// segments.
    packed: bool,
    /// Binds record `i`'s values from parameter `at` on.
    bind: fn(&mut Statement<'_>, usize, Row) -> rusqlite::Result<()>,
    /// Record `i`'s key.
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

/// The segments every layout shares: counts (and the append's first seq) in one row, the
/// body in another.
const SEGMENTS: &str = "
create table segments (id integer primary key, first integer not null, records integer not null,
    live integer not null);
create table segment_bodies (segment integer primary key, body blob not null);";

const TODAY_SCHEMA: &str = "
create table t (seq integer primary key, collection integer not null, upstream_id text not null,
    vmaj integer not null, vmin integer not null, updated integer not null,
    deleted integer not null, segment integer, slot integer, appended integer not null,
    unique (collection, upstream_id));
create trigger replaced after update of segment, slot on t
when old.segment is not null
 and (new.segment is null or new.segment != old.segment or new.slot != old.slot)
begin
    update segments set live = live - 1 where id = old.segment;
end;";
const TODAY_INSERT: &str = "insert into t (seq, collection, upstream_id, vmaj, vmin, updated, \
                            deleted, segment, slot, appended)";
const TODAY_UPSERT: &str = "on conflict (collection, upstream_id) do update set \
    seq = excluded.seq, vmaj = excluded.vmaj, vmin = excluded.vmin, updated = excluded.updated, \
    deleted = excluded.deleted, segment = excluded.segment, slot = excluded.slot, \
    appended = excluded.appended \
    where excluded.vmaj > t.vmaj or (excluded.vmaj = t.vmaj and excluded.vmin > t.vmin)";

/// What a packed layout must keep besides: the seqs whose record was replaced.
const DEAD: &str = "
create table dead (seq integer primary key);
create trigger replaced after update of seq on t
begin
    update segments set live = live - 1 where id = old.segment;
    insert into dead (seq) values (old.seq);
end;";

const KEY_ROWS_SCHEMA: &str = "
create table t (collection integer not null, upstream_id text not null, seq integer not null,
    vmaj integer not null, vmin integer not null, segment integer not null,
    primary key (collection, upstream_id)) without rowid;";
const KEY_ROWS_INSERT: &str = "insert into t (collection, upstream_id, seq, vmaj, vmin, segment)";
const KEY_ROWS_UPSERT: &str = "on conflict (collection, upstream_id) do update set \
    seq = excluded.seq, vmaj = excluded.vmaj, vmin = excluded.vmin, segment = excluded.segment \
    where excluded.vmaj > t.vmaj or (excluded.vmaj = t.vmaj and excluded.vmin > t.vmin)";

fn bind_key_row(st: &mut Statement<'_>, at: usize, row: Row, key: String) -> rusqlite::Result<()> {
    st.raw_bind_parameter(at, 1i64)?;
    st.raw_bind_parameter(at + 1, key)?;
    st.raw_bind_parameter(at + 2, row.seq)?;
    st.raw_bind_parameter(at + 3, row.version)?;
    st.raw_bind_parameter(at + 4, 0i64)?;
    st.raw_bind_parameter(at + 5, row.segment)
}

const LAYOUTS: [Layout; 5] = [
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
        schema: KEY_ROWS_SCHEMA,
        insert: KEY_ROWS_INSERT,
        upsert: KEY_ROWS_UPSERT,
        columns: 6,
        packed: true,
        bind: |st, at, row| bind_key_row(st, at, row, key_in_order(row.i)),
        key: key_in_order,
    },
    Layout {
        name: "key rows only, keys in no order",
        schema: KEY_ROWS_SCHEMA,
        insert: KEY_ROWS_INSERT,
        upsert: KEY_ROWS_UPSERT,
        columns: 6,
        packed: true,
        bind: |st, at, row| bind_key_row(st, at, row, key_in_no_order(row.i)),
        key: key_in_no_order,
    },
    Layout {
        name: "hashed key rows, keys in order",
        schema: "
create table t (h integer primary key, seq integer not null, vmaj integer not null,
    vmin integer not null, segment integer not null);",
        insert: "insert into t (h, seq, vmaj, vmin, segment)",
        upsert: "on conflict (h) do update set \
            seq = excluded.seq, vmaj = excluded.vmaj, vmin = excluded.vmin, \
            segment = excluded.segment \
            where excluded.vmaj > t.vmaj or (excluded.vmaj = t.vmaj and excluded.vmin > t.vmin)",
        columns: 5,
        packed: true,
        bind: |st, at, row| {
            let hash = foldhash::fast::FixedState::with_seed(7).hash_one(key_in_order(row.i));
            st.raw_bind_parameter(at, hash as i64)?;
            st.raw_bind_parameter(at + 1, row.seq)?;
            st.raw_bind_parameter(at + 2, row.version)?;
            st.raw_bind_parameter(at + 3, 0i64)?;
            st.raw_bind_parameter(at + 4, row.segment)
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
    let filler = env("SLUICE_BENCH_PAYLOAD_BYTES", 1000usize).saturating_sub(180);
    format!(
        r#"{{"id":{i},"v":{version},"email":"customer{i}@example.com","name":"Customer {i}","metadata":{{"user_id":"u_{i}","plan":"pro"}},"tags":["a","b","c"],"description":"{i:0>filler$}"}}"#
    )
}

fn open(path: &std::path::Path, schema: &str, packed: bool) -> rusqlite::Result<Connection> {
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
    conn.execute_batch(SEGMENTS)?;
    conn.execute_batch(schema)?;
    if packed {
        conn.execute_batch(DEAD)?;
    }
    Ok(conn)
}

/// What a packed layout keeps of a record in its segment besides the payload and the key:
/// both versions, both times and the tombstone flag.
const PACKED_BYTES: usize = 33;

/// One append's segment: each entry's length (`u32`), then the entries: the payload, or for a
/// packed layout the key's length (`u16`), the key, the other columns and the payload.
fn segment_body(texts: &[String], keys: Option<&[String]>) -> Vec<u8> {
    let mut raw = Vec::with_capacity(texts.iter().map(String::len).sum::<usize>() * 2 + 64);
    raw.extend_from_slice(&(texts.len() as u32).to_le_bytes());
    let entry = |slot: usize| {
        texts[slot].len() + keys.map_or(0, |keys| 2 + keys[slot].len() + PACKED_BYTES)
    };
    for slot in 0..texts.len() {
        raw.extend_from_slice(&(entry(slot) as u32).to_le_bytes());
    }
    for (slot, text) in texts.iter().enumerate() {
        if let Some(keys) = keys {
            raw.extend_from_slice(&(keys[slot].len() as u16).to_le_bytes());
            raw.extend_from_slice(keys[slot].as_bytes());
            raw.extend_from_slice(&[1; PACKED_BYTES]);
        }
        raw.extend_from_slice(text.as_bytes());
    }
    lz4_flex::block::compress_prepend_size(&raw)
}

/// A segment's entries, as [`segment_body`] laid them out.
fn entries(body: &[u8]) -> Vec<Vec<u8>> {
    let raw = lz4_flex::block::decompress_size_prepended(body).expect("a segment");
    let count = u32::from_le_bytes(raw[..4].try_into().expect("a count")) as usize;
    let mut at = 4 + 4 * count;
    (0..count)
        .map(|slot| {
            let len =
                u32::from_le_bytes(raw[4 + 4 * slot..8 + 4 * slot].try_into().expect("a len"));
            let entry = raw[at..at + len as usize].to_vec();
            at += len as usize;
            entry
        })
        .collect()
}

/// One append's segment (its counts and its body); its id.
fn segment(
    conn: &Connection,
    texts: &[String],
    keys: Option<&[String]>,
    first: i64,
) -> rusqlite::Result<i64> {
    conn.prepare_cached("insert into segments (first, records, live) values (?, ?, ?)")?
        .execute((first, texts.len() as i64, texts.len() as i64))?;
    let id = conn.last_insert_rowid();
    conn.prepare_cached("insert into segment_bodies (segment, body) values (?, ?)")?
        .execute((id, segment_body(texts, keys)))?;
    Ok(id)
}

/// A record as a read gives it: its seq, key and payload, each copied out as the stream's
/// reads do.
struct Read {
    seq: i64,
    key: String,
    payload: String,
}

/// Every live record of a today's file, in seq order: its row by seq (1,000 at a time), its
/// payload from its segment (the last one kept unpacked).
fn read_by_seq(conn: &Connection) -> rusqlite::Result<Vec<Read>> {
    let mut out = Vec::new();
    let mut after = 0i64;
    let mut cached: Option<(i64, Vec<Vec<u8>>)> = None;
    loop {
        let mut st = conn.prepare_cached(
            "select seq, collection, upstream_id, vmaj, vmin, updated, deleted, segment, slot, \
             appended from t where seq > ? order by seq limit 1000",
        )?;
        let mut rows = st.query([after])?;
        let before = out.len();
        while let Some(row) = rows.next()? {
            let seq: i64 = row.get(0)?;
            let (_c, key): (i64, String) = (row.get(1)?, row.get(2)?);
            let (_a, _b, _u, _d): (i64, i64, i64, bool) =
                (row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?);
            let (segment, slot, _t): (i64, i64, i64) = (row.get(7)?, row.get(8)?, row.get(9)?);
            if cached.as_ref().is_none_or(|(id, _)| *id != segment) {
                let body: Vec<u8> = conn
                    .prepare_cached("select body from segment_bodies where segment = ?")?
                    .query_row([segment], |r| r.get(0))?;
                cached = Some((segment, entries(&body)));
            }
            let entry = &cached.as_ref().expect("a segment").1[slot as usize];
            let payload = String::from_utf8(entry.clone()).expect("UTF-8");
            out.push(Read { seq, key, payload });
            after = seq;
        }
        if out.len() == before {
            return Ok(out);
        }
    }
}

/// Every live record of a packed file, in seq order: the segments in order (those with no live
/// record skipped by their count), each one's dead seqs by one range scan, and each live
/// entry unpacked.
fn read_by_segment(conn: &Connection) -> rusqlite::Result<Vec<Read>> {
    let mut out = Vec::new();
    let mut after = 0i64;
    loop {
        let mut st = conn.prepare_cached(
            "select s.id, s.first, s.records, s.live, b.body from segments s \
             join segment_bodies b on b.segment = s.id \
             where s.id > ? and s.live > 0 order by s.id limit 8",
        )?;
        let segments: Vec<(i64, i64, i64, i64, Vec<u8>)> = st
            .query_map([after], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        if segments.is_empty() {
            return Ok(out);
        }
        for (id, first, records, live, body) in segments {
            after = id;
            let mut dead = Vec::new();
            if live < records {
                let mut st = conn.prepare_cached(
                    "select seq from dead where seq >= ? and seq < ? order by seq",
                )?;
                dead = st
                    .query_map([first, first + records], |r| r.get::<_, i64>(0))?
                    .collect::<rusqlite::Result<_>>()?;
            }
            let mut dead = dead.into_iter().peekable();
            for (slot, entry) in entries(&body).into_iter().enumerate() {
                let seq = first + slot as i64;
                if dead.next_if_eq(&seq).is_some() {
                    continue;
                }
                let key_len = u16::from_le_bytes([entry[0], entry[1]]) as usize;
                let key = String::from_utf8(entry[2..2 + key_len].to_vec()).expect("UTF-8");
                let payload =
                    String::from_utf8(entry[2 + key_len + PACKED_BYTES..].to_vec()).expect("UTF-8");
                out.push(Read { seq, key, payload });
            }
        }
    }
}

/// What one layout measured: records per second for each write and each read.
struct Measured {
    writes: [f64; 3],
    reads: [f64; 3],
}

/// Writes every record of `layout` (new, all updated, every other one updated again), reading
/// the whole stream back after each of the first two writes and the third.
fn measure(layout: &Layout, n: usize, batch: usize) -> rusqlite::Result<Measured> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut conn = open(
        &dir.path().join("stream.sqlite3"),
        layout.schema,
        layout.packed,
    )?;
    let one = format!("({})", vec!["?"; layout.columns].join(","));
    let statement = |rows: usize| {
        let values = vec![one.as_str(); rows].join(",");
        format!("{} values {values} {}", layout.insert, layout.upsert)
    };
    let statement_rows: usize = env("SLUICE_BENCH_STATEMENT_ROWS", 100).max(1);
    let sorted = env("SLUICE_BENCH_SORTED", 0u8) == 1;
    let mut seq = 0i64;
    let mut measured = Measured {
        writes: [0.0; 3],
        reads: [0.0; 3],
    };
    for round in 0..3 {
        let version = round as i64 + 1;
        // The third write updates every other key.
        let step = if round == 2 { 2 } else { 1 };
        let written: Vec<usize> = (0..n).step_by(step).collect();
        let texts: Vec<String> = written.iter().map(|&i| payload(i, version)).collect();
        let keys: Vec<String> = written.iter().map(|&i| (layout.key)(i)).collect();
        let started = Instant::now();
        for (b, chunk) in texts.chunks(batch).enumerate() {
            let tx = conn.transaction()?;
            let first = b * batch;
            let packed = layout.packed.then(|| &keys[first..first + chunk.len()]);
            let segment = segment(&tx, chunk, packed, seq + 1)?;
            // The append's records in the order they are written: as given, or by key (each
            // keeps the seq of its place in the append).
            let mut order: Vec<usize> = (0..chunk.len()).collect();
            if sorted {
                order.sort_by(|&a, &b| keys[first + a].cmp(&keys[first + b]));
            }
            for rows in order.chunks(statement_rows) {
                let mut st = tx.prepare_cached(&statement(rows.len()))?;
                for (j, &slot) in rows.iter().enumerate() {
                    let row = Row {
                        i: written[first + slot],
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
        measured.writes[round] = written.len() as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        let read = if layout.packed {
            read_by_segment(&conn)?
        } else {
            read_by_seq(&conn)?
        };
        measured.reads[round] = read.len() as f64 / started.elapsed().as_secs_f64();
        // Every key once, at its newest version, in seq order: the layouts read the same.
        assert_eq!(read.len(), n, "{}: every key read once", layout.name);
        assert!(read.windows(2).all(|w| w[0].seq < w[1].seq));
        let updated = read
            .iter()
            .filter(|r| r.payload.contains(&format!(r#""v":{version},"#)));
        assert_eq!(
            updated.count(),
            written.len(),
            "{}: the newest versions",
            layout.name
        );
        assert!(read.iter().all(|r| r.key.starts_with("cus_")));
    }
    Ok(measured)
}

fn main() {
    let n: usize = env("SLUICE_BENCH_RECORDS", 200_000);
    let batch: usize = env("SLUICE_BENCH_BATCH", 1000).max(1);
    println!(
        "stream layouts: {n} records of ~{} B payloads, appends of {batch}, SQLite's work only\n\
         (writes: all new, all updated, every other one updated again;\n\
         reads: the whole stream after each)\n",
        payload(0, 1).len()
    );
    println!(
        "{:<44} {:>14} {:>14} {:>14} {:>11} {:>11} {:>11}",
        "layout", "new", "updated", "every other", "read new", "read upd.", "read half"
    );
    let only: String = env("SLUICE_BENCH_LAYOUT", String::new());
    for layout in LAYOUTS.iter().filter(|l| l.name.contains(only.as_str())) {
        let m = measure(layout, n, batch).expect("SQLite failed");
        let us = |rate: f64| 1e6 / rate;
        println!(
            "{:<44} {:>14.2} {:>14.2} {:>14.2} {:>11.2} {:>11.2} {:>11.2}",
            layout.name,
            us(m.writes[0]),
            us(m.writes[1]),
            us(m.writes[2]),
            us(m.reads[0]),
            us(m.reads[1]),
            us(m.reads[2]),
        );
    }
    println!("\n(µs per record; reads count the live records they return)");
}

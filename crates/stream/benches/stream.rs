//! `cargo xtask bench stream`: append and read rates of the embedded records stream for ~1 KB
//! records (or of the size `SLUICE_BENCH_PAYLOAD_BYTES` says), with the allocator the binary
//! runs with, beside a baseline measured in the same run: plain multi-row `INSERT`s of the same
//! rows into a SQLite table with no key, no upsert and no indexes, through rusqlite with cached
//! statements, in a file with the same settings (16 KiB pages, WAL, synchronous = FULL).
//! Records' ids come in order (`cus_00000001`, …, or `1`, `2`, … with `SLUICE_BENCH_IDS=numbers`,
//! as a table's serial key), then, into a stream of their own, in no order (as UUIDs and most
//! SaaS ids are).
//!
//! `append` takes records whose payloads are maps, so its rows include writing each payload out
//! as JSON text (the baseline's inserts do the same). The PostgreSQL source hands the stream
//! that text already written (`append_texts`): the "as text" rows append the same records that
//! way, their batches written before the timing, beside plain inserts of the same texts, so
//! they show what the store itself costs a record. `SLUICE_BENCH_PAYLOAD_BYTES` sets about how
//! large a payload is (default ~960 bytes; the replication benchmark's rows are ~250).

use std::time::Instant;

use serde_json::json;
use sluice_core::{
    Change, Provider, Record, RecordFilter, RecordKey, RecordStream, Seq, SyncId, TextBatch,
    Version,
};
use sluice_stream::EmbeddedStream;
use time::OffsetDateTime;
use uuid::Uuid;

/// The allocator `sluice serve` runs with (bins/sluice/src/main.rs), so that the rates here are
/// the binary's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn record(i: usize, version: u64) -> Record {
    let id = match numbered() {
        true => (i + 1).to_string(),
        false => format!("cus_{i:08}"),
    };
    record_with_id(i, version, id)
}

/// `SLUICE_BENCH_IDS=numbers`: ids in order are `1`, `2`, … (a table's serial key, as the
/// PostgreSQL source writes it) rather than `cus_00000001`, … (which sort as text in the order
/// they come).
fn numbered() -> bool {
    std::env::var("SLUICE_BENCH_IDS").is_ok_and(|v| v == "numbers")
}

/// The description's length: the payload's other fields take about 140 bytes.
fn description_chars() -> usize {
    std::env::var("SLUICE_BENCH_PAYLOAD_BYTES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(820, |bytes| bytes.saturating_sub(140))
}

/// Record `i` with an id in no order (a hash of `i`), as UUIDs and most SaaS ids are.
fn scattered(i: usize) -> Record {
    use std::hash::BuildHasher;
    let hash = foldhash::fast::FixedState::with_seed(7).hash_one(i);
    record_with_id(i, 1, format!("cus_{hash:016x}"))
}

fn record_with_id(i: usize, version: u64, id: String) -> Record {
    Record {
        key: RecordKey::new(SyncId(Uuid::from_u128(1)), "stripe:customer", id),
        provider: Provider::Http,
        version: Version::new(version, 0),
        upstream_updated_at: OffsetDateTime::from_unix_timestamp(1_700_000_000 + i as i64).unwrap(),
        change: Change::upsert(json!({
            "id": i, "email": format!("customer{i}@example.com"), "name": format!("Customer {i}"),
            "metadata": {"user_id": format!("u_{i}"), "plan": "pro"}, "tags": ["a", "b", "c"],
            "description": format!("{i:0>description$}", description = description_chars()),
        }))
        .unwrap(),
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let n: usize = std::env::var("SLUICE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let batch: usize = std::env::var("SLUICE_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let records: Vec<Record> = (0..n).map(|i| record(i, 1)).collect();
    let updates: Vec<Record> = (0..n).map(|i| record(i, 2)).collect();
    let size = serde_json::to_string(records[0].change.payload().unwrap())
        .unwrap()
        .len();
    println!(
        "records stream benchmark: {n} records, ~{size} B payloads, batches of {batch}, WAL + synchronous=FULL\n"
    );

    // Baseline: plain inserts of the same rows, same settings.
    let (baseline, baseline_bytes) = plain_inserts(&records, batch, None);

    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    // Batches are built before the timing, as a source hands over records it built anyway
    // (the baseline above borrows its rows and copies nothing either).
    let batches: Vec<Vec<Record>> = records.chunks(batch).map(|c| c.to_vec()).collect();
    let started = Instant::now();
    for chunk in batches {
        stream.append(chunk).await.unwrap();
    }
    let append_new = n as f64 / started.elapsed().as_secs_f64();
    let batches: Vec<Vec<Record>> = updates.chunks(batch).map(|c| c.to_vec()).collect();
    let started = Instant::now();
    for chunk in batches {
        stream.append(chunk).await.unwrap();
    }
    let append_update = n as f64 / started.elapsed().as_secs_f64();

    let filter = RecordFilter::Provider(Provider::Http);
    let started = Instant::now();
    let mut cursor = Seq::START;
    let mut read = 0;
    loop {
        let r = stream.read(&filter, cursor, batch).await.unwrap();
        if r.entries.is_empty() {
            break;
        }
        read += r.entries.len();
        cursor = r.through;
    }
    assert_eq!(read, n);
    let read_rate = n as f64 / started.elapsed().as_secs_f64();
    // As consumers read: payloads as the stored JSON text, not parsed.
    let started = Instant::now();
    let (mut cursor, mut read) = (Seq::START, 0);
    loop {
        let r = stream.read_text(&filter, cursor, batch).await.unwrap();
        if r.entries.is_empty() {
            break;
        }
        read += r.entries.len();
        cursor = r.through;
    }
    assert_eq!(read, n);
    let read_text_rate = n as f64 / started.elapsed().as_secs_f64();
    drop(stream);
    // The file after both rounds (every record written twice), checkpointed like the baseline.
    rusqlite::Connection::open(dir.path().join(sluice_stream::FILE_NAME))
        .unwrap()
        .execute_batch("pragma wal_checkpoint(truncate)")
        .unwrap();
    let stream_bytes = bytes_under(dir.path());

    // The same records with ids in no order, into a stream of their own: each append's keys
    // land all over the key index (crates/stream/benches/layouts.rs measures why that costs).
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let batches: Vec<Vec<Record>> = (0..n)
        .map(scattered)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|c| c.to_vec())
        .collect();
    let started = Instant::now();
    for chunk in batches {
        stream.append(chunk).await.unwrap();
    }
    let append_scattered = n as f64 / started.elapsed().as_secs_f64();
    drop(stream);

    // As the PostgreSQL source appends: payloads already JSON text, each append's batch
    // written before the timing, into a stream of their own; beside plain inserts of the same
    // texts (the baseline's own writing out of payloads left out too).
    let texts: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r.change.payload().unwrap()).unwrap())
        .collect();
    let (text_baseline, _) = plain_inserts(&records, batch, Some(&texts));
    drop(texts);
    let as_text = |records: &[Record]| -> Vec<TextBatch> {
        records
            .chunks(batch)
            .map(|c| TextBatch::from_records(c.to_vec()).unwrap())
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let mut rates = [0.0; 2];
    for (rate, records) in rates.iter_mut().zip([&records, &updates]) {
        let batches = as_text(records);
        let started = Instant::now();
        for batch in batches {
            stream.append_texts(batch, None).await.unwrap();
        }
        *rate = n as f64 / started.elapsed().as_secs_f64();
    }
    let [text_new, text_update] = rates;
    drop(stream);

    println!(
        "{:<40} {:>12} {:>16} {:>7}",
        "operation", "records/s", "baseline rec/s", "goal"
    );
    println!(
        "{:<40} {:>12.0} {:>16.0} {:>7}",
        &format!("append, all new (batches of {batch})"),
        append_new,
        baseline,
        "≥500k"
    );
    println!(
        "{:<40} {:>12.0} {:>16.0} {:>7}",
        "append, all updates (compaction)", append_update, baseline, "≥500k"
    );
    println!(
        "{:<40} {:>12.0} {:>16.0} {:>7}",
        "append, all new, ids in no order", append_scattered, baseline, "≥500k"
    );
    println!(
        "{:<40} {:>12.0} {:>16.0} {:>7}",
        "append as text, all new", text_new, text_baseline, "≥500k"
    );
    println!(
        "{:<40} {:>12.0} {:>16.0} {:>7}",
        "append as text, all updates", text_update, text_baseline, "≥500k"
    );
    println!(
        "{:<40} {:>12.0} {:>16} {:>7}",
        "read (backfill from 0, 1000 per read)", read_rate, "-", "≥1M"
    );
    println!(
        "{:<40} {:>12.0} {:>16} {:>7}",
        "read as text (as consumers read)", read_text_rate, "-", "≥1M"
    );
    println!(
        "{:<40} {:>12.0} {:>16.0} {:>7}",
        "bytes on disk per record",
        stream_bytes as f64 / n as f64,
        baseline_bytes as f64 / n as f64,
        "-"
    );
    let verdict = |rate: f64, goal: f64| if rate >= goal { "met" } else { "MISSED" };
    println!(
        "\ngoals (issue 21): append ≥ 500,000 records/s, new {} (ids in no order {}) and updates {}, as text new {} and updates {}; read ≥ 1,000,000/s {}",
        verdict(append_new, 500_000.0),
        verdict(append_scattered, 500_000.0),
        verdict(append_update, 500_000.0),
        verdict(text_new, 500_000.0),
        verdict(text_update, 500_000.0),
        verdict(read_rate.max(read_text_rate), 1_000_000.0)
    );
}

/// Plain multi-row inserts of `records` into a table with no key and no index, in
/// transactions of `batch`; each payload written out as JSON inside the timing, or taken from
/// `texts` when given. Returns the rate and the file's bytes after a checkpoint.
fn plain_inserts(records: &[Record], batch: usize, texts: Option<&[String]>) -> (f64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = rusqlite::Connection::open(dir.path().join("baseline.sqlite3")).unwrap();
    conn.execute_batch(
        "pragma page_size = 16384; pragma journal_mode = wal; pragma synchronous = full; \
         create table plain (seq integer, provider text, sync_id blob, collection_id text, upstream_id text, \
         major integer, minor integer, updated integer, deleted integer, payload text, appended integer)",
    )
    .unwrap();
    let started = Instant::now();
    let mut seq = 0i64;
    for chunk in records.chunks(batch) {
        let tx = conn.transaction().unwrap();
        for rows in chunk.chunks(500) {
            let mut sql = String::from("insert into plain values ");
            for i in 0..rows.len() {
                sql.push_str(if i == 0 {
                    "(?,?,?,?,?,?,?,?,?,?,?)"
                } else {
                    ",(?,?,?,?,?,?,?,?,?,?,?)"
                });
            }
            let mut statement = tx.prepare_cached(&sql).unwrap();
            let mut at = 1;
            for r in rows {
                seq += 1;
                // Seqs count the rows from 1: row `seq`'s text is `texts[seq - 1]`.
                let payload = match texts {
                    Some(texts) => std::borrow::Cow::Borrowed(texts[seq as usize - 1].as_str()),
                    None => serde_json::to_string(r.change.payload().unwrap())
                        .unwrap()
                        .into(),
                };
                statement.raw_bind_parameter(at, seq).unwrap();
                statement
                    .raw_bind_parameter(at + 1, r.provider.as_str())
                    .unwrap();
                statement
                    .raw_bind_parameter(at + 2, r.key.sync_id.0.as_bytes().as_slice())
                    .unwrap();
                statement
                    .raw_bind_parameter(at + 3, r.key.collection_id.0.as_str())
                    .unwrap();
                statement
                    .raw_bind_parameter(at + 4, r.key.upstream_id.0.as_str())
                    .unwrap();
                statement
                    .raw_bind_parameter(at + 5, r.version.major as i64)
                    .unwrap();
                statement
                    .raw_bind_parameter(at + 6, r.version.minor as i64)
                    .unwrap();
                statement
                    .raw_bind_parameter(at + 7, r.upstream_updated_at.unix_timestamp())
                    .unwrap();
                statement.raw_bind_parameter(at + 8, false).unwrap();
                statement
                    .raw_bind_parameter(at + 9, payload.as_ref())
                    .unwrap();
                statement.raw_bind_parameter(at + 10, 0i64).unwrap();
                at += 11;
            }
            statement.raw_execute().unwrap();
        }
        tx.commit().unwrap();
    }
    let rate = records.len() as f64 / started.elapsed().as_secs_f64();
    conn.execute_batch("pragma wal_checkpoint(truncate)")
        .unwrap();
    (rate, bytes_under(dir.path()))
}

fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

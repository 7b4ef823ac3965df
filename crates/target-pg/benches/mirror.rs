//! `cargo xtask bench mirror`: the schema-mirror layout's apply rate beside raw `COPY` of the
//! same rows into the same typed table, measured in the same run on the same server.
//!
//! 200,000 records with ~1 KB payloads typed by a JSON Schema (text, bigint, jsonb columns and
//! the `payload` rest), in batches of 5,000, one transaction per batch on both sides: (a) all
//! new rows, (b) every row updated. The COPY baseline encodes its rows inside the timing, as
//! sluice does. `SLUICE_BENCH_RECORDS` / `SLUICE_BENCH_BATCH` change the size.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use sluice_core::{Batch, ConsumerId, StreamEntry, Target};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{JsonCollection, SchemaMirrorTarget};
use sqlx::{Connection, PgConnection};
use support::{Bench, env_usize, record, report, report_server, server_header};

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

fn json_schema() -> Value {
    json!({"type": "object", "properties": {
        "object": {"type": "string"}, "email": {"type": "string"}, "name": {"type": "string"},
        "balance": {"type": "string"}, "created": {"type": "integer"}, "round": {"type": "integer"},
        "metadata": {"type": "object"}, "tags": {"type": "array"}, "address": {"type": "object"},
        "description": {"type": "string"}
    }})
}

const COLUMNS: [&str; 11] = [
    "object",
    "email",
    "name",
    "balance",
    "created",
    "round",
    "metadata",
    "tags",
    "address",
    "description",
    "payload",
];

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// Raw COPY of the same rows into a fresh table of the same shape.
async fn raw_copy(bench: &Bench, entries: &[StreamEntry], table: &str) -> f64 {
    let mut conn = PgConnection::connect_with(&bench.settings().options())
        .await
        .unwrap();
    let columns = COLUMNS.join(", ");
    let copy_sql = format!("copy {table} (id, {columns}) from stdin");
    let started = Instant::now();
    for chunk in entries.chunks(bench.batch) {
        let mut buf = Vec::with_capacity(chunk.len() * 1300);
        for e in chunk {
            let payload = e.record.change.payload().unwrap();
            let mut line = escape(&e.record.key.upstream_id.0);
            for c in COLUMNS {
                line.push('\t');
                match payload.get(c) {
                    None if c == "payload" => line.push_str("{}"),
                    None | Some(Value::Null) => line.push_str("\\N"),
                    Some(Value::String(s)) => line.push_str(&escape(s)),
                    Some(v) => line.push_str(&escape(&v.to_string())),
                }
            }
            line.push('\n');
            buf.extend_from_slice(line.as_bytes());
        }
        let mut tx = conn.begin().await.unwrap();
        let mut copy = tx.copy_in_raw(&copy_sql).await.unwrap();
        copy.send(buf).await.unwrap();
        copy.finish().await.unwrap();
        tx.commit().await.unwrap();
    }
    entries.len() as f64 / started.elapsed().as_secs_f64()
}

async fn mirror(
    bench: &Bench,
    stream: &Arc<EmbeddedStream>,
    schema: &str,
    rounds: &[&[StreamEntry]],
) -> Vec<(f64, f64)> {
    let target = SchemaMirrorTarget::new(
        "bench",
        bench.settings(),
        schema,
        "postgres",
        stream.clone(),
        BTreeMap::from([(
            "stripe:customer".to_owned(),
            JsonCollection {
                table: None,
                schema: json_schema(),
            },
        )]),
    );
    let consumer = ConsumerId::from("bench");
    target.checkpoint(&consumer).await.unwrap();
    let mut rates = Vec::new();
    let mut through = 0;
    for entries in rounds {
        let batches: Vec<Batch> = entries
            .chunks(bench.batch)
            .map(|c| {
                through += c.len() as u64;
                Batch {
                    entries: c.to_vec(),
                    through: sluice_core::Seq(through),
                }
            })
            .collect();
        let started = Instant::now();
        let ((), cpu) = bench
            .with_server_cpu(async {
                for batch in &batches {
                    target.apply(&consumer, batch).await.unwrap();
                }
            })
            .await;
        rates.push((entries.len() as f64 / started.elapsed().as_secs_f64(), cpu));
    }
    rates
}

async fn run() {
    let n = env_usize("SLUICE_BENCH_RECORDS", 200_000);
    let batch = env_usize("SLUICE_BENCH_BATCH", 5_000);
    let bench = Bench::start(batch).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let new: Vec<StreamEntry> = (0..n).map(|i| record(i as u64 + 1, i, 0, false)).collect();
    let updated: Vec<StreamEntry> = (0..n)
        .map(|i| record((n + i) as u64 + 1, i, 1, false))
        .collect();
    println!(
        "schema mirror benchmark: {n} records (~1 KB, typed by a JSON Schema: 12 columns), batches of {batch}, PostgreSQL {}",
        bench.pg.binaries().version()
    );
    println!(
        "baseline, same run and server: raw COPY of the same rows into the same typed table (best of two)\n"
    );
    let create = |schema: &str| {
        format!(
            "drop schema if exists {schema} cascade; create schema {schema};
             create table {schema}.customer (id text primary key, object text, email text, name text,
               balance text, created bigint, round bigint, metadata jsonb, tags jsonb, address jsonb,
               description text, payload jsonb); checkpoint;"
        )
    };
    // Each side's faster run; sluice's with the server's CPU in that run.
    let mut copy: f64 = 0.0;
    let (mut a, mut b) = ((0.0, 0.0), (0.0, 0.0));
    let faster = |best: &mut (f64, f64), run: (f64, f64)| {
        if run.0 > best.0 {
            *best = run;
        }
    };
    for round in 0..2 {
        bench
            .pg
            .execute(&bench.db, &create("copy_base"))
            .await
            .unwrap();
        copy = copy.max(raw_copy(&bench, &new, "copy_base.customer").await);
        let schema = format!("mirror_{round}");
        bench
            .pg
            .execute(
                &bench.db,
                &format!("drop schema if exists {schema} cascade"),
            )
            .await
            .unwrap();
        let rates = mirror(&bench, &stream, &schema, &[&new, &updated]).await;
        faster(&mut a, rates[0]);
        faster(&mut b, rates[1]);
    }
    println!(
        "{:<44} {:>12} {:>12} {:>7} {:>7}",
        "case", "rows/s", "COPY rows/s", "ratio", "goal"
    );
    report("(a) all new", a.0, copy, Some(0.85));
    report("(b) every row updated", b.0, copy, None);
    server_header();
    report_server("(a) all new", n, a.1, copy);
    report_server("(b) every row updated", n, b.1, copy);
}

//! `cargo xtask bench target`: consumer-table apply rate beside raw `COPY` of the same rows
//! into the same table shape, measured in the same run on the same server.
//!
//! 200,000 records with ~1 KB JSON payloads, in batches, one transaction per batch for both
//! sides: (a) all new, (b) half new and half updates, (c) 20% deletes and 80% updates, and
//! (a) again with two connections. Set `SLUICE_BENCH_RECORDS` / `SLUICE_BENCH_BATCH` to change
//! the size.

use std::time::Instant;

use secrecy::SecretString;
use serde_json::json;
use sluice_core::sql::quote_ident;
use sluice_core::{
    Batch, Change, ConsumerId, Provider, Record, RecordKey, Seq, StreamEntry, SyncId, Target,
    Version,
};
use sluice_localpg::{Auth, Cluster};
use sluice_target_pg::{ConnectionSettings, ConsumerTable, ConsumerTableTarget};
use sqlx::{Connection, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn payload(i: usize, round: usize) -> serde_json::Value {
    // ~1 KB once serialised: a plausible API object.
    json!({
        "id": i,
        "object": "customer",
        "email": format!("customer{i}@example.com"),
        "name": format!("Customer number {i}"),
        "balance": format!("{}.{:02}", i * 7 % 100000, i % 100),
        "created": 1_700_000_000 + i,
        "round": round,
        "metadata": {"user_id": format!("u_{i}"), "plan": if i.is_multiple_of(3) { "pro" } else { "free" }, "region": "eu-west-1"},
        "tags": ["alpha", "beta", "gamma", format!("t{}", i % 17)],
        "address": {"line1": format!("{} Long Street", i % 999), "city": "Springfield", "postal_code": format!("{:05}", i % 99999), "country": "NL"},
        "description": format!("{:0>640}", i),
    })
}

fn record(seq: u64, i: usize, round: usize, delete: bool) -> StreamEntry {
    StreamEntry {
        seq: Seq(seq),
        record: Record {
            key: RecordKey::new(
                SyncId(Uuid::from_u128(42)),
                "stripe:customer",
                format!("cus_{i:08}"),
            ),
            provider: Provider::Http,
            version: Version::new(seq, 0),
            upstream_updated_at: OffsetDateTime::from_unix_timestamp(1_700_000_000 + seq as i64)
                .unwrap(),
            change: if delete {
                Change::Delete
            } else {
                Change::upsert(payload(i, round)).unwrap()
            },
        },
    }
}

struct Bench {
    pg: Cluster,
    db: String,
    batch: usize,
}

impl Bench {
    async fn fresh_table(&self, name: &str) -> ConsumerTable {
        let table = ConsumerTable::new("bench", name);
        self.pg
            .execute(
                &self.db,
                &format!(
                    "drop table if exists {t}; {ddl} checkpoint;",
                    t = table.qualified(),
                    ddl = table.ddl()
                ),
            )
            .await
            .unwrap();
        self.pg
            .execute(&self.db, "delete from bench._sluice_checkpoint")
            .await
            .ok();
        table
    }

    fn settings(&self) -> ConnectionSettings {
        let mut s = ConnectionSettings::new("127.0.0.1", self.pg.port(), &self.db, "postgres");
        s.password = Some(SecretString::from(self.pg.superuser_password().to_owned()));
        s.ssl_mode = sluice_core::SslMode::Disable;
        s
    }

    /// Applies `entries` through sluice in batches; returns rows per second.
    async fn sluice(
        &self,
        table: &ConsumerTable,
        entries: &[StreamEntry],
        connections: usize,
    ) -> f64 {
        let target = ConsumerTableTarget::new("bench", self.settings(), table.clone(), connections);
        let consumer = ConsumerId::from("bench");
        target.checkpoint(&consumer).await.unwrap();
        let batches: Vec<Batch> = entries
            .chunks(self.batch)
            .map(|c| Batch {
                entries: c.to_vec(),
                through: c.last().unwrap().seq,
            })
            .collect();
        let started = Instant::now();
        for batch in &batches {
            target.apply(&consumer, batch).await.unwrap();
        }
        entries.len() as f64 / started.elapsed().as_secs_f64()
    }

    /// Raw COPY of the same rows (all eight columns) into a fresh table of the same shape,
    /// same batch size, one transaction per batch; the rows are encoded inside the timing, as
    /// sluice's are.
    async fn raw_copy(&self, entries: &[StreamEntry]) -> f64 {
        let table = self.fresh_table("raw_copy").await;
        let mut conn = PgConnection::connect_with(&self.settings().options())
            .await
            .unwrap();
        let copy_sql = format!("copy {} from stdin", table.qualified());
        let started = Instant::now();
        for chunk in entries.chunks(self.batch) {
            let mut buf = Vec::with_capacity(chunk.len() * 1300);
            let now = OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            for e in chunk {
                let Change::Upsert { payload } = &e.record.change else {
                    continue;
                };
                let json = serde_json::to_string(payload)
                    .unwrap()
                    .replace('\\', "\\\\");
                let ts = e
                    .record
                    .upstream_updated_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap();
                let k = &e.record.key;
                buf.extend_from_slice(
                    format!(
                        "{}\t{}\t{}\t{}\t{json}\t{ts}\t{now}\t{now}\n",
                        k.row_id(),
                        k.sync_id,
                        k.collection_id,
                        k.upstream_id
                    )
                    .as_bytes(),
                );
            }
            let mut tx = conn.begin().await.unwrap();
            let mut copy = tx.copy_in_raw(&copy_sql).await.unwrap();
            copy.send(buf).await.unwrap();
            copy.finish().await.unwrap();
            tx.commit().await.unwrap();
        }
        entries.len() as f64 / started.elapsed().as_secs_f64()
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
    let n = env_usize("SLUICE_BENCH_RECORDS", 200_000);
    let batch = env_usize("SLUICE_BENCH_BATCH", 5_000);
    let pg = Cluster::options()
        .auth(Auth::ScramSha256)
        .setting("shared_buffers", "'512MB'")
        .setting("max_wal_size", "'4GB'")
        .start()
        .expect("start PostgreSQL");
    let db = pg.fresh_database("bench").await.unwrap();
    pg.execute(
        &db,
        &format!(
            "create schema bench; alter database {} set synchronous_commit = on",
            quote_ident(&db)
        ),
    )
    .await
    .unwrap();
    let bench = Bench { pg, db, batch };

    let all_new: Vec<StreamEntry> = (0..n).map(|i| record(i as u64 + 1, i, 0, false)).collect();
    let avg = all_new
        .iter()
        .map(|e| {
            serde_json::to_string(e.record.change.payload().unwrap())
                .unwrap()
                .len()
        })
        .sum::<usize>()
        / n;
    println!(
        "consumer-table apply benchmark: {n} records, ~{avg} B JSON payloads, batches of {batch}, PostgreSQL {}",
        bench.pg.binaries().version()
    );
    println!(
        "baseline: raw COPY of the same rows into a table of the same shape, same batches, same server, same run"
    );
    println!(
        "(after an untimed warm-up of both; case (a) is the best of two alternating runs per side)\n"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>7} {:>7}",
        "case", "sluice rows/s", "COPY rows/s", "ratio", "goal"
    );

    // Warm-up (untimed): the server's first bulk load pays for WAL segment creation and cold
    // caches, which would flatter whichever side runs second.
    bench.raw_copy(&all_new).await;
    let table = bench.fresh_table("warmup").await;
    bench.sluice(&table, &all_new, 1).await;

    // (a) all new: best of two alternating runs per side.
    let mut copy_a: f64 = 0.0;
    let mut sluice_a: f64 = 0.0;
    for _ in 0..2 {
        copy_a = copy_a.max(bench.raw_copy(&all_new).await);
        let table = bench.fresh_table("a").await;
        sluice_a = sluice_a.max(bench.sluice(&table, &all_new, 1).await);
    }
    report("(a) all new, 1 connection", sluice_a, copy_a, Some(0.85));

    // (b) half updates of existing rows, half new
    let table = bench.fresh_table("b").await;
    let preload: Vec<StreamEntry> = (0..n / 2)
        .map(|i| record(i as u64 + 1, i, 0, false))
        .collect();
    bench.sluice(&table, &preload, 1).await;
    let base = n as u64;
    let mixed: Vec<StreamEntry> = (0..n)
        .map(|j| {
            // Alternate: an update of an existing record, then a new record.
            let i = if j.is_multiple_of(2) {
                j / 2
            } else {
                n / 2 + j / 2
            };
            record(base + j as u64 + 1, i, 1, false)
        })
        .collect();
    let copy_b = bench.raw_copy(&mixed).await;
    let sluice_b = bench.sluice(&table, &mixed, 1).await;
    report(
        "(b) 50% new, 50% updates, 1 connection",
        sluice_b,
        copy_b,
        None,
    );

    // (c) 20% deletes, 80% updates
    let table = bench.fresh_table("c").await;
    bench.sluice(&table, &all_new, 1).await;
    let churn: Vec<StreamEntry> = (0..n)
        .map(|i| record(base * 3 + i as u64 + 1, i, 2, i.is_multiple_of(5)))
        .collect();
    let copy_c_rows: Vec<StreamEntry> = (0..n)
        .map(|i| record(base * 3 + i as u64 + 1, i, 2, false))
        .collect();
    let copy_c = bench.raw_copy(&copy_c_rows).await;
    let sluice_c = bench.sluice(&table, &churn, 1).await;
    report(
        "(c) 20% deletes, 80% updates, 1 connection",
        sluice_c,
        copy_c,
        None,
    );

    // (a) with two connections, against single-connection COPY
    let mut sluice_a2: f64 = 0.0;
    for _ in 0..2 {
        let table = bench.fresh_table("a2").await;
        sluice_a2 = sluice_a2.max(bench.sluice(&table, &all_new, 2).await);
    }
    report("(a) all new, 2 connections", sluice_a2, copy_a, Some(1.3));
}

fn report(case: &str, sluice: f64, copy: f64, goal: Option<f64>) {
    let ratio = sluice / copy;
    let goal_text = goal
        .map(|g| format!("≥{g:.2}"))
        .unwrap_or_else(|| "-".into());
    let verdict = match goal {
        Some(g) if ratio >= g => " met",
        Some(_) => " MISSED",
        None => "",
    };
    println!("{case:<44} {sluice:>12.0} {copy:>12.0} {ratio:>6.2}x {goal_text:>7}{verdict}");
}

//! Shared by the target and consumer benchmarks (included with `#[path]`): ~1 KB records,
//! a throwaway cluster, sluice's apply through the `Target` trait, and the raw `COPY` baseline.
#![allow(dead_code)]

use std::time::Instant;

use secrecy::SecretString;
use serde_json::json;
use sluice_core::{
    Batch, Change, ConsumerId, Provider, Record, RecordKey, Seq, StreamEntry, SyncId, Target,
    Version,
};
use sluice_localpg::Cluster;
use sluice_target_pg::{ConnectionSettings, ConsumerTable, ConsumerTableTarget};
use sqlx::{Connection, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn payload(i: usize, round: usize) -> serde_json::Value {
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

pub fn record(seq: u64, i: usize, round: usize, delete: bool) -> StreamEntry {
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
        payload_text: None,
    }
}

pub struct Bench {
    pub pg: Cluster,
    pub db: String,
    pub batch: usize,
}

impl Bench {
    /// A throwaway cluster tuned for bulk loads, with a `bench` schema in a fresh database.
    pub async fn start(batch: usize) -> Self {
        let pg = Cluster::options()
            .setting("shared_buffers", "'512MB'")
            .setting("max_wal_size", "'4GB'")
            .start()
            .expect("start PostgreSQL");
        let db = pg.fresh_database("bench").await.unwrap();
        pg.execute(&db, "create schema bench").await.unwrap();
        Self { pg, db, batch }
    }

    pub async fn fresh_table(&self, name: &str) -> ConsumerTable {
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

    pub fn settings(&self) -> ConnectionSettings {
        let mut s = ConnectionSettings::new("127.0.0.1", self.pg.port(), &self.db, "postgres");
        s.password = Some(SecretString::from(self.pg.superuser_password().to_owned()));
        s.ssl_mode = sluice_core::SslMode::Disable;
        s
    }

    /// Applies `entries` through sluice in batches; returns rows per second.
    pub async fn sluice(
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
    /// same batch size, one transaction per batch, in `COPY`'s binary format (the fastest for
    /// the server, and the one sluice writes); the rows are encoded inside the timing, as
    /// sluice's are.
    pub async fn raw_copy(&self, entries: &[StreamEntry]) -> f64 {
        use sluice_target_pg::binary;
        let table = self.fresh_table("raw_copy").await;
        let mut conn = PgConnection::connect_with(&self.settings().options())
            .await
            .unwrap();
        let copy_sql = format!("copy {} from stdin with (format binary)", table.qualified());
        let started = Instant::now();
        for chunk in entries.chunks(self.batch) {
            let mut buf = Vec::with_capacity(chunk.len() * 1300);
            buf.extend_from_slice(binary::HEADER);
            let now = sluice_target_pg::pg_micros(OffsetDateTime::now_utc()).to_be_bytes();
            for e in chunk {
                let Change::Upsert { payload } = &e.record.change else {
                    continue;
                };
                let json = serde_json::to_string(payload).unwrap();
                let k = &e.record.key;
                binary::tuple(&mut buf, 8);
                binary::field(&mut buf, k.row_id().as_bytes());
                binary::field(&mut buf, k.sync_id.0.as_bytes());
                binary::field(&mut buf, k.collection_id.0.as_bytes());
                binary::field(&mut buf, k.upstream_id.0.as_bytes());
                binary::jsonb(&mut buf, &json);
                let updated = sluice_target_pg::pg_micros(e.record.upstream_updated_at);
                binary::field(&mut buf, &updated.to_be_bytes());
                binary::field(&mut buf, &now);
                binary::field(&mut buf, &now);
            }
            buf.extend_from_slice(binary::TRAILER);
            let mut tx = conn.begin().await.unwrap();
            let mut copy = tx.copy_in_raw(&copy_sql).await.unwrap();
            copy.send(buf).await.unwrap();
            copy.finish().await.unwrap();
            tx.commit().await.unwrap();
        }
        entries.len() as f64 / started.elapsed().as_secs_f64()
    }
}

impl Bench {
    /// `work`'s result, and the CPU seconds the server spent while it ran (its backends and
    /// its background processes, the checkpointer's writes included).
    pub async fn with_server_cpu<T>(&self, work: impl Future<Output = T>) -> (T, f64) {
        let before = self.pg.cpu_seconds();
        let out = work.await;
        (out, self.pg.cpu_seconds() - before)
    }
}

/// The heading of the table [`report_server`] prints lines of.
pub fn server_header() {
    println!(
        "\nthe same runs, µs per row: the server's CPU for sluice's statements, beside COPY's whole time;\ntheir ratio is what sluice would reach if its server work were all the time it took\n"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>7}",
        "case", "sluice's SQL", "COPY", "ceiling"
    );
}

/// One case's ceiling on the server's side: the CPU seconds the server spent on sluice's
/// statements (`sluice_cpu_s`, for `rows` rows), beside COPY's wall time (at `copy_rate` rows
/// per second). With one connection the server runs one statement at a time, so no client,
/// however fast, beats COPY by more than their ratio.
pub fn report_server(case: &str, rows: usize, sluice_cpu_s: f64, copy_rate: f64) {
    let sluice = sluice_cpu_s * 1e6 / rows as f64;
    let copy = 1e6 / copy_rate;
    println!(
        "{case:<44} {sluice:>12.1} {copy:>12.1} {:>6.2}x",
        copy / sluice
    );
}

pub fn report(case: &str, sluice: f64, copy: f64, goal: Option<f64>) {
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

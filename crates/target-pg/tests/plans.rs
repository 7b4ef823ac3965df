//! The plans the server chooses for a batch of updates and deletes, read from its log through
//! `auto_explain`: in both layouts, staged rows find theirs through the key's index, and no
//! statement scans the whole table (which a batch would otherwise do once per batch, on a
//! table of any size).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{batch_to, delete, provision, upsert};
use serde_json::json;
use sluice_core::{ConsumerId, Seq, Target};
use sluice_localpg::Cluster;
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{ConsumerTableTarget, JsonCollection, SchemaMirrorTarget};

/// Rows in the table before the batch that is looked at.
const ROWS: u64 = 20_000;

/// A server that logs the plan of every statement it runs.
fn explaining_server() -> Cluster {
    Cluster::options()
        .setting("session_preload_libraries", "'auto_explain'")
        .setting("auto_explain.log_min_duration", "0")
        .start()
        .expect("start PostgreSQL")
}

/// `ROWS` new rows (seqs 1..=ROWS), then one batch that updates 1,000 of them and deletes 200
/// (through `ROWS + 1_200`), each key's newest version last.
fn batches() -> (sluice_core::Batch, sluice_core::Batch) {
    let pad = "x".repeat(300);
    let load = (1..=ROWS)
        .map(|i| upsert(i, &format!("r{i}"), 1, json!({"n": i, "pad": pad})))
        .collect();
    let mut churn: Vec<_> = (1..=1_000)
        .map(|i| {
            upsert(
                ROWS + i,
                &format!("r{}", i * 7),
                2,
                json!({"n": -1, "pad": pad}),
            )
        })
        .collect();
    churn.extend((1..=200).map(|i| delete(ROWS + 1_000 + i, &format!("r{}", i * 11), 3)));
    (batch_to(ROWS, load), batch_to(ROWS + 1_200, churn))
}

/// Applies [`batches`] through `target`, and checks the plans the server logged while the
/// second batch was written: the staging table `stage` was read (so the batch's plans are in
/// the log), `table` never scanned whole. Returns that part of the log, and its plans that
/// read `table` (for failure messages).
async fn churn_plans(
    pg: &Cluster,
    target: &dyn Target,
    stage: &str,
    table: &str,
) -> (String, String) {
    let consumer = ConsumerId::from("orders");
    assert_eq!(target.checkpoint(&consumer).await.unwrap(), Seq::START);
    let (load, churn) = batches();
    target.apply(&consumer, &load).await.unwrap();
    let before = pg.log_tail(usize::MAX).len();
    target.apply(&consumer, &churn).await.unwrap();
    let log = pg.log_tail(usize::MAX)[before..].to_owned();
    assert_eq!(
        target.checkpoint(&consumer).await.unwrap(),
        Seq(ROWS + 1_200)
    );
    let plans = log
        .split("LOG:")
        .filter(|plan| plan.contains(table))
        .collect::<Vec<_>>()
        .join("\n---");
    assert!(
        log.contains(&format!("Seq Scan on {stage}")),
        "the batch's plans were logged: {log}"
    );
    assert!(
        !log.contains(&format!("Seq Scan on {table}")),
        "a statement scanned the whole table: {plans}"
    );
    (log, plans)
}

#[tokio::test]
async fn a_consumer_tables_updates_and_deletes_probe_its_key_and_never_scan_it() {
    let pg = explaining_server();
    let p = provision(&pg, "plans", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let (log, plans) = churn_plans(&pg, &target, "_sluice_stage", "records").await;
    if log.contains("Merge on records") {
        // PostgreSQL 15+: the staged rows meet the table through a nested loop on its key.
        assert!(
            log.contains("Nested Loop") && log.contains("Index Scan using records_pkey on records"),
            "{plans}"
        );
    }
    let mut conn = pg.admin(&p.db).await.unwrap();
    let (rows, updated): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where (payload->>'n')::int = -1) from sluice.records",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    // r7·k for k in 1..=1000 updated; r11·k for k in 1..=200 deleted, 28 of which (r77·j)
    // were among the updated.
    assert_eq!((rows, updated), (ROWS as i64 - 200, 1_000 - 28));
}

/// A schema mirror into schema `mirror` as the role `sluice` (created here), collection
/// `public.orders` typed `{n: integer, pad: string}`, its stream in `dir`.
async fn mirror_on(pg: &Cluster, dir: &std::path::Path) -> SchemaMirrorTarget {
    pg.execute(
        "postgres",
        "create role sluice login password 'pw'; grant connect, create on database postgres to sluice;",
    )
    .await
    .unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir).await.unwrap());
    let mut settings =
        sluice_target_pg::ConnectionSettings::new("127.0.0.1", pg.port(), "postgres", "sluice");
    settings.password = Some(secrecy::SecretString::from("pw".to_owned()));
    settings.ssl_mode = sluice_core::SslMode::Disable;
    SchemaMirrorTarget::new(
        "warehouse",
        settings,
        "mirror",
        "sluice",
        stream,
        BTreeMap::from([(
            "public.orders".to_owned(),
            JsonCollection {
                table: None,
                schema: json!({"type": "object", "properties": {
                    "n": {"type": "integer"}, "pad": {"type": "string"}}}),
            },
        )]),
    )
}

#[tokio::test]
async fn a_mirrors_updates_and_deletes_probe_its_key_and_never_scan_it() {
    let pg = explaining_server();
    let dir = tempfile::tempdir().unwrap();
    let mirror = mirror_on(&pg, dir.path()).await;
    let (log, plans) = churn_plans(&pg, &mirror, "_sluice_mirror_stage", "orders").await;
    assert!(
        log.contains("Index Scan using orders_pkey on orders"),
        "the deletes (and the merge, on 15+) probe the key: {plans}"
    );
    let mut conn = pg.admin("postgres").await.unwrap();
    let (rows, updated): (i64, i64) =
        sqlx::query_as("select count(*), count(*) filter (where n = -1) from mirror.orders")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!((rows, updated), (ROWS as i64 - 200, 1_000 - 28));
}

/// A mirror table the sync user made itself, with no index on the key: the planner keeps its
/// own join for the staged deletes (a forced nested loop would scan the table once per
/// deleted row), and they are applied.
#[tokio::test]
async fn a_mirror_table_without_a_key_index_keeps_the_planners_join() {
    let pg = explaining_server();
    let dir = tempfile::tempdir().unwrap();
    let mirror = mirror_on(&pg, dir.path()).await;
    pg.execute(
        "postgres",
        "set role sluice; create schema mirror; create table mirror.orders (id text);",
    )
    .await
    .unwrap();
    let consumer = ConsumerId::from("orders");
    mirror.checkpoint(&consumer).await.unwrap();
    let (load, _) = batches();
    mirror.apply(&consumer, &load).await.unwrap();
    let deletes = (1..=200)
        .map(|i| delete(ROWS + i, &format!("r{}", i * 11), 3))
        .collect();
    let before = pg.log_tail(usize::MAX).len();
    mirror
        .apply(&consumer, &batch_to(ROWS + 200, deletes))
        .await
        .unwrap();
    let log = pg.log_tail(usize::MAX)[before..].to_owned();
    assert!(log.contains("Delete on orders"), "{log}");
    assert!(!log.contains("Nested Loop"), "{log}");
    let mut conn = pg.admin("postgres").await.unwrap();
    let rows: i64 = sqlx::query_scalar("select count(*) from mirror.orders")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, ROWS as i64 - 200);
}

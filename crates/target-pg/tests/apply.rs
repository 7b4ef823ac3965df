//! Batch writes into the consumer table against a real server: atomic with the checkpoint,
//! idempotent, newest version wins, NUL policy, large payloads, a connection lost mid-batch,
//! parallel apply, and health.

mod common;

use std::sync::LazyLock;

use common::{batch_to, delete, provision, rows, updated_at, upsert};
use serde_json::json;
use sluice_core::{Batch, ConsumerId, ErrorClass, Health, Seq, Status, Target};
use sluice_localpg::Cluster;
use sluice_target_pg::ConsumerTableTarget;

static PG: LazyLock<Cluster> =
    LazyLock::new(|| Cluster::start_default().expect("start PostgreSQL"));

fn consumer() -> ConsumerId {
    ConsumerId::from("orders")
}

#[tokio::test]
async fn a_batch_writes_upserts_deletes_and_the_checkpoint_together() {
    let p = provision(&PG, "basic", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq::START);

    let first = batch_to(
        3,
        vec![
            upsert(1, "a", 1, json!({"n": 1})),
            upsert(2, "b", 1, json!({"n": 2})),
            upsert(3, "c", 1, json!({"n": 3})),
        ],
    );
    target.apply(&consumer(), &first).await.unwrap();
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(3));
    let second = batch_to(
        7,
        vec![delete(4, "b", 2), upsert(5, "c", 2, json!({"n": 33}))],
    );
    // The first batch found no existing key, so this one is first copied straight in: "c"
    // exists, so that transaction fails, and the batch is applied again with the key lookup.
    target.apply(&consumer(), &second).await.unwrap();
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(7));
    assert_eq!(
        rows(&PG, &p).await,
        vec![
            ("a".into(), json!({"n": 1})),
            ("c".into(), json!({"n": 33}))
        ]
    );
    // After a batch that met existing keys: looked up first, then copied.
    let third = batch_to(
        9,
        vec![
            upsert(8, "d", 1, json!({"n": 4})),
            upsert(9, "a", 2, json!({"n": 11})),
        ],
    );
    target.apply(&consumer(), &third).await.unwrap();
    assert_eq!(
        rows(&PG, &p).await,
        vec![
            ("a".into(), json!({"n": 11})),
            ("c".into(), json!({"n": 33})),
            ("d".into(), json!({"n": 4}))
        ]
    );
}

/// Rows go in `COPY`'s binary format: a record's time lands exactly as PostgreSQL reads its
/// RFC 3339 text (fractions of a microsecond rounded as the server rounds them, times before
/// 1970, offsets), and the written time is sluice's clock at the batch.
#[tokio::test]
async fn times_land_as_the_server_reads_their_text() {
    use time::macros::datetime;
    let p = provision(&PG, "times", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let times = [
        datetime!(2026-12-05 10:00:00 UTC),
        datetime!(2026-12-05 10:00:00.123456 UTC),
        datetime!(2026-12-05 10:00:00.123456789 UTC),
        datetime!(2026-12-05 10:00:00.0000005 UTC),
        datetime!(2026-12-05 10:00:00.0000015 UTC),
        datetime!(2026-12-05 10:00:00.0000025 UTC),
        datetime!(2026-12-05 10:00:00.9999995 UTC),
        datetime!(2026-12-05 10:00:00.4999994999 +05:30),
        datetime!(1969-12-31 23:59:59.999999501 UTC),
        datetime!(1900-02-28 12:34:56.000000499 -08:00),
        datetime!(0001-01-01 00:00:00.0000005 UTC),
        datetime!(9999-12-31 23:59:59.9999995 UTC),
    ];
    let before = time::OffsetDateTime::now_utc();
    let entries = times
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut e = upsert(i as u64 + 1, &i.to_string(), 1, json!({"i": i}));
            e.record.upstream_updated_at = *t;
            e
        })
        .collect();
    target
        .apply(&consumer(), &batch_to(times.len() as u64, entries))
        .await
        .unwrap();
    let after = time::OffsetDateTime::now_utc();
    let mut conn = common::connect_admin(&PG, &p.db).await;
    for (i, t) in times.iter().enumerate() {
        let text = t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let sql = format!(
            "select upstream_updated_at = $1::timestamptz, upstream_updated_at::text, $1::timestamptz::text \
             from {} where upstream_id = $2",
            p.table.qualified()
        );
        let (same, stored, parsed): (bool, String, String) =
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&text)
                .bind(i.to_string())
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert!(same, "{text}: stored {stored}, the server reads {parsed}");
    }
    let written = updated_at(&PG, &p, "0").await;
    let micro = time::Duration::microseconds(1);
    assert!(
        before - micro <= written && written <= after + micro,
        "{written}"
    );
}

#[tokio::test]
async fn a_repeated_or_older_batch_changes_nothing() {
    let p = provision(&PG, "replay", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let batch = batch_to(10, vec![upsert(10, "a", 5, json!({"v": 5}))]);
    target.apply(&consumer(), &batch).await.unwrap();
    let stamp = updated_at(&PG, &p, "a").await;

    target.apply(&consumer(), &batch).await.unwrap();
    let older = batch_to(
        5,
        vec![
            upsert(4, "a", 2, json!({"v": 2})),
            upsert(5, "z", 1, json!({})),
        ],
    );
    target.apply(&consumer(), &older).await.unwrap();
    assert_eq!(rows(&PG, &p).await, vec![("a".into(), json!({"v": 5}))]);
    assert_eq!(
        updated_at(&PG, &p, "a").await,
        stamp,
        "a replay must not even touch updated_at"
    );
    assert_eq!(
        target.checkpoint(&consumer()).await.unwrap(),
        Seq(10),
        "the checkpoint never regresses"
    );
}

#[tokio::test]
async fn duplicate_keys_in_one_batch_keep_the_newest_version() {
    let p = provision(&PG, "dups", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let batch = batch_to(
        6,
        vec![
            upsert(1, "a", 3, json!({"v": 3})),
            upsert(2, "a", 1, json!({"v": 1})),
            upsert(3, "b", 1, json!({"v": 1})),
            delete(4, "b", 2),
            delete(5, "c", 1),
            upsert(6, "c", 2, json!({"v": 2})),
        ],
    );
    target.apply(&consumer(), &batch).await.unwrap();
    assert_eq!(
        rows(&PG, &p).await,
        vec![("a".into(), json!({"v": 3})), ("c".into(), json!({"v": 2}))]
    );
}

#[tokio::test]
async fn nul_characters_are_replaced_written_and_reported_in_health() {
    let p = provision(&PG, "nul", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let batch = batch_to(
        2,
        vec![
            upsert(
                1,
                "clean",
                1,
                json!({"s": "tab\there, newline\nthere, backslash \\ and quote \""}),
            ),
            upsert(
                2,
                "dirty",
                1,
                json!({"name": "nul\u{0}inside", "k\u{0}": [1, "x\u{0}"]}),
            ),
        ],
    );
    target.apply(&consumer(), &batch).await.unwrap();
    assert_eq!(
        rows(&PG, &p).await,
        vec![
            (
                "clean".into(),
                json!({"s": "tab\there, newline\nthere, backslash \\ and quote \""})
            ),
            (
                "dirty".into(),
                json!({"name": "nul\u{FFFD}inside", "k\u{FFFD}": [1, "x\u{FFFD}"]})
            ),
        ]
    );
    let (count, last) = target.sanitized();
    assert_eq!(count, 1);
    assert_eq!(last.unwrap().upstream_id.0, "dirty");
    let report = target.health().await;
    let payload = report.checks.iter().find(|c| c.name == "payload").unwrap();
    assert_eq!(payload.status, Status::Warning);
    assert!(
        payload.message.contains("U+FFFD") && payload.message.contains("dirty"),
        "{}",
        payload.message
    );
}

/// Rows are encoded and sent a thousand at a time: batches of several pieces land whole,
/// including one copied straight in (the last batch found no existing key) whose existing key
/// is met only in its third piece, after two pieces were sent, and the NUL in its last piece
/// is reported once, from the attempt that committed.
#[tokio::test]
async fn batches_of_several_pieces_land_whole_when_a_late_piece_meets_an_existing_key() {
    let p = provision(&PG, "pieces", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let id = |i: u64| format!("r{i:05}");
    let first: Vec<_> = (1..=2500)
        .map(|i| upsert(i, &id(i), 1, json!({"i": i, "v": 1})))
        .collect();
    target
        .apply(&consumer(), &batch_to(2500, first))
        .await
        .unwrap();
    // New keys 2501..=4700, then (from the 2,201st row, the third piece) updates of 1..=300,
    // and a new key with a NUL last.
    let mut second: Vec<_> = (2501..=4700)
        .map(|i| upsert(i, &id(i), 1, json!({"i": i, "v": 1})))
        .collect();
    second.extend((1..=300).map(|i| upsert(4700 + i, &id(i), 2, json!({"i": i, "v": 2}))));
    second.push(upsert(5001, "literal", 1, json!({"s": "a\\u0000b"})));
    second.push(upsert(5002, "nul", 1, json!({"s": "a\u{0}b"})));
    target
        .apply(&consumer(), &batch_to(5002, second))
        .await
        .unwrap();
    let rows = rows(&PG, &p).await;
    assert_eq!(rows.len(), 4702);
    let by_id: std::collections::HashMap<_, _> = rows.into_iter().collect();
    for i in 1..=4700u64 {
        let v = if i <= 300 { 2 } else { 1 };
        assert_eq!(by_id[&id(i)], json!({"i": i, "v": v}), "row {i}");
    }
    // A backslash-u0000 in the text (an escaped backslash in JSON) is no NUL.
    assert_eq!(by_id["literal"], json!({"s": "a\\u0000b"}));
    assert_eq!(by_id["nul"], json!({"s": "a\u{FFFD}b"}));
    let (count, last) = target.sanitized();
    assert_eq!(count, 1, "counted once, though the batch was encoded twice");
    assert_eq!(last.unwrap().upstream_id.0, "nul");
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(5002));
}

#[tokio::test]
async fn payloads_of_several_megabytes_are_written() {
    let p = provision(&PG, "huge", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let big = "x".repeat(6 * 1024 * 1024);
    let nested: Vec<String> = (0..2000)
        .map(|i| format!("item {i} {}", "y".repeat(500)))
        .collect();
    let batch = batch_to(
        2,
        vec![
            upsert(1, "big", 1, json!({"blob": big})),
            upsert(2, "nested", 1, json!({"items": nested})),
        ],
    );
    target.apply(&consumer(), &batch).await.unwrap();
    let stored = rows(&PG, &p).await;
    assert_eq!(stored[0].1["blob"].as_str().unwrap().len(), 6 * 1024 * 1024);
    assert_eq!(stored[1].1["items"].as_array().unwrap().len(), 2000);
}

#[tokio::test]
async fn a_connection_lost_mid_batch_commits_nothing_and_the_retry_succeeds() {
    let p = provision(&PG, "midbatch", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    target
        .apply(
            &consumer(),
            &batch_to(1, vec![upsert(1, "before", 1, json!({}))]),
        )
        .await
        .unwrap();

    // The server drops the writing connection while the merge is half done.
    common::die_on_poison(&PG, &p.db, "sluice.records", "upstream_id").await;
    let mut entries: Vec<_> = (0..500)
        .map(|i| upsert(10 + i, &format!("r{i:03}"), 2, json!({"i": i})))
        .collect();
    entries.insert(250, upsert(9, "poison", 2, json!({})));
    let batch = Batch {
        entries,
        through: Seq(600),
    };
    let err = target.apply(&consumer(), &batch).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Retry, "{err}");
    assert_eq!(
        rows(&PG, &p).await,
        vec![("before".into(), json!({}))],
        "nothing of the batch is visible"
    );
    assert_eq!(
        target.checkpoint(&consumer()).await.unwrap(),
        Seq(1),
        "the checkpoint did not move"
    );

    common::stop_dying(&PG, &p.db, "sluice.records").await;
    target.apply(&consumer(), &batch).await.unwrap();
    assert_eq!(rows(&PG, &p).await.len(), 502);
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(600));
}

#[tokio::test]
async fn a_constraint_the_user_added_is_a_configuration_error_naming_the_cause() {
    let p = provision(&PG, "constraint", "sluice", "records").await;
    PG.execute(
        &p.db,
        "alter table sluice.records add constraint small check (length(payload::text) < 20)",
    )
    .await
    .unwrap();
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let batch = batch_to(
        1,
        vec![upsert(
            1,
            "a",
            1,
            json!({"long": "xxxxxxxxxxxxxxxxxxxxxxxx"}),
        )],
    );
    let err = target.apply(&consumer(), &batch).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::FixConfiguration, "{err}");
    assert!(
        err.to_string()
            .contains("ordering per record, not across records"),
        "{err}"
    );
}

#[tokio::test]
async fn parallel_apply_matches_serial_apply_and_survives_a_change_of_width() {
    let serial = provision(&PG, "serial", "sluice", "records").await;
    let parallel = provision(&PG, "parallel", "sluice", "records").await;
    let one = ConsumerTableTarget::new("t", serial.settings.clone(), serial.table.clone(), 1);
    let three = ConsumerTableTarget::new("t", parallel.settings.clone(), parallel.table.clone(), 3);
    let mut seq = 0;
    for round in 0..4u64 {
        let mut entries = Vec::new();
        for i in 0..300u64 {
            seq += 1;
            let id = format!("r{:03}", (i * 7 + round * 13) % 400);
            entries.push(if i % 9 == 0 {
                delete(seq, &id, seq)
            } else {
                upsert(seq, &id, seq, json!({"round": round, "i": i}))
            });
        }
        let batch = Batch {
            entries,
            through: Seq(seq),
        };
        one.apply(&consumer(), &batch).await.unwrap();
        three.apply(&consumer(), &batch).await.unwrap();
    }
    assert_eq!(rows(&PG, &serial).await, rows(&PG, &parallel).await);
    assert_eq!(three.checkpoint(&consumer()).await.unwrap(), Seq(seq));

    // Reopened with two connections and applying straight away: the partitions are first
    // aligned to the lowest checkpoint (rows for exactly partitions 0 and 1), so none skips a
    // batch on the strength of a row written under the old width.
    let two = ConsumerTableTarget::new("t", parallel.settings.clone(), parallel.table.clone(), 2);
    let batch = batch_to(seq + 1, vec![upsert(seq + 1, "new", seq + 1, json!({}))]);
    two.apply(&consumer(), &batch).await.unwrap();
    let mut admin = common::connect_admin(&PG, &parallel.db).await;
    let partitions: Vec<(i32, i64)> = sqlx::query_as(
        "select partition, seq from sluice._sluice_checkpoint where consumer = 'orders' order by 1",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert_eq!(partitions, vec![(0, seq as i64 + 1), (1, seq as i64 + 1)]);
    assert_eq!(two.checkpoint(&consumer()).await.unwrap(), Seq(seq + 1));
    assert!(rows(&PG, &parallel).await.iter().any(|(id, _)| id == "new"));
}

#[tokio::test]
async fn odd_names_work_end_to_end() {
    let p = provision(&PG, "oddnames", "my schema", "We're \"odd\" Ünïcode").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 2);
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq::START);
    let batch = batch_to(
        2,
        vec![
            upsert(1, "ü", 1, json!({"ok": true})),
            upsert(2, "x", 1, json!({})),
        ],
    );
    target.apply(&consumer(), &batch).await.unwrap();
    target
        .apply(&consumer(), &batch_to(3, vec![delete(3, "x", 2)]))
        .await
        .unwrap();
    assert_eq!(rows(&PG, &p).await, vec![("ü".into(), json!({"ok": true}))]);
    let report = target.health().await;
    assert_eq!(report.status, Status::Healthy, "{report:#?}");
}

#[tokio::test]
async fn health_names_each_check_and_the_fix() {
    let p = provision(&PG, "health", "sluice", "records").await;
    let target = ConsumerTableTarget::new("warehouse", p.settings.clone(), p.table.clone(), 1);
    let report = target.health().await;
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    for expected in [
        "reachable",
        "authenticated",
        "tls",
        "privileges",
        "table",
        "payload",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    // TLS is off on this cluster and the URL says sslmode=disable: that is as configured.
    assert_eq!(report.status, Status::Healthy, "{report:#?}");

    PG.execute(
        &p.db,
        "alter table sluice.records alter column payload type json",
    )
    .await
    .unwrap();
    let report = target.health().await;
    let table = report.checks.iter().find(|c| c.name == "table").unwrap();
    assert_eq!(table.status, Status::Error);
    assert!(
        table
            .fix
            .as_deref()
            .unwrap()
            .contains("alter column payload type jsonb"),
        "{table:?}"
    );
    assert_eq!(report.status, Status::Error);

    let missing_schema = ConsumerTableTarget::new(
        "w",
        p.settings.clone(),
        sluice_target_pg::ConsumerTable::new("nowhere", "t"),
        1,
    );
    let report = missing_schema.health().await;
    let privileges = report
        .checks
        .iter()
        .find(|c| c.name == "privileges")
        .unwrap();
    assert!(
        privileges
            .fix
            .as_deref()
            .unwrap()
            .starts_with("create schema \"nowhere\""),
        "{privileges:?}"
    );
}

#[tokio::test]
async fn an_unreachable_target_reports_reachable_as_an_error_and_retries() {
    let pg = Cluster::start_default().unwrap();
    let p = provision(&pg, "gone", "sluice", "records").await;
    let target = ConsumerTableTarget::new("warehouse", p.settings.clone(), p.table.clone(), 1);
    target
        .apply(
            &consumer(),
            &batch_to(1, vec![upsert(1, "a", 1, json!({}))]),
        )
        .await
        .unwrap();
    pg.stop().unwrap();
    let err = target
        .apply(
            &consumer(),
            &batch_to(2, vec![upsert(2, "b", 1, json!({}))]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Retry, "{err}");
    let report = target.health().await;
    let reachable = report
        .checks
        .iter()
        .find(|c| c.name == "reachable")
        .unwrap();
    assert_eq!(reachable.status, Status::Error);
    assert!(
        reachable.message.contains("connection refused"),
        "{}",
        reachable.message
    );

    pg.start().unwrap();
    target
        .apply(
            &consumer(),
            &batch_to(2, vec![upsert(2, "b", 1, json!({}))]),
        )
        .await
        .unwrap();
    assert_eq!(rows(&pg, &p).await.len(), 2);
    assert_eq!(target.health().await.status, Status::Healthy);
}

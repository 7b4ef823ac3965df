//! The schema mirror written through several connections against a real server: the same
//! tables as through one, a checkpoint row per partition, a change of width, a partition whose
//! connection is lost while the others commit, and a checkpoint table made before partitions
//! taken over with its position (also in an oddly named schema); a batch sent as several COPY
//! pieces, whole or not at all; a batch copied straight in that meets existing keys, written
//! again whole and once; rows sent in COPY's binary format equal to rows sent as text.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use common::{SYNC, connect_admin};
use secrecy::SecretString;
use serde_json::json;
use sluice_core::sql::quote_ident;
use sluice_core::{
    Batch, Change, ConsumerId, Health, PayloadText, Provider, Record, RecordKey, Seq, StreamEntry,
    Target, Version,
};
use sluice_localpg::Cluster;
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{ConnectionSettings, JsonCollection, SchemaMirrorTarget};

/// A target: the cross-version suite runs these on every target version it is given.
static PG: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .target()
        .start()
        .expect("start PostgreSQL")
});

/// A database whose sync user may connect and create schemas, nothing more.
struct Mirrored {
    db: String,
    settings: ConnectionSettings,
    _dir: tempfile::TempDir,
    stream: Arc<EmbeddedStream>,
}

async fn database(prefix: &str) -> Mirrored {
    let db = PG.fresh_database(prefix).await.unwrap();
    let user = format!("{db}_sync");
    PG.create_role(&user, Some("sync-pw")).await.unwrap();
    PG.create_role(&format!("{db}_read"), None).await.unwrap();
    PG.execute(
        &db,
        &format!(
            "grant connect, create on database {} to {};",
            quote_ident(&db),
            quote_ident(&user)
        ),
    )
    .await
    .unwrap();
    let mut settings =
        ConnectionSettings::from_url(&PG.url_as(&user, Some("sync-pw"), &db, None)).unwrap();
    settings.password = Some(SecretString::from("sync-pw".to_owned()));
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    Mirrored {
        db,
        settings,
        _dir: dir,
        stream,
    }
}

/// A mirror into schema `mirror`, two collections typed from JSON Schemas.
fn mirror(m: &Mirrored, connections: usize) -> SchemaMirrorTarget {
    mirror_into(m, "mirror", connections)
}

fn mirror_into(m: &Mirrored, schema: &str, connections: usize) -> SchemaMirrorTarget {
    let typed = |properties: serde_json::Value| JsonCollection {
        table: None,
        schema: json!({"type": "object", "properties": properties}),
    };
    SchemaMirrorTarget::new(
        "warehouse",
        m.settings.clone(),
        schema,
        format!("{}_read", m.db),
        m.stream.clone(),
        BTreeMap::from([
            (
                "public.orders".to_owned(),
                typed(json!({"round": {"type": "integer"}, "note": {"type": "string"}})),
            ),
            (
                "public.items".to_owned(),
                typed(json!({"qty": {"type": "integer"}})),
            ),
        ]),
    )
    .with_connections(connections)
}

fn entry(seq: u64, collection: &str, id: &str, change: Change) -> StreamEntry {
    StreamEntry {
        seq: Seq(seq),
        record: Record {
            key: RecordKey::new(SYNC, collection, id),
            provider: Provider::Http,
            version: Version::new(seq, 0),
            upstream_updated_at: time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            change,
        },
        payload_text: None,
    }
}

/// How many records the target's `payload` check says had NULs replaced.
async fn nul_replacements(target: &SchemaMirrorTarget) -> u64 {
    let report = target.health().await;
    let check = report.checks.iter().find(|c| c.name == "payload");
    let message = check.map(|c| c.message.as_str()).unwrap_or_default();
    let count = message.split(' ').next().unwrap_or_default();
    count.parse().unwrap_or_else(|_| panic!("{report:#?}"))
}

fn consumer() -> ConsumerId {
    ConsumerId::from("orders")
}

/// Every row of both tables, as text, in key order.
async fn tables(m: &Mirrored) -> Vec<String> {
    let mut conn = connect_admin(&PG, &m.db).await;
    sqlx::query_scalar(
        "select 'orders ' || t::text from mirror.orders t \
         union all select 'items ' || t::text from mirror.items t order by 1",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

async fn orders(m: &Mirrored) -> i64 {
    let mut conn = connect_admin(&PG, &m.db).await;
    sqlx::query_scalar("select count(*) from mirror.orders")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

async fn partitions(m: &Mirrored) -> Vec<(String, i32, i64)> {
    let mut conn = connect_admin(&PG, &m.db).await;
    sqlx::query_as(
        "select tbl, partition, seq from mirror._sluice_checkpoint \
         where consumer = 'orders' order by partition",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
}

/// Batches are copied in pieces of 1,000 rows, each sent as soon as it is encoded. A batch of
/// several pieces lands whole, new rows and updates alike; one whose record far into it cannot
/// be encoded (its stored payload is not a JSON object) fails with that record named and
/// writes nothing, and the next batch on the same target is written as usual.
#[tokio::test]
async fn a_batch_of_several_copy_pieces_lands_whole_or_not_at_all() {
    let m = database("mirror_pieces").await;
    let target = mirror(&m, 1);
    let order = |seq: u64, id: u64, round: u64| {
        let payload = json!({"round": round, "note": format!("n{id}")});
        entry(
            seq,
            "public.orders",
            &id.to_string(),
            Change::upsert(payload).unwrap(),
        )
    };
    let batch = |entries: Vec<StreamEntry>| Batch {
        through: entries.last().unwrap().seq,
        entries,
    };
    let sum = async || -> (i64, i64) {
        let mut conn = connect_admin(&PG, &m.db).await;
        sqlx::query_as("select count(*), coalesce(sum(round), 0)::int8 from mirror.orders")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    // 2,500 new rows: three pieces, copied straight in.
    let first = batch((1..=2500).map(|i| order(i, i, 1)).collect());
    target.apply(&consumer(), &first).await.unwrap();
    assert_eq!(sum().await, (2500, 2500));
    // 2,500 more, the 2,200th of which (in the third piece) cannot be encoded.
    let mut entries: Vec<StreamEntry> = (2501..=5000).map(|i| order(i, i, 1)).collect();
    entries[2199].payload_text = Some(PayloadText::whole("not a JSON object".into()));
    let error = target
        .apply(&consumer(), &batch(entries))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("public.orders/4700"), "{error}");
    assert_eq!(sum().await, (2500, 2500));
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(2500));
    // Every key again and as many new: 2,500 updates staged and merged, 2,500 new rows copied,
    // each in pieces.
    let third = batch((1..=5000).map(|i| order(5000 + i, i, 2)).collect());
    target.apply(&consumer(), &third).await.unwrap();
    assert_eq!(sum().await, (5000, 10_000));
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(10_000));
}

/// A table whose last batch found none of its keys is copied straight in, with no savepoint: a
/// key that exists aborts the whole transaction, which is written again with that table's keys
/// looked up. A batch of two tables whose second meets existing keys, after the first's rows
/// and one of its own new rows (with a NUL) were sent, lands whole and once: every row at its
/// newest version, the NUL counted once, the checkpoint at the batch's end. The next batches
/// (new keys only) land as well, through the lookup and then straight in again.
#[tokio::test]
async fn a_batch_meeting_existing_keys_in_its_second_table_lands_whole_and_once() {
    let m = database("mirror_again").await;
    let target = mirror(&m, 1);
    let order = |seq: u64, id: u64, round: u64, note: &str| {
        let payload = json!({"round": round, "note": note});
        entry(
            seq,
            "public.orders",
            &id.to_string(),
            Change::upsert(payload).unwrap(),
        )
    };
    let item = |seq: u64, id: u64, qty: u64| {
        let change = Change::upsert(json!({"qty": qty})).unwrap();
        entry(seq, "public.items", &id.to_string(), change)
    };
    let batch = |entries: Vec<StreamEntry>| Batch {
        through: entries.last().unwrap().seq,
        entries,
    };
    let mut first: Vec<_> = (1..=10).map(|i| order(i, i, 1, "a")).collect();
    first.extend((1..=10).map(|i| item(10 + i, i, 1)));
    target.apply(&consumer(), &batch(first)).await.unwrap();
    // Items first (tables are written in name order): 11..=15 new. Then orders: 16 new, with a
    // NUL, then 6..=10, which exist.
    let mut second: Vec<_> = (11..=15).map(|i| item(20 + i, i, 2)).collect();
    second.push(order(36, 16, 1, "x\u{0}y"));
    second.extend((6..=10).map(|i| order(30 + i + 7, i, 2, "b")));
    target.apply(&consumer(), &batch(second)).await.unwrap();
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(47));
    assert_eq!(nul_replacements(&target).await, 1);
    let third: Vec<_> = (17..=20).map(|i| order(50 + i, i, 3, "c")).collect();
    target.apply(&consumer(), &batch(third)).await.unwrap();
    let fourth: Vec<_> = (21..=22).map(|i| order(70 + i, i, 4, "d")).collect();
    target.apply(&consumer(), &batch(fourth)).await.unwrap();
    // Rows as text: the key, the columns by name, then the columns the types did not name.
    let mut want: Vec<String> = (1..=15)
        .map(|i| format!("items ({i},{},{{}})", if i > 10 { 2 } else { 1 }))
        .collect();
    want.extend((1..=10).chain(16..=22).map(|i| {
        let (round, note) = match i {
            6..=10 => (2, "b"),
            16 => (1, "x\u{FFFD}y"),
            17..=20 => (3, "c"),
            21..=22 => (4, "d"),
            _ => (1, "a"),
        };
        format!("orders ({i},{note},{round},{{}})")
    }));
    want.sort();
    assert_eq!(tables(&m).await, want);
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(92));
    assert_eq!(nul_replacements(&target).await, 1);
}

#[tokio::test]
async fn a_mirror_written_through_three_connections_matches_one_written_through_one() {
    let (serial, parallel) = (database("mirror_one").await, database("mirror_three").await);
    let one = mirror(&serial, 1);
    let three = mirror(&parallel, 3);
    let mut seq = 0;
    for round in 0..4u64 {
        let mut entries = Vec::new();
        for i in 0..300u64 {
            seq += 1;
            let id = format!("r{:03}", (i * 7 + round * 13) % 400);
            let (collection, payload) = if i % 3 == 0 {
                ("public.items", json!({"qty": i}))
            } else {
                (
                    "public.orders",
                    json!({"round": round, "note": format!("\u{0}{i}"), "extra": [i]}),
                )
            };
            let change = if i % 11 == 0 {
                Change::Delete
            } else {
                Change::upsert(payload).unwrap()
            };
            entries.push(entry(seq, collection, &id, change));
        }
        let batch = Batch {
            entries,
            through: Seq(seq),
        };
        one.apply(&consumer(), &batch).await.unwrap();
        three.apply(&consumer(), &batch).await.unwrap();
    }
    let written = tables(&parallel).await;
    assert!(written.len() > 300, "{}", written.len());
    assert_eq!(tables(&serial).await, written);
    assert_eq!(three.checkpoint(&consumer()).await.unwrap(), Seq(seq));
    let key = "\"mirror\"".to_owned();
    assert_eq!(
        partitions(&parallel).await,
        (0..3)
            .map(|p| (key.clone(), p, seq as i64))
            .collect::<Vec<_>>()
    );
    // Every partition's NUL replacements were counted, as through one connection.
    let replaced = nul_replacements(&one).await;
    assert!(replaced > 0);
    assert_eq!(nul_replacements(&three).await, replaced);

    // Reopened with two connections and applying straight away: the partitions are first
    // aligned to the lowest checkpoint, so none skips a batch on the strength of a row
    // written under the old width.
    let two = mirror(&parallel, 2);
    let batch = Batch {
        entries: vec![entry(
            seq + 1,
            "public.orders",
            "new",
            Change::upsert(json!({"round": 9})).unwrap(),
        )],
        through: Seq(seq + 1),
    };
    two.apply(&consumer(), &batch).await.unwrap();
    assert_eq!(
        partitions(&parallel).await,
        vec![
            (key.clone(), 0, seq as i64 + 1),
            (key.clone(), 1, seq as i64 + 1)
        ]
    );
    assert!(
        tables(&parallel)
            .await
            .iter()
            .any(|row| row.starts_with("orders (new,,9,")),
        "{:?}",
        tables(&parallel).await.last()
    );
    // A batch already applied changes nothing.
    two.apply(&consumer(), &batch).await.unwrap();
    assert_eq!(two.checkpoint(&consumer()).await.unwrap(), Seq(seq + 1));
}

#[tokio::test]
async fn a_checkpoint_table_from_before_partitions_keeps_its_position() {
    let m = database("mirror_before").await;
    // What an earlier sluice made, as the sync user: a row per consumer.
    let mut conn = m.settings.connect().await.unwrap();
    sqlx::raw_sql(
        "create schema mirror;
         create table mirror._sluice_checkpoint (consumer text primary key, seq bigint not null);
         insert into mirror._sluice_checkpoint values ('orders', 42), ('other', 7);",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    drop(conn);

    let target = mirror(&m, 2);
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(42));
    let key = "\"mirror\"".to_owned();
    assert_eq!(
        partitions(&m).await,
        vec![(key.clone(), 0, 42), (key.clone(), 1, 42)]
    );
    let other = ConsumerId::from("other");
    assert_eq!(target.checkpoint(&other).await.unwrap(), Seq(7));

    let batch = Batch {
        entries: (0..20)
            .map(|i| {
                let (collection, payload) = if i % 2 == 0 {
                    ("public.items", json!({"qty": i}))
                } else {
                    ("public.orders", json!({"round": i}))
                };
                let change = Change::upsert(payload).unwrap();
                entry(43 + i, collection, &format!("i{i}"), change)
            })
            .collect(),
        through: Seq(62),
    };
    target.apply(&consumer(), &batch).await.unwrap();
    assert_eq!(tables(&m).await.len(), 20);
    // A second process opening the file's target finds the table as it left it.
    let again = mirror(&m, 1);
    assert_eq!(again.checkpoint(&consumer()).await.unwrap(), Seq(62));
    assert_eq!(partitions(&m).await, vec![(key, 0, 62)]);
    let mut admin = connect_admin(&PG, &m.db).await;
    let primary_key: String = sqlx::query_scalar(
        "select pg_get_constraintdef(oid) from pg_constraint \
         where conrelid = 'mirror._sluice_checkpoint'::regclass and contype = 'p'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(primary_key, "PRIMARY KEY (consumer, tbl, partition)");
}

#[tokio::test]
async fn a_partition_lost_mid_batch_is_replayed_and_nothing_is_lost() {
    let m = database("mirror_lost").await;
    let target = mirror(&m, 3);
    let order = |seq: u64, id: &str| {
        let change = Change::upsert(json!({"round": seq})).unwrap();
        entry(seq, "public.orders", id, change)
    };
    let first = Batch {
        entries: vec![order(1, "before")],
        through: Seq(1),
    };
    target.apply(&consumer(), &first).await.unwrap();

    // The server drops one partition's connection while it copies; the others commit.
    common::die_on_poison(&PG, &m.db, "mirror.orders", "id").await;
    let mut entries: Vec<_> = (0..300)
        .map(|i| order(10 + i, &format!("r{i:03}")))
        .collect();
    entries.push(order(400, "poison"));
    let batch = Batch {
        entries,
        through: Seq(400),
    };
    let err = target.apply(&consumer(), &batch).await.unwrap_err();
    assert_eq!(err.class(), sluice_core::ErrorClass::Retry, "{err}");
    let written = orders(&m).await;
    assert!(
        written > 1 && written < 301,
        "the other partitions committed: {written} rows"
    );
    assert_eq!(
        target.checkpoint(&consumer()).await.unwrap(),
        Seq(1),
        "the consumer resumes from the lowest partition"
    );

    common::stop_dying(&PG, &m.db, "mirror.orders").await;
    target.apply(&consumer(), &batch).await.unwrap();
    assert_eq!(orders(&m).await, 302);
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(400));
}

#[tokio::test]
async fn an_oddly_named_schemas_checkpoints_are_migrated_and_written() {
    let m = database("mirror_odd").await;
    let schema = "My \"odd\" Schëma";
    let (s, table) = (
        quote_ident(schema),
        format!("{}._sluice_checkpoint", quote_ident(schema)),
    );
    let mut conn = m.settings.connect().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "create schema {s};
         create table {table} (consumer text primary key, seq bigint not null);
         insert into {table} values ('orders', 42);"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    let target = mirror_into(&m, schema, 2);
    assert_eq!(target.checkpoint(&consumer()).await.unwrap(), Seq(42));
    let batch = Batch {
        entries: (0..10)
            .map(|i| {
                let change = Change::upsert(json!({"qty": i})).unwrap();
                entry(43 + i, "public.items", &format!("i{i}"), change)
            })
            .collect(),
        through: Seq(52),
    };
    target.apply(&consumer(), &batch).await.unwrap();
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select tbl, partition, seq from {table} order by partition"
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows, vec![(s.clone(), 0, 52), (s.clone(), 1, 52)]);
    let items: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select count(*) from {s}.items"
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(items, 10);
}

/// A table whose columns all have a binary form gets its rows in `COPY`'s binary format; the
/// same records into a table with one more column (`date`, always text) land with every
/// shared column equal, value for value: times in every form (fractions rounded by the
/// server's rule, offsets, Unix seconds), integers, escapes, NULs, nulls and missing fields.
/// An integer given as a string (`"12"`) goes binary too; a batch with a value only the server
/// can read (a time in words, `NaN`, an exponent) goes as text, and lands equal too.
#[tokio::test]
async fn rows_in_binary_land_as_rows_in_text() {
    let m = database("mirror_binary").await;
    let column = |name: &str, sql_type: &str| sluice_core::ColumnSchema {
        name: name.into(),
        sql_type: sql_type.into(),
        enum_labels: None,
        unsupported: None,
    };
    let mut columns = vec![
        column("id", "bigint"),
        column("n", "integer"),
        column("small", "smallint"),
        column("s", "text"),
        column("v", "character varying(40)"),
        column("b", "boolean"),
        column("t", "timestamp with time zone"),
        column("o", "jsonb"),
        column("m", "numeric"),
        column("ünï", "text"),
        column("p", "numeric(12,2)"),
    ];
    for (collection, extra) in [("public.bin_values", false), ("public.txt_values", true)] {
        if extra {
            columns.push(column("x", "date"));
        }
        let schema = sluice_core::CollectionSchema {
            columns: columns.clone(),
            key: vec!["id".into()],
        };
        sluice_core::RecordStream::set_collection_schema(
            m.stream.as_ref(),
            SYNC,
            &sluice_core::CollectionId(collection.into()),
            &schema,
        )
        .await
        .unwrap();
    }
    let target = SchemaMirrorTarget::new(
        "warehouse",
        m.settings.clone(),
        "mirror",
        format!("{}_read", m.db),
        m.stream.clone(),
        BTreeMap::new(),
    );
    let payloads = [
        json!({"n": 0, "small": -32768, "s": "plain", "v": "v", "b": true,
               "t": "2024-05-01T10:00:00Z", "o": {"a": 1},
               "m": "12345678901234567890.0123456789", "p": "9.995"}),
        json!({"m": 12.50, "p": "-0.005"}),
        json!({"m": "-0.00", "p": 0}),
        json!({"m": "0.00012", "p": "1234567890.12"}),
        json!({"m": "-10000", "p": "007.1"}),
        json!({"m": "1234567890123456789012345678901234567890.1234567890", "ünï": "ünï ☃ 𝄞",
               "o": {"ключ": "値", "k\u{e9}": 1}}),
        json!({"m": "-18446744073709551616", "p": "-9999999999.99"}),
        json!({"m": "340282366920938463463374607431768211456", "s": 0.1}),
        json!({"m": 0.1, "p": 5e-3}),
        json!({"n": -1, "small": 32767, "s": "tab\there \"q\" back\\slash é ☃ 𝄞",
               "v": "nl\nline", "b": false, "t": "2024-05-01 12:00:00.5+02", "o": [1, "x"]}),
        json!({"n": 2147483647, "s": "nul \u{0} inside", "t": "2024-05-01T12:00:00.1234567-05:30",
               "o": {"k\u{0}": "v\u{0}"}}),
        json!({"n": -2147483648, "s": "", "b": null, "t": "2026-12-05T10:00:00.0000005Z", "o": null}),
        json!({"n": null, "s": null, "t": "2026-12-05T10:00:00.0000015+00:00", "o": "a string"}),
        json!({"t": "1969-12-31T23:59:59.9999995Z"}),
        json!({"t": 1_700_000_000, "o": 12.50}),
        json!({"t": "1700000000", "s": 1.5e300, "o": true}),
        json!({"t": "2024-02-29T23:59:59.999999999+15:59", "s": {"nested": [null]}}),
        json!({"t": "0001-01-01T00:00:00.0000005Z", "v": 7}),
    ];
    let batch = |collection: &str, first: u64, payloads: &[serde_json::Value]| {
        let entries: Vec<StreamEntry> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let seq = first + i as u64;
                let mut p = p.clone();
                p["id"] = json!(seq % 10_000);
                let mut e = entry(seq, collection, &(seq % 10_000).to_string(), Change::Delete);
                e.record.change = Change::upsert(json!({})).unwrap();
                e.payload_text = Some(PayloadText::whole(p.to_string()));
                e
            })
            .collect();
        Batch {
            through: entries.last().unwrap().seq,
            entries,
        }
    };
    // A time in words, `NaN` and an exponent only the server reads: that batch goes as text.
    let text_only = [
        json!({"n": "12", "t": "2024-05-01T10:00:00Z"}),
        json!({"n": 13, "t": "May 1 2024 10:00:00 UTC"}),
        json!({"m": "NaN", "p": 1e3}),
        json!({"m": 1.7976931348623157e308, "o": 5e-324}),
    ];
    // 2,500 rows, three pieces in stream order, a time in words in the third: the first two
    // go binary, the third as text in a second COPY.
    let many: Vec<_> = (0..2500)
        .map(
            |i| json!({"n": i, "t": if i == 2100 { "May 2 2024" } else { "2024-05-01T10:00:00Z" }}),
        )
        .collect();
    // One consumer's checkpoint: the second table's batches come later in the stream.
    for (collection, from) in [("public.bin_values", 1), ("public.txt_values", 10_001)] {
        for (at, payloads) in [(0, &payloads[..]), (100, &text_only), (1000, &many)] {
            let batch = batch(collection, from + at, payloads);
            target.apply(&consumer(), &batch).await.unwrap();
        }
    }
    let mut conn = connect_admin(&PG, &m.db).await;
    let rows = |table: &str| {
        format!(
            "select id, n, small, s, v, b, t::text, o::text, m::text, p::text, \"ünï\" \
             from mirror.{table}"
        )
    };
    let differ: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select d::text from (({} except {}) union all ({} except {})) d order by 1",
        rows("bin_values"),
        rows("txt_values"),
        rows("txt_values"),
        rows("bin_values")
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "select 'bin', count(*) from mirror.bin_values union all select 'txt', count(*) from mirror.txt_values",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(differ.is_empty(), "{counts:?} {differ:#?}");
    let count: i64 = sqlx::query_scalar("select count(*) from mirror.bin_values")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        count,
        (payloads.len() + text_only.len() + many.len()) as i64
    );
    // The record with NULs had them replaced on both paths, and counted.
    assert_eq!(nul_replacements(&target).await, 2);
}

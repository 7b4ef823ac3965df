//! The schema-mirror layout end to end: a PostgreSQL source with a dozen tables of varied
//! types → the records stream → typed tables in a schema of the target, compared row by row.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::json;
use sluice_consumer::{ConsumerHandle, ConsumerRuntime};
use sluice_core::{
    BatchConfig, Change, Consumer, ConsumerId, Health, LagThresholds, Provider, Record,
    RecordFilter, RecordKey, RecordStream, Status, SyncId, Version,
};
use sluice_localpg::Cluster;
use sluice_source_pg::{PostgresSource, SourceOptions, SourceSpec};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{ConnectionSettings, JsonCollection, SchemaMirrorTarget};
use tokio::sync::watch;
use uuid::Uuid;

const SYNC: SyncId = SyncId(Uuid::from_u128(0xA11));

const SOURCE_SQL: &str = r#"
create type mood as enum ('sad', 'ok', 'happy');
create type tier as enum ('gold', 'silver', 'bronze');
create type address as (street text, number int);
create domain posint as int check (value > 0);
create table t_ints (id int primary key, a smallint, b bigint, c real, d double precision, p posint);
create table t_numeric (id bigint primary key, n numeric(30,10), n2 numeric);
create table t_text (id text primary key, v varchar(20), c char(5), t text);
create table t_time (id int primary key, tz timestamptz, ts timestamp, d date, tm time, iv interval);
create table t_json (id int primary key, j json, jb jsonb);
create table t_bytes (id int primary key, b bytea, u uuid);
create table t_arrays (id int primary key, ia int[], ta text[], grid int[][], na numeric(6,2)[]);
create table t_enum (id int primary key, m mood, ms mood[]);
create table t_composite (a int, b text, c tier, v text, primary key (a, b, c));
create table measurements (id int, at date, v numeric(8,3), primary key (id, at)) partition by range (at);
create table measurements_2024 partition of measurements for values from ('2024-01-01') to ('2025-01-01');
create table measurements_2025 partition of measurements for values from ('2025-01-01') to ('2026-01-01');
create table t_toast (id int primary key, body text);
create table t_misc (id int primary key, ok boolean, net inet, pt point, addr address);

insert into t_ints select i, i, i::bigint * 1000000000, i / 3.0, i / 7.0, i from generate_series(1, 50) i;
insert into t_ints values (0, null, null, null, null, null);
insert into t_numeric values (1, 12345678901234567890.0123456789, 1e-20), (2, -0.5, null), (3, 0, 'NaN');
insert into t_text values ('a b', 'quote '' "dq"', 'ab', 'ünïcode ✓'), ('', null, null, 'empty key'), ('x\y', 'back\slash', 'c', E'tab\there');
insert into t_time values (1, '2024-05-01 12:00:00.5+02', '2024-05-01 12:00:00', '2024-05-01', '13:14:15', '1 day 02:03:04'),
                          (2, 'infinity', '-infinity', '2000-02-29', '00:00', '-3 months'), (3, null, null, null, null, null);
-- json values are compared byte for byte, so they are written as sluice normalises them
-- (compact, keys sorted: docs/postgres-source.md); a JSON null in a column arrives as SQL NULL.
insert into t_json values (1, '{"a":[1,{"b":null}],"s":"x"}', '{"k": {"n": 1.5}}'), (2, '[1,2]', '"str"'), (3, null, null);
insert into t_bytes values (1, '\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'), (2, '', null);
insert into t_arrays values (1, '{1,NULL,3}', '{"a b","c,d",NULL,"e\"f"}', '{{1,2},{3,4}}', '{1.50,NULL}'), (2, '{}', null, null, null);
insert into t_enum values (1, 'happy', '{sad,ok}'), (2, null, '{}');
insert into t_composite select i, 'nàme ' || (i % 3), (array['gold','silver','bronze'])[1 + i % 3]::tier, 'v' || i from generate_series(1, 30) i;
insert into measurements select i, date '2024-06-01' + i * 2, i * 1.5 from generate_series(1, 200) i;
insert into t_toast select 1, string_agg(md5(i::text), '') from generate_series(1, 3200) i;
alter table t_toast alter column body set storage external;
insert into t_misc values (1, true, '10.0.0.1/8', '(1,2)', row('Main St', 5)), (2, false, null, null, null);
"#;

const TABLES: [(&str, &str); 12] = [
    ("t_ints", "id"),
    ("t_numeric", "id"),
    ("t_text", "id"),
    ("t_time", "id"),
    ("t_json", "id"),
    ("t_bytes", "id"),
    ("t_arrays", "id"),
    ("t_enum", "id"),
    ("t_composite", "a, b, c"),
    ("measurements", "id, at"),
    ("t_toast", "id"),
    ("t_misc", "id"),
];

/// The tables as the target receives them: PostgreSQL 12 has no publish_via_partition_root,
/// so there each partition arrives as a table of its own.
fn tables(source: &Cluster) -> Vec<(&'static str, &'static str)> {
    let mut tables = TABLES.to_vec();
    if source.binaries().major() < Some(13) {
        tables.retain(|(t, _)| *t != "measurements");
        tables.extend([
            ("measurements_2024", "id, at"),
            ("measurements_2025", "id, at"),
        ]);
    }
    tables
}

struct World {
    source: Cluster,
    target: Cluster,
    stream: Arc<EmbeddedStream>,
    _dir: tempfile::TempDir,
    stop: watch::Sender<bool>,
}

fn settings(pg: &Cluster, user: &str, password: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::new("127.0.0.1", pg.port(), "postgres", user);
    s.password = Some(SecretString::from(password.to_owned()));
    s.ssl_mode = sluice_core::SslMode::Disable;
    s
}

async fn world() -> World {
    let source = Cluster::options().source().start().unwrap();
    let target = Cluster::options().target().start().unwrap();
    source.execute("postgres", SOURCE_SQL).await.unwrap();
    source
        .execute(
            "postgres",
            if source.binaries().major() >= Some(13) {
                "create publication p for all tables with (publish_via_partition_root = true)"
            } else {
                "create publication p for all tables"
            },
        )
        .await
        .unwrap();
    // The sync user may connect and create schemas, nothing more; a reader has the read role;
    // a table of the user's own that the sync user must not be able to read.
    target
        .execute(
            "postgres",
            "create role sluice login password 'pw';
             grant connect, create on database postgres to sluice;
             create role sluice_read;
             create role reader login password 'rd' in role sluice_read;
             create table public.secret (x int); insert into public.secret values (42);",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let (stop, stopped) = watch::channel(false);
    let src = PostgresSource::new(
        "app",
        SYNC,
        settings(&source, "postgres", source.superuser_password()),
        SourceSpec {
            publication: "p".into(),
            slot: "s".into(),
            failover: false,
        },
        stream.clone(),
        SourceOptions {
            create_missing: true,
            backfill_page: 17,
            ..SourceOptions::default()
        },
    );
    tokio::spawn(async move { src.run_until(stopped).await });
    World {
        source,
        target,
        stream,
        _dir: dir,
        stop,
    }
}

fn mirror(
    w: &World,
    schema: &str,
    json: BTreeMap<String, JsonCollection>,
) -> Arc<SchemaMirrorTarget> {
    Arc::new(SchemaMirrorTarget::new(
        "warehouse",
        settings(&w.target, "sluice", "pw"),
        schema,
        "sluice_read",
        w.stream.clone(),
        json,
    ))
}

fn consume(
    w: &World,
    id: &str,
    filter: RecordFilter,
    target: Arc<SchemaMirrorTarget>,
) -> ConsumerHandle {
    let runtime = ConsumerRuntime::new(
        ConsumerId::from(id),
        filter,
        w.stream.clone(),
        target,
        BatchConfig {
            max_records: 500,
            max_wait_ms: 10,
        },
        LagThresholds::default(),
    );
    let handle = runtime.handle();
    let stopped = w.stop.subscribe();
    tokio::spawn(runtime.run(stopped));
    handle
}

async fn rows(pg: &Cluster, schema: &str, table: &str, key: &str) -> Vec<String> {
    let mut conn = pg.admin("postgres").await.unwrap();
    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!(
        "select t::text from {schema}.{table} t order by {key}"
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap_or_default()
}

async fn wait_equal(w: &World, schema: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut differ = Vec::new();
        for (table, key) in tables(&w.source) {
            if rows(&w.source, "public", table, key).await
                != rows(&w.target, schema, table, key).await
            {
                differ.push(table);
            }
        }
        if differ.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            let (table, key) = tables(&w.source)
                .into_iter()
                .find(|(t, _)| *t == differ[0])
                .unwrap();
            panic!(
                "{what}: {differ:?} differ; {table}:\nsource {:?}\ntarget {:?}",
                rows(&w.source, "public", table, key).await,
                rows(&w.target, schema, table, key).await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn target_sql(
    w: &World,
    user: &str,
    password: &str,
    sql: &str,
) -> Result<Vec<String>, String> {
    let mut conn = settings(&w.target, user, password)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(&mut conn)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_dozen_varied_tables_are_mirrored_exactly_and_kept_in_sync() {
    let w = world().await;
    let target = mirror(&w, "app_mirror", BTreeMap::new());
    let handle = consume(
        &w,
        "mirror",
        RecordFilter::Sync {
            sync_id: SYNC,
            collections: None,
        },
        target.clone(),
    );
    wait_equal(&w, "app_mirror", "after the backfill").await;

    // Types: enums re-created in the mirror schema, numeric precision, arrays, the composite
    // (not reproducible) stored as text with a notice naming the column.
    let types = target_sql(
        &w,
        "postgres",
        w.target.superuser_password(),
        "select c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
         where n.nspname = 'app_mirror' and a.attnum > 0 and c.relkind = 'r' order by 1",
    )
    .await
    .unwrap();
    for expected in [
        "t_enum.m app_mirror.mood",
        "t_enum.ms app_mirror.mood[]",
        "t_numeric.n numeric(30,10)",
        "t_arrays.na numeric(6,2)[]",
        "t_time.tz timestamp with time zone",
        "t_time.ts timestamp without time zone",
        "t_json.jb jsonb",
        "t_bytes.u uuid",
        "t_ints.p integer",
        "t_misc.addr text",
    ] {
        assert!(
            types.contains(&expected.to_owned()),
            "{expected} not in {types:#?}"
        );
    }
    let report = target.health().await;
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.message.contains("t_misc.addr") && c.message.contains("address")),
        "{report:?}"
    );

    // Live changes, including a column added upstream, appear without a restart.
    w.source
        .execute(
            "postgres",
            "update t_ints set a = -1 where id = 5; delete from t_ints where id = 6;
             update t_toast set id = id where id = 1;
             update t_composite set v = 'changed' where a = 4;
             delete from measurements where id = 10;
             insert into t_enum values (3, 'sad', '{happy}');
             alter table t_ints add column e text;
             update t_ints set e = 'new ' || id where id < 10;",
        )
        .await
        .unwrap();
    // A user's view and table in the mirror schema (made by someone else).
    w.target
        .execute(
            "postgres",
            "create view app_mirror.small_ints as select id, a from app_mirror.t_ints where id < 10;
             create table app_mirror.notes (note text); insert into app_mirror.notes values ('mine');",
        )
        .await
        .unwrap();
    wait_equal(&w, "app_mirror", "after live changes and a new column").await;

    // The read role reads the mirror (tables created later included); the sync user reads
    // nothing outside its schemas.
    let read = target_sql(
        &w,
        "reader",
        "rd",
        "select count(*)::text from app_mirror.t_ints",
    )
    .await;
    assert_eq!(read, Ok(vec!["50".to_owned()]));
    let denied = target_sql(&w, "sluice", "pw", "select x::text from public.secret").await;
    assert!(denied.unwrap_err().contains("permission denied"));

    // A rebuild empties only sluice's tables and refills them from the stream; the user's
    // view and table survive it.
    let emptied =
        sluice_provisioning::rebuild_schema(&settings(&w.target, "sluice", "pw"), "app_mirror")
            .await
            .unwrap();
    assert!(
        emptied.contains(&"t_ints".to_owned()) && !emptied.contains(&"notes".to_owned()),
        "{emptied:?}"
    );
    handle.restart_backfill().await.unwrap();
    wait_equal(&w, "app_mirror", "after a rebuild").await;
    let view = target_sql(
        &w,
        "postgres",
        w.target.superuser_password(),
        "select a::text from app_mirror.small_ints where id = 5",
    )
    .await;
    assert_eq!(view, Ok(vec!["-1".to_owned()]));
    let notes = target_sql(
        &w,
        "postgres",
        w.target.superuser_password(),
        "select note from app_mirror.notes",
    )
    .await;
    assert_eq!(notes, Ok(vec!["mine".to_owned()]));

    // Renaming: the same consumer pointed at a new schema backfills it from the stream (no
    // re-read of the source); the old schema stays as it was.
    w.stop.send_replace(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (stop, _) = watch::channel(false);
    let w = World { stop, ..w };
    let renamed = mirror(&w, "app_mirror_v2", BTreeMap::new());
    consume(
        &w,
        "mirror",
        RecordFilter::Sync {
            sync_id: SYNC,
            collections: None,
        },
        renamed,
    );
    wait_equal(&w, "app_mirror_v2", "after renaming the schema").await;
    let old = rows(&w.target, "app_mirror", "t_ints", "id").await;
    assert_eq!(old.len(), 50, "the old schema is left for the user to drop");
    // The notice about the composite column is a warning, not an error: writes go on.
    let report = target.health().await;
    assert_eq!(report.status, Status::Warning, "{report:?}");
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name == "writes" && c.status == Status::Healthy),
        "{report:?}"
    );
}

#[tokio::test]
async fn json_schema_collections_get_typed_columns_the_seed_query_works() {
    let target = Cluster::options().target().start().unwrap();
    target
        .execute(
            "postgres",
            "create role sluice login password 'pw'; grant connect, create on database postgres to sluice;
             create role sluice_read; create role reader login password 'rd' in role sluice_read;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let sync = SyncId(Uuid::from_u128(0x0571_219e));
    let record = |collection: &str, id: &str, version: u64, payload: serde_json::Value| Record {
        key: RecordKey::new(sync, collection, id),
        provider: Provider::Http,
        version: Version::new(version, 0),
        upstream_updated_at: time::OffsetDateTime::now_utc(),
        change: Change::upsert(payload).unwrap(),
    };
    stream
        .append(vec![
            record("stripe:customer", "cus_1", 1, json!({"email": "a@example.com", "created": "2024-05-01T10:00:00Z", "metadata": {"user_id": "u1"}, "extra": {"k": 1}})),
            record("stripe:customer", "cus_2", 1, json!({"email": "b@example.com", "metadata": {"user_id": "u2"}})),
            record("stripe:subscription", "sub_1", 1, json!({"status": "active", "customer": "cus_1", "quantity": 3})),
            record("stripe:subscription", "sub_2", 1, json!({"status": "canceled", "customer": "cus_2", "quantity": 1})),
        ])
        .await
        .unwrap();
    let json = BTreeMap::from([
        (
            "stripe:customer".to_owned(),
            JsonCollection {
                table: None,
                schema: json!({"type": "object", "properties": {
                    "email": {"type": "string"}, "created": {"type": "string", "format": "date-time"},
                    "metadata": {"type": "object"}}}),
            },
        ),
        (
            "stripe:subscription".to_owned(),
            JsonCollection {
                table: None,
                schema: json!({"type": "object", "properties": {
                    "status": {"type": "string"}, "customer": {"type": "string"}, "quantity": {"type": "integer"}}}),
            },
        ),
    ]);
    let mut s = ConnectionSettings::new("127.0.0.1", target.port(), "postgres", "sluice");
    s.password = Some(SecretString::from("pw".to_owned()));
    s.ssl_mode = sluice_core::SslMode::Disable;
    let mirror = Arc::new(SchemaMirrorTarget::new(
        "warehouse",
        s,
        "stripe",
        "sluice_read",
        stream.clone(),
        json,
    ));
    let runtime = ConsumerRuntime::new(
        ConsumerId::from("stripe"),
        RecordFilter::Provider(Provider::Http),
        stream.clone(),
        mirror,
        BatchConfig::default(),
        LagThresholds::default(),
    );
    let handle = runtime.handle();
    let (_stop, stopped) = watch::channel(false);
    tokio::spawn(runtime.run(stopped));
    let head = stream.head().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while handle.cursor() < head {
        assert!(Instant::now() < deadline, "{:?}", handle.health().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The documented query, as the read role.
    let mut s = ConnectionSettings::new("127.0.0.1", target.port(), "postgres", "reader");
    s.password = Some(SecretString::from("rd".to_owned()));
    s.ssl_mode = sluice_core::SslMode::Disable;
    let mut conn = s.connect().await.unwrap();
    let status: Vec<String> = sqlx::query_scalar(
        "select subscription.status from stripe.subscription
         join stripe.customer on subscription.customer = customer.id
         where customer.metadata ->> 'user_id' = 'u1'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(status, vec!["active".to_owned()]);
    let typed: (String, String, i64, String) = sqlx::query_as(
        "select pg_typeof(c.created)::text, c.payload::text, s.quantity, pg_typeof(s.quantity)::text
         from stripe.customer c, stripe.subscription s where c.id = 'cus_1' and s.id = 'sub_1'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        typed,
        (
            "timestamp with time zone".into(),
            r#"{"extra": {"k": 1}}"#.into(),
            3,
            "bigint".into()
        )
    );
    // Another collection that would land in the same table is refused, by name.
    stream
        .append(vec![record(
            "other:customer",
            "x",
            1,
            json!({"email": "x"}),
        )])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = format!("{:?}", handle.health().await);
        if text.contains("already holds collection stripe:customer") {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn dropped_and_retyped_columns_never_break_what_the_user_owns() {
    let w = world().await;
    let target = mirror(&w, "changes", BTreeMap::new());
    let handle = consume(
        &w,
        "changes",
        RecordFilter::Sync {
            sync_id: SYNC,
            collections: Some([sluice_core::CollectionId("public.t_text".into())].into()),
        },
        target.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows(&w.target, "changes", "t_text", "id").await.len() != 3 {
        assert!(Instant::now() < deadline, "the backfill did not arrive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Views of the user's own on the mirror table.
    w.target
        .execute(
            "postgres",
            "create view public.by_c as select id, c from changes.t_text;
             create view public.by_v as select id, v from changes.t_text;",
        )
        .await
        .unwrap();
    // A dropped column stays in the mirror (the view on it keeps working) and is no longer filled.
    w.source
        .execute(
            "postgres",
            "alter table t_text drop column c; insert into t_text values ('new', 'v', 'tee');",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while target_sql(
        &w,
        "postgres",
        w.target.superuser_password(),
        "select coalesce(c, 'null') from public.by_c where id = 'new'",
    )
    .await
        != Ok(vec!["null".to_owned()])
    {
        assert!(
            Instant::now() < deadline,
            "the row after the drop did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A retyped column that the user's view depends on: sluice stops with the view named.
    w.source
        .execute("postgres", "alter table t_text alter column v type int using length(v); insert into t_text values ('n2', 7, 'x');")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = handle.health().await;
        let text = format!("{report:?}");
        if text.contains("by_v") {
            assert!(text.contains("changed type"), "{text}");
            assert!(
                !text.contains("by_c"),
                "only the view on the column is named: {text}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no message naming the view: {text}\n{:?}\nthe stream's schema of t_text: {:?}\nthe stream's t_text: {:?}",
            target.health().await,
            w.stream
                .collection_schema(SYNC, &sluice_core::CollectionId("public.t_text".into()))
                .await,
            w.stream
                .live_records()
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.record.key.collection_id.0 == "public.t_text")
                .map(|e| (e.seq, e.record.key.upstream_id.0, e.record.change))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing the user owns was dropped.
    let views = target_sql(
        &w,
        "postgres",
        w.target.superuser_password(),
        "select viewname::text from pg_views where schemaname = 'public' order by 1",
    )
    .await;
    assert_eq!(views, Ok(vec!["by_c".to_owned(), "by_v".to_owned()]));
    // The user drops the view. The rows already mirrored do not convert by a plain cast
    // (the source used `using length(v)`), so sluice asks for the conversion, exactly.
    w.target
        .execute("postgres", "drop view public.by_v")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = handle.health().await;
        if let Some(check) = report
            .checks
            .iter()
            .find(|c| c.message.contains("do not convert by a cast"))
        {
            let fix = check.fix.clone().unwrap_or_default();
            assert!(
                fix.contains(
                    r#"alter table "changes"."t_text" alter column "v" type integer using"#
                ),
                "{fix}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no conversion message: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.target
        .execute(
            "postgres",
            "alter table changes.t_text alter column v type integer using length(v)",
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while target_sql(
        &w,
        "postgres",
        w.target.superuser_password(),
        "select v::text from changes.t_text where id = 'n2'",
    )
    .await
        != Ok(vec!["7".to_owned()])
    {
        assert!(
            Instant::now() < deadline,
            "did not resume after the view was dropped: {:?}",
            handle.health().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

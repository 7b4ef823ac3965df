//! The Postgres source against real servers: backfill, streaming, type mapping, TOAST,
//! TRUNCATE, new columns, restarts of the source and kills of sluice, health.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::{Value, json};
use sluice_core::{Health, RecordKey, RecordStream, Status, StreamEntry, SyncId};
use sluice_localpg::Cluster;
use sluice_source_pg::{PostgresSource, SourceOptions, SourceSpec};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::ConnectionSettings;
use tokio::sync::watch;
use uuid::Uuid;

mod support;
use support::{live, stream_rows, table_rows};

static PG: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .source()
        .start()
        .expect("start PostgreSQL")
});

const SYNC: SyncId = SyncId(Uuid::from_u128(0x5eed));

struct Setup {
    db: String,
    dir: tempfile::TempDir,
    stream: Arc<EmbeddedStream>,
    settings: ConnectionSettings,
    spec: SourceSpec,
}

/// A fresh database with a replication role, `schema_sql` run as the superuser, and a
/// publication for all tables.
async fn setup(prefix: &str, schema_sql: &str) -> Setup {
    setup_in(PG.fresh_database(prefix).await.unwrap(), schema_sql).await
}

/// [`setup`] in the database `db`, already created.
async fn setup_in(db: String, schema_sql: &str) -> Setup {
    let user = format!("{db}_repl");
    PG.execute(
        &db,
        &format!(
            "create role {user} login replication password 'pw';
             {schema_sql}
             grant select on all tables in schema public to {user};
             create publication {db}_pub for all tables;"
        ),
    )
    .await
    .unwrap();
    let mut settings =
        ConnectionSettings::from_url(&PG.url_as(&user, Some("pw"), &db, None)).unwrap();
    settings.password = Some(SecretString::from("pw".to_owned()));
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    Setup {
        spec: SourceSpec {
            publication: format!("{db}_pub"),
            slot: format!("{db}_slot"),
            failover: false,
        },
        db,
        dir,
        stream,
        settings,
    }
}

fn options() -> SourceOptions {
    SourceOptions {
        create_missing: true,
        backfill_page: 1000,
        heartbeat: Duration::from_millis(500),
        ..SourceOptions::default()
    }
}

struct Running {
    source: PostgresSource,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the source stops")
            .unwrap();
    }
}

fn start(s: &Setup, options: SourceOptions) -> Running {
    start_with(
        s.settings.clone(),
        s.spec.clone(),
        s.stream.clone(),
        options,
    )
}

fn start_with(
    settings: ConnectionSettings,
    spec: SourceSpec,
    stream: Arc<dyn RecordStream>,
    options: SourceOptions,
) -> Running {
    let source = PostgresSource::new("app", SYNC, settings, spec, stream, options);
    let (stop, stopped) = watch::channel(false);
    let task = {
        let source = source.clone();
        tokio::spawn(async move { source.run_until(stopped).await })
    };
    Running { source, stop, task }
}

/// A source on `pg`'s `postgres` database as the superuser, reading publication `p` through
/// slot `s` into a fresh stream.
async fn start_as_superuser(
    pg: &Cluster,
    options: SourceOptions,
) -> (Running, Arc<EmbeddedStream>, tempfile::TempDir) {
    let mut settings = ConnectionSettings::from_url(&pg.url("postgres")).unwrap();
    settings.password = Some(SecretString::from(pg.superuser_password().to_owned()));
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let spec = SourceSpec {
        publication: "p".into(),
        slot: "s".into(),
        failover: false,
    };
    let running = start_with(settings, spec, stream.clone(), options);
    (running, stream, dir)
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, secs: u64, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the source's check `name` is healthy.
async fn check_becomes_healthy(source: &PostgresSource, name: &str) {
    wait_until(&format!("{name} is healthy"), 30, async || {
        source
            .health()
            .await
            .checks
            .iter()
            .any(|c| c.name == name && c.status == Status::Healthy)
    })
    .await;
}

async fn get(stream: &EmbeddedStream, collection: &str, id: &str) -> Option<StreamEntry> {
    stream
        .get(&RecordKey::new(SYNC, collection, id))
        .await
        .unwrap()
}

/// `select id::text, n, body` from `table`, as the stream should hold it.
async fn source_rows(db: &str, table: &str) -> support::Rows {
    table_rows(&mut PG.admin(db).await.unwrap(), table).await
}

const TYPED: &str = "
create type mood as enum ('sad', 'ok', 'happy');
create table public.%T (
    id int primary key,
    flag boolean, small smallint, big bigint, real_ real, dbl double precision,
    amount numeric(30,10), label text, vc varchar(10), ch char(3), at timestamptz, local timestamp,
    day date, dur interval, doc jsonb, raw json, bin bytea, ints int[], words text[],
    grid int[][], feeling mood, feelings mood[], uid uuid, addr inet, ctl text, empty text
);";

const TYPED_ROW: &str = "(1, true, -3, 9007199254740993, 1.5, 'NaN', 12345678901234567890.0123456789,
  'quote '' and \"dq\" and ünïcode', 'abc', 'ab', '2024-05-01 12:00:00.5+02', '2024-05-01 12:00:00',
  '2024-05-01', '1 day 02:03:04', '{\"a\": [1, {\"b\": null}], \"t\": \"xy\"}', '{\"k\": 1, \"z\": \"a\\u0000b\"}', '\\x00ff10',
  '{1,NULL,3}', '{\"a b\",\"c,d\",NULL}', '{{1,2},{3,4}}', 'happy', '{sad,ok}',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '10.0.0.1',
  E'tab\\there\\nnew\\rcr\\\\bs\\bbf\\fff\\x0bvt\\x01one\\\\N', '')";

#[tokio::test]
async fn backfill_and_stream_map_every_type_identically_and_as_documented() {
    let schema = format!(
        "{}\n{}",
        TYPED.replace("%T", "before"),
        TYPED
            .replace("%T", "after")
            .replace("create type mood as enum ('sad', 'ok', 'happy');", "")
    );
    let s = setup("types", &schema).await;
    let row = TYPED_ROW;
    PG.execute(&s.db, &format!("insert into public.before values {row}"))
        .await
        .unwrap();
    let running = start(&s, options());
    wait_until("the backfill holds the row", 30, async || {
        get(&s.stream, "public.before", "1").await.is_some()
    })
    .await;
    PG.execute(&s.db, &format!("insert into public.after values {row}"))
        .await
        .unwrap();
    wait_until("the streamed row arrives", 30, async || {
        get(&s.stream, "public.after", "1").await.is_some()
    })
    .await;
    let backfilled = get(&s.stream, "public.before", "1").await.unwrap();
    let streamed = get(&s.stream, "public.after", "1").await.unwrap();
    let b = backfilled.record.change.payload().unwrap();
    let st = streamed.record.change.payload().unwrap();
    assert_eq!(
        b, st,
        "the backfill and the stream must agree on every value"
    );
    let expected = json!({
        "id": 1, "flag": true, "small": -3, "big": 9007199254740993i64, "real_": 1.5, "dbl": "NaN",
        "amount": "12345678901234567890.0123456789",
        "label": "quote ' and \"dq\" and ünïcode", "vc": "abc", "ch": "ab ",
        "at": "2024-05-01T10:00:00.5+00:00", "local": "2024-05-01T12:00:00",
        "day": "2024-05-01", "dur": "1 day 02:03:04",
        "doc": {"a": [1, {"b": null}], "t": "xy"}, "raw": {"k": 1, "z": "a\u{0}b"}, "bin": "\\x00ff10",
        "ints": [1, null, 3], "words": ["a b", "c,d", null], "grid": [[1, 2], [3, 4]],
        "feeling": "happy", "feelings": ["sad", "ok"],
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "addr": "10.0.0.1",
        "ctl": "tab\there\nnew\rcr\\bs\u{8}bf\u{c}ff\u{b}vt\u{1}one\\N", "empty": ""
    });
    assert_eq!(Value::Object(st.clone()), expected);
    // Streamed versions are (commit LSN, index); backfilled ones (LSN before the snapshot, 0).
    assert!(streamed.record.version.minor >= 1);
    assert_eq!(backfilled.record.version.minor, 0);
    running.stop().await;
}

#[tokio::test]
async fn a_backfill_racing_with_updates_ends_equal_to_the_source() {
    backfill_racing_with_updates(1).await;
}

/// The same race with four readers, each its own key range and watermark: changes that race
/// any reader's page win, whichever reader reconciles first.
#[tokio::test]
async fn a_parallel_backfill_racing_with_updates_ends_equal_to_the_source() {
    backfill_racing_with_updates(4).await;
}

async fn backfill_racing_with_updates(readers: usize) {
    let s = setup(
        &format!("race{readers}"),
        "create table public.items (id bigint primary key, n int not null, body text not null);
         insert into public.items select i, 0, 'row ' || i from generate_series(1, 100000) i;
         analyze public.items;",
    )
    .await;
    let running = start(
        &s,
        SourceOptions {
            backfill_page: 2000,
            backfill_readers: readers,
            ..options()
        },
    );
    // Updates, deletes and inserts while the backfill reads, each in its own transaction.
    let mut conn = PG.admin(&s.db).await.unwrap();
    for round in 1..=40 {
        let lo = (round * 2477) % 100_000;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "update public.items set n = n + 1, body = 'round {round}' where id between {lo} and {lo} + 300;
             delete from public.items where id % 997 = {round};
             insert into public.items values ({}, {round}, 'new') on conflict (id) do update set n = excluded.n;",
            100_000 + round
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let want = source_rows(&s.db, "public.items").await;
    // Generous: the whole suite runs in parallel on two cores.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let have = stream_rows(&live(&s.stream, "public.items").await);
        if have == want {
            break;
        }
        if Instant::now() > deadline {
            let mut diff = Vec::new();
            for (id, row) in &want {
                if have.get(id) != Some(row) {
                    let entry = get(&s.stream, "public.items", id).await;
                    diff.push(format!(
                        "{id}: source {row:?}, stream {:?} at {:?}",
                        have.get(id),
                        entry.map(|e| e.record.version)
                    ));
                }
            }
            let extra: Vec<&String> = have.keys().filter(|k| !want.contains_key(*k)).collect();
            panic!(
                "the stream differs from the source: {} rows differ, {} extra; first: {:?}; extra: {:?}",
                diff.len(),
                extra.len(),
                &diff[..diff.len().min(5)],
                &extra[..extra.len().min(5)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last pages' progress is counted once their appends return, a moment after the
    // stream holds them.
    wait_until("the backfill finishes", 60, async || {
        running.source.backfill_progress().done
    })
    .await;
    let progress = running.source.backfill_progress();
    // Rows deleted before the backfill reached them are never read.
    assert!(progress.total_rows >= 90_000, "{progress:?}");
    assert_eq!(progress.collections["public.items"].readers, readers);
    running.stop().await;
}

/// [`setup`] with `public.items` holding `rows` rows (`n` 0, `body` "row {id}").
async fn items(prefix: &str, rows: u32) -> Setup {
    setup(
        prefix,
        &format!(
            "create table public.items (id bigint primary key, n int not null, body text not null);
             insert into public.items select i, 0, 'row ' || i from generate_series(1, {rows}) i;"
        ),
    )
    .await
}

/// A backfill reads its next page while the page before it is appended. The stream's write
/// blocks the thread it runs on (as SQLite's does): while the first page's append is held,
/// the source sees the second page read (each page ends with its watermark message, counted
/// through a slot of the test's own), and not the third.
#[tokio::test]
async fn a_backfill_reads_its_next_page_while_the_one_before_is_appended() {
    let s = items("overlap", 500).await;
    let slot = format!("{}_count", s.db);
    PG.execute(
        &s.db,
        &format!("select pg_create_logical_replication_slot('{slot}', 'test_decoding')"),
    )
    .await
    .unwrap();
    let watched = Watched::new(s.stream.clone(), |_| None);
    watched.hold("public.items");
    let options = SourceOptions {
        backfill_page: 100,
        ..options()
    };
    let running = start_with(s.settings.clone(), s.spec.clone(), watched.clone(), options);
    wait_until("the first page's append begins", 60, async || {
        watched.held_since().is_some()
    })
    .await;
    let mut admin = PG.admin(&s.db).await.unwrap();
    let watermarks = format!(
        "select count(*) from pg_logical_slot_peek_changes('{slot}', null, null) \
         where data like 'message:%sluice_watermark%'"
    );
    wait_until(
        "the next page is read while the first is appended",
        20,
        async || {
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(watermarks.as_str()))
                .fetch_one(&mut admin)
                .await
                .unwrap()
                >= 2
        },
    )
    .await;
    // One page ahead, no more: the next read waits for this append.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pages_read: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(watermarks.as_str()))
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(pages_read, 2);
    assert!(watched.release(), "the append was let go by its time limit");
    let want = source_rows(&s.db, "public.items").await;
    wait_until("the stream equals the source", 60, async || {
        stream_rows(&live(&s.stream, "public.items").await) == want
    })
    .await;
    running.stop().await;
    PG.execute(&s.db, &format!("select pg_drop_replication_slot('{slot}')"))
        .await
        .unwrap();
}

/// Rows of kilobytes are read and appended in pieces of megabytes, not of `backfill_page` or
/// `batch_max` rows: 1,200 rows of 24 KB (stored uncompressed) backfilled with pages of up to
/// 5,000 rows, then one transaction of 1,000 more. After the first page (whose size comes
/// from the table's size on disk, at most 1,000 rows), a page holds what 4 MiB of text holds
/// (`PAGE_BYTES`: 174 rows), and the transaction is appended in pieces of 8 MiB of payloads
/// (`PENDING_BYTES`: 350 rows); rows read again by key (an update that left their TOAST
/// values out) are read in chunks of 4 MiB as well. Everything arrives as the source holds it.
#[tokio::test]
async fn wide_rows_are_read_and_appended_in_pieces_of_megabytes() {
    let s = setup(
        "wide",
        "create table public.wide (id int primary key, n int not null, body text not null);
         alter table public.wide alter column body set storage external;
         insert into public.wide select i, 0, repeat(md5(i::text), 750) from generate_series(1, 1200) i;",
    )
    .await;
    // Every record written holds a body of 24,000 characters.
    let watched = Watched::new(s.stream.clone(), |r| {
        let body = r.change.payload()?.get("body");
        (body.and_then(|b| b.as_str()).map(str::len) != Some(24_000))
            .then(|| format!("{} written without its body", r.key.upstream_id.0))
    });
    let options = SourceOptions {
        backfill_page: 5000,
        backfill_readers: 1,
        ..options()
    };
    let running = start_with(s.settings.clone(), s.spec.clone(), watched.clone(), options);
    wait_until("the backfill is complete", 120, async || {
        running.source.backfill_progress().done
    })
    .await;
    let pages = watched.appends();
    assert!(pages.len() >= 2 && pages[0] <= 1000, "{pages:?}");
    assert!(pages[1..].iter().all(|&rows| rows <= 175), "{pages:?}");
    assert_eq!(pages.iter().sum::<usize>(), 1200, "{pages:?}");
    PG.execute(
        &s.db,
        "insert into public.wide select i, 0, repeat(md5(i::text), 750) from generate_series(1201, 2200) i",
    )
    .await
    .unwrap();
    let equal_to_the_source = async || {
        let want = source_rows(&s.db, "public.wide").await;
        wait_until("the stream equals the source", 120, async || {
            stream_rows(&live(&s.stream, "public.wide").await) == want
        })
        .await;
    };
    equal_to_the_source().await;
    let pieces = watched.appends()[pages.len()..].to_vec();
    assert!(pieces.len() >= 3, "{pieces:?}");
    assert!(pieces.iter().all(|&rows| rows <= 350), "{pieces:?}");
    assert_eq!(pieces.iter().sum::<usize>(), 1000, "{pieces:?}");
    // Every row's body left out of an update (TOAST), with no earlier version in the stream to
    // take it from: the 2,200 rows are read again by key, in chunks of megabytes too.
    let before = watched.appends().len();
    watched
        .forget
        .lock()
        .unwrap()
        .extend((1..=2200).map(|id: u32| id.to_string()));
    PG.execute(&s.db, "update public.wide set n = 1")
        .await
        .unwrap();
    equal_to_the_source().await;
    // The first chunk of each reread is sized from the table's bytes on disk per row, which
    // the update's dead row versions halve (about 350 rows); the chunks after it, 174 rows.
    let chunks = watched.appends()[before..].to_vec();
    assert!(chunks.len() >= 8, "{chunks:?}");
    assert!(chunks.iter().all(|&rows| rows <= 400), "{chunks:?}");
    assert_eq!(chunks.iter().sum::<usize>(), 2200, "{chunks:?}");
    watched.forget.lock().unwrap().clear();
    assert_eq!(watched.bad(), Vec::<String>::new());
    running.stop().await;
}

/// A parallel backfill stopped part-way resumes every range after its last appended page,
/// even with fewer readers than ranges, and ends equal to the source. The table was never
/// analysed: its ranges are planned from its size on disk.
#[tokio::test]
async fn a_parallel_backfill_resumes_each_range_where_it_stopped() {
    let s = items("resume", 30_000).await;
    let parallel = |readers| SourceOptions {
        backfill_page: 250,
        backfill_readers: readers,
        ..options()
    };
    let running = start(&s, parallel(4));
    wait_until("a few pages of every range are in", 60, async || {
        running.source.backfill_progress().total_rows >= 4_000
    })
    .await;
    running.stop().await;
    let progress = live(&s.stream, "public.items").await.len() as u64;
    assert!(
        progress < 30_000,
        "stopped too late to test resuming: {progress}"
    );
    let before = s.stream.head().await.unwrap();
    let running = start(&s, parallel(2));
    let want = source_rows(&s.db, "public.items").await;
    wait_until("the stream equals the source", 120, async || {
        stream_rows(&live(&s.stream, "public.items").await) == want
    })
    .await;
    wait_until("the backfill finishes", 60, async || {
        running.source.backfill_progress().done
    })
    .await;
    // Only what the first run had not appended was read again (a page per range at most
    // twice: the one being appended when it stopped).
    let appended = s.stream.head().await.unwrap().0 - before.0;
    assert!(
        appended <= 30_000 - progress + 4 * 250,
        "the second run appended {appended} records after {progress} were in"
    );
    running.stop().await;
}

/// A table added to the publication while the source runs is read without a restart: the
/// rows it already had (backfilled), and its changes from then on, racing with that backfill.
#[tokio::test]
async fn a_table_added_to_the_publication_is_backfilled_without_a_restart() {
    let s = setup(
        "added",
        "create table public.first (id bigint primary key, n int not null, body text not null);
         insert into public.first values (1, 1, 'one');",
    )
    .await;
    // A publication that names its tables, instead of the setup's `for all tables`.
    PG.execute(
        &s.db,
        &format!(
            "drop publication {pub_}; create publication {pub_} for table public.first;",
            pub_ = s.spec.publication
        ),
    )
    .await
    .unwrap();
    let running = start(&s, options());
    wait_until("the first table is backfilled", 30, async || {
        running.source.backfill_progress().done
            && get(&s.stream, "public.first", "1").await.is_some()
    })
    .await;

    let user = format!("{}_repl", s.db);
    PG.execute(
        &s.db,
        &format!(
            "create table public.later (id bigint primary key, n int not null, body text not null);
             insert into public.later select i, 0, 'before ' || i from generate_series(1, 5000) i;
             grant select on public.later to {user};"
        ),
    )
    .await
    .unwrap();
    // On its own: rows written in the same transaction as the ALTER would be streamed.
    PG.execute(
        &s.db,
        &format!(
            "alter publication {} add table public.later",
            s.spec.publication
        ),
    )
    .await
    .unwrap();
    // Changes while its rows are being read.
    let mut conn = PG.admin(&s.db).await.unwrap();
    for round in 1..=10 {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "update public.later set n = {round}, body = 'round {round}' where id % 100 = {round};
             delete from public.later where id = {};
             insert into public.later values ({}, {round}, 'after');",
            round * 400,
            5000 + round
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let want = source_rows(&s.db, "public.later").await;
    wait_until("the added table equals the source", 60, async || {
        stream_rows(&live(&s.stream, "public.later").await) == want
    })
    .await;
    let progress = running.source.backfill_progress();
    assert!(progress.done, "{progress:?}");
    running.stop().await;
}

#[tokio::test]
async fn composite_enum_and_text_keys_page_and_delete_by_the_same_id() {
    let s = setup(
        "keys",
        "create type tier as enum ('gold', 'silver', 'bronze');
         create table public.scores (t tier, name text, n int, v text, primary key (t, name, n));
         insert into public.scores select (array['bronze','gold','silver'])[1 + i % 3]::tier,
                'nàme ' || (i % 7) || ' \"q\"', i, 'v' from generate_series(1, 500) i;",
    )
    .await;
    let running = start(
        &s,
        SourceOptions {
            backfill_page: 7,
            // Three readers split the composite key at sampled keys: the ranges' bounds are
            // row comparisons on (enum, text, int) like the pages'.
            backfill_readers: 3,
            ..options()
        },
    );
    wait_until("the backfill is complete", 60, async || {
        running.source.backfill_progress().done
    })
    .await;
    assert_eq!(
        running.source.backfill_progress().collections["public.scores"].readers,
        3
    );
    assert_eq!(live(&s.stream, "public.scores").await.len(), 500);
    // i = 3: tier index 1 + 3 % 3 = 1 → bronze.
    let key = serde_json::to_string(&["bronze", "nàme 3 \"q\"", "3"]).unwrap();
    assert!(
        get(&s.stream, "public.scores", &key).await.is_some(),
        "{key}"
    );
    PG.execute(&s.db, "delete from public.scores where n = 3")
        .await
        .unwrap();
    wait_until("the delete arrives as a tombstone", 30, async || {
        get(&s.stream, "public.scores", &key)
            .await
            .is_some_and(|e| e.record.is_tombstone())
    })
    .await;
    assert_eq!(live(&s.stream, "public.scores").await.len(), 499);
    running.stop().await;
}

#[tokio::test]
async fn unchanged_toast_values_are_filled_truncate_tombstones_and_new_columns_appear() {
    let s = setup(
        "toast",
        "create table public.docs (id int primary key, title text, body text);
         alter table public.docs alter column body set storage external;
         create table public.other (id int primary key);",
    )
    .await;
    let running = start(&s, options());
    // 100 KB that does not compress, stored out of line.
    PG.execute(
        &s.db,
        "insert into public.docs select 1, 'first', string_agg(md5(i::text), '') from generate_series(1, 3200) i;
         insert into public.other values (1), (2);",
    )
    .await
    .unwrap();
    wait_until("the insert arrives", 30, async || {
        get(&s.stream, "public.docs", "1").await.is_some()
    })
    .await;
    let body = get(&s.stream, "public.docs", "1")
        .await
        .unwrap()
        .record
        .change
        .payload()
        .unwrap()["body"]
        .clone();
    assert_eq!(body.as_str().unwrap().len(), 3200 * 32);
    PG.execute(
        &s.db,
        "update public.docs set title = 'second' where id = 1",
    )
    .await
    .unwrap();
    wait_until("the update arrives", 30, async || {
        get(&s.stream, "public.docs", "1")
            .await
            .is_some_and(|e| e.record.change.payload().unwrap()["title"] == "second")
    })
    .await;
    let after = get(&s.stream, "public.docs", "1").await.unwrap();
    assert_eq!(
        after.record.change.payload().unwrap()["body"],
        body,
        "the unchanged TOAST value comes from the previous version, never a placeholder"
    );

    // A new column shows up in payloads without a restart.
    PG.execute(
        &s.db,
        "alter table public.docs add column tags text[];
         insert into public.docs values (2, 'tagged', 'short', '{a,b}');",
    )
    .await
    .unwrap();
    wait_until("the row with the new column arrives", 30, async || {
        get(&s.stream, "public.docs", "2").await.is_some()
    })
    .await;
    assert_eq!(
        get(&s.stream, "public.docs", "2")
            .await
            .unwrap()
            .record
            .change
            .payload()
            .unwrap()["tags"],
        json!(["a", "b"])
    );

    // TRUNCATE tombstones the collection's records; a row inserted after it in the same
    // transaction survives; other collections are untouched; the stream keeps flowing.
    PG.execute(
        &s.db,
        "begin; truncate public.docs; insert into public.docs values (3, 'after', 'x', null); commit;
         insert into public.other values (3);",
    )
    .await
    .unwrap();
    wait_until("the truncate and the next change arrive", 30, async || {
        get(&s.stream, "public.other", "3").await.is_some()
    })
    .await;
    let docs = live(&s.stream, "public.docs").await;
    assert_eq!(docs.keys().collect::<Vec<_>>(), vec!["3"]);
    assert!(
        get(&s.stream, "public.docs", "1")
            .await
            .unwrap()
            .record
            .is_tombstone()
    );
    assert_eq!(live(&s.stream, "public.other").await.len(), 3);
    running.stop().await;
}

/// Caught up, each committed transaction is appended at once: never held for `batch_wait`
/// (set to a minute here) when nothing more is queued behind it.
#[tokio::test]
async fn a_committed_transaction_is_appended_without_waiting_for_more() {
    let s = setup(
        "atonce",
        "create table public.items (id bigint primary key, n int not null, body text not null);",
    )
    .await;
    let running = start(
        &s,
        SourceOptions {
            batch_wait: Duration::from_secs(60),
            ..options()
        },
    );
    check_becomes_healthy(&running.source, "replication").await;
    for id in 1..=3 {
        let committed = Instant::now();
        PG.execute(
            &s.db,
            &format!("insert into public.items values ({id}, 1, 'x')"),
        )
        .await
        .unwrap();
        wait_until("the row is in the stream", 30, async || {
            get(&s.stream, "public.items", &id.to_string())
                .await
                .is_some()
        })
        .await;
        assert!(
            committed.elapsed() < Duration::from_secs(20),
            "row {id} waited {:?} for batch_wait",
            committed.elapsed()
        );
    }
    running.stop().await;
}

#[tokio::test]
async fn the_slot_is_confirmed_after_the_stream_commits_and_health_reports_it() {
    let s = setup(
        "confirm",
        "create table public.items (id bigint primary key, n int not null, body text not null);",
    )
    .await;
    let running = start(&s, options());
    check_becomes_healthy(&running.source, "replication").await;
    PG.execute(
        &s.db,
        "insert into public.items select i, 1, 'x' from generate_series(1, 1000) i",
    )
    .await
    .unwrap();
    let written: String = {
        let mut conn = PG.admin(&s.db).await.unwrap();
        sqlx::query_scalar("select pg_current_wal_lsn()::text")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    let written: sluice_source_pg::Lsn = written.parse().unwrap();
    let confirmed = async || -> sluice_source_pg::Lsn {
        let mut conn = PG.admin(&s.db).await.unwrap();
        let text: Option<String> = sqlx::query_scalar(
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = $1",
        )
        .bind(&s.spec.slot)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        text.unwrap().parse().unwrap()
    };
    wait_until("the slot is confirmed past the insert", 30, async || {
        confirmed().await >= written
    })
    .await;
    // Everything the slot no longer holds is in the stream.
    assert_eq!(live(&s.stream, "public.items").await.len(), 1000);

    // Health: streaming, the backfill done, the slot active with little lag, a recent heartbeat.
    check_becomes_healthy(&running.source, "heartbeat").await;
    let report = running.source.health().await;
    assert_eq!(report.status, Status::Healthy, "{report:?}");
    let slot = report.checks.iter().find(|c| c.name == "slot").unwrap();
    assert!(slot.message.contains("is active"), "{}", slot.message);
    running.stop().await;
}

#[tokio::test]
async fn a_source_restarted_mid_stream_loses_nothing() {
    let pg = Cluster::options().source().start().unwrap();
    let db = pg.fresh_database("restart").await.unwrap();
    pg.execute(
        &db,
        "create table public.items (id bigint primary key, n int not null, body text not null);
         create publication p for all tables;",
    )
    .await
    .unwrap();
    let mut settings = ConnectionSettings::from_url(&pg.url_as(
        "postgres",
        Some(pg.superuser_password()),
        &db,
        None,
    ))
    .unwrap();
    settings.password = Some(SecretString::from(pg.superuser_password().to_owned()));
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let s = Setup {
        db: db.clone(),
        dir,
        stream,
        settings,
        spec: SourceSpec {
            publication: "p".into(),
            slot: "s".into(),
            failover: false,
        },
    };
    let running = start(&s, options());
    let write = async |from: i64, to: i64| {
        let mut conn = pg.admin(&db).await.unwrap();
        for i in (from..to).step_by(100) {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "insert into public.items select g, 1, 'b' from generate_series({i}, {}) g;
                 update public.items set n = n + 1 where id % 10 = 0 and id < {i};",
                i + 99
            )))
            .execute(&mut conn)
            .await
            .unwrap();
        }
    };
    write(0, 3000).await;
    pg.stop().unwrap();
    // While the source is down, health says so.
    wait_until("health shows the source is unreachable", 30, async || {
        running.source.health().await.status != Status::Healthy
    })
    .await;
    pg.start().unwrap();
    write(3000, 6000).await;
    let want = table_rows(&mut pg.admin(&db).await.unwrap(), "public.items").await;
    wait_until(
        "the stream equals the source after the restart",
        120,
        async || stream_rows(&live(&s.stream, "public.items").await) == want,
    )
    .await;
    check_becomes_healthy(&running.source, "replication").await;
    running.stop().await;
}

/// Run in a child process by `sluice_killed_between_stream_commit_and_slot_confirm_replays_exactly`.
#[tokio::test]
async fn child_runs_a_source() {
    let (Some(dir), Ok(url), Ok(db)) = (
        std::env::var_os("SLUICE_SOURCE_CHILD_DIR"),
        std::env::var("SLUICE_SOURCE_CHILD_URL"),
        std::env::var("SLUICE_SOURCE_CHILD_DB"),
    ) else {
        return; // only meaningful as the child of the test below
    };
    let mut settings = ConnectionSettings::from_url(&url).unwrap();
    settings.password = Some(SecretString::from("pw".to_owned()));
    let stream = Arc::new(EmbeddedStream::open(dir).await.unwrap());
    let source = PostgresSource::new(
        "app",
        SYNC,
        settings,
        SourceSpec {
            publication: format!("{db}_pub"),
            slot: format!("{db}_slot"),
            failover: false,
        },
        stream,
        SourceOptions {
            batch_max: 500,
            ..options()
        },
    );
    let (_stop, stopped) = watch::channel(false);
    source.run_until(stopped).await;
}

#[tokio::test]
async fn sluice_killed_between_stream_commit_and_slot_confirm_replays_exactly() {
    let s = setup(
        "killed",
        "create table public.items (id bigint primary key, n int not null, body text not null);",
    )
    .await;
    let url = PG.url_as(&format!("{}_repl", s.db), Some("pw"), &s.db, None);
    let child = || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_runs_a_source",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SLUICE_SOURCE_CHILD_DIR", s.dir.path())
            .env("SLUICE_SOURCE_CHILD_URL", &url)
            .env("SLUICE_SOURCE_CHILD_DB", &s.db)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = child();
    // A steady flow of small transactions; kill the child while it is appending.
    let writer = {
        let db = s.db.clone();
        tokio::spawn(async move {
            let mut conn = PG.admin(&db).await.unwrap();
            for i in 0..300i64 {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "insert into public.items select g, 1, 'b' from generate_series({}, {}) g;
                     update public.items set n = n + 1 where id % 7 = {};",
                    i * 50,
                    i * 50 + 49,
                    i % 7
                )))
                .execute(&mut conn)
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    wait_until("the child has appended some changes", 60, async || {
        s.stream.head().await.unwrap().0 > 3000
    })
    .await;
    first.kill().unwrap(); // SIGKILL: between an append and its confirm, or in the middle of one
    first.wait().unwrap();
    let at_kill = s.stream.head().await.unwrap();
    writer.await.unwrap();
    let mut second = child();
    let want = source_rows(&s.db, "public.items").await;
    wait_until(
        "the stream equals the source after the restart",
        120,
        async || stream_rows(&live(&s.stream, "public.items").await) == want,
    )
    .await;
    second.kill().unwrap();
    second.wait().unwrap();
    // Each record appears once, at the source's newest version: versions never went backwards.
    let entries = s.stream.live_records().await.unwrap();
    assert_eq!(entries.len(), want.len());
    assert!(at_kill.0 > 0);
}

#[tokio::test]
async fn a_wrong_password_is_a_configuration_error_naming_the_user_and_never_the_password() {
    let s = setup(
        "badpw",
        "create table public.items (id bigint primary key);",
    )
    .await;
    let mut settings = s.settings.clone();
    settings.password = Some(SecretString::from("not-the-password-canary".to_owned()));
    let running = start_with(settings, s.spec.clone(), s.stream.clone(), options());
    let source = &running.source;
    wait_until("health reports the failure", 30, async || {
        source.health().await.status == Status::Error
    })
    .await;
    let report = source.health().await;
    let check = report
        .checks
        .iter()
        .find(|c| c.name == "replication")
        .unwrap();
    assert!(
        check.message.contains(&format!("{}_repl", s.db)),
        "{}",
        check.message
    );
    let rendered = format!("{report:?}");
    assert!(!rendered.contains("canary"), "{rendered}");
    running.stop().await;
}

#[tokio::test]
async fn the_replication_connection_follows_sslmode_like_every_other_connection() {
    let pg = Cluster::options()
        .source()
        .tls(sluice_localpg::Tls::Required)
        .setting("listen_addresses", "'127.0.0.1,127.0.0.2'")
        .hba_line("hostssl all all 127.0.0.2/32 scram-sha-256")
        .start()
        .unwrap();
    pg.execute(
        "postgres",
        "create table public.items (id int primary key); create publication p for all tables;
         insert into public.items values (1);",
    )
    .await
    .unwrap();
    let settings = |host: &str, mode: sluice_core::SslMode| {
        let mut s = ConnectionSettings::new(host, pg.port(), "postgres", "postgres");
        s.password = Some(SecretString::from(pg.superuser_password().to_owned()));
        s.ssl_mode = mode;
        s.root_cert = pg.ca_cert();
        s.connect_timeout = Duration::from_secs(5);
        s
    };
    let run = async |settings: ConnectionSettings, slot: &str| {
        let dir = tempfile::tempdir().unwrap();
        let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
        let running = start_with(
            settings,
            SourceSpec {
                publication: "p".into(),
                slot: slot.into(),
                failover: false,
            },
            stream,
            options(),
        );
        let source = &running.source;
        let deadline = Instant::now() + Duration::from_secs(30);
        let outcome = loop {
            let report = source.health().await;
            let replication = report
                .checks
                .iter()
                .find(|c| c.name == "replication")
                .cloned();
            match replication {
                Some(c) if c.status == Status::Healthy => break Ok(()),
                Some(c) if c.status >= Status::Warning => break Err(c.message),
                _ => {}
            }
            assert!(Instant::now() < deadline, "no outcome: {report:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        running.stop().await;
        outcome
    };
    use sluice_core::SslMode::*;
    run(settings("127.0.0.1", VerifyFull), "full")
        .await
        .unwrap();
    // The walsender's connection really is encrypted.
    let encrypted: bool = {
        let mut conn = pg.admin("postgres").await.unwrap();
        sqlx::query_scalar(
            "select bool_and(s.ssl) from pg_stat_ssl s join pg_stat_activity a using (pid) where a.backend_type = 'walsender'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap_or(true)
    };
    assert!(encrypted);
    // 127.0.0.2 is not a name in the certificate: verify-ca accepts it, verify-full refuses.
    run(settings("127.0.0.2", VerifyCa), "ca").await.unwrap();
    let err = run(settings("127.0.0.2", VerifyFull), "full2")
        .await
        .unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
    // The server requires TLS: a plain connection is refused, and the message says why.
    let err = run(settings("127.0.0.1", Disable), "plain")
        .await
        .unwrap_err();
    assert!(err.contains("requires TLS"), "{err}");
}

/// A transaction whose commit record is in the WAL (so the change stream sees it) but which is
/// not yet visible to other sessions (it waits for a synchronous standby that never answers)
/// while the backfill reads its row: the stream's newer state must win over the page.
#[tokio::test]
async fn a_change_committed_but_not_yet_visible_during_a_page_still_wins() {
    let pg = Cluster::options().source().start().unwrap();
    let limit = Duration::from_secs(20);
    let sql = async |statement: &str| {
        let mut conn = pg.admin("postgres").await.unwrap();
        tokio::time::timeout(
            limit,
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_owned())).execute(&mut conn),
        )
        .await
        .expect("no hang")
        .unwrap();
    };
    sql("create table public.items (id bigint primary key, n int not null, body text not null)")
        .await;
    sql("insert into public.items select i, 0, 'b' from generate_series(1, 50) i").await;
    sql("create publication p for all tables").await;
    sql("select pg_create_logical_replication_slot('s', 'pgoutput')").await;
    // From now on a commit waits for a standby that does not exist (unless it is local).
    sql("alter system set synchronous_standby_names = 'ghost'").await;
    sql("select pg_reload_conf()").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut admin = pg.admin("postgres").await.unwrap();
    sqlx::raw_sql("set synchronous_commit = local")
        .execute(&mut admin)
        .await
        .unwrap();
    // The hanging commit: written to the WAL, invisible until its wait is cancelled.
    let mut writer = pg.admin("postgres").await.unwrap();
    let pid: i32 = sqlx::query_scalar("select pg_backend_pid()")
        .fetch_one(&mut writer)
        .await
        .unwrap();
    let hanging = tokio::spawn(async move {
        sqlx::raw_sql("update public.items set n = 999 where id = 5")
            .execute(&mut writer)
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "select exists (select 1 from pg_stat_activity where pid = $1 and wait_event = 'SyncRep')",
        )
        .bind(pid)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if waiting {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the update never waited for the standby"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (running, stream, _dir) = start_as_superuser(&pg, options()).await;
    // The backfill reads row 5 as it was (n = 0): the update is not visible to it.
    wait_until("the backfill is complete", 30, async || {
        running.source.backfill_progress().done
    })
    .await;
    let row = get(&stream, "public.items", "5").await.unwrap();
    assert_eq!(
        row.record.change.payload().unwrap()["n"],
        999,
        "the page must not overwrite the change the stream already holds: {row:?}"
    );
    // Let the transaction finish; source and stream agree.
    sqlx::query("select pg_cancel_backend($1)")
        .bind(pid)
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = hanging.await;
    let n: i32 = sqlx::query_scalar("select n from public.items where id = 5")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(n, 999);
    assert_eq!(live(&stream, "public.items").await.len(), 50);
    running.stop().await;
}

/// The real stream, watched: every record appended is checked by `check` (a failure is kept,
/// not panicked, so the source keeps running and the test reports it), and `get` can be made
/// to not find a key, as if the stream had never held its earlier versions.
/// What a watched stream checks each appended record with: `Some(problem)` flags it.
type RecordCheck = Box<dyn Fn(&sluice_core::Record) -> Option<String> + Send + Sync>;

struct Watched {
    inner: Arc<EmbeddedStream>,
    check: RecordCheck,
    bad: std::sync::Mutex<Vec<String>>,
    forget: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Appends holding a record of this collection are refused for good (`GiveUp`).
    refuse: std::sync::Mutex<Option<String>>,
    refused: std::sync::atomic::AtomicUsize,
    /// See [`Watched::hold`].
    hold: std::sync::Mutex<Hold>,
    hold_changed: std::sync::Condvar,
    /// How many records each append held, in order.
    appends: std::sync::Mutex<Vec<usize>>,
}

/// The first append holding a record of `collection` blocks the thread it runs on until
/// released (30 s at most), as a write to the stream's file does.
#[derive(Default)]
struct Hold {
    collection: Option<String>,
    /// When that append began.
    entered: Option<time::OffsetDateTime>,
    released: bool,
    /// It was released by the test, not by the time limit.
    released_in_time: bool,
}

impl Watched {
    fn new(
        inner: Arc<EmbeddedStream>,
        check: impl Fn(&sluice_core::Record) -> Option<String> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner,
            check: Box::new(check),
            bad: Default::default(),
            forget: Default::default(),
            refuse: Default::default(),
            refused: Default::default(),
            hold: Default::default(),
            hold_changed: Default::default(),
            appends: Default::default(),
        })
    }

    /// How many records each append held, in order.
    fn appends(&self) -> Vec<usize> {
        self.appends.lock().unwrap().clone()
    }

    /// Holds the first append of a record of `collection` (see [`Hold`]).
    fn hold(&self, collection: &str) {
        self.hold.lock().unwrap().collection = Some(collection.to_owned());
    }

    /// When the held append began, once it has.
    fn held_since(&self) -> Option<time::OffsetDateTime> {
        self.hold.lock().unwrap().entered
    }

    /// Lets the held append go on; whether it was still held.
    fn release(&self) -> bool {
        let mut hold = self.hold.lock().unwrap();
        hold.released_in_time = !hold.released;
        hold.released = true;
        self.hold_changed.notify_all();
        hold.released_in_time
    }

    /// Refuses, for good, every append holding a record of `collection`.
    fn refuse(&self, collection: &str) {
        *self.refuse.lock().unwrap() = Some(collection.to_owned());
    }

    fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn bad(&self) -> Vec<String> {
        self.bad.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl RecordStream for Watched {
    async fn append_with_state(
        &self,
        records: Vec<sluice_core::Record>,
        state: Option<sluice_core::SourceState>,
    ) -> sluice_core::Result<sluice_core::AppendOutcome> {
        for r in &records {
            if let Some(problem) = (self.check)(r) {
                self.bad.lock().unwrap().push(problem);
            }
        }
        {
            let mut hold = self.hold.lock().unwrap();
            let holds = |c: &String| records.iter().any(|r| r.key.collection_id.0 == *c);
            if hold.entered.is_none() && hold.collection.as_ref().is_some_and(holds) {
                hold.entered = Some(time::OffsetDateTime::now_utc());
                let (mut hold, _) = self
                    .hold_changed
                    .wait_timeout_while(hold, Duration::from_secs(30), |h| !h.released)
                    .unwrap();
                hold.released = true;
            }
        }
        self.appends.lock().unwrap().push(records.len());
        let refuse = self.refuse.lock().unwrap().clone();
        if let Some(collection) = refuse
            && records.iter().any(|r| r.key.collection_id.0 == collection)
        {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(sluice_core::Error::invalid(format!(
                "the stream refuses records of {collection}"
            )));
        }
        self.inner.append_with_state(records, state).await
    }
    async fn source_state(&self, owner: &str) -> sluice_core::Result<Option<Value>> {
        self.inner.source_state(owner).await
    }
    async fn set_collection_schema(
        &self,
        sync_id: SyncId,
        collection: &sluice_core::CollectionId,
        schema: &sluice_core::CollectionSchema,
    ) -> sluice_core::Result<()> {
        self.inner
            .set_collection_schema(sync_id, collection, schema)
            .await
    }
    async fn collection_schema(
        &self,
        sync_id: SyncId,
        collection: &sluice_core::CollectionId,
    ) -> sluice_core::Result<Option<sluice_core::CollectionSchema>> {
        self.inner.collection_schema(sync_id, collection).await
    }
    async fn tombstone_collection(
        &self,
        sync_id: SyncId,
        collection: &sluice_core::CollectionId,
        version: sluice_core::Version,
        at: time::OffsetDateTime,
    ) -> sluice_core::Result<u64> {
        self.inner
            .tombstone_collection(sync_id, collection, version, at)
            .await
    }
    async fn read(
        &self,
        filter: &sluice_core::RecordFilter,
        after: sluice_core::Seq,
        limit: usize,
    ) -> sluice_core::Result<sluice_core::StreamRead> {
        self.inner.read(filter, after, limit).await
    }
    async fn lag(
        &self,
        filter: &sluice_core::RecordFilter,
        after: sluice_core::Seq,
        cap: u64,
    ) -> sluice_core::Result<sluice_core::Lag> {
        self.inner.lag(filter, after, cap).await
    }
    async fn get(&self, key: &RecordKey) -> sluice_core::Result<Option<StreamEntry>> {
        if self.forget.lock().unwrap().contains(&key.upstream_id.0) {
            return Ok(None);
        }
        self.inner.get(key).await
    }
    async fn head(&self) -> sluice_core::Result<sluice_core::Seq> {
        self.inner.head().await
    }
    async fn wait_past(&self, seq: sluice_core::Seq) {
        self.inner.wait_past(seq).await
    }
    async fn acknowledge(
        &self,
        consumer: &sluice_core::ConsumerId,
        filter: &sluice_core::RecordFilter,
        through: sluice_core::Seq,
    ) -> sluice_core::Result<()> {
        self.inner.acknowledge(consumer, filter, through).await
    }
    async fn forget(&self, consumer: &sluice_core::ConsumerId) -> sluice_core::Result<()> {
        self.inner.forget(consumer).await
    }
    fn set_backfilling(&self, sync_id: SyncId, provider: sluice_core::Provider, on: bool) {
        self.inner.set_backfilling(sync_id, provider, on)
    }
    fn backfilling(&self, filter: &sluice_core::RecordFilter) -> bool {
        self.inner.backfilling(filter)
    }
    fn backfills_begun(&self, filter: &sluice_core::RecordFilter) -> u64 {
        self.inner.backfills_begun(filter)
    }
}

/// 3,200 bytes that PostgreSQL stores out of line (the column is `storage external`).
const BODY_SQL: &str = "(select string_agg(md5(i::text), '') from generate_series(1, 100) i)";

/// A watched stream that flags any upsert of `collection` whose `body` is not `body`.
fn body_kept(s: &Setup, collection: &'static str, body: String) -> Arc<Watched> {
    Watched::new(s.stream.clone(), move |r| {
        let payload = r.change.payload()?;
        (r.key.collection_id.0 == collection && payload.get("body") != Some(&json!(body))).then(
            || {
                format!(
                    "{} written with body {:?}",
                    r.key.upstream_id.0,
                    payload
                        .get("body")
                        .map(|b| b.to_string().chars().take(40).collect::<String>())
                )
            },
        )
    })
}

async fn body_text(db: &str) -> String {
    let mut conn = PG.admin(db).await.unwrap();
    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("select {BODY_SQL}")))
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Waits until the stream's live `public.moves` rows are exactly `expected` (id → n), each
/// with the full body.
async fn moves_become(s: &Setup, expected: &[(&str, i64)], body: &str) {
    let want: BTreeMap<String, (i64, String)> = expected
        .iter()
        .map(|(id, n)| (id.to_string(), (*n, body.to_owned())))
        .collect();
    wait_until(&format!("public.moves is {expected:?}"), 30, async || {
        let rows = live(&s.stream, "public.moves").await;
        rows.values().all(|p| p.get("body").is_some()) && stream_rows(&rows) == want
    })
    .await;
}

#[tokio::test]
async fn an_unchanged_toast_value_survives_key_changes_keeping_up_lagging_and_forgotten() {
    let s = setup(
        "moves",
        "create sequence public.move_ids start 1000;
         create table public.moves (id int primary key, n int, body text);
         alter table public.moves alter column body set storage external;",
    )
    .await;
    let body = body_text(&s.db).await;
    let watched = body_kept(&s, "public.moves", body.clone());
    let sql = |q: &str| q.replace("BODY", BODY_SQL);

    // Keeping up: each single-statement change is streamed as it commits.
    let running = start_with(
        s.settings.clone(),
        s.spec.clone(),
        watched.clone(),
        options(),
    );
    check_becomes_healthy(&running.source, "replication").await;
    for (step, expected) in [
        (
            "insert into public.moves values (1, 0, BODY)",
            vec![("1", 0)],
        ),
        (
            "update public.moves set id = nextval('public.move_ids') where id = 1",
            vec![("1000", 0)],
        ),
        (
            "update public.moves set n = n + 1 where id = 1000",
            vec![("1000", 1)],
        ),
        (
            "update public.moves set id = nextval('public.move_ids'), n = 2 where id = 1000",
            vec![("1001", 2)],
        ),
        ("delete from public.moves where id = 1001", vec![]),
    ] {
        PG.execute(&s.db, &sql(step)).await.unwrap();
        moves_become(&s, &expected, &body).await;
    }

    // Lagging: the same history while sluice is stopped, replayed from the slot at once;
    // the row is gone from the source by the time its key changes are read.
    running.stop().await;
    for step in [
        "insert into public.moves values (2, 0, BODY), (3, 0, BODY)",
        "update public.moves set id = nextval('public.move_ids') where id = 2",
        "update public.moves set n = n + 1 where id = 1002",
        "update public.moves set id = nextval('public.move_ids') where id = 1002",
        "update public.moves set id = nextval('public.move_ids') where id = 3",
        "update public.moves set n = 5 where id = 1004",
        "delete from public.moves where id = 1004",
    ] {
        PG.execute(&s.db, &sql(step)).await.unwrap();
    }
    let running = start_with(
        s.settings.clone(),
        s.spec.clone(),
        watched.clone(),
        options(),
    );
    moves_become(&s, &[("1003", 1)], &body).await;

    // Forgotten: the stream does not hold the row's earlier version (as for a row the
    // backfill has not reached yet). The row is read again consistently, never written
    // without its body, and the slot is not confirmed past the change until then.
    PG.execute(&s.db, &sql("insert into public.moves values (7, 0, BODY)"))
        .await
        .unwrap();
    moves_become(&s, &[("1003", 1), ("7", 0)], &body).await;
    watched.forget.lock().unwrap().insert("7".into());
    PG.execute(&s.db, "update public.moves set n = 8 where id = 7")
        .await
        .unwrap();
    moves_become(&s, &[("1003", 1), ("7", 8)], &body).await;
    watched.forget.lock().unwrap().clear();

    assert_eq!(
        watched.bad(),
        Vec::<String>::new(),
        "no row version without its TOAST value"
    );
    running.stop().await;
}

fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

#[tokio::test]
async fn a_table_that_cannot_be_read_fails_alone_and_is_read_once_granted() {
    let s = setup(
        "nogrant",
        "create table public.open (id int primary key, v text);",
    )
    .await;
    // Created after the setup's grant: the replication role may not read it.
    PG.execute(
        &s.db,
        &format!(
            "create table public.closed (id int primary key, n int, body text);
             alter table public.closed alter column body set storage external;
             insert into public.closed values (1, 0, {BODY_SQL});"
        ),
    )
    .await
    .unwrap();
    let body = body_text(&s.db).await;
    let watched = body_kept(&s, "public.closed", body.clone());
    let running = start_with(
        s.settings.clone(),
        s.spec.clone(),
        watched.clone(),
        options(),
    );

    // Only that table is in error, with the grant that fixes it.
    wait_until("the closed table is reported", 30, async || {
        running.source.health().await.checks.iter().any(|c| {
            c.name == "tables"
                && c.status == Status::Error
                && c.message.contains("public.closed")
                && c.fix
                    .as_deref()
                    .is_some_and(|f| f.contains(r#"grant select on table "public"."closed" to"#))
        })
    })
    .await;
    // Every other table streams, and the slot keeps being confirmed.
    PG.execute(&s.db, "insert into public.open values (1, 'a'), (2, 'b')")
        .await
        .unwrap();
    // A change to the closed table whose TOAST value no earlier version holds.
    PG.execute(&s.db, "update public.closed set n = 1 where id = 1")
        .await
        .unwrap();
    let mut conn = PG.admin(&s.db).await.unwrap();
    let written: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    wait_until("the open table streams", 30, async || {
        live(&s.stream, "public.open").await.len() == 2
    })
    .await;
    wait_until("the slot is confirmed past the changes", 30, async || {
        lsn(&running.source.confirmed()) >= lsn(&written)
    })
    .await;
    let report = running.source.health().await;
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name == "replication" && c.status == Status::Healthy),
        "{report:?}"
    );

    // Once granted, the table is read without a restart, whole and exact.
    PG.execute(
        &s.db,
        &format!("grant select on public.closed to {}_repl", s.db),
    )
    .await
    .unwrap();
    wait_until("the closed table is read", 30, async || {
        let rows = live(&s.stream, "public.closed").await;
        rows.get("1")
            .is_some_and(|p| p["n"] == 1 && p["body"] == json!(body))
    })
    .await;
    check_becomes_healthy(&running.source, "tables").await;
    assert_eq!(watched.bad(), Vec::<String>::new());
    running.stop().await;
}

/// Before the source has connected, a slot it will create itself (`create_missing = true`) is
/// not an error: health says it is being set up, and offers no fix (the demo's first status
/// line once alerted "slot … does not exist: set create_missing = true", which it was). Without
/// `create_missing` the missing slot is an error with its fix.
#[tokio::test]
async fn a_slot_the_source_will_create_is_initializing_not_an_error() {
    let s = setup(
        "slot_to_come",
        "create table public.t (id int primary key);",
    )
    .await;
    for create_missing in [true, false] {
        let source = PostgresSource::new(
            "app",
            SYNC,
            s.settings.clone(),
            s.spec.clone(),
            s.stream.clone(),
            SourceOptions {
                create_missing,
                ..options()
            },
        );
        let report = source.health().await;
        let slot = report.checks.iter().find(|c| c.name == "slot").unwrap();
        if create_missing {
            assert_eq!(slot.status, Status::Initializing, "{report:#?}");
            assert!(slot.message.contains("is created when the source connects"));
            assert_eq!(slot.fix, None);
        } else {
            assert_eq!(slot.status, Status::Error, "{report:#?}");
            assert!(slot.message.contains("does not exist"), "{}", slot.message);
            assert!(
                slot.fix
                    .as_deref()
                    .is_some_and(|f| f.contains("create_missing = true"))
            );
        }
    }
    // Once it runs, the slot it made is healthy.
    let running = start(&s, options());
    check_becomes_healthy(&running.source, "slot").await;
    running.stop().await;
}

#[tokio::test]
async fn health_names_wal_level_when_that_is_why_there_is_no_slot() {
    // A server left at wal_level = replica: the slot can never be made, so the cause to fix
    // is the setting, not the slot.
    let pg = Cluster::options()
        .role(sluice_localpg::Role::Source)
        .start()
        .unwrap();
    pg.execute(
        "postgres",
        "create table public.t (id int primary key); create publication p for all tables",
    )
    .await
    .unwrap();
    let (running, _stream, _dir) = start_as_superuser(
        &pg,
        SourceOptions {
            create_missing: false,
            ..options()
        },
    )
    .await;
    wait_until("the replication check names wal_level", 30, async || {
        running.source.health().await.checks.iter().any(|c| {
            c.name == "replication"
                && c.status == Status::Error
                && c.message.contains("wal_level = replica")
                && c.fix
                    .as_deref()
                    .is_some_and(|f| f.contains("wal_level = logical"))
        })
    })
    .await;
    let report = running.source.health().await;
    assert!(
        report.checks.iter().all(|c| !c
            .fix
            .as_deref()
            .unwrap_or_default()
            .contains("pg_create_logical_replication_slot")),
        "no fix that cannot work is offered: {report:#?}"
    );
    running.stop().await;
}

/// A table whose rows the server refuses to read (here a row-level security policy that
/// divides by zero on one row: SQLSTATE 22012, the data's fault, not a grant's) stops alone:
/// health names it with the rows, the other tables are read and every table's changes keep
/// streaming, and the refused read is not asked for again while the source runs.
#[tokio::test]
async fn a_table_whose_rows_the_server_refuses_stops_alone_and_is_not_read_again_in_a_loop() {
    let s = setup(
        "refused",
        "create table public.fine (id int primary key);
         insert into public.fine select generate_series(1, 50);
         create table public.refused (id int primary key, v text);
         insert into public.refused select g, 'v' || g from generate_series(1, 300) g;
         alter table public.refused enable row level security;
         create policy every_row on public.refused for select
             using (100 / (id - 150) is not null);",
    )
    .await;
    let running = start(
        &s,
        SourceOptions {
            backfill_page: 100,
            ..options()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running.source.health().await.checks.iter().any(|c| {
        c.name == "tables"
            && c.status == Status::Error
            && c.message.contains("public.refused")
            && c.message.contains("division by zero")
            && c.message.contains("stopped at")
            && c.fix
                .as_deref()
                .is_some_and(|f| f.contains("correct the rows upstream"))
    }) {
        assert!(
            Instant::now() < deadline,
            "the refused table is not reported: {:?}",
            running.source.health().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("the other table is read", 30, async || {
        live(&s.stream, "public.fine").await.len() == 50
    })
    .await;
    // Changes to the stopped table still stream (decoding does not apply the policy).
    PG.execute(
        &s.db,
        "insert into public.refused values (1000, 'new'); insert into public.fine values (51)",
    )
    .await
    .unwrap();
    wait_until("changes stream", 30, async || {
        get(&s.stream, "public.refused", "1000").await.is_some()
            && get(&s.stream, "public.fine", "51").await.is_some()
    })
    .await;
    // Not asked again: nothing scans the table over several heartbeats.
    let scans = async || -> i64 {
        let mut conn = PG.admin(&s.db).await.unwrap();
        sqlx::query_scalar(
            "select coalesce(seq_scan, 0) + coalesce(idx_scan, 0)
             from pg_stat_user_tables where relid = 'public.refused'::regclass",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = scans().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        scans().await,
        before,
        "the refused read was asked for again"
    );
    let report = running.source.health().await;
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name == "replication" && c.status == Status::Healthy),
        "{report:?}"
    );
    running.stop().await;
}

/// A database whose encoding is `SQL_ASCII` stores any bytes. A value that is not UTF-8 is
/// refused and never written as anything else: a lone byte 0xff, and a character split across
/// two columns (the first two bytes of `€` ending one value, its last byte beginning the next),
/// which together are UTF-8 though neither value is. The server refuses both when it converts
/// them for sluice's UTF-8 connection (a page read checks its text as UTF-8 too, each value's
/// ends included, should any reach it). Each such table stops, named with the reason; the
/// other table is read.
#[tokio::test]
async fn values_that_are_not_utf8_are_refused_and_never_written() {
    PG.execute(
        "postgres",
        "create database not_utf8 encoding 'SQL_ASCII' locale 'C' template template0",
    )
    .await
    .unwrap();
    let s = setup_in(
        "not_utf8".into(),
        r"create table public.fine (id int primary key, v text);
          insert into public.fine select g, 'v' || g from generate_series(1, 20) g;
          create table public.lone (id int primary key, v text);
          insert into public.lone values (1, 'ok'), (2, E'a\xffb'), (3, 'ok');
          create table public.split (id int primary key, a text, b text);
          insert into public.split values (1, 'ok', 'ok'), (2, E'x\xe2\x82', E'\xac'), (3, 'ok', 'ok');",
    )
    .await;
    let running = start(&s, options());
    for table in ["public.lone", "public.split"] {
        wait_until(&format!("{table} is reported"), 60, async || {
            running.source.health().await.checks.iter().any(|c| {
                c.status == Status::Error
                    && c.message.contains(table)
                    && c.message.contains("stopped at")
                    && c.message.contains("invalid byte sequence for encoding")
            })
        })
        .await;
    }
    wait_until("the other table is read", 30, async || {
        live(&s.stream, "public.fine").await.len() == 20
    })
    .await;
    for table in ["public.lone", "public.split"] {
        let written = live(&s.stream, table).await;
        assert!(
            written.is_empty(),
            "{table}'s page was written: {written:?}"
        );
    }
    running.stop().await;
}

/// A change the stream refuses for good (`GiveUp`) stops the source instead of being offered
/// again in a loop: health says `stopped` with the reason and what to do, and the slot is not
/// confirmed past it, so a restart after the fix still has it.
#[tokio::test]
async fn a_change_refused_for_good_stops_the_source_without_a_loop() {
    let s = setup(
        "giveup",
        "create table public.poison (id int primary key, v text);
         create table public.fine (id int primary key);",
    )
    .await;
    let watched = Watched::new(s.stream.clone(), |_| None);
    let running = start_with(
        s.settings.clone(),
        s.spec.clone(),
        watched.clone(),
        options(),
    );
    check_becomes_healthy(&running.source, "replication").await;
    watched.refuse("public.poison");
    PG.execute(&s.db, "insert into public.poison values (1, 'x')")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running.source.health().await.checks.iter().any(|c| {
        c.name == "replication"
            && c.status == Status::Error
            && c.message.contains("stopped")
            && c.message.contains("refuses records of public.poison")
            && c.fix
                .as_deref()
                .is_some_and(|f| f.contains("restart sluice"))
    }) {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            running.source.health().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts = watched.refused();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        watched.refused(),
        attempts,
        "the refused change was offered again"
    );
    assert_eq!(attempts, 1);
    // Stopping still works, and the slot was not confirmed past the refused change.
    running.stop().await;
    let restarted = start(&s, options());
    wait_until("the change arrives after a restart", 30, async || {
        get(&s.stream, "public.poison", "1").await.is_some()
    })
    .await;
    restarted.stop().await;
}

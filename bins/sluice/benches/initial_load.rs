//! `cargo xtask bench initial-load`: copying one table of `SLUICE_BENCH_ROWS` rows (default
//! 2,000,000, about 250 bytes each) from a PostgreSQL source into an empty target, by the tools a
//! user would otherwise use, all in the same run on the same two clusters:
//!
//! - sluice (`sluice serve`, release) into the schema mirror, and into a consumer table: from
//!   the process's start to the last row in the target;
//! - native logical replication's initial sync (`CREATE SUBSCRIPTION … copy_data = true`, until
//!   the table's state is `r`eady), once before sluice's runs and once after: the faster of
//!   the two is the baseline every ratio is against (the same machine measured 5.2 s and 7.6 s
//!   for it at different hours, while sluice's runs moved less);
//! - `pg_dump -t | psql`.
//!
//! For sluice it also prints the process's own CPU time per row, its peak resident memory
//! (`VmHWM`) and the records stream's bytes on disk beside the source table's size
//! (`pg_total_relation_size`), and every tool's CPU time per process: sluice and both
//! servers (postmaster, backends and reaped backends, from `/proc`), beside what that CPU
//! spread over every core would take. The schema mirror is loaded
//! with 1, 2 and 4 parallel backfill readers (`backfill_readers`) through one connection, then
//! with 2 readers through 2 connections (the layout's `connections`); the consumer table with
//! the default reader, written through 1 and 2 connections. The source table is not analysed,
//! as right after a bulk load. `SLUICE_BENCH_READERS` (default `1,2,4`) picks the mirror's
//! reader counts, `SLUICE_BENCH_MIRROR_CONNECTIONS` (default `2`, empty for none) the mirror's
//! connection counts with 2 readers, `SLUICE_BENCH_CONNECTIONS` (default `1,2`) the consumer
//! table's connection counts, `SLUICE_BENCH_BATCH` (default 20,000, the consumers'
//! default) the consumers' `max_records`, `SLUICE_BENCH_KEY` (`bigint` or `uuid`) the table's
//! key and `SLUICE_BENCH_SHAPE` (`narrow`, `mixed`, `small` or `wide`: ~8 KB rows) its other
//! columns. The stream's size is printed with its write-ahead log's share.
//!
//! The test kit's servers run with `fsync = off`, so native's sync writes nothing durably,
//! while sluice's stream syncs every append to disk (SQLite's `synchronous = full`): the
//! default comparison charges durability to sluice alone. `SLUICE_BENCH_DURABLE=1` turns
//! `fsync` and `full_page_writes` on in both servers, as a production server has them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_core::{RecordKey, SyncId, UpstreamId};
use sluice_localpg::{Cluster, process_cpu_seconds};

mod support;
use support::*;

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn scalar(cluster: &Cluster, database: &str, sql: &str) -> i64 {
    let mut conn = cluster.admin(database).await.unwrap();
    query(&mut conn, sql).await
}

/// `sql`'s one number, or -1 when it fails (a table not created yet).
async fn query(conn: &mut sqlx::PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(conn)
        .await
        .unwrap_or(-1)
}

/// Waits until `sql` on `database` gives `rows`; the time it took from `started`. `sql` must
/// be cheap until the load is nearly done ([`probe`]: it looks rows spread over the table up
/// by their keys, and counts only once they are all there). A `count(*)` every 50 ms would
/// scan the growing table each time and take CPU from the run being measured (5 of the
/// target's 16 CPU seconds in a 1,000,000-row mirror load, measured with
/// `pg_stat_statements`).
async fn until(
    cluster: &Cluster,
    database: &str,
    sql: &str,
    rows: i64,
    started: Instant,
    what: &str,
) -> f64 {
    let deadline = started + Duration::from_secs(1800);
    // One connection for every poll: a new backend each time would cost the server more
    // than the poll. Without statistics on the growing table the planner reads all of it for
    // the probe's 64 keys (as much as the count it avoids); the keys' index is what it needs.
    let mut conn = cluster.admin(database).await.unwrap();
    sqlx::raw_sql("set enable_seqscan = off")
        .execute(&mut conn)
        .await
        .unwrap();
    while query(&mut conn, sql).await != rows {
        assert!(Instant::now() < deadline, "{what} never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed().as_secs_f64()
}

/// Ids spread evenly over `1..=rows`, the last one included: every key range a reader takes
/// ends within 1/64 of the table after one of them.
fn checkpoints(rows: i64) -> impl Iterator<Item = i64> {
    (1..=64).map(move |k| (rows * k / 64).max(1))
}

/// A cheap wait condition for [`until`]: the table's row count once every one of `keys`
/// (SQL literals of column `key`, its primary key) is in it, else -1.
fn probe(table: &str, key: &str, keys: &[String]) -> String {
    format!(
        "select case when (select count(*) from {table} where {key} in ({})) = {} \
         then (select count(*) from {table}) else -1 end",
        keys.join(", "),
        keys.iter().collect::<std::collections::BTreeSet<_>>().len()
    )
}

fn bytes_under(dir: &Path, counted: &dyn Fn(&Path) -> bool) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => bytes_under(&e.path(), counted),
                    Ok(m) if counted(&e.path()) => m.len(),
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// CPU seconds used by the source's and the target's servers (so far, or over a span).
#[derive(Clone, Copy)]
struct Servers {
    source: f64,
    target: f64,
}

impl Servers {
    fn now(source: &Cluster, target: &Cluster) -> Self {
        Self {
            source: source.cpu_seconds(),
            target: target.cpu_seconds(),
        }
    }

    /// As [`Servers::now`], once the backends of clients that just left have exited: a
    /// backend's CPU is counted while it runs and once the postmaster has reaped it, and is
    /// missed in between.
    async fn settled(source: &Cluster, target: &Cluster) -> Self {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Self::now(source, target)
    }

    fn since(self, start: Servers) -> Self {
        Self {
            source: self.source - start.source,
            target: self.target - start.target,
        }
    }
}

/// What one `sluice serve` run measured.
struct Run {
    seconds: f64,
    /// The process's own CPU time (user and system) until the last row was in the target.
    cpu_seconds: f64,
    /// The source's and the target's servers' CPU time over the same span.
    servers: Servers,
    peak_mb: f64,
    stream_bytes: u64,
    /// Of which SQLite's write-ahead log.
    wal_bytes: u64,
}

/// One `sluice serve` run with `layout`.
async fn sluice(
    source: &Cluster,
    target: &Cluster,
    rows: i64,
    name: &str,
    layout: &str,
    probe: &dyn Fn(uuid::Uuid) -> String,
    readers: usize,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::new_v4();
    let config = format!(
        r#"{head}
[[sync]]
name = "src"
id = "{id}"
[sync.source]
provider = "postgres"
publication = "{name}_pub"
slot = "{name}_slot"
create_missing = true
backfill_readers = {readers}
connection = {{ host = "127.0.0.1", port = {sport}, database = "src", user = "postgres", password = {{ env = "BENCH_SOURCE_PASSWORD" }}, ssl = {{ mode = "disable" }} }}

[[consumer]]
name = "{name}"
target = "warehouse"
filter = {{ sync = {{ name = "src" }} }}
layout = {layout}
batch = {{ max_records = {batch}, max_wait_ms = 50 }}
"#,
        head = config_head(dir.path(), target),
        sport = source.port(),
        id = id,
        batch = env_usize(
            "SLUICE_BENCH_BATCH",
            sluice_core::BatchConfig::default().max_records,
        ),
    );
    let servers = Servers::now(source, target);
    let started = Instant::now();
    let mut serve = serve(
        dir.path(),
        &config,
        &[("BENCH_SOURCE_PASSWORD", source.superuser_password())],
    );
    let seconds = until(target, "postgres", &probe(id), rows, started, name).await;
    let run = Run {
        seconds,
        cpu_seconds: process_cpu_seconds(&serve.id().to_string()),
        servers: Servers::now(source, target).since(servers),
        peak_mb: peak_rss_mb(serve.id()),
        stream_bytes: bytes_under(&dir.path().join("data"), &|_| true),
        wal_bytes: bytes_under(&dir.path().join("data"), &|p| {
            p.to_string_lossy().ends_with("-wal")
        }),
    };
    let _ = serve.kill();
    let _ = serve.wait();
    run
}

async fn run() {
    let rows = env_usize("SLUICE_BENCH_ROWS", 2_000_000) as i64;
    // The test kit's servers skip `fsync` (throwaway clusters); `SLUICE_BENCH_DURABLE=1` turns
    // it back on in both, so that native pays for a durable write as sluice's stream does.
    let durable = std::env::var("SLUICE_BENCH_DURABLE").is_ok_and(|v| v == "1");
    let servers = |options: sluice_localpg::ClusterOptions| {
        if durable {
            options
                .setting("fsync", "on")
                .setting("full_page_writes", "on")
        } else {
            options
        }
    };
    let source = servers(Cluster::options().logical_replication())
        .start()
        .unwrap();
    let target = servers(Cluster::options()).start().unwrap();
    // The key: `bigint` (1, 2, 3…, in order) or `uuid` (an MD5 of the row number: keys in no
    // order, as UUIDs and most SaaS ids are).
    let (key_type, key_of) = match std::env::var("SLUICE_BENCH_KEY").as_deref() {
        Ok("uuid") => ("uuid", "md5(i::text)::uuid"),
        Ok("bigint") | Err(_) => ("bigint", "i"),
        Ok(other) => panic!("SLUICE_BENCH_KEY is bigint or uuid, not {other:?}"),
    };
    // The other columns: `narrow` (five, mostly text: the default) or `mixed` (fifteen of the
    // types a table holds: integers, numeric, floats, booleans, times, dates, intervals,
    // uuid, jsonb, arrays, bytea, inet).
    let (columns, values) = match std::env::var("SLUICE_BENCH_SHAPE").as_deref() {
        Ok("narrow") | Err(_) => (
            "name text not null, note text, qty int not null, price numeric(12, 2) not null, \
             created timestamptz not null",
            "repeat(md5(i::text), 3), repeat(md5((i * 7)::text), 3), i % 1000, \
             (i % 100000) / 100.0, '2026-01-01'::timestamptz + i * interval '1 second'",
        ),
        Ok("mixed") => (
            "small smallint, qty int not null, big bigint, price numeric(14, 4), ratio float8, \
             share real, active boolean, created timestamptz not null, updated timestamp, \
             day date, took interval, ref uuid, doc jsonb, tags text[], blob bytea, \
             address inet, name varchar(40)",
            "(i % 30000)::smallint, i % 1000, i::bigint * 1000003, (i % 1000000) / 7.0, i / 3.0, \
             (i % 977) / 13.0, i % 3 = 0, '2026-01-01'::timestamptz + i * interval '1 second', \
             '2026-01-01'::timestamp + i * interval '1 ms', '2000-01-01'::date + i % 9000, \
             i * interval '1 second', md5((i * 3)::text)::uuid, \
             jsonb_build_object('n', i, 'kind', 'k' || i % 7, 'ok', i % 2 = 0), \
             array['a' || i % 10, 'b' || i % 100], decode(md5(i::text), 'hex'), \
             ('10.' || i % 256 || '.' || (i / 256) % 256 || '.1')::inet, \
             'name ' || i || ' é ✓'",
        ),
        Ok("small") => (
            "account integer not null, quantity integer not null",
            "i % 100000, i % 17",
        ),
        // About 8 KB a row: the server TOASTs it, and a page of rows is megabytes.
        Ok("wide") => (
            "title text not null, body text not null",
            "'item ' || i, (select string_agg(md5((i * 1000 + k)::text), ' ') \
             from generate_series(1, 240) k)",
        ),
        Ok(other) => panic!("SLUICE_BENCH_SHAPE is narrow, mixed, small or wide, not {other:?}"),
    };
    let table = &format!("create table public.items (id {key_type} primary key, {columns})");
    source.create_database("src").await.unwrap();
    source
        .execute(
            "src",
            &format!(
                "{table};
                 insert into public.items
                 select {key_of}, {values} from generate_series(1, {rows}) i;
                 create publication native_pub for table public.items;"
            ),
        )
        .await
        .unwrap();
    // The keys the wait looks up, as the source prints them.
    let numbers: Vec<String> = checkpoints(rows).map(|i| i.to_string()).collect();
    let key_texts: Vec<String> = {
        let mut conn = source.admin("src").await.unwrap();
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "select ({key_of})::text from unnest(array[{}]::bigint[]) as k(i)",
            numbers.join(", ")
        )))
        .fetch_all(&mut conn)
        .await
        .unwrap()
    };
    let source_bytes = scalar(
        &source,
        "src",
        "select pg_total_relation_size('public.items')",
    )
    .await;
    let row_bytes = scalar(
        &source,
        "src",
        "select avg(pg_column_size(i.*))::bigint from public.items i",
    )
    .await;
    prepare_target(&target).await;
    println!(
        "initial load: {rows} rows of ~{row_bytes} bytes, {key_type} keys, source table {:.0} MB on disk, servers with fsync {}",
        source_bytes as f64 / 1e6,
        if durable { "on" } else { "off" }
    );

    // Native logical replication's initial sync, here and again after sluice's runs.
    let first_native = native_sync(&source, &target, rows, table, "native").await;

    // pg_dump | psql.
    target.create_database("dumped").await.unwrap();
    let dump_servers = Servers::now(&source, &target);
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "PGPASSWORD=\"$SOURCE_PW\" pg_dump -h 127.0.0.1 -p {} -U postgres -t public.items src | PGPASSWORD=\"$TARGET_PW\" psql -q -h 127.0.0.1 -p {} -U postgres dumped >/dev/null",
            source.port(),
            target.port()
        ))
        .env("SOURCE_PW", source.superuser_password())
        .env("TARGET_PW", target.superuser_password())
        .env("PGSSLMODE", "disable")
        .status()
        .unwrap();
    assert!(status.success(), "pg_dump | psql failed");
    let dumped = started.elapsed().as_secs_f64();
    let dump_servers = Servers::settled(&source, &target).await.since(dump_servers);
    let copied = scalar(&target, "dumped", "select count(*) from public.items").await;
    assert_eq!(copied, rows, "pg_dump | psql copied every row");

    let mut mirrors = Vec::new();
    // Each run its own schema and table, also when a count is repeated to measure it twice.
    let widths = env_counts("SLUICE_BENCH_READERS", "1,2,4")
        .into_iter()
        .map(|readers| (readers, 1))
        .chain(
            env_counts("SLUICE_BENCH_MIRROR_CONNECTIONS", "2")
                .into_iter()
                .map(|connections| (2, connections)),
        );
    for (run, (readers, connections)) in widths.enumerate() {
        let name = format!("mirror{run}_{readers}_{connections}");
        let run = sluice(
            &source,
            &target,
            rows,
            &name,
            &format!(
                r#"{{ kind = "schema_mirror", schema = "{name}", connections = {connections} }}"#
            ),
            &|_| {
                probe(
                    &format!("{name}.items"),
                    "id",
                    &key_texts
                        .iter()
                        .map(|id| format!("'{id}'"))
                        .collect::<Vec<_>>(),
                )
            },
            readers,
        )
        .await;
        mirrors.push(((readers, connections), run));
    }
    let mut tables = Vec::new();
    for (run, connections) in env_counts("SLUICE_BENCH_CONNECTIONS", "1,2")
        .into_iter()
        .enumerate()
    {
        let name = format!("records{run}_{connections}");
        let run = sluice(
            &source,
            &target,
            rows,
            &name,
            &format!(
                r#"{{ kind = "consumer_table", schema = "sluice", table = "{name}", connections = {connections} }}"#
            ),
            &|sync| {
                let ids: Vec<String> = key_texts
                    .iter()
                    .map(|id| {
                        let upstream = UpstreamId::from_key(&[id]).0;
                        let key = RecordKey::new(SyncId(sync), "public.items", upstream);
                        format!("'{}'", key.row_id())
                    })
                    .collect();
                probe(&format!("sluice.{name}"), "sequin_id", &ids)
            },
            1,
        )
        .await;
        tables.push((connections, run));
    }

    let last_native = native_sync(&source, &target, rows, table, "native_again").await;
    // The faster of the two is the baseline: a slower machine at one of them would otherwise
    // flatter sluice.
    let (native, native_servers) = if last_native.0 < first_native.0 {
        last_native
    } else {
        first_native
    };

    let per = |s: f64| rows as f64 / s;
    println!(
        "  native initial sync (copy_data):  {native:>6.1} s  {:>9.0} rows/s  (the baseline: the faster of {:.1} s before sluice's runs and {:.1} s after)",
        per(native),
        first_native.0,
        last_native.0
    );
    println!(
        "  pg_dump | psql:                   {dumped:>6.1} s  {:>9.0} rows/s  = {:.2}x native",
        per(dumped),
        native / dumped
    );
    // sluice's own CPU per row, and the stream's size beside the source table's.
    let costs = |run: &Run| {
        format!(
            "sluice CPU {:.1} s = {:.1} us/row; peak {:.0} MB (goal < 256); stream {:.0} MB (WAL {:.0} MB) = {:.2}x the source table (goal <= 1.0x)",
            run.cpu_seconds,
            run.cpu_seconds * 1e6 / rows as f64,
            run.peak_mb,
            run.stream_bytes as f64 / 1e6,
            run.wal_bytes as f64 / 1e6,
            run.stream_bytes as f64 / source_bytes as f64
        )
    };
    for (width, run) in &mirrors {
        println!(
            "  sluice, schema mirror, {}: {:>6.1} s  {:>9.0} rows/s  = {:.2}x native (goal >= 0.7x); {}",
            mirror_width(*width),
            run.seconds,
            per(run.seconds),
            native / run.seconds,
            costs(run)
        );
    }
    for (connections, run) in &tables {
        println!(
            "  sluice, consumer table, {connections} conn.:  {:>6.1} s  {:>9.0} rows/s  = {:.2}x native; {}",
            run.seconds,
            per(run.seconds),
            native / run.seconds,
            costs(run)
        );
    }
    // Where the CPU went: a run can take no less than its total CPU spread over every core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "CPU seconds until the last row was in:     sluice  source server  target server   total  total / {cores} cores"
    );
    let line = |what: &str, own: Option<f64>, servers: Servers, wall: f64| {
        let total = own.unwrap_or(0.0) + servers.source + servers.target;
        println!(
            "  {what:<38} {:>7}  {:>13.1}  {:>13.1}  {total:>6.1}  {:>5.1} s of {wall:.1} s",
            own.map_or("-".to_owned(), |c| format!("{c:.1}")),
            servers.source,
            servers.target,
            total / cores,
        );
    };
    line("native initial sync", None, native_servers, native);
    line(
        "pg_dump | psql (its clients not counted)",
        None,
        dump_servers,
        dumped,
    );
    for (width, run) in &mirrors {
        line(
            &format!("sluice, schema mirror, {}", mirror_width(*width)),
            Some(run.cpu_seconds),
            run.servers,
            run.seconds,
        );
    }
    for (connections, run) in &tables {
        line(
            &format!(
                "sluice, consumer table, {connections} connection{}",
                if *connections == 1 { "" } else { "s" }
            ),
            Some(run.cpu_seconds),
            run.servers,
            run.seconds,
        );
    }
}

/// Native logical replication's initial sync of `table` into a new database `database` of the
/// target: its wall time until every row is in and the table is `r`eady, and the servers' CPU.
/// The subscription and its slot are dropped afterwards.
async fn native_sync(
    source: &Cluster,
    target: &Cluster,
    rows: i64,
    table: &str,
    database: &str,
) -> (f64, Servers) {
    target.create_database(database).await.unwrap();
    target.execute(database, table).await.unwrap();
    let servers = Servers::now(source, target);
    let started = Instant::now();
    target
        .execute(
            database,
            &format!(
                "create subscription {database}_sub connection 'host=127.0.0.1 port={} dbname=src user=postgres password={}' publication native_pub with (copy_data = true)",
                source.port(),
                source.superuser_password()
            ),
        )
        .await
        .unwrap();
    let seconds = until(
        target,
        database,
        "select case when not exists (select 1 from pg_subscription_rel where srsubstate <> 'r') \
         then (select count(*) from public.items) else -1 end",
        rows,
        started,
        "native initial sync",
    )
    .await;
    let servers = Servers::settled(source, target).await.since(servers);
    target
        .execute(
            database,
            &format!("alter subscription {database}_sub disable; alter subscription {database}_sub set (slot_name = none); drop subscription {database}_sub;"),
        )
        .await
        .unwrap();
    // Its slot, once the walsender that used it has gone (so that it holds no WAL back).
    let slot = format!("{database}_sub");
    for _ in 0..100 {
        let drop = format!(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
             where slot_name = '{slot}' and not active"
        );
        source.execute("src", &drop).await.unwrap();
        let left = format!("select count(*) from pg_replication_slots where slot_name = '{slot}'");
        if scalar(source, "src", &left).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (seconds, servers)
}

/// "2 readers, 1 conn.": a mirror run's backfill readers and write connections.
fn mirror_width((readers, connections): (usize, usize)) -> String {
    format!(
        "{readers} reader{}, {connections} conn.",
        if readers == 1 { "" } else { "s" }
    )
}

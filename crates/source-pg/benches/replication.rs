//! `cargo xtask bench replication`: a PostgreSQL source → records stream → consumer table,
//! end to end, beside PostgreSQL's own logical replication (`CREATE SUBSCRIPTION` between the
//! same two local clusters) carrying the same workload in the same run.
//!
//! (a) `SLUICE_BENCH_ROWS` rows (default 200,000) inserted in one transaction: rows/s from the
//!     commit until the last row is in the target, once into the consumer table (goal ≥ 0.65×
//!     native; the ceiling it prints below was 1.35× on 2 cores with binary COPY, 1.05–1.09×
//!     with text) and once into the schema
//!     mirror (typed rows, the same work as native's: goal ≥ 1.0×).
//! (b) the same number of single-row transactions at `SLUICE_BENCH_RATE` per second
//!     (default 5,000) into the consumer table: rows/s, and the p50 / p99 latency from each
//!     row's insert (`clock_timestamp()` on the source) to its arrival (`clock_timestamp()`
//!     default on the target); goals p50 < 10 ms, p99 < 25 ms. Also where that latency goes:
//!     insert → stream append, and the consumer's batches.
//! Each path is timed with the source's WAL to itself: sluice's source is stopped while native
//! runs, and native's subscription disabled while sluice runs (each restarted path first
//! carries one row end to end). Otherwise the idle path's walsender decodes the same
//! transaction (and filters it out) on the same two cores: measured, that was 0.25–0.3 of the
//! ~1.5 source-server CPU-seconds each case reported.
//! Peak memory is the benchmark process's peak resident set while sluice runs (reset with
//! `/proc/self/clear_refs` before each sluice case); it includes the workload's connections.
//! `SLUICE_BENCH_CONNECTIONS` sets the consumer table's connections (default 1, the layout's
//! default), `SLUICE_BENCH_BATCH` the consumer's `max_records` (default: the consumers' own,
//! 20,000; runs before 2026-12-06, 18:00 used 10,000).
//!
//! For (a) it also prints the CPU seconds each process spent after the commit (this process,
//! each cluster's postmaster and children, from `/proc`), and a ceiling: the source's decoding
//! as the native path measured it, plus a bare `COPY` of the same rows into a copy of the
//! consumer table, spread perfectly over the machine's cores. `SLUICE_BENCH_CASES=a` runs (a)
//! alone (for profiling).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sluice_consumer::ConsumerRuntime;
use sluice_core::{
    BatchConfig, CollectionId, ConsumerId, LagThresholds, RecordFilter, RecordKey, RecordStream,
    SyncId,
};
use sluice_localpg::Cluster;
use sluice_source_pg::{PostgresSource, SourceOptions, SourceSpec};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{
    ConnectionSettings, ConsumerTable, ConsumerTableTarget, SchemaMirrorTarget,
};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::watch;
use uuid::Uuid;

/// The allocator `sluice serve` runs with (bins/sluice/src/main.rs), so that sluice's CPU here
/// is what the binary spends.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

const SYNC: SyncId = SyncId(Uuid::from_u128(7));

const ITEMS: &str = "(id bigint primary key, created_at timestamptz not null, body text not null)";

struct Setup {
    source: Cluster,
    target: Cluster,
}

impl Setup {
    async fn source_conn(&self) -> PgConnection {
        self.source.admin("src").await.unwrap()
    }
    async fn target_conn(&self) -> PgConnection {
        self.target.admin("dst").await.unwrap()
    }
}

fn settings(pg: &Cluster, db: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::new("127.0.0.1", pg.port(), db, "postgres");
    s.password = Some(SecretString::from(pg.superuser_password().to_owned()));
    s.ssl_mode = sluice_core::SslMode::Disable;
    s
}

async fn count(conn: &mut PgConnection, table: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("select count(*) from {table}")))
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Waits until row `id` (the last one written) is in the target, by index lookup so polling
/// costs the servers almost nothing, then checks that every row is there.
async fn wait_for(conn: &mut PgConnection, table: &str, id: usize, rows: i64) -> Instant {
    let probe = if table == "native_items" || table == MIRROR_TABLE {
        format!("select exists (select 1 from {table} where id = {id})")
    } else {
        let key = RecordKey::new(SYNC, "public.sluice_items", id.to_string());
        format!(
            "select exists (select 1 from {table} where sequin_id = '{}')",
            key.row_id()
        )
    };
    loop {
        // The mirror's table appears with its first batch: until then, not there yet.
        let there: bool = sqlx::query_scalar(AssertSqlSafe(probe.clone()))
            .fetch_one(&mut *conn)
            .await
            .unwrap_or(false);
        if there {
            let done = Instant::now();
            // Rows of other transactions may still be on their way; count once they are.
            while count(conn, table).await < rows {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return done;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The schema mirror's copy of the source's `mirror_items` (typed, like native's).
const MIRROR_TABLE: &str = "mirror.mirror_items";

/// p50 and p99 of arrival minus insert time, in ms.
async fn latency(conn: &mut PgConnection, table: &str, created: &str) -> (f64, f64) {
    sqlx::query_as(AssertSqlSafe(format!(
        "select percentile_cont(0.5) within group (order by ms), percentile_cont(0.99) within group (order by ms)
         from (select extract(epoch from arrived_at - ({created})) * 1000 as ms from {table}) l"
    )))
    .fetch_one(conn)
    .await
    .unwrap()
}

/// p50 and p99, in ms, from each row's insert on the source to the start of the stream append
/// that holds it (the stream stores when each append began; the source, when each row was
/// inserted).
async fn latency_to_stream(
    setup: &Setup,
    stream: &EmbeddedStream,
    ids: std::ops::RangeInclusive<usize>,
) -> (f64, f64) {
    let appended: BTreeMap<i64, f64> = stream
        .append_times()
        .await
        .unwrap()
        .into_iter()
        .filter(|(key, _)| key.collection_id.0 == "public.sluice_items")
        .filter_map(|(key, at)| {
            let id: i64 = key.upstream_id.0.parse().ok()?;
            let ms = at.unix_timestamp_nanos() as f64 / 1e6;
            ids.contains(&(id as usize)).then_some((id, ms))
        })
        .collect();
    let created: Vec<(i64, f64)> = sqlx::query_as(
        "select id::int8, (extract(epoch from created_at) * 1000)::float8 \
         from public.sluice_items where id between $1 and $2",
    )
    .bind(*ids.start() as i64)
    .bind(*ids.end() as i64)
    .fetch_all(&mut setup.source_conn().await)
    .await
    .unwrap();
    let mut ms: Vec<f64> = created
        .iter()
        .filter_map(|(id, at)| appended.get(id).map(|appended| appended - at))
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99))
}

/// One transaction of `n` rows into `table`; returns when it has committed.
async fn one_transaction(setup: &Setup, table: &str, from: usize, n: usize) -> Instant {
    let mut conn = setup.source_conn().await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "insert into {table} select g, clock_timestamp(), repeat('x', 200) from generate_series({from}, {}) g",
        from + n - 1
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    Instant::now()
}

/// `n` single-row transactions at `rate` per second from eight connections.
async fn steady(setup: &Setup, table: &str, from: usize, n: usize, rate: usize) {
    let writers = 8;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut conn = setup.source_conn().await;
        let table = table.to_owned();
        tasks.push(tokio::spawn(async move {
            let per_tick = (rate as f64 / writers as f64 / 100.0).max(1.0);
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mine: Vec<usize> = (from + w..from + n).step_by(writers).collect();
            let mut owed = 0.0;
            let mut next = 0;
            while next < mine.len() {
                tick.tick().await;
                owed += per_tick;
                while owed >= 1.0 && next < mine.len() {
                    sqlx::query(AssertSqlSafe(format!(
                        "insert into {table} values ($1, clock_timestamp(), repeat('x', 200))"
                    )))
                    .bind(mine[next] as i64)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                    owed -= 1.0;
                    next += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// CPU seconds used so far by this process, and by each cluster (the postmaster, its live
/// children, and the children it has reaped), from `/proc`.
#[derive(Clone, Copy)]
struct Cpu {
    sluice: f64,
    source: f64,
    target: f64,
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            sluice: self.sluice - o.sluice,
            source: self.source - o.source,
            target: self.target - o.target,
        }
    }
}

fn cpu(setup: &Setup) -> Cpu {
    Cpu {
        sluice: sluice_localpg::process_cpu_seconds("self"),
        source: setup.source.cpu_seconds(),
        target: setup.target.cpu_seconds(),
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The fastest any design could land `n` rows in the consumer table here: the source's
/// decoding (`decoding` CPU seconds, measured on the native path) plus the target's CPU for a
/// bare `COPY` of the rows sluice wrote (copied out of its table, into an empty copy of it,
/// in the binary format sluice writes them in), with both spread perfectly over every core.
/// Returns (rows/s, the COPY's CPU seconds).
async fn ceiling(setup: &Setup, n: usize, decoding: f64) -> (f64, f64) {
    use futures_util::TryStreamExt;
    let mut conn = setup.target_conn().await;
    sqlx::raw_sql(
        "drop table if exists copy_floor; create table copy_floor (like public.sluice_items including all)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let rows: Vec<u8> = conn
        .copy_out_raw("copy public.sluice_items to stdout with (format binary)")
        .await
        .unwrap()
        .try_fold(Vec::new(), |mut all, chunk| async move {
            all.extend_from_slice(&chunk);
            Ok(all)
        })
        .await
        .unwrap();
    let before = cpu(setup);
    let mut copy = conn
        .copy_in_raw("copy copy_floor from stdin with (format binary)")
        .await
        .unwrap();
    copy.send(rows).await.unwrap();
    copy.finish().await.unwrap();
    let copy_cpu = (cpu(setup) - before).target;
    sqlx::raw_sql("drop table copy_floor")
        .execute(&mut conn)
        .await
        .unwrap();
    (
        n as f64 / ((decoding + copy_cpu) / cores() as f64),
        copy_cpu,
    )
}

fn reset_peak_memory() {
    std::fs::write("/proc/self/clear_refs", "5").ok();
}

fn peak_memory_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

struct Sluice {
    stream: Arc<EmbeddedStream>,
    consumer: sluice_consumer::ConsumerHandle,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    source: Arc<PostgresSource>,
    /// The running source's own switch and task (none while it is stopped).
    running: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

impl Sluice {
    fn start_source(&mut self) {
        let (stop, stopped) = watch::channel(false);
        let source = self.source.clone();
        let task = tokio::spawn(async move { source.run_until(stopped).await });
        self.running = Some((stop, task));
    }

    /// Stops the source, and waits until its slot's walsender has gone.
    async fn stop_source(&mut self, setup: &Setup) {
        if let Some((stop, task)) = self.running.take() {
            stop.send_replace(true);
            task.await.ok();
        }
        slot_idle(setup, "sluice_slot").await;
    }
}

/// Waits until no walsender serves `slot` on the source: a slot nobody reads costs the
/// source nothing (its WAL is kept, not decoded). A slot that does not exist is an error, not
/// an idle slot.
async fn slot_idle(setup: &Setup, slot: &str) {
    let mut conn = setup.source_conn().await;
    while sqlx::query_scalar::<_, bool>(
        "select active from pg_replication_slots where slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut conn)
    .await
    .unwrap()
    .unwrap_or_else(|| panic!("no replication slot {slot} on the source"))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Turns the native subscription on or off; off, waits until its walsender has gone.
async fn native_subscription(setup: &Setup, on: bool) {
    let mut target = setup.target_conn().await;
    let verb = if on { "enable" } else { "disable" };
    sqlx::raw_sql(AssertSqlSafe(format!(
        "alter subscription native_sub {verb}"
    )))
    .execute(&mut target)
    .await
    .unwrap();
    if !on {
        slot_idle(setup, "native_sub").await;
    }
}

async fn start_sluice(setup: &Setup, dir: &std::path::Path) -> Sluice {
    let stream = Arc::new(EmbeddedStream::open(dir).await.unwrap());
    let source = Arc::new(PostgresSource::new(
        "bench",
        SYNC,
        settings(&setup.source, "src"),
        SourceSpec {
            publication: "sluice_pub".into(),
            slot: "sluice_slot".into(),
            failover: false,
        },
        stream.clone(),
        SourceOptions {
            create_missing: true,
            ..SourceOptions::default()
        },
    ));
    let target = Arc::new(ConsumerTableTarget::new(
        "bench",
        settings(&setup.target, "dst"),
        ConsumerTable::new("public", "sluice_items"),
        env_usize("SLUICE_BENCH_CONNECTIONS", 1),
    ));
    let only = |collection: &str| RecordFilter::Sync {
        sync_id: SYNC,
        collections: Some(BTreeSet::from([CollectionId(collection.to_owned())])),
    };
    let batch = BatchConfig {
        max_records: env_usize("SLUICE_BENCH_BATCH", BatchConfig::default().max_records),
        max_wait_ms: 10,
    };
    let consumer = ConsumerRuntime::new(
        ConsumerId::from("bench"),
        only("public.sluice_items"),
        stream.clone(),
        target,
        batch,
        LagThresholds::default(),
    );
    let mirror = ConsumerRuntime::new(
        ConsumerId::from("bench-mirror"),
        only("public.mirror_items"),
        stream.clone(),
        Arc::new(SchemaMirrorTarget::new(
            "bench-mirror",
            settings(&setup.target, "dst"),
            "mirror",
            "postgres",
            stream.clone(),
            BTreeMap::new(),
        )),
        batch,
        LagThresholds::default(),
    );
    let handle = consumer.handle();
    let (stop, stopped) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(mirror.run(stopped.clone())),
        tokio::spawn(consumer.run(stopped)),
    ];
    let mut sluice = Sluice {
        stream,
        consumer: handle,
        stop,
        tasks,
        source,
        running: None,
    };
    sluice.start_source();
    sluice
}

async fn run() {
    let n = env_usize("SLUICE_BENCH_ROWS", 200_000);
    let rate = env_usize("SLUICE_BENCH_RATE", 5_000);
    // `a` for the one-transaction case only (for profiling); both by default.
    let cases = std::env::var("SLUICE_BENCH_CASES").unwrap_or_else(|_| "ab".into());
    let tuned = |o: sluice_localpg::ClusterOptions| {
        o.setting("shared_buffers", "'512MB'")
            .setting("max_wal_size", "'4GB'")
    };
    let setup = Setup {
        source: tuned(Cluster::options().logical_replication())
            .start()
            .unwrap(),
        target: tuned(Cluster::options().logical_replication())
            .start()
            .unwrap(),
    };
    setup.source.create_database("src").await.unwrap();
    setup.target.create_database("dst").await.unwrap();
    setup
        .source
        .execute(
            "src",
            &format!(
                "create table native_items {ITEMS}; create table sluice_items {ITEMS};
                 create table mirror_items {ITEMS};
                 create publication native_pub for table native_items;
                 create publication sluice_pub for table sluice_items, mirror_items;"
            ),
        )
        .await
        .unwrap();
    let sluice_table = ConsumerTable::new("public", "sluice_items");
    setup
        .target
        .execute(
            "dst",
            &format!(
                "create table native_items (id bigint primary key, created_at timestamptz not null, body text not null,
                                            arrived_at timestamptz default clock_timestamp());
                 {ddl};
                 alter table public.sluice_items add column arrived_at timestamptz default clock_timestamp();",
                ddl = sluice_table.ddl(),
            ),
        )
        .await
        .unwrap();
    // On its own: CREATE SUBSCRIPTION cannot run inside a (multi-statement) transaction.
    setup
        .target
        .execute(
            "dst",
            &format!(
                "create subscription native_sub connection 'host=127.0.0.1 port={port} dbname=src user=postgres password={pw}'
                   publication native_pub with (copy_data = false)",
                port = setup.source.port(),
                pw = setup.source.superuser_password(),
            ),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut sluice = start_sluice(&setup, dir.path()).await;
    // Both paths warmed up: one row each, end to end.
    one_transaction(&setup, "native_items", 0, 1).await;
    one_transaction(&setup, "sluice_items", 0, 1).await;
    one_transaction(&setup, "mirror_items", 0, 1).await;
    let mut target = setup.target_conn().await;
    wait_for(&mut target, "native_items", 0, 1).await;
    wait_for(&mut target, "public.sluice_items", 0, 1).await;
    wait_for(&mut target, MIRROR_TABLE, 0, 1).await;

    println!(
        "replication benchmark: PostgreSQL {} → PostgreSQL, rows of ~250 bytes, two local clusters",
        setup.source.binaries().version()
    );
    println!(
        "baseline, same run and clusters: native logical replication (CREATE SUBSCRIPTION, copy_data = false)\n"
    );

    // Each path is timed with the source's WAL to itself: the other path's walsender would
    // otherwise decode the same transaction (and filter it out) on the same cores.
    let settle_id = |k: usize| 10 * n + k;
    sluice.stop_source(&setup).await;

    // (a) one big transaction.
    let committed = one_transaction(&setup, "native_items", 1, n).await;
    let before = cpu(&setup);
    let native_a = n as f64
        / (wait_for(&mut target, "native_items", n, n as i64 + 1).await - committed).as_secs_f64();
    let native_cpu = cpu(&setup) - before;
    native_subscription(&setup, false).await;
    sluice.start_source();
    // One row through, so the restarted source has read past native's transaction.
    one_transaction(&setup, "sluice_items", settle_id(1), 1).await;
    wait_for(&mut target, "public.sluice_items", settle_id(1), 2).await;
    reset_peak_memory();
    let head = sluice.stream.head().await.unwrap().0;
    let memory_reads = sluice.stream.reads_from_memory();
    let committed = one_transaction(&setup, "sluice_items", 1, n).await;
    let before = cpu(&setup);
    let in_stream = {
        let stream = sluice.stream.clone();
        tokio::spawn(async move {
            while stream.head().await.unwrap().0 < head + n as u64 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Instant::now()
        })
    };
    let sluice_a = n as f64
        / (wait_for(&mut target, "public.sluice_items", n, n as i64 + 2).await - committed)
            .as_secs_f64();
    let sluice_cpu = cpu(&setup) - before;
    let memory_reads = sluice.stream.reads_from_memory() - memory_reads;
    let stream_a = n as f64 / (in_stream.await.unwrap() - committed).as_secs_f64();
    let memory_a = peak_memory_mb();
    // The same transaction into the schema mirror: typed rows, the same work as native's.
    reset_peak_memory();
    let committed = one_transaction(&setup, "mirror_items", 1, n).await;
    let before = cpu(&setup);
    let mirror_a = n as f64
        / (wait_for(&mut target, MIRROR_TABLE, n, n as i64 + 1).await - committed).as_secs_f64();
    let mirror_cpu = cpu(&setup) - before;
    let mirror_memory = peak_memory_mb();
    println!(
        "CPU seconds in (a) after the commit:      sluice process  source server  target server  total"
    );
    for (who, c) in [
        ("native", native_cpu),
        ("sluice, consumer table", sluice_cpu),
        ("sluice, schema mirror", mirror_cpu),
    ] {
        println!(
            "    {who:<38} {:>14.2} {:>14.2} {:>14.2} {:>6.2}",
            c.sluice,
            c.source,
            c.target,
            c.sluice + c.source + c.target
        );
    }
    let (ceiling, copy_cpu) = ceiling(&setup, n, native_cpu.source).await;
    println!(
        "ceiling on this machine for any design that lands these rows in the consumer table: the source's\n\
         decoding (as native pays it, {:.2}s) plus a bare binary COPY of the same rows into a copy of the table\n\
         ({copy_cpu:.2}s), spread perfectly over {} cores: {ceiling:.0} rows/s = {:.2}x native",
        native_cpu.source,
        cores(),
        ceiling / native_a
    );
    if !cases.contains('b') {
        println!(
            "\n(a) {n} rows in one transaction: sluice {sluice_a:.0}/s, native {native_a:.0}/s, {:.2}x; source → stream {stream_a:.0}/s; peak {memory_a:.0} MB; {memory_reads} stream reads from memory; schema mirror {mirror_a:.0}/s, {:.2}x",
            sluice_a / native_a,
            mirror_a / native_a
        );
        sluice.stop_source(&setup).await;
        sluice.stop.send_replace(true);
        for t in sluice.tasks {
            t.await.ok();
        }
        return;
    }

    // (b) single-row transactions at a steady rate, each path again alone.
    let from = n + 1;
    sluice.stop_source(&setup).await;
    native_subscription(&setup, true).await;
    one_transaction(&setup, "native_items", settle_id(1), 1).await;
    wait_for(&mut target, "native_items", settle_id(1), n as i64 + 2).await;
    let started = Instant::now();
    steady(&setup, "native_items", from, n, rate).await;
    let native_b = n as f64
        / (wait_for(&mut target, "native_items", 2 * n, 2 * n as i64 + 2).await - started)
            .as_secs_f64();
    let (native_p50, native_p99) = latency(
        &mut target,
        &format!("native_items where id between {from} and {}", 2 * n),
        "created_at",
    )
    .await;
    native_subscription(&setup, false).await;
    sluice.start_source();
    one_transaction(&setup, "sluice_items", settle_id(2), 1).await;
    wait_for(
        &mut target,
        "public.sluice_items",
        settle_id(2),
        n as i64 + 3,
    )
    .await;
    reset_peak_memory();
    let stats_before = sluice.consumer.stats();
    let started = Instant::now();
    steady(&setup, "sluice_items", from, n, rate).await;
    let sluice_b = n as f64
        / (wait_for(&mut target, "public.sluice_items", 2 * n, 2 * n as i64 + 3).await - started)
            .as_secs_f64();
    let memory_b = peak_memory_mb();
    let (stream_p50, stream_p99) = latency_to_stream(&setup, &sluice.stream, from..=2 * n).await;
    let stats = sluice.consumer.stats();
    let batches_b = stats.batches - stats_before.batches;
    let batch_ms_b =
        (stats.batch_seconds - stats_before.batch_seconds) * 1e3 / batches_b.max(1) as f64;
    let batch_rows_b = (stats.applied - stats_before.applied) as f64 / batches_b.max(1) as f64;
    let (sluice_p50, sluice_p99) = latency(
        &mut target,
        &format!(
            "public.sluice_items where (payload->>'id')::bigint between {from} and {}",
            2 * n
        ),
        "(payload->>'created_at')::timestamptz",
    )
    .await;

    println!(
        "{:<52} {:>10} {:>10} {:>7} {:>6}  {:>8} {:>8}  {:>9}",
        "case", "sluice/s", "native/s", "ratio", "goal", "p50 ms", "p99 ms", "peak MB"
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "{:<52} {:>10.0} {:>10.0} {:>6.2}x {:>6}  {:>8} {:>8}  {:>9.0}   throughput {}, memory {}",
        format!("(a) {n} rows in one transaction, consumer table"),
        sluice_a,
        native_a,
        sluice_a / native_a,
        "≥0.65",
        "-",
        "-",
        memory_a,
        verdict(sluice_a >= native_a * 0.65),
        verdict(memory_a < 256.0),
    );
    println!(
        "{:<52} {:>10.0} {:>10.0} {:>6.2}x {:>6}  {:>8} {:>8}  {:>9.0}   throughput {}, memory {}",
        format!("(a) {n} rows in one transaction, schema mirror"),
        mirror_a,
        native_a,
        mirror_a / native_a,
        "≥1.00",
        "-",
        "-",
        mirror_memory,
        verdict(mirror_a >= native_a),
        verdict(mirror_memory < 256.0),
    );
    println!(
        "{:<52} {:>10.0} {:>10.0} {:>6.2}x {:>6}  {:>8.1} {:>8.1}  {:>9.0}   throughput {}, p50 {}, p99 {}, memory {}",
        format!("(b) {n} single-row transactions at {rate}/s"),
        sluice_b,
        native_b,
        sluice_b / native_b,
        "≥1.00",
        sluice_p50,
        sluice_p99,
        memory_b,
        verdict(sluice_b >= native_b * 0.99),
        verdict(sluice_p50 < 10.0),
        verdict(sluice_p99 < 25.0),
        verdict(memory_b < 256.0),
    );
    println!(
        "{:<52} {:>10} {:>10} {:>7} {:>6}  {:>8.1} {:>8.1}",
        "    native logical replication, same workload", "", "", "", "", native_p50, native_p99
    );
    println!(
        "\nstages in (a): source → stream {stream_a:.0} rows/s; source → stream → target {sluice_a:.0} rows/s"
    );
    println!(
        "stages in (b): insert → stream append p50 {stream_p50:.1} ms, p99 {stream_p99:.1} ms (the rest is stream → target)"
    );
    println!(
        "consumer in (b): {batches_b} batches of {batch_rows_b:.1} rows on average, each applied in {batch_ms_b:.2} ms"
    );
    sluice.stop_source(&setup).await;
    sluice.stop.send_replace(true);
    for t in sluice.tasks {
        t.await.ok();
    }
    let _ = Connection::close(target).await;
}

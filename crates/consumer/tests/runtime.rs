//! The consumer runtime against a real records stream and a real PostgreSQL target.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::json;
use sluice_consumer::{AlertSink, ConsumerHandle, ConsumerRuntime};
use sluice_core::sql::quote_ident;
use sluice_core::{
    BatchConfig, Change, Consumer, ConsumerId, Health, LagThresholds, Provider, Record,
    RecordFilter, RecordKey, RecordStream, Status, SyncId, Transition, Version,
};
use sluice_localpg::Cluster;
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{ConnectionSettings, ConsumerTable, ConsumerTableTarget};
use time::OffsetDateTime;
use tokio::sync::watch;
use uuid::Uuid;

static PG: LazyLock<Cluster> =
    LazyLock::new(|| Cluster::start_default().expect("start PostgreSQL"));

const SYNC: SyncId = SyncId(Uuid::from_u128(0xC0));

fn rec(sync: SyncId, provider: Provider, id: usize, version: u64, delete: bool) -> Record {
    Record {
        key: RecordKey::new(sync, "public.orders", format!("{id:06}")),
        provider,
        version: Version::new(version, 0),
        upstream_updated_at: OffsetDateTime::from_unix_timestamp(1_700_000_000 + version as i64)
            .unwrap(),
        change: if delete {
            Change::Delete
        } else {
            Change::upsert(json!({"id": id, "version": version, "note": "x".repeat(200)})).unwrap()
        },
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    stream: Arc<EmbeddedStream>,
    db: String,
    table: ConsumerTable,
    settings: ConnectionSettings,
}

async fn setup(pg: &Cluster, prefix: &str) -> Setup {
    let db = pg.fresh_database(prefix).await.unwrap();
    let table = ConsumerTable::new("sluice", "records");
    let user = format!("{db}_sync");
    pg.create_role(&user, Some("pw")).await.unwrap();
    pg.execute(
        &db,
        &format!(
            "create schema sluice; grant usage, create on schema sluice to {u}; {ddl}
             grant all privileges on all tables in schema sluice to {u};",
            u = quote_ident(&user),
            ddl = table.ddl()
        ),
    )
    .await
    .unwrap();
    let mut settings =
        ConnectionSettings::from_url(&pg.url_as(&user, Some("pw"), &db, None)).unwrap();
    settings.password = Some(SecretString::from("pw".to_owned()));
    settings.connect_timeout = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    Setup {
        _dir: dir,
        stream,
        db,
        table,
        settings,
    }
}

fn start(
    s: &Setup,
    filter: RecordFilter,
    name: &str,
) -> (
    ConsumerHandle,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let batch = BatchConfig {
        max_records: 1000,
        max_wait_ms: 20,
    };
    start_batching(s, filter, name, batch)
}

fn start_batching(
    s: &Setup,
    filter: RecordFilter,
    name: &str,
    batch: BatchConfig,
) -> (
    ConsumerHandle,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let target = Arc::new(ConsumerTableTarget::new(
        "warehouse",
        s.settings.clone(),
        s.table.clone(),
        1,
    ));
    let runtime = ConsumerRuntime::new(
        ConsumerId::from(name),
        filter,
        s.stream.clone(),
        target,
        batch,
        LagThresholds::default(),
    )
    .with_backoff(Duration::from_millis(50), Duration::from_millis(500));
    let handle = runtime.handle();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runtime.run(stopped));
    (handle, stop, task)
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, secs: u64, mut done: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The target's rows, `(upstream_id, payload)` sorted, checking `sequin_id` against the identity.
async fn target_rows(pg: &Cluster, s: &Setup) -> Vec<(String, serde_json::Value)> {
    let mut conn = pg.admin(&s.db).await.unwrap();
    let rows: Vec<(Uuid, Uuid, String, String, serde_json::Value)> = sqlx::query_as(
        "select sequin_id, sync_id, collection_id, upstream_id, payload from sluice.records order by sync_id, upstream_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, sync, collection, upstream, payload)| {
            assert_eq!(
                id,
                RecordKey::new(SyncId(sync), collection.as_str(), upstream.as_str()).row_id()
            );
            (upstream, payload)
        })
        .collect()
}

/// The stream's live records in the same shape.
async fn stream_rows(s: &Setup) -> Vec<(String, serde_json::Value)> {
    s.stream
        .live_records()
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            (
                e.record.key.upstream_id.0.clone(),
                serde_json::Value::Object(e.record.change.payload().unwrap().clone()),
            )
        })
        .collect()
}

/// Appends version 1 of records `ids` of [`SYNC`], 5,000 per batch.
async fn fill(s: &Setup, ids: std::ops::Range<usize>) {
    let records: Vec<Record> = ids
        .map(|i| rec(SYNC, Provider::Postgres, i, 1, false))
        .collect();
    for chunk in records.chunks(5000) {
        s.stream.append(chunk.to_vec()).await.unwrap();
    }
}

async fn caught_up(handle: &ConsumerHandle, s: &Setup) -> bool {
    handle.cursor() >= s.stream.head().await.unwrap()
}

#[tokio::test]
async fn a_50k_backfill_then_live_changes_ends_equal_to_the_stream() {
    let s = setup(&PG, "backfill").await;
    fill(&s, 0..50_000).await;
    let (handle, stop, task) = start(
        &s,
        RecordFilter::Sync {
            sync_id: SYNC,
            collections: None,
        },
        "backfill",
    );
    wait_until("the backfill is applied", 120, async || {
        caught_up(&handle, &s).await
    })
    .await;
    assert_eq!(target_rows(&PG, &s).await.len(), 50_000);

    // Live: updates, deletes, new records, and an older version arriving late.
    let mut live = Vec::new();
    for i in (0..50_000).step_by(7) {
        live.push(rec(SYNC, Provider::Postgres, i, 2, false));
    }
    for i in (3..50_000).step_by(11) {
        live.push(rec(SYNC, Provider::Postgres, i, 3, true));
    }
    for i in 50_000..51_000 {
        live.push(rec(SYNC, Provider::Postgres, i, 1, false));
    }
    for chunk in live.chunks(700) {
        s.stream.append(chunk.to_vec()).await.unwrap();
    }
    let stale = s
        .stream
        .append(vec![rec(SYNC, Provider::Postgres, 0, 1, false)])
        .await
        .unwrap();
    assert_eq!(stale.skipped_stale, 1, "an older version never wins");
    wait_until("the live changes are applied", 60, async || {
        caught_up(&handle, &s).await
    })
    .await;
    let (target, stream) = (target_rows(&PG, &s).await, stream_rows(&s).await);
    assert_eq!(target.len(), stream.len());
    assert!(
        target == stream,
        "the target equals the stream's live records, row by row"
    );
    assert_eq!(
        target[0].1["version"], 2,
        "record 0 kept its newest version"
    );
    let report = handle.health().await;
    assert_eq!(report.status, Status::Healthy, "{report:#?}");
    stop.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn a_stopped_target_pauses_the_consumer_and_it_catches_up_by_itself() {
    let pg = Cluster::start_default().unwrap();
    let s = setup(&pg, "outage").await;
    s.stream
        .append(
            (0..1000)
                .map(|i| rec(SYNC, Provider::Postgres, i, 1, false))
                .collect(),
        )
        .await
        .unwrap();
    let (handle, stop, task) = start(&s, RecordFilter::Provider(Provider::Postgres), "outage");
    wait_until("the first records are applied", 60, async || {
        caught_up(&handle, &s).await
    })
    .await;

    pg.stop().unwrap();
    for chunk in (1000..11_000).collect::<Vec<_>>().chunks(1000) {
        s.stream
            .append(
                chunk
                    .iter()
                    .map(|&i| rec(SYNC, Provider::Postgres, i, 1, false))
                    .collect(),
            )
            .await
            .unwrap();
    }
    wait_until("the consumer reports paused", 30, async || {
        handle.health().await.status == Status::Paused
    })
    .await;
    let report = handle.health().await;
    let target = report.checks.iter().find(|c| c.name == "target").unwrap();
    assert!(
        target
            .message
            .contains("target \"warehouse\" is unavailable"),
        "{}",
        target.message
    );

    pg.start().unwrap();
    wait_until("the consumer catches up", 60, async || {
        caught_up(&handle, &s).await
    })
    .await;
    wait_until("health returns to healthy", 30, async || {
        handle.health().await.status == Status::Healthy
    })
    .await;
    assert!(target_rows(&pg, &s).await == stream_rows(&s).await);
    stop.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn a_provider_filter_picks_up_a_sync_created_after_it_started() {
    let s = setup(&PG, "newsync").await;
    let first = SyncId(Uuid::from_u128(0x1));
    s.stream
        .append(vec![
            rec(first, Provider::Http, 1, 1, false),
            rec(SYNC, Provider::Postgres, 2, 1, false),
        ])
        .await
        .unwrap();
    let (handle, stop, task) = start(&s, RecordFilter::Provider(Provider::Http), "http");
    wait_until("the first sync is applied", 30, async || {
        caught_up(&handle, &s).await
    })
    .await;
    let later = SyncId(Uuid::from_u128(0x2));
    s.stream
        .append(vec![rec(later, Provider::Http, 3, 1, false)])
        .await
        .unwrap();
    wait_until("the new sync is applied", 30, async || {
        target_rows(&PG, &s).await.len() == 2
    })
    .await;
    let ids: Vec<String> = target_rows(&PG, &s)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        ids,
        vec!["000001", "000003"],
        "the postgres record is filtered out"
    );
    stop.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn a_user_can_pause_resume_and_restart_the_backfill() {
    let s = setup(&PG, "control").await;
    s.stream
        .append(vec![rec(SYNC, Provider::Postgres, 1, 1, false)])
        .await
        .unwrap();
    let (handle, stop, task) = start(&s, RecordFilter::Provider(Provider::Postgres), "control");
    wait_until("applied", 30, async || caught_up(&handle, &s).await).await;

    handle.pause("maintenance".into()).await.unwrap();
    wait_until("paused", 10, async || {
        handle.health().await.status == Status::Paused
    })
    .await;
    s.stream
        .append(vec![rec(SYNC, Provider::Postgres, 2, 1, false)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        target_rows(&PG, &s).await.len(),
        1,
        "nothing is written while paused"
    );
    let report = handle.health().await;
    assert!(
        report.problems()[0]
            .message
            .contains("paused by user: maintenance")
    );

    handle.resume().await.unwrap();
    wait_until("resumed and caught up", 30, async || {
        target_rows(&PG, &s).await.len() == 2
    })
    .await;

    // A restarted backfill rewrites every row, including one removed behind sluice's back.
    PG.execute(
        &s.db,
        "delete from sluice.records where upstream_id = '000001'",
    )
    .await
    .unwrap();
    handle.restart_backfill().await.unwrap();
    wait_until("the backfill restored the row", 30, async || {
        target_rows(&PG, &s).await.len() == 2
    })
    .await;
    stop.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn status_transitions_reach_the_alert_sink() {
    let alerts = Arc::new(Collect::default());
    let s = setup(&PG, "webhook").await;
    let target = Arc::new(ConsumerTableTarget::new(
        "warehouse",
        s.settings.clone(),
        s.table.clone(),
        1,
    ));
    let runtime = ConsumerRuntime::new(
        ConsumerId::from("alerts"),
        RecordFilter::Provider(Provider::Postgres),
        s.stream.clone(),
        target,
        BatchConfig::default(),
        LagThresholds::default(),
    )
    .with_alert_sink(alerts.clone());
    let handle = runtime.handle();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runtime.run(stopped));
    handle.pause("testing alerts".into()).await.unwrap();
    // The request returns once the consumer has taken it in: its health says so at once.
    let state = handle.health().await;
    assert!(
        state
            .checks
            .iter()
            .any(|c| c.name == "state" && c.status == Status::Paused),
        "{state:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let paused = loop {
        let seen = alerts.0.lock().unwrap().clone();
        if let Some(t) = seen.into_iter().find(|t| t.to == Status::Paused) {
            break t;
        }
        assert!(Instant::now() < deadline, "no transition to paused arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(paused.entity.name, "alerts");
    assert!(paused.reason.contains("testing alerts"), "{paused:?}");
    stop.send_replace(true);
    task.await.unwrap();
}

/// Run in a child process by `a_consumer_killed_mid_batch_resumes_without_loss_or_regression`:
/// runs a consumer over the stream in `SLUICE_CONSUMER_CHILD_DIR` into the target at
/// `SLUICE_CONSUMER_CHILD_URL`; with `SLUICE_CONSUMER_CHILD_FINISH` it exits once caught up.
#[tokio::test]
async fn child_runs_a_consumer() {
    let (Some(dir), Some(url)) = (
        std::env::var_os("SLUICE_CONSUMER_CHILD_DIR"),
        std::env::var("SLUICE_CONSUMER_CHILD_URL").ok(),
    ) else {
        return; // only meaningful as the child of the test below
    };
    let stream = Arc::new(EmbeddedStream::open(dir).await.unwrap());
    let settings = ConnectionSettings::from_url(&url).unwrap();
    let target = Arc::new(ConsumerTableTarget::new(
        "warehouse",
        settings,
        ConsumerTable::new("sluice", "records"),
        1,
    ));
    let runtime = ConsumerRuntime::new(
        ConsumerId::from("killed"),
        RecordFilter::Provider(Provider::Postgres),
        stream.clone(),
        target,
        BatchConfig {
            max_records: 3000,
            max_wait_ms: 20,
        },
        LagThresholds::default(),
    );
    let handle = runtime.handle();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runtime.run(stopped));
    if std::env::var_os("SLUICE_CONSUMER_CHILD_FINISH").is_some() {
        let head = stream.head().await.unwrap();
        while handle.cursor() < head {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send_replace(true);
    }
    task.await.unwrap();
}

#[tokio::test]
async fn a_consumer_killed_mid_batch_resumes_without_loss_or_regression() {
    let s = setup(&PG, "killed").await;
    fill(&s, 0..40_000).await;
    let url = PG.url_as(&format!("{}_sync", s.db), Some("pw"), &s.db, None);
    let child = |finish: bool| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "child_runs_a_consumer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SLUICE_CONSUMER_CHILD_DIR", s._dir.path())
        .env("SLUICE_CONSUMER_CHILD_URL", &url)
        .stdout(std::process::Stdio::null());
        if finish {
            cmd.env("SLUICE_CONSUMER_CHILD_FINISH", "1");
        }
        cmd.spawn().unwrap()
    };
    let checkpoint = async || -> i64 {
        let mut conn = PG.admin(&s.db).await.unwrap();
        sqlx::query_scalar::<_, i64>("select coalesce(max(seq), 0) from sluice._sluice_checkpoint")
            .fetch_one(&mut conn)
            .await
            .unwrap_or(0)
    };
    let mut first = child(false);
    wait_until("the child has applied a few batches", 60, async || {
        checkpoint().await >= 9000
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no destructor, no clean shutdown, likely mid-transaction
    first.wait().unwrap();
    let at_kill = checkpoint().await;
    assert!(
        at_kill < 40_000,
        "killed before the end (checkpoint {at_kill})"
    );

    // Changes made while no consumer runs: updates (including of rows already written) and deletes.
    let mut live: Vec<Record> = (0..40_000)
        .step_by(5)
        .map(|i| rec(SYNC, Provider::Postgres, i, 2, false))
        .collect();
    live.extend(
        (1..40_000)
            .step_by(13)
            .map(|i| rec(SYNC, Provider::Postgres, i, 3, true)),
    );
    s.stream.append(live).await.unwrap();

    let mut second = child(true);
    let status = tokio::task::spawn_blocking(move || second.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "the restarted consumer finished");
    let (target, stream) = (target_rows(&PG, &s).await, stream_rows(&s).await);
    assert_eq!(
        target.len(),
        stream.len(),
        "no duplicate and no missing row"
    );
    assert!(
        target == stream,
        "every row holds its newest version: nothing lost, nothing regressed"
    );
}

#[tokio::test]
async fn a_consumer_that_falls_behind_turns_warning_then_error_and_recovers() {
    let s = setup(&PG, "lagging").await;
    fill(&s, 0..10).await;
    let target = Arc::new(ConsumerTableTarget::new(
        "warehouse",
        s.settings.clone(),
        s.table.clone(),
        1,
    ));
    let thresholds = LagThresholds {
        warn_records: 5,
        warn_seconds: 3600,
        error_records: 20,
        error_seconds: 7200,
    };
    let runtime = ConsumerRuntime::new(
        ConsumerId::from("lagging"),
        RecordFilter::Provider(Provider::Postgres),
        s.stream.clone(),
        target,
        BatchConfig {
            max_records: 1000,
            max_wait_ms: 20,
        },
        thresholds,
    );
    let handle = runtime.handle();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runtime.run(stopped));
    wait_until("caught up", 30, async || caught_up(&handle, &s).await).await;
    let lag = async || {
        handle
            .health()
            .await
            .checks
            .into_iter()
            .find(|c| c.name == "lag")
            .unwrap()
    };
    assert_eq!(lag().await.status, Status::Healthy);

    // Held back (paused), the consumer falls behind as records arrive.
    handle.pause("holding back".into()).await.unwrap();
    wait_until("paused", 10, async || {
        handle.health().await.status == Status::Paused
    })
    .await;
    fill(&s, 100..110).await;
    let check = lag().await;
    assert_eq!(check.status, Status::Warning, "{check:?}");
    assert!(
        check.message.starts_with("10 record(s)"),
        "{}",
        check.message
    );
    fill(&s, 200..215).await;
    assert_eq!(lag().await.status, Status::Error);

    handle.resume().await.unwrap();
    wait_until("caught up again", 30, async || caught_up(&handle, &s).await).await;
    wait_until("healthy again", 10, async || {
        handle.health().await.status == Status::Healthy
    })
    .await;
    stop.send_replace(true);
    task.await.unwrap();
}

#[tokio::test]
async fn a_consumer_with_nothing_to_apply_is_healthy() {
    let s = setup(&PG, "idle").await;
    let (handle, stop, task) = start(&s, RecordFilter::Provider(Provider::Postgres), "idle");
    wait_until("the idle consumer is healthy", 20, async || {
        handle.health().await.status == Status::Healthy
    })
    .await;
    stop.send_replace(true);
    task.await.unwrap();
}

/// Keeps every transition it is sent.
#[derive(Default)]
struct Collect(std::sync::Mutex<Vec<Transition>>);

impl Collect {
    /// No transition it was sent went to `warning` or `error`.
    fn assert_no_warning_or_error(&self) {
        let seen: Vec<String> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|t| format!("{} -> {}: {}", t.from, t.to, t.reason))
            .collect();
        assert!(
            seen.iter()
                .all(|t| !t.contains("-> warning") && !t.contains("-> error")),
            "{seen:#?}"
        );
    }
}

#[async_trait::async_trait]
impl AlertSink for Collect {
    async fn send(&self, t: &Transition) -> Result<(), sluice_core::Error> {
        self.0.lock().unwrap().push(t.clone());
        Ok(())
    }
}

/// A consumer of every PostgreSQL record into the consumer table, in batches of up to 500,
/// warning past 200 records behind, with its transitions sent to `alerts`.
fn alerting_consumer(s: &Setup, name: &str, alerts: &Arc<Collect>) -> ConsumerRuntime {
    let target = Arc::new(ConsumerTableTarget::new(
        "warehouse",
        s.settings.clone(),
        s.table.clone(),
        1,
    ));
    ConsumerRuntime::new(
        ConsumerId::from(name),
        RecordFilter::Provider(Provider::Postgres),
        s.stream.clone(),
        target,
        BatchConfig {
            max_records: 500,
            max_wait_ms: 20,
        },
        LagThresholds {
            warn_records: 200,
            ..LagThresholds::default()
        },
    )
    .with_alert_sink(alerts.clone())
}

/// 60,000 records in 30 pages, appended faster than the consumer writes them (a backfill).
async fn backfill_pages(s: &Setup) {
    for page in 0..30 {
        fill(s, page * 2000..(page + 1) * 2000).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The source's backfill ends; the consumer catches up and turns healthy, and no transition
/// on the way went to `warning` or `error`.
async fn end_backfill_without_alerts(s: &Setup, handle: &ConsumerHandle, alerts: &Collect) {
    s.stream.set_backfilling(SYNC, Provider::Postgres, false);
    healthy_without_alerts(s, handle, alerts).await;
}

/// The consumer catches up and turns healthy, and no transition on the way went to `warning`
/// or `error`.
async fn healthy_without_alerts(s: &Setup, handle: &ConsumerHandle, alerts: &Collect) {
    wait_until("caught up", 60, async || caught_up(handle, s).await).await;
    wait_until("healthy", 20, async || {
        handle.health().await.status == Status::Healthy
    })
    .await;
    alerts.assert_no_warning_or_error();
}

/// `runtime` running, once it is healthy at the head of an empty stream (caught up, with no
/// backfill announced).
async fn running_at_the_head(
    runtime: ConsumerRuntime,
) -> (
    ConsumerHandle,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let handle = runtime.handle();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runtime.run(stopped));
    wait_until("healthy on an empty stream", 20, async || {
        handle.health().await.status == Status::Healthy
    })
    .await;
    (handle, stop, task)
}

#[tokio::test]
async fn lag_does_not_alert_while_the_source_is_still_backfilling() {
    let s = setup(&PG, "firstload").await;
    let alerts = Arc::new(Collect::default());
    // The source starts its backfill before the consumer has anything to read (as when
    // `sluice serve` starts both), and appends faster than the consumer writes.
    s.stream.set_backfilling(SYNC, Provider::Postgres, true);
    let runtime = alerting_consumer(&s, "firstload", &alerts);
    let handle = runtime.handle();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(runtime.run(stopped));
    tokio::time::sleep(Duration::from_millis(500)).await;
    backfill_pages(&s).await;
    end_backfill_without_alerts(&s, &handle, &alerts).await;

    // Once it has caught up, falling behind is lag again.
    handle.pause("holding back".into()).await.unwrap();
    fill(&s, 100_000..100_500).await;
    let lag = handle
        .health()
        .await
        .checks
        .into_iter()
        .find(|c| c.name == "lag")
        .unwrap();
    assert_eq!(lag.status, Status::Warning, "{lag:?}");
    stop.send_replace(true);
    task.await.unwrap();
}

/// `sluice serve` starts a consumer and a source together: the consumer may find the stream
/// empty, and so at its head, before the source has said it is backfilling. The backfill's
/// backlog is still not lag: the consumer is `initializing` again, and no warning comes and
/// goes, not even when the backfill ends with a backlog left to apply.
#[tokio::test]
async fn a_backfill_that_starts_after_the_consumer_reached_the_head_does_not_alert() {
    let s = setup(&PG, "lateload").await;
    let alerts = Arc::new(Collect::default());
    let (handle, stop, task) =
        running_at_the_head(alerting_consumer(&s, "lateload", &alerts)).await;
    s.stream.set_backfilling(SYNC, Provider::Postgres, true);
    backfill_pages(&s).await;
    wait_until("initializing again", 20, async || {
        handle.health().await.checks.iter().any(|c| {
            c.name == "lag"
                && c.status == Status::Initializing
                && c.message.starts_with("backfilling")
        })
    })
    .await;
    end_backfill_without_alerts(&s, &handle, &alerts).await;
    stop.send_replace(true);
    task.await.unwrap();
}

/// The lag check as a health request runs it.
async fn lag(handle: &ConsumerHandle) -> sluice_core::Check {
    let health = handle.health().await;
    health.checks.into_iter().find(|c| c.name == "lag").unwrap()
}

/// A backfill can go by without the consumer seeing it run: begun and ended while the
/// consumer was paused. Its records are still initial state: `initializing`, with no warning,
/// until the consumer has reached the head after it; then falling behind is lag again.
#[tokio::test]
async fn a_backfill_that_went_by_while_paused_is_not_lag() {
    let s = setup(&PG, "unseen").await;
    let alerts = Arc::new(Collect::default());
    let (handle, stop, task) = running_at_the_head(alerting_consumer(&s, "unseen", &alerts)).await;
    handle.pause("holding back".into()).await.unwrap();
    s.stream.set_backfilling(SYNC, Provider::Postgres, true);
    fill(&s, 0..2000).await;
    s.stream.set_backfilling(SYNC, Provider::Postgres, false);
    let check = lag(&handle).await;
    assert_eq!(check.status, Status::Initializing, "{check:?}");
    handle.resume().await.unwrap();
    healthy_without_alerts(&s, &handle, &alerts).await;
    handle.pause("holding back".into()).await.unwrap();
    fill(&s, 100_000..100_500).await;
    let check = lag(&handle).await;
    assert_eq!(check.status, Status::Warning, "{check:?}");
    stop.send_replace(true);
    task.await.unwrap();
}

/// A target whose writes each wait for a permit, counting the writes begun.
struct Gated {
    inner: ConsumerTableTarget,
    permits: tokio::sync::Semaphore,
    begun: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Health for Gated {
    async fn health(&self) -> sluice_core::HealthReport {
        self.inner.health().await
    }
}

#[async_trait::async_trait]
impl sluice_core::Target for Gated {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn checkpoint(&self, consumer: &ConsumerId) -> sluice_core::Result<sluice_core::Seq> {
        self.inner.checkpoint(consumer).await
    }
    async fn reset_checkpoint(&self, consumer: &ConsumerId) -> sluice_core::Result<()> {
        self.inner.reset_checkpoint(consumer).await
    }
    async fn apply(
        &self,
        consumer: &ConsumerId,
        batch: &sluice_core::Batch,
    ) -> sluice_core::Result<()> {
        self.begun.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.permits.acquire().await.unwrap().forget();
        self.inner.apply(consumer, batch).await
    }
}

/// A batch that waited for more of a backfill, and so ended without knowing whether it
/// reached the head, does not count as reaching it: when the backfill ends while that batch
/// is written, the rest of the backfill is still initial state, not lag.
#[tokio::test]
async fn a_batch_that_waited_for_a_backfill_does_not_end_it() {
    let s = setup(&PG, "waited").await;
    let alerts = Arc::new(Collect::default());
    let target = Arc::new(Gated {
        inner: ConsumerTableTarget::new("warehouse", s.settings.clone(), s.table.clone(), 1),
        permits: tokio::sync::Semaphore::new(0),
        begun: Default::default(),
    });
    let runtime = ConsumerRuntime::new(
        ConsumerId::from("waited"),
        RecordFilter::Provider(Provider::Postgres),
        s.stream.clone(),
        target.clone(),
        BatchConfig {
            max_records: 20_000,
            max_wait_ms: 20,
        },
        LagThresholds {
            warn_records: 200,
            ..LagThresholds::default()
        },
    )
    .with_alert_sink(alerts.clone());
    let (handle, stop, task) = running_at_the_head(runtime).await;
    // A first page, which the consumer takes, waits on for more, then writes: held there.
    s.stream.set_backfilling(SYNC, Provider::Postgres, true);
    fill(&s, 0..1000).await;
    let begun = async |n: usize| target.begun.load(std::sync::atomic::Ordering::SeqCst) >= n;
    wait_until("the first batch written", 20, async || begun(1).await).await;
    // The rest of the backfill, and its end, while that batch is written.
    fill(&s, 1000..3000).await;
    s.stream.set_backfilling(SYNC, Provider::Postgres, false);
    target.permits.add_permits(1);
    wait_until("the second batch written", 20, async || begun(2).await).await;
    let check = lag(&handle).await;
    assert_eq!(check.status, Status::Initializing, "{check:?}");
    target.permits.add_permits(1000);
    healthy_without_alerts(&s, &handle, &alerts).await;
    stop.send_replace(true);
    task.await.unwrap();
}

/// A record the target refuses for good (a data error: `GiveUp`) is found by halving its
/// batch: the records before it are written, the consumer pauses naming it, and nothing is
/// resent in a loop. Resumed after the fix, it carries on from that record.
#[tokio::test]
async fn a_record_the_target_refuses_pauses_the_consumer_naming_it_without_a_retry_loop() {
    let s = setup(&PG, "poison").await;
    PG.execute(
        &s.db,
        "create sequence public.poison_attempts;
         create function public.refuse_poison() returns trigger language plpgsql security definer as $$
         begin
           if new.upstream_id = '000007' then
             perform nextval('public.poison_attempts');
             raise exception 'record 7 cannot be stored here' using errcode = '22023';
           end if;
           return new;
         end $$;
         create trigger refuse before insert or update on sluice.records
           for each row execute function public.refuse_poison();",
    )
    .await
    .unwrap();
    fill(&s, 0..20).await;
    let (handle, stop, task) = start(&s, RecordFilter::Provider(Provider::Postgres), "poison");
    wait_until(
        "the consumer pauses on the refused record",
        30,
        async || handle.health().await.status >= Status::Paused,
    )
    .await;
    let report = handle.health().await;
    let target = report.checks.iter().find(|c| c.name == "target").unwrap();
    assert!(
        target.message.contains("000007") && target.message.contains("cannot be stored here"),
        "{report:#?}"
    );
    let written: Vec<String> = target_rows(&PG, &s)
        .await
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(
        written,
        (0..7).map(|i| format!("{i:06}")).collect::<Vec<_>>()
    );
    let attempts = async || {
        let mut conn = PG.admin(&s.db).await.unwrap();
        sqlx::query_scalar::<_, i64>("select last_value from public.poison_attempts")
            .fetch_one(&mut conn)
            .await
            .unwrap()
    };
    let before = attempts().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(attempts().await, before, "the refused record is not resent");

    PG.execute(&s.db, "drop trigger refuse on sluice.records")
        .await
        .unwrap();
    handle.resume().await.unwrap();
    wait_until("every record is written after the fix", 30, async || {
        target_rows(&PG, &s).await.len() == 20
    })
    .await;
    wait_until("healthy again", 20, async || {
        handle.health().await.status == Status::Healthy
    })
    .await;
    stop.send_replace(true);
    task.await.unwrap();
}

/// A consumer that has caught up applies what it reads at once, however long `max_wait_ms` is;
/// only while a source is backfilling does a batch that is not full wait for more.
#[tokio::test]
async fn caught_up_applies_at_once_and_only_a_backfill_waits_for_fuller_batches() {
    let s = setup(&PG, "atonce").await;
    let wait = Duration::from_secs(8);
    let batch = BatchConfig {
        max_records: 1000,
        max_wait_ms: wait.as_millis() as u64,
    };
    let filter = RecordFilter::Provider(Provider::Postgres);
    let (_handle, stop, task) = start_batching(&s, filter, "atonce", batch);
    let count = async || target_rows(&PG, &s).await.len();
    // The first record once the consumer has started (its start is not what is measured).
    s.stream
        .append(vec![rec(SYNC, Provider::Postgres, 0, 1, false)])
        .await
        .unwrap();
    wait_until("the consumer has started", 30, async || count().await == 1).await;
    for id in 1..=3 {
        let appended = Instant::now();
        s.stream
            .append(vec![rec(SYNC, Provider::Postgres, id, 1, false)])
            .await
            .unwrap();
        wait_until("the record is applied", 30, async || {
            count().await == id + 1
        })
        .await;
        assert!(
            appended.elapsed() < wait / 2,
            "record {id} waited {:?} with max_wait {wait:?}",
            appended.elapsed()
        );
    }

    // Backfilling: the one record read waits for company, up to max_wait.
    s.stream.set_backfilling(SYNC, Provider::Postgres, true);
    let appended = Instant::now();
    s.stream
        .append(vec![rec(SYNC, Provider::Postgres, 4, 1, false)])
        .await
        .unwrap();
    wait_until("the backfilled record is applied", 60, async || {
        count().await == 5
    })
    .await;
    assert!(
        appended.elapsed() >= wait - Duration::from_secs(1),
        "applied after {:?}, before max_wait {wait:?}",
        appended.elapsed()
    );
    stop.send_replace(true);
    task.await.unwrap();
}

/// While a source is backfilling, a batch of large records is full once it holds the bytes at
/// which the stream ends a read (`READ_BYTES`), however few records that is: it is applied at
/// once, not held for `max_wait_ms` while `max_records` more are read into memory.
#[tokio::test]
async fn a_backfill_of_large_records_makes_full_batches_of_megabytes() {
    let s = setup(&PG, "largerecs").await;
    let wait = Duration::from_secs(8);
    s.stream.set_backfilling(SYNC, Provider::Postgres, true);
    // 24 records of about 1 MiB each, in three appends: more than the stream keeps in memory,
    // so the consumer reads them from the file.
    let large = |id: usize| {
        let note = format!("{id:06}").repeat(175_000);
        Record {
            change: Change::upsert(json!({"id": id, "note": note})).unwrap(),
            ..rec(SYNC, Provider::Postgres, id, 1, false)
        }
    };
    for first in [0, 8, 16] {
        s.stream
            .append((first..first + 8).map(large).collect())
            .await
            .unwrap();
    }
    let batch = BatchConfig {
        max_records: 1000,
        max_wait_ms: wait.as_millis() as u64,
    };
    let started = Instant::now();
    let filter = RecordFilter::Provider(Provider::Postgres);
    let (_handle, stop, task) = start_batching(&s, filter, "largerecs", batch);
    wait_until("every large record is applied", 60, async || {
        target_rows(&PG, &s).await.len() == 24
    })
    .await;
    assert!(
        started.elapsed() < wait / 2,
        "applied after {:?}: a batch of megabytes waited for max_wait {wait:?}",
        started.elapsed()
    );
    assert_eq!(target_rows(&PG, &s).await, stream_rows(&s).await);
    stop.send_replace(true);
    task.await.unwrap();
}

//! Sources that are physical standbys (PostgreSQL 16+), promotion, and failover slots (17+),
//! against a primary and a streaming standby started by the test kit. On versions that cannot
//! do it, the same tests check that sluice refuses with the reason and the fix.
//!
//! The cross-version suite (`cargo xtask versions`) runs this file on every version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sluice_core::{ErrorClass, RecordStream, SyncId};
use sluice_localpg::{Cluster, StandbyOptions};
use sluice_source_pg::{
    PostgresSource, SourceOptions, SourceSpec, check, ensure_publication_and_slot,
};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::ConnectionSettings;
use tokio::sync::watch;
use uuid::Uuid;

mod support;
use support::{live, stream_rows, table_rows};

const SYNC: SyncId = SyncId(Uuid::from_u128(0x57a_db1e));

fn settings(pg: &Cluster) -> ConnectionSettings {
    let mut settings = ConnectionSettings::from_url(&pg.url("postgres")).unwrap();
    settings.password = Some(SecretString::from(pg.superuser_password().to_owned()));
    settings
}

fn spec(failover: bool) -> SourceSpec {
    SourceSpec {
        publication: "p".into(),
        slot: "s".into(),
        failover,
    }
}

async fn sql(pg: &Cluster, statement: &str) {
    pg.execute("postgres", statement)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

async fn scalar<T>(pg: &Cluster, query: &str) -> T
where
    T: Send + Unpin + for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    let mut conn = pg.admin("postgres").await.unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
}

/// A yes/no question to a standby while waiting for it: a query there may be cancelled by a
/// conflict with recovery, which counts as "not yet".
async fn polled(pg: &Cluster, query: &str) -> bool {
    let Ok(mut conn) = pg.admin("postgres").await else {
        return false;
    };
    sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(query.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap_or(false)
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, secs: u64, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A primary with `public.items` (2,000 rows) published.
async fn primary() -> Cluster {
    let primary = Cluster::options().source().start().unwrap();
    let via_root = if primary.binaries().major() >= Some(13) {
        " with (publish_via_partition_root = true)"
    } else {
        ""
    };
    sql(
        &primary,
        &format!(
            "create table public.items (id bigint primary key, n int not null, body text not null);
             insert into public.items select i, 0, 'row ' || i from generate_series(1, 2000) i;
             create publication p for all tables{via_root};"
        ),
    )
    .await;
    primary
}

/// Waits until `standby` has replayed everything `primary` has written so far.
async fn caught_up(primary: &Cluster, standby: &Cluster) {
    let target: String = scalar(primary, "select pg_current_wal_lsn()::text").await;
    wait_until(
        "the standby has replayed the primary's WAL",
        60,
        async || {
            polled(
                standby,
                &format!("select pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"),
            )
            .await
        },
    )
    .await;
}

/// `id → (n, body)` of `public.items` on `pg`.
async fn rows(pg: &Cluster) -> support::Rows {
    table_rows(&mut pg.admin("postgres").await.unwrap(), "public.items").await
}

/// What the stream holds of `public.items`, in the same form.
async fn streamed(stream: &EmbeddedStream) -> support::Rows {
    stream_rows(&live(stream, "public.items").await)
}

async fn wait_equal(stream: &EmbeddedStream, pg: &Cluster, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (want, have) = (rows(pg).await, streamed(stream).await);
        if want == have {
            return;
        }
        if Instant::now() > deadline {
            let differ: Vec<&String> = want
                .keys()
                .filter(|k| want.get(*k) != have.get(*k))
                .take(5)
                .collect();
            panic!(
                "{what}: the stream differs ({} rows upstream, {} in the stream; first differing: {differ:?})",
                want.len(),
                have.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start(pg: &Cluster, failover: bool, stream: Arc<dyn RecordStream>) -> Running {
    let source = PostgresSource::new(
        "app",
        SYNC,
        settings(pg),
        spec(failover),
        stream,
        SourceOptions {
            create_missing: true,
            backfill_page: 100,
            heartbeat: Duration::from_millis(500),
            ..SourceOptions::default()
        },
    );
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { source.run_until(stopped).await });
    Running { stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// Updates, deletes and inserts on `pg`, each statement its own transaction.
async fn churn(pg: &Cluster, round: i64) {
    let lo = (round * 137) % 2000;
    sql(
        pg,
        &format!(
            "update public.items set n = n + 1, body = 'round {round}' where id between {lo} and {lo} + 40;
             delete from public.items where id % 211 = {round} % 211;
             insert into public.items values ({}, {round}, 'new') on conflict (id) do update set n = excluded.n;",
            10_000 + round
        ),
    )
    .await;
}

/// Creating a logical slot on a standby waits for the primary to log its running
/// transactions; the primary does every 15 s while busy. This makes it log one now and then.
fn hurry_standby_snapshots(primary: &Cluster) -> tokio::task::JoinHandle<()> {
    let options = primary.admin_options("postgres");
    tokio::spawn(async move {
        use sqlx::Connection;
        loop {
            if let Ok(mut conn) = sqlx::PgConnection::connect_with(&options).await {
                let _ = sqlx::query("select pg_log_standby_snapshot()")
                    .execute(&mut conn)
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test]
async fn a_standby_source_streams_the_primarys_changes_and_carries_on_after_promotion() {
    let primary = primary().await;
    let major = primary.binaries().major().unwrap();
    let standby = primary.standby(StandbyOptions::default()).await.unwrap();
    caught_up(&primary, &standby).await;

    if major < 16 {
        // Before 16 a standby cannot decode: the check and the source say so, with the fix.
        let report = check(&settings(&standby), &spec(false)).await;
        let finding = report
            .findings
            .iter()
            .find(|f| f.check == "standby")
            .unwrap_or_else(|| panic!("{}", report.render()));
        assert!(!finding.ok, "{}", report.render());
        assert!(
            finding
                .message
                .contains("cannot decode logical changes on a standby (16 and later can)"),
            "{}",
            report.render()
        );
        assert!(finding.fix.as_deref().unwrap().contains("primary"));
        let err = ensure_publication_and_slot(&settings(&standby), &spec(false))
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::FixConfiguration, "{err}");
        assert!(err.to_string().contains("16 and later"), "{err}");
        return;
    }

    // The check passes on a standby set up as documented (only the slot is still missing).
    let report = check(&settings(&standby), &spec(false)).await;
    assert_eq!(report.failing(), ["slot"], "{}", report.render());

    let hurry = hurry_standby_snapshots(&primary);
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let running = start(&standby, false, stream.clone());
    // Changes on the primary while the backfill reads the standby.
    for round in 1..=30 {
        churn(&primary, round).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    caught_up(&primary, &standby).await;
    wait_equal(
        &stream,
        &primary,
        "changes on the primary, read from the standby",
    )
    .await;
    // The slot is on the standby; the primary decodes nothing.
    let on_primary: i64 = scalar(
        &primary,
        "select count(*) from pg_replication_slots where slot_type = 'logical'",
    )
    .await;
    assert_eq!(on_primary, 0);
    wait_until("the slot is found on the standby", 10, async || {
        polled(
            &standby,
            "select count(*) = 1 from pg_replication_slots where slot_name = 's'",
        )
        .await
    })
    .await;
    hurry.abort();

    // Failover mid-stream: more changes, the primary goes away, the standby is promoted and
    // takes writes; sluice carries on from the same slot.
    for round in 31..=40 {
        churn(&primary, round).await;
    }
    caught_up(&primary, &standby).await;
    primary.stop().unwrap();
    standby.promote().unwrap();
    for round in 41..=60 {
        churn(&standby, round).await;
    }
    wait_equal(&stream, &standby, "after the promotion").await;
    running.stop().await;
}

#[tokio::test]
async fn the_check_names_what_a_standby_lacks_with_its_fix() {
    let primary = primary().await;
    let standby = primary
        .standby(StandbyOptions::default().hot_standby_feedback(false))
        .await
        .unwrap();
    caught_up(&primary, &standby).await;
    let report = check(&settings(&standby), &spec(false)).await;
    let finding = |name: &str| {
        report
            .findings
            .iter()
            .find(|f| f.check == name)
            .unwrap_or_else(|| panic!("no {name} in {}", report.render()))
    };
    if primary.binaries().major() < Some(16) {
        assert!(!finding("standby").ok, "{}", report.render());
        return;
    }
    assert!(finding("standby").ok, "{}", report.render());
    let feedback = finding("hot_standby_feedback");
    assert!(!feedback.ok, "{}", report.render());
    assert!(
        feedback
            .fix
            .as_deref()
            .unwrap()
            .contains("alter system set hot_standby_feedback = on"),
        "{}",
        report.render()
    );
    // A missing publication is made on the primary: the fix says so.
    let mut spec = spec(false);
    spec.publication = "elsewhere".into();
    let report = check(&settings(&standby), &spec).await;
    let publication = report
        .findings
        .iter()
        .find(|f| f.check == "publication")
        .unwrap();
    assert!(
        publication
            .fix
            .as_deref()
            .unwrap()
            .starts_with("on the primary (a standby is read-only): create publication"),
        "{}",
        report.render()
    );
}

#[tokio::test]
async fn a_failover_slot_survives_the_primarys_failover() {
    let primary = primary().await;
    let major = primary.binaries().major().unwrap();
    if major < 17 {
        let err = ensure_publication_and_slot(&settings(&primary), &spec(true))
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::FixConfiguration, "{err}");
        assert!(
            err.to_string()
                .contains("no failover slots (17 and later do)"),
            "{err}"
        );
        return;
    }
    let standby = primary
        .standby(StandbyOptions::default().setting("sync_replication_slots", "on"))
        .await
        .unwrap();
    let physical = standby.standby_slot().await.unwrap();
    // Logical changes are not sent further than the standby has received.
    sql(
        &primary,
        &format!("alter system set synchronized_standby_slots = '{physical}'"),
    )
    .await;
    sql(&primary, "select pg_reload_conf()").await;

    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let running = start(&primary, true, stream.clone());
    for round in 1..=20 {
        churn(&primary, round).await;
    }
    wait_equal(&stream, &primary, "before the failover").await;
    let failover: bool = scalar(
        &primary,
        "select failover from pg_replication_slots where slot_name = 's'",
    )
    .await;
    assert!(failover, "sluice made a failover slot");
    // The standby keeps a copy of the slot, as far as sluice has confirmed.
    wait_until("the standby has synced the slot", 90, async || {
        let confirmed: Option<String> = scalar(
            &primary,
            "select confirmed_flush_lsn::text from pg_replication_slots where slot_name = 's'",
        )
        .await;
        let Some(confirmed) = confirmed else {
            return false;
        };
        polled(
            &standby,
            &format!(
                "select coalesce((select synced and confirmed_flush_lsn >= '{confirmed}'::pg_lsn
                                  from pg_replication_slots where slot_name = 's'), false)"
            ),
        )
        .await
    })
    .await;

    // The primary fails; the standby is promoted; sluice is pointed at it and carries on.
    running.stop().await;
    for round in 21..=30 {
        churn(&primary, round).await;
    }
    caught_up(&primary, &standby).await;
    primary.stop().unwrap();
    standby.promote().unwrap();
    for round in 31..=50 {
        churn(&standby, round).await;
    }
    let running = start(&standby, true, stream.clone());
    wait_equal(&stream, &standby, "after the failover").await;
    running.stop().await;
}

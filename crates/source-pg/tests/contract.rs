//! The PostgreSQL source through the `Source` contract only, as `sluice serve`, `config plan`
//! and `check` use it: plan and check change nothing, collections come from the catalog, run
//! stops when its future resolves, progress counts what was appended.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sluice_core::{Refused, Source, Status, SyncId};
use sluice_localpg::Cluster;
use sluice_source_pg::{PostgresSource, SourceOptions, SourceSpec};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::ConnectionSettings;

static PG: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .source()
        .start()
        .expect("start PostgreSQL")
});

async fn slot_exists(db: &str, slot: &str) -> bool {
    let mut conn = PG.admin(db).await.unwrap();
    sqlx::query_scalar("select exists (select 1 from pg_replication_slots where slot_name = $1)")
        .bind(slot)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_postgres_source_keeps_the_source_contract() {
    let db = PG.fresh_database("contract").await.unwrap();
    PG.execute(
        &db,
        &format!(
            "create role {db}_repl login replication password 'pw';
             create table orders (id bigint primary key, total numeric(10,2), note text);
             insert into orders select g, g * 1.5, 'n' || g from generate_series(1, 250) g;
             grant select on all tables in schema public to {db}_repl;
             create publication {db}_pub for all tables;"
        ),
    )
    .await
    .unwrap();
    let mut settings =
        ConnectionSettings::from_url(&PG.url_as(&format!("{db}_repl"), Some("pw"), &db, None))
            .unwrap();
    settings.password = Some(SecretString::from("pw".to_owned()));
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    let spec = SourceSpec {
        publication: format!("{db}_pub"),
        slot: format!("{db}_slot"),
        failover: false,
    };
    let make = |create_missing: bool| -> Arc<dyn Source> {
        Arc::new(PostgresSource::new(
            "app",
            SyncId::new_random(),
            settings.clone(),
            spec.clone(),
            stream.clone(),
            SourceOptions {
                create_missing,
                heartbeat: Duration::from_millis(500),
                ..SourceOptions::default()
            },
        ))
    };

    // Plan: adopt the publication; the missing slot stops a source that may not create it,
    // and the fix says how. Nothing is created by planning or checking.
    let strict = make(false);
    let plan = strict.plan().await;
    let finding = |check: &str| {
        plan.findings
            .iter()
            .find(|f| f.check == check)
            .unwrap_or_else(|| panic!("no {check} in {plan:?}"))
            .clone()
    };
    assert!(finding("publication").ok, "{plan:?}");
    assert!(
        finding("publication")
            .message
            .contains("adopt the existing publication")
    );
    let slot = finding("slot");
    assert!(
        !slot.ok
            && slot
                .fix
                .as_deref()
                .is_some_and(|f| f.contains("create_missing")),
        "{slot:?}"
    );
    assert!(!plan.is_ok());
    let lenient = make(true);
    let plan = lenient.plan().await;
    assert!(plan.is_ok(), "{plan:?}");
    assert!(
        plan.render().contains("would create the slot"),
        "{}",
        plan.render()
    );
    let check = lenient.check().await;
    assert!(
        check
            .findings
            .iter()
            .any(|f| f.check == "wal_level" && f.ok),
        "{check:?}"
    );
    assert!(
        !slot_exists(&db, &spec.slot).await,
        "plan and check created nothing"
    );

    // Collections: the published table, its columns in order and its key.
    let collections = lenient.collections().await.unwrap();
    assert_eq!(collections.len(), 1, "{collections:?}");
    assert_eq!(collections[0].id.0, "public.orders");
    let schema = collections[0].schema.as_ref().unwrap();
    let columns: Vec<(&str, &str)> = schema
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.sql_type.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("id", "bigint"),
            ("total", "numeric(10,2)"),
            ("note", "text")
        ]
    );
    assert_eq!(schema.key, ["id"]);

    // A pulling source refuses delivered records.
    assert!(matches!(
        lenient.receive(b"{\"records\": []}").await,
        Err(Refused::NotAccepted(why)) if why.contains("only http syncs")
    ));

    // Run until the stop future resolves; progress counts the backfill.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn({
        let source = lenient.clone();
        async move {
            source
                .run(Box::pin(async move {
                    let _ = stopped.await;
                }))
                .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while lenient.progress().appended < 250 {
        assert!(Instant::now() < deadline, "{:?}", lenient.health().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let progress = lenient.progress();
    assert_eq!(progress.appended, 250);
    assert_eq!(progress.details["backfill"]["done"], true, "{progress:?}");
    assert!(
        progress.details.contains_key("confirmed_lsn"),
        "{progress:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while lenient.health().await.status != Status::Healthy {
        assert!(Instant::now() < deadline, "{:?}", lenient.health().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("run returns once stop resolves")
        .unwrap();
    assert!(
        slot_exists(&db, &spec.slot).await,
        "the running source created its slot"
    );
}

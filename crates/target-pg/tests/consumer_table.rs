//! The consumer table's DDL and column-by-column verification, against a real server.

mod common;

use std::sync::LazyLock;

use common::provision;
use sluice_localpg::Cluster;
use sluice_target_pg::{ConsumerTable, ConsumerTableTarget, Severity};

static PG: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .target()
        .start()
        .expect("start PostgreSQL")
});

#[tokio::test]
async fn the_ddl_table_verifies_clean_for_the_sync_user() {
    let p = provision(&PG, "clean", "sluice", "records").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let v = target.verify().await.unwrap();
    assert!(v.findings.is_empty(), "{v:#?}");
}

#[tokio::test]
async fn a_missing_table_is_reported_with_its_create_table() {
    let p = provision(&PG, "missing", "sluice", "records").await;
    let target = ConsumerTableTarget::new(
        "t",
        p.settings.clone(),
        ConsumerTable::new("sluice", "nope"),
        1,
    );
    let v = target.verify().await.unwrap();
    assert_eq!(v.findings.len(), 1);
    assert_eq!(v.findings[0].severity, Severity::Error);
    assert_eq!(
        v.findings[0].fix,
        ConsumerTable::new("sluice", "nope").ddl()
    );
}

/// Breaks the table in every way the verifier knows, checks each finding, runs every fix as
/// the owner, and expects a clean table afterwards.
#[tokio::test]
async fn each_problem_is_reported_and_its_fix_repairs_it() {
    let p = provision(&PG, "broken", "sluice", "records").await;
    let t = p.table.qualified();
    PG.execute(
        &p.db,
        &format!(
            "alter table {t} alter column payload type json;
             alter table {t} alter column updated_at drop not null;
             alter table {t} drop column inserted_at;
             alter table {t} drop constraint records_pkey;
             alter table {t} add column note text not null;
             alter table {t} add constraint one_per_upstream unique (upstream_id);
             create table sluice.parent (id text primary key);
             alter table {t} add constraint fk_parent foreign key (collection_id) references sluice.parent (id);
             create function sluice.noop() returns trigger language plpgsql as $$ begin return new; end $$;
             create trigger audit before insert on {t} for each row execute function sluice.noop();
             create unique index by_payload_id on {t} ((sync_id::text || upstream_id));
             revoke delete on {t} from {u};",
            u = sluice_core::sql::quote_ident(&p.user)
        ),
    )
    .await
    .unwrap();

    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    let v = target.verify().await.unwrap();
    let errors: Vec<_> = v.of(Severity::Error).map(|f| f.message.clone()).collect();
    let warnings: Vec<_> = v.of(Severity::Warning).map(|f| f.message.clone()).collect();
    let has = |list: &[String], needle: &str| list.iter().any(|m| m.contains(needle));
    assert!(
        has(
            &errors,
            "column payload of \"sluice\".\"records\" is json, but sluice writes jsonb"
        ),
        "{errors:#?}"
    );
    assert!(
        has(
            &errors,
            "column updated_at of \"sluice\".\"records\" allows nulls"
        ),
        "{errors:#?}"
    );
    assert!(has(&errors, "has no column inserted_at"), "{errors:#?}");
    assert!(
        has(&errors, "needs sequin_id as its primary key"),
        "{errors:#?}"
    );
    assert!(
        has(&errors, "column \"note\" that sluice does not write"),
        "{errors:#?}"
    );
    assert!(has(&errors, "may not read and write"), "{errors:#?}");
    assert!(
        has(&warnings, "unique constraint \"one_per_upstream\"")
            && has(&warnings, "ordering per record but not across records"),
        "{warnings:#?}"
    );
    assert!(
        has(&warnings, "foreign key \"fk_parent\"")
            && has(
                &warnings,
                "parent of a record is forwarded before the child"
            ),
        "{warnings:#?}"
    );
    assert!(has(&warnings, "trigger \"audit\""), "{warnings:#?}");
    assert!(has(&warnings, "unique index"), "{warnings:#?}");
    // Errors come first, and every message says who can run the fix.
    assert_eq!(v.findings[0].severity, Severity::Error);
    assert!(
        v.findings
            .iter()
            .all(|f| f.message.contains("run the fix as the table's owner"))
    );

    for finding in &v.findings {
        PG.execute(&p.db, &finding.fix)
            .await
            .unwrap_or_else(|e| panic!("fix {:?} failed: {e}", finding.fix));
    }
    let after = target.verify().await.unwrap();
    assert!(after.findings.is_empty(), "{after:#?}");
}

#[tokio::test]
async fn odd_schema_and_table_names_verify() {
    let p = provision(&PG, "odd", "my schema", "We're \"odd\" Ünïcode").await;
    let target = ConsumerTableTarget::new("t", p.settings.clone(), p.table.clone(), 1);
    assert!(target.verify().await.unwrap().findings.is_empty());
}

/// Four consumer tables in one schema that does not exist yet, set up at the same moment (as
/// `sluice serve` starts the consumers of one config), twenty times: every one is created and
/// healthy. Without the schema's DDL lock, PostgreSQL reports the race as a unique violation
/// in `pg_type` or `tuple concurrently updated`.
#[tokio::test]
async fn consumers_started_together_in_one_new_schema_all_come_up_healthy() {
    let p = provision(&PG, "race", "unused", "records").await;
    PG.execute(&p.db, "create role race_read").await.ok();
    for round in 0..20 {
        let schema = format!("together_{round}");
        let targets: Vec<_> = (0..4)
            .map(|i| {
                std::sync::Arc::new(
                    ConsumerTableTarget::new(
                        format!("t{i}"),
                        p.settings.clone(),
                        ConsumerTable::new(&schema, format!("records_{i}")),
                        1,
                    )
                    .create_if_missing("race_read"),
                )
            })
            .collect();
        let started: Vec<_> = targets
            .iter()
            .map(|t| {
                let t = t.clone();
                tokio::spawn(async move {
                    use sluice_core::Target;
                    t.checkpoint(&sluice_core::ConsumerId::from("c")).await
                })
            })
            .collect();
        for (i, task) in started.into_iter().enumerate() {
            let result = task.await.unwrap();
            assert!(result.is_ok(), "round {round}, consumer {i}: {result:?}");
        }
        for t in &targets {
            let report = t.check().await;
            assert_eq!(
                report.status,
                sluice_core::Status::Healthy,
                "round {round}: {report:#?}"
            );
        }
    }
}

/// A table the target will create on its first write (`create_if_missing`, as `sluice serve`
/// sets it up) is initializing until then, not an error whose fix is the `create table` sluice
/// is about to run: the demo alerted it at start when health looked before the first batch.
/// Once made, a table gone is an error again (the rows written went with it); without
/// `create_if_missing` a missing table is an error from the start.
#[tokio::test]
async fn a_table_the_target_will_create_is_initializing_not_an_error() {
    use sluice_core::{ConsumerId, Status, Target};
    let p = provision(&PG, "later", "sluice", "records").await;
    PG.execute(&p.db, "create role later_read").await.ok();
    let table = ConsumerTable::new("sluice", "later");
    let check = |report: &sluice_core::HealthReport| {
        report
            .checks
            .iter()
            .find(|c| c.name == "table")
            .cloned()
            .unwrap_or_else(|| panic!("no table check: {report:#?}"))
    };

    let plain = ConsumerTableTarget::new("plain", p.settings.clone(), table.clone(), 1);
    let report = plain.check().await;
    assert_eq!(check(&report).status, Status::Error, "{report:#?}");
    assert_eq!(check(&report).fix.as_deref(), Some(table.ddl().as_str()));

    let target = ConsumerTableTarget::new("t", p.settings.clone(), table.clone(), 1)
        .create_if_missing("later_read");
    let report = target.check().await;
    let before = check(&report);
    assert_eq!(before.status, Status::Initializing, "{report:#?}");
    assert_eq!(
        before.message,
        "\"sluice\".\"later\" is created when the consumer first writes"
    );
    assert_eq!(before.fix, None);
    assert_eq!(report.status, Status::Initializing, "{report:#?}");

    target.checkpoint(&ConsumerId::from("c")).await.unwrap();
    let report = target.check().await;
    assert_eq!(report.status, Status::Healthy, "{report:#?}");

    PG.execute(&p.db, "drop table sluice.later").await.unwrap();
    let report = target.check().await;
    assert_eq!(check(&report).status, Status::Error, "{report:#?}");
    assert_eq!(report.status, Status::Error, "{report:#?}");

    // A schema the sync user may use but not create in: the first write could not make the
    // table, so its absence is an error now.
    PG.execute(
        &p.db,
        &format!(
            "create schema usage_only; grant usage on schema usage_only to {}",
            sluice_core::sql::quote_ident(&p.user)
        ),
    )
    .await
    .unwrap();
    let cannot = ConsumerTableTarget::new(
        "cannot",
        p.settings.clone(),
        ConsumerTable::new("usage_only", "later"),
        1,
    )
    .create_if_missing("later_read");
    let report = cannot.check().await;
    assert_eq!(check(&report).status, Status::Error, "{report:#?}");
}

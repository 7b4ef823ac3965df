//! `sluice source check` and the publication/slot setup against real servers.

use std::sync::LazyLock;

use secrecy::SecretString;
use sluice_localpg::{Cluster, Role};
use sluice_source_pg::{SourceSpec, check, ensure_publication_and_slot};
use sluice_target_pg::ConnectionSettings;

static LOGICAL: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .source()
        .start()
        .expect("start PostgreSQL")
});

fn settings(pg: &Cluster, db: &str, user: &str, password: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::from_url(&pg.url_as(user, Some(password), db, None)).unwrap();
    s.password = Some(SecretString::from(password.to_owned()));
    s
}

fn admin(pg: &Cluster, db: &str) -> ConnectionSettings {
    settings(pg, db, "postgres", pg.superuser_password())
}

fn spec(db: &str) -> SourceSpec {
    SourceSpec {
        publication: format!("{db}_pub"),
        slot: format!("{db}_slot"),
        failover: false,
    }
}

fn finding<'a>(report: &'a sluice_core::CheckReport, check: &str) -> &'a sluice_core::Finding {
    report
        .findings
        .iter()
        .find(|f| f.check == check)
        .unwrap_or_else(|| panic!("no {check} in {}", report.render()))
}

#[tokio::test]
async fn a_prepared_source_passes_every_check() {
    let db = LOGICAL.fresh_database("ready").await.unwrap();
    let user = format!("{db}_repl");
    LOGICAL
        .execute(
            &db,
            &format!(
                "create role {user} login replication password 'r';
                 create table public.orders (id bigint primary key, total numeric);
                 create table public.events (id bigint, at timestamptz) ; alter table public.events replica identity full;
                 grant select on all tables in schema public to {user};"
            ),
        )
        .await
        .unwrap();
    let done = ensure_publication_and_slot(&admin(&LOGICAL, &db), &spec(&db))
        .await
        .unwrap();
    assert!(
        done[0].starts_with("created the publication") && done[1].starts_with("created the slot"),
        "publication first: {done:?}"
    );
    let report = check(&settings(&LOGICAL, &db, &user, "r"), &spec(&db)).await;
    assert!(report.is_ok(), "{}", report.render());
    assert!(
        finding(&report, "publication")
            .message
            .contains("publishes 2 table(s) (all tables)")
    );

    let again = ensure_publication_and_slot(&admin(&LOGICAL, &db), &spec(&db))
        .await
        .unwrap();
    assert!(
        again[0].starts_with("adopted") && again[1].starts_with("adopted"),
        "{again:?}"
    );
    // Clean up the slot so the cluster does not hold WAL for it.
    LOGICAL
        .execute(
            &db,
            &format!("select pg_drop_replication_slot('{db}_slot')"),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn each_missing_prerequisite_comes_with_its_fix() {
    let pg = Cluster::options().role(Role::Source).start().unwrap(); // wal_level = replica
    let db = pg.fresh_database("bare").await.unwrap();
    pg.create_role("plain_user", Some("p")).await.unwrap();
    let report = check(&settings(&pg, &db, "plain_user", "p"), &spec(&db)).await;
    assert!(!report.is_ok());
    let wal = finding(&report, "wal_level");
    assert!(!wal.ok && wal.message == "wal_level = replica");
    let fix = wal.fix.as_deref().unwrap();
    assert!(
        fix.contains("wal_level = logical")
            && fix.contains("rds.logical_replication = 1")
            && fix.contains("Supabase"),
        "{fix}"
    );
    let replication = finding(&report, "replication");
    assert_eq!(
        replication.fix.as_deref(),
        Some(
            "alter user \"plain_user\" with replication;  -- on AWS RDS: grant rds_replication to \"plain_user\";"
        )
    );
    let publication = finding(&report, "publication");
    assert!(
        publication
            .fix
            .as_deref()
            .unwrap()
            .starts_with(&format!("create publication \"{db}_pub\" for all tables"))
    );
    assert!(
        finding(&report, "slot")
            .fix
            .as_deref()
            .unwrap()
            .contains("pg_create_logical_replication_slot")
    );
}

#[tokio::test]
async fn published_tables_are_checked_for_select_identity_and_partitioning() {
    let db = LOGICAL.fresh_database("tables").await.unwrap();
    let user = format!("{db}_repl");
    // PostgreSQL 12 cannot publish a partitioned table, only its partitions.
    let before_13 = LOGICAL.binaries().major() < Some(13);
    let measures = if before_13 {
        "public.measures_2026"
    } else {
        "public.measures"
    };
    LOGICAL
        .execute(
            &db,
            &format!(
                "create role {user} login replication password 'r';
                 create table public.keyed (id int primary key);
                 create table public.no_key (v text);
                 create table public.nothing (id int primary key); alter table public.nothing replica identity nothing;
                 create table public.secret (id int primary key);
                 create table public.measures (id int, at date, primary key (id, at)) partition by range (at);
                 create table public.measures_2026 partition of public.measures for values from ('2026-01-01') to ('2027-01-01');
                 grant select on public.keyed, public.no_key, public.nothing, public.measures, public.measures_2026 to {user};
                 create publication {db}_pub for table public.keyed, public.no_key, public.nothing, public.secret, {measures};"
            ),
        )
        .await
        .unwrap();
    let report = check(&settings(&LOGICAL, &db, &user, "r"), &spec(&db)).await;
    let problems: Vec<String> = report
        .findings
        .iter()
        .filter(|f| !f.ok)
        .map(|f| format!("{}: {}", f.check, f.message))
        .collect();
    let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert!(
        has("\"public\".\"no_key\" has no primary key: updates and deletes on it fail"),
        "{problems:#?}"
    );
    assert!(
        has("\"public\".\"nothing\" has replica identity NOTHING"),
        "{problems:#?}"
    );
    assert!(has("cannot SELECT \"public\".\"secret\""), "{problems:#?}");
    if before_13 {
        let partitioned = finding(&report, "partitioned tables");
        assert!(partitioned.ok, "{partitioned:?}");
        assert!(
            partitioned
                .message
                .contains("each partition syncs as a table of its own"),
            "{partitioned:?}"
        );
        return;
    }
    assert!(
        has("partitioned table(s) are published; publish_via_partition_root is false"),
        "{problems:#?}"
    );
    let partitioned = finding(&report, "partitioned tables");
    assert!(partitioned.fix.as_deref().unwrap().starts_with(&format!(
        "alter publication \"{db}_pub\" set (publish_via_partition_root = true);"
    )));
    assert!(
        !has("\"public\".\"keyed\""),
        "a keyed, readable table is fine: {problems:#?}"
    );

    LOGICAL
        .execute(
            &db,
            &format!("alter publication {db}_pub set (publish_via_partition_root = true)"),
        )
        .await
        .unwrap();
    let report = check(&settings(&LOGICAL, &db, &user, "r"), &spec(&db)).await;
    assert!(finding(&report, "partitioned tables").ok);
}

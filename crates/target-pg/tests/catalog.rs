//! The catalog queries against a real server.

use std::sync::LazyLock;

use sluice_localpg::{Cluster, Tls};
use sluice_target_pg::catalog;
use sqlx::{Connection, PgConnection};

static PG: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .tls(Tls::Optional)
        .start()
        .expect("start PostgreSQL")
});

#[tokio::test]
async fn server_facts_describe_the_session() {
    let db = PG.fresh_database("facts").await.unwrap();
    let mut plain = PgConnection::connect(
        &PG.url(&db)
            .replace("sslmode=verify-full", "sslmode=disable"),
    )
    .await
    .unwrap();
    let facts = catalog::server_facts(&mut plain).await.unwrap();
    assert!(facts.major_version() >= 10, "{facts:?}");
    assert!(
        facts
            .version
            .starts_with(&facts.major_version().to_string()),
        "{facts:?}"
    );
    assert_eq!(facts.wal_level, "replica");
    assert_eq!(
        (facts.current_user.as_str(), facts.database.as_str()),
        ("postgres", db.as_str())
    );
    assert!(!facts.ssl);

    let mut tls = PgConnection::connect(&PG.url(&db)).await.unwrap();
    assert!(catalog::server_facts(&mut tls).await.unwrap().ssl);
}

#[tokio::test]
async fn database_privileges_follow_grants() {
    let db = PG.fresh_database("privs").await.unwrap();
    PG.create_role("privs_user", Some("pw")).await.unwrap();
    let url = PG.url_as("privs_user", Some("pw"), &db, None);
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let before = catalog::database_privileges(&mut conn, &db)
        .await
        .unwrap()
        .unwrap();
    assert!(
        before.connect && !before.create,
        "PUBLIC has CONNECT, nobody has CREATE: {before:?}"
    );

    PG.execute(
        "postgres",
        &format!("grant create on database {db} to privs_user"),
    )
    .await
    .unwrap();
    let after = catalog::database_privileges(&mut conn, &db)
        .await
        .unwrap()
        .unwrap();
    assert!(after.create);
    assert_eq!(
        catalog::database_privileges(&mut conn, "no_such_db")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn role_facts_show_attributes() {
    PG.execute("postgres", "create role replicator login replication")
        .await
        .unwrap();
    let mut conn = PG.admin("postgres").await.unwrap();
    let r = catalog::role(&mut conn, "replicator")
        .await
        .unwrap()
        .unwrap();
    assert!(r.can_login && r.replication && !r.superuser);
    assert!(
        catalog::role(&mut conn, "postgres")
            .await
            .unwrap()
            .unwrap()
            .superuser
    );
    assert_eq!(catalog::role(&mut conn, "nobody_here").await.unwrap(), None);
}

//! Schema lifecycle and ownership safety on a real cluster: sluice never drops or alters what
//! its sync user does not own.

use std::sync::LazyLock;

use secrecy::SecretString;
use sluice_core::ErrorClass;
use sluice_localpg::Cluster;
use sluice_provisioning::{
    SchemaUse, SetupSpec, apply, drop_schema, rebuild_schema, rename_schema,
};
use sluice_target_pg::ConnectionSettings;
use sqlx::{Connection, PgConnection};

static PG: LazyLock<Cluster> =
    LazyLock::new(|| Cluster::start_default().expect("start PostgreSQL"));

/// A database set up with sync schema `stripe`; returns (db, sync settings).
async fn setup(prefix: &str) -> (String, ConnectionSettings, SetupSpec) {
    let db = PG.fresh_database(prefix).await.unwrap();
    let mut spec = SetupSpec::new(&db).schema("stripe", SchemaUse::Owned);
    spec.sync_user = format!("{db}_sync");
    spec.read_role = format!("{db}_read");
    spec.sync_password = Some(SecretString::from("pw".to_owned()));
    let mut admin = ConnectionSettings::from_url(&PG.url(&db)).unwrap();
    admin.password = Some(SecretString::from(PG.superuser_password().to_owned()));
    apply(&admin, &spec).await.unwrap();
    let mut sync =
        ConnectionSettings::from_url(&PG.url_as(&spec.sync_user, Some("pw"), &db, None)).unwrap();
    sync.password = Some(SecretString::from("pw".to_owned()));
    // sluice's own table, with a row.
    let mut conn = PgConnection::connect(&PG.url_as(&spec.sync_user, Some("pw"), &db, None))
        .await
        .unwrap();
    sqlx::raw_sql("create table stripe.customer (id text primary key, name text); insert into stripe.customer values ('c1', 'Ada')")
        .execute(&mut conn)
        .await
        .unwrap();
    (db, sync, spec)
}

async fn scalar(db: &str, sql: &str) -> i64 {
    let mut conn = PG.admin(db).await.unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_users_table_and_view_in_a_sync_schema_survive_a_rebuild() {
    let (db, sync, _) = setup("rebuild").await;
    PG.execute(
        &db,
        "create table stripe.notes (v text); insert into stripe.notes values ('mine');
         create view stripe.customer_names as select name from stripe.customer;",
    )
    .await
    .unwrap();
    let emptied = rebuild_schema(&sync, "stripe").await.unwrap();
    assert_eq!(
        emptied,
        vec!["customer".to_owned()],
        "only the sync user's table is emptied"
    );
    assert_eq!(
        scalar(&db, "select count(*) from stripe.notes").await,
        1,
        "the user's table is untouched"
    );
    assert_eq!(
        scalar(&db, "select count(*) from stripe.customer_names").await,
        0,
        "the user's view still works"
    );
    PG.execute(&db, "insert into stripe.customer values ('c2', 'Bo')")
        .await
        .unwrap();
    assert_eq!(
        scalar(&db, "select count(*) from stripe.customer_names").await,
        1
    );
}

#[tokio::test]
async fn dropping_a_sync_schema_refuses_while_foreign_objects_are_in_or_on_it() {
    let (db, sync, _) = setup("dropsafe").await;
    PG.execute(&db, "create table stripe.notes (v text)")
        .await
        .unwrap();
    let err = drop_schema(&sync, "stripe").await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::FixConfiguration);
    assert!(
        err.to_string()
            .contains("table \"notes\" (owner \"postgres\")"),
        "{err}"
    );
    assert!(
        err.to_string().contains("select tableowner from pg_tables"),
        "{err}"
    );

    PG.execute(
        &db,
        "drop table stripe.notes; create view public.customers as select * from stripe.customer",
    )
    .await
    .unwrap();
    let err = drop_schema(&sync, "stripe").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("\"public.customers\" (owner \"postgres\") depend on it"),
        "{err}"
    );
    assert_eq!(
        scalar(&db, "select count(*) from public.customers").await,
        1,
        "the user's view is still there"
    );

    PG.execute(&db, "drop view public.customers").await.unwrap();
    drop_schema(&sync, "stripe").await.unwrap();
    assert_eq!(
        scalar(
            &db,
            "select count(*) from pg_namespace where nspname = 'stripe'"
        )
        .await,
        0
    );
}

#[tokio::test]
async fn renaming_creates_the_new_schema_and_leaves_the_old_one_with_its_drop_statement() {
    let (db, sync, spec) = setup("rename").await;
    let renamed = rename_schema(&sync, &spec.read_role, "stripe", "billing")
        .await
        .unwrap();
    assert!(renamed.backfill_required);
    assert!(
        renamed.message.contains("drop schema \"stripe\" cascade;"),
        "{}",
        renamed.message
    );
    assert_eq!(
        scalar(&db, "select count(*) from stripe.customer").await,
        1,
        "the old schema is left in place"
    );
    let owner: String = {
        let mut conn = PG.admin(&db).await.unwrap();
        sqlx::query_scalar(
            "select pg_get_userbyid(nspowner)::text from pg_namespace where nspname = 'billing'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    assert_eq!(owner, spec.sync_user);
    // Readers can read what sluice creates in the new schema.
    let mut conn = PgConnection::connect(&PG.url_as(&spec.sync_user, Some("pw"), &db, None))
        .await
        .unwrap();
    sqlx::raw_sql("create table billing.customer (id text)")
        .execute(&mut conn)
        .await
        .unwrap();
    PG.create_role(&format!("{db}_reader"), Some("r"))
        .await
        .unwrap();
    PG.execute(
        &db,
        &format!("grant \"{}\" to \"{db}_reader\"", spec.read_role),
    )
    .await
    .unwrap();
    let mut reader =
        PgConnection::connect(&PG.url_as(&format!("{db}_reader"), Some("r"), &db, None))
            .await
            .unwrap();
    sqlx::raw_sql("select * from billing.customer")
        .execute(&mut reader)
        .await
        .unwrap();
}

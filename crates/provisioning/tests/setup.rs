//! Provisioning end to end on real clusters: automated and manual paths reach the same end
//! state, least privilege holds, the read role reads everything sluice creates and nothing else.

use std::process::Command;
use std::sync::LazyLock;

use secrecy::{ExposeSecret, SecretString};
use sluice_core::ErrorClass;
use sluice_localpg::Cluster;
use sluice_provisioning::{
    Preset, SchemaUse, SetupSpec, State, apply, check, grant_read, inspect, plan, revoke_read,
};
use sluice_target_pg::ConnectionSettings;
use sqlx::{Connection, PgConnection};

static PG: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .target()
        .start()
        .expect("start PostgreSQL")
});

fn admin(pg: &Cluster, db: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::from_url(&pg.url(db)).unwrap();
    s.password = Some(SecretString::from(pg.superuser_password().to_owned()));
    s
}

fn as_user(pg: &Cluster, db: &str, user: &str, password: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::from_url(&pg.url_as(user, Some(password), db, None)).unwrap();
    s.password = Some(SecretString::from(password.to_owned()));
    s
}

async fn connect(pg: &Cluster, db: &str, user: &str, password: &str) -> PgConnection {
    PgConnection::connect(&pg.url_as(user, Some(password), db, None))
        .await
        .unwrap()
}

async fn exec(conn: &mut PgConnection, sql: &str) -> Result<(), String> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Asserts that running `sql` is refused for lack of privilege.
async fn assert_denied(conn: &mut PgConnection, sql: &str) {
    let err = exec(conn, sql).await.expect_err(sql);
    assert!(err.contains("permission denied"), "{sql}: {err}");
}

/// A spec with unique role names per test (roles are cluster-wide).
fn spec(db: &str) -> SetupSpec {
    let mut spec = SetupSpec::new(db)
        .schema("stripe", SchemaUse::Owned)
        .schema("sluice_ct", SchemaUse::Granted);
    spec.sync_user = format!("{db}_sync");
    spec.read_role = format!("{db}_read");
    spec.sync_password = Some(SecretString::from("sync-pw".to_owned()));
    spec
}

#[tokio::test]
async fn automated_setup_reaches_the_desired_state_and_a_second_run_changes_nothing() {
    let db = PG.fresh_database("auto").await.unwrap();
    PG.create_role(&format!("{db}_analyst"), Some("a"))
        .await
        .unwrap();
    let mut spec = spec(&db);
    spec.readers = vec![format!("{db}_analyst")];
    let first = apply(&admin(&PG, &db), &spec).await.unwrap();
    let script = first.plan.script(false);
    assert!(
        script.contains(&format!(
            "grant connect, create on database \"{db}\" to \"{db}_sync\";"
        )),
        "{script}"
    );
    assert!(
        script.contains(&format!(
            "create role \"{db}_read\" with admin \"{db}_sync\";"
        )),
        "{script}"
    );
    assert!(
        script.contains("create schema \"stripe\" authorization"),
        "{script}"
    );
    assert!(
        script.contains("-- the sync user sluice logs in as\n"),
        "each statement carries its reason: {script}"
    );
    assert!(
        !script.contains("sync-pw"),
        "the printed plan hides the password: {script}"
    );

    let second = apply(&admin(&PG, &db), &spec).await.unwrap();
    assert!(
        second.plan.is_empty(),
        "a second run plans nothing: {}",
        second.plan.script(false)
    );

    let report = check(&as_user(&PG, &db, &spec.sync_user, "sync-pw"), &spec).await;
    assert!(report.is_ok(), "{}", report.render());
    let json = serde_json::to_value(&report).unwrap();
    assert!(
        json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["ok"] == true)
    );
}

#[tokio::test]
async fn a_generated_password_is_strong_and_returned_once() {
    let db = PG.fresh_database("genpw").await.unwrap();
    let mut spec = spec(&db);
    spec.sync_password = None;
    let applied = apply(&admin(&PG, &db), &spec).await.unwrap();
    let password = applied
        .generated_password
        .expect("a new user gets a generated password");
    assert_eq!(password.expose_secret().len(), 64);
    assert!(
        !applied
            .plan
            .script(false)
            .contains(password.expose_secret())
    );
    connect(&PG, &db, &spec.sync_user, password.expose_secret()).await;
    let again = apply(&admin(&PG, &db), &spec).await.unwrap();
    assert!(
        again.generated_password.is_none(),
        "an existing user keeps its password"
    );
}

#[tokio::test]
async fn the_manual_script_run_twice_through_psql_reaches_the_same_end_state() {
    let db = PG.fresh_database("manual").await.unwrap();
    let spec = spec(&db);
    let script = plan(&spec, None, &SecretString::from("sync-pw".to_owned()))
        .unwrap()
        .script(true);
    for run in 0..2 {
        let out = Command::new(PG.binaries().psql())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &script])
            .arg(PG.url(&db))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "run {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report = check(&as_user(&PG, &db, &spec.sync_user, "sync-pw"), &spec).await;
    assert!(report.is_ok(), "{}", report.render());
    // The automated path finds nothing left to do: the same end state.
    let mut conn = PgConnection::connect(&PG.url(&db)).await.unwrap();
    let state = inspect(&mut conn, &spec).await.unwrap();
    let minimal = plan(&spec, Some(&state), &SecretString::from("x".to_owned())).unwrap();
    assert!(minimal.is_empty(), "{}", minimal.script(false));
}

#[tokio::test]
async fn the_sync_user_can_only_write_the_schemas_it_manages() {
    let db = PG.fresh_database("least").await.unwrap();
    PG.execute(
        &db,
        "create table public.secrets (v text); insert into public.secrets values ('s')",
    )
    .await
    .unwrap();
    let spec = spec(&db);
    apply(&admin(&PG, &db), &spec).await.unwrap();
    let mut sync = connect(&PG, &db, &spec.sync_user, "sync-pw").await;
    let denied = exec(&mut sync, "select * from public.secrets")
        .await
        .unwrap_err();
    assert!(denied.contains("permission denied"), "{denied}");
    assert_denied(&mut sync, "insert into public.secrets values ('x')").await;
    assert_denied(&mut sync, "create table public.mine (v int)").await;
    exec(&mut sync, "create table stripe.customer (id text primary key); insert into stripe.customer values ('c1')").await.unwrap();
    exec(
        &mut sync,
        "create table sluice_ct.records (id int); insert into sluice_ct.records values (1)",
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_read_role_reads_what_sluice_creates_now_and_later_and_nothing_else() {
    let db = PG.fresh_database("readers").await.unwrap();
    PG.execute(&db, "create table public.secrets (v text)")
        .await
        .unwrap();
    let spec = spec(&db);
    apply(&admin(&PG, &db), &spec).await.unwrap();
    let mut sync = connect(&PG, &db, &spec.sync_user, "sync-pw").await;
    exec(
        &mut sync,
        "create table stripe.customer (id text); insert into stripe.customer values ('c1')",
    )
    .await
    .unwrap();

    let reader = format!("{db}_bob");
    PG.create_role(&reader, Some("b")).await.unwrap();
    let sync_settings = as_user(&PG, &db, &spec.sync_user, "sync-pw");
    grant_read(
        &sync_settings,
        &spec.read_role,
        std::slice::from_ref(&reader),
    )
    .await
    .unwrap();
    let mut bob = connect(&PG, &db, &reader, "b").await;
    exec(&mut bob, "select * from stripe.customer")
        .await
        .unwrap();
    // A table sluice creates later is readable too (default privileges).
    exec(&mut sync, "create table stripe.invoice (id text)")
        .await
        .unwrap();
    exec(&mut bob, "select * from stripe.invoice")
        .await
        .unwrap();
    assert_denied(&mut bob, "select * from public.secrets").await;
    assert_denied(&mut bob, "insert into stripe.customer values ('x')").await;

    revoke_read(
        &sync_settings,
        &spec.read_role,
        std::slice::from_ref(&reader),
    )
    .await
    .unwrap();
    let mut bob = connect(&PG, &db, &reader, "b").await;
    assert_denied(&mut bob, "select * from stripe.customer").await;
}

#[tokio::test]
async fn an_existing_read_role_is_adopted_and_the_admin_fix_is_given() {
    let db = PG.fresh_database("adopt").await.unwrap();
    let spec = spec(&db);
    PG.execute(
        &db,
        &format!(
            "create role \"{db}_sync\" login password 'sync-pw'; create role \"{}\"",
            spec.read_role
        ),
    )
    .await
    .unwrap();
    let report = check(&as_user(&PG, &db, &spec.sync_user, "sync-pw"), &spec).await;
    let read = report
        .findings
        .iter()
        .find(|f| f.check == "read_role")
        .unwrap();
    assert!(!read.ok);
    assert_eq!(
        read.fix.as_deref(),
        Some(format!("grant \"{db}_read\" to \"{db}_sync\" with admin option;").as_str())
    );

    let applied = apply(&admin(&PG, &db), &spec).await.unwrap();
    assert!(
        applied
            .plan
            .notes
            .iter()
            .any(|n| n.contains("adopted the existing role")),
        "{:?}",
        applied.plan.notes
    );
    assert!(applied.plan.script(false).contains("with admin option"));
    assert!(
        check(&as_user(&PG, &db, &spec.sync_user, "sync-pw"), &spec)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_existing_schema_with_foreign_objects_is_refused_unless_opted_in() {
    let db = PG.fresh_database("refuse").await.unwrap();
    PG.execute(
        &db,
        "create schema stripe; create table stripe.mine (v int)",
    )
    .await
    .unwrap();
    let mut spec = spec(&db);
    let err = apply(&admin(&PG, &db), &spec).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::FixConfiguration);
    let text = err.to_string();
    assert!(
        text.contains("schema \"stripe\" already exists") && text.contains("table \"mine\""),
        "{text}"
    );
    assert!(
        text.contains("--adopt-existing-schema stripe")
            && text.contains("grant usage, create on schema \"stripe\""),
        "{text}"
    );

    // Opting in: the schema is used as granted, and the user's table is left alone.
    spec.schemas[0].usage = SchemaUse::Granted;
    apply(&admin(&PG, &db), &spec).await.unwrap();
    let mut conn = PgConnection::connect(&PG.url(&db)).await.unwrap();
    let owner: String = sqlx::query_scalar(
        "select tableowner::text from pg_tables where schemaname = 'stripe' and tablename = 'mine'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(owner, "postgres");
}

/// A TLS cluster with the data API's roles, as a Supabase project has them.
static SUPA: LazyLock<Cluster> = LazyLock::new(|| {
    Cluster::options()
        .target()
        .tls(sluice_localpg::Tls::Required)
        .start()
        .expect("start PostgreSQL")
});

async fn supabase_roles(pg: &Cluster) {
    // Tests share the cluster and run at once: one creates the roles, the others wait.
    static CREATED: tokio::sync::Mutex<Vec<u16>> = tokio::sync::Mutex::const_new(Vec::new());
    let mut created = CREATED.lock().await;
    if created.contains(&pg.port()) {
        return;
    }
    created.push(pg.port());
    for role in ["anon", "authenticated", "service_role"] {
        pg.execute("postgres", &format!("do $$ begin if not exists (select from pg_roles where rolname = '{role}') then create role {role} login password 'r'; end if; end $$")).await.unwrap();
    }
}

#[tokio::test]
async fn the_supabase_preset_lets_the_api_read_and_only_service_role_write() {
    supabase_roles(&SUPA).await;
    let db = SUPA.fresh_database("supa").await.unwrap();
    let mut spec = spec(&db);
    spec.preset = Some(Preset::Supabase);
    let applied = apply(&admin(&SUPA, &db), &spec).await.unwrap();
    let script = applied.plan.script(false);
    for expected in [
        "grant usage on schema \"stripe\" to \"anon\", \"authenticated\", \"service_role\"",
        "in schema \"stripe\" grant select on tables to \"anon\", \"authenticated\"",
        "in schema \"stripe\" grant all on tables to \"service_role\"",
        "writes go through sluice's write-back proxy",
    ] {
        assert!(script.contains(expected), "{expected:?} missing:\n{script}");
    }
    let mut sync = connect(&SUPA, &db, &spec.sync_user, "sync-pw").await;
    exec(&mut sync, "create table stripe.customer (id text)")
        .await
        .unwrap();
    exec(&mut sync, "insert into stripe.customer values ('cus_1')")
        .await
        .unwrap();
    let mut anon = connect(&SUPA, &db, "anon", "r").await;
    exec(&mut anon, "select * from stripe.customer")
        .await
        .unwrap();
    assert_denied(&mut anon, "delete from stripe.customer").await;
    assert_denied(&mut anon, "insert into stripe.customer values ('x')").await;
    let mut service = connect(&SUPA, &db, "service_role", "r").await;
    exec(&mut service, "update stripe.customer set id = id")
        .await
        .unwrap();
    assert!(
        apply(&admin(&SUPA, &db), &spec)
            .await
            .unwrap()
            .plan
            .is_empty()
    );

    // The older grants, only when asked for, saying what they allow; the default takes them back.
    spec.api_roles_write = true;
    let legacy = apply(&admin(&SUPA, &db), &spec).await.unwrap();
    assert!(
        legacy
            .plan
            .script(false)
            .contains("anyone with the public API key can then change or delete synced rows"),
        "{}",
        legacy.plan.script(false)
    );
    exec(&mut anon, "insert into stripe.customer values ('x')")
        .await
        .unwrap();
    spec.api_roles_write = false;
    let back = apply(&admin(&SUPA, &db), &spec).await.unwrap();
    assert!(
        back.plan.script(false).contains("taken back"),
        "{}",
        back.plan.script(false)
    );
    assert_denied(&mut anon, "delete from stripe.customer").await;
    exec(&mut sync, "create table stripe.invoice (id text)")
        .await
        .unwrap();
    assert_denied(&mut anon, "insert into stripe.invoice values ('x')").await;
    exec(&mut anon, "select * from stripe.invoice")
        .await
        .unwrap();
}

#[tokio::test]
async fn the_supabase_preset_refuses_an_admin_session_without_tls() {
    supabase_roles(&PG).await;
    let db = PG.fresh_database("supaplain").await.unwrap();
    let mut spec = spec(&db);
    spec.preset = Some(Preset::Supabase);
    let err = apply(&admin(&PG, &db), &spec).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::FixConfiguration);
    assert!(err.to_string().contains("not encrypted"), "{err}");
    assert!(
        err.fix().is_some_and(|f| f.contains("sslmode=verify-full")),
        "{err:?}"
    );
    // Nothing was done.
    let mut conn = PG.admin(&db).await.unwrap();
    let exists: bool =
        sqlx::query_scalar("select exists (select from pg_roles where rolname = $1)")
            .bind(&spec.sync_user)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(!exists);
    let report = check(
        &as_user(&PG, &db, "postgres", PG.superuser_password()),
        &spec,
    )
    .await;
    let tls = report.findings.iter().find(|f| f.check == "tls").unwrap();
    assert!(!tls.ok, "the preset requires TLS and this cluster has none");
}

/// Supabase's `postgres` is not a superuser: it has CREATEROLE and CREATEDB and owns the
/// database. Setup works with exactly that, becoming a member of the sync user only for the
/// steps that act as it.
#[tokio::test]
async fn the_supabase_preset_works_with_an_admin_that_is_not_a_superuser() {
    supabase_roles(&SUPA).await;
    let db = SUPA.fresh_database("supaadmin").await.unwrap();
    let admin_role = format!("{db}_owner");
    SUPA.execute(
        "postgres",
        &format!(
            "create role {admin_role} login createrole createdb password 'own';
             alter database {db} owner to {admin_role};"
        ),
    )
    .await
    .unwrap();
    let mut spec = spec(&db);
    spec.preset = Some(Preset::Supabase);
    let lent = as_user(&SUPA, &db, &admin_role, "own");
    let applied = apply(&lent, &spec).await.unwrap();
    let script = applied.plan.script(false);
    assert!(
        script.contains(&format!("grant \"{db}_sync\" to current_user"))
            && script.contains(&format!("revoke \"{db}_sync\" from current_user")),
        "{script}"
    );
    assert!(script.contains("for the next steps only"), "{script}");
    // The membership did not outlive the setup. (From 16 on PostgreSQL itself keeps the
    // creating admin as the new role's administrator, without INHERIT or SET: it cannot act
    // as the sync user, which is what matters.)
    let mut conn = SUPA.admin(&db).await.unwrap();
    let member: bool = sqlx::query_scalar(
        "select exists (select from pg_auth_members m join pg_roles g on g.oid = m.roleid
                        join pg_roles u on u.oid = m.member where g.rolname = $1 and u.rolname = $2
                          and coalesce((to_jsonb(m) ->> 'inherit_option')::bool or (to_jsonb(m) ->> 'set_option')::bool, true))",
    )
    .bind(&spec.sync_user)
    .bind(&admin_role)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(!member, "the admin stayed a member of the sync user");
    let report = check(&as_user(&SUPA, &db, &spec.sync_user, "sync-pw"), &spec).await;
    if SUPA.binaries().major() < Some(15) {
        // Before 15 every role may create in public, and only its owner can change that:
        // setup said so, and the check asks for it (and nothing else).
        assert!(
            applied
                .plan
                .notes
                .iter()
                .any(|n| n.contains("schema public")
                    && n.contains("revoke create on schema public from public")),
            "{:?}",
            applied.plan.notes
        );
        assert_eq!(report.failing(), ["schema public"], "{}", report.render());
    } else {
        assert!(report.is_ok(), "{}", report.render());
    }
    let again = apply(&lent, &spec).await.unwrap();
    assert!(again.plan.is_empty(), "{}", again.plan.script(false));
    // And what it set up works: the sync user writes its schema, anon reads it.
    let mut sync = connect(&SUPA, &db, &spec.sync_user, "sync-pw").await;
    exec(
        &mut sync,
        "create table stripe.price (id text); insert into stripe.price values ('p')",
    )
    .await
    .unwrap();
    let mut anon = connect(&SUPA, &db, "anon", "r").await;
    exec(&mut anon, "select * from stripe.price").await.unwrap();
}

#[tokio::test]
async fn servers_older_than_10_are_refused_and_the_local_one_passes() {
    let old = State {
        version_num: 90_624,
        ..State::default()
    };
    let refusal = plan(&spec("x"), Some(&old), &SecretString::from("p".to_owned())).unwrap_err();
    assert!(refusal.problem.contains("older than 10"), "{refusal:?}");
    let db = PG.fresh_database("version").await.unwrap();
    let spec = spec(&db);
    apply(&admin(&PG, &db), &spec).await.unwrap();
    let report = check(&as_user(&PG, &db, &spec.sync_user, "sync-pw"), &spec).await;
    assert!(report.findings.iter().any(|f| f.check == "version" && f.ok));
}

/// 12 and 13 hash new passwords with md5 by default, which a scram-sha-256 rule cannot check;
/// setup stores the sync user's password as a SCRAM verifier whatever the server's default.
#[tokio::test]
async fn the_sync_users_password_is_stored_for_scram_even_where_md5_is_the_default() {
    let pg = Cluster::options()
        .target()
        .setting("password_encryption", "'md5'")
        .start()
        .unwrap();
    let db = pg.fresh_database("scram").await.unwrap();
    let spec = spec(&db);
    apply(&admin(&pg, &db), &spec).await.unwrap();
    let stored: String = sqlx::query_scalar("select rolpassword from pg_authid where rolname = $1")
        .bind(&spec.sync_user)
        .fetch_one(&mut pg.admin(&db).await.unwrap())
        .await
        .unwrap();
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    connect(&pg, &db, &spec.sync_user, "sync-pw").await;
}

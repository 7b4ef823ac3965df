//! The write-back proxy in front of a Stripe mirror (the test kit's emulator): writes become
//! Stripe API calls with idempotency keys, Stripe's refusals come back as PostgreSQL errors,
//! and what Stripe answers is in the local table before the statement returns.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sluice_localpg::Cluster;
use sluice_stripe_emulator::{Emulator, Fault};
use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgSslMode};
use sqlx::{Connection, PgConnection, Row};

const KEY: &str = "sk_test_51proxyKey0000000000";

struct Env {
    stripe: Emulator,
    target: Cluster,
    dir: tempfile::TempDir,
    proxy: u16,
    child: Option<Child>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn log(env: &Env) -> String {
    std::fs::read_to_string(env.dir.path().join("serve.log")).unwrap_or_default()
}

async fn start() -> Env {
    let target = Cluster::start_default().unwrap();
    target
        .execute(
            "postgres",
            "create role sluice_sync login password 'sync-pw';
             grant connect, create on database postgres to sluice_sync;
             create role sluice_read;
             create role app_user login password 'app-pw';
             grant sluice_read to app_user;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stripe.key"), KEY).unwrap();
    let stripe = Emulator::start(KEY).await;
    for (email, name) in [
        ("a@example.com", "A"),
        ("b@example.com", "B"),
        ("c@example.com", "C"),
    ] {
        stripe.create("customers", &[("email", email), ("name", name)]);
    }
    let proxy = free_port();
    let text = format!(
        r#"
data_dir = "{data}"

[api]
listen = "127.0.0.1:{api}"
token = {{ env = "TEST_API_TOKEN" }}

[[target]]
name = "warehouse"
[target.connection]
host = "127.0.0.1"
port = {tport}
database = "postgres"
user = "sluice_sync"
password = {{ env = "TEST_TARGET_PASSWORD" }}
ssl = {{ mode = "disable" }}

[[sync]]
name = "stripe"
id = "1d7a3c1e-5b2f-4e6a-8c0d-1e2f3a4b5c6d"
[sync.source]
provider = "stripe"
key = {{ file = "{key}" }}
collections = ["customer"]
poll_interval_ms = 200
api_base = "{base}"

[[consumer]]
name = "stripe-mirror"
target = "warehouse"
filter = {{ sync = {{ name = "stripe" }} }}
layout = {{ kind = "schema_mirror", schema = "stripe" }}
batch = {{ max_records = 1000, max_wait_ms = 20 }}

[proxy]
listen = "127.0.0.1:{proxy}"
target = "warehouse"
"#,
        data = dir.path().join("data").display(),
        api = free_port(),
        tport = target.port(),
        key = dir.path().join("stripe.key").display(),
        base = stripe.url(),
    );
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    let log_file = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("TEST_API_TOKEN", "t")
        .env("TEST_TARGET_PASSWORD", "sync-pw")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let env = Env {
        stripe,
        target,
        dir,
        proxy,
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut admin = env.target.admin("postgres").await.unwrap();
        let n: Result<i64, _> = sqlx::query_scalar("select count(*) from stripe.customer")
            .fetch_one(&mut admin)
            .await;
        if n.is_ok_and(|n| n == 3) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mirror never filled\n{}",
            log(&env)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.target
        .execute(
            "postgres",
            "grant insert, update, delete on stripe.customer to app_user;",
        )
        .await
        .unwrap();
    env
}

async fn client(env: &Env) -> PgConnection {
    PgConnection::connect_with(
        &PgConnectOptions::new()
            .host("127.0.0.1")
            .port(env.proxy)
            .username("app_user")
            .password("app-pw")
            .database("postgres")
            .ssl_mode(PgSslMode::Disable),
    )
    .await
    .unwrap()
}

fn emulated(env: &Env, id: &str) -> Option<serde_json::Value> {
    env.stripe
        .objects("customers")
        .into_iter()
        .find(|c| c["id"] == id)
}

fn pg_error(error: &sqlx::Error) -> &PgDatabaseError {
    error
        .as_database_error()
        .unwrap_or_else(|| panic!("not a server error: {error}"))
        .downcast_ref::<PgDatabaseError>()
}

#[tokio::test]
async fn writes_become_stripe_calls_and_refusals_come_back_as_errors() {
    let env = start().await;
    let mut conn = client(&env).await;
    let a = env
        .stripe
        .objects("customers")
        .into_iter()
        .find(|c| c["email"] == "a@example.com")
        .unwrap();
    let a = a["id"].as_str().unwrap().to_owned();

    // An update: Stripe first, then the local row, before the statement returns.
    let done =
        sqlx::query("update stripe.customer set email = $1, metadata = $2::jsonb where id = $3")
            .bind("new@example.com")
            .bind(r#"{"plan": "pro"}"#)
            .bind(&a)
            .execute(&mut conn)
            .await
            .unwrap();
    assert_eq!(done.rows_affected(), 1);
    let stripe_a = emulated(&env, &a).unwrap();
    assert_eq!(
        (
            stripe_a["email"].as_str(),
            stripe_a["metadata"]["plan"].as_str()
        ),
        (Some("new@example.com"), Some("pro"))
    );
    let row = sqlx::query("select email, metadata->>'plan' from stripe.customer where id = $1")
        .bind(&a)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        (row.get::<String, _>(0), row.get::<String, _>(1)),
        ("new@example.com".into(), "pro".into())
    );

    // Stripe's refusal: its message, its code in DETAIL; nothing changes anywhere.
    let error = sqlx::query("update stripe.customer set email = 'not-an-email' where id = $1")
        .bind(&a)
        .execute(&mut conn)
        .await
        .unwrap_err();
    let e = pg_error(&error);
    assert_eq!(
        e.message(),
        "Error updating customer: Invalid email address: not-an-email"
    );
    assert_eq!(e.detail(), Some("upstream error code: email_invalid"));
    assert_eq!(e.code(), "22023");
    assert_eq!(emulated(&env, &a).unwrap()["email"], "new@example.com");

    // A column Stripe sets itself is named, before anything is sent.
    let requests = env.stripe.requests().len();
    let error = sqlx::query("update stripe.customer set created = now() where id = $1")
        .bind(&a)
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert!(
        pg_error(&error).message().contains("column \"created\""),
        "{error}"
    );
    assert_eq!(pg_error(&error).code(), "428C9");
    assert_eq!(env.stripe.requests().len(), requests, "nothing was sent");

    // Insert, with the id Stripe gives back in RETURNING; then delete.
    let id: String = sqlx::query_scalar(
        "insert into stripe.customer (email, name) values ('d@example.com', 'D') returning id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(id.starts_with("cus_"), "{id}");
    assert_eq!(emulated(&env, &id).unwrap()["name"], "D");
    let done = sqlx::query("delete from stripe.customer where id = $1")
        .bind(&id)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
    assert!(emulated(&env, &id).is_none());
    let left: i64 = sqlx::query_scalar("select count(*) from stripe.customer where id = $1")
        .bind(&id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0);

    // A Stripe failure is retried with the same idempotency key, and applied once.
    env.stripe.fail_next(&[Fault::ServerError]);
    sqlx::query("update stripe.customer set name = 'A again' where id = $1")
        .bind(&a)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(emulated(&env, &a).unwrap()["name"], "A again");

    // A statement failing part-way says how many rows were applied, and those are local too.
    let error = sqlx::query("update stripe.customer set email = case when email = 'c@example.com' then 'broken' else 'ok-' || email end")
        .execute(&mut conn)
        .await
        .unwrap_err();
    let message = pg_error(&error).message().to_owned();
    assert!(
        message.starts_with("Error updating customer: Invalid email address: broken"),
        "{message}"
    );
    let upstream_ok = env
        .stripe
        .objects("customers")
        .iter()
        .filter(|c| c["email"].as_str().is_some_and(|e| e.starts_with("ok-")))
        .count();
    assert!(
        message.contains(&format!("({upstream_ok} of 3 rows were applied upstream")),
        "{message}"
    );
    let local_ok: i64 =
        sqlx::query_scalar("select count(*) from stripe.customer where email like 'ok-%'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(local_ok as usize, upstream_ok, "applied rows are local too");
    assert!(!log(&env).contains(KEY), "the key never reaches the log");
    assert!(
        !log(&env).contains("app-pw"),
        "passwords never reach the log"
    );
}

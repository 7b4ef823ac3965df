//! `sluice serve` syncing Stripe (the test kit's emulator) into PostgreSQL: typed tables a
//! user queries, one consumer table for connected accounts, `kill -9` in the middle.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use sluice_localpg::Cluster;
use sluice_stripe_emulator::Emulator;

mod support;
use support::{Serving, spawn_serve};

const TOKEN: &str = "test-token-stripe";
const KEY: &str = "sk_test_51serveKey00000000000";

struct Env {
    stripe: Emulator,
    target: Cluster,
    dir: tempfile::TempDir,
    port: u16,
}

async fn env() -> Env {
    let target = Cluster::start_default().unwrap();
    target
        .execute(
            "postgres",
            "create role sluice_sync login password 'sync-pw';
             grant connect, create on database postgres to sluice_sync;
             create role sluice_read;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stripe.key"), KEY).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Env {
        stripe: Emulator::start(KEY).await,
        target,
        dir,
        port,
    }
}

fn write_config(env: &Env) -> std::path::PathBuf {
    let text = format!(
        r#"
data_dir = "{data}"

[api]
listen = "127.0.0.1:{port}"
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
id = "9d7a3c1e-5b2f-4e6a-8c0d-1e2f3a4b5c6d"
[sync.source]
provider = "stripe"
key = {{ file = "{key}" }}
collections = ["customer", "subscription"]
accounts = ["acct_1ONE", "acct_2TWO"]
poll_interval_ms = 200
rate_limit = 6
api_base = "{stripe}"

[[consumer]]
name = "stripe-mirror"
target = "warehouse"
filter = {{ sync = {{ name = "stripe" }} }}
layout = {{ kind = "schema_mirror", schema = "stripe" }}
batch = {{ max_records = 1000, max_wait_ms = 20 }}

[[consumer]]
name = "stripe-records"
target = "warehouse"
filter = {{ provider = "stripe" }}
layout = {{ kind = "consumer_table", schema = "sluice", table = "stripe_records" }}
batch = {{ max_records = 1000, max_wait_ms = 20 }}
"#,
        data = env.dir.path().join("data").display(),
        port = env.port,
        tport = env.target.port(),
        key = env.dir.path().join("stripe.key").display(),
        stripe = env.stripe.url(),
    );
    let path = env.dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn serve(env: &Env, path: &Path) -> Serving {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(env.dir.path().join("serve.log"))
        .unwrap();
    spawn_serve(path, log, &[("TEST_API_TOKEN", TOKEN)])
}

fn log(env: &Env) -> String {
    std::fs::read_to_string(env.dir.path().join("serve.log")).unwrap_or_default()
}

async fn query(env: &Env, sql: &str) -> Result<Vec<String>, String> {
    let mut conn = env.target.admin("postgres").await.unwrap();
    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_all(&mut conn)
        .await
        .map_err(|e| e.to_string())
}

async fn wait_for(env: &Env, what: &str, secs: u64, sql: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = query(env, sql).await;
        if got.as_ref().is_ok_and(|g| g == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}: {sql} gave {got:?}, want {want:?}\n--- serve log ---\n{}",
            log(env)
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// Every live customer and subscription, as the target's consumer table holds them, equals the
/// emulator's, per account.
async fn consumer_table_matches(env: &Env) -> bool {
    let mut want: Vec<String> = Vec::new();
    let platform = "9d7a3c1e-5b2f-4e6a-8c0d-1e2f3a4b5c6d".parse().unwrap();
    for (account, sync_id) in [
        (None, platform),
        (Some("acct_1ONE"), account_id("acct_1ONE")),
        (Some("acct_2TWO"), account_id("acct_2TWO")),
    ] {
        for resource in ["customers", "subscriptions"] {
            let objects = match account {
                None => env.stripe.objects(resource),
                Some(a) => env.stripe.objects_in(a, resource),
            };
            for o in objects {
                want.push(format!("{sync_id} {} {}", o["id"].as_str().unwrap(), o));
            }
        }
    }
    want.sort();
    let have = query(
        env,
        "select sync_id::text || ' ' || upstream_id || ' ' || (payload::text) from sluice.stripe_records order by 1",
    )
    .await
    .unwrap_or_default();
    // jsonb normalizes key order and spacing; compare as JSON values.
    let parse = |rows: &[String]| -> Vec<(String, String, serde_json::Value)> {
        let mut out: Vec<_> = rows
            .iter()
            .map(|r| {
                let mut parts = r.splitn(3, ' ');
                (
                    parts.next().unwrap().to_owned(),
                    parts.next().unwrap().to_owned(),
                    serde_json::from_str(parts.next().unwrap()).unwrap(),
                )
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    };
    parse(&have) == parse(&want)
}

fn account_id(account: &str) -> uuid::Uuid {
    let platform: uuid::Uuid = "9d7a3c1e-5b2f-4e6a-8c0d-1e2f3a4b5c6d".parse().unwrap();
    uuid::Uuid::new_v5(&platform, account.as_bytes())
}

fn kill9(child: &mut Child) {
    Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn stripe_lands_in_typed_tables_and_a_consumer_table_and_survives_kill_9() {
    let env = env().await;
    let stripe = &env.stripe;
    let mut customers = Vec::new();
    for i in 0..1500 {
        let c = stripe.create(
            "customers",
            &[
                ("email", &format!("c{i}@example.com")),
                ("balance", &(i * 10).to_string()),
            ],
        );
        customers.push(c["id"].as_str().unwrap().to_owned());
    }
    // Edge values ride along in its metadata: the consumer table's payloads are compared
    // with the emulator's objects as exact JSON (every digit, every code point) below.
    let cus_123 = stripe.create(
        "customers",
        &[
            ("id", "cus_123"),
            ("email", "seed@example.com"),
            ("metadata[clé 🔑 ключ]", "значение \"quoted\" \\ back"),
            ("metadata[beyond_u64]", "123456789012345678901234567890"),
            (
                "metadata[forty_digits]",
                "0.1000000000000000055511151231257827021182",
            ),
        ],
    );
    assert_eq!(cus_123["id"], "cus_123");
    stripe.create(
        "subscriptions",
        &[("customer", "cus_123"), ("status", "active")],
    );
    stripe.create_in("acct_1ONE", "customers", &[("email", "one@example.com")]);
    stripe.create_in("acct_2TWO", "customers", &[("email", "two@example.com")]);

    let config = write_config(&env);
    let mut child = serve(&env, &config);
    // kill -9 mid-backfill (customers still being read: 16 pages at 6 requests/s), then
    // start again.
    let count = "select count(*)::text from stripe.customer";
    let deadline = Instant::now() + Duration::from_secs(60);
    let n: i64 = loop {
        let n: i64 = query(&env, count)
            .await
            .map_or(0, |r| r[0].parse().unwrap());
        if n >= 200 {
            break n;
        }
        assert!(Instant::now() < deadline, "no customers\n{}", log(&env));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    kill9(&mut child);
    assert!(n < 1501, "killed mid-backfill ({n} of 1501 customers)");
    stripe.update(
        "customers",
        &customers[0],
        &[("name", "changed while down")],
    );
    let mut child = serve(&env, &config);
    wait_for(&env, "every customer is mirrored", 90, count, &["1501"]).await;
    // The seed's query, on the typed mirror.
    wait_for(
        &env,
        "the subscription is in the typed table",
        30,
        "select status from stripe.subscription where customer = 'cus_123'",
        &["active"],
    )
    .await;
    wait_for(
        &env,
        "the change made while down arrived",
        30,
        &format!(
            "select name from stripe.customer where id = '{}'",
            customers[0]
        ),
        &["changed while down"],
    )
    .await;
    // Unix times are timestamps; integers are bigint.
    let created = query(
        &env,
        "select (pg_typeof(created)::text || ' ' || pg_typeof(balance)::text) from stripe.customer limit 1",
    )
    .await
    .unwrap();
    assert_eq!(created, ["timestamp with time zone bigint"]);
    let exact = query(
        &env,
        &format!(
            "select (extract(epoch from created)::bigint = {})::text from stripe.customer where id = 'cus_123'",
            cus_123["created"]
        ),
    )
    .await
    .unwrap();
    assert_eq!(exact, ["true"]);

    // kill -9 mid-incremental: changes before and after it all arrive.
    let subscription = stripe.objects("subscriptions")[0]["id"].clone();
    stripe.update(
        "subscriptions",
        subscription.as_str().unwrap(),
        &[("status", "past_due")],
    );
    kill9(&mut child);
    stripe.delete("customers", &customers[1]);
    // A field Stripe adds later becomes a column, without a restart.
    stripe.update("customers", &customers[2], &[("loyalty_tier", "gold")]);
    let mut child = serve(&env, &config);
    wait_for(
        &env,
        "the update made before the kill arrived",
        60,
        "select status from stripe.subscription where customer = 'cus_123'",
        &["past_due"],
    )
    .await;
    wait_for(&env, "the deletion arrived", 60, count, &["1500"]).await;
    wait_for(
        &env,
        "the new field is a column",
        60,
        &format!(
            "select loyalty_tier from stripe.customer where id = '{}'",
            customers[2]
        ),
        &["gold"],
    )
    .await;
    stripe.update("customers", &customers[3], &[("loyalty_tier", "silver")]);
    wait_for(
        &env,
        "the new column fills while running",
        30,
        "select string_agg(loyalty_tier, ',' order by loyalty_tier) from stripe.customer",
        &["gold,silver"],
    )
    .await;

    // Connected accounts: one consumer table, told apart by sync_id.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !consumer_table_matches(&env).await {
        assert!(
            Instant::now() < deadline,
            "the consumer table never matched Stripe\n{}",
            log(&env)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let accounts = query(
        &env,
        &format!(
            "select payload->>'email' from sluice.stripe_records where sync_id in ('{}', '{}') order by 1",
            account_id("acct_1ONE"),
            account_id("acct_2TWO")
        ),
    )
    .await
    .unwrap();
    assert_eq!(accounts, ["one@example.com", "two@example.com"]);

    // Status shows the Stripe sync's progress; the key is nowhere in the log.
    let status = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["status", "--api", &format!("http://127.0.0.1:{}", env.port)])
        .env("SLUICE_API_TOKEN", TOKEN)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("backfilled"), "{text}");
    assert!(!log(&env).contains(KEY), "the key reached the log");
    kill9(&mut child);
}

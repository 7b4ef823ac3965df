//! `cargo xtask bench api`: `sluice serve` (release) syncing Stripe — the test kit's emulator,
//! at a fixed rate limit — into a consumer table on a local PostgreSQL.
//!
//! (a) Backfill of `SLUICE_BENCH_OBJECTS` customers (default 100,000) at `SLUICE_BENCH_RATE`
//!     requests/s (default 25, Stripe's test-mode limit): objects/s from the first request
//!     the emulator saw to the last row in the target, as a fraction of the ceiling
//!     (requests/s × 100 objects per page). Beside it, measured in the same run: a bare HTTP
//!     client listing the same objects with no limit at all (what the emulator can serve), so
//!     a ratio below 0.9 can be told apart from an emulator that is too slow.
//! (b) `SLUICE_BENCH_CHANGES` updates (default 2,000) at 100 per second, each to another
//!     customer: p50 and p99 from the update in the emulator to the row's `updated_at` in
//!     the target (the time sluice wrote it, just before its commit), beside the poll
//!     interval (1 s). Goal: p99 ≤ poll interval + 1 s.
//!
//! Peak memory is `sluice serve`'s peak resident set (`VmHWM`), read at the end.

use std::time::{Duration, Instant};

use sluice_localpg::Cluster;
use sluice_stripe_emulator::Emulator;

mod support;
use support::*;

const KEY: &str = "sk_test_bench0000000000000000";
const POLL_MS: u64 = 1000;

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

fn now_ns() -> i128 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos()
}

async fn scalar(target: &Cluster, sql: &str) -> i64 {
    let mut conn = target.admin("postgres").await.unwrap();
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0)
}

async fn run() {
    let objects = env_usize("SLUICE_BENCH_OBJECTS", 100_000);
    let rate = env_usize("SLUICE_BENCH_RATE", 25) as f64;
    let changes = env_usize("SLUICE_BENCH_CHANGES", 2_000);
    let target = Cluster::start_default().unwrap();
    prepare_target(&target).await;
    let stripe = Emulator::start(KEY).await;
    let made = Instant::now();
    let mut ids = Vec::with_capacity(objects);
    for i in 0..objects {
        let c = stripe.create(
            "customers",
            &[
                ("email", &format!("customer{i}@example.com")),
                ("name", &format!("Customer {i}")),
                ("balance", &(i % 10_000).to_string()),
            ],
        );
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    println!(
        "{objects} customers made in the emulator in {:.1} s",
        made.elapsed().as_secs_f64()
    );

    // Baseline: a bare client listing every page, no limit.
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut after: Option<String> = None;
    let mut listed = 0usize;
    loop {
        let mut url = format!("{}/v1/customers?limit=100", stripe.url());
        if let Some(a) = &after {
            url.push_str(&format!("&starting_after={a}"));
        }
        let page: serde_json::Value = http
            .get(url)
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let data = page["data"].as_array().unwrap();
        listed += data.len();
        after = data.last().map(|o| o["id"].as_str().unwrap().to_owned());
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
    }
    let bare = listed as f64 / started.elapsed().as_secs_f64();
    let served_before = stripe.requests().len();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stripe.key"), KEY).unwrap();
    let config = format!(
        r#"{head}
[[sync]]
name = "stripe"
id = "0c3f5e7a-9b1d-4f2e-8a6c-4d5e6f7a8b9c"
[sync.source]
provider = "stripe"
key = {{ file = "{key}" }}
collections = ["customer"]
rate_limit = {rate}
poll_interval_ms = {POLL_MS}
api_base = "{stripe}"

[[consumer]]
name = "stripe-records"
target = "warehouse"
filter = {{ provider = "stripe" }}
layout = {{ kind = "consumer_table", schema = "sluice", table = "stripe_records" }}
"#,
        head = config_head(dir.path(), &target),
        key = dir.path().join("stripe.key").display(),
        stripe = stripe.url(),
    );
    let mut serve = serve(dir.path(), &config, &[("RUST_LOG", "warn")]);
    let pid = serve.id();

    let count = "select count(*) from sluice.stripe_records";
    let deadline = Instant::now() + Duration::from_secs(objects as u64 / 500 + 600);
    while scalar(&target, count).await < objects as i64 {
        assert!(Instant::now() < deadline, "the backfill did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done_at = now_ns() as f64 / 1e9;
    let requests = stripe.requests();
    let first = requests[served_before].0;
    let pages = requests[served_before..]
        .iter()
        .filter(|(_, p)| p == "customers")
        .count();
    let seconds = done_at - first;
    let per_second = objects as f64 / seconds;
    let ceiling = rate * 100.0;
    println!("(a) backfill of {objects} customers at {rate} requests/s:");
    println!(
        "    sluice: {per_second:.0} objects/s ({seconds:.1} s, {pages} pages) = {:.3} of the ceiling {ceiling:.0} objects/s (goal ≥ 0.9)",
        per_second / ceiling
    );
    println!(
        "    baseline, same run: a bare client with no limit lists {bare:.0} objects/s from this emulator"
    );

    // (b) 100 changes per second, each to another customer.
    let interval = Duration::from_millis(10);
    let mut sent = Vec::with_capacity(changes);
    let start = Instant::now();
    for (i, id) in ids.iter().take(changes).enumerate() {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        let at = now_ns();
        stripe.update("customers", id, &[("name", &format!("changed {i}"))]);
        sent.push((id.clone(), at));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let arrived =
        "select count(*) from sluice.stripe_records where payload->>'name' like 'changed %'";
    while scalar(&target, arrived).await < changes as i64 {
        assert!(Instant::now() < deadline, "not every change arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut conn = target.admin("postgres").await.unwrap();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select upstream_id, (extract(epoch from updated_at) * 1000000)::bigint
         from sluice.stripe_records where payload->>'name' like 'changed %'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let written: std::collections::HashMap<String, i64> = rows.into_iter().collect();
    let mut latencies: Vec<f64> = sent
        .iter()
        .map(|(id, at)| (written[id] as f64 / 1e6) - (*at as f64 / 1e9))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "(b) {changes} changes at 100/s: emulator change → target row p50 {:.0} ms, p99 {:.0} ms (goal p99 ≤ poll interval {POLL_MS} ms + 1000 ms)",
        pct(0.5) * 1000.0,
        pct(0.99) * 1000.0
    );
    println!(
        "peak memory of sluice serve: {:.0} MB for {objects} objects (goal < 256 MB)",
        peak_rss_mb(pid)
    );
    let _ = serve.kill();
    let _ = serve.wait();
}

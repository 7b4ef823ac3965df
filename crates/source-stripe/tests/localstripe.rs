//! The Stripe provider against `localstripe`, a Stripe emulator nobody on this team wrote.
//!
//! Where localstripe deviates from Stripe, sluice follows Stripe, and this test pins down what
//! that means:
//! - localstripe lists objects and events **oldest first** (Stripe: newest first). Backfill
//!   pages are read with `starting_after` either way, so the backfill is exact.
//! - localstripe refuses `ending_before` on `/v1/events` ("Unexpected ending_before"), which
//!   Stripe documents and sluice needs to read events newer than its cursor. The change feed
//!   therefore reports an error naming the refused request, and applies nothing: reading
//!   localstripe's events oldest first as if they were newest first would store older
//!   states over newer ones.
//! - localstripe renders events at API version 2017-08-15; sluice would fetch those objects
//!   again at its own version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_core::{
    Health, RecordFilter, RecordStream, SecretSource, Seq, Source, Status, StripeSourceConfig,
    SyncId,
};
use sluice_stream::EmbeddedStream;
use sluice_stripe_emulator::LocalStripe;

const KEY: &str = "sk_test_localstripe0000";

fn post(http: &reqwest::blocking::Client, url: &str, form: &[(&str, &str)]) -> Value {
    http.post(url)
        .basic_auth(KEY, Some(""))
        .form(form)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_from_localstripe_matches_it_object_for_object() {
    let stripe = LocalStripe::start();
    let base = stripe.url();
    // Objects made through localstripe's own API.
    let made = tokio::task::spawn_blocking(move || {
        let http = reqwest::blocking::Client::new();
        let mut ids = Vec::new();
        for i in 0..130 {
            let c = post(
                &http,
                &format!("{base}/v1/customers"),
                &[
                    ("email", &format!("ls{i}@example.com")),
                    ("name", &format!("Customer {i}")),
                ],
            );
            ids.push(c["id"].as_str().unwrap().to_owned());
        }
        let p = post(
            &http,
            &format!("{base}/v1/products"),
            &[("name", "Gold"), ("type", "service")],
        );
        post(
            &http,
            &format!("{base}/v1/plans"),
            &[
                ("product", p["id"].as_str().unwrap()),
                ("amount", "1500"),
                ("currency", "usd"),
                ("interval", "month"),
                ("id", "gold-monthly"),
            ],
        );
        post(
            &http,
            &format!("{base}/v1/customers/{}", ids[7]),
            &[("name", "Renamed")],
        );
        let customers: Value = http
            .get(format!("{base}/v1/customers?limit=100"))
            .basic_auth(KEY, Some(""))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let more: Value = http
            .get(format!(
                "{base}/v1/customers?limit=100&starting_after={}",
                customers["data"][99]["id"].as_str().unwrap()
            ))
            .basic_auth(KEY, Some(""))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let plans: Value = http
            .get(format!("{base}/v1/plans?limit=100"))
            .basic_auth(KEY, Some(""))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let mut all: Vec<Value> = customers["data"].as_array().unwrap().clone();
        all.extend(more["data"].as_array().unwrap().iter().cloned());
        all.extend(plans["data"].as_array().unwrap().iter().cloned());
        all
    })
    .await
    .unwrap();
    assert_eq!(made.len(), 131);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key"), KEY).unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path().join("data")).await.unwrap());
    let config = StripeSourceConfig {
        key: SecretSource::File(dir.path().join("key")),
        collections: Some(vec!["customer".into(), "plan".into()]),
        accounts: None,
        platform: true,
        poll_interval_ms: 200,
        rate_limit: None,
        concurrency: 4,
        request_timeout_ms: 10_000,
        api_version: None,
        api_base: Some(stripe.url()),
        discover_interval_s: 60,
    };
    let sync_id = SyncId::new_random();
    let source = Arc::new(sluice_source_stripe::source(
        "localstripe",
        sync_id,
        &config,
        stream.clone(),
    ));
    let (tell, told) = tokio::sync::oneshot::channel::<()>();
    let running = source.clone();
    let task = tokio::spawn(async move {
        running
            .run(Box::pin(async move {
                let _ = told.await;
            }))
            .await;
    });

    let want: BTreeMap<(String, String), Value> = made
        .iter()
        .map(|o| {
            (
                (
                    format!("stripe:{}", o["object"].as_str().unwrap()),
                    o["id"].as_str().unwrap().to_owned(),
                ),
                o.clone(),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let have = loop {
        let read = stream
            .read(
                &RecordFilter::Sync {
                    sync_id,
                    collections: None,
                },
                Seq(0),
                100_000,
            )
            .await
            .unwrap();
        let have: BTreeMap<(String, String), Value> = read
            .entries
            .into_iter()
            .filter_map(|e| {
                let key = (
                    e.record.key.collection_id.0.clone(),
                    e.record.key.upstream_id.0.clone(),
                );
                e.record
                    .change
                    .payload()
                    .map(|p| (key, Value::Object(p.clone())))
            })
            .collect();
        if have.len() >= want.len() || Instant::now() > deadline {
            break have;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(have.len(), want.len());
    for (key, object) in &want {
        assert_eq!(
            have.get(key),
            Some(object),
            "{key:?} differs from localstripe"
        );
    }
    // Fields localstripe has and sluice's schema does not (`account_balance`, `sources`) became
    // columns, typed by their values.
    let schema = stream
        .collection_schema(sync_id, &"stripe:customer".into())
        .await
        .unwrap()
        .unwrap();
    let column = |n: &str| {
        schema
            .columns
            .iter()
            .find(|c| c.name == n)
            .map(|c| c.sql_type.clone())
    };
    assert_eq!(column("account_balance").as_deref(), Some("numeric"));
    assert_eq!(column("sources").as_deref(), Some("jsonb"));
    assert_eq!(
        column("created").as_deref(),
        Some("timestamp with time zone")
    );

    // The documented deviation: localstripe refuses `ending_before`, so the change feed says
    // so and applies nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    let changes = loop {
        let report = source.health().await;
        let check = report
            .checks
            .into_iter()
            .find(|c| c.name == "changes")
            .unwrap();
        if check.status == Status::Error || Instant::now() > deadline {
            break check;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(changes.status, Status::Error, "{changes:?}");
    assert!(
        changes.message.contains("ending_before"),
        "{}",
        changes.message
    );
    let _ = tell.send(());
    task.await.unwrap();
}

//! The API source runtime with the Stripe provider, against the test kit's Stripe emulator,
//! appending into a real embedded records stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_core::{
    AccountsConfig, Health, RecordFilter, RecordStream, SecretSource, Seq, Source, Status,
    StripeSourceConfig, SyncId,
};
use sluice_source_api::ApiSource;
use sluice_stream::EmbeddedStream;
use sluice_stripe_emulator::{Emulator, Fault};

const KEY: &str = "sk_test_51runtimeKey0000000000";

struct Rig {
    stripe: Emulator,
    dir: tempfile::TempDir,
    sync_id: SyncId,
}

impl Rig {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key"), KEY).unwrap();
        Self {
            stripe: Emulator::start(KEY).await,
            dir,
            sync_id: SyncId(uuid_from(7)),
        }
    }

    fn config(&self, collections: &[&str]) -> StripeSourceConfig {
        StripeSourceConfig {
            key: SecretSource::File(self.dir.path().join("key")),
            collections: Some(collections.iter().map(|c| c.to_string()).collect()),
            accounts: None,
            platform: true,
            poll_interval_ms: 100,
            rate_limit: Some(500.0),
            concurrency: 4,
            request_timeout_ms: 5000,
            api_version: None,
            api_base: Some(self.stripe.url()),
            discover_interval_s: 1,
        }
    }

    async fn stream(&self) -> Arc<EmbeddedStream> {
        Arc::new(
            EmbeddedStream::open(self.dir.path().join("data"))
                .await
                .unwrap(),
        )
    }
}

fn uuid_from(n: u128) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x5eed_0000_0000_4000_8000_0000_0000_0000 + n)
}

/// A running source; stopping drops it the way a process exit would.
struct Running {
    source: Arc<ApiSource>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn start(rig: &Rig, config: &StripeSourceConfig, stream: Arc<EmbeddedStream>) -> Running {
    let source = Arc::new(sluice_source_stripe::source(
        "stripe",
        rig.sync_id,
        config,
        stream,
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
    Running {
        source,
        stop: Some(tell),
        task,
    }
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), &mut self.task)
            .await
            .expect("the source stops promptly")
            .unwrap();
    }

    /// Like `kill -9`: the task is gone at whatever await point it was.
    fn kill(self) {
        self.task.abort();
    }

    async fn health(&self) -> Vec<(String, Status, String, Option<String>)> {
        self.source
            .health()
            .await
            .checks
            .into_iter()
            .map(|c| (c.name, c.status, c.message, c.fix))
            .collect()
    }
}

/// Live records of one sync in the stream: (collection, id) → payload.
async fn stored(stream: &EmbeddedStream, sync_id: SyncId) -> BTreeMap<(String, String), Value> {
    let filter = RecordFilter::Sync {
        sync_id,
        collections: None,
    };
    let read = stream.read(&filter, Seq(0), 10_000_000).await.unwrap();
    read.entries
        .into_iter()
        .filter_map(|e| {
            let key = (e.record.key.collection_id.0, e.record.key.upstream_id.0);
            e.record
                .change
                .payload()
                .map(|p| (key, Value::Object(p.clone())))
        })
        .collect()
}

/// What the emulator holds for `resources` (of an account, or the platform).
fn upstream(
    stripe: &Emulator,
    account: Option<&str>,
    resources: &[(&str, &str)],
) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for (resource, object) in resources {
        let objects = match account {
            Some(a) => stripe.objects_in(a, resource),
            None => stripe.objects(resource),
        };
        for o in objects {
            out.insert(
                (
                    format!("stripe:{object}"),
                    o["id"].as_str().unwrap().to_owned(),
                ),
                o,
            );
        }
    }
    out
}

async fn wait_equal(
    stream: &EmbeddedStream,
    sync_id: SyncId,
    want: impl Fn() -> BTreeMap<(String, String), Value>,
    secs: u64,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let have = stored(stream, sync_id).await;
        let want = want();
        if have == want {
            return;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want
                .keys()
                .filter(|k| !have.contains_key(*k))
                .take(5)
                .collect();
            let extra: Vec<_> = have
                .keys()
                .filter(|k| !want.contains_key(*k))
                .take(5)
                .collect();
            let differ: Vec<_> = want
                .iter()
                .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
                .take(3)
                .collect();
            panic!(
                "the stream never matched Stripe: {} stored, {} upstream; missing {missing:?}; extra {extra:?}; differing {differ:?}",
                have.len(),
                want.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, secs: u64, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn backfill_requests(stripe: &Emulator, resource: &str) -> usize {
    stripe
        .requests()
        .iter()
        .filter(|(_, p)| p == resource)
        .count()
}

const THREE: [(&str, &str); 3] = [
    ("customers", "customer"),
    ("products", "product"),
    ("prices", "price"),
];

fn seed(stripe: &Emulator, customers: usize, products: usize, prices: usize) {
    for i in 0..customers {
        stripe.create(
            "customers",
            &[
                ("email", &format!("c{i}@example.com")),
                ("balance", &i.to_string()),
            ],
        );
    }
    for i in 0..products {
        stripe.create("products", &[("name", &format!("product {i}"))]);
    }
    for i in 0..prices {
        stripe.create(
            "prices",
            &[("unit_amount", &(100 + i).to_string()), ("currency", "usd")],
        );
    }
}

#[tokio::test]
async fn a_10000_object_backfill_with_changes_made_during_it_ends_equal_to_stripe() {
    let rig = Rig::new().await;
    seed(&rig.stripe, 5000, 3000, 2000);
    let stream = rig.stream().await;
    let running = start(
        &rig,
        &rig.config(&["customer", "product", "price"]),
        stream.clone(),
    );
    // While pages are read: updates, deletes and creates in every collection.
    let customers = rig.stripe.objects("customers");
    let products = rig.stripe.objects("products");
    for round in 0..20 {
        let c = &customers[(round * 241) % customers.len()];
        rig.stripe.update(
            "customers",
            c["id"].as_str().unwrap(),
            &[("email", &format!("changed{round}@example.com"))],
        );
        let p = &products[(round * 137 + 11) % products.len()];
        if round % 2 == 0 {
            rig.stripe.delete("products", p["id"].as_str().unwrap());
        } else {
            rig.stripe.update(
                "products",
                p["id"].as_str().unwrap(),
                &[("name", "renamed")],
            );
        }
        // Deleting the customer the next page would start after exercises the fallback cursor.
        let doomed = &customers[4999 - round * 100];
        rig.stripe
            .delete("customers", doomed["id"].as_str().unwrap());
        rig.stripe
            .create("prices", &[("unit_amount", "1"), ("currency", "eur")]);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        120,
    )
    .await;
    assert!(
        stored(&stream, rig.sync_id).await.len() >= 9_960,
        "the backfill covered every collection"
    );
    let health = running.health().await;
    assert!(
        health
            .iter()
            .any(|(n, s, m, _)| n == "backfill stripe:customer"
                && *s == Status::Healthy
                && m.contains("backfilled")),
        "{health:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_killed_source_resumes_without_loss_and_never_reads_a_finished_collection_again() {
    let rig = Rig::new().await;
    seed(&rig.stripe, 3000, 150, 0);
    let mut config = rig.config(&["customer", "product"]);
    config.rate_limit = Some(40.0); // slow enough to be killed mid-backfill
    let stream = rig.stream().await;
    let running = start(&rig, &config, stream.clone());
    let live = stream.clone();
    let sync_id = rig.sync_id;
    wait_for(
        "products are backfilled and customers are half way",
        60,
        async || {
            let s = stored(&live, sync_id).await;
            let products = s.keys().filter(|(c, _)| c == "stripe:product").count();
            let customers = s.keys().filter(|(c, _)| c == "stripe:customer").count();
            products == 150 && (500..2500).contains(&customers)
        },
    )
    .await;
    running.kill();
    drop(stream);
    let product_pages = backfill_requests(&rig.stripe, "products");
    let customer_pages = backfill_requests(&rig.stripe, "customers");
    // Changes made while it was down.
    let first = rig.stripe.objects("customers")[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    rig.stripe
        .update("customers", &first, &[("name", "while down")]);
    rig.stripe
        .create("products", &[("name", "made while down")]);

    let stream = rig.stream().await;
    config.rate_limit = Some(500.0);
    let running = start(&rig, &config, stream.clone());
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        60,
    )
    .await;
    assert_eq!(
        backfill_requests(&rig.stripe, "products"),
        product_pages,
        "the finished products collection was not listed again"
    );
    let resumed = backfill_requests(&rig.stripe, "customers") - customer_pages;
    assert!(
        resumed <= 26,
        "customers resumed from its page cursor ({resumed} more pages of 30)"
    );
    running.kill();
    drop(stream);

    // And again mid-incremental: changes while down, then a restart.
    rig.stripe
        .update("customers", &first, &[("name", "changed again")]);
    rig.stripe.delete(
        "products",
        rig.stripe.objects("products")[0]["id"].as_str().unwrap(),
    );
    let (p, c) = (
        backfill_requests(&rig.stripe, "products"),
        backfill_requests(&rig.stripe, "customers"),
    );
    let stream = rig.stream().await;
    let running = start(&rig, &config, stream.clone());
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        60,
    )
    .await;
    assert_eq!(
        (
            backfill_requests(&rig.stripe, "products"),
            backfill_requests(&rig.stripe, "customers")
        ),
        (p, c),
        "nothing was listed again after the backfill"
    );
    running.stop().await;
}

#[tokio::test]
async fn with_30_percent_of_requests_answered_429_the_result_is_exact_and_the_rate_is_kept() {
    let rig = Rig::new().await;
    seed(&rig.stripe, 1500, 300, 200);
    rig.stripe.throttle(0.3, 1);
    let mut config = rig.config(&["customer", "product", "price"]);
    config.rate_limit = Some(20.0);
    let stream = rig.stream().await;
    let running = start(&rig, &config, stream.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    rig.stripe.update(
        "customers",
        rig.stripe.objects("customers")[3]["id"].as_str().unwrap(),
        &[("name", "x")],
    );
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        90,
    )
    .await;
    let requests = rig.stripe.requests();
    let throttled = rig.stripe.throttled();
    assert!(
        throttled.len() * 10 >= requests.len() * 2,
        "{} of {} throttled",
        throttled.len(),
        requests.len()
    );
    // No one-second window holds more than the configured 20 requests.
    let times: Vec<f64> = requests.iter().map(|(t, _)| *t).collect();
    let busiest = times
        .iter()
        .map(|t| times.iter().filter(|u| **u >= *t && **u < t + 1.0).count())
        .max()
        .unwrap();
    assert!(
        busiest <= 20,
        "{busiest} requests within one second (limit 20)"
    );
    // Retry-After: 1 was honoured: after each 429, nothing for (nearly) a second.
    for t in &throttled {
        let early = times
            .iter()
            .filter(|u| **u > t + 0.05 && **u < t + 0.9)
            .count();
        assert_eq!(early, 0, "requests less than a second after the 429 at {t}");
    }
    let health = running.health().await;
    let wait = health.iter().find(|(n, ..)| n == "rate limit").unwrap();
    assert!(
        wait.2.contains("spent waiting on the rate limit"),
        "{wait:?}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_cursor_older_than_stripe_keeps_events_reads_everything_again_and_tombstones_the_vanished()
 {
    let rig = Rig::new().await;
    seed(&rig.stripe, 120, 30, 0);
    let config = rig.config(&["customer", "product"]);
    let stream = rig.stream().await;
    let running = start(&rig, &config, stream.clone());
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        60,
    )
    .await;
    running.stop().await;
    // Down for 31 days (Stripe keeps events 30): deletes and updates meanwhile, whose events
    // are gone by the time sluice comes back.
    let customers = rig.stripe.objects("customers");
    for c in customers.iter().take(10) {
        rig.stripe.delete("customers", c["id"].as_str().unwrap());
    }
    rig.stripe.update(
        "customers",
        customers[50]["id"].as_str().unwrap(),
        &[("name", "updated while down")],
    );
    rig.stripe.advance(31 * 24 * 3600);
    rig.stripe
        .create("customers", &[("email", "new@example.com")]);
    let gone = customers[0]["id"].as_str().unwrap().to_owned();

    let running = start(&rig, &config, stream.clone());
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        60,
    )
    .await;
    let tombstone = stream
        .get(&sluice_core::RecordKey::new(
            rig.sync_id,
            "stripe:customer",
            gone.as_str(),
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(
        tombstone.record.is_tombstone(),
        "the vanished customer got a tombstone"
    );
    let health = running.health().await;
    let again = health.iter().find(|(n, ..)| n == "read again").or_else(|| {
        health
            .iter()
            .find(|(_, _, m, _)| m.contains("no longer kept"))
    });
    // Once every collection is read again the warning is gone; the log and the state keep why.
    if let Some((_, status, message, _)) = again {
        assert_eq!(*status, Status::Warning);
        assert!(message.contains("no longer kept by Stripe"), "{message}");
    }
    let state = stream
        .source_state(&format!("{}/api/changes", rig.sync_id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state["generation"], 2, "{state}");
    assert!(
        state["why"]
            .as_str()
            .unwrap()
            .contains("no longer kept by Stripe"),
        "{state}"
    );
    running.stop().await;
}

#[tokio::test]
async fn a_revoked_key_is_a_health_error_with_the_fix_and_no_tight_loop() {
    let rig = Rig::new().await;
    seed(&rig.stripe, 5, 0, 0);
    let stream = rig.stream().await;
    let running = start(&rig, &rig.config(&["customer"]), stream.clone());
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        30,
    )
    .await;
    rig.stripe.revoke(KEY);
    let before = rig.stripe.requests().len();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = rig.stripe.requests().len() - before;
    assert!(during <= 6, "{during} requests in 8 s with a revoked key");
    let health = running.health().await;
    let (_, status, message, fix) = health.iter().find(|(n, ..)| n == "changes").unwrap();
    assert_eq!(*status, Status::Error);
    assert!(message.contains("Stripe refused the API key"), "{message}");
    assert!(
        !message.contains(&KEY[8..]),
        "the key is not shown: {message}"
    );
    assert!(!message.contains("sk_test_"), "not even masked: {message}");
    assert!(
        fix.as_deref().unwrap().contains("restricted key"),
        "{fix:?}"
    );
    assert!(!format!("{:?}", running.source).contains(&KEY[8..]));
    running.stop().await;
}

#[tokio::test]
async fn malformed_answers_are_clear_errors_and_write_nothing_wrong() {
    let rig = Rig::new().await;
    seed(&rig.stripe, 250, 0, 0);
    rig.stripe
        .fail_next(&[Fault::NotJson, Fault::MissingField, Fault::Truncated]);
    rig.stripe.fail_next(&[Fault::ServerError; 3]);
    let stream = rig.stream().await;
    let running = start(&rig, &rig.config(&["customer"]), stream.clone());
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored(&stream, rig.sync_id).await.len() < 250 && Instant::now() < deadline {
        for (_, status, message, _) in running.health().await {
            if status == Status::Error && !seen.contains(&message) {
                seen.push(message);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        60,
    )
    .await;
    let all = seen.join("\n");
    eprintln!("{all}");
    assert!(
        all.contains("not JSON") || all.contains("malformed"),
        "{all}"
    );
    assert!(
        all.contains("500") || all.contains("nothing from this answer was written"),
        "{all}"
    );
    running.stop().await;
}

#[tokio::test]
async fn an_event_rendered_at_another_api_version_is_fetched_again() {
    let rig = Rig::new().await;
    let c = rig
        .stripe
        .create("customers", &[("email", "v@example.com")]);
    let id = c["id"].as_str().unwrap().to_owned();
    let stream = rig.stream().await;
    let running = start(&rig, &rig.config(&["customer"]), stream.clone());
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        30,
    )
    .await;
    let path = format!("customers/{id}");
    let fetched = || {
        rig.stripe
            .requests()
            .iter()
            .filter(|(_, p)| *p == path)
            .count()
    };
    assert_eq!(fetched(), 0);
    rig.stripe
        .update("customers", &id, &[("name", "same version")]);
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        30,
    )
    .await;
    assert_eq!(
        fetched(),
        0,
        "an event at sluice's API version is used as is"
    );
    rig.stripe.set_api_version("2017-08-15");
    rig.stripe
        .update("customers", &id, &[("name", "old version")]);
    wait_equal(
        &stream,
        rig.sync_id,
        || upstream(&rig.stripe, None, &THREE),
        30,
    )
    .await;
    assert_eq!(fetched(), 1, "the object was fetched at sluice's version");
    running.stop().await;
}

#[tokio::test]
async fn connected_accounts_are_each_their_own_sync_and_new_ones_are_followed() {
    let rig = Rig::new().await;
    rig.stripe
        .create_in("acct_1ONE", "customers", &[("email", "one@example.com")]);
    rig.stripe
        .create_in("acct_2TWO", "customers", &[("email", "two@example.com")]);
    let mut config = rig.config(&["customer"]);
    config.accounts = Some(AccountsConfig::All(sluice_core::AllAccounts::All));
    config.platform = false;
    let stream = rig.stream().await;
    let running = start(&rig, &config, stream.clone());
    let one = sluice_source_api::account_sync_id(rig.sync_id, "acct_1ONE");
    let two = sluice_source_api::account_sync_id(rig.sync_id, "acct_2TWO");
    assert_ne!(one, two);
    wait_equal(
        &stream,
        one,
        || upstream(&rig.stripe, Some("acct_1ONE"), &THREE),
        30,
    )
    .await;
    wait_equal(
        &stream,
        two,
        || upstream(&rig.stripe, Some("acct_2TWO"), &THREE),
        30,
    )
    .await;
    rig.stripe.update_in(
        "acct_2TWO",
        "customers",
        rig.stripe.objects_in("acct_2TWO", "customers")[0]["id"]
            .as_str()
            .unwrap(),
        &[("name", "changed")],
    );
    wait_equal(
        &stream,
        two,
        || upstream(&rig.stripe, Some("acct_2TWO"), &THREE),
        30,
    )
    .await;
    // An account connected later is discovered (every discover_interval_s = 1 s).
    rig.stripe
        .create_in("acct_3NEW", "customers", &[("email", "three@example.com")]);
    let three = sluice_source_api::account_sync_id(rig.sync_id, "acct_3NEW");
    wait_equal(
        &stream,
        three,
        || upstream(&rig.stripe, Some("acct_3NEW"), &THREE),
        30,
    )
    .await;
    assert!(
        stored(&stream, rig.sync_id).await.is_empty(),
        "the platform was not synced"
    );
    running.stop().await;
}

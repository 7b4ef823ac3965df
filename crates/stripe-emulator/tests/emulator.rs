//! The emulator behaves as Stripe documents it, through HTTP as a client sees it.

use serde_json::Value;
use sluice_stripe_emulator::Emulator;

const KEY: &str = "sk_test_emulator";

async fn get(stripe: &Emulator, path: &str, key: &str, account: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .get(format!("{}{path}", stripe.url()))
        .bearer_auth(key);
    if let Some(account) = account {
        request = request.header("Stripe-Account", account);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn lists_are_newest_first_and_page_both_ways() {
    let stripe = Emulator::start(KEY).await;
    let created: Vec<String> = (0..5)
        .map(|i| {
            stripe.create("customers", &[("email", &format!("{i}@example.com"))])["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let (status, first) = get(&stripe, "/v1/customers?limit=2", KEY, None).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&first), [created[4].clone(), created[3].clone()]);
    assert_eq!(first["has_more"], true);
    let (_, next) = get(
        &stripe,
        &format!("/v1/customers?limit=2&starting_after={}", created[3]),
        KEY,
        None,
    )
    .await;
    assert_eq!(ids(&next), [created[2].clone(), created[1].clone()]);
    // ending_before: the page just newer than the cursor, still newest first.
    let (_, newer) = get(
        &stripe,
        &format!("/v1/customers?limit=2&ending_before={}", created[1]),
        KEY,
        None,
    )
    .await;
    assert_eq!(ids(&newer), [created[3].clone(), created[2].clone()]);
    assert_eq!(newer["has_more"], true);
    let (status, bad) = get(&stripe, "/v1/customers?limit=101", KEY, None).await;
    assert_eq!(status, 400);
    assert_eq!(bad["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn changes_are_events_kept_for_the_retention_window() {
    let stripe = Emulator::start(KEY).await;
    let id = stripe.create("products", &[("name", "Pro")])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    stripe.advance(10);
    stripe.update(
        "products",
        &id,
        &[("name", "Pro 2"), ("metadata[tier]", "gold")],
    );
    stripe.delete("products", &id);
    let (_, events) = get(&stripe, "/v1/events", KEY, None).await;
    let kinds: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["product.deleted", "product.updated", "product.created"]
    );
    let updated = &events["data"][1];
    assert_eq!(updated["data"]["previous_attributes"]["name"], "Pro");
    assert_eq!(updated["data"]["object"]["metadata"]["tier"], "gold");
    // Older than the window: gone, and a cursor pointing there is resource_missing.
    let oldest = events["data"][2]["id"].as_str().unwrap().to_owned();
    stripe.set_retention(5);
    let (_, kept) = get(&stripe, "/v1/events", KEY, None).await;
    assert_eq!(kept["data"].as_array().unwrap().len(), 2);
    let (status, gone) = get(
        &stripe,
        &format!("/v1/events?ending_before={oldest}"),
        KEY,
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(gone["error"]["code"], "resource_missing");
}

#[tokio::test]
async fn keys_rate_limits_and_connected_accounts() {
    let stripe = Emulator::start(KEY).await;
    let (status, body) = get(&stripe, "/v1/customers", "sk_test_wrong_key_1234", None).await;
    assert_eq!(status, 401);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Invalid API Key") && !message.contains("wrong_key"),
        "{message}"
    );
    stripe.create_in("acct_1", "customers", &[("email", "a@one.example")]);
    let (_, theirs) = get(&stripe, "/v1/customers", KEY, Some("acct_1")).await;
    let (_, ours) = get(&stripe, "/v1/customers", KEY, None).await;
    assert_eq!((ids(&theirs).len(), ids(&ours).len()), (1, 0));
    let (_, accounts) = get(&stripe, "/v1/accounts", KEY, None).await;
    assert_eq!(ids(&accounts), ["acct_1"]);
    stripe.throttle(0.5, 3);
    let mut limited = 0;
    for _ in 0..6 {
        let response = reqwest::Client::new()
            .get(format!("{}/v1/customers", stripe.url()))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        if response.status().as_u16() == 429 {
            limited += 1;
            assert_eq!(response.headers()["retry-after"], "3");
        }
    }
    assert_eq!(limited, 3);
    stripe.revoke(KEY);
    let (status, body) = get(&stripe, "/v1/customers", KEY, None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "api_key_expired");
    assert_eq!(
        stripe.requests().len(),
        11,
        "every request is counted, refused ones too"
    );
}

#[test]
fn the_emulator_runs_as_a_program_and_takes_the_key_as_curl_sends_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-stripe-emulator"))
        .args([
            "--port",
            &port.to_string(),
            "--key",
            "sk_test_prog",
            "--seed-customers",
            "3",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the emulator did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let http = reqwest::blocking::Client::new();
    // `curl -u sk_test_prog:` sends basic auth with the key as the user.
    let made: Value = http
        .post(format!("{base}/v1/customers"))
        .basic_auth("sk_test_prog", Some(""))
        .form(&[("email", "prog@example.com")])
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(made["id"].as_str().unwrap().starts_with("cus_"));
    let list: Value = http
        .get(format!("{base}/v1/customers?limit=100"))
        .bearer_auth("sk_test_prog")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 4);
    assert_eq!(list["data"][0]["email"], "prog@example.com", "newest first");
    let refused = http
        .get(format!("{base}/v1/customers"))
        .basic_auth("sk_test_other", Some(""))
        .send()
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let _ = child.kill();
    let _ = child.wait();
}

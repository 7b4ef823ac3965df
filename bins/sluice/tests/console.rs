//! The web console in a real browser (headless Chromium through chromedriver) against
//! `sluice serve` and real clusters: log in, add a target through the manual-SQL path,
//! create a consumer, watch it turn healthy, pause and resume it, and see a stopped target
//! turn its consumers `paused` with the reason. Each page is saved as a screenshot in
//! `target/console-screenshots/`. Its security (cookie, CSRF, origin, secrets) is checked
//! over plain HTTP beside.

use std::time::Duration;

use serde_json::json;

mod support;
use support::*;

#[path = "support/browser.rs"]
mod browser;
use browser::{Browser, ENTER, TAB};

const CONSOLE_PASSWORD: &str = "console-pw-71c3";
const SHOP_PASSWORD: &str = "shop-pw-2f9a";

#[tokio::test(flavor = "multi_thread")]
async fn the_console_adds_a_target_and_a_consumer_and_shows_health_in_a_browser() {
    let env = env().await;
    let secret = env.dir.path().join("console-password");
    std::fs::write(&secret, CONSOLE_PASSWORD).unwrap();
    let path = write_config(&env, "");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "max_body_bytes = 65536\n",
        &format!(
            "max_body_bytes = 65536\nconsole_password = {{ file = \"{}\" }}\n",
            secret.display()
        ),
    );
    std::fs::write(&path, text).unwrap();
    let (mut child, api) = serve_ready(&env, &path).await;
    let base = format!("http://127.0.0.1:{}", env.port);
    let browser = Browser::start().await;

    // Log in: a page needs it; a wrong password is refused (and logged without it); the
    // console password works, typed and sent with the keyboard alone.
    browser.goto(&format!("{base}/consumers/app-records")).await;
    assert!(
        browser.url().await.ends_with("/login"),
        "{}",
        browser.url().await
    );
    assert!(browser.unlabelled_fields().await.is_empty());
    browser.screenshot("01-login").await;
    browser.fill("#secret", "not-the-password").await;
    browser.keys(ENTER).await;
    let refused = browser
        .text_showing("neither the API token nor the console password", 30)
        .await;
    assert!(
        refused.contains("neither the API token nor the console password"),
        "{refused}"
    );
    browser.fill("#secret", CONSOLE_PASSWORD).await;
    // Tab to the button, Enter presses it.
    browser.keys(&format!("{TAB}{ENTER}")).await;
    // The login's answer sets the session cookie and leads to the overview: wait for it here,
    // since going to another page while the form is in flight would abandon the login.
    let landed = browser.text_showing("app-records", 30).await;
    assert!(
        landed.contains("app-records"),
        "logging in led to: {landed}"
    );
    let overview = browser
        .wait_for_text(&format!("{base}/"), "app-records", 30)
        .await;
    assert!(
        overview.contains("Overview") && overview.contains("warehouse"),
        "{overview}"
    );
    let log = log(&env);
    assert!(log.contains("console: failed login"), "{log}");
    assert!(
        !log.contains("not-the-password") && !log.contains(CONSOLE_PASSWORD),
        "{log}"
    );

    // Add a target through the manual-SQL path: a new sync user, created by the SQL the
    // target's page shows, run by the database's admin (here: the test).
    browser.goto(&format!("{base}/targets/new")).await;
    assert!(
        browser.unlabelled_fields().await.is_empty(),
        "{:?}",
        browser.unlabelled_fields().await
    );
    browser.fill("#name", "shop").await;
    browser.fill("#host", "127.0.0.1").await;
    browser.fill("#port", &env.target.port().to_string()).await;
    browser.fill("#database", "postgres").await;
    browser.fill("#user", "sluice_shop").await;
    browser.fill("#password", SHOP_PASSWORD).await;
    browser.fill("#read_role", "shop_read").await;
    browser
        .run("document.querySelector('#ssl_mode').value = 'disable';")
        .await;
    browser.screenshot("02-add-target").await;
    browser
        .click("form[action='/targets/new'] button[type=submit]")
        .await;
    let page = browser.text_showing("Target saved", 10).await;
    assert!(
        page.contains("Target shop") && page.contains("Target saved"),
        "{page}"
    );
    assert!(
        page.contains("Password\nset") || page.contains("Password set"),
        "{page}"
    );
    let html = browser.source().await;
    assert!(!html.contains(SHOP_PASSWORD), "no secret in a page");
    let sql = browser
        .run("return document.querySelector('pre.sql code').innerText")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    assert!(sql.contains("'<the sync user password>'"), "{sql}");
    browser.screenshot("03-target-manual-sql").await;
    env.target
        .execute(
            "postgres",
            &sql.replace("'<the sync user password>'", &format!("'{SHOP_PASSWORD}'")),
        )
        .await
        .unwrap();
    browser
        .click("form[action='/targets/shop/check'] button")
        .await;
    let checked = browser.text_showing("Setup check:", 10).await;
    assert!(checked.contains("Setup check: all good"), "{checked}");
    browser.screenshot("04-target-checked").await;

    // Create a consumer of pushed records on it.
    browser.goto(&format!("{base}/consumers/new")).await;
    assert!(browser.unlabelled_fields().await.is_empty());
    browser.fill("#name", "shop-events").await;
    browser
        .run("document.querySelector('#target').value = 'shop'; document.querySelector('#source').value = 'provider:http';")
        .await;
    browser.fill("#schema", "shop").await;
    browser.fill("#table", "events").await;
    browser.screenshot("05-add-consumer").await;
    browser
        .click("form[action='/consumers/new'] button[type=submit]")
        .await;
    let page = browser.text_showing("create table", 10).await;
    assert!(page.contains("Consumer shop-events"), "{page}");
    assert!(page.contains("create table \"shop\".\"events\""), "{page}");
    let (status, body) = api
        .post(
            "/v1/syncs/events/records",
            json!({"records": [{"collection": "orders", "id": "o1", "payload": {"total": 12}}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // Watch it turn healthy, verified, with the record in its table.
    browser
        .wait_for_text(
            &format!("{base}/consumers/shop-events"),
            "Consumer shop-events healthy",
            60,
        )
        .await;
    wait_until(
        "the pushed record is in shop.events",
        &env,
        30,
        async || target_count(&env, "shop.events", "upstream_id = 'o1'").await == 1,
    )
    .await;
    browser
        .click("form[action='/consumers/shop-events/verify'] button")
        .await;
    let verified = browser.text_showing("Verification:", 10).await;
    assert!(verified.contains("Verification: all good"), "{verified}");
    browser.screenshot("06-consumer-healthy").await;

    // Pause with a reason, then resume, with the buttons.
    browser.fill("#reason", "checking the shop table").await;
    browser.click("button[value=pause]").await;
    // Each form's answer is waited for before the next page: going to another page while a
    // form is in flight would abandon it.
    let answer = browser.text_showing("Paused.", 30).await;
    assert!(answer.contains("Paused."), "pausing led to: {answer}");
    // The page can render before the consumer has taken the pause in; its address keeps the
    // note, so reload it until it has.
    let paused = browser
        .wait_for_text(&browser.url().await, "Consumer shop-events paused", 10)
        .await;
    assert!(
        paused.contains("Paused.") && paused.contains("checking the shop table"),
        "{paused}"
    );
    assert!(paused.contains("Consumer shop-events paused"), "{paused}");
    browser.screenshot("07-consumer-paused").await;
    browser.click("button[value=resume]").await;
    let answer = browser.text_showing("Resumed.", 30).await;
    assert!(answer.contains("Resumed."), "resuming led to: {answer}");
    browser
        .wait_for_text(
            &format!("{base}/consumers/shop-events"),
            "Consumer shop-events healthy",
            30,
        )
        .await;

    // A record lookup finds the pushed record with its version and position.
    browser
        .goto(&format!(
            "{base}/records?sync=events&collection=orders&id=o1"
        ))
        .await;
    let found = browser.text().await;
    assert!(
        found.contains("Position in the stream") && found.contains("\"total\": 12"),
        "{found}"
    );
    browser.screenshot("08-record-lookup").await;
    browser.goto(&format!("{base}/syncs/app")).await;
    assert!(
        browser.text().await.contains("public.orders"),
        "{}",
        browser.text().await
    );
    browser.screenshot("09-sync").await;

    // A stopped target turns its consumers paused, with the reason, on the overview.
    env.target.stop().unwrap();
    // Each consumer finds the target gone at its own next write or check, so the page can say
    // "is unavailable" for another consumer first (CI saw that once): wait for this one's.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let down = loop {
        let page = browser
            .wait_for_text(&format!("{base}/"), "is unavailable", 60)
            .await;
        let paused = page
            .lines()
            .find(|l| l.starts_with("shop-events"))
            .is_some_and(|l| l.contains("paused"));
        if paused || std::time::Instant::now() >= deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let line = down
        .lines()
        .find(|l| l.starts_with("shop-events"))
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains("paused"), "{down}");
    browser.screenshot("10-overview-target-down").await;
    browser.goto(&format!("{base}/events")).await;
    let events = browser.text().await;
    assert!(
        events.contains("consumer \"shop-events\"") && events.contains("paused"),
        "{events}"
    );
    browser.screenshot("11-event-log").await;
    env.target.start().unwrap();
    browser
        .wait_for_text(
            &format!("{base}/consumers/shop-events"),
            "Consumer shop-events healthy",
            90,
        )
        .await;
    let overview = browser
        .wait_for_text(&format!("{base}/"), "Lag over the last hour", 10)
        .await;
    assert!(overview.contains("shop-events lag (records)"), "{overview}");
    browser.screenshot("12-overview").await;
    browser.quit().await;

    // Security over plain HTTP: the cookie's attributes, CSRF and origin checks.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = http
        .post(format!("{base}/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("secret", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_owned();
    let page = http
        .get(format!("{base}/consumers/shop-events"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!page.contains(TOKEN), "the token is not in a page");
    let (status, _) = form(
        &http,
        &base,
        &session,
        "/consumers/shop-events/control",
        &[("csrf", "forged"), ("action", "pause")],
        None,
    )
    .await;
    assert_eq!(status, 403, "a forged CSRF token is refused");
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    let (status, _) = form(
        &http,
        &base,
        &session,
        "/consumers/shop-events/control",
        &[("csrf", &csrf), ("action", "pause")],
        Some("http://evil.example"),
    )
    .await;
    assert_eq!(status, 403, "a post from another site is refused");
    let (status, _) = form(
        &http,
        &base,
        "",
        "/consumers/shop-events/control",
        &[("csrf", &csrf), ("action", "pause")],
        None,
    )
    .await;
    assert_eq!(status, 403, "no session, no change");
    let (status, _) = form(
        &http,
        &base,
        &session,
        "/consumers/shop-events/control",
        &[("csrf", &csrf), ("action", "pause")],
        None,
    )
    .await;
    assert_eq!(status, 303, "with the session's token it works");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(terminate(&mut child).success());
}

async fn form(
    http: &reqwest::Client,
    base: &str,
    cookie: &str,
    path: &str,
    fields: &[(&str, &str)],
    origin: Option<&str>,
) -> (u16, String) {
    let mut request = http.post(format!("{base}{path}")).form(fields);
    if !cookie.is_empty() {
        request = request.header("cookie", cookie);
    }
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// With `[api] tls` the API and the console are served over https, and the session cookie is
/// `Secure`; a certificate file that cannot be used stops `serve` naming it.
#[tokio::test]
async fn over_tls_the_console_cookie_is_secure() {
    let env = env().await;
    let authority = sluice_localpg::Authority::new().unwrap();
    let (cert, key) = authority.server().unwrap();
    let cert_file = env.dir.path().join("api.crt");
    let key_file = env.dir.path().join("api.key");
    // The chain: the server's certificate, then the CA that signed it.
    std::fs::write(&cert_file, format!("{cert}\n{}", authority.cert_pem())).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let path = write_config(&env, "");
    let with_tls = |cert: &std::path::Path| {
        std::fs::read_to_string(&path).unwrap().replace(
            "max_body_bytes = 65536\n",
            &format!(
                "max_body_bytes = 65536\ntls = {{ certificate_file = \"{}\", key_file = \"{}\" }}\n",
                cert.display(),
                key_file.display()
            ),
        )
    };
    // A certificate file that is not one: serve refuses to start and says which file.
    let broken = env.dir.path().join("broken.crt");
    std::fs::write(&broken, "not a certificate").unwrap();
    let broken_config = env.dir.path().join("broken.toml");
    std::fs::write(&broken_config, with_tls(&broken)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&broken_config)
        .env("TEST_API_TOKEN", TOKEN)
        .env("TEST_TARGET_PASSWORD", "sync-pw")
        .env("TEST_SOURCE_PASSWORD", env.source.superuser_password())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("broken.crt"), "{said}");

    std::fs::write(&path, with_tls(&cert_file)).unwrap();
    let mut child = serve(&env, &path);
    let https = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(authority.cert_pem().as_bytes()).unwrap(),
        )
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", env.port);
    wait_until("the API answers over https", &env, 60, async || {
        https
            .get(format!("{base}/v1/status"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let login = https
        .post(format!("{base}/login"))
        .form(&[("secret", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let page = https
        .get(format!("{base}/"))
        .header("cookie", cookie.split(';').next().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Overview"));
    // The CLI finds the server over https from the config, trusting its certificate file.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["status", "--config"])
        .arg(&path)
        .env("TEST_API_TOKEN", TOKEN)
        .env("TEST_TARGET_PASSWORD", "sync-pw")
        .env("TEST_SOURCE_PASSWORD", env.source.superuser_password())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&status.stdout).to_string()
        + &String::from_utf8_lossy(&status.stderr);
    assert!(said.contains("app-records"), "{said}");
    // Plain http to the same port gets no answer a browser would take.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/v1/status", env.port))
        .bearer_auth(TOKEN)
        .send()
        .await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);
    assert!(terminate(&mut child).success());
}

/// Names with markup and URL characters are escaped in pages and link to their own page;
/// garbage sent to the console's forms gets a 4xx, never a crash or a change.
#[tokio::test]
async fn odd_names_and_garbage_input_are_handled() {
    let env = env().await;
    let odd = "odd name?#\\\"<b>x</b>";
    let extra = format!(
        r#"
[[consumer]]
name = "{odd}"
target = "warehouse"
filter = {{ provider = "http" }}
layout = {{ kind = "consumer_table", schema = "sluice", table = "odd" }}
"#
    );
    let path = write_config(&env, &extra);
    let (mut child, _api) = serve_ready(&env, &path).await;
    let base = format!("http://127.0.0.1:{}", env.port);
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = http
        .post(format!("{base}/login"))
        .form(&[("secret", TOKEN)])
        .send()
        .await
        .unwrap();
    let session = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let get = async |path: &str| {
        let response = http
            .get(format!("{base}{path}"))
            .header("cookie", &session)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let (status, overview) = get("/").await;
    assert_eq!(status, 200);
    assert!(
        !overview.contains("<b>x</b>"),
        "markup in a name is escaped"
    );
    assert!(
        overview.contains("odd name?#&quot;&lt;b&gt;x&lt;/b&gt;"),
        "{overview}"
    );
    let link = "/consumers/odd%20name%3F%23%22%3Cb%3Ex%3C%2Fb%3E";
    assert!(overview.contains(link), "{overview}");
    let (status, page) = get(link).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("Consumer odd name?#&quot;&lt;b&gt;x&lt;/b&gt;"),
        "{page}"
    );

    // Garbage: random bytes as a form, a huge field, a login without its field.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for (path, body) in [
        ("/login", garbage.clone()),
        ("/targets/new", garbage.clone()),
        (
            "/consumers/new",
            format!("csrf=x&name={}", "n".repeat(1_000_000)).into_bytes(),
        ),
        ("/login", b"nothing=here".to_vec()),
    ] {
        let response = http
            .post(format!("{base}{path}"))
            .header("cookie", &session)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        assert!((400..500).contains(&status), "{path}: {status}");
    }
    let (status, _) = get("/").await;
    assert_eq!(status, 200, "still serving");
    assert!(
        !std::fs::exists(env.dir.path().join("data/managed.toml")).unwrap(),
        "nothing was created"
    );
    assert!(terminate(&mut child).success());
}

//! Alerts delivered to real receivers: a webhook (an HTTP server in the test) and email
//! through an SMTP server (aiosmtpd), plain and with STARTTLS against a private CA.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_alerts::{Alerter, EmailChannel, WebhookChannel};
use sluice_core::{
    EmailConfig, EntityKind, EntityRef, HealthReport, HealthState, SecretSource, SmtpSecurity,
    Status,
};

mod support;
use support::smtp::SmtpSink;

fn report(
    kind: EntityKind,
    name: &str,
    status: Status,
    message: &str,
    fix: Option<&str>,
) -> HealthReport {
    let mut state = HealthState::new(EntityRef {
        kind,
        name: name.into(),
    });
    state.observe(
        "reachable",
        status,
        message,
        fix.map(str::to_owned),
        time::OffsetDateTime::now_utc(),
    );
    state.report()
}

fn email(port: u16, security: SmtpSecurity) -> EmailConfig {
    EmailConfig {
        smtp_host: "localhost".into(),
        smtp_port: Some(port),
        security,
        ca_file: None,
        username: None,
        password: None,
        from: "sluice <sluice@example.com>".into(),
        to: vec!["ops@example.com".into(), "oncall@example.com".into()],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_problem_is_emailed_once_with_its_fix_and_a_recovery_follows() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpSink::start(dir.path(), None);
    let channel = EmailChannel::new(&email(smtp.port, SmtpSecurity::None)).unwrap();
    let alerter = Alerter::new(vec![Arc::new(channel)]);
    let down = report(
        EntityKind::Target,
        "warehouse",
        Status::Error,
        "target \"warehouse\" is unreachable: connection refused; its consumers are paused",
        Some("start the database or fix [target.connection] host/port"),
    );
    assert_eq!(alerter.observe(std::slice::from_ref(&down)).len(), 1);
    // The same status again, many times: nothing more is sent.
    for _ in 0..5 {
        assert!(alerter.observe(std::slice::from_ref(&down)).is_empty());
    }
    let up = report(
        EntityKind::Target,
        "warehouse",
        Status::Healthy,
        "connected",
        None,
    );
    let sent = alerter.observe(&[up]);
    assert_eq!(sent.len(), 1);
    assert!(sent[0].recovered);
    let messages = tokio::task::spawn_blocking(move || smtp.wait_for(2, 30))
        .await
        .unwrap();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    let problem = &messages[0];
    assert!(
        problem.contains("Subject: [sluice] error: target \"warehouse\""),
        "{problem}"
    );
    assert!(problem.contains("its consumers are paused"), "{problem}");
    assert!(problem.contains("Fix: start the database"), "{problem}");
    assert!(
        problem.contains("ops@example.com") && problem.contains("oncall@example.com"),
        "{problem}"
    );
    assert!(
        messages[1].contains("Subject: [sluice] recovered: target \"warehouse\" is healthy again"),
        "{}",
        messages[1]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn email_goes_over_starttls_to_a_server_with_a_private_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let authority = sluice_localpg::Authority::new().unwrap();
    let (cert, key) = authority.server().unwrap();
    std::fs::write(dir.path().join("server.crt"), cert).unwrap();
    std::fs::write(dir.path().join("server.key"), key).unwrap();
    std::fs::write(dir.path().join("ca.crt"), authority.cert_pem()).unwrap();
    let smtp = SmtpSink::start(
        dir.path(),
        Some((
            &dir.path().join("server.crt"),
            &dir.path().join("server.key"),
        )),
    );
    // Without the CA the certificate is refused, and nothing is delivered.
    let untrusted = EmailChannel::new(&email(smtp.port, SmtpSecurity::Starttls)).unwrap();
    let alert = Alerter::new(Vec::new()).observe(&[report(
        EntityKind::Sync,
        "stripe",
        Status::Error,
        "Stripe refused the API key",
        Some("create a restricted key"),
    )]);
    let refused = sluice_alerts::Channel::deliver(&untrusted, &alert[0])
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("SMTP server localhost"),
        "{refused}"
    );
    // With it, the alert arrives.
    let mut config = email(smtp.port, SmtpSecurity::Starttls);
    config.ca_file = Some(dir.path().join("ca.crt"));
    let trusted = EmailChannel::new(&config).unwrap();
    sluice_alerts::Channel::deliver(&trusted, &alert[0])
        .await
        .unwrap();
    let messages = tokio::task::spawn_blocking(move || smtp.wait_for(1, 30))
        .await
        .unwrap();
    assert!(
        messages[0].contains("Stripe refused the API key"),
        "{}",
        messages[0]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_get_each_alert_as_json_and_a_failing_one_is_retried() {
    let received: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let failures = Arc::new(Mutex::new(1)); // the first delivery fails
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            let failures = failures.clone();
            move |axum::Json(body): axum::Json<serde_json::Value>| async move {
                let mut left = failures.lock().unwrap();
                if *left > 0 {
                    *left -= 1;
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                received.lock().unwrap().push(body);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let alerter = Alerter::new(vec![Arc::new(WebhookChannel::new(&url).unwrap())]);
    alerter.observe(&[report(
        EntityKind::Consumer,
        "orders",
        Status::Warning,
        "consumer \"orders\" is 12,000 records behind",
        None,
    )]);
    // Worse: error. Then the consumer is removed from the config.
    alerter.observe(&[report(
        EntityKind::Consumer,
        "orders",
        Status::Error,
        "stopped",
        Some("resume it"),
    )]);
    alerter.observe(&[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.lock().unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "{:?}", received.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = received.lock().unwrap().clone();
    let statuses: Vec<(&str, bool)> = got
        .iter()
        .map(|a| {
            (
                a["status"].as_str().unwrap(),
                a["recovered"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(statuses.contains(&("warning", false)), "{got:?}");
    assert!(statuses.contains(&("error", false)), "{got:?}");
    assert!(statuses.contains(&("healthy", true)), "{got:?}");
    let error = got.iter().find(|a| a["status"] == "error").unwrap();
    assert_eq!(error["entity"]["name"], "orders");
    assert_eq!(error["previous"], "warning");
    assert_eq!(error["fix"], "resume it");
}

#[test]
fn a_password_is_read_from_its_source_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "smtp-secret-9f2").unwrap();
    let mut config = email(2525, SmtpSecurity::Starttls);
    config.username = Some("alerts".into());
    config.password = Some(SecretSource::File(dir.path().join("pw")));
    let channel = EmailChannel::new(&config).unwrap();
    assert!(!format!("{channel:?}").contains("smtp-secret"));
    config.password = Some(SecretSource::File(dir.path().join("missing")));
    let e = EmailChannel::new(&config).unwrap_err().to_string();
    assert!(e.contains("missing") && !e.contains("smtp-secret"), "{e}");
    config.password = None;
    let e = EmailChannel::new(&config).unwrap_err().to_string();
    assert!(e.contains("no password"), "{e}");
}

#[tokio::test]
async fn every_status_change_is_in_the_event_log_but_only_trouble_is_alerted() {
    let alerter = Alerter::new(Vec::new());
    let consumer =
        |status, message: &str| report(EntityKind::Consumer, "orders", status, message, None);
    assert!(
        alerter
            .observe(&[consumer(Status::Initializing, "starting")])
            .is_empty()
    );
    assert!(
        alerter
            .observe(&[consumer(Status::Healthy, "wrote 10 records")])
            .is_empty()
    );
    assert!(
        alerter
            .observe(&[consumer(Status::Paused, "paused by a user (console)")])
            .is_empty(),
        "a pause is not an alert"
    );
    assert!(
        alerter
            .observe(&[consumer(Status::Paused, "paused by a user (console)")])
            .is_empty()
    );
    let alerts = alerter.observe(&[consumer(Status::Error, "the target refused a record")]);
    assert_eq!(alerts.len(), 1);
    assert!(
        alerter.observe(&[]).len() == 1,
        "removed while in trouble: a recovery notice"
    );
    let events = alerter.events();
    let seen: Vec<(Option<Status>, Option<Status>)> =
        events.iter().rev().map(|e| (e.from, e.to)).collect();
    assert_eq!(
        seen,
        vec![
            (None, Some(Status::Initializing)),
            (Some(Status::Initializing), Some(Status::Healthy)),
            (Some(Status::Healthy), Some(Status::Paused)),
            (Some(Status::Paused), Some(Status::Error)),
            (Some(Status::Error), None),
        ],
        "newest first, each change once"
    );
    assert_eq!(events[1].reason, "the target refused a record");
}

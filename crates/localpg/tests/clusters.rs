//! The test kit proves its own promises against real servers: TLS required, client
//! certificates required, passwords checked, logical replication on, and nothing left behind.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_localpg::{Auth, Cluster, Tls};
use sqlx::{Connection, PgConnection};

/// SQLSTATE of a failed connection attempt, with the message for assertion output.
async fn connect_error(url: &str) -> (String, String) {
    match PgConnection::connect(url).await {
        Ok(_) => panic!("connection to {url} should have failed"),
        Err(e) => {
            let code = e
                .as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.into_owned())
                .unwrap_or_default();
            (code, e.to_string())
        }
    }
}

async fn scalar_bool(url: &str, sql: &'static str) -> bool {
    let mut conn = PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
}

#[tokio::test]
async fn scram_cluster_accepts_the_right_password_and_rejects_a_wrong_one() {
    let pg = Cluster::start_default().unwrap();
    let db = pg.fresh_database("auth").await.unwrap();
    pg.create_role("alice", Some("correct horse"))
        .await
        .unwrap();

    assert!(
        scalar_bool(
            &pg.url_as("alice", Some("correct horse"), &db, None),
            "select true"
        )
        .await
    );
    let (code, message) = connect_error(&pg.url_as("alice", Some("wrong"), &db, None)).await;
    assert_eq!(code, "28P01", "invalid_password expected: {message}");
    let (code, message) = connect_error(&pg.url_as("alice", None, &db, None)).await;
    assert!(
        code == "28P01" || message.contains("password"),
        "{code}: {message}"
    );
}

#[tokio::test]
async fn trust_cluster_needs_no_password() {
    let pg = Cluster::options().auth(Auth::Trust).start().unwrap();
    pg.create_role("bob", None).await.unwrap();
    assert!(scalar_bool(&pg.url_as("bob", None, "postgres", None), "select true").await);
}

#[tokio::test]
async fn tls_required_cluster_rejects_plain_connections_and_verifies_with_its_ca() {
    let pg = Cluster::options().tls(Tls::Required).start().unwrap();
    let url = pg.url("postgres");
    assert!(
        url.contains("sslmode=verify-full") && url.contains("sslrootcert="),
        "{url}"
    );
    assert!(
        scalar_bool(
            &url,
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        )
        .await
    );

    let plain = url.replace("sslmode=verify-full", "sslmode=disable");
    let (code, message) = connect_error(&plain).await;
    assert_eq!(
        code, "28000",
        "invalid_authorization_specification expected: {message}"
    );
    // "no encryption" from 14 on, "SSL off" on 12 and 13.
    assert!(
        message.contains("no encryption") || message.contains("SSL off"),
        "{message}"
    );
}

#[tokio::test]
async fn tls_off_cluster_refuses_clients_that_insist_on_tls() {
    let pg = Cluster::start_default().unwrap();
    let url = pg
        .url("postgres")
        .replace("sslmode=disable", "sslmode=require");
    let err = PgConnection::connect(&url).await.unwrap_err().to_string();
    assert!(
        err.to_lowercase().contains("ssl") || err.to_lowercase().contains("tls"),
        "{err}"
    );
}

#[tokio::test]
async fn client_cert_cluster_requires_a_certificate_for_the_role() {
    let pg = Cluster::options()
        .tls(Tls::ClientCertRequired)
        .start()
        .unwrap();
    // The superuser URL carries the superuser's certificate.
    assert!(pg.url("postgres").contains("sslcert="));
    assert!(scalar_bool(&pg.url("postgres"), "select true").await);

    pg.create_role("carol", Some("pw")).await.unwrap();
    let without_cert = pg.url_as("carol", Some("pw"), "postgres", None);
    let (code, message) = connect_error(&without_cert).await;
    assert_eq!(code, "28000", "{message}");
    assert!(message.contains("certificate"), "{message}");

    let someone_elses = pg.client_cert("dave").unwrap();
    let (code, message) =
        connect_error(&pg.url_as("carol", Some("pw"), "postgres", Some(&someone_elses))).await;
    assert!(
        code.starts_with("28"),
        "a certificate for another role must not work: {code} {message}"
    );
    assert!(
        pg.log_tail(20).contains("CN mismatch"),
        "the server refused it for the name: {}",
        pg.log_tail(20)
    );

    let cert = pg.client_cert("carol").unwrap();
    assert!(
        scalar_bool(
            &pg.url_as("carol", Some("pw"), "postgres", Some(&cert)),
            "select true"
        )
        .await
    );
    let (code, message) =
        connect_error(&pg.url_as("carol", Some("nope"), "postgres", Some(&cert))).await;
    assert_eq!(code, "28P01", "the password is still checked: {message}");
}

#[tokio::test]
async fn logical_cluster_reports_wal_level_logical() {
    let pg = Cluster::options().logical_replication().start().unwrap();
    let mut conn = pg.admin("postgres").await.unwrap();
    let level: String = sqlx::query_scalar("select current_setting('wal_level')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(level, "logical");
    let default = Cluster::start_default().unwrap();
    let mut conn = default.admin("postgres").await.unwrap();
    let level: String = sqlx::query_scalar("select current_setting('wal_level')")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(level, "replica");
}

#[tokio::test]
async fn psql_connects_with_the_printed_urls() {
    let pg = Cluster::options()
        .tls(Tls::ClientCertRequired)
        .logical_replication()
        .start()
        .unwrap();
    let out = Command::new(pg.binaries().psql())
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
        ])
        .arg(pg.url("postgres"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");
}

#[tokio::test]
async fn fresh_databases_are_distinct_and_roles_and_odd_names_work() {
    let pg = Cluster::start_default().unwrap();
    let a = pg.fresh_database("t").await.unwrap();
    let b = pg.fresh_database("t").await.unwrap();
    assert_ne!(a, b);
    let odd = "We're \"odd\" Ünïcode";
    pg.create_database(odd).await.unwrap();
    pg.create_role(odd, Some("p'w")).await.unwrap();
    assert!(
        scalar_bool(
            &pg.url_as(odd, Some("p'w"), odd, None),
            "select current_database() = 'We''re \"odd\" Ünïcode'"
        )
        .await
    );
}

#[tokio::test]
async fn a_cluster_counts_the_cpu_its_backends_spend_and_none_once_stopped() {
    let pg = Cluster::start_default().unwrap();
    let before = pg.cpu_seconds();
    assert!(before.is_finite(), "{before}");
    // A backend busy for a while, then gone (reaped by the postmaster).
    pg.execute(
        "postgres",
        "select count(*) from generate_series(1, 3000000) a, lateral (select md5(a::text)) m",
    )
    .await
    .unwrap();
    // Its time counts once the postmaster has reaped it: between its exit and that, the
    // exited backend may not show its time (this once read 0.03 -> 0.03 straight after).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = pg.cpu_seconds();
    while after < before + 0.2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = pg.cpu_seconds();
    }
    assert!(after >= before + 0.2, "{before} -> {after}");
    pg.stop().unwrap();
    assert!(pg.cpu_seconds().is_nan());
}

#[tokio::test]
async fn stop_and_start_keep_data_and_port() {
    let pg = Cluster::start_default().unwrap();
    let db = pg.fresh_database("restart").await.unwrap();
    pg.execute(
        &db,
        "create table kept (v int); insert into kept values (7)",
    )
    .await
    .unwrap();
    let port = pg.port();
    pg.stop().unwrap();
    assert!(!pg.is_running());
    assert!(PgConnection::connect(&pg.url(&db)).await.is_err());
    pg.start().unwrap();
    assert_eq!(pg.port(), port);
    let mut conn = pg.admin(&db).await.unwrap();
    let v: i32 = sqlx::query_scalar("select v from kept")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, 7);
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn dropping_a_cluster_stops_the_server_and_removes_its_files() {
    let pg = Cluster::start_default().unwrap();
    let (root, port) = (pg.root().to_path_buf(), pg.port());
    assert!(root.exists() && port_open(port));
    drop(pg);
    assert!(!root.exists(), "{} should be gone", root.display());
    assert!(!port_open(port), "port {port} should be closed");
}

/// Run by `a_killed_owner_process_leaves_nothing_behind` in a child process.
#[test]
fn child_starts_a_cluster_and_waits_to_be_killed() {
    if std::env::var_os("SLUICE_LOCALPG_CHILD").is_none() {
        return; // only meaningful as the child of the test below
    }
    let pg = Cluster::start_default().unwrap();
    println!("CLUSTER {} {}", pg.port(), pg.root().display());
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn a_killed_owner_process_leaves_nothing_behind() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_starts_a_cluster_and_waits_to_be_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SLUICE_LOCALPG_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (port, root) = loop {
        let line = lines.next().expect("child printed its cluster").unwrap();
        // The harness prints "test <name> ... " before our line, without a newline.
        if let Some((_, rest)) = line.split_once("CLUSTER ") {
            let (port, root) = rest.split_once(' ').unwrap();
            break (port.parse::<u16>().unwrap(), PathBuf::from(root));
        }
    };
    assert!(port_open(port) && root.exists());
    child.kill().unwrap(); // SIGKILL: no destructor runs in the child
    child.wait().unwrap();
    wait_until("the orphaned server is stopped", || !port_open(port));
    wait_until("the orphaned files are removed", || !root.exists());
}

#[test]
fn a_wrong_sluice_pg_bin_is_reported_not_ignored() {
    if std::env::var_os("SLUICE_LOCALPG_CHILD").is_some() {
        let err = Cluster::start_default().unwrap_err().to_string();
        println!("ERROR {err}");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_wrong_sluice_pg_bin_is_reported_not_ignored",
            "--nocapture",
        ])
        .env("SLUICE_LOCALPG_CHILD", "1")
        .env("SLUICE_PG_BIN", "/nonexistent/pg/bin")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("SLUICE_PG_BIN=/nonexistent/pg/bin (no initdb there)")
            && stdout.contains("apt-get install -y postgresql"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_chosen_major_version_runs_that_version() {
    // 12 is the oldest supported release, and never the machine's default.
    let pg = Cluster::options().version(12).start().unwrap();
    assert_eq!(
        pg.binaries().major(),
        Some(12),
        "{}",
        pg.binaries().version()
    );
    let mut conn = PgConnection::connect(&pg.url("postgres")).await.unwrap();
    let version: i32 = sqlx::query_scalar("select current_setting('server_version_num')::int")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(version / 10000, 12, "{version}");
}

#[test]
fn an_unknown_major_version_is_refused_with_the_supported_ones() {
    let err = Cluster::options()
        .version(11)
        .start()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("11") && err.contains("12, 13, 14, 15, 16, 17, 18"),
        "{err}"
    );
}

//! `cargo xtask bench proxy`: the write-back proxy (in a release `sluice serve`).
//!
//! (a) `pgbench -S` (select-only, prepared statements) through the proxy and directly against
//!     the same PostgreSQL, in the same run: transactions/s with `SLUICE_BENCH_CLIENTS`
//!     clients (default 8) for `SLUICE_BENCH_SECONDS` each (default 15), and with one client
//!     the p50 latency from pgbench's per-transaction log. Goals: ≥ 0.8× direct throughput,
//!     under 100 µs added to p50. Everything (pgbench, PostgreSQL, the proxy) shares this
//!     machine's cores; the proxy's CPU is taken from the other two.
//!     Beside them, the ceiling any proxy has here: a plain TCP relay (bytes copied both ways,
//!     no protocol, arranged on threads as the proxy is), measured the same way.
//! (b) One `UPDATE` of 1,000 rows of a synced table (a Stripe mirror on the test kit's
//!     emulator, at `SLUICE_BENCH_RATE` requests/s, default 100, Stripe's live limit): rows/s
//!     beside that ceiling (one request per row).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_localpg::Cluster;
use sluice_stripe_emulator::Emulator;
use sqlx::Connection;

mod support;
use support::*;

const KEY: &str = "sk_live_bench000000000000000";

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

/// What one pgbench run measured.
struct Run {
    tps: f64,
    p50_us: f64,
}

/// `pgbench -S -M prepared` against port `port`; with `log`, the p50 of its per-transaction
/// latencies.
fn pgbench(
    cluster: &Cluster,
    port: u16,
    clients: usize,
    seconds: usize,
    log: Option<&Path>,
) -> Run {
    let mut command = Command::new("pgbench");
    command
        .args([
            "-S",
            "-M",
            "prepared",
            "-n",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &port.to_string(), "-c", &clients.to_string()])
        .args([
            "-j",
            &clients.min(2).to_string(),
            "-T",
            &seconds.to_string(),
        ])
        .env("PGPASSWORD", cluster.superuser_password())
        .env("PGSSLMODE", "disable");
    if let Some(prefix) = log {
        command
            .arg("-l")
            .arg(format!("--log-prefix={}", prefix.display()));
    }
    command.arg("postgres");
    let out = command
        .output()
        .expect("pgbench runs (it ships with the PostgreSQL packages)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let p50_us = log.map_or(f64::NAN, |prefix| {
        let dir = prefix.parent().unwrap();
        let name = prefix.file_name().unwrap().to_string_lossy().into_owned();
        let mut latencies: Vec<f64> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}."))
            })
            .flat_map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        latencies.sort_by(f64::total_cmp);
        latencies
            .get(latencies.len() / 2)
            .copied()
            .unwrap_or(f64::NAN)
    });
    Run { tps, p50_us }
}

/// A plain TCP relay to `port`, arranged as the proxy is (one single-threaded runtime per
/// core, each client on one of them): the ceiling of any proxy on this machine.
fn plain_relay(port: u16) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = listener.local_addr().unwrap().port();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let workers: Vec<std::sync::mpsc::Sender<std::net::TcpStream>> = (0..threads)
        .map(|_| {
            let (send, receive) = std::sync::mpsc::channel::<std::net::TcpStream>();
            let (to_runtime, mut clients) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                while let Ok(client) = receive.recv() {
                    if to_runtime.send(client).is_err() {
                        break;
                    }
                }
            });
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    while let Some(client) = clients.recv().await {
                        let client: std::net::TcpStream = client;
                        client.set_nonblocking(true).unwrap();
                        let mut client = tokio::net::TcpStream::from_std(client).unwrap();
                        let _ = client.set_nodelay(true);
                        tokio::spawn(async move {
                            let mut target = tokio::net::TcpStream::connect(("127.0.0.1", port))
                                .await
                                .unwrap();
                            let _ = target.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut target).await;
                        });
                    }
                });
            });
            send
        })
        .collect();
    std::thread::spawn(move || {
        for (i, client) in listener.incoming().enumerate() {
            if let Ok(client) = client {
                let _ = workers[i % workers.len()].send(client);
            }
        }
    });
    relay
}

async fn run() {
    let clients = env_usize("SLUICE_BENCH_CLIENTS", 8);
    let seconds = env_usize("SLUICE_BENCH_SECONDS", 15);
    let rate = env_usize("SLUICE_BENCH_RATE", 100);

    let target = Cluster::start_default().unwrap();
    prepare_target(&target).await;
    let init = Command::new("pgbench")
        .args([
            "-i",
            "-s",
            "10",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-p",
            &target.port().to_string(),
            "postgres",
        ])
        .env("PGPASSWORD", target.superuser_password())
        .env("PGSSLMODE", "disable")
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let stripe = Emulator::start(KEY).await;
    let rows = 1_000;
    for i in 0..rows {
        stripe.create("customers", &[("email", &format!("c{i}@example.com"))]);
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stripe.key"), KEY).unwrap();
    let proxy = free_port();
    let config = format!(
        r#"{head}
[[sync]]
name = "stripe"
id = "2c3f5e7a-9b1d-4f2e-8a6c-4d5e6f7a8b9c"
[sync.source]
provider = "stripe"
key = {{ file = "{key}" }}
collections = ["customer"]
rate_limit = {rate}
poll_interval_ms = 1000
api_base = "{base}"

[[consumer]]
name = "stripe-mirror"
target = "warehouse"
filter = {{ sync = {{ name = "stripe" }} }}
layout = {{ kind = "schema_mirror", schema = "stripe" }}

[proxy]
listen = "127.0.0.1:{proxy}"
target = "warehouse"
max_rows_per_statement = {rows}
"#,
        head = config_head(dir.path(), &target),
        key = dir.path().join("stripe.key").display(),
        base = stripe.url(),
    );
    let mut serve = serve(dir.path(), &config, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut admin = target.admin("postgres").await.unwrap();
        let n: Result<i64, _> = sqlx::query_scalar("select count(*) from stripe.customer")
            .fetch_one(&mut admin)
            .await;
        if n.is_ok_and(|n| n == rows as i64) {
            break;
        }
        assert!(Instant::now() < deadline, "the mirror never filled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // (a) pgbench -S, direct and through the proxy, alternating so drift hits both alike.
    println!("pgbench -S -M prepared, scale 10, {clients} clients, {seconds} s per run");
    let logs = tempfile::tempdir().unwrap();
    let relay = plain_relay(target.port());
    let direct = pgbench(&target, target.port(), clients, seconds, None);
    let proxied = pgbench(&target, proxy, clients, seconds, None);
    let relayed = pgbench(&target, relay, clients, seconds, None);
    let short = seconds.min(10);
    let direct_1 = pgbench(
        &target,
        target.port(),
        1,
        short,
        Some(&logs.path().join("direct")),
    );
    let proxied_1 = pgbench(&target, proxy, 1, short, Some(&logs.path().join("proxied")));
    let relayed_1 = pgbench(&target, relay, 1, short, Some(&logs.path().join("relayed")));
    println!("  direct:           {:>9.0} tps", direct.tps);
    println!(
        "  through proxy:    {:>9.0} tps = {:.2}x direct (goal >= 0.8x)",
        proxied.tps,
        proxied.tps / direct.tps
    );
    println!(
        "  plain TCP relay:  {:>9.0} tps = {:.2}x direct (the ceiling of any proxy here)",
        relayed.tps,
        relayed.tps / direct.tps
    );
    println!(
        "  one client, p50 latency: direct {:.0} us; proxy {:.0} us (+{:.0} us, goal < 100 us); plain relay {:.0} us (+{:.0} us)",
        direct_1.p50_us,
        proxied_1.p50_us,
        proxied_1.p50_us - direct_1.p50_us,
        relayed_1.p50_us,
        relayed_1.p50_us - direct_1.p50_us
    );
    println!(
        "  one client: direct {:.0} tps, proxy {:.0} tps, plain relay {:.0} tps",
        direct_1.tps, proxied_1.tps, relayed_1.tps
    );

    // (b) One UPDATE of every customer, upstream first, at the API's rate limit.
    let before = stripe.requests().len();
    let mut conn = sqlx::PgConnection::connect_with(
        &sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(proxy)
            .username("postgres")
            .password(target.superuser_password())
            .database("postgres")
            .ssl_mode(sqlx::postgres::PgSslMode::Disable),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let done = sqlx::query("update stripe.customer set description = 'bench'")
        .execute(&mut conn)
        .await
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let sent = stripe.requests().len() - before;
    println!(
        "\nUPDATE of {} synced rows against the Stripe emulator at {rate} requests/s: {:.1} s, {:.0} rows/s = {:.2}x the rate limit's ceiling ({rate} rows/s); {sent} requests",
        done.rows_affected(),
        elapsed,
        done.rows_affected() as f64 / elapsed,
        done.rows_affected() as f64 / elapsed / rate as f64,
    );
    let _ = serve.kill();
    let _ = serve.wait();
}

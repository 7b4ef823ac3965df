//! What the benchmarks of `sluice serve` share: knobs from the environment, free ports, a
//! process's peak memory, and starting `sluice serve` against a target prepared for it.
#![allow(dead_code)] // each benchmark uses its own share of these

use std::path::Path;
use std::process::{Child, Command, Stdio};

use sluice_localpg::Cluster;

/// Creates the target's sync user that [`config_head`] connects as, and a read role.
pub async fn prepare_target(target: &Cluster) {
    target
        .execute(
            "postgres",
            "create role sluice_sync login password 'sync-pw';
             grant connect, create on database postgres to sluice_sync;
             create role sluice_read;",
        )
        .await
        .unwrap();
}

/// The start of a `sluice serve` config: its data directory in `dir`, the API on a free port,
/// and the target `warehouse` on `target` as the user [`prepare_target`] made. The benchmark
/// appends its syncs and consumers.
pub fn config_head(dir: &Path, target: &Cluster) -> String {
    format!(
        r#"
data_dir = "{data}"
[api]
listen = "127.0.0.1:{api}"
token = {{ env = "BENCH_TOKEN" }}

[[target]]
name = "warehouse"
[target.connection]
host = "127.0.0.1"
port = {port}
database = "postgres"
user = "sluice_sync"
password = {{ env = "BENCH_TARGET_PASSWORD" }}
ssl = {{ mode = "disable" }}
"#,
        data = dir.join("data").display(),
        api = free_port(),
        port = target.port(),
    )
}

/// Runs `sluice serve` on `config`, written to `dir/sluice.toml`, with the secrets
/// [`config_head`] names and `env`; its log goes to `dir/serve.log`.
pub fn serve(dir: &Path, config: &str, env: &[(&str, &str)]) -> Child {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("BENCH_TOKEN", "bench")
        .env("BENCH_TARGET_PASSWORD", "sync-pw")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
        .spawn()
        .unwrap()
}

/// A comma-separated list of counts in `name`, or `default` (the same form) when unset.
pub fn env_counts(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect()
}

/// `name` from the environment as a number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Process `pid`'s peak resident set (`VmHWM`), in MB.
pub fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

//! What the tests of `sluice serve` share: two clusters (a logical-replication source and a
//! target with a least-privileged sync user), a config for them, the process, its API.
#![allow(dead_code)] // each test file uses its own share of these

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_localpg::Cluster;

pub const TOKEN: &str = "test-token-5b1d";

pub struct Env {
    pub source: Cluster,
    pub target: Cluster,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn env() -> Env {
    let source = Cluster::options().logical_replication().start().unwrap();
    let target = Cluster::start_default().unwrap();
    source
        .execute(
            "postgres",
            "create table public.orders (id int primary key, item text, qty int);
             insert into public.orders select i, 'item ' || i, i from generate_series(1, 500) i;",
        )
        .await
        .unwrap();
    // The sync user: CONNECT and CREATE on its database, nothing else; and the read role.
    target
        .execute(
            "postgres",
            "create role sluice_sync login password 'sync-pw';
             grant connect, create on database postgres to sluice_sync;
             create role sluice_read;",
        )
        .await
        .unwrap();
    Env {
        source,
        target,
        dir: tempfile::tempdir().unwrap(),
        port: free_port(),
    }
}

pub fn config(env: &Env, extra: &str) -> String {
    format!(
        r#"
data_dir = "{data}"

[api]
listen = "127.0.0.1:{port}"
token = {{ env = "TEST_API_TOKEN" }}
max_body_bytes = 65536

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
name = "app"
id = "6f1c2a7e-4b7d-4c51-9a3e-0c1d2e3f4a5b"
[sync.source]
provider = "postgres"
create_missing = true
connection = {{ host = "127.0.0.1", port = {sport}, database = "postgres", user = "postgres", password = {{ env = "TEST_SOURCE_PASSWORD" }}, ssl = {{ mode = "disable" }} }}

[[sync]]
name = "events"
id = "0b7e8d6c-1111-4c51-9a3e-0c1d2e3f4a5b"
source = {{ provider = "http" }}

[[consumer]]
name = "app-records"
target = "warehouse"
filter = {{ sync = {{ name = "app" }} }}
layout = {{ kind = "consumer_table", schema = "sluice", table = "records" }}
batch = {{ max_records = 1000, max_wait_ms = 20 }}

[[consumer]]
name = "pushed"
target = "warehouse"
filter = {{ provider = "http" }}
layout = {{ kind = "consumer_table", schema = "sluice", table = "pushed" }}
batch = {{ max_records = 1000, max_wait_ms = 20 }}
{extra}
"#,
        data = env.dir.path().join("data").display(),
        port = env.port,
        tport = env.target.port(),
        sport = env.source.port(),
    )
}

pub fn write_config(env: &Env, extra: &str) -> PathBuf {
    let path = env.dir.path().join("sluice.toml");
    std::fs::write(&path, config(env, extra)).unwrap();
    path
}

/// A running `sluice serve`, killed when dropped: a test that fails (panics) part-way leaves
/// no process behind, retrying databases that are gone.
pub struct Serving(pub Child);

impl std::ops::Deref for Serving {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Serving {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn serve(env: &Env, path: &Path) -> Serving {
    let log = std::fs::File::create(env.dir.path().join("serve.log")).unwrap();
    spawn_serve(
        path,
        log,
        &[
            ("TEST_API_TOKEN", TOKEN),
            ("TEST_SOURCE_PASSWORD", env.source.superuser_password()),
        ],
    )
}

/// Starts `sluice serve --config path`, its stderr into `log`, with the sync user's password
/// in `TEST_TARGET_PASSWORD` and `vars` in its environment.
pub fn spawn_serve(path: &Path, log: std::fs::File, vars: &[(&str, &str)]) -> Serving {
    Serving(
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--config"])
            .arg(path)
            .env("TEST_TARGET_PASSWORD", "sync-pw")
            .envs(vars.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

/// Starts `serve` with `path` and waits until its API answers.
pub async fn serve_ready(env: &Env, path: &Path) -> (Serving, Api) {
    let child = serve(env, path);
    let api = Api::new(env);
    wait_until("the API answers", env, 60, async || {
        api.call("GET", "/v1/status", None, Some(TOKEN)).await.0 == 200
    })
    .await;
    (child, api)
}

pub fn plan(env: &Env, path: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["config", "plan", "--file"])
        .arg(path)
        .env("TEST_API_TOKEN", TOKEN)
        .env("TEST_TARGET_PASSWORD", "sync-pw")
        .env("TEST_SOURCE_PASSWORD", env.source.superuser_password())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn log(env: &Env) -> String {
    std::fs::read_to_string(env.dir.path().join("serve.log")).unwrap_or_default()
}

pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(env: &Env) -> Self {
        Self {
            base: format!("http://127.0.0.1:{}", env.port),
            http: reqwest::Client::new(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> (u16, String) {
        let mut request = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        if let Some(b) = body {
            request = request.header("content-type", "application/json").body(b);
        }
        match request.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, None, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, text) = self
            .call("POST", path, Some(body.to_string()), Some(TOKEN))
            .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

pub async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, env: &Env, secs: u64, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}\n--- serve log ---\n{}",
            log(env)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn target_count(env: &Env, table: &str, condition: &str) -> i64 {
    let mut conn = env.target.admin("postgres").await.unwrap();
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
        "select count(*) from {table} where {condition}"
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap_or(-1)
}

pub fn sluice_status(env: &Env) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["status", "--api", &format!("http://127.0.0.1:{}", env.port)])
        .env("SLUICE_API_TOKEN", TOKEN)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

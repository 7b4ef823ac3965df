//! `sluice serve` as a process against real clusters, driven through its API and the CLI.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "../../../crates/tunnel/tests/support/sshd.rs"]
mod sshd;

#[path = "../../../crates/alerts/tests/support/smtp.rs"]
mod smtp;

mod support;
use support::*;

/// Waits for the 500 rows of `public.orders` in `sluice.records`, then updates, deletes and
/// inserts one row on the source and waits for those changes there.
async fn backfill_then_live_changes(env: &Env) {
    wait_until("the backfill is in the target", env, 60, async || {
        target_count(env, "sluice.records", "true").await == 500
    })
    .await;
    env.source
        .execute("postgres", "update public.orders set qty = 1000 where id = 7; delete from public.orders where id = 8; insert into public.orders values (501, 'new', 1);")
        .await
        .unwrap();
    wait_until("live changes are in the target", env, 30, async || {
        target_count(
            env,
            "sluice.records",
            "upstream_id = '7' and payload->>'qty' = '1000'",
        )
        .await
            == 1
            && target_count(env, "sluice.records", "upstream_id = '8'").await == 0
            && target_count(env, "sluice.records", "upstream_id = '501'").await == 1
    })
    .await;
}

#[tokio::test]
async fn serve_syncs_postgres_and_pushed_records_and_is_driven_by_api_and_cli() {
    let env = env().await;
    let path = write_config(&env, "");
    // `config plan` shows what serve would create, and changes nothing.
    let (code, before) = plan(&env, &path);
    assert_eq!(code, 0, "{before}");
    assert!(
        before.contains("would create \"sluice\".\"records\""),
        "{before}"
    );
    assert!(
        before.contains("sync app: would create the publication sluice_publication"),
        "{before}"
    );
    assert!(
        before.contains("sync events: accepts pushed records"),
        "{before}"
    );
    assert_eq!(
        plan(&env, &path).1,
        before,
        "planning twice: nothing was changed"
    );
    let (mut child, api) = serve_ready(&env, &path).await;

    // Without a token, or with a wrong one, every route is 401.
    for (method, path) in [
        ("GET", "/v1/status"),
        ("GET", "/v1/consumers"),
        ("POST", "/v1/consumers/app-records/pause"),
        ("POST", "/v1/syncs/events/records"),
        ("GET", "/metrics"),
        ("GET", "/v1/openapi.json"),
    ] {
        for token in [None, Some("wrong"), Some("")] {
            let (status, body) = api.call(method, path, Some("{}".into()), token).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert!(body.contains("bearer token"), "{body}");
        }
    }

    backfill_then_live_changes(&env).await;

    // Push: good records in, bad ones named; a malformed body is 400; a huge one 413.
    let (status, body) = api
        .post(
            "/v1/syncs/events/records",
            json!({"records": [
                {"collection": "signups", "id": "u1", "payload": {"email": "a@example.com", "note": "nul \u{0} here"}},
                {"collection": "signups", "id": "u2", "payload": {"email": "b@example.com"}},
                {"collection": "signups", "id": "", "payload": {}},
                {"collection": "signups", "id": "u3", "payload": "not an object"}
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["rejected"][0]["index"], 2, "{body}");
    assert_eq!(body["rejected"][1]["index"], 3, "{body}");
    let (status, text) = api
        .call(
            "POST",
            "/v1/syncs/events/records",
            Some("{\"records\": [".into()),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("line 1"), "{text}");
    let huge = json!({"records": [{"collection": "c", "id": "x", "payload": {"blob": "x".repeat(100_000)}}]});
    let (status, _) = api
        .call(
            "POST",
            "/v1/syncs/events/records",
            Some(huge.to_string()),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 413);
    let (status, body) = api
        .post("/v1/syncs/app/records", json!({"records": []}))
        .await;
    assert_eq!(
        status, 409,
        "pushing into a postgres sync is refused: {body}"
    );
    wait_until("pushed records are in the target", &env, 30, async || {
        target_count(&env, "sluice.pushed", "collection_id = 'signups'").await == 2
    })
    .await;
    assert_eq!(
        target_count(&env, "sluice.pushed", "upstream_id = 'x'").await,
        0,
        "nothing of a refused body is written"
    );

    // Pause through the API: status shows it (CLI exits 1), resume, healthy again.
    let (status, body) = api
        .post(
            "/v1/consumers/app-records/pause",
            json!({"reason": "maintenance window"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (code, out) = sluice_status(&env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("app-records") && out.contains("paused") && out.contains("maintenance window"),
        "{out}"
    );
    env.source
        .execute(
            "postgres",
            "insert into public.orders values (502, 'while paused', 1)",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        target_count(&env, "sluice.records", "upstream_id = '502'").await,
        0,
        "paused"
    );
    // Resumed from the command line: the API's address and token come from the config.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["consumer", "resume", "app-records", "--config"])
        .arg(&path)
        .env("TEST_API_TOKEN", TOKEN)
        .env_remove("SLUICE_API_TOKEN")
        .env_remove("SLUICE_API_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("consumer app-records:"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_until(
        "the paused change arrives after resume",
        &env,
        30,
        async || target_count(&env, "sluice.records", "upstream_id = '502'").await == 1,
    )
    .await;
    // Everything is healthy, but for the target's word on the NUL pushed above (`u1`): that
    // warning stays, so `status` exits 1 for it alone.
    wait_until(
        "sluice status is healthy but for the NUL",
        &env,
        30,
        async || {
            let (code, out) = sluice_status(&env);
            // Entity rows; each is followed by its checks, indented.
            code == 1
                && out
                    .lines()
                    .skip(1)
                    .filter(|l| !l.starts_with(' '))
                    .all(|l| {
                        l.contains(" healthy")
                            || (l.starts_with("target")
                                && l.contains("payload: 1 record(s) contained NUL"))
                    })
        },
    )
    .await;
    let (_, out) = sluice_status(&env);
    for name in ["warehouse", "app", "events", "app-records", "pushed"] {
        assert!(out.contains(name), "{out}");
    }
    // Every check is shown, not only the worst: the source's backfill with its row count.
    assert!(
        out.contains("    healthy      backfill: complete (500 rows)"),
        "{out}"
    );
    assert!(out.contains("replication: streaming changes"), "{out}");

    // Listing, inspecting, metrics, the OpenAPI document.
    let consumers = api.get("/v1/consumers").await;
    assert_eq!(consumers["consumers"].as_array().unwrap().len(), 2);
    let sync = api.get("/v1/syncs/app").await;
    assert_eq!(sync["backfill"]["done"], true, "{sync}");
    let (status, _) = api
        .call("GET", "/v1/consumers/nope", None, Some(TOKEN))
        .await;
    assert_eq!(status, 404);
    let (_, metrics) = api.call("GET", "/metrics", None, Some(TOKEN)).await;
    for needle in [
        "sluice_records_applied_total{consumer=\"app-records\"}",
        "sluice_records_appended_total{sync=\"events\"} 2",
        "sluice_consumer_lag_records{consumer=\"pushed\"} 0",
        "sluice_batch_duration_seconds_count{consumer=\"app-records\"}",
        "# TYPE sluice_batch_duration_seconds histogram",
        "sluice_batch_duration_seconds_bucket{consumer=\"app-records\",le=\"+Inf\"}",
        "# TYPE sluice_change_to_target_seconds histogram",
        "sluice_change_to_target_seconds_bucket{consumer=\"pushed\",le=\"0.5\"}",
        "sluice_backfill_rows{sync=\"app\",collection=\"public.orders\"} 500",
        "sluice_backfill_rows_estimated{sync=\"app\",collection=\"public.orders\"}",
        "sluice_slot_retained_wal_bytes{sync=\"app\"}",
        "sluice_health_status{kind=\"consumer\",name=\"app-records\",status=\"healthy\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
    // Every record the consumer wrote is in its latency histogram.
    let count = |name: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        count("sluice_change_to_target_seconds_count{consumer=\"app-records\"}"),
        count("sluice_records_applied_total{consumer=\"app-records\"}"),
        "{metrics}"
    );
    let openapi = api.get("/v1/openapi.json").await;
    assert_eq!(openapi["openapi"], "3.1.0");
    assert!(openapi["paths"]["/v1/syncs/{name}/records"]["post"].is_object());

    // A config change is picked up without a restart: a new consumer starts and backfills.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(
            b"\n[[consumer]]\nname = \"late\"\ntarget = \"warehouse\"\nfilter = { sync = { name = \"app\" } }\nlayout = { kind = \"consumer_table\", schema = \"sluice\", table = \"late\" }\n",
        )
        .unwrap();
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    wait_until("the new consumer has backfilled", &env, 60, async || {
        target_count(&env, "sluice.late", "true").await == 501
    })
    .await;

    // A schema-mirror consumer, then its schema renamed: the new schema is backfilled from the
    // stream, the old one is left with the command to drop it.
    let text = std::fs::read_to_string(&path).unwrap()
        + "\n[[consumer]]\nname = \"mirror\"\ntarget = \"warehouse\"\nfilter = { sync = { name = \"app\" } }\nlayout = { kind = \"schema_mirror\", schema = \"app_mirror\" }\n";
    std::fs::write(&path, &text).unwrap();
    wait_until(
        "the mirror is filled (file change noticed)",
        &env,
        60,
        async || {
            target_count(&env, "app_mirror.orders", "qty = 1000").await == 1
                && target_count(&env, "app_mirror.orders", "true").await == 501
        },
    )
    .await;
    std::fs::write(&path, text.replace("\"app_mirror\"", "\"app_mirror_v2\"")).unwrap();
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    wait_until("the renamed mirror is backfilled", &env, 60, async || {
        target_count(&env, "app_mirror_v2.orders", "true").await == 501
    })
    .await;
    assert_eq!(
        target_count(&env, "app_mirror.orders", "true").await,
        501,
        "the old schema stays"
    );
    assert!(
        log(&env).contains("drop schema \"app_mirror\" cascade"),
        "{}",
        log(&env)
    );

    // SIGTERM: a clean stop.
    let status = terminate(&mut child);
    assert!(status.success(), "{status:?}\n{}", log(&env));
    assert!(log(&env).contains("stopped"), "{}", log(&env));
    let (code, after) = plan(&env, &path);
    assert_eq!(code, 0, "{after}");
    assert!(
        after.contains("\"sluice\".\"records\" exists and is ready: no change"),
        "{after}"
    );
    assert!(
        after.contains("adopt the existing slot sluice_slot"),
        "{after}"
    );
}

/// The tests' own harness: a `sluice serve` a test started is gone when the test ends, even
/// when it ends by panicking, so a failed run leaves nothing retrying its vanished databases.
#[tokio::test]
async fn a_serve_process_ends_with_the_test_that_started_it() {
    let env = env().await;
    let path = write_config(&env, "");
    let pid = {
        let (child, _api) = serve_ready(&env, &path).await;
        child.id()
    };
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "sluice serve (pid {pid}) is still running after its test dropped it"
    );
}

#[tokio::test]
async fn serve_refuses_an_invalid_config_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        "data_dir = \"x\"\n[[target]]\nname = \"t\"\nconnection = { host = 5 }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sluice.toml:4:"), "{err}");
    assert!(err.contains("expected"), "{err}");
}

#[tokio::test]
async fn serve_without_an_api_token_says_how_to_set_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        format!("data_dir = \"{}\"\n", dir.path().join("d").display()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("SLUICE_API_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SLUICE_API_TOKEN"), "{err}");
}

/// A data directory whose records stream a newer sluice wrote (a newer file format) is refused
/// before anything runs, with the fix, and the file keeps its format.
#[tokio::test]
async fn serve_refuses_a_stream_written_by_a_newer_sluice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    drop(sluice_stream::EmbeddedStream::open(&data).await.unwrap());
    let file = data.join(sluice_stream::FILE_NAME);
    let file_format = |set: Option<i64>| -> i64 {
        let conn = rusqlite::Connection::open(&file).unwrap();
        if let Some(value) = set {
            conn.execute("update meta set value = ? where key = 'format'", [value])
                .unwrap();
        }
        conn.query_row("select value from meta where key = 'format'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let newer = file_format(None) + 1;
    file_format(Some(newer));
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, format!("data_dir = \"{}\"\n", data.display())).unwrap();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env("SLUICE_API_TOKEN", "a-token-for-this-test")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("sluice serve should refuse the file and exit, not run")
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("written by a newer sluice"), "{err}");
    assert!(err.contains(&format!("file format {newer}")), "{err}");
    assert!(
        err.contains("fix: run the sluice version that wrote it"),
        "{err}"
    );
    assert_eq!(file_format(None), newer);
}

/// On a machine without server binaries of its own the demo runs the pinned npm release
/// (`SLUICE_PG_FROM=npm` makes this machine one), and says which server it runs.
#[tokio::test]
async fn the_demo_runs_on_the_pinned_npm_release_when_the_machine_has_no_server() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--duration", "3", "--rows", "200"])
        .env("SLUICE_PG_FROM", "npm")
        .env_remove("SLUICE_PG_VERSION")
        .env_remove("SLUICE_PG_BIN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let source = stdout
        .lines()
        .find(|l| l.starts_with("source: 127.0.0.1:"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let release = sluice_localpg::release(sluice_localpg::FALLBACK_MAJOR).unwrap();
    let number = release.package.split('-').next().unwrap();
    let number = number.strip_suffix(".0").unwrap_or(number);
    assert!(
        source.contains(&format!("PostgreSQL {number} from "))
            && source.contains("embedded-postgres"),
        "{source}"
    );
    assert!(stdout.contains("backfill: complete (200 rows)"), "{stdout}");
}

#[tokio::test]
async fn the_demo_runs_to_completion_shows_changes_made_meanwhile_and_its_hints_work() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["demo", "--duration", "10", "--rows", "3000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut stdout = String::new();
    let (mut source_url, mut status_hint, mut console) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(240);
    while source_url.is_none() || status_hint.is_none() || console.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("the demo never printed its hints:\n{stdout}"));
        if let Some(url) =
            line.strip_prefix("source (change something and watch it arrive): psql '")
        {
            source_url = Some(url.trim_end_matches('\'').to_owned());
        }
        if let Some(command) = line.strip_prefix("status: ") {
            status_hint = Some(command.to_owned());
        }
        if let Some(hint) = line.strip_prefix("console: ") {
            console = hint.split(' ').next().map(str::to_owned);
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    // The console answers where the hint says (its login page).
    let login = reqwest::get(format!("{}login", console.unwrap()))
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    assert!(
        login
            .text()
            .await
            .unwrap()
            .contains("API token or console password")
    );
    // A change made "in psql" while the demo runs appears in its output.
    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(source_url.as_deref().unwrap())
            .await
            .unwrap();
    sqlx::query(
        "insert into public.orders (id, customer, total) values (777777, 'from the test', 1.25)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    // The status hint works as printed.
    let hint = status_hint.unwrap();
    let parts: Vec<&str> = hint.split(' ').collect();
    let status = Command::new(parts[0]).args(&parts[1..]).output().unwrap();
    let status_out = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        status_out.contains("consumer  demo"),
        "{hint}: {status_out}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for needle in [
        "backfill into sluice.records: 3,000/3,000 rows",
        "arrived in the target after",
        "\"status\": \"paid\"",
        "2: deleted",
        "-> public.orders 777777: {",
        "create role sluice_replication with login replication password '<generated>'",
        "consumer  demo         healthy",
    ] {
        assert!(
            stdout.contains(needle) || stderr.contains(needle),
            "{needle:?} missing:\n{stdout}\n{stderr}"
        );
    }
    // The generated passwords are never shown.
    assert!(
        stdout.contains("with login password '<the sync user password>'"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_target_reached_only_through_an_agent_receives_the_consumers_writes() {
    let env = env().await;
    let keys = env.dir.path();
    let host_key = sluice_tunnel::keys::generate(&keys.join("host_key")).unwrap();
    let agent_key = sluice_tunnel::keys::generate(&keys.join("agent_key")).unwrap();
    let agent_port = free_port();
    // The target's address is not one the server can reach; only the agent knows the way.
    let config = config(&env, "").replace(
        "host = \"127.0.0.1\"\nport = ",
        "host = \"db.invalid\"\ntunnel = { kind = \"agent\", name = \"laptop\" }\nport = ",
    ) + &format!(
        "\n[agents]\nlisten = \"127.0.0.1:{agent_port}\"\nhost_key_file = \"{}\"\n[[agents.agent]]\nname = \"laptop\"\npublic_key = \"{}\"\n",
        keys.join("host_key").display(),
        agent_key.public
    );
    assert!(config.contains("db.invalid"), "{config}");
    let path = env.dir.path().join("sluice.toml");
    std::fs::write(&path, config).unwrap();
    let (mut child, _api) = serve_ready(&env, &path).await;
    assert!(
        log(&env).contains(&host_key.fingerprint),
        "the endpoint logs its fingerprint:\n{}",
        log(&env)
    );
    let (stop_agent, stopped) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(sluice_tunnel::run_agent(
        sluice_tunnel::AgentConfig {
            server_host: "127.0.0.1".into(),
            server_port: agent_port,
            name: "laptop".into(),
            key_file: keys.join("agent_key"),
            server_fingerprint: Some(host_key.fingerprint.clone()),
            db_host: "127.0.0.1".into(),
            db_port: env.target.port(),
        },
        stopped,
    ));
    wait_until(
        "the backfill arrives through the agent",
        &env,
        90,
        async || target_count(&env, "sluice.records", "true").await == 500,
    )
    .await;
    stop_agent.send_replace(true);
    agent.await.unwrap().unwrap();
    assert!(terminate(&mut child).success(), "{}", log(&env));
}

/// A consumer table written through several connections (`connections` in its layout): every
/// record lands, each connection keeps its own checkpoint row, and changing the count in a
/// running server's config re-plans the checkpoints without losing a change.
#[tokio::test]
async fn both_layouts_written_through_several_connections_get_every_record() {
    let env = env().await;
    let with = |connections: usize| {
        config(&env, "").replace(
            r#"layout = { kind = "consumer_table", schema = "sluice", table = "records" }"#,
            &format!(
                r#"layout = {{ kind = "consumer_table", schema = "sluice", table = "records", connections = {connections} }}"#
            ),
        ) + &format!(
            "\n[[consumer]]\nname = \"mirror\"\ntarget = \"warehouse\"\nfilter = {{ sync = {{ name = \"app\" }} }}\n\
             layout = {{ kind = \"schema_mirror\", schema = \"app_mirror\", connections = {connections} }}\n"
        )
    };
    let path = env.dir.path().join("sluice.toml");
    std::fs::write(&path, with(3)).unwrap();
    let (mut child, _api) = serve_ready(&env, &path).await;
    let partitions = async || {
        (
            target_count(
                &env,
                "sluice._sluice_checkpoint",
                "consumer = 'app-records'",
            )
            .await,
            target_count(&env, "app_mirror._sluice_checkpoint", "consumer = 'mirror'").await,
        )
    };
    // The mirror holds what the consumer table holds, as typed rows.
    let mirrored = async |condition: &str| target_count(&env, "app_mirror.orders", condition).await;
    backfill_then_live_changes(&env).await;
    wait_until("the mirror has the same changes", &env, 30, async || {
        mirrored("true").await == 500
            && mirrored("id = 7 and qty = 1000").await == 1
            && mirrored("id = 8").await == 0
            && mirrored("id = 501").await == 1
    })
    .await;
    assert_eq!(
        partitions().await,
        (3, 3),
        "a checkpoint row per connection"
    );

    // Down to one connection: the consumers restart, their checkpoints become one row each,
    // and changes made meanwhile arrive.
    std::fs::write(&path, with(1)).unwrap();
    env.source
        .execute("postgres", "insert into public.orders values (502, 'after', 2); update public.orders set qty = 2000 where id = 9;")
        .await
        .unwrap();
    wait_until(
        "the changes after the reload are in the target",
        &env,
        60,
        async || {
            target_count(&env, "sluice.records", "upstream_id = '502'").await == 1
                && target_count(
                    &env,
                    "sluice.records",
                    "upstream_id = '9' and payload->>'qty' = '2000'",
                )
                .await
                    == 1
                && mirrored("id = 502").await == 1
                && mirrored("id = 9 and qty = 2000").await == 1
        },
    )
    .await;
    wait_until("one checkpoint row each is left", &env, 30, async || {
        partitions().await == (1, 1)
    })
    .await;
    assert_eq!(target_count(&env, "sluice.records", "true").await, 501);
    assert_eq!(mirrored("true").await, 501);
    assert!(terminate(&mut child).success());
}

#[tokio::test]
async fn entities_that_cannot_run_and_a_refused_reload_appear_in_status_as_errors() {
    let env = env().await;
    let stuck = r#"
[[target]]
name = "other"
[target.connection]
host = "127.0.0.1"
port = 1
database = "postgres"
user = "sluice_sync"
password = { env = "SLUICE_TEST_NEVER_SET_PW" }
ssl = { mode = "disable" }

[[consumer]]
name = "stuck"
target = "other"
filter = { provider = "http" }
layout = { kind = "consumer_table", schema = "sluice", table = "stuck" }
"#;
    let path = write_config(&env, stuck);
    let (mut child, api) = serve_ready(&env, &path).await;

    // The consumer that could not start is listed, as an error with its reason; status fails.
    let (code, out) = sluice_status(&env);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("stuck"))
        .unwrap_or_default();
    assert!(
        line.contains("error") && line.contains("SLUICE_TEST_NEVER_SET_PW"),
        "{out}"
    );
    let (_, metrics) = api.call("GET", "/metrics", None, Some(TOKEN)).await;
    assert!(
        metrics.contains(r#"sluice_health_status{kind="consumer",name="stuck",status="error"} 1"#),
        "{metrics}"
    );

    // A reload that is refused is an error too, until a good file is saved.
    std::fs::write(&path, "this is not = [valid toml").unwrap();
    wait_until("the refused reload is reported", &env, 30, async || {
        let status = api.get("/v1/status").await;
        status["entities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["entity"]["kind"] == "config" && e["status"] == "error")
    })
    .await;
    let (code, out) = sluice_status(&env);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("config") && out.contains("not applied"),
        "{out}"
    );

    std::fs::write(&path, config(&env, "")).unwrap();
    wait_until("everything is healthy again", &env, 60, async || {
        sluice_status(&env).0 == 0
    })
    .await;
    let (_, out) = sluice_status(&env);
    assert!(
        !out.contains("stuck") && !out.contains("not applied"),
        "{out}"
    );
    assert!(terminate(&mut child).success());
}

#[tokio::test]
async fn pushed_json_numbers_keep_every_digit() {
    let env = env().await;
    let path = write_config(&env, "");
    let (mut child, api) = serve_ready(&env, &path).await;
    // Written as text: no JSON library of the test's own rounds the numbers on the way.
    let body = r#"{"records": [{"collection": "numbers", "id": "n1", "payload":
        {"n": 12345678901234567890123, "f": 0.1000000000000000055511151231257827,
         "e": 1e400, "r": 99.290, "z": -0, "neg": -18446744073709551617, "list": [1.50, 2e-7]}}]}"#;
    let (status, text) = api
        .call(
            "POST",
            "/v1/syncs/events/records",
            Some(body.to_owned()),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    wait_until("the pushed record is in the target", &env, 30, async || {
        target_count(&env, "sluice.pushed", "upstream_id = 'n1'").await == 1
    })
    .await;
    let mut conn = env.target.admin("postgres").await.unwrap();
    let (stored, expected): (String, String) = sqlx::query_as(
        r#"select payload::text, '{"n": 12345678901234567890123, "f": 0.1000000000000000055511151231257827,
              "e": 1e400, "r": 99.290, "z": -0, "neg": -18446744073709551617, "list": [1.50, 2e-7]}'::jsonb::text
           from sluice.pushed where upstream_id = 'n1'"#,
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(stored, expected);
    assert!(
        stored.contains("99.290") && stored.contains("0.1000000000000000055511151231257827"),
        "{stored}"
    );

    // A NUL that PostgreSQL cannot store is replaced, and the target says so in its health,
    // whichever of its consumers wrote it.
    let nul =
        r#"{"records": [{"collection": "numbers", "id": "nul", "payload": {"s": "a\u0000b"}}]}"#;
    let (status, text) = api
        .call(
            "POST",
            "/v1/syncs/events/records",
            Some(nul.to_owned()),
            Some(TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{text}");
    wait_until(
        "the target reports the NUL replacement",
        &env,
        30,
        async || {
            let target = api.get("/v1/targets/warehouse").await;
            target["health"]["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| {
                    c["name"] == "payload"
                        && c["status"] == "warning"
                        && c["message"].as_str().unwrap_or_default().contains("NUL")
                })
        },
    )
    .await;
    assert!(terminate(&mut child).success());
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// 100,000 records pushed in one body, then a target outage with more pushed meanwhile:
/// serve's memory stays under 256 MiB throughout (sampled every 50 ms) and is given back
/// afterwards.
#[tokio::test]
async fn memory_stays_bounded_through_a_push_burst_and_a_target_outage_and_comes_back() {
    let env = env().await;
    let path = env.dir.path().join("sluice.toml");
    // The default body limit (16 MiB), which one 100,000-record body fits in.
    std::fs::write(
        &path,
        config(&env, "").replace("max_body_bytes = 65536\n", ""),
    )
    .unwrap();
    let mut child = serve(&env, &path);
    let pid = child.id();
    let api = Api::new(&env);
    wait_until("the API answers", &env, 60, async || {
        api.call("GET", "/v1/status", None, Some(TOKEN)).await.0 == 200
    })
    .await;
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_mib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let body = |from: usize, count: usize| {
        let records: Vec<Value> = (from..from + count)
            .map(|i| json!({"collection": "burst", "id": format!("r{i}"), "payload": {"i": i, "n": 1.5, "note": "x".repeat(60)}}))
            .collect();
        json!({ "records": records })
    };
    let (status, reply) = api.post("/v1/syncs/events/records", body(0, 100_000)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["accepted"], 100_000, "{reply}");
    wait_until("the burst is in the target", &env, 180, async || {
        target_count(&env, "sluice.pushed", "collection_id = 'burst'").await == 100_000
    })
    .await;
    let after_burst = peak.load(Ordering::Relaxed);

    env.target.stop().unwrap();
    for start in (100_000..120_000).step_by(2000) {
        let (status, reply) = api
            .post("/v1/syncs/events/records", body(start, 2000))
            .await;
        assert_eq!(status, 200, "{reply}");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    env.target.start().unwrap();
    wait_until(
        "the outage's records are in the target",
        &env,
        180,
        async || target_count(&env, "sluice.pushed", "collection_id = 'burst'").await == 120_000,
    )
    .await;
    let settled = {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let now = rss_mib(pid);
            if now < 160 || Instant::now() > deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    sampling.abort();
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "serve's resident memory: peak {after_burst} MiB through the burst, {peak} MiB through the outage, settled at {settled} MiB"
    );
    assert!(peak < 256, "peak {peak} MiB");
    assert!(settled < 160, "memory was not given back: {settled} MiB");
    assert!(terminate(&mut child).success());
}

/// A source and a target behind a bastion that is down when `serve` starts: the sync and the
/// consumers are registered anyway (status `error`, exit 1), pushed records wait in the
/// stream, and once the bastion is up the source backfills and everything lands without a
/// reload. A wrong pin stays `error` with its fix. Meanwhile a
/// bastion that accepts connections but never answers does not slow the API down.
#[tokio::test]
async fn consumers_behind_a_bastion_that_is_down_start_by_themselves_once_it_is_up() {
    let env = env().await;
    let key_file = env.dir.path().join("id_sluice");
    let key = sluice_tunnel::keys::generate(&key_file).unwrap();
    let host_key = sshd::new_host_key(env.dir.path());
    let ssh_port = sshd::free_port();
    // A "bastion" that accepts TCP and then says nothing, like one behind a dead route.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let target = |name: &str, port: u16, pin: &str| {
        format!(
            r#"
[[target]]
name = "{name}"
[target.connection]
host = "127.0.0.1"
port = {tport}
database = "postgres"
user = "sluice_sync"
password = {{ env = "TEST_TARGET_PASSWORD" }}
ssl = {{ mode = "disable" }}
tunnel = {{ kind = "bastion", host = "127.0.0.1", port = {port}, user = "{user}", key_file = "{key}", host_key_fingerprint = "{pin}" }}
"#,
            tport = env.target.port(),
            user = sshd::whoami(),
            key = key_file.display(),
        )
    };
    let consumer = |name: &str, target: &str, table: &str| {
        format!(
            r#"
[[consumer]]
name = "{name}"
target = "{target}"
filter = {{ provider = "http" }}
layout = {{ kind = "consumer_table", schema = "sluice", table = "{table}" }}
batch = {{ max_records = 1000, max_wait_ms = 20 }}
"#
        )
    };
    let wrong_pin = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let text = format!(
        r#"
data_dir = "{data}"

[api]
listen = "127.0.0.1:{port}"
token = {{ env = "TEST_API_TOKEN" }}

[[sync]]
name = "events"
id = "0b7e8d6c-1111-4c51-9a3e-0c1d2e3f4a5b"
source = {{ provider = "http" }}

[[sync]]
name = "app"
id = "6f1c2a7e-4b7d-4c51-9a3e-0c1d2e3f4a5b"
[sync.source]
provider = "postgres"
create_missing = true
connection = {{ host = "127.0.0.1", port = {sport}, database = "postgres", user = "postgres", password = {{ env = "TEST_SOURCE_PASSWORD" }}, ssl = {{ mode = "disable" }}, tunnel = {{ kind = "bastion", host = "127.0.0.1", port = {ssh_port}, user = "{user}", key_file = "{key}", host_key_fingerprint = "{pin}" }} }}

[[consumer]]
name = "app-records"
target = "behind-bastion"
filter = {{ sync = {{ name = "app" }} }}
layout = {{ kind = "consumer_table", schema = "sluice", table = "records" }}
{behind}{pinned}{frozen}{c1}{c2}{c3}"#,
        sport = env.source.port(),
        user = sshd::whoami(),
        key = key_file.display(),
        pin = sshd::host_key_fingerprint(&host_key),
        data = env.dir.path().join("data").display(),
        port = env.port,
        behind = target(
            "behind-bastion",
            ssh_port,
            &sshd::host_key_fingerprint(&host_key)
        ),
        pinned = target("wrong-pin", ssh_port, wrong_pin),
        frozen = target("frozen", silent_port, wrong_pin),
        c1 = consumer("through-bastion", "behind-bastion", "pushed"),
        c2 = consumer("pinned-wrong", "wrong-pin", "never"),
        c3 = consumer("stuck", "frozen", "stuck"),
    );
    let path = env.dir.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    let (mut child, api) = serve_ready(&env, &path).await;

    // Down: registered, in error, retried; records pushed meanwhile wait in the stream.
    let records: Vec<Value> = (0..200)
        .map(|i| json!({"collection": "c", "id": i.to_string(), "payload": {"n": i}}))
        .collect();
    let (status, body) = api
        .post("/v1/syncs/events/records", json!({ "records": records }))
        .await;
    assert_eq!(status, 200, "{body}");
    wait_until(
        "the consumer is reported as not started",
        &env,
        30,
        async || {
            let status = api.get("/v1/status").await;
            status["entities"].as_array().unwrap().iter().any(|e| {
                e["entity"]["name"] == "through-bastion"
                    && e["status"] == "error"
                    && e["checks"][0]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("cannot start") && m.contains("bastion"))
            })
        },
    )
    .await;
    let (code, out) = sluice_status(&env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("through-bastion"), "{out}");
    let sync = api.get("/v1/syncs/app").await;
    assert_eq!(sync["running"], false, "{sync}");
    assert_eq!(sync["health"]["status"], "error", "{sync}");
    assert!(
        sync["health"]["checks"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot start")),
        "{sync}"
    );

    // While one start hangs on the silent bastion, health answers from memory.
    for path in ["/v1/status", "/metrics", "/v1/consumers"] {
        for _ in 0..5 {
            let started = Instant::now();
            let (status, body) = api.call("GET", path, None, Some(TOKEN)).await;
            let took = started.elapsed();
            assert_eq!(status, 200, "{path}: {body}");
            assert!(
                took < Duration::from_millis(500),
                "{path} took {took:?} while a bastion hangs"
            );
        }
    }

    // Up three seconds later: everything pushed lands, without a reload.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // One key, allowed to forward to both databases.
    let line =
        sluice_tunnel::keys::authorized_keys_line(&key.public, "127.0.0.1", env.target.port())
            .replacen(
                "permitopen=",
                &format!("permitopen=\"127.0.0.1:{}\",permitopen=", env.source.port()),
                1,
            );
    let _bastion = sshd::Sshd::start_with(env.dir.path(), &line, ssh_port, host_key);
    wait_until("every pushed record lands", &env, 60, async || {
        target_count(&env, "sluice.pushed", "true").await == 200
    })
    .await;
    wait_until(
        "the source behind the bastion backfills",
        &env,
        60,
        async || target_count(&env, "sluice.records", "true").await == 500,
    )
    .await;
    assert_eq!(api.get("/v1/syncs/app").await["running"], true);
    wait_until("the consumer is healthy", &env, 30, async || {
        api.get("/v1/consumers/through-bastion").await["health"]["status"] == "healthy"
    })
    .await;

    // The wrong pin stays an error, with the fix, and status says so.
    wait_until(
        "the wrong pin is reported with its fix",
        &env,
        30,
        async || {
            let consumer = api.get("/v1/consumers/pinned-wrong").await;
            consumer["running"] == false
                && consumer["health"]["status"] == "error"
                && consumer["health"]["checks"][0]["fix"]
                    .as_str()
                    .is_some_and(|f| f.contains("host_key_fingerprint"))
        },
    )
    .await;
    let (code, out) = sluice_status(&env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("pinned-wrong"), "{out}");
    let status = terminate(&mut child);
    assert!(status.success(), "{status:?}\n{}", log(&env));
    drop(silent);
}

/// A webhook receiver: its URL, and every JSON body posted to it.
async fn webhook_receiver() -> (String, Arc<std::sync::Mutex<Vec<Value>>>) {
    let posts = Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let posts = posts.clone();
            move |axum::Json(body): axum::Json<Value>| async move {
                posts.lock().unwrap().push(body);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hook, posts)
}

/// A slot holding more WAL than its sync's `slot_lag_warning_bytes` is alerted, naming the
/// sync and the slot.
#[tokio::test]
async fn a_slot_over_its_lag_threshold_is_alerted() {
    let env = env().await;
    let (hook, posts) = webhook_receiver().await;
    let path = env.dir.path().join("sluice.toml");
    let text = config(&env, &format!("\n[[alerts.webhook]]\nurl = \"{hook}\"\n")).replace(
        "create_missing = true\n",
        "create_missing = true\nslot_lag_warning_bytes = 1\n",
    );
    std::fs::write(&path, text).unwrap();
    let mut child = serve(&env, &path);
    // Enough WAL that the slot holds more than a byte at some health check.
    for i in 0..20 {
        env.source
            .execute(
                "postgres",
                &format!("insert into public.orders select g, 'bulk', {i} from generate_series({}, {}) g", 1000 + i * 1000, 1999 + i * 1000),
            )
            .await
            .unwrap();
    }
    wait_until("the slot's lag is alerted", &env, 90, async || {
        posts.lock().unwrap().iter().any(|p| {
            p["entity"]["kind"] == "sync"
                && p["entity"]["name"] == "app"
                && p["check"] == "slot"
                && p["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("bytes of WAL")
        })
    })
    .await;
    assert!(terminate(&mut child).success());
}

/// `[alerts]` in the config reaches people: a target that goes away is emailed and posted to
/// the webhook once, naming the target, the reason and the fix; a recovery notice follows when
/// it is back; a refused reload is alerted too.
#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_target_and_a_refused_reload_are_alerted_by_email_and_webhook_with_recovery() {
    let env = env().await;
    let smtp = smtp::SmtpSink::start(env.dir.path(), None);
    let (hook, posts) = webhook_receiver().await;
    let alerts = format!(
        r#"
[alerts.email]
smtp_host = "127.0.0.1"
smtp_port = {}
security = "none"
from = "sluice@example.com"
to = ["ops@example.com"]

[[alerts.webhook]]
url = "{hook}"
"#,
        smtp.port
    );
    let path = write_config(&env, &alerts);
    let mut child = serve(&env, &path);
    wait_until("everything is healthy", &env, 90, async || {
        sluice_status(&env).0 == 0
    })
    .await;
    assert!(smtp.messages().is_empty(), "healthy: no alert");

    env.target.stop().unwrap();
    tokio::task::block_in_place(|| smtp.wait_for(1, 60));
    wait_until("the target's alert is emailed", &env, 60, async || {
        smtp.messages()
            .iter()
            .any(|m| m.contains("target \"warehouse\""))
    })
    .await;
    let mail = smtp.messages();
    let target_alert = mail
        .iter()
        .find(|m| m.contains("Subject: [sluice] error: target \"warehouse\""))
        .unwrap_or_else(|| panic!("no alert for the target: {mail:#?}\n{}", log(&env)));
    assert!(target_alert.contains("Why: "), "{target_alert}");
    assert!(target_alert.contains("Fix: "), "{target_alert}");
    assert!(
        !target_alert.contains("sync-pw"),
        "no secret in an alert: {target_alert}"
    );
    wait_until("the webhook got the target's alert", &env, 30, async || {
        posts.lock().unwrap().iter().any(|p| {
            p["entity"]["kind"] == "target"
                && p["entity"]["name"] == "warehouse"
                && p["recovered"] == false
        })
    })
    .await;
    // Staying down sends nothing more about the target.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let about_target = |mail: &[String]| {
        mail.iter()
            .filter(|m| m.contains("target \"warehouse\""))
            .count()
    };
    assert_eq!(about_target(&smtp.messages()), 1, "{:#?}", smtp.messages());

    env.target.start().unwrap();
    wait_until("the recovery notice arrives", &env, 90, async || {
        smtp.messages().iter().any(|m| {
            m.contains("Subject: [sluice] recovered: target \"warehouse\" is healthy again")
        })
    })
    .await;
    wait_until("the webhook got the recovery", &env, 30, async || {
        posts.lock().unwrap().iter().any(|p| {
            p["entity"]["kind"] == "target"
                && p["entity"]["name"] == "warehouse"
                && p["recovered"] == true
        })
    })
    .await;

    // A reload that is refused is alerted, and recovers when a good file is saved.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, "this is not = [valid toml").unwrap();
    wait_until("the refused reload is emailed", &env, 60, async || {
        smtp.messages()
            .iter()
            .any(|m| m.contains("Subject: [sluice] error: config") && m.contains("was not applied"))
    })
    .await;
    std::fs::write(&path, good).unwrap();
    wait_until("the config recovers", &env, 60, async || {
        smtp.messages()
            .iter()
            .any(|m| m.contains("Subject: [sluice] recovered: config"))
    })
    .await;
    assert!(terminate(&mut child).success());
}

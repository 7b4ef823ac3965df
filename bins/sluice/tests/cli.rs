//! The command line as a newcomer meets it: one way to name the config, commands that take
//! the config's names, `init`, errors shaped `error: … fix: …` with "did you mean", a closed
//! pipe, completions.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use sluice_localpg::Cluster;

fn sluice(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("SLUICE_CONFIG")
        .env_remove("SLUICE_TARGET_URL")
        .env_remove("SLUICE_SOURCE_URL")
        .env_remove("SLUICE_API_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A config with a postgres sync (create_missing), an http sync and two consumers.
fn config(source: &Cluster, target: &Cluster) -> String {
    format!(
        r#"
data_dir = "data"
[api]
token = {{ env = "CLI_TEST_TOKEN" }}

[[target]]
name = "warehouse"
read_role = "cli_read"
[target.connection]
host = "127.0.0.1"
port = {tport}
database = "postgres"
user = "cli_sync"
password = {{ env = "CLI_TARGET_PASSWORD" }}
ssl = {{ mode = "disable" }}

[[sync]]
name = "app"
id = "6f1c2a7e-4b7d-4c51-9a3e-0c1d2e3f4a5c"
[sync.source]
provider = "postgres"
create_missing = true
publication = "cli_pub"
slot = "cli_slot"
connection = {{ host = "127.0.0.1", port = {sport}, database = "postgres", user = "postgres", password = {{ env = "CLI_SOURCE_PASSWORD" }}, ssl = {{ mode = "disable" }} }}

[[consumer]]
name = "app-records"
target = "warehouse"
filter = {{ sync = {{ name = "app" }} }}
layout = {{ kind = "consumer_table", schema = "cli", table = "records" }}
"#,
        tport = target.port(),
        sport = source.port(),
    )
}

#[test]
fn the_config_is_named_one_way_with_the_old_spellings_still_working() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sluice.toml");
    let example = example.to_str().unwrap();
    let env = [("SLUICE_DATA_DIR", "d")];
    for args in [
        vec!["config", "check", "--config", example],
        vec!["config", "check", "-c", example],
        vec!["config", "check", "--file", example],
    ] {
        let out = sluice(dir.path(), &args, &env);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    // No file named: ./sluice.toml, then $SLUICE_CONFIG, else an error with its fix.
    let out = sluice(dir.path(), &["config", "check"], &env);
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out);
    assert!(said.starts_with("error: no config file"), "{said}");
    assert!(
        said.contains("\n  fix: ") && said.contains("sluice init"),
        "{said}"
    );
    let out = sluice(
        dir.path(),
        &["config", "check"],
        &[("SLUICE_CONFIG", example), ("SLUICE_DATA_DIR", "d")],
    );
    assert!(out.status.success(), "{}", text(&out));
    std::fs::copy(example, dir.path().join("sluice.toml")).unwrap();
    let out = sluice(
        dir.path(),
        &["config", "check"],
        &[
            ("SLUICE_CONFIG", "/nonexistent.toml"),
            ("SLUICE_DATA_DIR", "d"),
        ],
    );
    assert!(
        out.status.success(),
        "./sluice.toml comes first: {}",
        text(&out)
    );

    // `status` reads the API's address and token from the config; a broken one is an error
    // located in the file, not silently ignored.
    std::fs::write(dir.path().join("broken.toml"), "[api]\nlisten = 7780\n").unwrap();
    let out = sluice(dir.path(), &["status", "-c", "broken.toml"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out);
    assert!(said.starts_with("error: broken.toml:2:"), "{said}");
    assert!(said.contains("\n  fix: "), "{said}");

    // `config schema`, and the older `config-schema`, print the same document.
    let new = sluice(dir.path(), &["config", "schema"], &[]);
    let old = sluice(dir.path(), &["config-schema"], &[]);
    assert!(new.status.success() && new.stdout == old.stdout);
    assert!(String::from_utf8_lossy(&new.stdout).contains("\"$schema\""));
}

#[test]
fn init_writes_a_file_that_passes_config_check_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = sluice(
        dir.path(),
        &[
            "init",
            "--source",
            "postgres://repl@db.internal:5432/app",
            "--target",
            "postgres://sluice@warehouse.internal/analytics?sslmode=verify-full",
            "--push",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let written = std::fs::read_to_string(dir.path().join("sluice.toml")).unwrap();
    assert!(written.contains("never change it"), "{written}");
    assert!(
        !written.contains("password = \""),
        "no password is written: {written}"
    );
    let out = sluice(dir.path(), &["config", "check"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    // The secrets it names are not set here: warned, by name, never a value.
    let said = text(&out);
    assert!(
        said.contains("warning:") && said.contains("SLUICE_TARGET_PASSWORD"),
        "{said}"
    );
    let out = sluice(
        dir.path(),
        &["init", "--push", "--target", "postgres://u@h/d"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("--force"), "{}", text(&out));
    // No flags and no terminal: says what to pass.
    let other = tempfile::tempdir().unwrap();
    let out = sluice(other.path(), &["init"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("fix: pass --target"), "{}", text(&out));
}

#[test]
fn config_errors_are_error_and_fix_with_the_name_that_was_meant() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sluice.toml"),
    )
    .unwrap();
    let check = |text: &str| {
        std::fs::write(dir.path().join("sluice.toml"), text).unwrap();
        let out = sluice(
            dir.path(),
            &["config", "check"],
            &[("SLUICE_DATA_DIR", "d")],
        );
        assert_eq!(out.status.code(), Some(1), "{}", self::text(&out));
        self::text(&out)
    };
    let said = check(&example.replacen("read_role = ", "read_roll = ", 1));
    assert!(said.starts_with("error: sluice.toml:"), "{said}");
    assert!(said.contains("fix: did you mean `read_role`?"), "{said}");
    let said = check(&example.replacen("target = \"warehouse\"", "target = \"warehose\"", 1));
    assert!(said.contains("error: sluice.toml: consumer"), "{said}");
    assert!(said.contains("fix: did you mean \"warehouse\"?"), "{said}");
    let said = check(&example.replacen("id = \"6f1c2a7e-4b7d-4c51-9a3e-0c1d2e3f4a5b\"", "", 1));
    assert!(said.contains("must never change"), "{said}");
    let fresh = said
        .split("id = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert!(uuid::Uuid::parse_str(fresh).is_ok(), "{said}");
}

#[test]
fn a_closed_pipe_ends_the_command_quietly_and_completions_are_printed() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["config", "schema"])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before sluice writes (like `| head -0`).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "quiet on a closed pipe: {stderr}");
    assert_eq!(
        out.status.code(),
        Some(141),
        "the status of a process ended by SIGPIPE"
    );

    for shell in ["bash", "zsh", "fish"] {
        let out = sluice(dir.path(), &["completions", shell], &[]);
        assert!(out.status.success(), "{}", text(&out));
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("sluice") && script.contains("setup"),
            "{shell}"
        );
    }
    // Each command's help lists its own options only.
    let help = text(&sluice(dir.path(), &["setup", "check", "--help"], &[]));
    assert!(
        !help.contains("--preset") && help.contains("--target"),
        "{help}"
    );
}

#[tokio::test]
async fn commands_take_the_configs_names_and_check_agrees_with_plan() {
    let source = Cluster::options().logical_replication().start().unwrap();
    let target = Cluster::start_default().unwrap();
    target
        .execute(
            "postgres",
            "create role cli_sync login password 'sync-pw'; create role cli_analyst;",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sluice.toml"), config(&source, &target)).unwrap();
    let env = [
        ("CLI_TARGET_PASSWORD", "sync-pw"),
        ("CLI_SOURCE_PASSWORD", source.superuser_password()),
        ("CLI_TEST_TOKEN", "t"),
    ];
    // `setup sql --target`: the target's database, sync user, read role and consumer schema.
    let out = sluice(dir.path(), &["setup", "sql", "--target", "warehouse"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let script = String::from_utf8_lossy(&out.stdout).to_string();
    for expected in [
        "\"cli_sync\"",
        "create role \"cli_read\"",
        "create schema if not exists \"cli\"",
    ] {
        assert!(script.contains(expected), "{expected:?} missing:\n{script}");
    }
    let mut admin = target.admin("postgres").await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(script))
        .execute(&mut admin)
        .await
        .unwrap();
    // `setup check --target` connects as the target's user: nothing to fix.
    let out = sluice(
        dir.path(),
        &["setup", "check", "--target", "warehouse"],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    // grant-read with the target's connection and read role.
    let out = sluice(
        dir.path(),
        &["grant-read", "--target", "warehouse", "cli_analyst"],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("granted cli_read to cli_analyst"),
        "{}",
        text(&out)
    );
    // A misspelt name is refused with the one that was meant.
    let out = sluice(
        dir.path(),
        &["setup", "check", "--target", "warehose"],
        &env,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("did you mean \"warehouse\"?"),
        "{}",
        text(&out)
    );

    // The slot and publication do not exist yet, and create_missing will create them:
    // `source check --sync`, `check` and `config plan` all say so, and none fails for it.
    let out = sluice(dir.path(), &["source", "check", "--sync", "app"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("will be created when the sync starts"),
        "{}",
        text(&out)
    );
    let out = sluice(dir.path(), &["check"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = sluice(dir.path(), &["config", "plan"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("would create the slot cli_slot"),
        "{}",
        text(&out)
    );
}

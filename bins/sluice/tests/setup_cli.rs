//! `sluice setup …`, `grant-read`, `revoke-read` as a user runs them: the real binary against
//! a real cluster.

use std::path::Path;
use std::process::{Command, Output};

use sluice_localpg::Cluster;

const CANARY: &str = "Adm1n-Canary-Qz7-distinctive";

fn sluice(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(args)
        .current_dir(home)
        .env("HOME", home)
        .env_remove("SLUICE_ADMIN_URL")
        .env_remove("SLUICE_TARGET_URL");
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

fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .map(|b| String::from_utf8_lossy(&b).contains(needle))
                .unwrap_or(false)
            {
                found.push(p.display().to_string());
            }
        }
    }
    found
}

#[tokio::test]
async fn automated_setup_never_keeps_or_shows_the_admin_password() {
    let pg = Cluster::start_default().unwrap();
    pg.create_database("app").await.unwrap();
    pg.execute(
        "postgres",
        &format!("create role lender login superuser password '{CANARY}'"),
    )
    .await
    .unwrap();
    pg.create_role("analyst", Some("a")).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let admin_url = pg.url_as("lender", Some(CANARY), "app", None);
    let mut printed = String::new();

    let out = sluice(
        home.path(),
        &[
            "setup",
            "apply",
            "--schema",
            "stripe",
            "--grant-read",
            "analyst",
        ],
        &[("SLUICE_ADMIN_URL", &admin_url)],
    );
    printed += &text(&out);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("create schema \"stripe\" authorization \"sluice\""),
        "{}",
        text(&out)
    );
    let password = text(&out)
        .lines()
        .skip_while(|l| !l.contains("shown once"))
        .nth(1)
        .map(|l| l.trim().to_owned())
        .expect("the generated sync password is shown once");

    let again = sluice(
        home.path(),
        &[
            "setup",
            "apply",
            "--schema",
            "stripe",
            "--admin-url",
            &admin_url,
        ],
        &[],
    );
    printed += &text(&again);
    assert!(text(&again).contains("nothing to do"), "{}", text(&again));

    // Failures must not echo the credentials either.
    let wrong = admin_url.replace(CANARY, &format!("{CANARY}-wrong"));
    let failed = sluice(
        home.path(),
        &[
            "setup",
            "apply",
            "--schema",
            "stripe",
            "--admin-url",
            &wrong,
        ],
        &[],
    );
    printed += &text(&failed);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        text(&failed).contains("password authentication failed"),
        "{}",
        text(&failed)
    );
    let bad_db = admin_url.replace("/app?", "/missing?");
    let failed = sluice(
        home.path(),
        &["setup", "apply", "--schema", "stripe"],
        &[("SLUICE_ADMIN_URL", &bad_db)],
    );
    printed += &text(&failed);
    assert!(
        text(&failed).contains("does not exist"),
        "{}",
        text(&failed)
    );

    assert!(
        !printed.contains(CANARY),
        "the admin password was printed:\n{printed}"
    );
    assert_eq!(
        files_containing(home.path(), CANARY),
        Vec::<String>::new(),
        "a file holds the admin password"
    );

    // The sync user checks its own setup with the password shown once.
    let sync_url = pg.url_as("sluice", Some(&password), "app", None);
    let check = sluice(
        home.path(),
        &["setup", "check", "--url", &sync_url, "--schema", "stripe"],
        &[],
    );
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).ends_with("nothing to fix\n"),
        "{}",
        text(&check)
    );
}

#[tokio::test]
async fn the_manual_script_through_psql_then_check_reports_nothing_to_fix() {
    let pg = Cluster::start_default().unwrap();
    pg.create_database("warehouse").await.unwrap();
    pg.execute("warehouse", "create schema sluice_tables")
        .await
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let args = [
        "--database",
        "warehouse",
        "--sync-user",
        "sync_m",
        "--read-role",
        "read_m",
        "--schema",
        "stripe",
        "--granted-schema",
        "sluice_tables",
    ];
    let mut sql_args = vec!["setup", "sql", "--sync-password-env", "SYNC_PW"];
    sql_args.extend(args);
    let script = sluice(home.path(), &sql_args, &[("SYNC_PW", "manual-pw")]);
    assert!(script.status.success(), "{}", text(&script));
    let script = String::from_utf8(script.stdout).unwrap();
    for _ in 0..2 {
        let psql = Command::new(pg.binaries().psql())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &script])
            .arg(pg.url("warehouse"))
            .output()
            .unwrap();
        assert!(
            psql.status.success(),
            "{}",
            String::from_utf8_lossy(&psql.stderr)
        );
    }
    let sync_url = pg.url_as("sync_m", Some("manual-pw"), "warehouse", None);
    let mut check_args = vec!["setup", "check", "--url", sync_url.as_str(), "--json"];
    check_args.extend(&args[4..]);
    let check = sluice(home.path(), &check_args, &[]);
    assert!(check.status.success(), "{}", text(&check));
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["ok"] == true),
        "{report:#}"
    );

    // grant-read / revoke-read, done by the sync user.
    pg.create_role("bob", Some("b")).await.unwrap();
    let granted = sluice(
        home.path(),
        &[
            "grant-read",
            "--url",
            &sync_url,
            "--read-role",
            "read_m",
            "bob",
        ],
        &[],
    );
    assert!(granted.status.success(), "{}", text(&granted));
    let revoked = sluice(
        home.path(),
        &[
            "revoke-read",
            "--url",
            &sync_url,
            "--read-role",
            "read_m",
            "bob",
        ],
        &[],
    );
    assert!(revoked.status.success(), "{}", text(&revoked));
    let usage = sluice(home.path(), &["grant-read", "--url", &sync_url], &[]);
    assert_eq!(usage.status.code(), Some(2), "no users is a usage error");
}

const KEYGEN: [&str; 6] = [
    "tunnel",
    "keygen",
    "--out",
    "bastion_key",
    "--db-host",
    "db.internal",
];

#[test]
fn tunnel_keygen_writes_the_key_and_prints_the_restricted_line() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    let out = sluice(home.path(), &KEYGEN, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let printed = text(&out);
    assert!(printed.contains("restrict,port-forwarding,permitopen=\"db.internal:5432\",command=\"/bin/false\" ssh-ed25519 "), "{printed}");
    assert!(
        printed.contains("chmod 600 ~/.ssh/authorized_keys"),
        "the install steps: {printed}"
    );
    let mode = std::fs::metadata(home.path().join("bastion_key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let again = sluice(home.path(), &KEYGEN, &[]);
    assert_eq!(
        again.status.code(),
        Some(1),
        "an existing key is never overwritten"
    );
}

#[test]
fn config_check_accepts_the_example_and_locates_mistakes() {
    let home = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sluice.toml");
    let ok = sluice(
        home.path(),
        &["config", "check", "--file", example.to_str().unwrap()],
        &[],
    );
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains("ok (1 target(s), 3 sync(s), 3 consumer(s))"),
        "{}",
        text(&ok)
    );

    let broken = home.path().join("sluice.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&example)
            .unwrap()
            .replace("database = \"warehouse\"", "databse = \"warehouse\""),
    )
    .unwrap();
    let err = sluice(home.path(), &["config", "check"], &[]);
    assert_eq!(err.status.code(), Some(1));
    assert!(
        text(&err).contains("sluice.toml:19:1: unknown field `databse`"),
        "{}",
        text(&err)
    );
}

#[tokio::test]
async fn source_check_reports_what_logical_replication_needs() {
    let pg = Cluster::start_default().unwrap();
    pg.create_role("plain", Some("p")).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let url = pg.url_as("plain", Some("p"), "postgres", None);
    let out = sluice(
        home.path(),
        &["source", "check", "--url", &url, "--json"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let wal = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "wal_level")
        .unwrap();
    assert_eq!(wal["ok"], false);
    assert!(wal["fix"].as_str().unwrap().contains("wal_level = logical"));
}

#[tokio::test]
async fn rebuild_schema_empties_only_what_sluice_owns() {
    let pg = Cluster::start_default().unwrap();
    pg.execute(
        "postgres",
        "create role sync_r login password 'pw';
         grant connect, create on database postgres to sync_r;
         set role sync_r;
         create schema mirror; create table mirror.t (id int primary key); insert into mirror.t values (1), (2);
         reset role;
         create view mirror.mine as select id from mirror.t;
         create table mirror.notes (n text); insert into mirror.notes values ('kept');",
    )
    .await
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    let url = pg.url_as("sync_r", Some("pw"), "postgres", None);
    let out = sluice(
        home.path(),
        &["setup", "rebuild-schema", "mirror"],
        &[("SLUICE_TARGET_URL", url.as_str())],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("emptied 1 table(s) in \"mirror\": t"),
        "{}",
        text(&out)
    );
    let mut conn = pg.admin("postgres").await.unwrap();
    let counts: (i64, i64, i64) = sqlx::query_as(
        "select (select count(*) from mirror.t), (select count(*) from mirror.mine), (select count(*) from mirror.notes)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        counts,
        (0, 0, 1),
        "sluice's table emptied; the user's view works and table is kept"
    );
}

#[tokio::test]
async fn setup_apply_refuses_to_grant_the_read_role_to_a_role_that_does_not_exist() {
    let pg = Cluster::start_default().unwrap();
    pg.create_database("app").await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let admin_url = pg.url_as("postgres", Some(pg.superuser_password()), "app", None);
    let out = sluice(
        home.path(),
        &[
            "setup",
            "apply",
            "--schema",
            "stripe",
            "--grant-read",
            "analsyt",
            "--admin-url",
            &admin_url,
        ],
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("\"analsyt\"") && said.contains("no such role"),
        "{said}"
    );
    assert!(said.contains("fix:"), "{said}");
    assert!(!said.contains("done"), "{said}");
    // Nothing was applied: the plan is refused before any statement runs.
    let mut conn = pg.admin("app").await.unwrap();
    let schema: Option<String> =
        sqlx::query_scalar("select nspname::text from pg_namespace where nspname = 'stripe'")
            .fetch_optional(&mut conn)
            .await
            .unwrap();
    assert_eq!(schema, None);
}

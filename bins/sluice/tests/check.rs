//! `sluice check` on a target behind a real OpenSSH bastion: each hop's status, then the
//! connection through it.

#[path = "../../../crates/tunnel/tests/support/sshd.rs"]
mod sshd;

use std::process::Command;

use sluice_localpg::Cluster;
use sluice_tunnel::keys::{authorized_keys_line, generate};
use sshd::{Sshd, whoami};

fn config(pg: &Cluster, sshd: &Sshd, key: &std::path::Path, fingerprint: Option<&str>) -> String {
    let pin = fingerprint
        .map(|f| format!(", host_key_fingerprint = \"{f}\""))
        .unwrap_or_default();
    format!(
        r#"
[[target]]
name = "behind-bastion"
[target.connection]
host = "127.0.0.1"
port = {port}
database = "postgres"
user = "postgres"
password = {{ env = "TEST_PG_PASSWORD" }}
ssl = {{ mode = "disable" }}
tunnel = {{ kind = "bastion", host = "127.0.0.1", port = {ssh}, user = "{user}", key_file = "{key}"{pin} }}
"#,
        port = pg.port(),
        ssh = sshd.port,
        user = whoami(),
        key = key.display(),
    )
}

fn check(dir: &std::path::Path, pg: &Cluster, text: &str) -> (i32, String) {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(&path)
        .env("TEST_PG_PASSWORD", pg.superuser_password())
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

#[tokio::test]
async fn check_shows_each_hop_of_a_bastion_then_the_connection_through_it() {
    let dir = tempfile::tempdir().unwrap();
    let pg = Cluster::start_default().unwrap();
    let key_file = dir.path().join("id_sluice");
    let key = generate(&key_file).unwrap();
    let sshd = Sshd::start(
        dir.path(),
        &authorized_keys_line(&key.public, "127.0.0.1", pg.port()),
    );

    let (code, out) = check(
        dir.path(),
        &pg,
        &config(&pg, &sshd, &key_file, Some(&sshd.fingerprint())),
    );
    assert_eq!(code, 0, "{out}");
    for hop in [
        "ok  tunnel: bastion reachable",
        "ok  tunnel: host key pinned",
        "ok  tunnel: key accepted",
        "ok  tunnel: forward allowed",
        "ok  tunnel: database reachable",
        "ok  connect: connected as postgres to postgres",
    ] {
        assert!(out.contains(hop), "{hop:?} missing:\n{out}");
    }

    // Not pinned yet: the host key hop fails and shows the fingerprint to confirm; later hops
    // are not reached, and the exit code says so.
    let (code, out) = check(dir.path(), &pg, &config(&pg, &sshd, &key_file, None));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FIX tunnel: host key pinned"), "{out}");
    assert!(out.contains(&sshd.fingerprint()), "{out}");
    assert!(
        out.contains("FIX tunnel: key accepted: not reached"),
        "{out}"
    );
    assert!(!out.contains("connect:"), "{out}");
}

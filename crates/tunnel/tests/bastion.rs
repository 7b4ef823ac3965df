//! Bastion tunnels against a real OpenSSH server on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "support/sshd.rs"]
mod sshd;

use sluice_localpg::{Auth, Cluster};
use sluice_tunnel::keys::{authorized_keys_line, generate};
use sluice_tunnel::{BastionConfig, BastionTunnel, TunnelError};
use sqlx::{Connection, PgConnection};
use sshd::{Sshd, free_port, whoami};

struct Setup {
    _dir: tempfile::TempDir,
    pg: Cluster,
    sshd: Sshd,
    config: BastionConfig,
}

/// A database, a bastion allowing forwards to it only, and a pinned config.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pg = Cluster::options().auth(Auth::Trust).start().unwrap();
    let key_file = dir.path().join("id_sluice");
    let key = generate(&key_file).unwrap();
    let sshd = Sshd::start(
        dir.path(),
        &authorized_keys_line(&key.public, "127.0.0.1", pg.port()),
    );
    let mut config = BastionConfig::new("127.0.0.1", sshd.port, whoami(), key_file);
    config.host_key_fingerprint = Some(sshd.fingerprint());
    config.forward_port = pg.port();
    Setup {
        _dir: dir,
        pg,
        sshd,
        config,
    }
}

async fn query_through(tunnel: &BastionTunnel) -> Result<i32, sqlx::Error> {
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        tunnel.local_addr().port()
    );
    let mut conn = PgConnection::connect(&url).await?;
    sqlx::query_scalar("select 41 + 1")
        .fetch_one(&mut conn)
        .await
}

#[test]
fn keygen_writes_a_private_key_only_its_owner_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("id_sluice");
    let key = generate(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(key.public.starts_with("ssh-ed25519 ") && key.public.ends_with(" sluice-tunnel"));
    assert!(key.fingerprint.starts_with("SHA256:"));
    let line = authorized_keys_line(&key.public, "db.internal", 5432);
    assert!(line.starts_with("restrict,port-forwarding,permitopen=\"db.internal:5432\",command=\"/bin/false\" ssh-ed25519 "));
    assert!(
        generate(&path).is_err(),
        "an existing key is never overwritten"
    );
}

#[tokio::test]
async fn a_query_goes_through_the_bastion() {
    let s = setup();
    BastionTunnel::probe(&s.config).await.unwrap();
    let tunnel = BastionTunnel::open(s.config.clone()).await.unwrap();
    assert_eq!(query_through(&tunnel).await.unwrap(), 42);
    assert_eq!(
        query_through(&tunnel).await.unwrap(),
        42,
        "each connection gets its own channel"
    );
    drop(s.pg);
}

#[tokio::test]
async fn an_unpinned_or_changed_host_key_is_refused_with_both_fingerprints() {
    let s = setup();
    let mut unpinned = s.config.clone();
    unpinned.host_key_fingerprint = None;
    match BastionTunnel::open(unpinned).await.err().unwrap() {
        TunnelError::HostKeyNotPinned { fingerprint, .. } => {
            assert_eq!(fingerprint, s.sshd.fingerprint())
        }
        other => panic!("{other}"),
    }
    let mut changed = s.config.clone();
    changed.host_key_fingerprint =
        Some("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    let err = BastionTunnel::open(changed).await.err().unwrap();
    assert!(matches!(err, TunnelError::HostKeyChanged { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("CHANGED")
            && text.contains(&s.sshd.fingerprint())
            && text.contains("SHA256:AAAA"),
        "{text}"
    );
}

#[tokio::test]
async fn each_failing_hop_is_named() {
    let s = setup();
    // Forward refused by permitopen.
    let mut other_port = s.config.clone();
    other_port.forward_port = s.pg.port() + 1;
    let err = BastionTunnel::probe(&other_port).await.unwrap_err();
    assert!(matches!(err, TunnelError::ForwardRefused { .. }), "{err}");
    assert!(err.to_string().contains("permitopen"));
    // A key the bastion does not know.
    let mut stranger = s.config.clone();
    stranger.key_file = s._dir.path().join("id_stranger");
    let stranger_key = generate(&stranger.key_file).unwrap();
    let err = BastionTunnel::probe(&stranger).await.unwrap_err();
    assert!(matches!(err, TunnelError::AuthRejected { .. }), "{err}");
    assert!(err.to_string().contains(&stranger_key.fingerprint));
    // Nothing listening where the bastion should be.
    let mut nowhere = s.config.clone();
    nowhere.port = free_port();
    assert!(matches!(
        BastionTunnel::probe(&nowhere).await.unwrap_err(),
        TunnelError::BastionUnreachable { .. }
    ));
    // Hop by hop: everything up to the forward is fine, the forward fails, the database is not reached.
    let hops = BastionTunnel::hops(&other_port).await;
    let statuses: Vec<(&str, Option<bool>)> = hops
        .iter()
        .map(|(name, r)| (*name, r.as_ref().map(|r| r.is_ok())))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("bastion reachable", Some(true)),
            ("host key pinned", Some(true)),
            ("key accepted", Some(true)),
            ("forward allowed", Some(false)),
            ("database reachable", None),
        ]
    );
    assert!(
        BastionTunnel::hops(&s.config)
            .await
            .iter()
            .all(|(_, r)| matches!(r, Some(Ok(()))))
    );
    // The database is down: the bastion cannot reach it.
    s.pg.stop().unwrap();
    let err = BastionTunnel::probe(&s.config).await.unwrap_err();
    assert!(
        matches!(err, TunnelError::DatabaseUnreachable { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn the_restricted_key_cannot_run_a_command() {
    use russh::ChannelMsg;
    let s = setup();
    // Log in with the tunnel's key through a plain russh client and ask for a command.
    struct AcceptPinned(String);
    impl russh::client::Handler for AcceptPinned {
        type Error = russh::Error;
        async fn check_server_key(
            &mut self,
            key: &russh::keys::PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(
                matches!(key, russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } if sluice_tunnel::keys::fingerprint(key) == self.0),
            )
        }
    }
    let mut session = russh::client::connect(
        Arc::new(russh::client::Config::default()),
        ("127.0.0.1", s.sshd.port),
        AcceptPinned(s.sshd.fingerprint()),
    )
    .await
    .unwrap();
    let key = russh::keys::load_secret_key(&s.config.key_file, None).unwrap();
    let auth = session
        .authenticate_publickey(
            whoami(),
            russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), None),
        )
        .await
        .unwrap();
    assert!(auth.success());
    let mut channel = session.channel_open_session().await.unwrap();
    channel.exec(true, "echo ran-a-command; id").await.unwrap();
    let (mut output, mut status) = (Vec::new(), None);
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), channel.wait())
        .await
        .unwrap()
    {
        match msg {
            ChannelMsg::Data { data } => output.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            _ => {}
        }
    }
    let output = String::from_utf8_lossy(&output);
    assert!(
        !output.contains("ran-a-command") && !output.contains("uid="),
        "the command ran: {output}"
    );
    assert_ne!(status, Some(0), "the forced command fails instead");
}

/// Copies `r` to `w` until either ends; once `silent` is set it swallows everything, forever.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silent.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP relay that can go silent: it stops passing bytes without closing anything, like a
/// broken NAT or a dead path. Connections made after it is unsilenced work again.
async fn silent_relay(to: u16, silent: Arc<AtomicBool>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let outbound = tokio::net::TcpStream::connect(("127.0.0.1", to))
                .await
                .unwrap();
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pump(ri, wo, silent.clone()));
            tokio::spawn(pump(ro, wi, silent.clone()));
        }
    });
    port
}

#[tokio::test]
async fn a_silently_dead_path_is_detected_and_the_tunnel_recovers() {
    let s = setup();
    let silent = Arc::new(AtomicBool::new(false));
    let relay = silent_relay(s.sshd.port, silent.clone()).await;
    let mut config = s.config.clone();
    config.port = relay;
    config.keepalive = Duration::from_millis(500);
    config.keepalive_max = 2;
    config.timeout = Duration::from_secs(3);
    let tunnel = BastionTunnel::open(config).await.unwrap();
    assert_eq!(query_through(&tunnel).await.unwrap(), 42);

    // The path goes silent: keepalives go unanswered and the session is declared dead.
    silent.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // New relay connections pass traffic again (the old one stays silent forever).
    silent.store(false, Ordering::Release);
    let started = Instant::now();
    assert_eq!(
        query_through(&tunnel).await.unwrap(),
        42,
        "the tunnel reconnected"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

//! The reverse tunnel, in process: a russh server (as inside `sluice serve`) and an agent next
//! to a database the server has no address for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::Ed25519Keypair;
use sluice_core::{
    Batch, Change, ConsumerId, Provider, Record, RecordKey, Seq, StreamEntry, SyncId, Target,
    Version,
};
use sluice_localpg::{Auth, Cluster};
use sluice_target_pg::{ConnectionSettings, ConsumerTable, ConsumerTableTarget};
use sluice_tunnel::keys::generate;
use sluice_tunnel::{AgentConfig, ReverseServer, TunnelError, run_agent};
use tokio::sync::watch;

fn host_key() -> PrivateKey {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut seed).unwrap();
    PrivateKey::from(Ed25519Keypair::from_seed(&seed))
}

struct Setup {
    dir: tempfile::TempDir,
    db: Cluster,
    server: ReverseServer,
    agent: AgentConfig,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let db = Cluster::options().auth(Auth::Trust).start().unwrap();
    let key_file = dir.path().join("agent_key");
    generate(&key_file).unwrap();
    let public = russh::keys::load_public_key(key_file.with_extension("pub")).unwrap();
    let server = ReverseServer::start(
        "127.0.0.1:0".parse().unwrap(),
        host_key(),
        vec![("laptop".into(), public)],
    )
    .await
    .unwrap();
    let agent = AgentConfig {
        server_host: "127.0.0.1".into(),
        server_port: server.addr().port(),
        name: "laptop".into(),
        key_file,
        server_fingerprint: Some(server.host_key_fingerprint().to_owned()),
        db_host: "127.0.0.1".into(),
        db_port: db.port(),
    };
    Setup {
        dir,
        db,
        server,
        agent,
    }
}

async fn wait_connected(server: &ReverseServer, agent: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !server.is_connected(agent) {
        assert!(Instant::now() < deadline, "the agent never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_reverse_tunnel_carries_a_consumers_writes() {
    let s = setup().await;
    let (stop, stopped) = watch::channel(false);
    let agent = tokio::spawn(run_agent(s.agent.clone(), stopped));
    wait_connected(&s.server, "laptop").await;
    s.db.execute("postgres", "create schema sluice; ".to_owned().as_str())
        .await
        .unwrap();
    let table = ConsumerTable::new("sluice", "records");
    s.db.execute("postgres", &table.ddl()).await.unwrap();

    // The server knows only the tunnel's loopback address, never the database's own.
    let local = s.server.local_addr_for("laptop").unwrap();
    let mut settings = ConnectionSettings::new("127.0.0.1", local.port(), "postgres", "postgres");
    settings.ssl_mode = sluice_core::SslMode::Disable;
    let target = ConsumerTableTarget::new("laptop-db", settings, table, 1);
    let consumer = ConsumerId::from("through-agent");
    let entries = (1..=3)
        .map(|i| StreamEntry {
            seq: Seq(i),
            record: Record {
                key: RecordKey::new(SyncId::new_random(), "public.orders", i.to_string()),
                provider: Provider::Http,
                version: Version::new(i, 0),
                upstream_updated_at: time::OffsetDateTime::UNIX_EPOCH,
                change: Change::upsert(serde_json::json!({"n": i})).unwrap(),
            },
            payload_text: None,
        })
        .collect();
    target
        .apply(
            &consumer,
            &Batch {
                entries,
                through: Seq(3),
            },
        )
        .await
        .unwrap();
    let mut conn = s.db.admin("postgres").await.unwrap();
    let n: i64 = sqlx::query_scalar("select count(*) from sluice.records")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 3);
    stop.send_replace(true);
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn only_registered_agents_are_accepted() {
    let s = setup().await;
    let mut stranger = s.agent.clone();
    stranger.key_file = s.dir.path().join("stranger_key");
    let key = generate(&stranger.key_file).unwrap();
    let (_stop, stopped) = watch::channel(false);
    match run_agent(stranger, stopped).await {
        Err(e @ TunnelError::AgentRefused { .. }) => {
            // It speaks of the agent and the server's config, never of a bastion.
            let (message, fix) = (e.to_string(), e.fix());
            assert!(
                message.contains(&key.fingerprint) && message.contains("\"laptop\""),
                "{message}"
            );
            assert!(
                fix.contains("[[agents.agent]]") && fix.contains("name = \"laptop\""),
                "{fix}"
            );
            for text in [&message, &fix] {
                assert!(
                    !text.contains("authorized_keys") && !text.contains("bastion"),
                    "{text}"
                );
            }
        }
        other => panic!("{other:?}"),
    }
    let mut unknown_name = s.agent.clone();
    unknown_name.name = "someone-else".into();
    let (_stop, stopped) = watch::channel(false);
    assert!(matches!(
        run_agent(unknown_name, stopped).await,
        Err(TunnelError::AgentRefused { .. })
    ));
    assert!(!s.server.is_connected("laptop"));
}

#[tokio::test]
async fn an_agent_refuses_a_server_whose_host_key_is_not_the_pinned_one() {
    let s = setup().await;
    let mut wrong = s.agent.clone();
    wrong.server_fingerprint = Some("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    let (_stop, stopped) = watch::channel(false);
    match run_agent(wrong, stopped).await {
        Err(e @ TunnelError::AgentServerKeyChanged { .. }) => {
            assert!(
                e.to_string().contains(s.server.host_key_fingerprint()),
                "{e}"
            );
            assert!(!e.to_string().contains("bastion"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_connection_without_its_agent_is_refused_and_works_once_it_connects() {
    let s = setup().await;
    let local = s.server.local_addr_for("laptop").unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable&connect_timeout=2",
        local.port()
    );
    let settings = ConnectionSettings::from_url(&url).unwrap();
    assert!(settings.connect().await.is_err(), "no agent, no database");
    let (stop, stopped) = watch::channel(false);
    let agent = tokio::spawn(run_agent(s.agent.clone(), stopped));
    wait_connected(&s.server, "laptop").await;
    let mut conn = settings.connect().await.unwrap();
    let one: i32 = sqlx::query_scalar("select 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    stop.send_replace(true);
    agent.await.unwrap().unwrap();
}

/// A TCP relay between an agent and the server that can freeze (keep both sockets open but pass
/// nothing), like a laptop going to sleep or a network that silently drops packets.
async fn freezable_relay(server: std::net::SocketAddr) -> (u16, Arc<AtomicBool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
            let flag = flag.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let pump = |flag: Arc<AtomicBool>| {
                    async move |r: &mut tokio::net::tcp::OwnedReadHalf,
                                w: &mut tokio::net::tcp::OwnedWriteHalf| {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while flag.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                };
                let up = pump(flag.clone());
                let down = pump(flag);
                tokio::join!(up(&mut cr, &mut uw), down(&mut ur, &mut cw));
            });
        }
    });
    (port, frozen)
}

/// An agent whose session froze is replaced by a fresh one; when the server finally times the
/// frozen session out, the replacement stays registered and the database stays reachable.
#[tokio::test]
async fn a_stale_agent_session_timing_out_never_unregisters_its_replacement() {
    let s = setup().await;
    let (port, frozen) = freezable_relay(s.server.addr()).await;
    let mut old = s.agent.clone();
    old.server_port = port;
    let (_stop_old, stopped_old) = watch::channel(false);
    tokio::spawn(run_agent(old, stopped_old));
    wait_connected(&s.server, "laptop").await;
    frozen.store(true, Ordering::SeqCst);
    // A fresh agent (the same one restarted, or woken on another network) connects directly.
    let (stop, stopped) = watch::channel(false);
    let fresh = tokio::spawn(run_agent(s.agent.clone(), stopped));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let local = s.server.local_addr_for("laptop").unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable&connect_timeout=5",
        local.port()
    );
    let settings = ConnectionSettings::from_url(&url).unwrap();
    // The server's keepalive (5 s × 3) ends the frozen session after about 15 s.
    let deadline = Instant::now() + Duration::from_secs(25);
    while Instant::now() < deadline {
        assert!(
            s.server.is_connected("laptop"),
            "the replacement was unregistered"
        );
        let mut conn = settings
            .connect()
            .await
            .expect("the database through the fresh agent");
        let one: i32 = sqlx::query_scalar("select 1")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(one, 1);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.send_replace(true);
    fresh.await.unwrap().unwrap();
}

//! The reverse tunnel, in process: a russh server (as inside `sluice serve`) and an agent next
//! to a database the server has no address for.

use std::time::{Duration, Instant};

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
        Err(TunnelError::AuthRejected {
            key_fingerprint, ..
        }) => assert_eq!(key_fingerprint, key.fingerprint),
        other => panic!("{other:?}"),
    }
    let mut unknown_name = s.agent.clone();
    unknown_name.name = "someone-else".into();
    let (_stop, stopped) = watch::channel(false);
    assert!(matches!(
        run_agent(unknown_name, stopped).await,
        Err(TunnelError::AuthRejected { .. })
    ));
    assert!(!s.server.is_connected("laptop"));
}

#[tokio::test]
async fn an_agent_refuses_a_server_whose_host_key_is_not_the_pinned_one() {
    let s = setup().await;
    let mut wrong = s.agent.clone();
    wrong.server_fingerprint = Some("SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into());
    let (_stop, stopped) = watch::channel(false);
    assert!(matches!(
        run_agent(wrong, stopped).await,
        Err(TunnelError::HostKeyChanged { .. })
    ));
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

//! The reverse tunnel: `sluice-agent` dials out from the database's network to sluice's SSH
//! endpoint, and sluice reaches the database through it.
//!
//! The agent authenticates with its own key, which must be registered on the server under the
//! agent's name; anything else is refused. It then announces itself with a `tcpip-forward`
//! request. For each registered agent the server keeps a loopback listener; each connection to
//! it becomes a `forwarded-tcpip` channel to the agent, which connects it to the one database
//! host and port it was started for — whatever the channel names — so the server cannot use an
//! agent to reach anything else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey, PublicKeyOrCertificate};
use russh::server::{self, Auth, Session};
use russh::{Channel, client};
use sluice_core::Backoff;
use tokio::net::{TcpListener, TcpStream};

use crate::TunnelError;
use crate::keys::fingerprint;
use crate::session::{self, HostKeyPin, Login};

/// The server side of reverse tunnels (runs inside `sluice serve`).
pub struct ReverseServer {
    addr: SocketAddr,
    host_key_fingerprint: String,
    agents: Arc<Mutex<HashMap<String, AgentSlot>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct AgentSlot {
    key_fingerprint: String,
    /// The session that announced itself last, and its id: only that session may clear it,
    /// so a stale session timing out never unregisters its replacement.
    handle: Option<(u64, server::Handle)>,
    local: SocketAddr,
}

/// Ids for agent sessions, unique within the process.
static SESSION_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Drop for ReverseServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ReverseServer {
    /// Listens for agents on `bind`, identifying itself with `host_key`. Only the `agents`
    /// listed (name and public key) are accepted; each gets a loopback address through which
    /// sluice reaches its database.
    pub async fn start(
        bind: SocketAddr,
        host_key: PrivateKey,
        agents: Vec<(String, PublicKey)>,
    ) -> Result<Self, TunnelError> {
        let host_key_fingerprint = fingerprint(host_key.public_key());
        let registry: Arc<Mutex<HashMap<String, AgentSlot>>> = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks = Vec::new();
        for (name, key) in agents {
            let listener = TcpListener::bind(("127.0.0.1", 0))
                .await
                .map_err(|e| TunnelError::Local(e.to_string()))?;
            let local = listener
                .local_addr()
                .map_err(|e| TunnelError::Local(e.to_string()))?;
            registry.lock().unwrap_or_else(|p| p.into_inner()).insert(
                name.clone(),
                AgentSlot {
                    key_fingerprint: fingerprint(&key),
                    handle: None,
                    local,
                },
            );
            tasks.push(tokio::spawn(serve_agent_listener(
                listener,
                name,
                registry.clone(),
            )));
        }
        let listener = TcpListener::bind(bind)
            .await
            .map_err(|e| TunnelError::Local(format!("binding {bind}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TunnelError::Local(e.to_string()))?;
        let config = Arc::new(server::Config {
            keys: vec![host_key],
            keepalive_interval: Some(Duration::from_secs(5)),
            keepalive_max: 3,
            auth_rejection_time: Duration::from_millis(200),
            ..Default::default()
        });
        let agents = registry.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let handler = AgentSession {
                    agents: agents.clone(),
                    name: None,
                    id: SESSION_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
                let config = config.clone();
                tokio::spawn(async move {
                    if let Ok(session) = server::run_stream(config, socket, handler).await {
                        let _ = session.await;
                    }
                });
            }
        }));
        Ok(Self {
            addr,
            host_key_fingerprint,
            agents: registry,
            tasks,
        })
    }

    /// Where agents connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's host key fingerprint, for agents to pin.
    pub fn host_key_fingerprint(&self) -> &str {
        &self.host_key_fingerprint
    }

    /// The loopback address that reaches `agent`'s database (connect sluice's database client
    /// here); `None` for an unregistered name.
    pub fn local_addr_for(&self, agent: &str) -> Option<SocketAddr> {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent)
            .map(|a| a.local)
    }

    /// True while `agent` is connected.
    pub fn is_connected(&self, agent: &str) -> bool {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent)
            .is_some_and(|a| a.handle.is_some())
    }
}

async fn serve_agent_listener(
    listener: TcpListener,
    name: String,
    agents: Arc<Mutex<HashMap<String, AgentSlot>>>,
) {
    while let Ok((mut socket, peer)) = listener.accept().await {
        let handle = agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&name)
            .and_then(|a| a.handle.as_ref().map(|(_, h)| h.clone()));
        let Some(handle) = handle else {
            tracing::warn!(agent = %name, "no connection from this agent; refusing a database connection");
            continue; // dropping the socket refuses the connection
        };
        tokio::spawn(async move {
            let open = handle.channel_open_forwarded_tcpip(
                "sluice-agent",
                0,
                peer.ip().to_string(),
                u32::from(peer.port()),
            );
            match tokio::time::timeout(Duration::from_secs(10), open).await {
                Ok(Ok(channel)) => {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut socket, &mut stream).await;
                }
                _ => tracing::warn!("the agent did not open a channel"),
            }
        });
    }
}

/// One agent's SSH session on the server.
struct AgentSession {
    agents: Arc<Mutex<HashMap<String, AgentSlot>>>,
    name: Option<String>,
    id: u64,
}

impl server::Handler for AgentSession {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let registered = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .is_some_and(|a| a.key_fingerprint == fingerprint(key.public_key));
        if registered {
            self.name = Some(user.to_owned());
            Ok(Auth::Accept)
        } else {
            tracing::warn!(agent = user, key = %fingerprint(key.public_key), "refused an unregistered agent");
            Ok(Auth::reject())
        }
    }

    async fn tcpip_forward(
        &mut self,
        _address: &str,
        _port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(name) = &self.name else {
            return Ok(false);
        };
        if let Some(slot) = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(name)
        {
            if slot.handle.is_some() {
                tracing::info!(agent = %name, "agent reconnected: its new session replaces the old one");
            }
            slot.handle = Some((self.id, session.handle()));
        }
        Ok(true)
    }
}

impl Drop for AgentSession {
    fn drop(&mut self) {
        if let Some(name) = &self.name
            && let Some(slot) = self
                .agents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(name)
            && slot.handle.as_ref().is_some_and(|(id, _)| *id == self.id)
        {
            slot.handle = None;
        }
    }
}

/// How an agent reaches the server and its database.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// sluice's SSH endpoint host.
    pub server_host: String,
    /// sluice's SSH endpoint port.
    pub server_port: u16,
    /// The agent's registered name.
    pub name: String,
    /// The agent's private key.
    pub key_file: PathBuf,
    /// The server's host key fingerprint (`SHA256:…`), pinned.
    pub server_fingerprint: Option<String>,
    /// The one database host this agent reaches.
    pub db_host: String,
    /// Its port.
    pub db_port: u16,
}

/// The agent's side of one session.
struct AgentClient {
    pin: HostKeyPin,
    db: (String, u16),
}

impl client::Handler for AgentClient {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.pin.accepts(key))
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Whatever the server names, the agent only ever connects to its own database.
        let (host, port) = self.db.clone();
        match TcpStream::connect((host.as_str(), port)).await {
            Ok(mut db) => {
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut db, &mut stream).await;
                });
            }
            Err(e) => {
                tracing::warn!(db = %format!("{host}:{port}"), error = %e, "the database is unreachable from the agent");
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }
}

/// Runs an agent: connects, authenticates, announces itself, and serves until the session
/// ends, then reconnects with backoff — until `shutdown` turns true. Configuration errors (host
/// key, refused key) end it with the explanation.
pub async fn run_agent(
    config: AgentConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), TunnelError> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        match connect_agent(&config).await {
            Ok(session) => {
                backoff.reset();
                tokio::select! {
                    _ = wait_closed(&session) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "agent: cannot reach the server; retrying")
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn wait_closed(session: &client::Handle<AgentClient>) {
    while !session.is_closed() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn connect_agent(config: &AgentConfig) -> Result<client::Handle<AgentClient>, TunnelError> {
    let login = Login {
        host: &config.server_host,
        port: config.server_port,
        user: &config.name,
        key_file: &config.key_file,
        keepalive: Duration::from_secs(5),
        keepalive_max: 3,
        timeout: Duration::from_secs(10),
    };
    let pin = HostKeyPin::new(config.server_fingerprint.clone());
    let handler = AgentClient {
        pin: pin.clone(),
        db: (config.db_host.clone(), config.db_port),
    };
    let server = format!("{}:{}", config.server_host, config.server_port);
    let session = session::open(&login, &pin, handler)
        .await
        .map_err(|e| match e {
            // The session code speaks of bastions; here the other end is sluice itself.
            TunnelError::AuthRejected {
                key_fingerprint, ..
            } => TunnelError::AgentRefused {
                server: server.clone(),
                name: config.name.clone(),
                key_fingerprint,
            },
            TunnelError::HostKeyChanged { expected, got, .. } => {
                TunnelError::AgentServerKeyChanged {
                    server: server.clone(),
                    expected,
                    got,
                }
            }
            other => other,
        })?;
    session
        .tcpip_forward("sluice-agent", 0)
        .await
        .map_err(|e| TunnelError::Ssh(format!("announcing the agent: {e}")))?;
    Ok(session)
}

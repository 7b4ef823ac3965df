//! A tunnel through an SSH bastion: a loopback listener whose connections are carried over
//! `direct-tcpip` channels to the database.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::PublicKeyOrCertificate;
use sluice_core::Backoff;
use tokio::net::{TcpListener, TcpStream};

use crate::TunnelError;
use crate::session::{self, HostKeyPin, Login};

/// How to reach the database through a bastion.
#[derive(Clone, Debug)]
pub struct BastionConfig {
    /// Bastion host.
    pub host: String,
    /// Bastion SSH port.
    pub port: u16,
    /// SSH user on the bastion.
    pub user: String,
    /// The private key (from `sluice tunnel keygen`).
    pub key_file: PathBuf,
    /// The bastion's host key fingerprint (`SHA256:…`). Required: a first connection without
    /// it fails and shows the fingerprint to confirm.
    pub host_key_fingerprint: Option<String>,
    /// The database, as the bastion sees it.
    pub forward_host: String,
    /// The database port.
    pub forward_port: u16,
    /// Keepalive interval; a path that misses `keepalive_max` replies in a row is dead.
    pub keepalive: Duration,
    /// See `keepalive`.
    pub keepalive_max: usize,
    /// Time allowed to connect to the bastion and to open each channel.
    pub timeout: Duration,
}

impl BastionConfig {
    /// A config with keepalive every 5 s (dead after 3 misses) and a 10 s timeout.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        user: impl Into<String>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            user: user.into(),
            key_file: key_file.into(),
            host_key_fingerprint: None,
            forward_host: "127.0.0.1".into(),
            forward_port: 5432,
            keepalive: Duration::from_secs(5),
            keepalive_max: 3,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Accepts only the bastion's pinned host key.
struct PinnedHostKey(HostKeyPin);

impl client::Handler for PinnedHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(self.0.accepts(key))
    }
}

/// A running tunnel. Dropping it stops the listener; open connections end with it.
pub struct BastionTunnel {
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BastionTunnel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BastionTunnel {
    /// Connects to the bastion (so configuration errors surface now), then serves a loopback
    /// listener: each connection to [`local_addr`](Self::local_addr) is carried to the database.
    /// A dead SSH session is replaced (with backoff) when the next connection arrives.
    pub async fn open(config: BastionConfig) -> Result<Self, TunnelError> {
        let session = connect(&config).await?;
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| TunnelError::Local(e.to_string()))?;
        let local = listener
            .local_addr()
            .map_err(|e| TunnelError::Local(e.to_string()))?;
        let task = tokio::spawn(serve(listener, config, session));
        Ok(Self { local, task })
    }

    /// Checks each hop now: the bastion answers with the pinned host key, accepts the key,
    /// and opens a channel to the database. Errors say which hop failed.
    pub async fn probe(config: &BastionConfig) -> Result<(), TunnelError> {
        let session = connect(config).await?;
        let peer = SocketAddr::from(([127, 0, 0, 1], 0));
        let channel = open_channel(&session, peer, config).await?;
        let _ = channel.close().await;
        let _ = session
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        Ok(())
    }

    /// [`probe`](Self::probe), reported hop by hop: each hop is `Ok` up to the one that
    /// failed, which carries the explanation; the hops after it were not reached (`None`).
    pub async fn hops(config: &BastionConfig) -> Vec<(&'static str, Option<Result<(), String>>)> {
        const HOPS: [&str; 5] = [
            "bastion reachable",
            "host key pinned",
            "key accepted",
            "forward allowed",
            "database reachable",
        ];
        let failed_at = match Self::probe(config).await {
            Ok(()) => None,
            Err(e) => {
                let hop = match &e {
                    TunnelError::Key(_)
                    | TunnelError::Local(_)
                    | TunnelError::BastionUnreachable { .. }
                    | TunnelError::Ssh(_) => 0,
                    TunnelError::HostKeyNotPinned { .. }
                    | TunnelError::HostKeyChanged { .. }
                    | TunnelError::AgentServerKeyChanged { .. } => 1,
                    TunnelError::AuthRejected { .. } | TunnelError::AgentRefused { .. } => 2,
                    TunnelError::ForwardRefused { .. } | TunnelError::ChannelTimeout { .. } => 3,
                    TunnelError::DatabaseUnreachable { .. } => 4,
                };
                Some((hop, e.to_string()))
            }
        };
        HOPS.iter()
            .enumerate()
            .map(|(i, name)| {
                let status = match &failed_at {
                    None => Some(Ok(())),
                    Some((hop, _)) if i < *hop => Some(Ok(())),
                    Some((hop, message)) if i == *hop => Some(Err(message.clone())),
                    Some(_) => None,
                };
                (*name, status)
            })
            .collect()
    }

    /// Where to connect: `127.0.0.1:<port>`.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

async fn serve(listener: TcpListener, config: BastionConfig, session: Handle<PinnedHostKey>) {
    let session = Arc::new(tokio::sync::Mutex::new(session));
    let config = Arc::new(config);
    loop {
        let Ok((socket, peer)) = listener.accept().await else {
            continue;
        };
        let (session, config) = (session.clone(), config.clone());
        tokio::spawn(async move {
            if let Err(e) = carry(socket, peer, &session, &config).await {
                tracing::warn!(bastion = %config.host, error = %e, "tunnel connection failed");
            }
        });
    }
}

/// Carries one local connection over a new channel, reconnecting the session if it died.
async fn carry(
    mut socket: TcpStream,
    peer: SocketAddr,
    session: &tokio::sync::Mutex<Handle<PinnedHostKey>>,
    config: &BastionConfig,
) -> Result<(), TunnelError> {
    let channel = {
        let mut guard = session.lock().await;
        if guard.is_closed() {
            let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
            *guard = loop {
                match connect(config).await {
                    Ok(new) => break new,
                    Err(e) if backoff.attempts() < 5 && e.is_transient() => {
                        tokio::time::sleep(backoff.next_delay()).await
                    }
                    Err(e) => return Err(e),
                }
            };
        }
        open_channel(&guard, peer, config).await?
    };
    let mut stream = channel.into_stream();
    let _ = tokio::io::copy_bidirectional(&mut socket, &mut stream).await;
    Ok(())
}

async fn open_channel(
    session: &Handle<PinnedHostKey>,
    peer: SocketAddr,
    config: &BastionConfig,
) -> Result<russh::Channel<client::Msg>, TunnelError> {
    let open = session.channel_open_direct_tcpip(
        config.forward_host.clone(),
        u32::from(config.forward_port),
        peer.ip().to_string(),
        u32::from(peer.port()),
    );
    match tokio::time::timeout(config.timeout, open).await {
        Err(_) => Err(TunnelError::ChannelTimeout {
            secs: config.timeout.as_secs(),
        }),
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(russh::Error::ChannelOpenFailure(reason))) => {
            let target = format!("{}:{}", config.forward_host, config.forward_port);
            Err(match reason {
                russh::ChannelOpenFailure::AdministrativelyProhibited => {
                    TunnelError::ForwardRefused { target }
                }
                _ => TunnelError::DatabaseUnreachable {
                    target,
                    bastion: config.host.clone(),
                },
            })
        }
        Ok(Err(e)) => Err(TunnelError::Ssh(e.to_string())),
    }
}

/// Connects and authenticates, checking the host key.
async fn connect(config: &BastionConfig) -> Result<Handle<PinnedHostKey>, TunnelError> {
    let login = Login {
        host: &config.host,
        port: config.port,
        user: &config.user,
        key_file: &config.key_file,
        keepalive: config.keepalive,
        keepalive_max: config.keepalive_max,
        timeout: config.timeout,
    };
    let pin = HostKeyPin::new(config.host_key_fingerprint.clone());
    session::open(&login, &pin, PinnedHostKey(pin.clone())).await
}

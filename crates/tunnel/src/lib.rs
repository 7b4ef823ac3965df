//! Tunnels to databases sluice cannot reach directly.
//!
//! `sluice-tunnel` owns SSH bastion tunnels: [`keys`] generates the ed25519 key and the
//! `authorized_keys` line restricted to one forward; [`BastionTunnel`] serves a loopback
//! listener whose connections travel over `direct-tcpip` channels (sqlx has no custom-stream
//! hook), with the bastion's host key pinned by fingerprint, keepalive to detect a dead path,
//! a timeout on every channel open, and reconnection with backoff. [`ReverseServer`] and
//! [`run_agent`] are the reverse tunnel: `sluice-agent` dials out from the database's network,
//! and sluice reaches the database through it.
//!
//! It must not know about PostgreSQL beyond a host and port to forward to: callers get a
//! local address and connect through it as if it were the database.
//!
//! ```no_run
//! # async fn example() -> Result<(), sluice_tunnel::TunnelError> {
//! use sluice_tunnel::{BastionConfig, BastionTunnel};
//!
//! let mut bastion = BastionConfig::new("bastion.example.com", 22, "sluice", "/etc/sluice/tunnel_key");
//! bastion.host_key_fingerprint = Some("SHA256:…".into()); // as `sluice tunnel check` shows it
//! bastion.forward_host = "db.internal".into(); // the database, as the bastion sees it
//! bastion.forward_port = 5432;
//! let tunnel = BastionTunnel::open(bastion).await?;
//! let local = tunnel.local_addr(); // connect here as if it were db.internal:5432
//! # let _ = local; Ok(()) }
//! ```

mod bastion;
pub mod keys;
mod reverse;
mod session;

pub use bastion::{BastionConfig, BastionTunnel};
pub use reverse::{AgentConfig, ReverseServer, run_agent};

/// Why a tunnel could not be set up, explained.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TunnelError {
    /// The key file could not be made or read.
    #[error("tunnel key: {0}")]
    Key(String),
    /// The bastion did not answer.
    #[error(
        "cannot reach the bastion {bastion}: {detail}. Check its host and port, and that sluice's address may connect to it"
    )]
    BastionUnreachable {
        /// `host:port`.
        bastion: String,
        /// What happened.
        detail: String,
    },
    /// No fingerprint is pinned yet.
    #[error(
        "the bastion {bastion} presented the host key {fingerprint}. Confirm it is the bastion's (on the \
         bastion: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then pin it: host_key_fingerprint = \"{fingerprint}\""
    )]
    HostKeyNotPinned {
        /// `host:port`.
        bastion: String,
        /// What it presented.
        fingerprint: String,
    },
    /// The bastion's key is not the pinned one.
    #[error(
        "the bastion {bastion}'s host key has CHANGED: expected {expected}, got {got}. Someone may be \
         intercepting the connection, or the bastion was rebuilt. Verify the new key on the bastion before \
         pinning it; sluice will not connect until then"
    )]
    HostKeyChanged {
        /// `host:port`.
        bastion: String,
        /// The pinned fingerprint.
        expected: String,
        /// What it presented.
        got: String,
    },
    /// The bastion refused the key.
    #[error(
        "the bastion {bastion} rejected the key {key_fingerprint} for user {user}: install its public key in \
         ~{user}/.ssh/authorized_keys there (sluice tunnel keygen prints the line)"
    )]
    AuthRejected {
        /// `host:port`.
        bastion: String,
        /// SSH user.
        user: String,
        /// The key's fingerprint.
        key_fingerprint: String,
    },
    /// sluice's agent endpoint refused this agent's key (an agent's error, not a bastion's).
    #[error(
        "sluice at {server} refused agent {name:?} with the key {key_fingerprint}: the agent is not \
         registered under that name with that key in the server's sluice.toml"
    )]
    AgentRefused {
        /// `host:port` of sluice's agent endpoint.
        server: String,
        /// The agent's name.
        name: String,
        /// The key's fingerprint.
        key_fingerprint: String,
    },
    /// sluice's agent endpoint presented a host key other than the pinned one.
    #[error(
        "sluice at {server} presented the host key {got}, but the agent pins {expected}. If the server's \
         key was regenerated, pin the new one; otherwise something is intercepting the connection"
    )]
    AgentServerKeyChanged {
        /// `host:port` of sluice's agent endpoint.
        server: String,
        /// The pinned fingerprint.
        expected: String,
        /// What it presented.
        got: String,
    },
    /// `permitopen` (or the server's policy) forbids this forward.
    #[error(
        "the bastion refused to forward to {target}: the key's permitopen (or AllowTcpForwarding) does not \
         allow it. Make the authorized_keys line say permitopen=\"{target}\""
    )]
    ForwardRefused {
        /// `host:port` asked for.
        target: String,
    },
    /// The bastion could not reach the database.
    #[error(
        "the bastion {bastion} cannot reach the database at {target}: check the database host and port as the bastion sees them"
    )]
    DatabaseUnreachable {
        /// `host:port` asked for.
        target: String,
        /// The bastion host.
        bastion: String,
    },
    /// Opening a channel took too long.
    #[error("the bastion did not open a channel within {secs}s")]
    ChannelTimeout {
        /// Seconds waited.
        secs: u64,
    },
    /// The local listener failed.
    #[error("local tunnel listener: {0}")]
    Local(String),
    /// Any other SSH failure.
    #[error("ssh: {0}")]
    Ssh(String),
}

impl TunnelError {
    /// Worth retrying (the path, not the configuration, failed).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TunnelError::BastionUnreachable { .. }
                | TunnelError::ChannelTimeout { .. }
                | TunnelError::Ssh(_)
        )
    }
}

impl TunnelError {
    /// What to do about it, in one line (the message says why).
    pub fn fix(&self) -> String {
        match self {
            TunnelError::Key(_) => {
                "check that the tunnel key file exists and is readable (`sluice tunnel keygen` makes one)".into()
            }
            TunnelError::BastionUnreachable { .. } | TunnelError::ChannelTimeout { .. } => {
                "check the bastion's host and port, and that sluice's address may connect to it".into()
            }
            TunnelError::HostKeyNotPinned { fingerprint, .. } => {
                format!("after checking it on the bastion: host_key_fingerprint = \"{fingerprint}\"")
            }
            TunnelError::HostKeyChanged { got, .. } => format!(
                "verify the bastion's key on the bastion (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub); only if it is {got}, pin it: host_key_fingerprint = \"{got}\""
            ),
            TunnelError::AuthRejected { user, .. } => format!(
                "install the key's public line in ~{user}/.ssh/authorized_keys on the bastion (`sluice tunnel keygen` prints it)"
            ),
            TunnelError::AgentRefused {
                name,
                key_fingerprint,
                ..
            } => format!(
                "on the server, add to sluice.toml:  [[agents.agent]]  name = \"{name}\"  public_key = \"<the line of the agent's .pub file, {key_fingerprint}>\"  (`sluice-agent keygen` printed it), then reload sluice"
            ),
            TunnelError::AgentServerKeyChanged { got, .. } => format!(
                "compare with the fingerprint `sluice serve` logs at start (\"agent endpoint listening\"); only if it is {got}, restart the agent with --server-fingerprint {got}"
            ),
            TunnelError::ForwardRefused { target } => {
                format!("make the key's authorized_keys line say permitopen=\"{target}\"")
            }
            TunnelError::DatabaseUnreachable { .. } => {
                "set the database host and port as the bastion sees them".into()
            }
            TunnelError::Local(_) => {
                "check that sluice may listen on a loopback port (a free port is chosen)".into()
            }
            TunnelError::Ssh(_) => "check the bastion's sshd log for why it ended the session".into(),
        }
    }
}

impl From<TunnelError> for sluice_core::Error {
    fn from(e: TunnelError) -> Self {
        if e.is_transient() {
            sluice_core::Error::Unavailable {
                what: e.to_string(),
                source: None,
            }
        } else {
            let fix = e.fix();
            sluice_core::Error::configuration(e.to_string(), fix)
        }
    }
}

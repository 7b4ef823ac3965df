//! The write-back proxy (`[proxy]`), part of the configuration types ([`crate::Config`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ApiTlsConfig, SecretSource};

/// A PostgreSQL wire-protocol server in front of one target (docs/proxy.md). Clients log in
/// with their own target credentials; reads and writes to tables sluice does not write pass
/// through unchanged, and writes to synced tables are applied upstream first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address to listen on, e.g. `127.0.0.1:6432`.
    pub listen: String,
    /// The target (by name) clients reach through the proxy.
    pub target: String,
    /// Serve clients over TLS with this certificate; clients that do not ask for TLS are then
    /// refused. Without it, clients connect in plain text (keep the listener on a trusted
    /// network).
    #[serde(default)]
    pub tls: Option<ApiTlsConfig>,
    /// Apply writes to synced tables inside an explicit transaction (`BEGIN … COMMIT`). Each
    /// such statement is applied upstream at once and cannot be rolled back; a `NOTICE` says
    /// so. Off by default: such writes are refused with an error naming this setting.
    #[serde(default)]
    pub writes_in_transactions: bool,
    /// The most rows one statement may write upstream; a statement touching more is refused
    /// before anything is sent (default: the source's own, 100 for Stripe).
    #[serde(default)]
    pub max_rows_per_statement: Option<u64>,
}

/// The login a PostgreSQL source's writer uses: its own role on the source database (same
/// host, port, database, TLS and tunnel as the source's connection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriterLogin {
    /// The role, e.g. `sluice_writer`.
    pub user: String,
    /// Where its password is read from.
    #[serde(default)]
    pub password: Option<SecretSource>,
}

/// The webhook a push sync's writer POSTs the write-back proxy's changes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookWriterConfig {
    /// The URL (`https://…`); a `2xx` answer accepts the change.
    pub url: String,
    /// Sent as `Authorization: Bearer …`, so the webhook can tell sluice's requests.
    #[serde(default)]
    pub secret: Option<SecretSource>,
}

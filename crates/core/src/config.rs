//! Configuration types (`sluice.toml`). They derive `serde` and `schemars::JsonSchema`;
//! `cargo xtask codegen` writes the JSON Schema to `schema/sluice.schema.json` so editors can
//! validate a config file.
//!
//! Secrets are never inline: a password names where to read it ([`SecretSource`]).

use std::path::PathBuf;

use schemars::JsonSchema;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::api_config::StripeSourceConfig;
use crate::{CollectionId, ConsumerId, Error, Provider, RecordFilter, SyncId};

/// A whole sluice configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the embedded records stream and sluice's state live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// PostgreSQL databases sluice writes into.
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    /// Configured sources.
    #[serde(default, rename = "sync")]
    pub syncs: Vec<SyncConfig>,
    /// What flows from the stream into which target.
    #[serde(default, rename = "consumer")]
    pub consumers: Vec<ConsumerConfig>,
    /// The HTTP API `sluice serve` offers (management, push, metrics).
    #[serde(default)]
    pub api: ApiConfig,
    /// The endpoint `sluice-agent`s dial out to (reverse tunnels); off when absent.
    pub agents: Option<AgentsConfig>,
    /// Where alerts go besides the log: webhooks, email.
    #[serde(default)]
    pub alerts: crate::AlertsConfig,
    /// The write-back proxy in front of a target; off when absent.
    pub proxy: Option<crate::ProxyConfig>,
}

/// The reverse-tunnel endpoint of `sluice serve`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentsConfig {
    /// Address agents connect to (SSH), e.g. `0.0.0.0:7722`.
    pub listen: String,
    /// The server's SSH host key (created, mode 0600, if missing). Agents pin its fingerprint,
    /// which `serve` logs at start.
    pub host_key_file: PathBuf,
    /// The registered agents; no other key is accepted.
    #[serde(default, rename = "agent")]
    pub agents: Vec<AgentEntry>,
}

/// One registered agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The agent's name (`sluice-agent run --name`), used by `tunnel = { kind = "agent", name }`.
    pub name: String,
    /// The agent's public key, as `sluice-agent keygen` prints it (`ssh-ed25519 AAAA…`).
    pub public_key: String,
}

/// The HTTP API of `sluice serve`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on (default `127.0.0.1:7780`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where to read the bearer token every request must carry (default: the environment
    /// variable `SLUICE_API_TOKEN`).
    #[serde(default = "default_token")]
    pub token: SecretSource,
    /// Largest request body accepted, in bytes (default 16 MiB); larger pushes get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// A password for the web console, besides the API token (which always works there).
    #[serde(default)]
    pub console_password: Option<SecretSource>,
    /// Serve the API and the console over TLS (https) with this certificate.
    #[serde(default)]
    pub tls: Option<ApiTlsConfig>,
}

/// The API's own TLS certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTlsConfig {
    /// The certificate chain (PEM), the server's certificate first.
    pub certificate_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: default_token(),
            max_body_bytes: default_max_body(),
            console_password: None,
            tls: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:7780".to_owned()
}
fn default_token() -> SecretSource {
    SecretSource::Env("SLUICE_API_TOKEN".to_owned())
}
fn default_max_body() -> usize {
    16 << 20
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("sluice-data")
}

/// Where a secret is read from. Never the secret itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SecretSource {
    /// An environment variable's value.
    Env(String),
    /// A file's contents, without a trailing newline.
    File(PathBuf),
}

impl SecretSource {
    /// Reads the secret. The error names the variable or file, never the value.
    pub fn resolve(&self) -> Result<SecretString, Error> {
        match self {
            SecretSource::Env(var) => std::env::var(var).map(SecretString::from).map_err(|_| {
                Error::configuration(
                    format!("environment variable {var} is not set (or not valid UTF-8)"),
                    format!("export {var}=… before starting sluice"),
                )
            }),
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|s| SecretString::from(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| {
                    Error::configuration(
                        format!("cannot read secret file {}: {e}", path.display()),
                        format!("create {} readable by sluice (mode 0600)", path.display()),
                    )
                }),
        }
    }
}

/// TLS modes, with libpq's names. What each one checks:
/// `disable` never uses TLS; `prefer` uses it when the server offers it, without checking the
/// certificate; `require` insists on TLS but does **not** verify the certificate (even when a
/// root certificate is given); `verify-ca` also checks the chain against the root
/// certificate; `verify-full` also checks that the host name matches the certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS if the server offers it; no certificate check.
    #[default]
    Prefer,
    /// Insist on TLS; no certificate check.
    Require,
    /// Insist on TLS and check the certificate chain.
    VerifyCa,
    /// Insist on TLS, check the chain and the host name.
    VerifyFull,
}

/// TLS settings of a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SslConfig {
    /// The TLS mode (default `prefer`).
    #[serde(default)]
    pub mode: SslMode,
    /// Root certificate (PEM file) for `verify-ca` and `verify-full`.
    pub root_cert: Option<PathBuf>,
    /// Client certificate (PEM file), when the server requires one.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM file).
    pub client_key: Option<PathBuf>,
}

/// How to reach a PostgreSQL server (a target, or a Postgres source).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// Host name or address.
    pub host: String,
    /// Port (default 5432).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database name.
    pub database: String,
    /// The role sluice logs in as (the sync user on a target).
    pub user: String,
    /// Where to read the password; none for certificate or trust authentication.
    pub password: Option<SecretSource>,
    /// TLS settings.
    #[serde(default)]
    pub ssl: SslConfig,
    /// Seconds to wait for a connection before reporting a timeout (default 10).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// `application_name` shown in `pg_stat_activity` (default `sluice`).
    #[serde(default = "default_application_name")]
    pub application_name: String,
    /// Reach the server through a tunnel.
    pub tunnel: Option<TunnelConfig>,
}

fn default_port() -> u16 {
    5432
}
fn default_connect_timeout() -> u64 {
    10
}
fn default_application_name() -> String {
    "sluice".to_owned()
}

/// A tunnel to a server sluice cannot reach directly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TunnelConfig {
    /// Through an SSH bastion, with `direct-tcpip` forwarding.
    Bastion {
        /// Bastion host.
        host: String,
        /// Bastion SSH port (default 22).
        #[serde(default = "default_ssh_port")]
        port: u16,
        /// SSH user on the bastion.
        user: String,
        /// Private key file (created by `sluice tunnel keygen`).
        key_file: PathBuf,
        /// The bastion's host key fingerprint (`SHA256:…`), pinned; required before use.
        host_key_fingerprint: Option<String>,
    },
    /// Through a `sluice-agent` that dialled out from the database's network.
    Agent {
        /// The agent's registered name.
        name: String,
    },
}

fn default_ssh_port() -> u16 {
    22
}

/// A registered target database.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// The target's name, used by consumers and in messages.
    pub name: String,
    /// How to connect, as the sync user. (A nested table rather than flattened fields, so
    /// a misspelt key is reported as unknown instead of as some other field missing.)
    pub connection: ConnectionConfig,
    /// The read role granted to users who read synced data (default `sluice_read`).
    #[serde(default = "default_read_role")]
    pub read_role: String,
}

fn default_read_role() -> String {
    "sluice_read".to_owned()
}

/// One configured source instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// The sync's name, used in messages.
    pub name: String,
    /// The sync's id; records carry it, so it must never change for the same source.
    pub id: SyncId,
    /// The source itself.
    pub source: SourceConfig,
}

/// The source of a sync, by provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "provider", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A PostgreSQL database read through logical replication.
    Postgres {
        /// How to connect (a role with REPLICATION and SELECT on the published tables).
        connection: ConnectionConfig,
        /// The publication to read (default `sluice_publication`).
        #[serde(default = "default_publication")]
        publication: String,
        /// The replication slot (default `sluice_slot`).
        #[serde(default = "default_slot")]
        slot: String,
        /// Create the publication and slot if missing (publication first).
        #[serde(default)]
        create_missing: bool,
        /// The role the write-back proxy applies changes to the source's tables as (its
        /// grants: docs/proxy.md); without it, writes to this sync's tables are refused.
        #[serde(default)]
        writer: Option<crate::WriterLogin>,
        /// A failover slot (PostgreSQL 17+), kept on standbys through a failover (docs/versions.md).
        #[serde(default)]
        failover_slot: bool,
        /// WAL the slot may hold before the sync's health warns (and alerts); default 1 GiB.
        #[serde(default)]
        slot_lag_warning_bytes: Option<u64>,
        /// Connections that read each table's backfill in parallel, one key range each
        /// (1 to 16; default 1). Each is one more session on the source database.
        #[serde(default)]
        backfill_readers: Option<usize>,
    },
    /// Records pushed to sluice's HTTP API.
    Http {
        /// Where the write-back proxy POSTs changes to this sync's tables (docs/proxy.md);
        /// without it, writes to them are refused.
        #[serde(default)]
        webhook: Option<crate::WebhookWriterConfig>,
    },
    /// Stripe: every chosen object listed once, then followed through `/v1/events`
    /// (docs/stripe.md).
    Stripe(StripeSourceConfig),
}

fn default_publication() -> String {
    "sluice_publication".to_owned()
}
fn default_slot() -> String {
    "sluice_slot".to_owned()
}

impl SourceConfig {
    /// The provider of this source.
    pub fn provider(&self) -> Provider {
        match self {
            SourceConfig::Postgres { .. } => Provider::Postgres,
            SourceConfig::Http { .. } => Provider::Http,
            SourceConfig::Stripe(_) => Provider::Stripe,
        }
    }

    /// The database connection the source reads through, for sources that have one (its
    /// tunnel is opened, and checked hop by hop, before the source is built).
    pub fn connection(&self) -> Option<&ConnectionConfig> {
        match self {
            SourceConfig::Postgres { connection, .. } => Some(connection),
            SourceConfig::Http { .. } | SourceConfig::Stripe(_) => None,
        }
    }
}

/// A consumer: records passing a filter, written into one target layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// The consumer's name (keys its checkpoint; renaming restarts its backfill).
    pub name: ConsumerId,
    /// The target's name.
    pub target: String,
    /// Which records to forward.
    pub filter: FilterConfig,
    /// How records are laid out in the target.
    pub layout: LayoutConfig,
    /// Batching.
    #[serde(default)]
    pub batch: BatchConfig,
    /// When the consumer counts as falling behind.
    #[serde(default)]
    pub lag: LagThresholds,
}

/// A consumer's filter, as written in config: a provider, or a sync by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterConfig {
    /// Every sync of this provider, including ones added later.
    Provider(Provider),
    /// One sync by name, optionally only some collections.
    Sync {
        /// The sync's name.
        name: String,
        /// Only these collections (all when absent).
        collections: Option<Vec<CollectionId>>,
    },
}

impl FilterConfig {
    /// The stream filter, given the syncs the config declares.
    pub fn resolve(&self, syncs: &[SyncConfig]) -> Result<RecordFilter, Error> {
        match self {
            FilterConfig::Provider(p) => Ok(RecordFilter::Provider(*p)),
            FilterConfig::Sync { name, collections } => {
                let sync = syncs.iter().find(|s| &s.name == name).ok_or_else(|| {
                    let known: Vec<&str> = syncs.iter().map(|s| s.name.as_str()).collect();
                    Error::configuration(
                        format!("the filter names sync {name:?}, which is not configured"),
                        format!("use one of the configured syncs: {known:?}"),
                    )
                })?;
                Ok(RecordFilter::Sync {
                    sync_id: sync.id,
                    collections: collections.as_ref().map(|c| c.iter().cloned().collect()),
                })
            }
        }
    }
}

/// How a consumer lays records out in its target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayoutConfig {
    /// One generic table for every record (`sequin_id`, `sync_id`, `collection_id`, …).
    ConsumerTable {
        /// The table's schema.
        schema: String,
        /// The table's name.
        table: String,
        /// Connections that write each batch in parallel (1 to 16; default 1). Records are
        /// split by a hash of their identity, so a record always goes through the same
        /// connection and keeps its order. Each is one more session on the target.
        #[serde(default)]
        connections: Option<usize>,
    },
    /// One schema per sync, one typed table per collection.
    SchemaMirror {
        /// The schema to create and own.
        schema: String,
        /// Connections that write each batch in parallel (1 to 16; default 1), as for the
        /// consumer table: a record always goes through the same connection. The tables'
        /// shapes are changed through the first, before any of them writes.
        #[serde(default)]
        connections: Option<usize>,
        /// Collections typed from a JSON Schema (for sources that do not describe their
        /// tables, such as pushed records), by collection id.
        #[serde(default)]
        collections: std::collections::BTreeMap<String, JsonCollectionConfig>,
    },
}

/// A collection typed from its JSON Schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonCollectionConfig {
    /// The table (default: the collection id after its last `:` or `.`).
    pub table: Option<String>,
    /// The records' JSON Schema: top-level `properties` become columns, the rest of each
    /// record stays in a `payload jsonb` column.
    pub json_schema: serde_json::Value,
}

/// When a consumer closes a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// At most this many records per batch (default 20,000). Only a backlog fills a batch (a
    /// backfill, a consumer catching up): each batch costs the target a transaction and
    /// round trips, so larger ones load faster. A batch and the next one, read while it is
    /// written, are in memory together, and a read stops at 8 MiB of payloads however many
    /// records that is.
    pub max_records: usize,
    /// While a source this consumer reads is backfilling, a batch that is not full waits at
    /// most this long after its first record for more (default 50 ms). A consumer that has
    /// caught up applies what it read at once.
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: 20_000,
            max_wait_ms: 50,
        }
    }
}

/// Lag beyond which a consumer is `warning`, then `error`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LagThresholds {
    /// Records behind the stream head for `warning` (default 10,000).
    pub warn_records: u64,
    /// Seconds behind for `warning` (default 60).
    pub warn_seconds: u64,
    /// Records behind for `error` (default 1,000,000).
    pub error_records: u64,
    /// Seconds behind for `error` (default 900).
    pub error_seconds: u64,
}

impl Default for LagThresholds {
    fn default() -> Self {
        Self {
            warn_records: 10_000,
            warn_seconds: 60,
            error_records: 1_000_000,
            error_seconds: 900,
        }
    }
}

/// The JSON Schema of [`Config`], pretty-printed, as committed in `schema/sluice.schema.json`.
pub fn config_schema_json() -> String {
    let schema = schemars::schema_for!(Config);
    // A schema is a JSON object with string keys: serialising it cannot fail.
    let mut json = serde_json::to_string_pretty(&schema).unwrap_or_default();
    json.push('\n');
    json
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;

//! The vocabulary and contracts every sluice crate shares.
//!
//! `sluice-core` owns the domain model: a [`Record`] and its identity ([`RecordKey`]), the
//! [`Version`] that orders its changes, stream positions ([`Seq`]), the [`RecordStream`] that
//! holds records between sources and consumers, the [`Source`] that keeps a sync's records in
//! it, the [`Target`] a consumer writes into, the [`Consumer`] itself, [`Health`] reports,
//! the configuration types (which derive `serde` and `schemars::JsonSchema`), and the
//! [`Error`] type whose
//! [`ErrorClass`] tells a caller whether to retry, ask the user to fix configuration, or
//! give up.
//!
//! It must never depend on a database driver, a network client or an async runtime: it
//! is the shared language, and the crates that talk to the outside world implement its
//! traits.
//!
//! ```
//! use sluice_core::{Change, Provider, Record, RecordKey, SyncId, Version};
//! use time::OffsetDateTime;
//!
//! let key = RecordKey::new(SyncId::new_random(), "public.orders", "42");
//! let record = Record {
//!     key: key.clone(),
//!     provider: Provider::Postgres,
//!     version: Version::new(0x16_B374_D848, 0),
//!     upstream_updated_at: OffsetDateTime::UNIX_EPOCH,
//!     change: Change::upsert(serde_json::json!({"id": 42, "total": "9.90"})).unwrap(),
//! };
//! // The row id in a consumer table is a pure function of the identity.
//! assert_eq!(record.key.row_id(), key.row_id());
//! assert!(!record.is_tombstone());
//! ```

mod alerts_config;
mod api_config;
pub mod bytes;
mod config;
mod consumer;
mod error;
mod health;
mod load;
mod managed;
mod problems;
mod proxy_config;
mod record;
mod report;
mod retry;
mod source;
pub mod sql;
mod stream;
mod target;
pub mod text;
mod text_batch;
mod writer;
mod xorshift;

pub use alerts_config::{AlertsConfig, EmailConfig, SmtpSecurity, WebhookConfig};
pub use api_config::{AccountsConfig, AllAccounts, STRIPE_OBJECTS, StripeSourceConfig};
pub use config::{
    AgentEntry, AgentsConfig, ApiConfig, ApiTlsConfig, BatchConfig, Config, ConnectionConfig,
    ConsumerConfig, FilterConfig, JsonCollectionConfig, LagThresholds, LayoutConfig, SecretSource,
    SourceConfig, SslConfig, SslMode, SyncConfig, TargetConfig, TunnelConfig, config_schema_json,
};
pub use consumer::{Consumer, ConsumerId};
pub use error::{Error, ErrorClass, Result};
pub use health::{
    Check, EntityKind, EntityRef, Health, HealthReport, HealthState, Status, Transition,
};
pub use load::ConfigError;
pub use managed::{MANAGED_FILE, Managed, ManagedKind};
pub use problems::Problem;
pub use proxy_config::{ProxyConfig, WebhookWriterConfig, WriterLogin};
pub use record::{
    Change, CollectionId, Payload, Provider, Record, RecordKey, SyncId, UpstreamId, Version,
};
pub use report::{CheckReport, Finding};
pub use retry::{Backoff, FIX_CONFIGURATION_FLOOR};
pub use source::{CollectionInfo, Refused, Source, SourceProgress, Stop};
pub use stream::{
    AppendOutcome, CollectionSchema, ColumnSchema, Lag, PayloadText, READ_BYTES, RecordFilter,
    RecordStream, Seq, SourceState, StreamEntry, StreamRead, payload_bytes,
};
pub use target::{Batch, Target};
pub use text_batch::TextBatch;
pub use writer::{
    Column, Columns, RefusalKind, UpstreamChange, WriteOutcome, WriteRefused, Writer, Written,
};
pub use xorshift::Xorshift;

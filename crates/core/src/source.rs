//! The source contract.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;
use serde::Serialize;

use crate::{CheckReport, CollectionId, CollectionSchema, Error, Health, Provider, Result};

/// Resolves when a running source must stop (`sluice serve` is shutting down, or the sync was
/// removed or changed in the config).
pub type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a source has done since it started, for the API and metrics.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SourceProgress {
    /// Records appended to the stream since start (backfilled and changed).
    pub appended: u64,
    /// Source-specific progress, shown as is by `GET /v1/syncs/{name}` (a PostgreSQL source's
    /// `backfill` and `confirmed_lsn`, a push source's `accepted`).
    #[serde(flatten)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// One collection a source produces.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CollectionInfo {
    /// The collection id (`public.orders`, `stripe:customer`).
    pub id: CollectionId,
    /// The columns, when the source knows them before any record (a table's catalog, a
    /// provider's published object schema); `None` when they are learned from payloads.
    pub schema: Option<CollectionSchema>,
}

/// Why records delivered to a source over HTTP were not taken.
#[derive(Debug)]
pub enum Refused {
    /// This kind of source does not take delivered records (the message says which does).
    NotAccepted(String),
    /// The request itself is wrong (shape, encoding, size); nothing was written.
    BadRequest(String),
    /// The records could not be stored; nothing was written, and the sender may retry.
    Unavailable(Error),
}

/// Keeps one sync's records in the [`RecordStream`](crate::RecordStream): a PostgreSQL
/// database through logical replication, records pushed over HTTP, a SaaS API.
///
/// Contract every implementation keeps:
/// - **Starts and stops cleanly.** [`run`](Source::run) works until `stop` resolves, then
///   returns promptly after appending what it holds: a change is either in the stream or
///   will be read again from upstream after a restart, never half of each. `run` does not
///   return on errors: it retries them by class ([`crate::ErrorClass`]): `Retry` backs off,
///   `FixConfiguration` backs off slowly with health `error` and the fix, `GiveUp` stops
///   reading the affected collection (not the others) and says which and why in health.
/// - **Appends with its resume state in one transaction.** Records and the position they
///   bring the source to ([`SourceState`](crate::SourceState): a slot position, a page
///   cursor) go into the stream in one
///   [`append_with_state`](crate::RecordStream::append_with_state), so a crash at any point
///   neither loses a change nor repeats one with an older version. Upstream is told a
///   position is done (a slot confirmed, a cursor advanced) only after the stream committed.
/// - **Versions only increase per record.** Each change of a record carries a
///   [`Version`](crate::Version) greater than the one before it upstream; the stream keeps
///   the newest, so a backfilled row never overwrites a newer change.
/// - **Describes what it produces.** [`collections`](Source::collections) lists the
///   collections with their columns where known, and the source stores each collection's
///   [`CollectionSchema`] in the stream when it learns or changes it.
/// - **Says what is wrong, with the fix.** [`check`](Source::check) connects and reports
///   every prerequisite with the exact fix; [`plan`](Source::plan) says what starting would
///   create or adopt. Neither changes anything. Health ([`Health`]) and
///   [`progress`](Source::progress) never fail and never block on upstream for long.
/// - **Never writes to targets**, and never holds a secret where `Debug`, logs or errors
///   would show it.
#[async_trait]
pub trait Source: Health {
    /// The sync's configured name.
    fn name(&self) -> &str;

    /// Which kind of upstream this is.
    fn provider(&self) -> Provider;

    /// Keeps the stream up to date until `stop` resolves (see the contract above).
    async fn run(&self, stop: Stop);

    /// The collections this source produces. Connects upstream where it must.
    async fn collections(&self) -> Result<Vec<CollectionInfo>>;

    /// Every prerequisite, each with its fix when it is not met. Changes nothing.
    async fn check(&self) -> CheckReport;

    /// What starting the source would create, adopt or read, one finding each (`ok: false`
    /// for what would stop it, with the fix). Changes nothing.
    async fn plan(&self) -> CheckReport;

    /// What the source has done since it started.
    fn progress(&self) -> SourceProgress;

    /// Takes records delivered over HTTP (`POST /v1/syncs/{name}/records`) and returns what
    /// became of them, as the response body. Sources that pull refuse with
    /// [`Refused::NotAccepted`].
    async fn receive(&self, body: &[u8]) -> std::result::Result<serde_json::Value, Refused> {
        let _ = body;
        Err(Refused::NotAccepted(format!(
            "sync {:?} is a {} source; only http syncs accept pushed records",
            self.name(),
            self.provider().as_str()
        )))
    }

    /// How the write-back proxy applies changes upstream, when this source can take them
    /// (docs/proxy.md). `None`: writes to its tables are refused with the reason from
    /// [`writer_missing`](Source::writer_missing).
    fn writer(&self) -> Option<std::sync::Arc<dyn crate::Writer>> {
        None
    }

    /// Why [`writer`](Source::writer) is `None`, with the fix.
    fn writer_missing(&self) -> String {
        format!(
            "sync {:?} ({}) does not take writes",
            self.name(),
            self.provider().as_str()
        )
    }
}

//! Writes through an API, for the write-back proxy: what a provider implements to take
//! changes ([`ApiWrites`]), and the [`Writer`] every API source offers with it.
//!
//! Each change is one request with an idempotency key of its own; a request whose outcome is
//! unclear (a lost connection, a `5xx`, rate limits beyond waiting) is sent again with the same
//! key, so it is applied once. The object the API answers with is what the proxy appends to
//! the stream, versioned at the second the API says it answered and minor version 0: the
//! change feed's own event for it (same second, a higher minor) then replaces it with the same
//! state, and no later change can be masked by it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::{
    Change, CollectionId, Payload, Provider, Record, RecordKey, RefusalKind, SyncId,
    UpstreamChange, UpstreamId, Version, WriteOutcome, WriteRefused, Writer, Written,
};
use time::OffsetDateTime;

use crate::{ApiError, Client};

/// What the API made of one change.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The object's id (an insert's new one).
    pub id: String,
    /// The object now; `None` once deleted.
    pub object: Option<Payload>,
    /// When the API says it answered.
    pub at: Option<OffsetDateTime>,
}

/// A provider's writes (see the module docs).
#[async_trait]
pub trait ApiWrites: Send + Sync {
    /// The most rows one statement may write (the API's own pace: Stripe 100).
    fn max_rows_per_statement(&self) -> u64;

    /// Fields of `collection` the API sets itself, for `verb` (`insert`, `update`).
    fn read_only_columns(&self, collection: &CollectionId, verb: &str) -> Vec<String>;

    /// Applies `change` to `collection` with `idempotency_key`.
    async fn write(
        &self,
        client: &Client,
        account: Option<&str>,
        collection: &CollectionId,
        change: &UpstreamChange,
        idempotency_key: &str,
    ) -> Result<Applied, ApiError>;
}

/// The [`Writer`] of an API source.
pub struct ApiWriter {
    pub(crate) writes: Arc<dyn ApiWrites>,
    pub(crate) client: Arc<Client>,
    pub(crate) sync_id: SyncId,
    pub(crate) provider: Provider,
    pub(crate) account: Option<String>,
}

/// How often an unclear request is sent again (with the same key) before giving up.
const ATTEMPTS: u32 = 3;

fn refusal(e: &ApiError) -> WriteRefused {
    match e {
        ApiError::Refused { message, code, .. } => {
            // The API's own words, without the request line the client puts before them.
            let text = message
                .split_once(": ")
                .map_or(message.as_str(), |(_, m)| m);
            let mut r = WriteRefused::new(RefusalKind::Rejected, text);
            if let Some(code) = code {
                r = r.code(code.clone());
            }
            r
        }
        ApiError::Missing(m) => WriteRefused::new(
            RefusalKind::Rejected,
            m.split_once(": ").map_or(m.as_str(), |(_, m)| m),
        )
        .code("resource_missing"),
        ApiError::Unauthorized(_) | ApiError::Forbidden(_) => WriteRefused::new(
            RefusalKind::NotConfigured,
            format!("{e}; the key needs write access to this object"),
        ),
        other => WriteRefused::new(
            RefusalKind::Unavailable,
            format!(
                "{other}; it was sent {ATTEMPTS} times with one idempotency key, so it is applied at most once"
            ),
        ),
    }
}

#[async_trait]
impl Writer for ApiWriter {
    fn max_rows_per_statement(&self) -> u64 {
        self.writes.max_rows_per_statement()
    }

    fn read_only_columns(&self, collection: &CollectionId, verb: &str) -> Vec<String> {
        self.writes.read_only_columns(collection, verb)
    }

    async fn apply(&self, collection: &CollectionId, changes: &[UpstreamChange]) -> WriteOutcome {
        let mut written = Written::default();
        for (applied, change) in changes.iter().enumerate() {
            let key = uuid::Uuid::new_v4().to_string();
            let mut attempt = 0;
            let result = loop {
                attempt += 1;
                match self
                    .writes
                    .write(
                        &self.client,
                        self.account.as_deref(),
                        collection,
                        change,
                        &key,
                    )
                    .await
                {
                    Err(
                        e @ (ApiError::Transport(_)
                        | ApiError::Server { .. }
                        | ApiError::RateLimited(_)),
                    ) if attempt < ATTEMPTS => {
                        tracing::warn!(error = %e, attempt, "write-back: sending the change again with the same idempotency key");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                    other => break other,
                }
            };
            match result {
                Ok(done) => {
                    let at = done.at.unwrap_or_else(OffsetDateTime::now_utc);
                    written.records.push(Record {
                        key: RecordKey::new(self.sync_id, collection.0.as_str(), done.id.as_str()),
                        provider: self.provider,
                        version: Version::new(at.unix_timestamp().max(0) as u64, 0),
                        upstream_updated_at: at,
                        change: match done.object {
                            Some(payload) => Change::Upsert { payload },
                            None => Change::Delete,
                        },
                    });
                    written.ids.push(UpstreamId(done.id));
                }
                Err(e) => {
                    return WriteOutcome {
                        written,
                        applied,
                        refused: Some(refusal(&e)),
                    };
                }
            }
        }
        WriteOutcome {
            applied: written.ids.len(),
            written,
            refused: None,
        }
    }
}

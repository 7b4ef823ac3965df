//! The push source: records delivered to `POST /v1/syncs/{name}/records`.
//!
//! `sluice-source-http` owns what happens to a pushed body: its shape is checked whole
//! ([`body`]), each record on its own, and the good records of one body are appended to the
//! records stream in one transaction, parsed a chunk at a time so a large body never has all
//! its records in memory at once. A record without a `version` gets one from a clock that only
//! moves forward, so a later push of the same key always wins.
//!
//! It implements [`Source`]: it pulls nothing, so [`Source::run`] only waits to be stopped.
//!
//! ```
//! use std::sync::Arc;
//! use sluice_core::{Source, SyncId};
//! use sluice_source_http::HttpSource;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let stream = Arc::new(sluice_stream::EmbeddedStream::open(dir.path()).await.unwrap());
//! let source = HttpSource::new("orders", SyncId::new_random(), stream);
//! let answer = source
//!     .receive(br#"{"records": [{"collection": "orders", "id": "1", "payload": {"total": 9.90}}]}"#)
//!     .await
//!     .unwrap();
//! assert_eq!(answer["accepted"], 1);
//! assert_eq!(source.progress().appended, 1);
//! # });
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::json;
use sluice_core::{
    CheckReport, CollectionInfo, EntityKind, EntityRef, Health, HealthReport, HealthState,
    Provider, Refused, Result, Source, SourceProgress, Status, Stop, SyncId,
};
use sluice_stream::EmbeddedStream;
use time::OffsetDateTime;

pub mod body;
pub mod webhook;

/// A sync whose records are pushed over HTTP.
pub struct HttpSource {
    name: String,
    sync_id: SyncId,
    stream: Arc<EmbeddedStream>,
    /// Records accepted since start.
    accepted: AtomicU64,
    /// The last version handed to a record pushed without one (nanoseconds since the epoch;
    /// strictly increasing); shared with the writer.
    clock: Arc<Mutex<Clock>>,
    /// The write-back proxy's webhook writer, when one is configured.
    writer: Option<Arc<webhook::WebhookWriter>>,
    /// Why the last body could not be stored, until one is.
    last_failure: Mutex<Option<String>>,
}

impl HttpSource {
    /// The push source of sync `name` (`sync_id`), appending to `stream`.
    pub fn new(name: impl Into<String>, sync_id: SyncId, stream: Arc<EmbeddedStream>) -> Self {
        Self {
            name: name.into(),
            sync_id,
            stream,
            accepted: AtomicU64::new(0),
            clock: Arc::new(Mutex::new(Clock(0))),
            writer: None,
            last_failure: Mutex::new(None),
        }
    }

    /// Applies the write-back proxy's changes by POSTing them to `url` (with `secret` as a
    /// bearer token), see [`webhook`].
    pub fn with_webhook(mut self, url: String, secret: Option<secrecy::SecretString>) -> Self {
        self.writer = Some(Arc::new(webhook::WebhookWriter {
            name: self.name.clone(),
            sync_id: self.sync_id,
            url,
            secret,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            stream: self.stream.clone(),
            clock: self.clock.clone(),
        }));
        self
    }

    /// `n` consecutive versions, the first later than any handed out before.
    fn next_versions(&self, n: usize) -> u64 {
        self.clock.lock().unwrap_or_else(|e| e.into_inner()).next(n)
    }

    fn note_failure(&self, failure: Option<String>) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    }
}

/// The push source's clock: the wall clock in nanoseconds, pushed forward when it would
/// repeat or go back.
#[derive(Debug)]
pub(crate) struct Clock(u64);

impl Clock {
    /// `n` consecutive versions, the first later than any handed out before.
    pub(crate) fn next(&mut self, n: usize) -> u64 {
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos().max(0) as u64;
        let first = now.max(self.0 + 1);
        self.0 = first + n as u64;
        first
    }
}

impl std::fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSource")
            .field("name", &self.name)
            .field("sync_id", &self.sync_id)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Health for HttpSource {
    async fn health(&self) -> HealthReport {
        let mut state = HealthState::new(EntityRef {
            kind: EntityKind::Sync,
            name: self.name.clone(),
        });
        let accepted = self.accepted.load(Ordering::Relaxed);
        let failure = self
            .last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (status, message, fix) = match failure {
            None => (
                Status::Healthy,
                format!(
                    "accepting records at POST /v1/syncs/{}/records ({accepted} accepted since start)",
                    self.name
                ),
                None,
            ),
            Some(why) => (
                Status::Warning,
                format!("the last pushed body could not be stored, nothing of it was written: {why}"),
                Some(
                    "senders got 503 and may retry; check the data directory's disk space and permissions"
                        .to_owned(),
                ),
            ),
        };
        state.observe("push", status, message, fix, OffsetDateTime::now_utc());
        state.report()
    }
}

#[async_trait]
impl Source for HttpSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn provider(&self) -> Provider {
        Provider::Http
    }

    /// Nothing to pull: records arrive through [`receive`](Source::receive).
    async fn run(&self, stop: Stop) {
        stop.await;
    }

    /// Collections are whatever pushed records name; none are known ahead.
    async fn collections(&self) -> Result<Vec<CollectionInfo>> {
        Ok(Vec::new())
    }

    async fn check(&self) -> CheckReport {
        let mut report = CheckReport::default();
        report.push(
            "push",
            true,
            format!(
                "records are pushed to POST /v1/syncs/{}/records; nothing upstream to check",
                self.name
            ),
            None,
        );
        report
    }

    async fn plan(&self) -> CheckReport {
        let mut report = CheckReport::default();
        report.push(
            "push",
            true,
            format!(
                "accepts pushed records at POST /v1/syncs/{}/records",
                self.name
            ),
            None,
        );
        report
    }

    fn writer(&self) -> Option<Arc<dyn sluice_core::Writer>> {
        self.writer
            .clone()
            .map(|w| w as Arc<dyn sluice_core::Writer>)
    }

    fn writer_missing(&self) -> String {
        format!(
            "push sync {:?} has no webhook to apply changes; add webhook = {{ url = \"https://…\" }} to its source (docs/proxy.md)",
            self.name
        )
    }

    fn progress(&self) -> SourceProgress {
        let accepted = self.accepted.load(Ordering::Relaxed);
        let mut details = serde_json::Map::new();
        details.insert("accepted".into(), json!(accepted));
        SourceProgress {
            appended: accepted,
            details,
        }
    }

    async fn receive(&self, raw: &[u8]) -> std::result::Result<serde_json::Value, Refused> {
        let parsed = body::parse(raw).map_err(Refused::BadRequest)?;
        let base = self.next_versions(parsed.len());
        let mut records = parsed.records(self.sync_id, base);
        let outcome = match self.stream.append_chunks(&mut records).await {
            Ok(outcome) => outcome,
            Err(e) => {
                self.note_failure(Some(e.to_string()));
                return Err(Refused::Unavailable(e));
            }
        };
        self.note_failure(None);
        self.accepted
            .fetch_add(records.accepted as u64, Ordering::Relaxed);
        Ok(json!({
            "accepted": records.accepted,
            "stale": outcome.skipped_stale,
            "rejected": records.rejected,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn versions_only_move_forward_and_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
        let source = HttpSource::new("s", SyncId::new_random(), stream);
        let first = source.next_versions(3);
        source.clock.lock().unwrap().0 += 1_000_000_000_000; // a clock that went back
        let second = source.next_versions(1);
        assert!(second > first + 3, "{first} then {second}");
    }

    #[tokio::test]
    async fn a_body_of_the_wrong_shape_is_a_bad_request_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
        let source = HttpSource::new("s", SyncId::new_random(), stream.clone());
        match source.receive(b"[]").await {
            Err(Refused::BadRequest(why)) => assert!(why.contains("{\"records\""), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            sluice_core::RecordStream::head(&*stream).await.unwrap().0,
            0
        );
        assert_eq!(source.progress().appended, 0);
    }
}

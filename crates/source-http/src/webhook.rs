//! The writer of a push source: the write-back proxy's changes POSTed to a webhook the user
//! runs (`[sync.source] webhook`), which applies them to the system the records come from.
//!
//! Each change is one request:
//!
//! ```json
//! {"sync": "events", "collection": "signups", "operation": "update", "id": "u1",
//!  "values": {"email": "new@example.com"}}
//! ```
//!
//! with an `Idempotency-Key` header (the same on a retry) and, when a secret is configured,
//! `Authorization: Bearer <secret>`. A `2xx` accepts the change. The answer may carry the
//! record as the system now has it, `{"id": "…", "payload": {…}}`; without one, an insert's
//! record is the values given (its id from the answer or the values), an update's is the
//! record the stream holds with the values set, and a delete is a delete. Any other status
//! refuses the change, with the answer's `{"error": "…"}` (or its text) as the message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};
use sluice_core::{
    Change, CollectionId, Provider, Record, RecordKey, RecordStream, RefusalKind, SyncId,
    UpstreamChange, UpstreamId, Version, WriteOutcome, WriteRefused, Writer, Written,
};
use time::OffsetDateTime;

use crate::Clock;

/// How often an unclear request (no answer, a `5xx`) is sent again, with the same key.
const ATTEMPTS: u32 = 3;

/// POSTs changes to a webhook.
pub struct WebhookWriter {
    pub(crate) name: String,
    pub(crate) sync_id: SyncId,
    pub(crate) url: String,
    pub(crate) secret: Option<SecretString>,
    pub(crate) http: reqwest::Client,
    pub(crate) stream: Arc<dyn RecordStream>,
    pub(crate) clock: Arc<Mutex<Clock>>,
}

impl std::fmt::Debug for WebhookWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookWriter")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

fn refused(kind: RefusalKind, message: impl Into<String>) -> WriteRefused {
    WriteRefused::new(kind, message)
}

impl WebhookWriter {
    /// Sends one change; the record it leaves behind.
    async fn send(
        &self,
        collection: &CollectionId,
        change: &UpstreamChange,
    ) -> Result<(UpstreamId, Option<Map<String, Value>>), WriteRefused> {
        let (operation, id, values) = match change {
            UpstreamChange::Insert { values } => ("insert", None, Some(values)),
            UpstreamChange::Update { id, values } => ("update", Some(id), Some(values)),
            UpstreamChange::Delete { id } => ("delete", Some(id), None),
        };
        let mut fields = Map::new();
        for (name, column) in values.into_iter().flatten() {
            match (name.as_str(), column.to_json()) {
                // A JSON table's `payload` column holds the fields that have no column.
                ("payload", Value::Object(rest)) => fields.extend(rest),
                (_, value) => {
                    fields.insert(name.clone(), value);
                }
            }
        }
        let body = json!({
            "sync": self.name,
            "collection": collection.0,
            "operation": operation,
            "id": id.map(|i| i.0.clone()),
            "values": (operation != "delete").then_some(&fields),
        });
        let key = uuid::Uuid::new_v4().to_string();
        let mut attempt = 0;
        let (status, answer) = loop {
            attempt += 1;
            let mut request = self
                .http
                .post(&self.url)
                .header("Idempotency-Key", &key)
                .json(&body);
            if let Some(secret) = &self.secret {
                request = request.bearer_auth(secret.expose_secret());
            }
            let sent = async {
                let response = request.send().await?;
                let status = response.status().as_u16();
                Ok::<_, reqwest::Error>((status, response.bytes().await?))
            }
            .await;
            match sent {
                Ok((status, _)) if status >= 500 && attempt < ATTEMPTS => {}
                Err(_) if attempt < ATTEMPTS => {}
                Ok(answer) => break answer,
                Err(e) => {
                    return Err(refused(
                        RefusalKind::Unavailable,
                        format!(
                            "the webhook did not answer ({}); it was sent {ATTEMPTS} times with one Idempotency-Key",
                            e.without_url()
                        ),
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        };
        let parsed: Option<Value> = serde_json::from_slice(&answer).ok();
        if !(200..300).contains(&status) {
            let message = parsed
                .as_ref()
                .and_then(|v| v.get("error"))
                .and_then(|e| {
                    e.as_str()
                        .map(str::to_owned)
                        .or_else(|| e.get("message")?.as_str().map(str::to_owned))
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&answer).chars().take(300).collect());
            let kind = if status >= 500 {
                RefusalKind::Unavailable
            } else {
                RefusalKind::Rejected
            };
            return Err(refused(kind, message).code(status.to_string()));
        }
        let answered_id = parsed
            .as_ref()
            .and_then(|v| v.get("id"))
            .and_then(|i| match i {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
        let answered_payload = parsed
            .as_ref()
            .and_then(|v| v.get("payload"))
            .and_then(Value::as_object)
            .cloned();
        match change {
            UpstreamChange::Delete { id } => Ok((id.clone(), None)),
            UpstreamChange::Insert { .. } => {
                let id = answered_id
                    .or_else(|| match fields.get("id") {
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(Value::Number(n)) => Some(n.to_string()),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        refused(
                            RefusalKind::Rejected,
                            "the webhook accepted the insert but named no id; answer with {\"id\": \"…\"} or insert the id column",
                        )
                    })?;
                Ok((UpstreamId(id), Some(answered_payload.unwrap_or(fields))))
            }
            UpstreamChange::Update { id, .. } => {
                let payload = match answered_payload {
                    Some(payload) => payload,
                    None => {
                        let key =
                            RecordKey::new(self.sync_id, collection.0.as_str(), id.0.as_str());
                        let mut current = match self.stream.get(&key).await {
                            Ok(Some(entry)) => match entry.record.change {
                                Change::Upsert { payload } => payload,
                                Change::Delete => Map::new(),
                            },
                            _ => Map::new(),
                        };
                        current.extend(fields);
                        current
                    }
                };
                Ok((id.clone(), Some(payload)))
            }
        }
    }
}

#[async_trait]
impl Writer for WebhookWriter {
    async fn apply(&self, collection: &CollectionId, changes: &[UpstreamChange]) -> WriteOutcome {
        let mut written = Written::default();
        for (applied, change) in changes.iter().enumerate() {
            match self.send(collection, change).await {
                Ok((id, payload)) => {
                    let version = self.clock.lock().unwrap_or_else(|e| e.into_inner()).next(1);
                    written.records.push(Record {
                        key: RecordKey::new(self.sync_id, collection.0.as_str(), id.0.as_str()),
                        provider: Provider::Http,
                        version: Version::new(version, 0),
                        upstream_updated_at: OffsetDateTime::now_utc(),
                        change: match payload {
                            Some(payload) => Change::Upsert { payload },
                            None => Change::Delete,
                        },
                    });
                    written.ids.push(id);
                }
                Err(why) => {
                    return WriteOutcome {
                        written,
                        applied,
                        refused: Some(why),
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

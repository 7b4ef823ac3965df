//! What one account's feed has done, for health and progress.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde_json::json;
use sluice_core::{CollectionId, HealthState, Status, SyncId};
use time::OffsetDateTime;

use crate::feed::Ctx;
use crate::{Collection, Mark};

/// A problem to show: status, message, fix.
pub(crate) type Problem = (Status, String, Option<String>);

/// One account's feed: its identity and what it has done.
#[derive(Debug)]
pub(crate) struct FeedView {
    pub(crate) account: Option<String>,
    pub(crate) sync_id: SyncId,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    collections: BTreeMap<CollectionId, Backfill>,
    cursor: Option<Mark>,
    last_poll: Option<OffsetDateTime>,
    changes_problem: Option<Problem>,
    /// Why every collection is being read again, and since when.
    again: Option<(String, OffsetDateTime)>,
}

#[derive(Debug, Default)]
struct Backfill {
    read: u64,
    done: bool,
    problem: Option<Problem>,
    stopped: bool,
}

impl FeedView {
    pub(crate) fn new(
        account: Option<String>,
        sync_id: SyncId,
        collections: &[Collection],
    ) -> Self {
        let inner = Inner {
            collections: collections
                .iter()
                .map(|c| (c.id.clone(), Backfill::default()))
                .collect(),
            ..Inner::default()
        };
        Self {
            account,
            sync_id,
            inner: Mutex::new(inner),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A page was stored: `read` objects so far, `done` when it was the last.
    pub(crate) fn backfilled(&self, collection: &CollectionId, read: u64, done: bool) {
        self.with(|i| {
            let b = i.collections.entry(collection.clone()).or_default();
            b.read = read;
            b.done = done;
            b.problem = None;
        });
        if done && self.with(|i| i.collections.values().all(|b| b.done)) {
            self.with(|i| i.again = None);
        }
    }

    /// A collection's backfill failed; `stopped` when it will not be retried.
    pub(crate) fn backfill_problem(
        &self,
        collection: &CollectionId,
        problem: Problem,
        stopped: bool,
    ) {
        self.with(|i| {
            let b = i.collections.entry(collection.clone()).or_default();
            b.problem = Some(problem);
            b.stopped = stopped;
        });
    }

    /// A new generation: every collection is read again, because of `why`.
    pub(crate) fn read_again(&self, why: Option<String>, since: OffsetDateTime) {
        self.with(|i| {
            for b in i.collections.values_mut() {
                *b = Backfill::default();
            }
            i.again = why.map(|w| (w, since));
        });
    }

    /// The change feed was read up to `cursor`.
    pub(crate) fn polled(&self, cursor: Option<Mark>) {
        self.with(|i| {
            i.cursor = cursor;
            i.last_poll = Some(OffsetDateTime::now_utc());
            i.changes_problem = None;
        });
    }

    pub(crate) fn changes_problem(&self, problem: Problem) {
        self.with(|i| i.changes_problem = Some(problem));
    }

    fn prefix(&self) -> String {
        self.account
            .as_ref()
            .map(|a| format!("{a} "))
            .unwrap_or_default()
    }

    /// This feed's checks, added to `state`.
    pub(crate) fn observe_into(&self, state: &mut HealthState, ctx: &Ctx, now: OffsetDateTime) {
        let prefix = self.prefix();
        let whose = self
            .account
            .as_ref()
            .map(|a| format!(" of account {a}"))
            .unwrap_or_default();
        self.with(|i| {
            for (id, b) in &i.collections {
                let check = format!("{prefix}backfill {id}");
                let (status, message, fix) = match (&b.problem, b.done) {
                    (Some((status, message, fix)), _) => (
                        *status,
                        if b.stopped {
                            format!("{message}; this collection is stopped until sluice restarts")
                        } else {
                            message.clone()
                        },
                        fix.clone(),
                    ),
                    (None, true) => (
                        Status::Healthy,
                        format!("{id}{whose}: backfilled ({} objects read)", sluice_core::text::thousands(b.read)),
                        None,
                    ),
                    (None, false) => (
                        Status::Initializing,
                        format!("{id}{whose}: backfilling, {} objects read so far", sluice_core::text::thousands(b.read)),
                        None,
                    ),
                };
                state.observe(&check, status, message, fix, now);
            }
            let check = format!("{prefix}changes");
            let (status, message, fix) = match &i.changes_problem {
                Some((status, message, fix)) => (*status, message.clone(), fix.clone()),
                None => match i.last_poll {
                    None => (Status::Initializing, format!("noting the change cursor{whose}"), None),
                    Some(at) => {
                        let cursor = match &i.cursor {
                            Some(m) => format!(
                                "changes read up to {} from {} ({} ago)",
                                m.id,
                                OffsetDateTime::from_unix_timestamp(m.at)
                                    .map(|t| t.to_string())
                                    .unwrap_or_default(),
                                sluice_core::text::duration(std::time::Duration::from_secs((now.unix_timestamp() - m.at).max(0) as u64))
                            ),
                            None => "no changes yet".to_owned(),
                        };
                        (
                            Status::Healthy,
                            format!(
                                "{cursor}{whose}; last successful poll {} ago (every {} ms)",
                                sluice_core::text::duration(std::time::Duration::from_secs_f64((now - at).as_seconds_f64().max(0.0))),
                                ctx.poll_interval.as_millis()
                            ),
                            None,
                        )
                    }
                },
            };
            state.observe(&check, status, message, fix, now);
            if let Some((why, since)) = &i.again {
                state.observe(
                    &format!("{prefix}read again"),
                    Status::Warning,
                    format!("every collection{whose} is being read again (since {since}): {why}"),
                    Some("nothing to do: objects deleted meanwhile get tombstones once their collection is read; to avoid this, keep sluice stopped for less than the provider keeps changes".into()),
                    now,
                );
            }
        });
    }

    /// Progress, for `GET /v1/syncs/{name}`.
    pub(crate) fn progress(&self) -> serde_json::Value {
        self.with(|i| {
            let backfill: serde_json::Map<String, serde_json::Value> = i
                .collections
                .iter()
                .map(|(id, b)| (id.0.clone(), json!({"read": b.read, "done": b.done})))
                .collect();
            json!({
                "sync_id": self.sync_id,
                "backfill": backfill,
                "cursor": i.cursor.as_ref().map(|m| &m.id),
                "last_poll": i.last_poll.map(|t| t.to_string()),
            })
        })
    }
}

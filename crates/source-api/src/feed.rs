//! One account's feed: note the change cursor, backfill each collection page by page, and
//! read the change feed, storing each step's resume state with its records.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_core::{
    Backoff, CollectionId, CollectionSchema, Error, ErrorClass, Payload, Record, RecordKey,
    RecordStream, SourceState, Status, SyncId, Version,
};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::client::{ApiError, Client};
use crate::view::FeedView;
use crate::{Api, Collection, Mark, Update, schema};

/// What every feed of one source shares.
pub(crate) struct Ctx {
    pub(crate) api: Arc<dyn Api>,
    pub(crate) client: Arc<Client>,
    pub(crate) stream: Arc<dyn RecordStream>,
    pub(crate) poll_interval: Duration,
    /// Records appended since start.
    pub(crate) appended: AtomicU64,
    /// Each collection's shape as last stored, by (sync, collection).
    schemas: tokio::sync::Mutex<HashMap<(SyncId, CollectionId), CollectionSchema>>,
}

/// How far the change feed has been read, stored with the changes it covers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct FeedState {
    /// Bumped each time every collection must be read again.
    generation: u64,
    /// The newest change read.
    cursor: Option<Mark>,
    /// The last version's `minor`: one more for each change, and for each noted cursor.
    counter: u64,
    /// The newest change time seen (seconds), so a later backfill's version is above it.
    last_at: i64,
    /// The version of every object backfilled in this generation.
    backfill: (u64, u64),
    /// Why this generation started, when it was not the first.
    why: Option<String>,
    /// When it started (seconds).
    since: i64,
}

/// How far one collection's backfill has read in a generation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct BackfillState {
    generation: u64,
    /// The last ids of the last page read, oldest last: the next page starts after the last
    /// one, or after the one before it if that object was deleted meanwhile.
    anchors: Vec<String>,
    read: u64,
    done: bool,
}

/// How many of a page's last ids are kept as fallbacks for the next page's cursor.
const ANCHORS: usize = 10;

impl Ctx {
    pub(crate) fn new(
        api: Arc<dyn Api>,
        client: Arc<Client>,
        stream: Arc<dyn RecordStream>,
        poll_interval: Duration,
    ) -> Self {
        Self {
            api,
            client,
            stream,
            poll_interval,
            appended: AtomicU64::new(0),
            schemas: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// See [`crate::classify`].
    pub(crate) fn problem(
        &self,
        what: &str,
        permission: &str,
        e: &ApiError,
    ) -> (Status, ErrorClass, String, Option<String>) {
        crate::classify(&*self.api, what, permission, e)
    }

    fn collection(&self, id: &CollectionId) -> Option<&Collection> {
        self.api.collections().iter().find(|c| &c.id == id)
    }

    /// Stores each configured collection's shape (the shipped one, plus columns learned before
    /// a restart) for `sync_id`.
    async fn prepare_schemas(&self, sync_id: SyncId) -> Result<(), Error> {
        let mut schemas = self.schemas.lock().await;
        for c in self.api.collections() {
            let stored = self.stream.collection_schema(sync_id, &c.id).await?;
            let merged = match &stored {
                Some(s) => schema::merge(&c.schema, s),
                None => c.schema.clone(),
            };
            if stored.as_ref() != Some(&merged) {
                self.stream
                    .set_collection_schema(sync_id, &c.id, &merged)
                    .await?;
            }
            schemas.insert((sync_id, c.id.clone()), merged);
        }
        Ok(())
    }

    /// Widens the stored shapes for `records` before they are appended, so a consumer never
    /// sees a field its table has no column for.
    async fn widen(&self, records: &[Record]) -> Result<(), Error> {
        let mut schemas = self.schemas.lock().await;
        let mut changed = Vec::new();
        for r in records {
            let Some(payload) = r.change.payload() else {
                continue;
            };
            let key = (r.key.sync_id, r.key.collection_id.clone());
            let Some(s) = schemas.get_mut(&key) else {
                continue;
            };
            if schema::widen(s, payload) && !changed.contains(&key) {
                changed.push(key);
            }
        }
        for key in changed {
            if let Some(s) = schemas.get(&key) {
                self.stream.set_collection_schema(key.0, &key.1, s).await?;
            }
        }
        Ok(())
    }

    async fn append(
        &self,
        records: Vec<Record>,
        owner: String,
        state: &impl Serialize,
    ) -> Result<(), Error> {
        self.widen(&records).await?;
        let value = serde_json::to_value(state)
            .map_err(|e| Error::invalid(format!("resume state: {e}")))?;
        let outcome = self
            .stream
            .append_with_state(records, Some(SourceState { owner, value }))
            .await?;
        self.appended
            .fetch_add(outcome.appended as u64, Ordering::Relaxed);
        Ok(())
    }
}

fn feed_owner(sync_id: SyncId) -> String {
    format!("{sync_id}/api/changes")
}

fn backfill_owner(sync_id: SyncId, collection: &CollectionId) -> String {
    format!("{sync_id}/api/backfill/{collection}")
}

/// Sleeps `delay`; false when told to stop first.
async fn pause(stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = stop.changed() => false,
        () = tokio::time::sleep(delay) => !*stop.borrow(),
    }
}

/// Runs one account's feed until told to stop.
pub(crate) async fn run(ctx: Arc<Ctx>, view: Arc<FeedView>, mut stop: watch::Receiver<bool>) {
    let account = view.account.clone();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    // The shapes, then the state (noting the cursor on a first start).
    let mut state = loop {
        let attempt = async {
            ctx.prepare_schemas(view.sync_id)
                .await
                .map_err(Failure::Stream)?;
            load_or_note(&ctx, &view).await
        };
        let failure = tokio::select! {
            _ = stop.changed() => return,
            result = attempt => match result {
                Ok(state) => break state,
                Err(f) => f,
            },
        };
        let class = failure.report(&ctx, &view, "noting the change cursor");
        if !pause(&mut stop, backoff.next_delay_after(class)).await {
            return;
        }
    };
    backoff.reset();
    loop {
        view.read_again(
            state.why.clone(),
            OffsetDateTime::from_unix_timestamp(state.since).unwrap_or(OffsetDateTime::UNIX_EPOCH),
        );
        let mut backfills = tokio::task::JoinSet::new();
        let version = Version::new(state.backfill.0, state.backfill.1);
        ctx.stream
            .set_backfilling(view.sync_id, ctx.api.provider(), true);
        for c in ctx.api.collections() {
            backfills.spawn(backfill(
                ctx.clone(),
                view.clone(),
                c.id.clone(),
                state.generation,
                version,
                stop.clone(),
            ));
        }
        let mut delay = Duration::ZERO;
        let expired = loop {
            tokio::select! {
                _ = stop.changed() => {
                    backfills.abort_all();
                    ctx.stream.set_backfilling(view.sync_id, ctx.api.provider(), false);
                    return;
                }
                Some(_) = backfills.join_next() => {
                    if backfills.is_empty() {
                        ctx.stream.set_backfilling(view.sync_id, ctx.api.provider(), false);
                    }
                    continue;
                }
                () = tokio::time::sleep(delay) => {}
            }
            match poll(&ctx, &view, account.as_deref(), &mut state).await {
                Ok(more) => {
                    backoff.reset();
                    delay = if more {
                        Duration::ZERO
                    } else {
                        ctx.poll_interval
                    };
                }
                Err(Failure::Expired(why)) => break why,
                Err(f) => {
                    let class = f.report(&ctx, &view, "reading changes");
                    delay = backoff.next_delay_after(class);
                }
            }
        };
        // The cursor is older than the provider keeps changes: a new generation.
        backfills.abort_all();
        let why = format!(
            "the change cursor {} is no longer kept by {} ({expired}), so changes made meanwhile cannot be read",
            state.cursor.as_ref().map(|m| m.id.as_str()).unwrap_or("-"),
            ctx.api.title()
        );
        tracing::warn!(sync_id = %view.sync_id, "{why}; reading every collection again");
        state = loop {
            let failure = tokio::select! {
                _ = stop.changed() => return,
                result = note(&ctx, &view, Some(&state), Some(why.clone())) => match result {
                    Ok(s) => break s,
                    Err(f) => f,
                },
            };
            let class = failure.report(&ctx, &view, "noting the change cursor again");
            if !pause(&mut stop, backoff.next_delay_after(class)).await {
                return;
            }
        };
    }
}

/// Why a step failed.
enum Failure {
    Api(ApiError),
    Stream(Error),
    /// The change cursor is no longer retained.
    Expired(String),
}

impl Failure {
    /// Shows the failure in health; its retry class.
    fn report(&self, ctx: &Ctx, view: &FeedView, what: &str) -> ErrorClass {
        let (status, class, message, fix) = match self {
            Failure::Api(e) => ctx.problem(what, ctx.api.changes_permission(), e),
            Failure::Stream(e) => (
                Status::Error,
                e.class(),
                format!("{what}: {}", e.problem()),
                e.fix().map(str::to_owned),
            ),
            Failure::Expired(m) => (Status::Warning, ErrorClass::Retry, m.clone(), None),
        };
        view.changes_problem((status, message, fix));
        class
    }
}

async fn load_or_note(ctx: &Ctx, view: &FeedView) -> Result<FeedState, Failure> {
    let stored = ctx
        .stream
        .source_state(&feed_owner(view.sync_id))
        .await
        .map_err(Failure::Stream)?;
    match stored {
        Some(value) => serde_json::from_value(value).map_err(|e| {
            Failure::Stream(Error::invalid(format!(
                "the stored change cursor of sync {} cannot be read ({e}); the data directory is damaged",
                view.sync_id
            )))
        }),
        None => note(ctx, view, None, None).await,
    }
}

/// Notes the change cursor as it is now: a new generation whose backfill version is above
/// every version handed out before, and below every change read after.
async fn note(
    ctx: &Ctx,
    view: &FeedView,
    previous: Option<&FeedState>,
    why: Option<String>,
) -> Result<FeedState, Failure> {
    let mark = ctx
        .api
        .newest_change(&ctx.client, view.account.as_deref())
        .await
        .map_err(Failure::Api)?;
    let counter = previous.map_or(0, |p| p.counter) + 1;
    let last_at = mark
        .as_ref()
        .map_or(0, |m| m.at)
        .max(previous.map_or(0, |p| p.last_at))
        .max(0);
    let state = FeedState {
        generation: previous.map_or(0, |p| p.generation) + 1,
        cursor: mark,
        counter,
        last_at,
        backfill: (last_at as u64, counter),
        why,
        since: OffsetDateTime::now_utc().unix_timestamp(),
    };
    ctx.append(Vec::new(), feed_owner(view.sync_id), &state)
        .await
        .map_err(Failure::Stream)?;
    Ok(state)
}

/// Reads one batch of changes and appends it with the new cursor; whether more are waiting.
async fn poll(
    ctx: &Ctx,
    view: &FeedView,
    account: Option<&str>,
    state: &mut FeedState,
) -> Result<bool, Failure> {
    let page = match ctx
        .api
        .changes(&ctx.client, account, state.cursor.as_ref())
        .await
    {
        Ok(page) => page,
        Err(ApiError::Missing(m)) if state.cursor.is_some() => return Err(Failure::Expired(m)),
        Err(e) => return Err(Failure::Api(e)),
    };
    let mut next = state.clone();
    let mut records = Vec::with_capacity(page.changes.len());
    for change in page.changes {
        let Some(collection) = ctx.collection(&change.collection) else {
            continue;
        };
        let at = change.at.unix_timestamp().max(0);
        next.counter += 1;
        next.last_at = next.last_at.max(at);
        let payload: Option<Payload> = match change.update {
            Update::Upsert(p) => Some(p),
            Update::Delete => None,
            Update::Refetch => ctx
                .api
                .fetch(&ctx.client, account, collection, &change.id)
                .await
                .map_err(Failure::Api)?,
        };
        records.push(Record {
            key: RecordKey::new(view.sync_id, change.collection, change.id),
            provider: ctx.api.provider(),
            version: Version::new(at as u64, next.counter),
            upstream_updated_at: change.at,
            change: match payload {
                Some(payload) => sluice_core::Change::Upsert { payload },
                None => sluice_core::Change::Delete,
            },
        });
    }
    if let Some(newest) = page.newest {
        next.cursor = Some(newest);
    }
    if next != *state {
        ctx.append(records, feed_owner(view.sync_id), &next)
            .await
            .map_err(Failure::Stream)?;
        *state = next;
    }
    view.polled(state.cursor.clone());
    Ok(page.more)
}

/// Backfills one collection in generation `generation`, resuming where its stored state
/// says; every object carries `version`. Ends when the collection is read, or when its
/// error cannot be retried (health says which and why).
async fn backfill(
    ctx: Arc<Ctx>,
    view: Arc<FeedView>,
    id: CollectionId,
    generation: u64,
    version: Version,
    mut stop: watch::Receiver<bool>,
) {
    let Some(collection) = ctx.collection(&id).cloned() else {
        return;
    };
    let owner = backfill_owner(view.sync_id, &id);
    let what = format!("reading {id}");
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    let mut state = loop {
        match ctx.stream.source_state(&owner).await {
            Ok(stored) => {
                break stored
                    .and_then(|v| serde_json::from_value::<BackfillState>(v).ok())
                    .filter(|s| s.generation == generation)
                    .unwrap_or(BackfillState {
                        generation,
                        ..BackfillState::default()
                    });
            }
            Err(e) => {
                view.backfill_problem(
                    &id,
                    (Status::Error, format!("{what}: {}", e.problem()), None),
                    false,
                );
                if !pause(&mut stop, backoff.next_delay_after(e.class())).await {
                    return;
                }
            }
        }
    };
    view.backfilled(&id, state.read, state.done);
    while !state.done {
        let after = state.anchors.last().cloned();
        let result = ctx
            .api
            .page(
                &ctx.client,
                view.account.as_deref(),
                &collection,
                after.as_deref(),
            )
            .await;
        let page = match result {
            Ok(page) => page,
            Err(ApiError::Missing(_)) if after.is_some() => {
                // The object the next page starts after was deleted: start after the one
                // before it (objects read twice are skipped by the version guard).
                state.anchors.pop();
                continue;
            }
            Err(e) => {
                let (status, class, message, fix) = ctx.problem(&what, &collection.permission, &e);
                let stopped = class == ErrorClass::GiveUp;
                view.backfill_problem(&id, (status, message, fix), stopped);
                if stopped || !pause(&mut stop, backoff.next_delay_after(class)).await {
                    return;
                }
                continue;
            }
        };
        if page.items.is_empty() && page.more {
            let e = ApiError::Malformed(format!("a page of {id} with no objects says more follow"));
            let (status, class, message, fix) = ctx.problem(&what, &collection.permission, &e);
            view.backfill_problem(&id, (status, message, fix), false);
            if !pause(&mut stop, backoff.next_delay_after(class)).await {
                return;
            }
            continue;
        }
        let mut next = state.clone();
        next.read += page.items.len() as u64;
        if !page.items.is_empty() {
            let from = page.items.len().saturating_sub(ANCHORS);
            next.anchors = page.items[from..].iter().map(|i| i.id.clone()).collect();
        }
        let records: Vec<Record> = page
            .items
            .into_iter()
            .map(|item| Record {
                key: RecordKey::new(view.sync_id, id.clone(), item.id),
                provider: ctx.api.provider(),
                version,
                upstream_updated_at: item.created,
                change: sluice_core::Change::Upsert {
                    payload: item.payload,
                },
            })
            .collect();
        let stored = async {
            ctx.append(records, owner.clone(), &next).await?;
            if !page.more {
                // Objects this generation did not see (and no change has touched since the
                // cursor was noted) were deleted upstream.
                ctx.stream
                    .tombstone_collection(view.sync_id, &id, version, OffsetDateTime::now_utc())
                    .await?;
                next.done = true;
                ctx.append(Vec::new(), owner.clone(), &next).await?;
            }
            Ok::<(), Error>(())
        };
        match stored.await {
            Ok(()) => {
                backoff.reset();
                state = next;
                view.backfilled(&id, state.read, state.done);
            }
            Err(e) => {
                view.backfill_problem(
                    &id,
                    (
                        Status::Error,
                        format!("{what}: {}", e.problem()),
                        e.fix().map(str::to_owned),
                    ),
                    false,
                );
                if !pause(&mut stop, backoff.next_delay_after(e.class())).await {
                    return;
                }
            }
        }
        if *stop.borrow() {
            return;
        }
    }
}

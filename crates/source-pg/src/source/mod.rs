//! The running source: backfill and change stream side by side, appending to the records
//! stream and confirming the slot only after the stream has committed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::{
    Backoff, CollectionId, EntityKind, EntityRef, Error, ErrorClass, HealthState, RecordStream,
    SyncId, TextBatch,
};
use sluice_pg::ConnectionSettings;
use sqlx::PgConnection;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::pgoutput::{self, Message};
use crate::tables::{self, BackfillProgress, Table, TableRereads, Watermarks};
use crate::values::TypeMap;
use crate::wire::{Lsn, Replication, ReplicationConnection, SILENCE_LIMIT};
use crate::{SourceSpec, ensure_publication_and_slot};

mod contract;
mod decode;
mod health;
mod reads;
mod streaming;

use streaming::{KeyRereads, Streaming};

/// Parallel backfill readers when the configuration does not say.
pub const DEFAULT_BACKFILL_READERS: usize = 1;

/// Most replication messages handed from the reading task to the session at once.
const READ_BATCH: usize = 256;

/// Most replication messages read ahead of the session.
const QUEUED: usize = 4096;

/// Tuning for a Postgres source; the defaults suit most databases.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Most records per stream append.
    pub batch_max: usize,
    /// Longest a change waits for more before it is appended.
    pub batch_wait: Duration,
    /// Rows per backfill page.
    pub backfill_page: usize,
    /// Connections that read a table's backfill in parallel, each its own key range.
    pub backfill_readers: usize,
    /// How often to emit a heartbeat into the source's WAL (and report position).
    pub heartbeat: Duration,
    /// Slot lag (bytes of WAL the slot holds) above which health is `warning`.
    pub slot_lag_warning_bytes: u64,
    /// Create the publication and slot when missing.
    pub create_missing: bool,
    /// How the write-back proxy's writer connects (the writer role); `None`: no writes.
    pub writer: Option<ConnectionSettings>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            batch_max: 10_000,
            batch_wait: Duration::from_millis(20),
            backfill_page: 5_000,
            backfill_readers: DEFAULT_BACKFILL_READERS,
            heartbeat: Duration::from_secs(10),
            slot_lag_warning_bytes: 1 << 30,
            create_missing: false,
            writer: None,
        }
    }
}

/// A PostgreSQL source feeding the records stream.
#[derive(Clone)]
pub struct PostgresSource {
    inner: Arc<Inner>,
}

struct Inner {
    sync_id: SyncId,
    name: String,
    settings: ConnectionSettings,
    spec: SourceSpec,
    stream: Arc<dyn RecordStream>,
    options: SourceOptions,
    status: Mutex<SourceStatus>,
    progress: Mutex<BackfillProgress>,
    health: Mutex<HealthState>,
    /// Changes appended by the change stream (the backfill counts in `progress`).
    streamed: std::sync::atomic::AtomicU64,
    /// Shared by the backfill and the change stream (see `tables::Watermarks`).
    watermarks: Watermarks,
    /// Tables to read again whole (a column added with a default).
    rereads: TableRereads,
    /// Tables the backfill could not read, with the error and its fix.
    unreadable: Mutex<std::collections::BTreeMap<String, Error>>,
    /// The write-back proxy's writer, when a writer role is configured.
    writer: Option<Arc<crate::writer::PgWriter>>,
}

#[derive(Default)]
struct SourceStatus {
    streaming: bool,
    last_error: Option<Error>,
    last_activity: Option<OffsetDateTime>,
    confirmed: Lsn,
    notices: Vec<String>,
    /// WAL the slot held at the last health check, in bytes.
    slot_retained_bytes: Option<u64>,
}

impl std::fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSource")
            .field("name", &self.inner.name)
            .field("endpoint", &self.inner.settings.endpoint())
            .finish_non_exhaustive()
    }
}

impl PostgresSource {
    /// A source for sync `name` (`sync_id`) reading `spec` from the database `settings` names.
    pub fn new(
        name: impl Into<String>,
        sync_id: SyncId,
        settings: ConnectionSettings,
        spec: SourceSpec,
        stream: Arc<dyn RecordStream>,
        options: SourceOptions,
    ) -> Self {
        let name = name.into();
        let health = HealthState::new(EntityRef {
            kind: EntityKind::Sync,
            name: name.clone(),
        });
        let writer = options
            .writer
            .clone()
            .map(|settings| Arc::new(crate::writer::PgWriter::new(sync_id, settings)));
        Self {
            inner: Arc::new(Inner {
                writer,
                sync_id,
                name,
                settings,
                spec,
                stream,
                options,
                status: Mutex::new(SourceStatus::default()),
                progress: Mutex::new(BackfillProgress::default()),
                health: Mutex::new(health),
                streamed: std::sync::atomic::AtomicU64::new(0),
                watermarks: Watermarks::default(),
                rereads: TableRereads::new(format!("{}/reread", sync_id.0)),
                unreadable: Mutex::new(Default::default()),
            }),
        }
    }

    /// The backfill's progress.
    pub fn backfill_progress(&self) -> BackfillProgress {
        self.inner
            .progress
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    /// Records appended to the stream since start: backfilled rows and streamed changes.
    pub fn appended(&self) -> u64 {
        self.backfill_progress().total_rows
            + self
                .inner
                .streamed
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The slot position confirmed to the source so far.
    pub fn confirmed(&self) -> String {
        self.status(|s| s.confirmed.to_string())
    }

    fn status<T>(&self, f: impl FnOnce(&mut SourceStatus) -> T) -> T {
        let mut guard = self.inner.status.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Runs until `shutdown` turns true: backfills what has not been read, streams changes,
    /// and reconnects with backoff after any failure (a restarted source loses nothing: the
    /// slot replays from the last confirmed position and the stream skips what it holds).
    /// [`Source::run`](sluice_core::Source::run) with a tokio switch instead of a future.
    pub async fn run_until(&self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        while !*shutdown.borrow() {
            let started = Instant::now();
            let result = self.session(&mut shutdown).await;
            self.status(|s| s.streaming = false);
            match result {
                Ok(()) => return,
                Err(e) => {
                    let e = self.first_cause(e).await;
                    let class = e.class();
                    if class == ErrorClass::GiveUp {
                        // The same data would be refused again: stop, loudly, and keep the
                        // slot where it is (nothing after the last confirmed change is lost).
                        tracing::error!(sync = %self.inner.name, error = %e, "source stopped: not retried until sluice restarts");
                        self.status(|s| s.last_error = Some(e));
                        let _ = shutdown.wait_for(|stop| *stop).await;
                        return;
                    }
                    tracing::warn!(sync = %self.inner.name, error = %e, "source session ended; reconnecting");
                    self.status(|s| s.last_error = Some(e));
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay_after(class);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }

    /// A configuration error as the session met it may be a consequence (no slot, when the
    /// slot cannot exist because `wal_level` is not `logical`): the first failing check of the
    /// prerequisite report (`sluice source check`) names the cause and its fix instead.
    async fn first_cause(&self, e: Error) -> Error {
        if e.class() != ErrorClass::FixConfiguration {
            return e;
        }
        let report = crate::check(&self.inner.settings, &self.inner.spec).await;
        // Tables fail alone (see `tables`): only what stops the whole session counts here.
        let first = report
            .findings
            .into_iter()
            .find(|f| !f.ok && !f.check.starts_with("table") && f.check != "partitioned tables");
        match first {
            Some(f) => Error::configuration(
                format!("{}: {}", f.check, f.message),
                f.fix
                    .unwrap_or_else(|| "run `sluice source check` for every prerequisite".into()),
            ),
            None => e,
        }
    }

    async fn session(&self, shutdown: &mut watch::Receiver<bool>) -> Result<(), Error> {
        let inner = &self.inner;
        let mut conn = connect(&inner.settings).await?;
        if inner.options.create_missing {
            for step in ensure_publication_and_slot(&inner.settings, &inner.spec).await? {
                tracing::info!(sync = %inner.name, "{step}");
            }
        } else {
            ensure_slot_exists(&mut conn, &inner.spec).await?;
        }
        let mut types = Arc::new(TypeMap::load(&mut conn).await.map_err(db)?);
        let mut tables = Vec::new();
        self.add_published(&mut conn, &mut tables, &mut types, true)
            .await?;

        // Logical decoding messages reach pgoutput from PostgreSQL 14 (before, the watermarks
        // are passed by commits and keepalives: see `tables::Watermarks`).
        let messages = sluice_pg::catalog::server_facts(&mut conn)
            .await
            .map_err(db)?
            .major_version()
            >= 14;
        let mut backfill = Some(self.spawn_backfill(types.clone(), tables.clone()));

        let mut repl = ReplicationConnection::connect(&inner.settings).await?;
        repl.start_replication(&inner.spec.slot, &inner.spec.publication, Lsn(0), messages)
            .await?;
        let (mut reader, mut writer) = repl.split();
        // Messages go to the session in batches: every message one read of the socket
        // brought, up to `READ_BATCH`. One hand-over (and one turn of the loop below, with
        // its timers) per batch rather than per change.
        let (tx, mut rx) = mpsc::channel::<Vec<Result<Incoming, Error>>>(QUEUED / READ_BATCH);
        let reader_task = tokio::spawn(async move {
            loop {
                let mut batch: Vec<Result<Incoming, Error>> = Vec::with_capacity(READ_BATCH);
                // Until an error, which ends the batch and the task.
                while batch.last().is_none_or(Result::is_ok)
                    && (batch.is_empty() || (batch.len() < READ_BATCH && reader.has_message()))
                {
                    let item = match tokio::time::timeout(SILENCE_LIMIT, reader.next()).await {
                        Err(_) => Err(Error::unavailable(
                            format!("source: no message for {}s", SILENCE_LIMIT.as_secs()),
                            "replication silent",
                        )),
                        Ok(Ok(None)) => Err(Error::unavailable(
                            "source: the server ended replication",
                            "replication ended",
                        )),
                        Ok(Ok(Some(Replication::Keepalive { end, reply }))) => {
                            Ok(Incoming::Keepalive { end, reply })
                        }
                        Ok(Ok(Some(Replication::Data { payload }))) => {
                            pgoutput::decode(payload).map(Incoming::Message)
                        }
                        Ok(Err(e)) => Err(e),
                    };
                    batch.push(item);
                }
                let stop = batch.last().is_some_and(Result::is_err);
                if tx.send(batch).await.is_err() || stop {
                    return;
                }
            }
        });
        let _reader = Aborting(reader_task);
        self.status(|s| {
            s.streaming = true;
            s.last_error = None;
        });
        tracing::info!(sync = %inner.name, slot = %inner.spec.slot, "source: streaming");

        let mut state = Streaming {
            source: self,
            relations: HashMap::new(),
            tables: tables.iter().map(|t| (t.oid, t.clone())).collect(),
            pending: TextBatch::default(),
            pending_since: None,
            txn: None,
            committed: None,
            confirmed: Lsn(0),
            heartbeat_at: None,
            rereads: KeyRereads::default(),
            reread_running: None,
            last_append: Duration::ZERO,
        };
        let mut reread: Option<Aborting<Result<usize, Error>>> = None;
        let mut ticker = tokio::time::interval(inner.options.heartbeat);
        loop {
            let deadline = state
                .pending_since
                .map(|t| tokio::time::Instant::from_std(t + inner.options.batch_wait));
            tokio::select! {
                _ = shutdown.changed() => {
                    state.flush(&mut writer).await?;
                    return Ok(());
                }
                finished = async { (&mut backfill.as_mut().expect("guarded").0).await }, if backfill.is_some() => {
                    backfill = None;
                    match finished {
                        Ok(Ok(())) => tracing::info!(sync = %inner.name, "backfill complete"),
                        Ok(Err(e)) => return Err(e),
                        Err(e) => return Err(Error::unavailable("source: the backfill task failed", e)),
                    }
                }
                finished = async { (&mut reread.as_mut().expect("guarded").0).await }, if reread.is_some() => {
                    reread = None;
                    state.reread_running = None;
                    match finished {
                        Ok(Ok(n)) => tracing::debug!(sync = %inner.name, rows = n, "source: rows re-read for unchanged TOAST values"),
                        Ok(Err(e)) => return Err(e),
                        Err(e) => return Err(Error::unavailable("source: a re-read task failed", e)),
                    }
                    state.flush(&mut writer).await?;
                }
                _ = inner.watermarks.wanted() => {
                    writer.request_keepalive(state.confirmed).await?;
                }
                _ = ticker.tick() => {
                    state.flush(&mut writer).await?;
                    writer.send_status(state.confirmed).await?;
                    if state.heartbeat_at.is_none() {
                        state.heartbeat_at = emit_heartbeat(&mut conn).await;
                    }
                    // Columns added without a change since (no relation message announces
                    // them): found by the catalog, re-read when they hold values.
                    self.find_added_columns(&mut conn, &mut tables).await?;
                    // A table added to the publication since, a table asked to be read again,
                    // or one that could not be read: read now, beside the changes already
                    // streaming for it (one backfill at a time).
                    if backfill.is_none() {
                        let added = self.add_published(&mut conn, &mut tables, &mut types, false).await?;
                        let pending = !inner.rereads.load(&inner.stream).await?.is_empty()
                            || self.has_unreadable();
                        if added || pending {
                            for t in &tables {
                                state.tables.entry(t.oid).or_insert_with(|| t.clone());
                            }
                            backfill = Some(self.spawn_backfill(types.clone(), tables.clone()));
                        }
                    }
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    state.flush(&mut writer).await?;
                }
                batch = rx.recv() => {
                    let Some(batch) = batch else {
                        return Err(Error::unavailable("source: replication reader stopped", "reader"));
                    };
                    let last = batch.len().saturating_sub(1);
                    for (i, item) in batch.into_iter().enumerate() {
                        match item? {
                            Incoming::Keepalive { end, reply } => {
                                inner.watermarks.passed(end);
                                if state.txn.is_none() && state.pending.is_empty() {
                                    state.committed = Some(state.committed.map_or(end, |c| c.max(end)));
                                }
                                if state.heartbeat_at.is_some_and(|h| h <= end) {
                                    state.heartbeat_at = None;
                                    self.status(|s| s.last_activity = Some(OffsetDateTime::now_utc()));
                                }
                                if reply {
                                    state.flush(&mut writer).await?;
                                    writer.send_status(state.confirmed).await?;
                                }
                            }
                            Incoming::Message(Message::Relation(rel)) => {
                                if rel.columns.iter().any(|c| types.get(c.type_oid).is_none()) {
                                    types = Arc::new(TypeMap::load(&mut conn).await.map_err(db)?);
                                }
                                let table = tables::describe_sent(&mut conn, &rel).await?;
                                if let Some(t) = table.as_ref().filter(|t| !t.key.is_empty()) {
                                    // Before any change that uses the new shape is appended.
                                    state.flush_records().await?;
                                    self.describe_collection(&mut conn, t).await?;
                                    if let Some(known) = tables.iter_mut().find(|k| k.oid == t.oid) {
                                        self.reread_if_columns_need_it(known, t).await?;
                                        *known = t.clone();
                                    }
                                }
                                state.relation(rel, table, &types);
                            }
                            Incoming::Message(message) => {
                                // A committed transaction is appended at once, or with the ones
                                // queued right behind it (see `Streaming::append_now`).
                                state.handle(message, &mut writer, i == last && rx.is_empty()).await?;
                            }
                        }
                        if reread.is_none() && !state.rereads.queue.is_empty() {
                            // The records before (the old key's delete among them) go first.
                            state.flush_records().await?;
                            let queued = std::mem::take(&mut state.rereads);
                            state.reread_running = queued.hold;
                            reread = Some(self.spawn_reread(types.clone(), queued));
                        }
                    }
                }
            }
        }
    }

    /// Adds the publication's tables missing from `tables`, described, with their shapes
    /// stored for layouts that mirror them (reloading `types` when a column's type is new).
    /// Returns whether any was added.
    async fn add_published(
        &self,
        conn: &mut PgConnection,
        tables: &mut Vec<Table>,
        types: &mut Arc<TypeMap>,
        initial: bool,
    ) -> Result<bool, Error> {
        let mut added = false;
        for (schema, name) in tables::published(conn, &self.inner.spec.publication).await? {
            if tables.iter().any(|t| t.schema == schema && t.name == name) {
                continue;
            }
            let Some(t) = tables::describe(conn, None, &schema, &name).await? else {
                continue;
            };
            if t.key.is_empty() {
                self.notice(format!(
                    "{} has no primary key or replica identity index: its rows cannot be identified and are skipped (add a primary key)",
                    t.collection()
                ));
            } else {
                if t.columns.iter().any(|c| types.get(c.type_oid).is_none()) {
                    *types = Arc::new(TypeMap::load(conn).await.map_err(db)?);
                }
                self.describe_collection(conn, &t).await?;
            }
            if !initial {
                tracing::info!(sync = %self.inner.name, collection = %t.collection(), "source: a table was added to the publication; reading its rows");
            }
            tables.push(t);
            added = true;
        }
        Ok(added)
    }

    /// Stores the table's shape in the stream for layouts that mirror it (only when it changed).
    async fn describe_collection(
        &self,
        conn: &mut PgConnection,
        table: &Table,
    ) -> Result<(), Error> {
        let schema = tables::collection_schema(conn, table).await?;
        let collection = CollectionId(table.collection());
        let stream = &self.inner.stream;
        if stream
            .collection_schema(self.inner.sync_id, &collection)
            .await?
            .as_ref()
            != Some(&schema)
        {
            stream
                .set_collection_schema(self.inner.sync_id, &collection, &schema)
                .await?;
        }
        Ok(())
    }

    fn notice(&self, text: String) {
        self.status(|s| {
            if !s.notices.contains(&text) {
                tracing::warn!(sync = %self.inner.name, "{text}");
                s.notices.push(text);
            }
        });
    }
}

enum Incoming {
    Keepalive { end: Lsn, reply: bool },
    Message(Message),
}

/// A task of the session (the replication reader, a backfill), stopped when the session ends.
struct Aborting<T>(tokio::task::JoinHandle<T>);
impl<T> Drop for Aborting<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn connect(settings: &ConnectionSettings) -> Result<PgConnection, Error> {
    let mut conn = settings.connect().await?;
    // The same text forms pgoutput uses, whatever the role's defaults are. This session only
    // reads and writes markers (watermarks, heartbeats): they need not wait for standbys.
    sqlx::raw_sql(
        "set timezone = 'UTC'; set datestyle = 'ISO'; set intervalstyle = 'postgres'; \
         set extra_float_digits = 3; set bytea_output = 'hex'; set synchronous_commit = local",
    )
    .execute(&mut conn)
    .await
    .map_err(db)?;
    Ok(conn)
}

fn db(e: sqlx::Error) -> Error {
    sluice_pg::classify(e, "source: a query on the source", |_, _| None)
}

async fn ensure_slot_exists(conn: &mut PgConnection, spec: &SourceSpec) -> Result<(), Error> {
    let exists = sqlx::query_scalar!(
        r#"select exists (select 1 from pg_replication_slots where slot_name = $1 and database = current_database()) as "e!""#,
        spec.slot
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    if exists {
        Ok(())
    } else {
        Err(Error::configuration(
            format!(
                "replication slot {} does not exist in this database",
                spec.slot
            ),
            format!(
                "select pg_create_logical_replication_slot({}, 'pgoutput');  -- after creating the publication; or set create_missing = true",
                sluice_core::sql::quote_literal(&spec.slot)
            ),
        ))
    }
}

/// Writes a small non-transactional message into the source's WAL and returns its position.
/// When the change stream passes it, the whole path (WAL, decoding, network) is known to work
/// even if no table changes. `None` if the role may not emit messages.
async fn emit_heartbeat(conn: &mut PgConnection) -> Option<Lsn> {
    let lsn = sqlx::query_scalar!(
        r#"select pg_logical_emit_message(false, 'sluice_heartbeat', '')::text as "l!""#
    )
    .fetch_one(conn)
    .await
    .ok()?;
    lsn.parse().ok()
}

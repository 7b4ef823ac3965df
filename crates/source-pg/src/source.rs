//! The running source: backfill and change stream side by side, appending to the records
//! stream and confirming the slot only after the stream has committed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sluice_core::{
    Backoff, Change, CollectionId, EntityKind, EntityRef, Error, ErrorClass, Health, HealthReport,
    HealthState, Payload, Provider, Record, RecordKey, RecordStream, Status, SyncId, Version,
};
use sluice_target_pg::ConnectionSettings;
use sqlx::PgConnection;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

use crate::pgoutput::{self, Message, Relation, Value};
use crate::tables::{self, Backfill, BackfillProgress, Table, TableRereads, Watermarks};
use crate::values::TypeMap;
use crate::wire::{Lsn, Replication, ReplicationConnection, SILENCE_LIMIT, StatusWriter};
use crate::{SourceSpec, ensure_publication_and_slot};

/// Tuning for a Postgres source; the defaults suit most databases.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Most records per stream append.
    pub batch_max: usize,
    /// Longest a change waits for more before it is appended.
    pub batch_wait: Duration,
    /// Rows per backfill page.
    pub backfill_page: usize,
    /// How often to emit a heartbeat into the source's WAL (and report position).
    pub heartbeat: Duration,
    /// Slot lag (bytes of WAL the slot holds) above which health is `warning`.
    pub slot_lag_warning_bytes: u64,
    /// Create the publication and slot when missing.
    pub create_missing: bool,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            batch_max: 10_000,
            batch_wait: Duration::from_millis(20),
            backfill_page: 5_000,
            heartbeat: Duration::from_secs(10),
            slot_lag_warning_bytes: 1 << 30,
            create_missing: false,
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
}

#[derive(Default)]
struct SourceStatus {
    streaming: bool,
    last_error: Option<Error>,
    last_activity: Option<OffsetDateTime>,
    confirmed: Lsn,
    notices: Vec<String>,
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
        Self {
            inner: Arc::new(Inner {
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
    pub fn progress(&self) -> BackfillProgress {
        self.inner
            .progress
            .lock()
            .map(|p| p.clone())
            .unwrap_or_default()
    }

    /// Records appended to the stream since start: backfilled rows and streamed changes.
    pub fn appended(&self) -> u64 {
        self.progress().total_rows
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
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        while !*shutdown.borrow() {
            let started = Instant::now();
            let result = self.session(&mut shutdown).await;
            self.status(|s| s.streaming = false);
            match result {
                Ok(()) => return,
                Err(e) => {
                    let e = self.first_cause(e).await;
                    tracing::warn!(sync = %self.inner.name, error = %e, "source session ended; reconnecting");
                    self.status(|s| s.last_error = Some(e));
                    if started.elapsed() > Duration::from_secs(60) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
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

        // Logical decoding messages reach pgoutput from PostgreSQL 14: the backfill's
        // watermarks need them.
        let messages = sluice_target_pg::catalog::server_facts(&mut conn)
            .await
            .map_err(db)?
            .major_version()
            >= 14;
        let mut backfill = Some(self.spawn_backfill(types.clone(), tables.clone(), messages));

        let mut repl = ReplicationConnection::connect(&inner.settings).await?;
        repl.start_replication(&inner.spec.slot, &inner.spec.publication, Lsn(0), messages)
            .await?;
        let (mut reader, mut writer) = repl.split();
        let (tx, mut rx) = mpsc::channel::<Result<Incoming, Error>>(4096);
        let reader_task = tokio::spawn(async move {
            loop {
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
                        pgoutput::decode(&payload).map(Incoming::Message)
                    }
                    Ok(Err(e)) => Err(e),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
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
            pending: Vec::new(),
            pending_since: None,
            txn: None,
            committed: None,
            confirmed: Lsn(0),
            heartbeat_at: None,
            messages,
            rereads: KeyRereads::default(),
            reread_running: None,
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
                _ = ticker.tick() => {
                    state.flush(&mut writer).await?;
                    writer.send_status(state.confirmed).await?;
                    if state.heartbeat_at.is_none() {
                        state.heartbeat_at = emit_heartbeat(&mut conn).await;
                    }
                    // Columns added without a change since (no relation message announces
                    // them): found by the catalog, re-read when they hold values.
                    self.find_added_columns(&mut conn, &mut state, &mut tables).await?;
                    // A table added to the publication since, a table asked to be read again,
                    // or one that could not be read: read now, beside the changes already
                    // streaming for it (one backfill at a time).
                    if backfill.is_none() {
                        let added = self.add_published(&mut conn, &mut tables, &mut types, false).await?;
                        let pending = !inner.rereads.load(&inner.stream).await?.is_empty()
                            || !self.unreadable().is_empty();
                        if added || pending {
                            for t in &tables {
                                state.tables.entry(t.oid).or_insert_with(|| t.clone());
                            }
                            backfill = Some(self.spawn_backfill(types.clone(), tables.clone(), messages));
                        }
                    }
                }
                _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    state.flush(&mut writer).await?;
                }
                item = rx.recv() => {
                    let Some(item) = item else {
                        return Err(Error::unavailable("source: replication reader stopped", "reader"));
                    };
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
                            let table = tables::describe(&mut conn, Some(rel.id), &rel.schema, &rel.name).await?;
                            if let Some(t) = table.as_ref().filter(|t| !t.key.is_empty()) {
                                // Before any change that uses the new shape is appended.
                                state.flush_records().await?;
                                self.describe_collection(&mut conn, t).await?;
                                if let Some(before) = state.tables.get(&rel.id) {
                                    self.reread_if_columns_need_it(before, t).await?;
                                }
                                if let Some(known) = tables.iter_mut().find(|k| k.oid == t.oid) {
                                    *known = t.clone();
                                }
                            }
                            state.relation(rel, table);
                        }
                        Incoming::Message(message) => {
                            state.handle(message, &types, &mut writer).await?;
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

    /// Starts reading every table of `tables` the stored backfill state has not finished. The
    /// change stream logs what it sees while this runs, for the watermarks (PostgreSQL 14+).
    fn spawn_backfill(
        &self,
        types: Arc<TypeMap>,
        tables: Vec<Table>,
        messages: bool,
    ) -> Aborting<Result<(), Error>> {
        // Logged from before the first page is read: a change that page cannot see may
        // arrive before the page does.
        let logging = messages.then(|| WatermarkUse::new(self));
        let backfilling = Backfilling::new(self);
        let this = self.clone();
        Aborting(tokio::spawn(async move {
            let _backfilling = backfilling;
            let mut conn = connect(&this.inner.settings).await?;
            this.backfill(&types, logging.is_some())
                .run(&mut conn, &tables)
                .await
        }))
    }

    /// Reads the queued rows again (their unchanged TOAST values were nowhere in the stream)
    /// and appends them; the slot is held before their changes until this has finished.
    fn spawn_reread(
        &self,
        types: Arc<TypeMap>,
        queued: KeyRereads,
    ) -> Aborting<Result<usize, Error>> {
        let this = self.clone();
        Aborting(tokio::spawn(async move {
            let logging = queued.logging;
            let mut conn = connect(&this.inner.settings).await?;
            let backfill = this.backfill(&types, logging.is_some());
            let mut appended = 0;
            for (table, keys) in queued.queue.values() {
                let keys: Vec<Vec<String>> = keys.iter().cloned().collect();
                match backfill.reread_keys(&mut conn, table, &keys).await {
                    Ok(n) => appended += n,
                    Err(e) if e.class() == ErrorClass::FixConfiguration => {
                        // The table cannot be read at all: it is read whole once it can be,
                        // which covers these rows (and stamps them later than their changes).
                        let collection = table.collection();
                        tracing::warn!(sync = %this.inner.name, collection, error = %e, "source: cannot read rows again");
                        this.inner
                            .rereads
                            .request(&this.inner.stream, &collection)
                            .await?;
                        backfill.set_unreadable(&collection, Some(e));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(appended)
        }))
    }

    fn backfill<'a>(&'a self, types: &'a TypeMap, watermarked: bool) -> Backfill<'a> {
        let inner = &self.inner;
        Backfill {
            sync_id: inner.sync_id,
            stream: &inner.stream,
            types,
            page: inner.options.backfill_page,
            owner: format!("{}/backfill", inner.sync_id.0),
            progress: &inner.progress,
            watermarks: watermarked.then_some(&inner.watermarks),
            rereads: &inner.rereads,
            role: &inner.settings.user,
            unreadable: &inner.unreadable,
        }
    }

    /// Tables the backfill could not read, by collection, with the error.
    fn unreadable(&self) -> Vec<(String, String, Option<String>)> {
        self.inner
            .unreadable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(c, e)| (c.clone(), e.to_string(), e.fix().map(str::to_owned)))
            .collect()
    }

    /// Asks for `now`'s table to be read again when it gained columns that hold values no
    /// change carried (see [`Table::columns_with_values_no_change_carried`]).
    async fn reread_if_columns_need_it(&self, before: &Table, now: &Table) -> Result<(), Error> {
        let added = now.columns_with_values_no_change_carried(before);
        if !added.is_empty() {
            tracing::info!(
                sync = %self.inner.name,
                collection = %now.collection(),
                columns = ?added,
                "source: columns added with a default; reading the table again for their values"
            );
            self.inner
                .rereads
                .request(&self.inner.stream, &now.collection())
                .await?;
        }
        Ok(())
    }

    /// Compares the known tables' columns with the catalog (one query), and handles a table
    /// whose columns changed with no change sent since: its shape is stored, and it is read
    /// again when a new column holds values.
    async fn find_added_columns(
        &self,
        conn: &mut PgConnection,
        state: &mut Streaming<'_>,
        tables: &mut [Table],
    ) -> Result<(), Error> {
        let oids: Vec<i64> = tables.iter().map(|t| i64::from(t.oid)).collect();
        let counts = tables::column_counts(conn, &oids).await?;
        for known in tables.iter_mut() {
            if counts
                .get(&known.oid)
                .copied()
                .unwrap_or(known.columns.len())
                == known.columns.len()
            {
                continue;
            }
            let Some(now) =
                tables::describe(conn, Some(known.oid), &known.schema, &known.name).await?
            else {
                continue;
            };
            if !now.key.is_empty() {
                self.describe_collection(conn, &now).await?;
                self.reread_if_columns_need_it(known, &now).await?;
            }
            state.tables.insert(now.oid, now.clone());
            *known = now;
        }
        Ok(())
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

/// Watermark logging kept on for one read (a backfill, a re-read); off again when dropped,
/// so an aborted task cannot leave it on.
struct WatermarkUse(PostgresSource);

impl WatermarkUse {
    fn new(source: &PostgresSource) -> Self {
        source.inner.watermarks.acquire();
        Self(source.clone())
    }
}

impl Drop for WatermarkUse {
    fn drop(&mut self) {
        self.0.inner.watermarks.release();
    }
}

/// Tells the stream this sync is backfilling while it lives (see
/// `RecordStream::set_backfilling`); dropped with the backfill task, however it ends.
struct Backfilling(PostgresSource);

impl Backfilling {
    fn new(source: &PostgresSource) -> Self {
        let inner = &source.inner;
        inner
            .stream
            .set_backfilling(inner.sync_id, Provider::Postgres, true);
        Self(source.clone())
    }
}

impl Drop for Backfilling {
    fn drop(&mut self) {
        let inner = &self.0.inner;
        inner
            .stream
            .set_backfilling(inner.sync_id, Provider::Postgres, false);
    }
}

/// Rows whose change left a TOAST value out that no earlier version in the stream holds:
/// instead of a row that never existed, they are read again consistently (see
/// `Backfill::reread_keys`), and the slot is not confirmed past their changes until then.
#[derive(Default)]
struct KeyRereads {
    /// By table OID: the table and the key texts to read.
    queue: HashMap<u32, (Table, std::collections::BTreeSet<Vec<String>>)>,
    /// The slot may be confirmed up to here and no further while these wait.
    hold: Option<Lsn>,
    /// Changes are logged for the watermark from the first queued change on.
    logging: Option<WatermarkUse>,
}

struct Txn {
    final_lsn: Lsn,
    commit_time: OffsetDateTime,
    xid: u32,
    index: u64,
    /// The end of the last transaction before this one: confirming up to here replays it.
    before: Lsn,
}

/// The state of one streaming session.
struct Streaming<'a> {
    source: &'a PostgresSource,
    relations: HashMap<u32, (Arc<Relation>, Option<Arc<Table>>)>,
    tables: HashMap<u32, Table>,
    pending: Vec<Record>,
    pending_since: Option<Instant>,
    txn: Option<Txn>,
    /// The end of the last transaction whose changes are all pending or appended.
    committed: Option<Lsn>,
    /// The slot position confirmed to the server.
    confirmed: Lsn,
    /// The WAL position of a heartbeat not yet seen come back.
    heartbeat_at: Option<Lsn>,
    /// The server sends logical messages (PostgreSQL 14+), so reads can be watermarked.
    messages: bool,
    /// Rows to read again, not yet started.
    rereads: KeyRereads,
    /// The slot hold of the re-read that is running.
    reread_running: Option<Lsn>,
}

impl Streaming<'_> {
    fn relation(&mut self, rel: Relation, table: Option<Table>) {
        let table = table.or_else(|| self.tables.get(&rel.id).cloned());
        if let Some(t) = &table {
            self.tables.insert(rel.id, t.clone());
        }
        self.relations
            .insert(rel.id, (Arc::new(rel), table.map(Arc::new)));
    }

    /// Appends what is pending, then confirms the last complete transaction to the server.
    async fn flush(&mut self, writer: &mut StatusWriter) -> Result<(), Error> {
        self.flush_records().await?;
        let held = [self.rereads.hold, self.reread_running]
            .into_iter()
            .flatten()
            .min();
        if let Some(c) = self.committed.map(|c| held.map_or(c, |h| c.min(h)))
            && c > self.confirmed
        {
            writer.send_status(c).await?;
            self.confirmed = c;
            self.source.status(|s| s.confirmed = c);
        }
        Ok(())
    }

    fn push(&mut self, record: Record) {
        if let Some(txn) = &self.txn {
            self.source.inner.watermarks.record(
                txn.xid,
                &record.key.collection_id.0,
                &record.key.upstream_id.0,
            );
        }
        if self.pending.is_empty() {
            self.pending_since = Some(Instant::now());
        }
        self.pending.push(record);
    }

    async fn handle(
        &mut self,
        message: Message,
        types: &TypeMap,
        writer: &mut StatusWriter,
    ) -> Result<(), Error> {
        let batch_max = self.source.inner.options.batch_max;
        match message {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                self.txn = Some(Txn {
                    final_lsn,
                    commit_time,
                    xid,
                    index: 0,
                    before: self.committed.unwrap_or(self.confirmed),
                });
            }
            Message::Logical { lsn, .. } => {
                self.source.inner.watermarks.passed(lsn);
            }
            Message::Commit { end_lsn } => {
                self.txn = None;
                self.source.inner.watermarks.passed(end_lsn);
                self.committed = Some(end_lsn);
                self.source
                    .status(|s| s.last_activity = Some(OffsetDateTime::now_utc()));
                if self.pending.len() >= batch_max {
                    self.flush(writer).await?;
                }
            }
            Message::Insert { relation, new } => {
                self.change(relation, None, Some(new), types).await?;
            }
            Message::Update { relation, old, new } => {
                self.change(relation, old, Some(new), types).await?;
            }
            Message::Delete { relation, old } => {
                self.change(relation, Some(old), None, types).await?;
            }
            Message::Truncate { relations } => {
                // Everything before the truncate goes first, so the tombstones follow it.
                self.flush_records().await?;
                for id in relations {
                    let Some((rel, _)) = self.relations.get(&id) else {
                        continue;
                    };
                    let collection = CollectionId(format!("{}.{}", rel.schema, rel.name));
                    let (version, at) = self.next_version()?;
                    if let Some(txn) = &self.txn {
                        self.source
                            .inner
                            .watermarks
                            .record(txn.xid, &collection.0, "*");
                    }
                    let n = self
                        .source
                        .inner
                        .stream
                        .tombstone_collection(self.source.inner.sync_id, &collection, version, at)
                        .await?;
                    tracing::info!(collection = %collection, tombstones = n, "source: truncate");
                }
            }
            Message::Relation(_) | Message::Ignored => {}
        }
        if self.pending.len() >= batch_max {
            // A large transaction: append its changes so far; the slot is confirmed only at
            // its commit, so a crash replays it whole and the stream skips what it holds.
            self.flush_records().await?;
        }
        Ok(())
    }

    async fn flush_records(&mut self) -> Result<(), Error> {
        if !self.pending.is_empty() {
            let records = std::mem::take(&mut self.pending);
            let n = records.len() as u64;
            self.source.inner.stream.append(records).await?;
            self.source
                .inner
                .streamed
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        self.pending_since = None;
        Ok(())
    }

    fn next_version(&mut self) -> Result<(Version, OffsetDateTime), Error> {
        let txn = self
            .txn
            .as_mut()
            .ok_or_else(|| Error::invalid("pgoutput: a change outside a transaction"))?;
        txn.index += 1;
        Ok((Version::new(txn.final_lsn.0, txn.index), txn.commit_time))
    }

    async fn change(
        &mut self,
        relation: u32,
        old: Option<Vec<Value>>,
        new: Option<Vec<Value>>,
        types: &TypeMap,
    ) -> Result<(), Error> {
        let Some((rel, table)) = self.relations.get(&relation) else {
            return Err(Error::invalid(format!(
                "pgoutput: a change for relation {relation} before its description"
            )));
        };
        let collection = format!("{}.{}", rel.schema, rel.name);
        let Some(table) = table.clone().filter(|t| !t.key.is_empty()) else {
            self.source.notice(format!(
                "{collection} has no primary key or replica identity index: its changes are skipped (add a primary key)"
            ));
            return Ok(());
        };
        let rel = rel.clone();
        let key_of = |values: &[Value]| -> Option<Vec<String>> {
            table
                .key
                .iter()
                .map(|k| {
                    let i = rel.columns.iter().position(|c| &c.name == k)?;
                    match values.get(i)? {
                        Value::Text(t) => Some(t.clone()),
                        _ => None,
                    }
                })
                .collect()
        };
        let sync_id = self.source.inner.sync_id;
        let record_key = |key: &[String]| {
            let keys: Vec<&str> = key.iter().map(String::as_str).collect();
            RecordKey::new(sync_id, collection.as_str(), tables::upstream_id(&keys))
        };
        let old_key = old.as_deref().and_then(key_of);
        let Some(new) = new else {
            let key = old_key.ok_or_else(|| {
                Error::invalid(format!(
                    "pgoutput: a delete on {collection} without its key"
                ))
            })?;
            let (version, at) = self.next_version()?;
            self.push(Record {
                key: record_key(&key),
                provider: Provider::Postgres,
                version,
                upstream_updated_at: at,
                change: Change::Delete,
            });
            return Ok(());
        };
        let Some(key_text) = key_of(&new) else {
            self.source.notice(format!(
                "{collection}: a change whose key was not sent was skipped"
            ));
            return Ok(());
        };
        let (version, at) = self.next_version()?;
        let key = record_key(&key_text);
        // The key changed: the old record is gone, and it holds the row's previous values.
        let moved_from = old_key.filter(|k| *k != key_text).map(|k| record_key(&k));
        let mut payload = tables::payload(
            types,
            rel.columns.iter().zip(&new).filter_map(|(c, v)| match v {
                Value::Null => Some((c.name.as_str(), c.type_oid, None)),
                Value::Text(t) => Some((c.name.as_str(), c.type_oid, Some(t.as_str()))),
                Value::Unchanged => None,
            }),
        );
        let unchanged: Vec<&str> = rel
            .columns
            .iter()
            .zip(&new)
            .filter(|(_, v)| **v == Value::Unchanged)
            .map(|(c, _)| c.name.as_str())
            .collect();
        let complete = unchanged.is_empty()
            || self
                .fill_unchanged(
                    moved_from.as_ref().unwrap_or(&key),
                    &unchanged,
                    &mut payload,
                )
                .await?;
        if let Some(old) = moved_from {
            self.push(Record {
                key: old,
                provider: Provider::Postgres,
                version,
                upstream_updated_at: at,
                change: Change::Delete,
            });
        }
        if !complete {
            self.reread(&table, key_text, &key);
            return Ok(());
        }
        if !unchanged.is_empty() {
            // Filled values were added last: restore the relation's column order.
            payload = rel
                .columns
                .iter()
                .filter_map(|c| payload.remove(&c.name).map(|v| (c.name.clone(), v)))
                .collect();
        }
        self.push(Record {
            key,
            provider: Provider::Postgres,
            version,
            upstream_updated_at: at,
            change: Change::Upsert { payload },
        });
        Ok(())
    }

    /// An unchanged TOAST value is not resent: take it from the previous version of the
    /// record at `from` (the old key when the key changed), pending or in the stream. Returns
    /// false when some value is in neither: the row must then be read again, never written
    /// without it (and never with a value read later, which may belong to another version).
    async fn fill_unchanged(
        &self,
        from: &RecordKey,
        unchanged: &[&str],
        payload: &mut Payload,
    ) -> Result<bool, Error> {
        let pending = self.pending.iter().rev().find(|r| &r.key == from);
        let stored;
        let previous = match pending {
            Some(r) => r.change.payload(),
            None => {
                stored = self.source.inner.stream.get(from).await?;
                stored.as_ref().and_then(|e| e.record.change.payload())
            }
        };
        let Some(previous) = previous else {
            return Ok(false);
        };
        for name in unchanged {
            match previous.get(*name) {
                Some(v) => {
                    payload.insert((*name).to_owned(), v.clone());
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Queues the row at `key` to be read again (see [`KeyRereads`]).
    fn reread(&mut self, table: &Table, key_text: Vec<String>, key: &RecordKey) {
        let Some(txn) = &self.txn else {
            return;
        };
        let rereads = &mut self.rereads;
        rereads.hold = Some(rereads.hold.map_or(txn.before, |h| h.min(txn.before)));
        if self.messages && rereads.logging.is_none() {
            rereads.logging = Some(WatermarkUse::new(self.source));
        }
        // A later change to the row that its re-read cannot see wins over that re-read.
        self.source
            .inner
            .watermarks
            .record(txn.xid, &key.collection_id.0, &key.upstream_id.0);
        tracing::debug!(collection = %key.collection_id.0, id = %key.upstream_id.0, "source: an unchanged TOAST value is not in the stream; reading the row again");
        rereads
            .queue
            .entry(table.oid)
            .or_insert_with(|| (table.clone(), Default::default()))
            .1
            .insert(key_text);
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
    Error::unavailable("source: query failed", e)
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

#[async_trait]
impl Health for PostgresSource {
    async fn health(&self) -> HealthReport {
        let now = OffsetDateTime::now_utc();
        let inner = &self.inner;
        let (streaming, last_error, last_activity, notices) = self.status(|s| {
            (
                s.streaming,
                s.last_error
                    .as_ref()
                    .map(|e| (e.to_string(), e.fix().map(str::to_owned), e.class())),
                s.last_activity,
                s.notices.clone(),
            )
        });
        let progress = self.progress();
        let slot = slot_facts(&inner.settings, &inner.spec.slot).await;
        let mut health = inner.health.lock().unwrap_or_else(|e| e.into_inner());
        match (&last_error, streaming) {
            (_, true) => {
                health.observe(
                    "replication",
                    Status::Healthy,
                    "streaming changes",
                    None,
                    now,
                );
            }
            (Some((message, fix, class)), false) => {
                let status = if *class == ErrorClass::FixConfiguration {
                    Status::Error
                } else {
                    Status::Warning
                };
                health.observe("replication", status, message.clone(), fix.clone(), now);
            }
            (None, false) => {
                health.observe("replication", Status::Initializing, "connecting", None, now);
            }
        }
        if progress.done {
            health.observe(
                "backfill",
                Status::Healthy,
                format!("complete ({} rows)", progress.total_rows),
                None,
                now,
            );
        } else if let Some(collection) = &progress.collection {
            health.observe(
                "backfill",
                Status::Initializing,
                format!(
                    "reading {collection}: {} of ~{} rows ({} more tables)",
                    progress.rows, progress.estimate, progress.remaining
                ),
                None,
                now,
            );
        }
        match slot {
            Ok(Some((lag, active))) => {
                let warn = lag > inner.options.slot_lag_warning_bytes;
                health.observe(
                    "slot",
                    if warn || !active { Status::Warning } else { Status::Healthy },
                    format!(
                        "slot {} {} and holds {lag} bytes of WAL",
                        inner.spec.slot,
                        if active { "is active" } else { "is not active" }
                    ),
                    warn.then(|| "the source is producing WAL faster than sluice appends it, or sluice is stopped; check sluice's logs and the records stream's disk".to_owned()),
                    now,
                );
            }
            Ok(None) => {
                health.observe(
                    "slot",
                    Status::Error,
                    format!("slot {} does not exist", inner.spec.slot),
                    Some(
                        "set create_missing = true, or create it: see `sluice source check`".into(),
                    ),
                    now,
                );
            }
            Err(e) => {
                health.observe(
                    "slot",
                    Status::Warning,
                    format!("cannot read slot state: {e}"),
                    None,
                    now,
                );
            }
        }
        let quiet = last_activity.map(|t| now - t);
        let limit = inner.options.heartbeat * 3;
        match quiet {
            Some(q) if q <= limit => {
                health.observe(
                    "heartbeat",
                    Status::Healthy,
                    format!("last change or heartbeat {:.0}s ago", q.as_seconds_f64()),
                    None,
                    now,
                );
            }
            Some(q) => {
                health.observe(
                    "heartbeat",
                    Status::Warning,
                    format!("no change or heartbeat for {:.0}s", q.as_seconds_f64()),
                    Some("the replication path may be stalled; check that sluice is connected and the role may call pg_logical_emit_message".into()),
                    now,
                );
            }
            None => {}
        }
        let unreadable = self.unreadable();
        if let Some((_, first, fix)) = unreadable.first() {
            // Only these tables wait; every other table keeps streaming.
            let mut message = first.lines().next().unwrap_or_default().to_owned();
            for (_, other, _) in &unreadable[1..] {
                message.push_str("; ");
                message.push_str(other.lines().next().unwrap_or_default());
            }
            let fixes: Vec<&str> = unreadable
                .iter()
                .filter_map(|(_, _, f)| f.as_deref())
                .collect();
            health.observe(
                "tables",
                Status::Error,
                message,
                Some(if fixes.is_empty() {
                    fix.clone().unwrap_or_default()
                } else {
                    fixes.join(" ")
                }),
                now,
            );
        } else {
            health.observe(
                "tables",
                if notices.is_empty() {
                    Status::Healthy
                } else {
                    Status::Warning
                },
                if notices.is_empty() {
                    "every published table can be read".to_owned()
                } else {
                    notices.join("; ")
                },
                None,
                now,
            );
        }
        health.report()
    }
}

/// `(bytes of WAL the slot holds, active)`, or `None` when the slot is missing.
async fn slot_facts(
    settings: &ConnectionSettings,
    slot: &str,
) -> Result<Option<(u64, bool)>, Error> {
    let mut conn = settings
        .connect()
        .await
        .map_err(|e| Error::unavailable(format!("source: {e}"), "connect"))?;
    let row = sqlx::query!(
        r#"select coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 as "lag!",
                  active as "active!"
           from pg_replication_slots where slot_name = $1"#,
        slot
    )
    .fetch_optional(&mut conn)
    .await
    .map_err(db)?;
    Ok(row.map(|r| (r.lag.max(0) as u64, r.active)))
}

//! The embedded store: one SQLite file.
//!
//! Queries here use `sqlx::query` with static SQL rather than the compile-checked macros: the
//! workspace's offline data is generated against PostgreSQL, and these statements are
//! exercised by this crate's tests instead.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::{
    AppendOutcome, Change, CollectionId, CollectionSchema, ConsumerId, Error, Lag, PayloadText,
    Provider, Record, RecordFilter, RecordKey, RecordStream, Result, Seq, SourceState, StreamEntry,
    StreamRead, SyncId, UpstreamId, Version,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, ConnectOptions, Row, SqlitePool};
use time::OffsetDateTime;
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

use crate::tail::{Tail, TailLimits};

/// The stream's file name inside the data directory.
pub const FILE_NAME: &str = "stream.sqlite3";

const SCHEMA: &str = "
create table if not exists records (
    seq integer primary key,
    provider text not null,
    sync_id blob not null,
    collection_id text not null,
    upstream_id text not null,
    version_major integer not null,
    version_minor integer not null,
    upstream_updated_at_ns integer not null,
    deleted integer not null,
    payload text,
    appended_at_ns integer not null,
    unique (sync_id, collection_id, upstream_id)
);
-- Reads by provider or sync scan by seq from the reader's position: an index per filter cost
-- every append two more b-tree inserts (dropped from files made before).
drop index if exists records_by_provider;
drop index if exists records_by_sync;
create index if not exists tombstones on records (seq) where deleted = 1;
create table if not exists cursors (
    consumer text primary key,
    provider text,
    sync_id blob,
    collections text,
    seq integer not null
);
create table if not exists meta (key text primary key, value integer not null);
create table if not exists source_state (owner text primary key, value text not null);
create table if not exists collection_schemas (
    sync_id blob not null,
    collection_id text not null,
    schema text not null,
    primary key (sync_id, collection_id)
);
insert or ignore into meta (key, value) values ('head', 0);
";

const COLUMNS: &str = "seq, provider, sync_id, collection_id, upstream_id, version_major, version_minor, \
                       upstream_updated_at_ns, deleted, payload";

/// Rows per multi-row insert (11 parameters each; SQLite allows 32,766 per statement).
const ROWS_PER_STATEMENT: usize = 500;

/// The embedded records stream: one SQLite file in WAL mode.
///
/// Appends are serialised inside the process (one writer) and wake readers waiting in
/// [`RecordStream::wait_past`] at once. Appends made by *another* process on the same file are
/// noticed by a `PRAGMA data_version` check every [`CROSS_PROCESS_CHECK`]; in-process appends
/// never wait for it.
pub struct EmbeddedStream {
    pool: SqlitePool,
    /// The one connection that writes (appends, truncates, acknowledgements).
    writes: SqlitePool,
    path: PathBuf,
    writer: Mutex<()>,
    head: watch::Sender<Seq>,
    /// The newest entries, for readers right behind the writers. Writers hold it across their
    /// commit, and readers while they compare it with the file's head, so the two always agree.
    tail: Mutex<Tail>,
    /// Reads answered from the tail (see [`EmbeddedStream::reads_from_memory`]).
    tail_reads: std::sync::atomic::AtomicU64,
    /// Syncs whose source is backfilling (see `RecordStream::set_backfilling`).
    backfilling: std::sync::Mutex<std::collections::HashMap<SyncId, Provider>>,
}

/// How often a waiting reader checks for appends made by another process.
pub const CROSS_PROCESS_CHECK: Duration = Duration::from_millis(500);

impl std::fmt::Debug for EmbeddedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStream")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn storage(what: &str, error: sqlx::Error) -> Error {
    Error::unavailable(format!("records stream: {what}"), error)
}

impl EmbeddedStream {
    /// Opens (creating if needed) the stream in `data_dir`.
    pub async fn open(data_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = data_dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::configuration(
                format!("cannot create the data directory {}: {e}", dir.display()),
                format!("create {} and make it writable by sluice", dir.display()),
            )
        })?;
        let path = dir.join(FILE_NAME);
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| storage("options", e))?
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            // 16 KiB pages: ~1 KB records pack better, and appends measured 35% faster than
            // with 4 KiB (crates/stream/benches/stream.rs).
            .page_size(16384)
            .pragma("cache_size", "-16384")
            .disable_statement_logging();
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await
            .map_err(|e| storage(&format!("opening {}", path.display()), e))?;
        // Every write goes through one connection (32 MiB cache), so its page cache stays warm.
        let writes = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.pragma("cache_size", "-32768"))
            .await
            .map_err(|e| storage(&format!("opening {}", path.display()), e))?;
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(|e| storage("creating tables", e))?;
        let head: i64 = sqlx::query_scalar("select value from meta where key = 'head'")
            .fetch_one(&pool)
            .await
            .map_err(|e| storage("reading the head", e))?;
        let head = Seq(head as u64);
        Ok(Self {
            pool,
            writes,
            path,
            writer: Mutex::new(()),
            head: watch::channel(head).0,
            tail: Mutex::new(Tail::new(head, TailLimits::default())),
            tail_reads: std::sync::atomic::AtomicU64::new(0),
            backfilling: Default::default(),
        })
    }

    /// How many reads were answered from the newest entries kept in memory rather than from
    /// the file (a consumer that keeps up with its sources reads only from memory).
    pub fn reads_from_memory(&self) -> u64 {
        self.tail_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every live (non-tombstone) record, ordered by key: for comparing with a target.
    pub async fn live_records(&self) -> Result<Vec<StreamEntry>> {
        let sql = format!(
            "select {COLUMNS} from records where deleted = 0 order by sync_id, collection_id, upstream_id"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| storage("reading", e))?;
        rows.iter().map(|r| decode(r, Form::Parsed)).collect()
    }

    /// How many tombstones the stream holds (for tests and status).
    pub async fn tombstones(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("select count(*) from records where deleted = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| storage("counting tombstones", e))?;
        Ok(n as u64)
    }

    /// Appends the records `chunks` yields, in one transaction: atomic like one
    /// [`append`](RecordStream::append), holding only one chunk's parsed records at a time.
    /// For a large batch whose records are parsed as they are written (a push): the memory a
    /// burst takes is one chunk's, not the whole batch's.
    pub async fn append_chunks(
        &self,
        chunks: impl Iterator<Item = Vec<Record>> + Send,
    ) -> Result<AppendOutcome> {
        self.write_records(chunks, None).await
    }

    /// One append: every chunk's records, then `state`, in one transaction.
    async fn write_records(
        &self,
        chunks: impl Iterator<Item = Vec<Record>> + Send,
        state: Option<&SourceState>,
    ) -> Result<AppendOutcome> {
        let (_writer, mut tx, head) = self.begin_write("an append").await?;
        let appended_at = nanos(OffsetDateTime::now_utc());
        let mut next = head;
        let (mut appended, mut total) = (0u64, 0usize);
        let mut landed = Some(Vec::new());
        for mut records in chunks {
            for record in &records {
                check_version(record)?;
            }
            let texts = serialize_payloads(&records)?;
            let n = insert(&mut tx, &records, &texts, &mut next, appended_at).await?;
            appended += n;
            total += records.len();
            match &mut landed {
                Some(landed) if n as usize == records.len() => {
                    for record in &mut records {
                        // The tail keeps the text; the parsed payload goes now.
                        if let Change::Upsert { payload } = &mut record.change {
                            *payload = Default::default();
                        }
                    }
                    landed.extend(records.into_iter().map(as_stored).zip(texts));
                }
                // A record skipped as stale is not in the file, and which one was skipped is
                // not known here: the tail then starts over.
                _ => landed = None,
            }
        }
        if let Some(state) = state {
            sqlx::query(
                "insert into source_state (owner, value) values (?, ?) \
                 on conflict (owner) do update set value = excluded.value",
            )
            .bind(&state.owner)
            .bind(state.value.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| storage("storing source state", e))?;
        }
        let head = self
            .finish_write(tx, head, next, "an append", landed)
            .await?;
        Ok(AppendOutcome {
            appended: appended as usize,
            skipped_stale: total - appended as usize,
            head,
        })
    }

    /// Starts a write: the writer lock, a transaction, and the head inside it.
    async fn begin_write(
        &self,
        what: &str,
    ) -> Result<(
        tokio::sync::MutexGuard<'_, ()>,
        sqlx::Transaction<'static, sqlx::Sqlite>,
        i64,
    )> {
        let writer = self.writer.lock().await;
        let mut tx = self
            .writes
            .begin()
            .await
            .map_err(|e| storage(&format!("beginning {what}"), e))?;
        let head: i64 = sqlx::query_scalar("select value from meta where key = 'head'")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| storage("reading the head", e))?;
        Ok((writer, tx, head))
    }

    /// Ends a write that began at `from`: moves the head to `next`, commits, updates the
    /// tail and wakes readers. `landed` holds the entries of seqs `from + 1 ..= next` (with their
    /// payload's JSON text) when every one of them is in the file as given; `None` empties
    /// the tail instead.
    async fn finish_write(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        from: i64,
        next: i64,
        what: &str,
        landed: Option<Vec<(Record, Option<PayloadText>)>>,
    ) -> Result<Seq> {
        sqlx::query("update meta set value = ? where key = 'head'")
            .bind(next)
            .execute(&mut *tx)
            .await
            .map_err(|e| storage("moving the head", e))?;
        let mut tail = self.tail.lock().await;
        tx.commit()
            .await
            .map_err(|e| storage(&format!("committing {what}"), e))?;
        let head = Seq(next as u64);
        match landed {
            Some(entries) if tail.end() == Seq(from as u64) => tail.extend(entries),
            _ => tail.reset(head),
        }
        drop(tail);
        self.head.send_replace(head);
        Ok(head)
    }

    /// A read, with payloads in `form`: from the tail when it covers the position, else from
    /// the file.
    async fn read_as(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        form: Form,
    ) -> Result<StreamRead> {
        let (entries, head) = match self.read_tail(filter, after, limit, form).await? {
            Some(read) => read,
            None => self.read_file(filter, after, limit, form).await?,
        };
        let through = match entries.last() {
            Some(last) if entries.len() >= limit => last.seq,
            _ => head.max(after),
        };
        Ok(StreamRead { entries, through })
    }

    /// The entries from the tail and the head they go to, when the tail covers the position.
    async fn read_tail(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        form: Form,
    ) -> Result<Option<(Vec<StreamEntry>, Seq)>> {
        let tail = self.tail.lock().await;
        let head = Seq(self.head_in_file().await? as u64);
        let entries = tail.read(filter, after, limit, head, form);
        if entries.is_some() {
            self.tail_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(entries.map(|e| (e, head)))
    }

    /// The entries from the file and the head they go to.
    async fn read_file(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        form: Form,
    ) -> Result<(Vec<StreamEntry>, Seq)> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| storage("beginning a read", e))?;
        // Head first, in the same snapshot: nothing appended after it can be missed.
        let head: i64 = sqlx::query_scalar("select value from meta where key = 'head'")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| storage("reading the head", e))?;
        let sql = format!(
            "select {COLUMNS} from records where seq > ?{} order by seq limit ?",
            filter_sql(filter)
        );
        let query = bind_filter(sqlx::query(AssertSqlSafe(sql)).bind(after.0 as i64), filter)
            .bind(limit as i64);
        let rows = query
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| storage("reading", e))?;
        tx.commit().await.map_err(|e| storage("ending a read", e))?;
        let entries = rows
            .iter()
            .map(|row| decode(row, form))
            .collect::<Result<Vec<_>>>()?;
        Ok((entries, Seq(head as u64)))
    }

    /// The head as the file says now (another process may have moved it).
    async fn head_in_file(&self) -> Result<i64> {
        sqlx::query_scalar("select value from meta where key = 'head'")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| storage("reading the head", e))
    }
}

/// The multi-row upsert for `rows` records. The version guard: a conflicting key is replaced
/// only by a strictly newer version, and the replacement moves to the end of the stream with a
/// new seq.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::with_capacity(600 + rows * 26);
    sql.push_str(
        "insert into records (seq, provider, sync_id, collection_id, upstream_id, version_major, \
         version_minor, upstream_updated_at_ns, deleted, payload, appended_at_ns) values ",
    );
    for i in 0..rows {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?,?,?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?,?,?,?,?,?,?)"
        });
    }
    sql.push_str(
        " on conflict (sync_id, collection_id, upstream_id) do update set \
           seq = excluded.seq, provider = excluded.provider, version_major = excluded.version_major, \
           version_minor = excluded.version_minor, upstream_updated_at_ns = excluded.upstream_updated_at_ns, \
           deleted = excluded.deleted, payload = excluded.payload, appended_at_ns = excluded.appended_at_ns \
         where excluded.version_major > records.version_major \
            or (excluded.version_major = records.version_major and excluded.version_minor > records.version_minor)",
    );
    sql
}

/// Every payload of an append as JSON text, all in one buffer (one allocation, not one per
/// record); `None` for a tombstone.
fn serialize_payloads(records: &[Record]) -> Result<Vec<Option<PayloadText>>> {
    let mut buffer = Vec::with_capacity(records.len() * 256);
    let ranges: Vec<Option<Range<usize>>> = records
        .iter()
        .map(|r| {
            r.change.payload().map(|p| {
                let start = buffer.len();
                if serde_json::to_writer(&mut buffer, p).is_err() {
                    buffer.truncate(start);
                    buffer.extend_from_slice(b"{}");
                }
                start..buffer.len()
            })
        })
        .collect();
    // serde_json writes UTF-8 only, so neither error can happen.
    let not_utf8 = || Error::invalid("records stream: a payload serialised to invalid UTF-8");
    let buffer = Arc::new(String::from_utf8(buffer).map_err(|_| not_utf8())?);
    ranges
        .into_iter()
        .map(|r| {
            r.map(|r| PayloadText::new(buffer.clone(), r).ok_or_else(not_utf8))
                .transpose()
        })
        .collect()
}

/// Inserts `records` (with their payloads' `texts`) at the seqs after `next`, under the version
/// guard, advancing `next`; returns how many landed (the others were stale).
async fn insert(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    records: &[Record],
    texts: &[Option<PayloadText>],
    next: &mut i64,
    appended_at: i64,
) -> Result<u64> {
    let mut appended = 0;
    for (chunk, texts) in records
        .chunks(ROWS_PER_STATEMENT)
        .zip(texts.chunks(ROWS_PER_STATEMENT))
    {
        let mut query = sqlx::query(AssertSqlSafe(insert_sql(chunk.len())));
        // Everything bound is borrowed from `records` and `texts`: no per-record copies.
        for (record, text) in chunk.iter().zip(texts) {
            *next += 1;
            query = query
                .bind(*next)
                .bind(record.provider.as_str())
                .bind(record.key.sync_id.0.as_bytes().as_slice())
                .bind(record.key.collection_id.0.as_str())
                .bind(record.key.upstream_id.0.as_str())
                .bind(record.version.major as i64)
                .bind(record.version.minor as i64)
                .bind(nanos(record.upstream_updated_at))
                .bind(record.is_tombstone())
                .bind(text.as_ref().map(PayloadText::as_str))
                .bind(appended_at);
        }
        appended += query
            .execute(&mut **tx)
            .await
            .map_err(|e| storage("appending", e))?
            .rows_affected();
    }
    Ok(appended)
}

/// The record as a read from the file returns it: its time at nanosecond precision in UTC.
fn as_stored(mut record: Record) -> Record {
    record.upstream_updated_at =
        OffsetDateTime::from_unix_timestamp_nanos(nanos(record.upstream_updated_at) as i128)
            .unwrap_or(record.upstream_updated_at);
    record
}

fn check_version(record: &Record) -> Result<()> {
    let max = i64::MAX as u64;
    if record.version.major > max || record.version.minor > max {
        return Err(Error::invalid(format!(
            "record {}/{}: version {} is out of range (each part must be below 2^63)",
            record.key.collection_id, record.key.upstream_id, record.version
        )));
    }
    Ok(())
}

fn nanos(t: OffsetDateTime) -> i64 {
    t.unix_timestamp_nanos()
        .clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// How a read hands payloads over: parsed, or as the stored JSON text
/// ([`RecordStream::read_text`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Form {
    Parsed,
    Text,
}

/// One row of a `select {COLUMNS}`, by position (no name lookups, no copies of the
/// provider and sync id).
fn decode(row: &SqliteRow, form: Form) -> Result<StreamEntry> {
    let bad = |what: &str| Error::invalid(format!("records stream: corrupt row ({what})"));
    let sync_id = SyncId(Uuid::from_slice(row.get::<&[u8], _>(2)).map_err(|_| bad("sync_id"))?);
    let mut payload_text = None;
    let change = if row.get::<bool, _>(8) {
        Change::Delete
    } else if form == Form::Text {
        payload_text = Some(PayloadText::whole(row.get(9)));
        Change::Upsert {
            payload: Default::default(),
        }
    } else {
        let payload = serde_json::from_str(row.get::<&str, _>(9)).map_err(|_| bad("payload"))?;
        Change::Upsert { payload }
    };
    let updated_ns: i64 = row.get(7);
    Ok(StreamEntry {
        seq: Seq(row.get::<i64, _>(0) as u64),
        record: Record {
            key: RecordKey {
                sync_id,
                collection_id: CollectionId(row.get(3)),
                upstream_id: UpstreamId(row.get(4)),
            },
            provider: Provider::from_str(row.get::<&str, _>(1))?,
            version: Version::new(row.get::<i64, _>(5) as u64, row.get::<i64, _>(6) as u64),
            upstream_updated_at: OffsetDateTime::from_unix_timestamp_nanos(updated_ns as i128)
                .map_err(|_| bad("upstream_updated_at"))?,
            change,
        },
        payload_text,
    })
}

/// The `and …` clause for a filter, with its parameters appended by [`bind_filter`]. The unary
/// `+` keeps SQLite from answering by the key index (every record of a sync, then sorted):
/// reads walk the table by seq from the reader's position, which stops at the limit.
fn filter_sql(filter: &RecordFilter) -> &'static str {
    match filter {
        RecordFilter::Provider(_) => " and +provider = ?",
        RecordFilter::Sync {
            collections: None, ..
        } => " and +sync_id = ?",
        RecordFilter::Sync {
            collections: Some(_),
            ..
        } => " and +sync_id = ? and +collection_id in (select value from json_each(?))",
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind_filter<'q>(query: Query<'q>, filter: &RecordFilter) -> Query<'q> {
    match filter {
        RecordFilter::Provider(p) => query.bind(p.as_str()),
        RecordFilter::Sync {
            sync_id,
            collections,
        } => {
            let query = query.bind(sync_id.0.as_bytes().to_vec());
            match collections {
                None => query,
                Some(c) => query.bind(serde_json::to_string(c).unwrap_or_else(|_| "[]".into())),
            }
        }
    }
}

#[async_trait]
impl RecordStream for EmbeddedStream {
    async fn append_with_state(
        &self,
        records: Vec<Record>,
        state: Option<SourceState>,
    ) -> Result<AppendOutcome> {
        self.write_records(std::iter::once(records), state.as_ref())
            .await
    }

    async fn read(&self, filter: &RecordFilter, after: Seq, limit: usize) -> Result<StreamRead> {
        self.read_as(filter, after, limit, Form::Parsed).await
    }

    async fn read_text(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
    ) -> Result<StreamRead> {
        self.read_as(filter, after, limit, Form::Text).await
    }

    async fn lag(&self, filter: &RecordFilter, after: Seq, cap: u64) -> Result<Lag> {
        let sql = format!(
            "select count(*) from (select 1 from records where seq > ?{} limit ?)",
            filter_sql(filter)
        );
        let query = bind_filter(sqlx::query(AssertSqlSafe(sql)).bind(after.0 as i64), filter)
            .bind(cap as i64);
        let records: i64 = query
            .fetch_one(&self.pool)
            .await
            .map_err(|e| storage("measuring lag", e))?
            .get(0);
        let sql = format!(
            "select appended_at_ns from records where seq > ?{} order by seq limit 1",
            filter_sql(filter)
        );
        let query = bind_filter(sqlx::query(AssertSqlSafe(sql)).bind(after.0 as i64), filter);
        let oldest = query
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| storage("measuring lag", e))?;
        let oldest_appended_at = oldest
            .map(|row| row.get::<i64, _>(0))
            .and_then(|ns| OffsetDateTime::from_unix_timestamp_nanos(ns as i128).ok());
        Ok(Lag {
            records: records as u64,
            oldest_appended_at,
        })
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<StreamEntry>> {
        let sql = format!(
            "select {COLUMNS} from records where sync_id = ? and collection_id = ? and upstream_id = ?"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(key.sync_id.0.as_bytes().to_vec())
            .bind(&key.collection_id.0)
            .bind(&key.upstream_id.0)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| storage("reading a record", e))?;
        row.as_ref().map(|r| decode(r, Form::Parsed)).transpose()
    }

    async fn source_state(&self, owner: &str) -> Result<Option<serde_json::Value>> {
        let text: Option<String> =
            sqlx::query_scalar("select value from source_state where owner = ?")
                .bind(owner)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| storage("reading source state", e))?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|_| Error::invalid("records stream: corrupt source state"))
        })
        .transpose()
    }

    async fn set_collection_schema(
        &self,
        sync_id: SyncId,
        collection: &CollectionId,
        schema: &CollectionSchema,
    ) -> Result<()> {
        let text = serde_json::to_string(schema)
            .map_err(|e| Error::invalid(format!("collection schema: {e}")))?;
        sqlx::query(
            "insert into collection_schemas (sync_id, collection_id, schema) values (?, ?, ?) \
             on conflict (sync_id, collection_id) do update set schema = excluded.schema",
        )
        .bind(sync_id.0.as_bytes().as_slice())
        .bind(collection.0.as_str())
        .bind(text)
        .execute(&self.writes)
        .await
        .map_err(|e| storage("storing a collection schema", e))?;
        Ok(())
    }

    async fn collection_schema(
        &self,
        sync_id: SyncId,
        collection: &CollectionId,
    ) -> Result<Option<CollectionSchema>> {
        let text: Option<String> = sqlx::query_scalar(
            "select schema from collection_schemas where sync_id = ? and collection_id = ?",
        )
        .bind(sync_id.0.as_bytes().as_slice())
        .bind(collection.0.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| storage("reading a collection schema", e))?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|_| Error::invalid("records stream: corrupt collection schema"))
        })
        .transpose()
    }

    async fn tombstone_collection(
        &self,
        sync_id: SyncId,
        collection: &CollectionId,
        version: Version,
        at: OffsetDateTime,
    ) -> Result<u64> {
        check_version(&Record {
            key: RecordKey::new(sync_id, collection.0.as_str(), ""),
            provider: Provider::Postgres,
            version,
            upstream_updated_at: at,
            change: Change::Delete,
        })?;
        let (_writer, mut tx, head) = self.begin_write("a truncate").await?;
        // One statement: every live record of the collection gets a tombstone with the next
        // seq, where its stored version is older (the same guard as `append`).
        let done = sqlx::query(
            "insert into records (seq, provider, sync_id, collection_id, upstream_id, version_major, \
               version_minor, upstream_updated_at_ns, deleted, payload, appended_at_ns) \
             select ?1 + row_number() over (order by seq), provider, sync_id, collection_id, upstream_id, \
               ?4, ?5, ?6, 1, null, ?7 \
             from records where sync_id = ?2 and collection_id = ?3 and deleted = 0 \
               and (version_major < ?4 or (version_major = ?4 and version_minor < ?5)) \
             on conflict (sync_id, collection_id, upstream_id) do update set \
               seq = excluded.seq, version_major = excluded.version_major, \
               version_minor = excluded.version_minor, upstream_updated_at_ns = excluded.upstream_updated_at_ns, \
               deleted = 1, payload = null, appended_at_ns = excluded.appended_at_ns",
        )
        .bind(head)
        .bind(sync_id.0.as_bytes().as_slice())
        .bind(collection.0.as_str())
        .bind(version.major as i64)
        .bind(version.minor as i64)
        .bind(nanos(at))
        .bind(nanos(OffsetDateTime::now_utc()))
        .execute(&mut *tx)
        .await
        .map_err(|e| storage("tombstoning a collection", e))?
        .rows_affected();
        self.finish_write(tx, head, head + done as i64, "a truncate", None)
            .await?;
        Ok(done)
    }

    async fn head(&self) -> Result<Seq> {
        Ok(Seq(self.head_in_file().await? as u64))
    }

    async fn wait_past(&self, seq: Seq) {
        let mut local = self.head.subscribe();
        loop {
            if *local.borrow_and_update() > seq {
                return;
            }
            tokio::select! {
                changed = local.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep(CROSS_PROCESS_CHECK) => {
                    // Another process may have appended to the same file.
                    if let Some(head) = self.head_in_file().await.ok()
                        && head as u64 > seq.0
                    {
                        self.head.send_if_modified(|h| {
                            let newer = Seq(head as u64) > *h;
                            if newer {
                                *h = Seq(head as u64);
                            }
                            newer
                        });
                        return;
                    }
                }
            }
        }
    }

    async fn acknowledge(
        &self,
        consumer: &ConsumerId,
        filter: &RecordFilter,
        through: Seq,
    ) -> Result<()> {
        let (provider, sync_id, collections) = match filter {
            RecordFilter::Provider(p) => (Some(p.as_str()), None, None),
            RecordFilter::Sync {
                sync_id,
                collections,
            } => (
                None,
                Some(sync_id.0.as_bytes().to_vec()),
                collections
                    .as_ref()
                    .map(|c| serde_json::to_string(c).unwrap_or_else(|_| "[]".into())),
            ),
        };
        let _writer = self.writer.lock().await;
        let mut tx = self
            .writes
            .begin()
            .await
            .map_err(|e| storage("beginning an acknowledgement", e))?;
        sqlx::query(
            "insert into cursors (consumer, provider, sync_id, collections, seq) values (?, ?, ?, ?, ?) \
             on conflict (consumer) do update set provider = excluded.provider, sync_id = excluded.sync_id, \
               collections = excluded.collections, seq = excluded.seq",
        )
        .bind(&consumer.0)
        .bind(provider)
        .bind(sync_id)
        .bind(collections)
        .bind(through.0 as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| storage("storing a cursor", e))?;
        // Purge tombstones that no registered consumer whose filter matches them still needs.
        let purged: Vec<i64> = sqlx::query_scalar(
            "delete from records where deleted = 1 and seq <= ? and not exists (
                 select 1 from cursors c where records.seq > c.seq
                   and (c.provider is null or c.provider = records.provider)
                   and (c.sync_id is null or c.sync_id = records.sync_id)
                   and (c.collections is null or records.collection_id in (select value from json_each(c.collections))))
             returning seq",
        )
        .bind(through.0 as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| storage("purging tombstones", e))?;
        let mut tail = self.tail.lock().await;
        tx.commit()
            .await
            .map_err(|e| storage("committing an acknowledgement", e))?;
        tail.remove(purged.into_iter().map(|s| s as u64));
        Ok(())
    }

    fn set_backfilling(&self, sync_id: SyncId, provider: Provider, backfilling: bool) {
        let mut syncs = self.backfilling.lock().unwrap_or_else(|e| e.into_inner());
        if backfilling {
            syncs.insert(sync_id, provider);
        } else {
            syncs.remove(&sync_id);
        }
    }

    fn backfilling(&self, filter: &RecordFilter) -> bool {
        self.backfilling
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(sync, provider)| filter.covers(*provider, *sync))
    }

    async fn forget(&self, consumer: &ConsumerId) -> Result<()> {
        sqlx::query("delete from cursors where consumer = ?")
            .bind(&consumer.0)
            .execute(&self.writes)
            .await
            .map_err(|e| storage("forgetting a consumer", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every filtered read walks the table by seq: never every record of a sync by the key
    /// index followed by a sort.
    #[tokio::test]
    async fn filtered_reads_walk_by_seq() {
        let dir = tempfile::tempdir().unwrap();
        let stream = EmbeddedStream::open(dir.path()).await.unwrap();
        let sync_id = SyncId(Uuid::from_u128(1));
        let filters = [
            RecordFilter::Provider(Provider::Postgres),
            RecordFilter::Sync {
                sync_id,
                collections: None,
            },
            RecordFilter::Sync {
                sync_id,
                collections: Some(BTreeSet::from([CollectionId("public.t".into())])),
            },
        ];
        for filter in &filters {
            for sql in [
                format!(
                    "select {COLUMNS} from records where seq > ?{} order by seq limit ?",
                    filter_sql(filter)
                ),
                format!(
                    "select count(*) from (select 1 from records where seq > ?{} limit ?)",
                    filter_sql(filter)
                ),
            ] {
                let query = bind_filter(
                    sqlx::query(AssertSqlSafe(format!("explain query plan {sql}"))).bind(0i64),
                    filter,
                )
                .bind(10i64);
                let plan: Vec<String> = query
                    .fetch_all(&stream.pool)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| r.get::<String, _>(3))
                    .collect();
                assert!(
                    plan.iter()
                        .any(|p| p.contains("INTEGER PRIMARY KEY (rowid>?)"))
                        && !plan.iter().any(|p| p.contains("TEMP B-TREE")),
                    "{sql}: {plan:?}"
                );
            }
        }
    }
}

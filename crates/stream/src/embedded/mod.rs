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

mod read;
mod write;

pub(crate) use read::Form;
use read::{bind_filter, decode, filter_sql, nanos};
use write::check_version;

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

/// Rows per multi-row insert, largest first (11 parameters each; SQLite allows 32,766 per
/// statement): see [`write::statement_rows`].
const STATEMENT_ROWS: [usize; 5] = [500, 100, 20, 5, 1];

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

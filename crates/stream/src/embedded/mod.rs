//! The embedded store: one SQLite file, through rusqlite.
//!
//! Statements run on the calling thread with cached prepared statements (a multi-threaded
//! runtime is told with `block_in_place`, so its other tasks move to another thread while
//! SQLite reads or syncs the file). SQL here is static text exercised by this crate's tests.

use std::ops::{ControlFlow, Range};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use sluice_core::{
    AppendOutcome, Change, CollectionId, CollectionSchema, ConsumerId, Error, Lag, PayloadText,
    Provider, READ_BYTES, Record, RecordFilter, RecordKey, RecordStream, Result, Seq, SourceState,
    StreamEntry, StreamRead, SyncId, TextBatch, UpstreamId, Version,
};
use time::OffsetDateTime;
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

use crate::tail::{Landed, Tail, TailLimits};

mod backfills;
mod collections;
mod connection;
mod ids;
mod packed;
mod read;
mod schema;
mod segment;
mod walk;
mod write;

use connection::{
    IDLE_READERS, OrStorage, Replaced, WRITER_SETTINGS, blocking, connect, read_head,
};
use ids::{ReadId, StoredId};

use collections::Names;
pub(crate) use read::Form;
use read::nanos;
use segment::Times;
use write::{begin_write, check_version};

/// The stream's file name inside the data directory.
pub const FILE_NAME: &str = "stream.sqlite3";

/// Rows per multi-row insert, largest first (7 parameters each; SQLite allows 32,766 per
/// statement): see [`write::statement_rows`].
const STATEMENT_ROWS: [usize; 5] = [500, 100, 20, 5, 1];

/// The embedded records stream: one SQLite file in WAL mode.
///
/// Appends are serialised inside the process (one writing connection) and wake readers waiting
/// in [`RecordStream::wait_past`] at once. Appends made by *another* process on the same file
/// are noticed by a check of the file's head every [`CROSS_PROCESS_CHECK`]; in-process appends
/// never wait for it.
pub struct EmbeddedStream {
    /// The one connection that writes (appends, truncates, acknowledgements, schemas); its
    /// lock serialises writers in the order they came.
    writer: Mutex<Connection>,
    /// Connections for reads, idle between them (one more is opened when none is idle).
    readers: std::sync::Mutex<Vec<Connection>>,
    path: PathBuf,
    head: watch::Sender<Seq>,
    /// The newest entries, for readers right behind the writers. Writers hold it across their
    /// commit, and readers while they compare it with the file's head, so the two always agree.
    tail: std::sync::Mutex<Tail>,
    /// Reads answered from the tail (see [`EmbeddedStream::reads_from_memory`]).
    tail_reads: std::sync::atomic::AtomicU64,
    /// Syncs whose source is backfilling, and backfills begun (`backfills.rs`).
    backfills: backfills::Backfills,
    /// The collection ids known to be in the file.
    collections: collections::Shared,
    /// The key rows the writing connection's upserts replaced (see [`Replaced`]).
    replaced: Replaced,
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
        let replaced = Replaced::default();
        let (writer, head) = blocking(|| {
            let mut conn = connect(&path, WRITER_SETTINGS)
                .or_storage(&format!("opening {}", path.display()))?;
            replaced
                .register(&conn)
                .or_storage(&format!("opening {}", path.display()))?;
            schema::prepare(&mut conn, &path)?;
            let head = read_head(&conn)?;
            Ok::<_, Error>((conn, head))
        })?;
        let head = Seq(head as u64);
        Ok(Self {
            writer: Mutex::new(writer),
            readers: Default::default(),
            path,
            head: watch::channel(head).0,
            tail: std::sync::Mutex::new(Tail::new(head, TailLimits::default())),
            tail_reads: std::sync::atomic::AtomicU64::new(0),
            backfills: Default::default(),
            collections: Default::default(),
            replaced,
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
        blocking(|| {
            self.with_reader(|conn| {
                let what = "reading";
                let mut statement = conn
                    .prepare(
                        "select keys.seq, keys.segment from keys \
                         join collections k on k.id = keys.collection \
                         where deleted = 0 \
                         order by k.sync_id, k.collection_id, cast(upstream_id as text)",
                    )
                    .or_storage(what)?;
                let mut rows = statement.query([]).or_storage(what)?;
                let mut segments = packed::Cache::new(conn);
                let mut names = Names::new(&self.collections, conn);
                let mut entries = Vec::new();
                while let Some(row) = rows.next().or_storage(what)? {
                    let (seq, segment) = (
                        row.get::<_, i64>(0).or_storage(what)?,
                        row.get::<_, i64>(1).or_storage(what)?,
                    );
                    entries.push(packed::entry_at(&mut segments, &mut names, segment, seq)?);
                }
                Ok(entries)
            })
        })
    }

    /// Every live record's key and the time its append began, in seq order: for measuring how
    /// long records take to reach the stream (the replication benchmark).
    pub async fn append_times(&self) -> Result<Vec<(RecordKey, OffsetDateTime)>> {
        blocking(|| {
            self.with_reader(|conn| {
                let tx = conn.transaction().or_storage("reading")?;
                let mut names = Names::new(&self.collections, &tx);
                let mut times = Vec::new();
                walk::walk(
                    &tx,
                    Seq::START,
                    |_| true,
                    |packed, slot| {
                        let (entry, _) = packed.entry(slot, Form::Text, &mut names)?;
                        let ns = packed.appended_at(slot) as i128;
                        let at = OffsetDateTime::from_unix_timestamp_nanos(ns)
                            .map_err(|_| Error::invalid("records stream: corrupt append time"))?;
                        times.push((entry.record.key, at));
                        Ok(ControlFlow::Continue(()))
                    },
                )?;
                drop(names);
                tx.commit().or_storage("reading")?;
                Ok(times)
            })
        })
    }

    /// How many tombstones the stream holds (for tests and status).
    pub async fn tombstones(&self) -> Result<u64> {
        blocking(|| {
            self.with_reader(|conn| {
                conn.query_row("select count(*) from keys where deleted = 1", [], |r| {
                    r.get::<_, i64>(0)
                })
                .or_storage("counting tombstones")
            })
        })
        .map(|n| n as u64)
    }

    /// Appends the records `chunks` yields, in one transaction: atomic like one
    /// [`append`](RecordStream::append), holding only one chunk's parsed records at a time.
    /// For a large batch whose records are parsed as they are written (a push): the memory a
    /// burst takes is one chunk's, not the whole batch's.
    pub async fn append_chunks(
        &self,
        chunks: impl Iterator<Item = Vec<Record>> + Send,
    ) -> Result<AppendOutcome> {
        self.write_records(chunks.map(TextBatch::from_records), None)
            .await
    }

    /// Runs `f` on an idle read connection (opening one when none is idle). A connection whose
    /// work failed is closed rather than kept.
    fn with_reader<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let idle = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => connect(&self.path, "").or_storage("opening a reader")?,
        };
        let result = f(&mut conn);
        if result.is_ok() {
            let mut idle = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
        }
        result
    }

    /// Runs `f` on the writing connection, in order with the other writers.
    async fn with_writer<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = self.writer.lock().await;
        blocking(|| f(&mut conn))
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl RecordStream for EmbeddedStream {
    async fn append_with_state(
        &self,
        records: Vec<Record>,
        state: Option<SourceState>,
    ) -> Result<AppendOutcome> {
        let batch = TextBatch::from_records(records);
        self.write_records(std::iter::once(batch), state.as_ref())
            .await
    }

    async fn append_texts(
        &self,
        batch: TextBatch,
        state: Option<SourceState>,
    ) -> Result<AppendOutcome> {
        self.write_records(std::iter::once(Ok(batch)), state.as_ref())
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
        let (records, oldest) = blocking(|| {
            self.with_reader(|conn| {
                let tx = conn.transaction().or_storage("measuring lag")?;
                let mut names = Names::new(&self.collections, &tx);
                let wanted = Self::wanted(&tx, &mut names, filter)?;
                drop(names);
                let counted =
                    walk::count(&tx, after, cap, |collection| wanted.contains(&collection))?;
                tx.commit().or_storage("measuring lag")?;
                Ok(counted)
            })
        })?;
        let records = records.min(cap);
        let oldest_appended_at =
            oldest.and_then(|ns| OffsetDateTime::from_unix_timestamp_nanos(ns as i128).ok());
        Ok(Lag {
            records,
            oldest_appended_at,
        })
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<StreamEntry>> {
        blocking(|| {
            self.with_reader(|conn| {
                let what = "reading a record";
                let found =
                    collections::find(&self.collections, conn, key.sync_id, &key.collection_id.0)?;
                let Some(collection) = found else {
                    return Ok(None);
                };
                let place: Option<(i64, i64)> = conn
                    .prepare_cached(
                        "select seq, segment from keys where collection = ? and upstream_id = ?",
                    )
                    .and_then(|mut s| {
                        s.query_row((collection, StoredId::of(&key.upstream_id.0)), |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                    })
                    .optional()
                    .or_storage(what)?;
                let Some((seq, segment)) = place else {
                    return Ok(None);
                };
                let mut segments = packed::Cache::new(conn);
                let mut names = Names::new(&self.collections, conn);
                packed::entry_at(&mut segments, &mut names, segment, seq).map(Some)
            })
        })
    }

    async fn source_state(&self, owner: &str) -> Result<Option<serde_json::Value>> {
        let text: Option<String> = blocking(|| {
            self.with_reader(|conn| {
                conn.prepare_cached("select value from source_state where owner = ?")
                    .and_then(|mut s| s.query_row([owner], |r| r.get(0)).optional())
                    .or_storage("reading source state")
            })
        })?;
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
        self.with_writer(|conn| {
            conn.prepare_cached(
                "insert into collection_schemas (sync_id, collection_id, schema) values (?, ?, ?) \
                 on conflict (sync_id, collection_id) do update set schema = excluded.schema",
            )
            .and_then(|mut s| {
                s.execute((sync_id.0.as_bytes().as_slice(), collection.0.as_str(), text))
            })
            .or_storage("storing a collection schema")
        })
        .await?;
        Ok(())
    }

    async fn collection_schema(
        &self,
        sync_id: SyncId,
        collection: &CollectionId,
    ) -> Result<Option<CollectionSchema>> {
        let text: Option<String> = blocking(|| {
            self.with_reader(|conn| {
                conn.prepare_cached(
                    "select schema from collection_schemas where sync_id = ? and collection_id = ?",
                )
                .and_then(|mut s| {
                    s.query_row(
                        (sync_id.0.as_bytes().as_slice(), collection.0.as_str()),
                        |r| r.get(0),
                    )
                    .optional()
                })
                .or_storage("reading a collection schema")
            })
        })?;
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
        self.with_writer(|conn| {
            let (tx, head) = begin_write(conn, "a truncate")?;
            let found = collections::find(&self.collections, &tx, sync_id, &collection.0)?;
            let Some(id) = found else {
                return Ok(0); // never written to: nothing to tombstone
            };
            let provider = Names::new(&self.collections, &tx).name(id)?.provider;
            let appended_at = nanos(OffsetDateTime::now_utc());
            let mut ids = collections::Ids::new(&self.collections);
            let (mut next, mut done, mut last) = (head, 0, None::<String>);
            // Every live record of the collection whose stored version is older gets a
            // tombstone with the next seq (the same guard as `append`), a chunk of keys at a
            // time.
            loop {
                let keys: Vec<String> = tx
                    .prepare_cached(
                        "select upstream_id from keys where collection = ?1 and deleted = 0 \
                           and (version_major < ?2 or (version_major = ?2 and version_minor < ?3)) \
                           and (?4 is null or upstream_id > ?4) \
                         order by upstream_id limit 5000",
                    )
                    .and_then(|mut s| {
                        s.query_map(
                            (
                                id,
                                version.major as i64,
                                version.minor as i64,
                                last.as_deref().map(StoredId::of),
                            ),
                            |r| r.get::<_, ReadId>(0).map(|id| id.0),
                        )?
                        .collect::<rusqlite::Result<Vec<String>>>()
                    })
                    .or_storage("tombstoning a collection")?;
                let Some(end) = keys.last() else { break };
                last = Some(end.clone());
                let records: Vec<Record> = keys
                    .into_iter()
                    .map(|upstream_id| Record {
                        key: RecordKey::new(sync_id, collection.0.as_str(), upstream_id),
                        provider,
                        version,
                        upstream_updated_at: at,
                        change: Change::Delete,
                    })
                    .collect();
                let texts = vec![None; records.len()];
                done += self.insert(&tx, &mut ids, &records, &texts, &mut next, appended_at)?;
            }
            packed::drop_unused(&tx)?;
            self.finish_write(tx, head, next, "a truncate", None)?;
            ids.commit();
            Ok(done)
        })
        .await
    }

    async fn head(&self) -> Result<Seq> {
        Ok(Seq(self.head_in_file()? as u64))
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
                    if let Some(head) = self.head_in_file().ok()
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
        self.with_writer(|conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .or_storage("beginning an acknowledgement")?;
            tx.prepare_cached(
                "insert into cursors (consumer, provider, sync_id, collections, seq) values (?, ?, ?, ?, ?) \
                 on conflict (consumer) do update set provider = excluded.provider, sync_id = excluded.sync_id, \
                   collections = excluded.collections, seq = excluded.seq",
            )
            .and_then(|mut s| {
                s.execute((&consumer.0, provider, sync_id, collections, through.0 as i64))
            })
            .or_storage("storing a cursor")?;
            // Purge tombstones that no registered consumer whose filter matches them still
            // needs.
            let purged = tx
                .prepare_cached(
                    "delete from keys where deleted = 1 and seq <= ? and not exists (
                         select 1 from cursors c, collections k
                         where k.id = keys.collection and keys.seq > c.seq
                           and (c.provider is null or c.provider = k.provider)
                           and (c.sync_id is null or c.sync_id = k.sync_id)
                           and (c.collections is null or k.collection_id in (select value from json_each(c.collections))))
                     returning seq",
                )
                .and_then(|mut s| {
                    s.query_map([through.0 as i64], |r| r.get::<_, i64>(0))?
                        .collect::<rusqlite::Result<Vec<i64>>>()
                })
                .or_storage("purging tombstones")?;
            packed::drop_unused(&tx)?;
            let mut tail = self.tail();
            tx.commit().or_storage("committing an acknowledgement")?;
            tail.remove(purged.into_iter().map(|s| s as u64));
            Ok(())
        })
        .await
    }

    fn set_backfilling(&self, sync_id: SyncId, provider: Provider, backfilling: bool) {
        self.backfills.set(sync_id, provider, backfilling);
    }

    fn backfilling(&self, filter: &RecordFilter) -> bool {
        self.backfills.running(filter)
    }

    fn backfills_begun(&self, filter: &RecordFilter) -> u64 {
        self.backfills.begun(filter)
    }

    async fn forget(&self, consumer: &ConsumerId) -> Result<()> {
        self.with_writer(|conn| {
            conn.prepare_cached("delete from cursors where consumer = ?")
                .and_then(|mut s| s.execute([&consumer.0]))
                .or_storage("forgetting a consumer")
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod ids_tests;
#[cfg(test)]
mod migration_tests;
#[cfg(test)]
mod read_tests;
#[cfg(test)]
mod tests;

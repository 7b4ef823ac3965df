//! The keyset-paged backfill, row re-reads, and the stored requests to read tables again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_core::sql::{qualified, quote_ident};
use sluice_core::{
    Change, Error, Provider, Record, RecordKey, RecordStream, SourceState, SyncId, TextBatch,
    Version,
};
use sqlx::PgConnection;
use time::OffsetDateTime;

use super::page::{Page, fetch_rows, keys_sql, page_sql};
use super::ranges::{KeyRange, Reading, first_limit, next_limit, planned_rows, split};
use super::watermarks::{Snapshot, Watermarks};
use super::{PayloadFields, Table, db, payload_room, upstream_id};
use crate::values::TypeMap;
use crate::wire::Lsn;

/// How far a backfill has come; stored with each page it appends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct BackfillState {
    /// Collections read completely.
    pub done: BTreeSet<String>,
    /// The collection being read and the text of the last key appended.
    pub current: Option<(String, Vec<String>)>,
    /// The re-read request (see [`TableRereads`]) the current collection is read for; 0 for
    /// its first read.
    #[serde(default)]
    pub generation: u64,
    /// Rows appended so far, all tables.
    pub rows: u64,
    /// The current collection's key ranges, each read by one of the parallel readers, with
    /// how far each has come. Empty in a state stored by a single reader before ranges
    /// existed: its position is then the key in `current`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<KeyRange>,
}

/// Tables to read again from their first row (a column added with a default), stored in the
/// stream beside the backfill's state, so a restart still reads them. Each request bumps the
/// table's generation: a read that started before a newer request does not satisfy it.
pub(crate) struct TableRereads {
    owner: String,
    /// The session asks while a backfill may be finishing: one read-modify-write at a time.
    lock: tokio::sync::Mutex<()>,
}

impl TableRereads {
    pub fn new(owner: String) -> Self {
        Self {
            owner,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Outstanding requests: collection → generation.
    pub async fn load(
        &self,
        stream: &Arc<dyn RecordStream>,
    ) -> Result<BTreeMap<String, u64>, Error> {
        Ok(match stream.source_state(&self.owner).await? {
            Some(v) => serde_json::from_value(v).unwrap_or_default(),
            None => BTreeMap::new(),
        })
    }

    async fn store(
        &self,
        stream: &Arc<dyn RecordStream>,
        requests: &BTreeMap<String, u64>,
    ) -> Result<(), Error> {
        let value = serde_json::to_value(requests)
            .map_err(|e| Error::invalid(format!("source: storing re-read requests: {e}")))?;
        stream
            .append_with_state(
                Vec::new(),
                Some(SourceState {
                    owner: self.owner.clone(),
                    value,
                }),
            )
            .await?;
        Ok(())
    }

    /// Asks for `collection` to be read again, durably, before the caller confirms the change
    /// that made it necessary.
    pub async fn request(
        &self,
        stream: &Arc<dyn RecordStream>,
        collection: &str,
    ) -> Result<(), Error> {
        let _one = self.lock.lock().await;
        let mut requests = self.load(stream).await?;
        *requests.entry(collection.to_owned()).or_default() += 1;
        self.store(stream, &requests).await
    }

    /// `collection` was read whole for request `generation`.
    async fn finished(
        &self,
        stream: &Arc<dyn RecordStream>,
        collection: &str,
        generation: u64,
    ) -> Result<(), Error> {
        let _one = self.lock.lock().await;
        let mut requests = self.load(stream).await?;
        if requests.get(collection) == Some(&generation) {
            requests.remove(collection);
            self.store(stream, &requests).await?;
        }
        Ok(())
    }
}

/// Progress a caller can show.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BackfillProgress {
    /// The collection being read, if the backfill is running.
    pub collection: Option<String>,
    /// Rows read from it so far.
    pub rows: u64,
    /// The planner's estimate of its rows.
    pub estimate: u64,
    /// Collections still to read after it.
    pub remaining: usize,
    /// True once every published table has been read.
    pub done: bool,
    /// Rows read over all tables.
    pub total_rows: u64,
    /// Each table read (or being read) since the source started: rows read and the planner's
    /// estimate, by collection.
    pub collections: BTreeMap<String, CollectionProgress>,
}

/// One table's backfill.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CollectionProgress {
    /// Rows read.
    pub rows: u64,
    /// The planner's estimate of its rows.
    pub estimate: u64,
    /// True once the whole table has been read.
    pub done: bool,
    /// Connections reading it in parallel, each its own key range.
    pub readers: usize,
}

/// Everything a backfill needs.
pub(crate) struct Backfill<'a> {
    pub sync_id: SyncId,
    pub stream: &'a Arc<dyn RecordStream>,
    pub types: &'a TypeMap,
    pub page: usize,
    pub owner: String,
    pub progress: &'a std::sync::Mutex<BackfillProgress>,
    /// Watermarks with the change stream (see [`Watermarks`]).
    pub watermarks: &'a Watermarks,
    /// Tables asked to be read again.
    pub rereads: &'a TableRereads,
    /// The role sluice reads as (named in the `GRANT` when a table may not be read).
    pub role: &'a str,
    /// Tables that could not be read, with why; a table leaves it once it has been read.
    /// One whose error needs a fix (a grant) is tried again by the next backfill; one whose
    /// data the server refused (`GiveUp`) stops there and is not read again until the source
    /// restarts, so the same refusal is never asked for in a loop.
    pub unreadable: &'a std::sync::Mutex<BTreeMap<String, Error>>,
}

/// Which rows of a table one consistent read takes.
#[derive(Clone, Copy)]
pub(super) enum Rows<'k> {
    /// The next keyset page of up to `limit` rows after `after` (from the first row when
    /// `None`), up to and including `through` (to the last row when `None`).
    After {
        after: Option<&'k [String]>,
        through: Option<&'k [String]>,
        limit: usize,
    },
    /// The rows with exactly these keys (those that still exist).
    Keys(&'k [Vec<String>]),
}

impl Backfill<'_> {
    /// Reads every table in `tables` that the stored state has not finished, or that was
    /// asked to be read again, in keyset pages. Each page is reconciled with the change
    /// stream (see [`Watermarks`]), so any change that races with it wins in the stream.
    ///
    /// A table is split into key ranges, one per connection in `conns` (see [`split`]); each
    /// range is read by one connection at a time, every page reconciled on its own.
    pub async fn run(&self, conns: &mut [PgConnection], tables: &[Table]) -> Result<(), Error> {
        let mut state: BackfillState = match self.stream.source_state(&self.owner).await? {
            Some(v) => serde_json::from_value(v).unwrap_or_default(),
            None => BackfillState::default(),
        };
        let rereads = self.rereads.load(self.stream).await?;
        let stopped = self.stopped();
        let todo: Vec<(&Table, u64)> = tables
            .iter()
            .filter(|t| !t.key.is_empty() && !stopped.contains(&t.collection()))
            .filter_map(|t| {
                let collection = t.collection();
                match rereads.get(&collection) {
                    Some(generation) => Some((t, *generation)),
                    None => (!state.done.contains(&collection)).then_some((t, 0)),
                }
            })
            .collect();
        for (i, (table, generation)) in todo.iter().enumerate() {
            let collection = table.collection();
            let resumed = match &state.current {
                Some((c, key)) if *c == collection && state.generation == *generation => {
                    match (state.ranges.is_empty(), key.is_empty()) {
                        (false, _) => Some(std::mem::take(&mut state.ranges)),
                        (true, false) => Some(vec![KeyRange::after(key.clone())]),
                        (true, true) => None,
                    }
                }
                _ => None,
            };
            let rows = planned_rows(&mut conns[0], table).await;
            let ranges = match resumed {
                Some(ranges) => ranges,
                None => {
                    state.done.remove(&collection);
                    state.generation = *generation;
                    let readers = conns.len();
                    split(&mut conns[0], table, readers, self.page, rows).await
                }
            };
            state.current = Some((collection.clone(), Vec::new()));
            state.ranges = ranges;
            let readers = conns.len().min(state.ranges.len());
            self.set_progress(|p| {
                p.collection = Some(collection.clone());
                p.rows = 0;
                p.estimate = table.estimate;
                p.remaining = todo.len() - i - 1;
                p.done = false;
                p.total_rows = state.rows;
                p.collections.insert(
                    collection.clone(),
                    CollectionProgress {
                        rows: 0,
                        estimate: table.estimate,
                        done: false,
                        readers,
                    },
                );
            });
            tracing::info!(
                collection,
                estimate = table.estimate,
                readers,
                "backfill: reading"
            );
            let first = first_limit(&mut conns[0], table, self.page, rows).await;
            let reading = Reading::new(state);
            let unreadable = futures_util::future::try_join_all(
                conns
                    .iter_mut()
                    .take(readers)
                    .map(|conn| self.read_ranges(conn, table, &reading, first)),
            )
            .await?
            .into_iter()
            .flatten()
            .next();
            let rows_here;
            (state, rows_here) = reading.finish();
            match unreadable {
                Some(e) => {
                    self.set_unreadable(&collection, Some(e));
                    continue;
                }
                None => {
                    tracing::info!(collection, rows = rows_here, "backfill: table done");
                    self.set_unreadable(&collection, None);
                }
            }
            if *generation > 0 && state.done.contains(&collection) {
                self.rereads
                    .finished(self.stream, &collection, *generation)
                    .await?;
            }
        }
        self.set_progress(|p| {
            p.collection = None;
            p.remaining = 0;
            p.done = true;
        });
        Ok(())
    }

    /// Reads the rows of `table` with these keys again, consistently with the change stream
    /// (the same reconciliation as a backfill page), and appends them. Keys whose row is gone
    /// append nothing: the change stream carries their delete. Returns the rows appended.
    ///
    /// The keys are read in chunks sized like backfill pages ([`first_limit`], then
    /// [`next_limit`]): the rows read again are rows with TOAST values, kilobytes each or more.
    pub async fn reread_keys(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        keys: &[Vec<String>],
    ) -> Result<usize, Error> {
        let mut appended = 0;
        let rows = planned_rows(conn, table).await;
        let mut limit = first_limit(conn, table, self.page, rows).await;
        let mut rest = keys;
        while !rest.is_empty() {
            let chunk;
            (chunk, rest) = rest.split_at(limit.min(rest.len()));
            let (lsn, rows, raced) = self.read_consistent(conn, table, Rows::Keys(chunk)).await?;
            limit = next_limit(self.page, limit, rows.len(), rows.bytes());
            let records = self.records(table, lsn, rows, &raced);
            appended += records.len();
            self.stream.append_texts(records, None).await?;
        }
        Ok(appended)
    }

    /// Rows read at one point of the source's history, the LSN to stamp them with, and the
    /// ids a change the read could not see has touched since (their rows are dropped).
    pub(super) async fn read_consistent(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        rows: Rows<'_>,
    ) -> Result<(Lsn, Page, std::collections::HashSet<String>), Error> {
        self.watermarked_read(conn, self.watermarks, table, rows)
            .await
    }

    async fn read_rows(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        rows: Rows<'_>,
    ) -> Result<Page, Error> {
        let (sql, most) = match rows {
            Rows::After {
                after,
                through,
                limit,
            } => (page_sql(table, after, through, limit)?, limit),
            Rows::Keys([]) => return Ok(Page::default()),
            Rows::Keys(keys) => (keys_sql(table, keys)?, keys.len()),
        };
        let what = format!("source: reading {}", table.collection());
        fetch_rows(conn, table, &sql, most).await.map_err(|e| {
            sluice_pg::classify(e, &what, |condition, _| {
                // This table alone waits for its grant (see `Backfill::run`).
                (condition == sluice_pg::Condition::InsufficientPrivilege).then(|| {
                    Error::configuration(
                        format!(
                            "sluice may not read {} (permission denied for the role {})",
                            table.collection(),
                            self.role
                        ),
                        format!(
                            "grant select on table {} to {};",
                            qualified(&table.schema, &table.name),
                            quote_ident(self.role)
                        ),
                    )
                })
            })
        })
    }

    /// A page's rows as records stamped at `lsn`, without the rows that raced, their payloads
    /// written as JSON text into one buffer.
    pub(super) fn records(
        &self,
        table: &Table,
        lsn: Lsn,
        rows: Page,
        raced: &std::collections::HashSet<String>,
    ) -> TextBatch {
        let collection = table.collection();
        let everything_raced = raced.contains("*");
        let fields = PayloadFields::new(
            self.types,
            table.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
        );
        let room = match rows.len() {
            0 => 0,
            _ => payload_room(
                table
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name.len(), rows.value(0, i).map_or(0, str::len))),
            ),
        };
        let mut batch = TextBatch::with_capacity(rows.len(), room * rows.len());
        let updated_at = OffsetDateTime::now_utc();
        for r in 0..rows.len() {
            let id = upstream_id(&rows.key(r));
            // The change stream holds a newer state of a raced row.
            if everything_raced || raced.contains(&id) {
                continue;
            }
            let record = Record {
                key: RecordKey::new(self.sync_id, collection.as_str(), id),
                provider: Provider::Postgres,
                version: Version::new(lsn.0, 0),
                upstream_updated_at: updated_at,
                change: Change::Upsert {
                    payload: Default::default(),
                },
            };
            batch.push_text(record, |out| fields.write(|i| Some(rows.value(r, i)), out));
        }
        batch
    }

    /// One read in a snapshot, reconciled with the change stream through a watermark
    /// (see [`Watermarks`]): the LSN to stamp it with, its rows, and the ids that raced.
    async fn watermarked_read(
        &self,
        conn: &mut PgConnection,
        watermarks: &Watermarks,
        table: &Table,
        rows: Rows<'_>,
    ) -> Result<(Lsn, Page, std::collections::HashSet<String>), Error> {
        use sqlx::Connection;
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| db("beginning a backfill page", e))?;
        sqlx::raw_sql("set transaction isolation level repeatable read, read only")
            .execute(&mut *tx)
            .await
            .map_err(|e| db("beginning a backfill page", e))?;
        // Held before the snapshot is taken (see `Watermarks::hold`).
        let mut held = watermarks.hold();
        // txid_current_snapshot() rather than pg_current_snapshot(), which PostgreSQL 12 lacks;
        // both print the same 64-bit `xmin:xmax:xip,…`.
        let snapshot: String =
            sqlx::query_scalar!(r#"select txid_current_snapshot()::text as "s!""#)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| db("reading the snapshot", e))?;
        held.taken(Snapshot::parse(&snapshot)?);
        let page = self.read_rows(&mut tx, table, rows).await?;
        tx.commit()
            .await
            .map_err(|e| db("ending a backfill page", e))?;
        // A standby cannot write WAL; the position it has replayed serves, since there a
        // transaction becomes visible exactly when its commit is replayed.
        let mark: String = sqlx::query_scalar!(
            r#"select case when pg_is_in_recovery() then pg_last_wal_replay_lsn()::text
                           else pg_logical_emit_message(true, 'sluice_watermark', '')::text end as "l!""#
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db("writing the backfill watermark", e))?;
        let mark: Lsn = mark.parse()?;
        watermarks
            .wait_past(mark, std::time::Duration::from_secs(120))
            .await?;
        let raced = watermarks.raced(held, &table.collection());
        Ok((mark, page, raced))
    }

    /// Tables whose data the server refused: not read again while the source runs.
    pub(super) fn stopped(&self) -> BTreeSet<String> {
        self.unreadable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, e)| e.class() == sluice_core::ErrorClass::GiveUp)
            .map(|(c, _)| c.clone())
            .collect()
    }

    pub fn set_unreadable(&self, collection: &str, error: Option<Error>) {
        let mut unreadable = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(e) => unreadable.insert(collection.to_owned(), e),
            None => unreadable.remove(collection),
        };
    }

    pub(super) fn set_progress(&self, f: impl FnOnce(&mut BackfillProgress)) {
        if let Ok(mut p) = self.progress.lock() {
            f(&mut p);
        }
    }
}

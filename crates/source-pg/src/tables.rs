//! Published tables: what the catalog says about them, how a row becomes a record (shared by
//! the backfill and the change stream, so both produce identical payloads and keys), and the
//! keyset-paged backfill.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_core::sql::{qualified, quote_ident, quote_literal};
use sluice_core::{
    Change, Error, Payload, Provider, Record, RecordKey, RecordStream, SourceState, SyncId, Version,
};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use time::OffsetDateTime;

use crate::values::{Kind, TypeMap, to_json};
use crate::wire::Lsn;

/// A published table as sluice reads it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Table {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// Columns in table order: name, type OID, the type as SQL (for casts).
    pub columns: Vec<TableColumn>,
    /// The key columns (primary key, else the replica identity index), in key order.
    pub key: Vec<String>,
    /// Estimated rows (`pg_class.reltuples`), for progress.
    pub estimate: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TableColumn {
    pub name: String,
    pub type_oid: u32,
    pub sql_type: String,
    /// Rows that existed before the column was added read a value for it that no change
    /// carried (`ADD COLUMN … DEFAULT`: `atthasmissing`, or a volatile default's rewrite).
    pub defaulted: bool,
}

impl Table {
    /// The collection id: `schema.table`.
    pub fn collection(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Columns of `self` that `before` did not have and that hold a value in rows written
    /// before they were added. PostgreSQL sends no change for those rows (the value lives in
    /// `pg_attribute.attmissingval`, or a volatile default rewrote the table unlogged for
    /// decoding), so the table has to be read again for them to arrive.
    pub fn columns_with_values_no_change_carried(&self, before: &Table) -> Vec<&str> {
        self.columns
            .iter()
            .filter(|c| c.defaulted && !before.columns.iter().any(|b| b.name == c.name))
            .map(|c| c.name.as_str())
            .collect()
    }
}

fn db(what: &str, e: sqlx::Error) -> Error {
    Error::unavailable(format!("source: {what}"), e)
}

/// The tables of `publication` (partition roots when it publishes via the root).
pub(crate) async fn published(
    conn: &mut PgConnection,
    publication: &str,
) -> Result<Vec<(String, String)>, Error> {
    let rows = sqlx::query!(
        r#"select schemaname as "schema!", tablename as "name!" from pg_publication_tables
           where pubname = $1 order by 1, 2"#,
        publication
    )
    .fetch_all(conn)
    .await
    .map_err(|e| db("listing the publication's tables", e))?;
    Ok(rows.into_iter().map(|r| (r.schema, r.name)).collect())
}

/// Describes one table by OID, or by schema and name when `oid` is `None`.
pub(crate) async fn describe(
    conn: &mut PgConnection,
    oid: Option<u32>,
    schema: &str,
    name: &str,
) -> Result<Option<Table>, Error> {
    let relation = qualified(schema, name);
    let head = sqlx::query!(
        r#"select c.oid::int8 as "oid!", n.nspname::text as "schema!", c.relname::text as "name!",
                  greatest(c.reltuples, 0)::int8 as "estimate!"
           from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where c.oid = coalesce($1::oid, to_regclass($2)::oid)"#,
        oid.map(|o| sqlx::postgres::types::Oid(o)) as Option<sqlx::postgres::types::Oid>,
        relation
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| db("describing a table", e))?;
    let Some(head) = head else {
        return Ok(None);
    };
    let oid = head.oid as u32;
    let columns = sqlx::query!(
        r#"select attname::text as "name!", atttypid::int8 as "type_oid!",
                  format_type(atttypid, atttypmod) as "sql_type!",
                  (atthasdef or atthasmissing) as "defaulted!"
           from pg_attribute
           where attrelid = $1::int8::oid and attnum > 0 and not attisdropped and attgenerated = ''
           order by attnum"#,
        oid as i64
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| db("reading a table's columns", e))?;
    let key = sqlx::query_scalar!(
        r#"select a.attname::text as "name!"
           from (select indkey, indisprimary from pg_index
                 where indrelid = $1::int8::oid and (indisprimary or indisreplident)
                 order by indisprimary desc limit 1) i,
                unnest(i.indkey) with ordinality as k(attnum, ord)
                join pg_attribute a on a.attrelid = $1::int8::oid and a.attnum = k.attnum
           order by k.ord"#,
        oid as i64
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| db("reading a table's key", e))?;
    Ok(Some(Table {
        oid,
        schema: head.schema,
        name: head.name,
        columns: columns
            .into_iter()
            .map(|c| TableColumn {
                name: c.name,
                type_oid: c.type_oid as u32,
                sql_type: c.sql_type,
                defaulted: c.defaulted,
            })
            .collect(),
        key,
        estimate: head.estimate as u64,
    }))
}

/// How many columns each of these tables has now (as [`describe`] counts them), by OID.
pub(crate) async fn column_counts(
    conn: &mut PgConnection,
    oids: &[i64],
) -> Result<std::collections::HashMap<u32, usize>, Error> {
    let rows = sqlx::query!(
        r#"select attrelid::int8 as "oid!", count(*)::int8 as "columns!"
           from pg_attribute
           where attrelid::int8 = any($1) and attnum > 0 and not attisdropped and attgenerated = ''
           group by attrelid"#,
        oids
    )
    .fetch_all(conn)
    .await
    .map_err(|e| db("counting the published tables' columns", e))?;
    Ok(rows
        .into_iter()
        .map(|r| (r.oid as u32, r.columns as usize))
        .collect())
}

/// The `upstream_id` for a row's key values (in key order): the value itself for a one-column
/// key, a JSON array of the values' text for a composite key. Deterministic: the same key
/// always gives the same id, from the backfill and from the change stream alike.
pub(crate) fn upstream_id(key: &[&str]) -> String {
    match key {
        [one] => (*one).to_owned(),
        many => serde_json::to_string(many).unwrap_or_default(),
    }
}

/// A row (column name, type, text) as a record payload.
pub(crate) fn payload<'a>(
    types: &TypeMap,
    values: impl Iterator<Item = (&'a str, u32, Option<&'a str>)>,
) -> Payload {
    values
        .map(|(name, oid, text)| {
            let value = match text {
                None => serde_json::Value::Null,
                Some(t) => to_json(types.get(oid).unwrap_or(&Kind::Text), t),
            };
            (name.to_owned(), value)
        })
        .collect()
}

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
}

/// Everything a backfill needs.
pub(crate) struct Backfill<'a> {
    pub sync_id: SyncId,
    pub stream: &'a Arc<dyn RecordStream>,
    pub types: &'a TypeMap,
    pub page: usize,
    pub owner: String,
    pub progress: &'a std::sync::Mutex<BackfillProgress>,
    /// Watermarks with the change stream (PostgreSQL 14 and newer; see [`Watermarks`]).
    /// Without them a page is stamped with the WAL position read before its snapshot.
    pub watermarks: Option<&'a Watermarks>,
    /// Tables asked to be read again.
    pub rereads: &'a TableRereads,
    /// The role sluice reads as (named in the `GRANT` when a table may not be read).
    pub role: &'a str,
    /// Tables that could not be read, with why; a table leaves it once it has been read.
    pub unreadable: &'a std::sync::Mutex<BTreeMap<String, Error>>,
}

/// Which rows of a table one consistent read takes.
#[derive(Clone, Copy)]
enum Rows<'k> {
    /// The next keyset page after this key (from the first row when `None`).
    After(Option<&'k [String]>),
    /// The rows with exactly these keys (those that still exist).
    Keys(&'k [Vec<String>]),
}

impl Backfill<'_> {
    /// Reads every table in `tables` that the stored state has not finished, or that was
    /// asked to be read again, in keyset pages. Each page is reconciled with the change
    /// stream (see [`Watermarks`]), so any change that races with it wins in the stream.
    pub async fn run(&self, conn: &mut PgConnection, tables: &[Table]) -> Result<(), Error> {
        let mut state: BackfillState = match self.stream.source_state(&self.owner).await? {
            Some(v) => serde_json::from_value(v).unwrap_or_default(),
            None => BackfillState::default(),
        };
        let rereads = self.rereads.load(self.stream).await?;
        let todo: Vec<(&Table, u64)> = tables
            .iter()
            .filter(|t| !t.key.is_empty())
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
            let mut after = match &state.current {
                Some((c, key)) if *c == collection && state.generation == *generation => {
                    Some(key.clone())
                }
                _ => None,
            };
            if after.is_none() {
                state.done.remove(&collection);
                state.generation = *generation;
            }
            let mut rows_here = 0u64;
            self.set_progress(|p| {
                *p = BackfillProgress {
                    collection: Some(collection.clone()),
                    rows: 0,
                    estimate: table.estimate,
                    remaining: todo.len() - i - 1,
                    done: false,
                    total_rows: state.rows,
                }
            });
            tracing::info!(collection, estimate = table.estimate, "backfill: reading");
            loop {
                let read = self
                    .read_consistent(conn, table, Rows::After(after.as_deref()))
                    .await;
                let (lsn, rows, raced) = match read {
                    Ok(read) => read,
                    Err(e) if e.class() == sluice_core::ErrorClass::FixConfiguration => {
                        // This table alone waits for its fix; the others are read, and its
                        // changes keep streaming. The next backfill tries it again.
                        tracing::warn!(collection, error = %e, "backfill: cannot read this table");
                        self.set_unreadable(&collection, Some(e));
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let n = rows.len() as u64;
                let last = rows.last().map(|(key, _)| key.clone());
                let records = self.records(table, lsn, rows, &raced);
                rows_here += n;
                state.rows += n;
                match last {
                    Some(key) if n as usize >= self.page => {
                        state.current = Some((collection.clone(), key.clone()));
                        after = Some(key);
                    }
                    _ => {
                        state.current = None;
                        state.done.insert(collection.clone());
                    }
                }
                self.stream
                    .append_with_state(
                        records,
                        Some(SourceState {
                            owner: self.owner.clone(),
                            value: serde_json::to_value(&state).unwrap_or_default(),
                        }),
                    )
                    .await?;
                self.set_progress(|p| {
                    p.rows = rows_here;
                    p.total_rows = state.rows;
                });
                if state.current.is_none() {
                    tracing::info!(collection, rows = rows_here, "backfill: table done");
                    self.set_unreadable(&collection, None);
                    break;
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
    pub async fn reread_keys(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        keys: &[Vec<String>],
    ) -> Result<usize, Error> {
        let mut appended = 0;
        for chunk in keys.chunks(self.page.max(1)) {
            let (lsn, rows, raced) = self.read_consistent(conn, table, Rows::Keys(chunk)).await?;
            let records = self.records(table, lsn, rows, &raced);
            appended += records.len();
            self.stream.append(records).await?;
        }
        Ok(appended)
    }

    /// Rows read at one point of the source's history, the LSN to stamp them with, and the
    /// ids a change the read could not see has touched since (their rows are dropped).
    async fn read_consistent(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        rows: Rows<'_>,
    ) -> Result<(Lsn, Page, std::collections::HashSet<String>), Error> {
        match self.watermarks {
            Some(watermarks) => self.watermarked_read(conn, watermarks, table, rows).await,
            None => {
                let lsn: String =
                    sqlx::query_scalar!(r#"select pg_current_wal_lsn()::text as "l!""#)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(|e| db("reading the WAL position", e))?;
                let page = self.read_rows(conn, table, rows).await?;
                Ok((lsn.parse()?, page, Default::default()))
            }
        }
    }

    async fn read_rows(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        rows: Rows<'_>,
    ) -> Result<Page, Error> {
        let read = match rows {
            Rows::After(after) => read_page(conn, table, after, self.page).await,
            Rows::Keys(keys) => read_keys(conn, table, keys).await,
        };
        read.map_err(|e| self.explain(table, e))
    }

    /// A read refused for want of `SELECT` becomes that table's configuration error, with
    /// the grant that fixes it.
    fn explain(&self, table: &Table, e: Error) -> Error {
        let denied = match &e {
            Error::Unavailable {
                source: Some(source),
                ..
            } => source
                .downcast_ref::<sqlx::Error>()
                .and_then(|e| e.as_database_error())
                .and_then(|d| d.code())
                .is_some_and(|code| code == "42501"),
            _ => false,
        };
        if !denied {
            return e;
        }
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
    }

    /// A page's rows as records stamped at `lsn`, without the rows that raced.
    fn records(
        &self,
        table: &Table,
        lsn: Lsn,
        rows: Page,
        raced: &std::collections::HashSet<String>,
    ) -> Vec<Record> {
        let collection = table.collection();
        let everything_raced = raced.contains("*");
        rows.into_iter()
            .filter_map(|(key, row)| {
                let keys: Vec<&str> = key.iter().map(String::as_str).collect();
                let id = upstream_id(&keys);
                // The change stream holds a newer state of a raced row.
                if everything_raced || raced.contains(&id) {
                    return None;
                }
                Some((id, row))
            })
            .map(|(id, row)| Record {
                key: RecordKey::new(self.sync_id, collection.as_str(), id),
                provider: Provider::Postgres,
                version: Version::new(lsn.0, 0),
                upstream_updated_at: OffsetDateTime::now_utc(),
                change: Change::Upsert {
                    payload: payload(
                        self.types,
                        table
                            .columns
                            .iter()
                            .zip(&row)
                            .map(|(c, v)| (c.name.as_str(), c.type_oid, v.as_deref())),
                    ),
                },
            })
            .collect()
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
        let snapshot: String = sqlx::query_scalar!(r#"select pg_current_snapshot()::text as "s!""#)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| db("reading the snapshot", e))?;
        let page = self.read_rows(&mut tx, table, rows).await?;
        tx.commit()
            .await
            .map_err(|e| db("ending a backfill page", e))?;
        let mark: String = sqlx::query_scalar!(
            r#"select pg_logical_emit_message(true, 'sluice_watermark', '')::text as "l!""#
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db("writing the backfill watermark", e))?;
        let mark: Lsn = mark.parse()?;
        watermarks
            .wait_past(mark, std::time::Duration::from_secs(120))
            .await?;
        let raced = watermarks.raced(&Snapshot::parse(&snapshot)?, &table.collection());
        Ok((mark, page, raced))
    }

    pub fn set_unreadable(&self, collection: &str, error: Option<Error>) {
        let mut unreadable = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
        match error {
            Some(e) => unreadable.insert(collection.to_owned(), e),
            None => unreadable.remove(collection),
        };
    }

    fn set_progress(&self, f: impl FnOnce(&mut BackfillProgress)) {
        if let Ok(mut p) = self.progress.lock() {
            f(&mut p);
        }
    }
}

/// Rows of a page: `(key texts, every column's text)`.
type Page = Vec<(Vec<String>, Vec<Option<String>>)>;

/// One keyset page: `(key texts, every column's text)` per row, in key order.
pub(crate) async fn read_page(
    conn: &mut PgConnection,
    table: &Table,
    after: Option<&[String]>,
    limit: usize,
) -> Result<Vec<(Vec<String>, Vec<Option<String>>)>, Error> {
    let keys: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let keys = keys.join(", ");
    let condition = match after {
        Some(after) => format!("where ({keys}) > ({})", key_literals(table, after)?),
        None => String::new(),
    };
    let sql = format!(
        "select {} from {} {condition} order by {keys} limit {limit}",
        select_list(table),
        qualified(&table.schema, &table.name),
    );
    fetch_rows(conn, table, &sql).await
}

/// The rows with these keys that still exist.
async fn read_keys(
    conn: &mut PgConnection,
    table: &Table,
    keys: &[Vec<String>],
) -> Result<Page, Error> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let columns: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let wanted = keys
        .iter()
        .map(|key| key_literals(table, key).map(|l| format!("({l})")))
        .collect::<Result<Vec<_>, Error>>()?;
    let sql = format!(
        "select {} from {} where ({}) in ({})",
        select_list(table),
        qualified(&table.schema, &table.name),
        columns.join(", "),
        wanted.join(", ")
    );
    fetch_rows(conn, table, &sql).await
}

fn select_list(table: &Table) -> String {
    table
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_literals(table: &Table, key: &[String]) -> Result<String, Error> {
    table
        .key
        .iter()
        .zip(key)
        .map(|(name, value)| {
            let column = table
                .columns
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "key column {name} is not a column of {}",
                        table.collection()
                    ))
                })?;
            Ok(format!("{}::{}", quote_literal(value), column.sql_type))
        })
        .collect::<Result<Vec<_>, Error>>()
        .map(|l| l.join(", "))
}

/// Runs `sql` as a simple query, so every value arrives as its type's output text: exactly
/// what pgoutput sends for the same value.
async fn fetch_rows(
    conn: &mut PgConnection,
    table: &Table,
    sql: &str,
) -> Result<Vec<(Vec<String>, Vec<Option<String>>)>, Error> {
    let rows = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db(&format!("reading {}", table.collection()), e))?;
    let positions: Vec<usize> = table
        .key
        .iter()
        .filter_map(|k| table.columns.iter().position(|c| &c.name == k))
        .collect();
    rows.iter()
        .map(|row| {
            let values = (0..table.columns.len())
                .map(|i| row.try_get_unchecked::<Option<String>, _>(i))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| db(&format!("decoding {}", table.collection()), e))?;
            let key = positions
                .iter()
                .map(|p| values[*p].clone().unwrap_or_default())
                .collect();
            Ok((key, values))
        })
        .collect()
}

/// The table's shape for layouts that mirror it: each column's type as SQL (built-in types as
/// `format_type` prints them, enums with their labels, domains as their base type), and the
/// key. A type that cannot be reproduced elsewhere (a composite, a type from an extension) is
/// described as `text`, with the original named.
pub(crate) async fn collection_schema(
    conn: &mut PgConnection,
    table: &Table,
) -> Result<sluice_core::CollectionSchema, Error> {
    let rows = sqlx::query!(
        r#"select a.attname::text as "name!",
                  format_type(a.atttypid, a.atttypmod) as "formatted!",
                  t.typtype::text as "typtype!",
                  tn.nspname::text as "schema!",
                  et.typtype::text as elem_typtype,
                  etn.nspname::text as elem_schema,
                  (select array_agg(e.enumlabel::text order by e.enumsortorder) from pg_enum e
                    where e.enumtypid = case when t.typtype = 'e' then t.oid else et.oid end) as labels,
                  case when t.typtype = 'd' then format_type(t.typbasetype, t.typtypmod) end as domain_base,
                  coalesce(et.typname::text, t.typname::text) as "type_name!"
           from pg_attribute a
           join pg_type t on t.oid = a.atttypid
           join pg_namespace tn on tn.oid = t.typnamespace
           left join pg_type et on et.oid = t.typelem and t.typcategory = 'A'
           left join pg_namespace etn on etn.oid = et.typnamespace
           where a.attrelid = $1::int8::oid and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''
           order by a.attnum"#,
        table.oid as i64
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| db("describing a table's columns", e))?;
    let builtin = |s: &str| s == "pg_catalog";
    let columns = rows
        .into_iter()
        .map(|r| {
            let (sql_type, enum_labels, unsupported) = if r.typtype == "e" {
                (r.type_name, r.labels, None)
            } else if r.elem_typtype.as_deref() == Some("e") {
                (format!("{}[]", r.type_name), r.labels, None)
            } else if r.typtype == "d" {
                match r.domain_base {
                    Some(base) if !base.contains('.') => (base, None, None),
                    _ => ("text".to_owned(), None, Some(r.formatted)),
                }
            } else if builtin(&r.schema) && r.elem_schema.as_deref().is_none_or(builtin) {
                (r.formatted, None, None)
            } else {
                ("text".to_owned(), None, Some(r.formatted))
            };
            sluice_core::ColumnSchema {
                name: r.name,
                sql_type,
                enum_labels,
                unsupported,
            }
        })
        .collect();
    Ok(sluice_core::CollectionSchema {
        columns,
        key: table.key.clone(),
    })
}

/// A snapshot as `pg_current_snapshot()` prints it (`xmin:xmax:xip,…`), reduced to the 32-bit
/// transaction ids pgoutput sends.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Snapshot {
    xmin: u32,
    xmax: u32,
    in_progress: std::collections::HashSet<u32>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = || Error::invalid(format!("unexpected snapshot {text:?}"));
        let mut parts = text.split(':');
        let xid = |s: Option<&str>| -> Result<u32, Error> {
            Ok(s.ok_or_else(bad)?.parse::<u64>().map_err(|_| bad())? as u32)
        };
        let xmin = xid(parts.next())?;
        let xmax = xid(parts.next())?;
        let in_progress = match parts.next() {
            Some("") | None => Default::default(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse::<u64>().map(|x| x as u32).map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// True when `xid`'s changes were not visible to this snapshot (it was running, or
    /// started after). Comparisons are modulo 2^32, as PostgreSQL's.
    pub fn hides(&self, xid: u32) -> bool {
        self.in_progress.contains(&xid) || (xid.wrapping_sub(self.xmax) as i32) >= 0
    }

    /// True when `xid` is older than every transaction this snapshot could not see.
    fn before_horizon(&self, xid: u32) -> bool {
        (xid.wrapping_sub(self.xmin) as i32) < 0
    }
}

/// What the change stream has processed, shared with the backfill, so that each page can be
/// reconciled with changes that raced it (a DBLog-style watermark):
///
/// 1. a page is read in one snapshot (`pg_current_snapshot()` gives what it could not see);
/// 2. a logical message is written (`pg_logical_emit_message`), and the backfill waits until
///    the change stream has processed up to it;
/// 3. page rows whose key was changed by a transaction the snapshot could not see are dropped
///    (the stream already holds the newer state); the rest are stamped at the message's LSN, so
///    every change committed later wins, and every change the page includes loses.
///
/// This holds even for a transaction whose commit record precedes the page but which was not
/// yet visible to its snapshot, which an LSN read before the snapshot cannot account for.
#[derive(Default)]
pub(crate) struct Watermarks {
    state: std::sync::Mutex<WatermarkState>,
    moved: tokio::sync::Notify,
}

#[derive(Default)]
struct WatermarkState {
    through: Lsn,
    /// Reads (a backfill, re-reads of single rows) that need changes logged.
    users: usize,
    /// (xid, collection, upstream id or `*` for a truncate)
    changes: Vec<(u32, String, String)>,
}

impl Watermarks {
    fn state(&self) -> std::sync::MutexGuard<'_, WatermarkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A read starts that needs changes logged from now on (before its snapshot is taken).
    pub fn acquire(&self) {
        self.state().users += 1;
    }

    /// A read that [`acquire`](Self::acquire)d is over; the log is cleared after the last.
    pub fn release(&self) {
        let mut state = self.state();
        state.users = state.users.saturating_sub(1);
        if state.users == 0 {
            state.changes.clear();
        }
    }

    /// The change stream saw `xid` change `id` (`*`: the whole collection) of `collection`.
    pub fn record(&self, xid: u32, collection: &str, id: &str) {
        let mut state = self.state();
        if state.users > 0 {
            state
                .changes
                .push((xid, collection.to_owned(), id.to_owned()));
        }
    }

    /// The change stream has processed everything up to `lsn`.
    pub fn passed(&self, lsn: Lsn) {
        let mut state = self.state();
        if lsn > state.through {
            state.through = lsn;
            drop(state);
            self.moved.notify_waiters();
        }
    }

    /// Waits until the change stream has processed `lsn`.
    pub async fn wait_past(&self, lsn: Lsn, limit: std::time::Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let moved = self.moved.notified();
            if self.state().through >= lsn {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                return Err(Error::unavailable(
                    format!(
                        "source: the change stream did not reach the backfill watermark {lsn} in {}s",
                        limit.as_secs()
                    ),
                    "watermark",
                ));
            }
        }
    }

    /// Ids of `collection` changed by transactions `snapshot` could not see (`*` when one of
    /// them truncated it); forgets changes every later snapshot can see.
    pub fn raced(
        &self,
        snapshot: &Snapshot,
        collection: &str,
    ) -> std::collections::HashSet<String> {
        let mut state = self.state();
        state
            .changes
            .retain(|(xid, _, _)| !snapshot.before_horizon(*xid));
        state
            .changes
            .iter()
            .filter(|(xid, c, _)| c == collection && snapshot.hides(*xid))
            .map(|(_, _, id)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod watermark_tests {
    use super::*;

    #[test]
    fn snapshots_hide_running_and_later_transactions_modulo_2_32() {
        let s = Snapshot::parse("100:110:102,105").unwrap();
        assert!(!s.hides(99) && !s.hides(101) && !s.hides(109));
        assert!(s.hides(102) && s.hides(105) && s.hides(110) && s.hides(4_000));
        // 64-bit ids from pg_current_snapshot() are compared by their low 32 bits.
        let wrapped = Snapshot::parse("4294967290:4294967306:").unwrap();
        assert!(!wrapped.hides(4_294_967_295));
        assert!(wrapped.hides(10));
        assert!(wrapped.before_horizon(4_294_967_280));
    }

    #[test]
    fn raced_keys_are_those_of_hidden_transactions() {
        let w = Watermarks::default();
        w.acquire();
        w.record(101, "public.t", "1"); // visible to the snapshot below
        w.record(105, "public.t", "2"); // running when it was taken
        w.record(120, "public.t", "3"); // started after
        w.record(120, "public.other", "4");
        let s = Snapshot::parse("100:110:105").unwrap();
        let raced = w.raced(&s, "public.t");
        assert_eq!(raced, ["2".to_owned(), "3".to_owned()].into());
        w.release();
        assert!(w.raced(&s, "public.t").is_empty());
    }
}

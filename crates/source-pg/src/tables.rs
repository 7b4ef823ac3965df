//! Published tables: what the catalog says about them, how a row becomes a record (shared by
//! the backfill and the change stream, so both produce identical payloads and keys), and the
//! keyset-paged backfill.

use std::collections::BTreeSet;
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
}

impl Table {
    /// The collection id: `schema.table`.
    pub fn collection(&self) -> String {
        format!("{}.{}", self.schema, self.name)
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
                  format_type(atttypid, atttypmod) as "sql_type!"
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
            })
            .collect(),
        key,
        estimate: head.estimate as u64,
    }))
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
    /// Rows appended so far, all tables.
    pub rows: u64,
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
}

impl Backfill<'_> {
    /// Reads every table in `tables` that the stored state has not finished, in keyset pages.
    /// Each page is stamped with the LSN read before its snapshot, so any change that races
    /// with it carries a greater version and wins in the stream.
    pub async fn run(&self, conn: &mut PgConnection, tables: &[Table]) -> Result<(), Error> {
        let mut state: BackfillState = match self.stream.source_state(&self.owner).await? {
            Some(v) => serde_json::from_value(v).unwrap_or_default(),
            None => BackfillState::default(),
        };
        let todo: Vec<&Table> = tables
            .iter()
            .filter(|t| !state.done.contains(&t.collection()) && !t.key.is_empty())
            .collect();
        for (i, table) in todo.iter().enumerate() {
            let collection = table.collection();
            let mut after = match &state.current {
                Some((c, key)) if *c == collection => Some(key.clone()),
                _ => None,
            };
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
                let (lsn, rows, raced) = match self.watermarks {
                    Some(watermarks) => {
                        self.watermarked_page(conn, watermarks, table, after.as_deref())
                            .await?
                    }
                    None => {
                        let lsn: String =
                            sqlx::query_scalar!(r#"select pg_current_wal_lsn()::text as "l!""#)
                                .fetch_one(&mut *conn)
                                .await
                                .map_err(|e| db("reading the WAL position", e))?;
                        let rows = read_page(conn, table, after.as_deref(), self.page).await?;
                        (lsn.parse()?, rows, Default::default())
                    }
                };
                let read = rows.len() as u64;
                let last = rows.last().map(|(key, _)| key.clone());
                let everything_raced = raced.contains("*");
                let records: Vec<Record> = rows
                    .into_iter()
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
                    .collect();
                let n = read;
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
                    break;
                }
            }
        }
        self.set_progress(|p| {
            p.collection = None;
            p.remaining = 0;
            p.done = true;
        });
        Ok(())
    }

    /// One page read in a snapshot, reconciled with the change stream through a watermark
    /// (see [`Watermarks`]): the LSN to stamp it with, its rows, and the ids that raced.
    async fn watermarked_page(
        &self,
        conn: &mut PgConnection,
        watermarks: &Watermarks,
        table: &Table,
        after: Option<&[String]>,
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
        let rows = read_page(&mut tx, table, after, self.page).await?;
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
        Ok((mark, rows, raced))
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

/// The current row for one key, if it still exists.
pub(crate) async fn read_row(
    conn: &mut PgConnection,
    table: &Table,
    key: &[String],
) -> Result<Option<Vec<Option<String>>>, Error> {
    let keys: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let sql = format!(
        "select {} from {} where ({}) = ({})",
        select_list(table),
        qualified(&table.schema, &table.name),
        keys.join(", "),
        key_literals(table, key)?
    );
    Ok(fetch_rows(conn, table, &sql)
        .await?
        .pop()
        .map(|(_, row)| row))
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
    active: bool,
    /// (xid, collection, upstream id or `*` for a truncate)
    changes: Vec<(u32, String, String)>,
}

impl Watermarks {
    fn state(&self) -> std::sync::MutexGuard<'_, WatermarkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns change logging on for a backfill (off clears it).
    pub fn set_active(&self, active: bool) {
        let mut state = self.state();
        state.active = active;
        if !active {
            state.changes.clear();
        }
    }

    /// The change stream saw `xid` change `id` (`*`: the whole collection) of `collection`.
    pub fn record(&self, xid: u32, collection: &str, id: &str) {
        let mut state = self.state();
        if state.active {
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
        w.set_active(true);
        w.record(101, "public.t", "1"); // visible to the snapshot below
        w.record(105, "public.t", "2"); // running when it was taken
        w.record(120, "public.t", "3"); // started after
        w.record(120, "public.other", "4");
        let s = Snapshot::parse("100:110:105").unwrap();
        let raced = w.raced(&s, "public.t");
        assert_eq!(raced, ["2".to_owned(), "3".to_owned()].into());
        w.set_active(false);
        assert!(w.raced(&s, "public.t").is_empty());
    }
}

//! Published tables: what the catalog says about them and how a row becomes a record (shared
//! by the backfill and the change stream, so both produce identical payloads and keys). The
//! keyset-paged backfill is in `backfill`, its parallel readers (one key range each) in
//! `ranges`, and its reconciliation with the change stream in `watermarks`.

use sluice_core::Error;
use sluice_core::sql::qualified;
use sqlx::PgConnection;

use crate::values::{Kind, TypeMap, json_string, write_json};

mod backfill;
mod page;
mod ranges;
mod watermarks;

pub(crate) use backfill::{Backfill, TableRereads};
pub use backfill::{BackfillProgress, CollectionProgress};
pub(crate) use watermarks::Watermarks;

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
    sluice_pg::classify(e, &format!("source: {what}"), |_, _| None)
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

/// How long a relation message waits for the catalog to show the transaction that sent it.
const CATALOG_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// Describes the table a relation message is about, as the transaction being decoded left it.
///
/// The server sends a transaction as soon as its commit is in the WAL, which can be a moment
/// before other sessions see it committed: until then the catalog still shows the columns as
/// they were (a column retyped or added in that transaction, its old shape stored for the
/// mirror). So the catalog is read again until it shows every column the message lists, with
/// the type it was sent with, for at most [`CATALOG_CATCH_UP`]; after that (a later
/// transaction already changed the table again) the catalog's description is taken as it is.
/// A column the catalog has and the message does not (dropped since, or outside the
/// publication's column list) does not make it wait; nor does a table dropped since.
pub(crate) async fn describe_sent(
    conn: &mut PgConnection,
    sent: &crate::pgoutput::Relation,
) -> Result<Option<Table>, Error> {
    let deadline = std::time::Instant::now() + CATALOG_CATCH_UP;
    while !shows_sent(conn, sent).await? && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    describe(conn, Some(sent.id), &sent.schema, &sent.name).await
}

/// Whether the catalog shows every column of `sent` at the type it was sent with (generated
/// columns included: a publication may send them, though sluice does not read them), or no
/// longer has the table.
async fn shows_sent(
    conn: &mut PgConnection,
    sent: &crate::pgoutput::Relation,
) -> Result<bool, Error> {
    let columns = sqlx::query!(
        r#"select attname::text as "name!", atttypid::int8 as "type_oid!"
           from pg_attribute
           where attrelid = $1::int8::oid and attnum > 0 and not attisdropped"#,
        i64::from(sent.id)
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| db("reading a table's columns", e))?;
    Ok(columns.is_empty()
        || sent.columns.iter().all(|c| {
            columns
                .iter()
                .any(|k| k.name == c.name && k.type_oid == i64::from(c.type_oid))
        }))
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
    sluice_core::UpstreamId::from_key(key).0
}

/// Room to reserve for a row's payload text, from each column's name and text lengths, with
/// quotes and separators (a guess; the buffer grows if it is short).
pub(crate) fn payload_room(lengths: impl Iterator<Item = (usize, usize)>) -> usize {
    64 + lengths.map(|(name, text)| name + text + 8).sum::<usize>()
}

/// A table's columns as its rows' payloads are written: in the payload's key order (sorted as
/// a [`sluice_core::Payload`] map holds them: by bytes, not characters), each with its key
/// already in JSON (`"name":`) and its type's [`Kind`]. Made once for a table or a relation,
/// so that a row's payload costs no escaping of names and no type look-ups.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PayloadFields {
    fields: Vec<Field>,
}

#[derive(Clone, Debug, PartialEq)]
struct Field {
    /// The column's index in the row.
    column: usize,
    /// `"name":`, escaped.
    key: Box<str>,
    kind: Kind,
}

impl PayloadFields {
    /// The fields of `columns` (name and type OID, in the row's column order); a type `types`
    /// does not know is written as text.
    pub(crate) fn new<'a>(types: &TypeMap, columns: impl Iterator<Item = (&'a str, u32)>) -> Self {
        let columns: Vec<(&str, u32)> = columns.collect();
        let mut order: Vec<usize> = (0..columns.len()).collect();
        order.sort_by_key(|&i| columns[i].0);
        let fields = order
            .into_iter()
            .map(|column| {
                let (name, oid) = columns[column];
                let mut key = String::with_capacity(name.len() + 3);
                json_string(name, &mut key);
                key.push(':');
                Field {
                    column,
                    key: key.into(),
                    kind: types.get(oid).cloned().unwrap_or(Kind::Text),
                }
            })
            .collect();
        Self { fields }
    }

    /// Appends a row's payload to `out` as JSON text: `value(i)` is column `i`'s text
    /// (`Some(None)`: NULL), or `None` to leave the column out. The same bytes as serialising
    /// the row's map of [`crate::values::to_json`] values, with no map and no value per field.
    pub(crate) fn write<'a>(
        &self,
        value: impl Fn(usize) -> Option<Option<&'a str>>,
        out: &mut String,
    ) {
        out.push('{');
        let mut first = true;
        for field in &self.fields {
            let Some(text) = value(field.column) else {
                continue;
            };
            if !first {
                out.push(',');
            }
            first = false;
            out.push_str(&field.key);
            match text {
                None => out.push_str("null"),
                Some(t) => write_json(&field.kind, t, out),
            }
        }
        out.push('}');
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::values::to_json;
    use sluice_core::Payload;

    /// A row written as text is the serialised map of its values: keys sorted as the map
    /// sorts them (bytes, not characters), names that need escaping, NULLs, columns left out,
    /// a type the map does not know written as text.
    #[test]
    fn a_written_payload_is_the_serialised_map_of_its_values() {
        let types = TypeMap::builtin();
        let columns: [(&str, u32, Option<&str>); 10] = [
            ("zeta", 20, Some("-12")),
            ("Alpha", 1700, Some("1.50")),
            ("é", 25, Some("x\"y")),
            ("a\"b\n", 16, Some("t")),
            ("alpha", 701, Some("1e+30")),
            ("note", 25, None),
            ("gone", 25, Some("left out")),
            ("j", 3802, Some(r#"{"b": 1, "a": [true]}"#)),
            ("unknown", 4_000_000_000, Some("12")),
            ("\u{0}\u{1f}\\", 1016, Some("{1,NULL,-3}")),
        ];
        let fields = PayloadFields::new(&types, columns.iter().map(|c| (c.0, c.1)));
        let mut written = String::new();
        fields.write(
            |i| Some(columns[i]).filter(|c| c.0 != "gone").map(|c| c.2),
            &mut written,
        );
        let map: Payload = columns
            .iter()
            .filter(|c| c.0 != "gone")
            .map(|&(name, oid, text)| {
                let value = text.map_or(serde_json::Value::Null, |t| {
                    to_json(types.get(oid).unwrap_or(&Kind::Text), t)
                });
                (name.to_owned(), value)
            })
            .collect();
        assert_eq!(written, serde_json::to_string(&map).unwrap());
        assert!(written.contains(r#""unknown":"12""#), "{written}");
        let mut empty = String::new();
        PayloadFields::new(&types, std::iter::empty()).write(|_| None, &mut empty);
        assert_eq!(empty, "{}");
        let mut none = String::new();
        fields.write(|_| None, &mut none);
        assert_eq!(none, "{}", "every column left out");
    }

    /// The room reserved for a row holds it when its values need no escaping, long column
    /// names included (the guess once left names out, and every such row's buffer grew).
    #[test]
    fn the_room_reserved_for_a_row_holds_it() {
        let types = TypeMap::builtin();
        let name = "a_rather_long_column_name_as_real_schemas_have";
        let columns: Vec<(String, u32, Option<&str>)> = (0..30)
            .map(|i| {
                (
                    format!("{name}_{i}"),
                    if i % 2 == 0 { 25 } else { 20 },
                    Some("1234"),
                )
            })
            .collect();
        let fields = PayloadFields::new(&types, columns.iter().map(|c| (c.0.as_str(), c.1)));
        let mut written = String::new();
        fields.write(|i| columns.get(i).map(|c| c.2), &mut written);
        let room = payload_room(columns.iter().map(|c| (c.0.len(), 4)));
        assert!(written.len() <= room, "{} > {room}", written.len());
    }

    /// A relation message whose columns the catalog does not show yet (its transaction's
    /// commit not yet visible to other sessions) waits until it does; one that lists fewer
    /// columns does not wait; one the catalog never catches up with gets the catalog's shape
    /// after the bound.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_relation_message_waits_for_the_catalog_to_show_its_columns() {
        use crate::pgoutput::{Column, Relation};
        use std::time::{Duration, Instant};

        let pg = std::sync::Arc::new(sluice_localpg::Cluster::options().start().unwrap());
        let mut conn = pg.admin("postgres").await.unwrap();
        sqlx::raw_sql(
            "create table t (id int primary key, v varchar(20), w text, g int generated always as (id * 2) stored)",
        )
            .execute(&mut conn)
            .await
            .unwrap();
        let oid: i64 = sqlx::query_scalar("select 'public.t'::regclass::oid::int8")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        let sent = |columns: &[(&str, u32)]| {
            Relation::new(
                oid as u32,
                "public".into(),
                "t".into(),
                columns
                    .iter()
                    .map(|&(name, type_oid)| Column {
                        name: name.into(),
                        type_oid,
                    })
                    .collect(),
            )
        };
        let v_type = |t: &Table| {
            t.columns
                .iter()
                .find(|c| c.name == "v")
                .map(|c| c.sql_type.clone())
        };

        // Fewer columns than the catalog, with their types, and a generated column (which
        // sluice does not read): at once.
        let started = Instant::now();
        let table = describe_sent(&mut conn, &sent(&[("id", 23), ("v", 1043), ("g", 23)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v_type(&table).as_deref(), Some("character varying(20)"));
        assert!(started.elapsed() < Duration::from_secs(1));

        // `v` sent as integer, which the catalog shows 300 ms later.
        let alter = tokio::spawn({
            let pg = pg.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                pg.execute(
                    "postgres",
                    "alter table t alter column v type int using length(v)",
                )
                .await
                .unwrap();
            }
        });
        let started = Instant::now();
        let table = describe_sent(&mut conn, &sent(&[("id", 23), ("v", 23), ("w", 25)]))
            .await
            .unwrap()
            .unwrap();
        alter.await.unwrap();
        assert_eq!(v_type(&table).as_deref(), Some("integer"));
        assert!(started.elapsed() >= Duration::from_millis(250));

        // Sent as text, but the table has changed again since: the catalog's shape, in time.
        let started = Instant::now();
        let table = describe_sent(&mut conn, &sent(&[("id", 23), ("v", 25)]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(v_type(&table).as_deref(), Some("integer"));
        let waited = started.elapsed();
        assert!(
            waited >= CATALOG_CATCH_UP && waited < CATALOG_CATCH_UP + Duration::from_secs(2),
            "{waited:?}"
        );
    }
}

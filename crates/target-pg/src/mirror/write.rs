//! Writing a batch: rows encoded as COPY text, copied in or merged, deletes, the checkpoint,
//! a partition of the records per connection.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use serde_json::value::RawValue;
use sluice_core::sql::{qualified, quote_ident as q};
use sluice_core::{Batch, Change, ConsumerId, Error, Payload, RecordKey, Seq, StreamEntry, SyncId};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::checkpoint::partition_of;
use crate::copy::{
    CopyFailure, PIECE_ROWS, copy, copy_pieces_binary_first, copy_pieces_if_all_new,
    probing_key_index, push_text,
};

use super::binary::Binary;
use super::fields::{self, Columns};
use super::shape::{Kind, TableDef};
use super::{SchemaMirrorTarget, db};

/// One partition's share of a batch: per table, its newest version of each key.
type Share<'a> = Vec<(&'a TableDef, Vec<&'a StreamEntry>)>;

impl SchemaMirrorTarget {
    /// Makes every table the batch touches match its collection's shape (on the first
    /// connection), then writes each partition's share on its own connection, all at once.
    pub(super) async fn write(&self, consumer: &ConsumerId, batch: &Batch) -> Result<(), Error> {
        // Group by (sync, collection); the newest version per key wins.
        let mut groups: BTreeMap<(SyncId, String), Vec<&StreamEntry>> = BTreeMap::new();
        for entry in &batch.entries {
            groups
                .entry((
                    entry.record.key.sync_id,
                    entry.record.key.collection_id.0.clone(),
                ))
                .or_default()
                .push(entry);
        }
        let defs = self
            .with_connection(0, async |conn| {
                let mut defs = Vec::with_capacity(groups.len());
                for (sync_id, collection) in groups.keys() {
                    defs.push(self.table_for(conn, *sync_id, collection).await?);
                }
                Ok(defs)
            })
            .await?;
        let n = self.connections.len();
        let mut shares: Vec<Share<'_>> = vec![Vec::new(); n];
        for (def, entries) in defs.iter().zip(groups.values()) {
            let mut newest: HashMap<&str, &StreamEntry> = HashMap::new();
            for e in entries {
                let id = e.record.key.upstream_id.0.as_str();
                match newest.get(id) {
                    Some(old) if old.record.version >= e.record.version => {}
                    _ => {
                        newest.insert(id, e);
                    }
                }
            }
            // In stream order: rows land in the table in the order they were written upstream
            // (a backfill's in key order, so the key's index grows at its end), and a batch is
            // copied the same way every time.
            let mut kept: Vec<&StreamEntry> = newest.into_values().collect();
            kept.sort_unstable_by_key(|e| e.seq);
            let mut split: Vec<Vec<&StreamEntry>> = vec![Vec::new(); n];
            for e in kept {
                split[partition_of(&e.record.key, n)].push(e);
            }
            for (share, entries) in shares.iter_mut().zip(split) {
                if !entries.is_empty() {
                    share.push((def, entries));
                }
            }
        }
        let work = shares.iter().enumerate().map(|(p, share)| {
            self.with_connection(p, async move |conn| {
                self.write_share(conn, consumer, p, share, batch.through)
                    .await
            })
        });
        let results: Vec<Result<(), Error>> = futures_util::future::join_all(work).await;
        results.into_iter().collect()
    }

    /// One partition's share and its checkpoint row, in one transaction; nothing when the
    /// row is already at or past `through` (a replay). NUL replacements are counted once the
    /// transaction commits.
    async fn write_share(
        &self,
        conn: &mut PgConnection,
        consumer: &ConsumerId,
        partition: usize,
        share: &Share<'_>,
        through: Seq,
    ) -> Result<(), Error> {
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| db(&self.name, "beginning a batch", e))?;
        let key = self.checkpoint_key();
        let stored = self
            .checkpoints
            .lock(&mut tx, &consumer.0, &key, partition)
            .await
            .map_err(|e| db(&self.name, "reading the checkpoint", e))?;
        if stored.is_some_and(|s| s >= through) {
            // Already applied: an idempotent replay. Ended now, not when the connection is
            // next used: the row's lock would hold up the other connections until then.
            return tx
                .rollback()
                .await
                .map_err(|e| db(&self.name, "ending a replayed batch", e));
        }
        let mut sanitized = Vec::new();
        for (def, entries) in share {
            self.write_table(&mut tx, partition, def, entries, &mut sanitized)
                .await?;
        }
        self.checkpoints
            .write(&mut tx, &consumer.0, &key, partition, through)
            .await
            .map_err(|e| db(&self.name, "storing the checkpoint", e))?;
        tx.commit()
            .await
            .map_err(|e| db(&self.name, "committing a batch", e))?;
        if !sanitized.is_empty() {
            self.sanitized(&sanitized);
        }
        Ok(())
    }

    /// Writes one table's share of a batch; records whose NULs were replaced are pushed onto
    /// `sanitized`.
    pub(super) async fn write_table(
        &self,
        conn: &mut PgConnection,
        partition: usize,
        def: &TableDef,
        entries: &[&StreamEntry],
        sanitized: &mut Vec<RecordKey>,
    ) -> Result<(), Error> {
        let optimistic_key = (partition, def.name.clone());
        let table = qualified(&self.schema, &def.name);
        let (upserts, deletes): (Vec<&StreamEntry>, Vec<&StreamEntry>) =
            entries.iter().partition(|e| !e.record.is_tombstone());
        let columns: Vec<String> = def.columns.iter().map(|c| q(&c.name)).collect();
        let key: Vec<String> = def.key.iter().map(|k| q(k)).collect();
        let fail = |what: &str, e: sqlx::Error| db(&self.name, &format!("{what} {table}"), e);
        // A COPY's failure as the batch's error: an encoding error as it is.
        let copy_failed = |e: CopyFailure<Error>| match e {
            CopyFailure::Server(e) => fail("copying into", e),
            CopyFailure::Encoding(e) => e,
        };
        // Binary rows while the table's types and the values allow, then text (see
        // `binary.rs`).
        let binary = Binary::new(def);
        let in_binary = |copy: &str| {
            binary
                .as_ref()
                .map(|_| format!("{copy} with (format binary)"))
        };
        let copy_in = format!("copy {table} ({}) from stdin", columns.join(", "));
        let copy_in_binary = in_binary(&copy_in);
        let mut upserts = upserts;
        // Optimistic first (the common case during a backfill): copy every upsert straight in,
        // inside a savepoint. A key that already exists aborts that COPY; the table is then
        // marked, and batches for it take the lookup path until one finds no existing key.
        let optimistic = !upserts.is_empty()
            && *self
                .optimistic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&optimistic_key)
                .unwrap_or(&true);
        if optimistic {
            let mut replaced = Vec::new();
            let copied = copy_pieces_if_all_new(
                conn,
                copy_in_binary.as_deref(),
                &copy_in,
                upserts.chunks(PIECE_ROWS),
                encoder(def, binary.as_ref(), &mut replaced),
            )
            .await
            .map_err(copy_failed)?;
            match copied {
                Some(_) => {
                    sanitized.extend(replaced);
                    upserts.clear();
                }
                None => {
                    self.optimistic
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(optimistic_key.clone(), false);
                }
            }
        }
        // With a one-column key, rows whose key is not in the table yet are copied straight in;
        // only the others go through the staging table and the merge.
        let mut fresh: Vec<&StreamEntry> = Vec::new();
        if let [k] = def.key.as_slice()
            && let Some(key_type) = def
                .columns
                .iter()
                .find(|c| &c.name == k)
                .map(|c| &c.sql_type)
            && !upserts.is_empty()
        {
            let ids: Vec<&str> = upserts
                .iter()
                .map(|e| e.record.key.upstream_id.0.as_str())
                .collect();
            let existing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "select {k}::text from {table} where {k} = any($1::text[]::{key_type}[])",
                k = q(k)
            )))
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| fail("looking up keys in", e))?;
            if existing.is_empty() {
                self.optimistic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(optimistic_key.clone(), true);
            }
            let existing: std::collections::HashSet<String> = existing.into_iter().collect();
            (upserts, fresh) = upserts
                .into_iter()
                .partition(|e| existing.contains(&e.record.key.upstream_id.0));
        }
        if !fresh.is_empty() {
            copy_pieces_binary_first(
                conn,
                copy_in_binary.as_deref(),
                &copy_in,
                fresh.chunks(PIECE_ROWS),
                encoder(def, binary.as_ref(), sanitized),
            )
            .await
            .map_err(copy_failed)?;
        }
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let joined = |statement: String| {
            let indexed = self
                .key_indexed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&def.name)
                .copied()
                .unwrap_or(false);
            if indexed {
                probing_key_index(&statement)
            } else {
                statement
            }
        };
        sqlx::raw_sql(AssertSqlSafe(format!(
            "create temp table if not exists _sluice_mirror_stage (like {table}) on commit drop;
             truncate _sluice_mirror_stage;"
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| fail("staging", e))?;
        // A staging table per target table in one transaction: dropped before the next table.
        if !upserts.is_empty() {
            let copy_stage = format!(
                "copy _sluice_mirror_stage ({}) from stdin",
                columns.join(", ")
            );
            copy_pieces_binary_first(
                conn,
                in_binary(&copy_stage).as_deref(),
                &copy_stage,
                upserts.chunks(PIECE_ROWS),
                encoder(def, binary.as_ref(), sanitized),
            )
            .await
            .map_err(copy_failed)?;
            let non_key: Vec<&str> = def
                .columns
                .iter()
                .filter(|c| !def.key.contains(&c.name))
                .map(|c| c.name.as_str())
                .collect();
            let cols = columns.join(", ");
            // MERGE where the server has it (15+), INSERT … ON CONFLICT before: the same
            // result, and MERGE is the faster of the two (docs/versions.md).
            let statement = if conn.server_version_num().is_some_and(|v| v >= 150_000) {
                let on: Vec<String> = key.iter().map(|k| format!("t.{k} = s.{k}")).collect();
                let set: Vec<String> = non_key
                    .iter()
                    .map(|c| format!("{n} = s.{n}", n = q(c)))
                    .collect();
                let values: Vec<String> = columns.iter().map(|c| format!("s.{c}")).collect();
                joined(format!(
                    "merge into {table} as t using _sluice_mirror_stage as s on {on} {matched}when not matched then insert ({cols}) values ({values})",
                    on = on.join(" and "),
                    matched = if set.is_empty() {
                        String::new()
                    } else {
                        format!("when matched then update set {} ", set.join(", "))
                    },
                    values = values.join(", ")
                ))
            } else {
                let set: Vec<String> = non_key
                    .iter()
                    .map(|c| format!("{n} = excluded.{n}", n = q(c)))
                    .collect();
                let on_conflict = if set.is_empty() {
                    "do nothing".to_owned()
                } else {
                    format!("do update set {}", set.join(", "))
                };
                format!(
                    "insert into {table} ({cols}) select {cols} from _sluice_mirror_stage on conflict ({key}) {on_conflict}",
                    key = key.join(", ")
                )
            };
            sqlx::raw_sql(AssertSqlSafe(statement))
                .execute(&mut *conn)
                .await
                .map_err(|e| fail("writing", e))?;
        }
        if !deletes.is_empty() {
            sqlx::raw_sql("truncate _sluice_mirror_stage")
                .execute(&mut *conn)
                .await
                .map_err(|e| fail("staging", e))?;
            let mut data = Vec::new();
            for e in &deletes {
                let parts = key_parts(def, &e.record.key.upstream_id.0);
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        data.push(b'\t');
                    }
                    push_text(&mut data, part);
                }
                data.push(b'\n');
            }
            copy(
                conn,
                &format!("copy _sluice_mirror_stage ({}) from stdin", key.join(", ")),
                &data,
            )
            .await
            .map_err(|e| fail("copying deletes for", e))?;
            let on: Vec<String> = key.iter().map(|k| format!("t.{k} = s.{k}")).collect();
            sqlx::raw_sql(AssertSqlSafe(joined(format!(
                "delete from {table} t using _sluice_mirror_stage s where {}",
                on.join(" and ")
            ))))
            .execute(&mut *conn)
            .await
            .map_err(|e| fail("deleting from", e))?;
        }
        sqlx::raw_sql("drop table _sluice_mirror_stage")
            .execute(&mut *conn)
            .await
            .map_err(|e| fail("staging", e))?;
        Ok(())
    }
}

/// A composite key's parts (a JSON array of text), or the single key.
fn key_parts(def: &TableDef, upstream_id: &str) -> Vec<String> {
    if def.key.len() > 1 {
        serde_json::from_str::<Vec<String>>(upstream_id)
            .unwrap_or_else(|_| vec![upstream_id.to_owned()])
    } else {
        vec![upstream_id.to_owned()]
    }
}

/// Encodes a piece of entries for [`copy_pieces_binary_first`]: in binary with `binary`
/// (`Ok(false)`, having written nothing, when one of the values must go as text), else as
/// COPY text; records whose NUL characters were replaced (the target's NUL policy) are pushed
/// onto `sanitized`.
fn encoder<'a>(
    def: &'a TableDef,
    binary: Option<&'a Binary<'a>>,
    sanitized: &'a mut Vec<RecordKey>,
) -> impl FnMut(&'a [&'a StreamEntry], bool, &mut Vec<u8>) -> Result<bool, Error> + 'a {
    let columns = Columns::new(def);
    let mut slots = Vec::new();
    move |piece, in_binary, out| {
        out.reserve(piece.len() * 512);
        if in_binary {
            return match binary {
                Some(binary) => binary.encode(piece, out, sanitized),
                None => Ok(false),
            };
        }
        for e in piece {
            if encode_row(out, def, &columns, e, &mut slots)? {
                sanitized.push(e.record.key.clone());
            }
        }
        Ok(true)
    }
}

/// One COPY text line for an upsert, in the table's column order: from the payload's stored
/// text when the entry has it (a typed table: see `fields.rs`), else from the parsed payload.
/// Returns whether a NUL character had to be replaced.
fn encode_row<'a>(
    out: &mut Vec<u8>,
    def: &TableDef,
    columns: &Columns<'_>,
    entry: &'a StreamEntry,
    slots: &mut Vec<Option<&'a RawValue>>,
) -> Result<bool, Error> {
    let corrupt = |e: serde_json::Error| {
        Error::invalid(format!(
            "record {}/{}: its stored payload is not a JSON object ({e})",
            entry.record.key.collection_id, entry.record.key.upstream_id
        ))
    };
    match (&entry.record.change, &entry.payload_text) {
        (Change::Delete, _) => Ok(false),
        (_, Some(text)) if !def.json => {
            fields::encode_row(out, def, columns, text.as_str(), slots).map_err(corrupt)
        }
        (_, Some(text)) => {
            let payload: Payload = serde_json::from_str(text.as_str()).map_err(corrupt)?;
            Ok(encode_parsed(out, def, entry, &payload))
        }
        (Change::Upsert { payload }, None) => Ok(encode_parsed(out, def, entry, payload)),
    }
}

/// One COPY text line from a parsed payload. Returns whether a NUL character had to be
/// replaced.
fn encode_parsed(
    out: &mut Vec<u8>,
    def: &TableDef,
    entry: &StreamEntry,
    payload: &Payload,
) -> bool {
    let mut sanitized = false;
    for (i, column) in def.columns.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        if def.json && column.name == "id" {
            sanitized |= push_text(out, &entry.record.key.upstream_id.0);
            continue;
        }
        if def.json && column.name == "payload" {
            // Everything no column took.
            let rest: serde_json::Map<String, Value> = payload
                .iter()
                .filter(|(k, _)| {
                    matches!(k.as_str(), "id" | "payload")
                        || !def.columns.iter().any(|c| &c.name == *k)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let (text, nul) = json_text(&Value::Object(rest));
            sanitized |= nul;
            push_text(out, &text);
            continue;
        }
        match payload.get(&column.name) {
            None | Some(Value::Null) => out.extend_from_slice(b"\\N"),
            Some(Value::String(s)) if column.kind != Kind::Json => {
                match unix_seconds(column.kind, s) {
                    Some(t) => sanitized |= push_text(out, &t),
                    None => sanitized |= push_text(out, s),
                }
            }
            Some(v) if column.kind == Kind::Json => {
                let (text, nul) = json_text(v);
                sanitized |= nul;
                push_text(out, &text);
            }
            Some(v) => {
                sanitized |= push_text(out, &pg_text(v, column.kind));
            }
        }
    }
    out.push(b'\n');
    sanitized
}

/// JSON text `jsonb` accepts: `\u0000` (which it refuses) becomes U+FFFD. Returns whether it did.
fn json_text(value: &Value) -> (String, bool) {
    let text = value.to_string();
    match without_nul(&text) {
        Some(replaced) => (replaced, true),
        None => (text, false),
    }
}

/// JSON text for a `jsonb` column, which refuses `\u0000`: with each one as U+FFFD, or `None`
/// when it has none.
pub(super) fn without_nul(json: &str) -> Option<String> {
    json.contains("\\u0000")
        .then(|| json.replace("\\u0000", "\u{FFFD}"))
}

/// A JSON value as PostgreSQL input text for a column of `kind`.
fn pg_text(value: &Value, kind: Kind) -> String {
    match (kind, value) {
        (Kind::Json, v) => json_text(v).0,
        (Kind::Array, Value::Array(items)) => array_literal(items),
        (Kind::Bool, Value::Bool(b)) => if *b { "t" } else { "f" }.to_owned(),
        (Kind::Timestamp, Value::Number(n)) => {
            unix_seconds(kind, &n.to_string()).unwrap_or_else(|| n.to_string())
        }
        (_, Value::String(s)) => s.clone(),
        (_, Value::Bool(b)) => b.to_string(),
        (_, v) => v.to_string(),
    }
}

/// A timestamp column's value given as Unix seconds (`1700000000`, as APIs send `created`),
/// as PostgreSQL input text in UTC; `None` for anything else (written as is).
pub(super) fn unix_seconds(kind: Kind, text: &str) -> Option<String> {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]+00");
    unix_time(kind, text)?.format(format).ok()
}

/// The time a timestamp column's value given as Unix seconds stands for (see
/// [`unix_seconds`]).
pub(super) fn unix_time(kind: Kind, text: &str) -> Option<time::OffsetDateTime> {
    if kind != Kind::Timestamp || text.is_empty() || text.len() > 12 {
        return None;
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    time::OffsetDateTime::from_unix_timestamp(text.parse().ok()?).ok()
}

/// `{1,NULL,"a b"}` from a JSON array (nested arrays for more dimensions).
pub(super) fn array_literal(items: &[Value]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|v| match v {
            Value::Null => "NULL".to_owned(),
            Value::Array(inner) => array_literal(inner),
            Value::Bool(b) => if *b { "t" } else { "f" }.to_owned(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => quote_element(s),
            other => quote_element(&other.to_string()),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn quote_element(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;

    /// The parsed path, for `fields.rs`'s test to compare with.
    pub(in super::super) fn encode_parsed_for_test(
        out: &mut Vec<u8>,
        def: &TableDef,
        entry: &StreamEntry,
    ) -> bool {
        encode_parsed(out, def, entry, entry.record.change.payload().unwrap())
    }

    #[test]
    fn json_values_become_postgres_input_text() {
        assert_eq!(
            pg_text(&json!([1, null, [2, 3]]), Kind::Array),
            "{1,NULL,{2,3}}"
        );
        assert_eq!(
            pg_text(&json!(["a b", "c\"d", "e\\f"]), Kind::Array),
            r#"{"a b","c\"d","e\\f"}"#
        );
        assert_eq!(pg_text(&json!({"a": 1}), Kind::Json), r#"{"a":1}"#);
        assert_eq!(pg_text(&json!("x\u{0}y"), Kind::Json), "\"x\u{FFFD}y\"");
        assert_eq!(pg_text(&json!(true), Kind::Bool), "t");
        assert_eq!(pg_text(&json!("12.50"), Kind::Plain), "12.50");
        assert_eq!(
            pg_text(&json!(1700000000), Kind::Timestamp),
            "2023-11-14 22:13:20+00"
        );
        assert_eq!(pg_text(&json!(1700000000), Kind::Plain), "1700000000");
        assert_eq!(
            unix_seconds(Kind::Timestamp, "-1"),
            Some("1969-12-31 23:59:59+00".into())
        );
        assert_eq!(
            unix_seconds(Kind::Timestamp, "2024-01-01 00:00:00+00"),
            None
        );
    }
}

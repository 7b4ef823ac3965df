//! Writes to a consumer table: each row is one record of one sync, keyed by `(sync_id,
//! collection_id, upstream_id)`, the record itself in `payload`. A statement's rows become
//! changes to their own syncs: an update sends the payload's fields that changed (a field that
//! is gone is sent as `NULL`), an insert sends the payload's fields to the sync named by
//! `sync_id` (or the only one), a delete deletes the record.

use serde_json::{Map, Value};
use sluice_core::{CollectionId, Column, Columns, UpstreamChange, UpstreamId};

use crate::catalog::SyncWriter;
use crate::statement::Verb;

/// The columns that identify a record.
pub(crate) const KEY: [&str; 3] = ["sync_id", "collection_id", "upstream_id"];

/// The columns a statement may not set: everything sluice fills, and on update the key too.
pub(crate) fn read_only(verb: Verb) -> Vec<String> {
    let mut columns = vec![
        "sequin_id",
        "upstream_id",
        "upstream_updated_at",
        "inserted_at",
        "updated_at",
    ];
    if verb != Verb::Insert {
        columns.extend(["sync_id", "collection_id"]);
    }
    columns.into_iter().map(str::to_owned).collect()
}

/// A payload field as a change's column: strings as text, numbers as `numeric` (their digits
/// kept), booleans, objects and arrays as `jsonb`, `null` as `NULL`.
fn column(value: &Value) -> Column {
    let (text, sql_type) = match value {
        Value::Null => (None, "text"),
        Value::String(s) => (Some(s.clone()), "text"),
        Value::Number(n) => (Some(n.to_string()), "numeric"),
        Value::Bool(b) => (Some(b.to_string()), "boolean"),
        other => (Some(other.to_string()), "jsonb"),
    };
    Column {
        text,
        sql_type: sql_type.into(),
    }
}

fn object(text: Option<&str>, what: &str) -> Result<Map<String, Value>, String> {
    match text.map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(map))) => Ok(map),
        None => Ok(Map::new()),
        _ => Err(format!("the {what} payload is not a JSON object")),
    }
}

/// Each row's change, with the sync and collection it goes to. `rows` hold, per verb:
/// update `KEY` + old payload + new payload; delete `KEY`; insert the `columns` written.
pub(crate) fn changes(
    verb: Verb,
    syncs: &[SyncWriter],
    columns: &[String],
    defaults: &[Vec<bool>],
    rows: &[Vec<Option<String>>],
) -> Result<Vec<(SyncWriter, CollectionId, UpstreamChange)>, String> {
    let sync_of = |id: Option<&str>| -> Result<SyncWriter, String> {
        match id {
            Some(id) => syncs
                .iter()
                .find(|s| s.sync_id.to_string() == id)
                .cloned()
                .ok_or_else(|| format!("sync_id {id} is not one of the syncs this table holds")),
            None if syncs.len() == 1 => Ok(syncs[0].clone()),
            None => {
                Err("name the record's sync_id: this table holds records of several syncs".into())
            }
        }
    };
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let at = |n: usize| row.get(n).cloned().flatten();
        let (sync, collection, change) = match verb {
            Verb::Insert => {
                let given = |name: &str| {
                    columns
                        .iter()
                        .position(|c| c == name)
                        .filter(|p| {
                            !defaults
                                .get(i)
                                .and_then(|d| d.get(*p))
                                .copied()
                                .unwrap_or(false)
                        })
                        .and_then(|p| row.get(p).cloned().flatten())
                };
                let collection = given("collection_id")
                    .ok_or("name the record's collection_id (public.orders, stripe:customer)")?;
                let payload = object(given("payload").as_deref(), "inserted")?;
                let values: Columns = payload
                    .iter()
                    .map(|(k, v)| (k.clone(), column(v)))
                    .collect();
                (
                    sync_of(given("sync_id").as_deref())?,
                    collection,
                    UpstreamChange::Insert { values },
                )
            }
            Verb::Update | Verb::Delete => {
                let (Some(sync), Some(collection), Some(id)) = (at(0), at(1), at(2)) else {
                    return Err("a row has no sync_id, collection_id or upstream_id".into());
                };
                let id = UpstreamId(id);
                let change = if verb == Verb::Delete {
                    UpstreamChange::Delete { id }
                } else {
                    let old = object(at(3).as_deref(), "stored")?;
                    let new = object(at(4).as_deref(), "new")?;
                    let mut values = Columns::new();
                    for (k, v) in &new {
                        if old.get(k) != Some(v) {
                            values.insert(k.clone(), column(v));
                        }
                    }
                    for k in old.keys().filter(|k| !new.contains_key(*k)) {
                        values.insert(k.clone(), column(&Value::Null));
                    }
                    UpstreamChange::Update { id, values }
                };
                (sync_of(Some(&sync))?, collection, change)
            }
        };
        out.push((sync, CollectionId(collection), change));
    }
    Ok(out)
}

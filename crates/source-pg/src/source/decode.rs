//! The rule that turns one pgoutput change into records, as a pure function: no stream, no
//! connection, no clock. The session assigns versions and fills unchanged TOAST values.

use sluice_core::{Error, RecordKey, SyncId};

use crate::pgoutput::{Relation, Tuple, Value};
use crate::tables::{self, PayloadFields};

/// What one insert, update or delete becomes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Decoded {
    /// Nothing is appended; the notice says why (shown in health).
    Skipped(String),
    /// The record at this key is deleted.
    Delete(RecordKey),
    /// The record at `key` becomes `payload`.
    Upsert {
        key: RecordKey,
        /// The key columns' text, in key order (to read the row again by).
        key_text: Vec<String>,
        /// Every column sent, by name, as the payload's JSON text; columns in `unchanged` are
        /// missing.
        payload: String,
        /// Columns whose TOASTed value did not change and was not sent: the record's previous
        /// version holds them.
        unchanged: Vec<String>,
        /// The key changed: the record at the old key is deleted, and its previous version is
        /// where unchanged values come from.
        moved_from: Option<RecordKey>,
    },
}

/// Decodes a change of `relation`, whose payloads `fields` writes and whose key columns are
/// `key` (primary key, else replica identity index, in key order): `new` is absent for a
/// delete, `old` is the old key (or the old row with `REPLICA IDENTITY FULL`) when pgoutput
/// sent one. A delete without its key is an error: PostgreSQL refuses deletes on published
/// tables that have no replica identity, so it means the stream cannot be read as it is.
pub(crate) fn decode(
    sync_id: SyncId,
    relation: &Relation,
    fields: &PayloadFields,
    key: &[String],
    old: Option<&Tuple>,
    new: Option<&Tuple>,
) -> Result<Decoded, Error> {
    let collection = &relation.collection;
    if key.is_empty() {
        return Ok(Decoded::Skipped(format!(
            "{collection} has no primary key or replica identity index: its changes are skipped (add a primary key)"
        )));
    }
    let key_of = |values: &Tuple| -> Option<Vec<String>> {
        key.iter()
            .map(|k| {
                let i = relation.columns.iter().position(|c| &c.name == k)?;
                match values.get(i)? {
                    Value::Text(t) => Some(t.to_owned()),
                    _ => None,
                }
            })
            .collect()
    };
    let record_key = |key: &[String]| {
        let keys: Vec<&str> = key.iter().map(String::as_str).collect();
        RecordKey::new(sync_id, collection.as_str(), tables::upstream_id(&keys))
    };
    let old_key = old.and_then(key_of);
    let Some(new) = new else {
        return match old_key {
            Some(k) => Ok(Decoded::Delete(record_key(&k))),
            None => Err(Error::invalid(format!(
                "pgoutput: a delete on {collection} without its key"
            ))),
        };
    };
    let Some(key_text) = key_of(new) else {
        return Ok(Decoded::Skipped(format!(
            "{collection}: a change whose key was not sent was skipped"
        )));
    };
    let mut payload = String::with_capacity(tables::payload_room(
        relation
            .columns
            .iter()
            .zip(new.values())
            .map(|(c, v)| match v {
                Value::Text(t) => (c.name.len(), t.len()),
                Value::Null => (c.name.len(), 4),
                Value::Unchanged => (0, 0),
            }),
    ));
    fields.write(
        |i| match new.get(i)? {
            Value::Null => Some(None),
            Value::Text(t) => Some(Some(t)),
            Value::Unchanged => None,
        },
        &mut payload,
    );
    let unchanged = relation
        .columns
        .iter()
        .zip(new.values())
        .filter(|(_, v)| *v == Value::Unchanged)
        .map(|(c, _)| c.name.clone())
        .collect();
    let moved_from = old_key.filter(|k| *k != key_text).map(|k| record_key(&k));
    Ok(Decoded::Upsert {
        key: record_key(&key_text),
        key_text,
        payload,
        unchanged,
        moved_from,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::Column;
    use crate::values::TypeMap;
    use serde_json::json;
    use uuid::Uuid;

    const SYNC: SyncId = SyncId(Uuid::from_u128(1));

    fn orders() -> Relation {
        let column = |name: &str, type_oid| Column {
            name: name.into(),
            type_oid,
        };
        Relation::new(
            16384,
            "public".into(),
            "orders".into(),
            vec![
                column("id", 20),
                column("total", 1700),
                column("note", 25),
                column("ok", 16),
            ],
        )
    }

    fn fields(relation: &Relation) -> PayloadFields {
        PayloadFields::new(
            &TypeMap::builtin(),
            relation
                .columns
                .iter()
                .map(|c| (c.name.as_str(), c.type_oid)),
        )
    }

    fn text(s: &str) -> Value<'_> {
        Value::Text(s)
    }

    fn tuple<'a>(values: impl IntoIterator<Item = Value<'a>>) -> Tuple {
        values.into_iter().collect()
    }

    fn key(id: &str) -> RecordKey {
        RecordKey::new(SYNC, "public.orders", id)
    }

    fn run(old: Option<&Tuple>, new: Option<&Tuple>) -> Decoded {
        decode(
            SYNC,
            &orders(),
            &fields(&orders()),
            &["id".into()],
            old,
            new,
        )
        .unwrap()
    }

    #[test]
    fn an_insert_is_an_upsert_with_every_column_typed() {
        let row = tuple([text("7"), text("9.90"), Value::Null, text("t")]);
        let Decoded::Upsert {
            key: k,
            key_text,
            payload,
            unchanged,
            moved_from,
        } = run(None, Some(&row))
        else {
            panic!()
        };
        assert_eq!(k, key("7"));
        assert_eq!(key_text, ["7"]);
        assert_eq!(
            payload,
            json!({"id": 7, "note": null, "ok": true, "total": "9.90"}).to_string()
        );
        assert!(unchanged.is_empty());
        assert_eq!(moved_from, None);
    }

    #[test]
    fn an_unchanged_toast_value_is_left_out_and_named() {
        let row = tuple([text("7"), text("1"), Value::Unchanged, text("f")]);
        let Decoded::Upsert {
            payload, unchanged, ..
        } = run(None, Some(&row))
        else {
            panic!()
        };
        assert_eq!(
            payload, r#"{"id":7,"ok":false,"total":"1"}"#,
            "never written as null"
        );
        assert_eq!(unchanged, ["note"]);
    }

    #[test]
    fn a_key_change_names_the_old_record() {
        let old = tuple([text("7"), Value::Null, Value::Null, Value::Null]);
        let new = tuple([text("8"), text("1"), Value::Unchanged, text("t")]);
        let Decoded::Upsert {
            key: k, moved_from, ..
        } = run(Some(&old), Some(&new))
        else {
            panic!()
        };
        assert_eq!(k, key("8"));
        assert_eq!(moved_from, Some(key("7")));
        // The same key sent as the old key is no move.
        let same = tuple([text("8"), Value::Null, Value::Null, Value::Null]);
        let Decoded::Upsert { moved_from, .. } = run(Some(&same), Some(&new)) else {
            panic!()
        };
        assert_eq!(moved_from, None);
    }

    #[test]
    fn a_delete_is_by_the_old_key_and_a_missing_key_is_refused_or_skipped_with_a_notice() {
        let old = tuple([text("7"), Value::Null, Value::Null, Value::Null]);
        assert_eq!(run(Some(&old), None), Decoded::Delete(key("7")));
        let no_key = tuple([Value::Null, Value::Null, Value::Null, Value::Null]);
        let refused = decode(
            SYNC,
            &orders(),
            &fields(&orders()),
            &["id".into()],
            None,
            None,
        );
        assert!(refused.is_err_and(|e| e.to_string().contains("without its key")));
        assert!(
            matches!(run(None, Some(&no_key)), Decoded::Skipped(n) if n.contains("key was not sent"))
        );
        let unkeyed = decode(
            SYNC,
            &orders(),
            &fields(&orders()),
            &[],
            None,
            Some(&no_key),
        )
        .unwrap();
        assert!(matches!(unkeyed, Decoded::Skipped(n) if n.contains("add a primary key")));
    }

    #[test]
    fn a_composite_key_is_one_json_array_id() {
        let row = tuple([text("7"), text("a\"b"), Value::Null, Value::Null]);
        let Decoded::Upsert { key: k, .. } = decode(
            SYNC,
            &orders(),
            &fields(&orders()),
            &["id".into(), "total".into()],
            None,
            Some(&row),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(k.upstream_id.0, r#"["7","a\"b"]"#);
    }
}

//! Collection shapes for API objects: from the JSON Schema a provider ships, widened by what
//! payloads actually hold.
//!
//! Each top-level field is a column: by its JSON Schema type (`string` → `text`, `integer` →
//! `bigint`, `number` → `numeric`, `boolean` → `boolean`, `integer` with `format: unix-time`
//! → `timestamp with time zone`, anything else → `jsonb`). A field the schema does not name is
//! added when a payload first holds a non-null value for it, typed by that value. A value that
//! does not fit its column's type (a string in a `bigint` column) widens the column (to `jsonb`,
//! or `text` for a timestamp) rather than ever being dropped or rounded.

use serde_json::Value;
use sluice_core::{CollectionSchema, ColumnSchema, Payload};

/// The SQL type of a timestamp column.
pub const TIMESTAMP: &str = "timestamp with time zone";

/// The shape of a collection from its JSON Schema (`{"type": "object", "properties": …}`);
/// the key is `id`, which comes first.
pub fn from_json_schema(schema: &Value) -> CollectionSchema {
    let mut columns = vec![column("id", "text")];
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, spec) in properties {
            if name == "id" {
                continue;
            }
            let ty = spec.get("type").and_then(|t| match t {
                Value::String(s) => Some(s.as_str()),
                Value::Array(a) => a.iter().filter_map(Value::as_str).find(|s| *s != "null"),
                _ => None,
            });
            let format = spec.get("format").and_then(Value::as_str);
            let sql_type = match (ty, format) {
                (Some("integer"), Some("unix-time")) => TIMESTAMP,
                (Some("string"), _) => "text",
                (Some("integer"), _) => "bigint",
                (Some("number"), _) => "numeric",
                (Some("boolean"), _) => "boolean",
                _ => "jsonb",
            };
            columns.push(column(name, sql_type));
        }
    }
    CollectionSchema {
        columns,
        key: vec!["id".into()],
    }
}

fn column(name: &str, sql_type: &str) -> ColumnSchema {
    ColumnSchema {
        name: name.to_owned(),
        sql_type: sql_type.to_owned(),
        enum_labels: None,
        unsupported: None,
    }
}

/// `known` with every column of `stored` it lacks (columns learned from payloads before a
/// restart), in `stored`'s order after `known`'s; a column both have keeps `stored`'s type
/// when it was widened.
pub fn merge(known: &CollectionSchema, stored: &CollectionSchema) -> CollectionSchema {
    let mut merged = known.clone();
    for c in &stored.columns {
        match merged.columns.iter_mut().find(|m| m.name == c.name) {
            Some(m) => {
                if m.sql_type != c.sql_type && matches!(c.sql_type.as_str(), "jsonb" | "text") {
                    m.sql_type = c.sql_type.clone();
                }
            }
            None => merged.columns.push(c.clone()),
        }
    }
    merged
}

/// Changes `schema` so every field of `payload` has a column its value fits; returns whether
/// it changed.
pub fn widen(schema: &mut CollectionSchema, payload: &Payload) -> bool {
    let mut changed = false;
    for (name, value) in payload {
        if value.is_null() {
            continue;
        }
        match schema.columns.iter_mut().find(|c| &c.name == name) {
            Some(c) => {
                if !fits(&c.sql_type, value) {
                    c.sql_type = if c.sql_type == TIMESTAMP {
                        "text"
                    } else {
                        "jsonb"
                    }
                    .to_owned();
                    changed = true;
                }
            }
            None => {
                schema.columns.push(column(name, inferred(value)));
                changed = true;
            }
        }
    }
    changed
}

fn inferred(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "text",
        Value::Number(_) => "numeric",
        Value::Bool(_) => "boolean",
        _ => "jsonb",
    }
}

/// Whether `value` is valid input for a column of `sql_type` (as the schema mirror writes it).
fn fits(sql_type: &str, value: &Value) -> bool {
    let integer = |s: &str| {
        let digits = s.strip_prefix('-').unwrap_or(s);
        !digits.is_empty() && digits.len() <= 18 && digits.bytes().all(|b| b.is_ascii_digit())
    };
    match (sql_type, value) {
        ("text" | "jsonb", _) => true,
        ("bigint", Value::Number(n)) => n.as_i64().is_some(),
        ("bigint", Value::String(s)) => integer(s),
        (TIMESTAMP, Value::Number(n)) => n
            .as_i64()
            .is_some_and(|t| time::OffsetDateTime::from_unix_timestamp(t).is_ok()),
        (TIMESTAMP, Value::String(s)) => {
            integer(s)
                && s.parse::<i64>()
                    .is_ok_and(|t| time::OffsetDateTime::from_unix_timestamp(t).is_ok())
        }
        ("numeric", Value::Number(_)) => true,
        ("numeric", Value::String(s)) => {
            !s.is_empty()
                && s.parse::<f64>().is_ok_and(f64::is_finite)
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
        }
        ("boolean", Value::Bool(_)) => true,
        ("boolean", Value::String(s)) => s == "true" || s == "false",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn types(schema: &CollectionSchema) -> Vec<(&str, &str)> {
        schema
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.sql_type.as_str()))
            .collect()
    }

    #[test]
    fn schema_types_become_columns_and_unix_times_become_timestamps() {
        let schema = from_json_schema(&json!({"type": "object", "properties": {
            "id": {"type": "string"}, "created": {"type": "integer", "format": "unix-time"},
            "email": {"type": ["string", "null"]}, "balance": {"type": "integer"},
            "metadata": {"type": "object"}, "delinquent": {"type": "boolean"},
            "percent_off": {"type": "number"}
        }}));
        assert_eq!(
            types(&schema),
            [
                ("id", "text"),
                ("balance", "bigint"),
                ("created", TIMESTAMP),
                ("delinquent", "boolean"),
                ("email", "text"),
                ("metadata", "jsonb"),
                ("percent_off", "numeric")
            ]
        );
        assert_eq!(schema.key, ["id"]);
    }

    #[test]
    fn new_fields_are_added_and_values_that_do_not_fit_widen_their_column() {
        let mut schema = from_json_schema(&json!({"properties": {
            "balance": {"type": "integer"}, "created": {"type": "integer", "format": "unix-time"},
            "email": {"type": "string"}
        }}));
        let payload = |v: Value| v.as_object().cloned().unwrap();
        assert!(!widen(
            &mut schema,
            &payload(json!({"id": "cus_1", "balance": 5, "created": 1700000000, "email": 7}))
        ));
        assert!(!widen(
            &mut schema,
            &payload(json!({"balance": "12", "later": null}))
        ));
        assert!(widen(
            &mut schema,
            &payload(json!({"later": {"a": 1}, "flag": true, "n": 1.5}))
        ));
        assert!(widen(
            &mut schema,
            &payload(json!({"balance": "twelve", "created": "yesterday"}))
        ));
        assert_eq!(
            types(&schema),
            [
                ("id", "text"),
                ("balance", "jsonb"),
                ("created", "text"),
                ("email", "text"),
                ("flag", "boolean"),
                ("later", "jsonb"),
                ("n", "numeric")
            ]
        );
        let known = from_json_schema(&json!({"properties": {"balance": {"type": "integer"}}}));
        let merged = merge(&known, &schema);
        assert_eq!(
            merged.columns[1].sql_type, "jsonb",
            "a widened type is kept"
        );
        assert_eq!(merged.columns.len(), schema.columns.len());
    }
}

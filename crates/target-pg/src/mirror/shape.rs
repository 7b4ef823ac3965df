//! Table shapes: from a source's collection schema or a JSON Schema, to typed columns.

use serde_json::Value;
use sluice_core::sql::qualified;
use sluice_core::{CollectionSchema, ColumnSchema};

/// A collection typed from a JSON Schema (for sources that do not describe their shape).
#[derive(Clone, Debug, PartialEq)]
pub struct JsonCollection {
    /// The table name (default: the collection id after its last `:` or `.`).
    pub table: Option<String>,
    /// The JSON Schema of the records (`{"type": "object", "properties": {…}}`).
    pub schema: Value,
}

/// The table a collection is written into.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct TableDef {
    pub(super) name: String,
    pub(super) columns: Vec<ColumnDef>,
    pub(super) key: Vec<String>,
    /// JSON collections: the upstream id goes into `id`, and unmapped fields into `payload`.
    pub(super) json: bool,
    pub(super) enums: Vec<(String, Vec<String>)>,
    pub(super) notices: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct ColumnDef {
    pub(super) name: String,
    pub(super) sql_type: String,
    pub(super) kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kind {
    Json,
    Array,
    Bool,
    /// `timestamp with time zone`: also takes Unix seconds (API sources' `created`).
    Timestamp,
    Plain,
}

pub(super) fn kind_of(sql_type: &str) -> Kind {
    if sql_type.ends_with("[]") {
        Kind::Array
    } else if sql_type == "json" || sql_type == "jsonb" {
        Kind::Json
    } else if sql_type == "boolean" {
        Kind::Bool
    } else if sql_type == "timestamp with time zone" || sql_type == "timestamptz" {
        Kind::Timestamp
    } else {
        Kind::Plain
    }
}

/// `public.orders` → `orders`, `stripe:customer` → `customer`.
pub fn default_table_name(collection: &str) -> String {
    collection
        .rsplit([':', '.'])
        .next()
        .unwrap_or(collection)
        .to_owned()
}

impl TableDef {
    pub(super) fn from_collection_schema(
        name: String,
        schema: &CollectionSchema,
        target_schema: &str,
    ) -> Self {
        let mut enums: Vec<(String, Vec<String>)> = Vec::new();
        let mut notices = Vec::new();
        let columns = schema
            .columns
            .iter()
            .map(|c: &ColumnSchema| {
                let sql_type = match &c.enum_labels {
                    Some(labels) => {
                        let array = c.sql_type.ends_with("[]");
                        let base = c.sql_type.trim_end_matches("[]");
                        let base = base.rsplit('.').next().unwrap_or(base).trim_matches('"');
                        if !enums.iter().any(|(n, _)| n == base) {
                            enums.push((base.to_owned(), labels.clone()));
                        }
                        format!("{}{}", qualified(target_schema, base), if array { "[]" } else { "" })
                    }
                    None => c.sql_type.clone(),
                };
                if let Some(original) = &c.unsupported {
                    notices.push(format!(
                        "column {}.{} has type {original}, which sluice cannot reproduce: it is stored as {}",
                        name, c.name, c.sql_type
                    ));
                }
                ColumnDef {
                    kind: kind_of(&c.sql_type),
                    name: c.name.clone(),
                    sql_type,
                }
            })
            .collect();
        Self {
            name,
            columns,
            key: schema.key.clone(),
            json: false,
            enums,
            notices,
        }
    }

    pub(super) fn from_json_schema(name: String, schema: &Value) -> Self {
        let mut columns = vec![ColumnDef {
            name: "id".into(),
            sql_type: "text".into(),
            kind: Kind::Plain,
        }];
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (prop, spec) in properties {
                if prop == "id" || prop == "payload" {
                    continue;
                }
                let ty = spec.get("type").and_then(|t| match t {
                    Value::String(s) => Some(s.as_str()),
                    // ["string", "null"]: the non-null type
                    Value::Array(a) => a.iter().filter_map(Value::as_str).find(|s| *s != "null"),
                    _ => None,
                });
                let format = spec.get("format").and_then(Value::as_str);
                let sql_type = match (ty, format) {
                    (Some("string"), Some("date-time")) => "timestamptz",
                    (Some("string"), Some("date")) => "date",
                    (Some("string"), Some("uuid")) => "uuid",
                    (Some("string"), _) => "text",
                    (Some("integer"), _) => "bigint",
                    (Some("number"), _) => "numeric",
                    (Some("boolean"), _) => "boolean",
                    _ => "jsonb", // objects, arrays, anything unspecified
                };
                columns.push(ColumnDef {
                    name: prop.clone(),
                    sql_type: sql_type.into(),
                    kind: kind_of(sql_type),
                });
            }
        }
        columns.push(ColumnDef {
            name: "payload".into(),
            sql_type: "jsonb".into(),
            kind: Kind::Json,
        });
        Self {
            name,
            columns,
            key: vec!["id".into()],
            json: true,
            enums: Vec::new(),
            notices: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    pub(super) fn json_schema_properties_become_columns_and_the_rest_stays_in_payload() {
        let def = TableDef::from_json_schema(
            "customer".into(),
            &json!({"type": "object", "properties": {
                "email": {"type": "string"}, "created": {"type": "string", "format": "date-time"},
                "balance": {"type": "integer"}, "metadata": {"type": "object"},
                "delinquent": {"type": ["boolean", "null"]}
            }}),
        );
        let cols: Vec<(&str, &str)> = def
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.sql_type.as_str()))
            .collect();
        assert_eq!(
            cols,
            vec![
                ("id", "text"),
                ("balance", "bigint"),
                ("created", "timestamptz"),
                ("delinquent", "boolean"),
                ("email", "text"),
                ("metadata", "jsonb"),
                ("payload", "jsonb")
            ]
        );
        assert_eq!(default_table_name("stripe:customer"), "customer");
        assert_eq!(default_table_name("public.orders"), "orders");
    }
}

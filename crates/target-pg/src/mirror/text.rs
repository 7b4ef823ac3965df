//! A table's rows as `COPY` text: the encoder the writes use for each piece (binary through
//! `binary.rs` while it can, else text), one line per upsert from the payload's stored text
//! (`fields.rs`) or from the parsed payload, and the PostgreSQL input text of JSON values.

use std::fmt::Write as _;

use serde_json::Value;
use sluice_core::{Change, Error, Payload, RecordKey, StreamEntry};

use crate::copy::push_text;

use super::binary::Binary;
use super::fields::{self, Columns};
use super::shape::{Kind, TableDef};

/// Encodes a piece of entries for `copy_pieces_binary_first`: in binary with `binary`
/// (`Ok(false)`, having written nothing, when one of the values must go as text), else as
/// COPY text; records whose NUL characters were replaced (the target's NUL policy) are pushed
/// onto `sanitized`.
pub(super) fn encoder<'a>(
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
    slots: &mut Vec<Option<&'a str>>,
) -> Result<bool, Error> {
    let corrupt = |e| fields::not_an_object(entry, e);
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
    let mut out = String::new();
    push_array_literal(&mut out, items);
    out
}

/// Writes the array literal straight into `out`: no string per element.
fn push_array_literal(out: &mut String, items: &[Value]) {
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Null => out.push_str("NULL"),
            Value::Array(inner) => push_array_literal(out, inner),
            Value::Bool(b) => out.push(if *b { 't' } else { 'f' }),
            Value::Number(n) => {
                let _ = write!(out, "{n}");
            }
            Value::String(s) => push_quoted_element(out, s),
            other => push_quoted_element(out, &other.to_string()),
        }
    }
    out.push('}');
}

/// `s` in double quotes, its backslashes and double quotes escaped with a backslash.
fn push_quoted_element(out: &mut String, s: &str) {
    out.push('"');
    let mut rest = s;
    while let Some(at) = rest.find(['\\', '"']) {
        out.push_str(&rest[..at]);
        out.push('\\');
        // The byte found is ASCII: the next character starts right after it.
        out.push_str(&rest[at..at + 1]);
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out.push('"');
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

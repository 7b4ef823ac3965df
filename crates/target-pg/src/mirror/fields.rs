//! A payload's fields read straight from the JSON text the stream stores into COPY text: no
//! `serde_json::Value` per row, no allocation per field (a string without escapes, and every
//! number, object and array, is used as a slice of the text). The fields of a payload in the
//! stream's usual form are found by [`super::scan`]; serde_json reads any other.
//!
//! The stream stores every payload as `serde_json` writes it, so a field's text here is exactly
//! what the parsed value would print: the output is the same as [`super::text`]'s path from a
//! parsed payload (a unit test holds the two equal).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde_json::value::RawValue;
use sluice_core::{Error, StreamEntry};

use crate::copy::push_text;

use super::shape::{ColumnDef, Kind, TableDef};
use super::text::{array_literal, unix_seconds, without_nul};

/// Each column's index by name, for one table.
pub(super) struct Columns<'d> {
    /// The table's columns, in its order.
    def: &'d [ColumnDef],
    /// The columns' indexes in name order (bytewise, as a payload's fields come).
    sorted: Vec<usize>,
    /// Each column's index and place in `sorted`, by name.
    by_name: HashMap<&'d str, (usize, usize), foldhash::fast::FixedState>,
}

impl<'d> Columns<'d> {
    pub(super) fn new(def: &'d TableDef) -> Self {
        let mut sorted: Vec<usize> = (0..def.columns.len()).collect();
        sorted.sort_by(|&a, &b| def.columns[a].name.cmp(&def.columns[b].name));
        let by_name = sorted
            .iter()
            .enumerate()
            .map(|(place, &i)| (def.columns[i].name.as_str(), (i, place)))
            .collect();
        Self {
            def: &def.columns,
            sorted,
            by_name,
        }
    }

    /// The index of the column named `name`. A payload's fields come sorted by name (a map's
    /// order, and the order a PostgreSQL source writes), so the column after the previous
    /// field's in name order (`next`, moved on here) is tried first: one comparison instead of
    /// a hash for every field of a table whose fields are its columns, in whatever order the
    /// table has them. (Trying the next column in the table's order instead missed every
    /// field of a table whose columns are not in name order: with seventeen such columns
    /// (`SLUICE_BENCH_SHAPE=mixed`) the hashes were 3.6% of sluice's CPU in the initial load.)
    fn find(&self, name: &str, next: &mut usize) -> Option<usize> {
        if let Some(&at) = self.sorted.get(*next)
            && self.def[at].name == name
        {
            *next += 1;
            return Some(at);
        }
        let (at, place) = self.by_name.get(name).copied()?;
        *next = place + 1;
        Some(at)
    }
}

/// Text borrowed from the payload when it has no escapes.
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// Puts each field of a payload object into its column's slot.
struct Fill<'s, 'c, 'a> {
    columns: &'c Columns<'c>,
    slots: &'s mut [Option<&'a str>],
}

impl<'de, 's, 'c> DeserializeSeed<'de> for Fill<'s, 'c, 'de> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, 's, 'c> Visitor<'de> for Fill<'s, 'c, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
        let mut next = 0;
        while let Some(key) = map.next_key::<Text<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            if let Some(at) = self.columns.find(&key.0, &mut next) {
                self.slots[at] = Some(value.get());
            }
        }
        Ok(())
    }
}

/// Whether the JSON strings of a payload's fields may hold escapes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Escapes {
    /// None does: the scan read the payload, and it takes no text with a backslash. Each
    /// string's contents are then its value.
    None,
    /// One may: serde_json read the payload.
    Maybe,
}

/// Each column's field of the payload `text` (a JSON object), in `slots` as the field's JSON
/// text (one per column, `None` where the payload has no such field), and whether those texts
/// may hold escapes.
pub(super) fn fill<'a>(
    columns: &Columns<'_>,
    text: &'a str,
    slots: &mut Vec<Option<&'a str>>,
) -> Result<Escapes, serde_json::Error> {
    slots.clear();
    slots.resize(columns.def.len(), None);
    let mut next = 0;
    if super::scan::members(text, |key, value| {
        if let Some(at) = columns.find(key, &mut next) {
            slots[at] = Some(value);
        }
    }) {
        return Ok(Escapes::None);
    }
    // Not the usual form. The members the scan found before it stopped are the ones
    // serde_json finds first, so the slots they filled are filled again the same.
    let mut deserializer = serde_json::Deserializer::from_str(text);
    Fill { columns, slots }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(Escapes::Maybe)
}

/// The batch's error for a record whose stored payload [`fill`] could not read as a JSON
/// object (the text and binary paths say the same).
pub(super) fn not_an_object(entry: &StreamEntry, e: serde_json::Error) -> Error {
    Error::invalid(format!(
        "record {}/{}: its stored payload is not a JSON object ({e})",
        entry.record.key.collection_id, entry.record.key.upstream_id
    ))
}

/// One COPY text line for the payload `text`, in the table's column order (`slots` is scratch
/// space, one per column). Returns whether a NUL character had to be replaced.
pub(super) fn encode_row<'a>(
    out: &mut Vec<u8>,
    def: &TableDef,
    columns: &Columns<'_>,
    text: &'a str,
    slots: &mut Vec<Option<&'a str>>,
) -> Result<bool, serde_json::Error> {
    let escapes = fill(columns, text, slots)?;
    let mut sanitized = false;
    for (i, (column, value)) in def.columns.iter().zip(slots.iter()).enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        sanitized |= push_field(out, column.kind, *value, escapes)?;
    }
    out.push(b'\n');
    Ok(sanitized)
}

/// The contents of the JSON string `text` (quotes included) when it has no escape: then
/// they are the string itself. A string with one is left to the parser.
fn unescaped(text: &str, escapes: Escapes) -> Option<&str> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    (escapes == Escapes::None || !inner.as_bytes().contains(&b'\\')).then_some(inner)
}

/// The value of the JSON string `text` (quotes included): borrowed from the text when it has
/// no escape, unescaped by the parser otherwise. JSON escapes the backslash and every control
/// character (NUL, tab, newline and carriage return among them; serde_json refuses them raw),
/// so a borrowed value holds none of the bytes COPY's text format escapes.
pub(super) fn string(text: &str, escapes: Escapes) -> Result<Cow<'_, str>, serde_json::Error> {
    match unescaped(text, escapes) {
        Some(s) => Ok(Cow::Borrowed(s)),
        None => serde_json::from_str::<Text>(text).map(|t| t.0),
    }
}

/// A JSON field's text with each `\u0000` replaced, when it has one. A payload the scan read
/// has none: JSON writes a NUL as `\u0000`, and the scan takes no text with a backslash.
pub(super) fn json_without_nul(text: &str, escapes: Escapes) -> Option<String> {
    match escapes {
        Escapes::None => None,
        Escapes::Maybe => without_nul(text),
    }
}

/// One field as PostgreSQL input text for a column of `kind`, as `text::encode_row` writes
/// the parsed value.
fn push_field(
    out: &mut Vec<u8>,
    kind: Kind,
    value: Option<&str>,
    escapes: Escapes,
) -> Result<bool, serde_json::Error> {
    let Some(text) = value else {
        out.extend_from_slice(b"\\N");
        return Ok(false);
    };
    Ok(match text.as_bytes().first() {
        Some(b'n') => {
            out.extend_from_slice(b"\\N");
            false
        }
        Some(b'"') if kind != Kind::Json => {
            let s = string(text, escapes)?;
            match (unix_seconds(kind, &s), s) {
                (Some(t), _) => push_text(out, &t),
                // No escape in the JSON, so none needed for COPY: it goes in as it is.
                (None, Cow::Borrowed(s)) => {
                    out.extend_from_slice(s.as_bytes());
                    false
                }
                (None, Cow::Owned(s)) => push_text(out, &s),
            }
        }
        _ if kind == Kind::Json
            && let Some(replaced) = json_without_nul(text, escapes) =>
        {
            push_text(out, &replaced);
            true
        }
        Some(b't' | b'f') if kind == Kind::Bool => {
            out.push(text.as_bytes()[0]);
            false
        }
        Some(b'[') if kind == Kind::Array => {
            let items: Vec<serde_json::Value> = serde_json::from_str(text)?;
            push_text(out, &array_literal(&items))
        }
        Some(b'-' | b'0'..=b'9') if kind == Kind::Timestamp => match unix_seconds(kind, text) {
            Some(t) => push_text(out, &t),
            None => push_text(out, text),
        },
        _ => push_text(out, text),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sluice_core::{
        Change, PayloadText, Provider, Record, RecordKey, Seq, StreamEntry, SyncId, Version,
    };

    use super::super::shape::ColumnDef;
    use super::super::text::tests::encode_parsed_for_test;
    use super::*;

    fn table() -> TableDef {
        let column = |name: &str, sql_type: &str, kind: Kind| ColumnDef {
            name: name.into(),
            sql_type: sql_type.into(),
            kind,
        };
        TableDef {
            name: "t".into(),
            columns: vec![
                column("plain", "text", Kind::Plain),
                column("flag", "boolean", Kind::Bool),
                column("at", "timestamp with time zone", Kind::Timestamp),
                column("doc", "jsonb", Kind::Json),
                column("list", "text[]", Kind::Array),
                column("n", "numeric", Kind::Plain),
                column("missing", "text", Kind::Plain),
            ],
            key: vec!["plain".into()],
            json: false,
            enums: Vec::new(),
            notices: Vec::new(),
        }
    }

    /// Every kind of JSON value in every kind of column: the row from the stored text is the
    /// row from the parsed payload, byte for byte, NUL replacements included.
    #[test]
    fn the_text_path_writes_what_the_parsed_path_writes() {
        let values = [
            json!(null),
            json!("tab\there, new\nline, back\\slash, \"quoted\", é ☃ 𝄞"),
            json!("nul \u{0} inside"),
            json!("\u{1} control"),
            json!(""),
            json!(true),
            json!(false),
            json!(0),
            json!(-17),
            json!(1700000000),
            json!(-1),
            json!(123456789012345678901234567890u128.to_string()),
            serde_json::from_str::<serde_json::Value>("1e400").unwrap(),
            serde_json::from_str::<serde_json::Value>("-0.000").unwrap(),
            serde_json::from_str::<serde_json::Value>("99.290").unwrap(),
            json!("2024-05-01T12:00:00.5+00:00"),
            json!("1700000000"),
            json!([1, null, [2, 3], "a b", "c\"d", true]),
            json!(["nul \u{0}"]),
            json!({"b": {"c": [1, "x\u{0}y"]}, "a": null}),
            json!([]),
            json!({}),
        ];
        let def = table();
        let columns = Columns::new(&def);
        for value in &values {
            let mut payload = serde_json::Map::new();
            for name in ["plain", "flag", "at", "doc", "list", "n"] {
                payload.insert(name.into(), value.clone());
            }
            payload.insert("unmapped".into(), json!({"x": 1}));
            let text = serde_json::to_string(&payload).unwrap();
            let entry = StreamEntry {
                seq: Seq(1),
                record: Record {
                    key: RecordKey::new(SyncId(uuid::Uuid::nil()), "public.t", "1"),
                    provider: Provider::Postgres,
                    version: Version::new(1, 0),
                    upstream_updated_at: time::OffsetDateTime::UNIX_EPOCH,
                    change: Change::Upsert { payload },
                },
                payload_text: Some(PayloadText::whole(text.clone())),
            };
            let (mut parsed, mut raw) = (Vec::new(), Vec::new());
            let parsed_nul = encode_parsed_for_test(&mut parsed, &def, &entry);
            let mut slots = Vec::new();
            let raw_nul = encode_row(&mut raw, &def, &columns, &text, &mut slots).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&raw),
                String::from_utf8_lossy(&parsed),
                "{value}"
            );
            assert_eq!(raw_nul, parsed_nul, "{value}");
        }
    }

    /// Fields in the table's order, out of it, with unknown keys between them, and a key
    /// given twice (the last one counts, as when the payload is parsed into a map): each lands
    /// in its own column.
    #[test]
    fn fields_land_in_their_columns_in_any_order() {
        let def = table();
        let columns = Columns::new(&def);
        let row = |text: &str| {
            let (mut out, mut slots) = (Vec::new(), Vec::new());
            encode_row(&mut out, &def, &columns, text, &mut slots).unwrap();
            String::from_utf8(out).unwrap()
        };
        let in_order = row(r#"{"plain":"p","flag":true,"at":null,"doc":null,"list":null,"n":7}"#);
        assert_eq!(in_order, "p\tt\t\\N\t\\N\t\\N\t7\t\\N\n");
        for text in [
            r#"{"n":7,"list":null,"doc":null,"at":null,"flag":true,"plain":"p"}"#,
            r#"{"x":1,"plain":"p","y":[1],"flag":true,"at":null,"doc":null,"list":null,"n":7}"#,
            r#"{"plain":"first","flag":true,"at":null,"doc":null,"list":null,"n":7,"plain":"p"}"#,
            r#"{"flag":true,"plain":"p","n":7}"#,
            // In name order (a map's, the one tried first), whole, with gaps and unknown keys.
            r#"{"at":null,"doc":null,"flag":true,"list":null,"n":7,"plain":"p"}"#,
            r#"{"a":0,"flag":true,"m":0,"n":7,"o":0,"plain":"p","z":0}"#,
            r#"{"flag":true,"plain":"p","at":null,"n":7}"#,
        ] {
            assert_eq!(row(text), in_order, "{text}");
        }
        // A string with an escape is unescaped, then written as COPY text.
        assert!(row(r#"{"plain":"a\"b\tc","n":1}"#).starts_with("a\"b\\tc\t"));
        // Only a payload the scan read is said to hold no escape: one with a backslash
        // anywhere, or in another form, is read by serde_json.
        let mut slots = Vec::new();
        for (text, escapes) in [
            (r#"{"plain":"p","n":7}"#, Escapes::None),
            (r#"{"plain":"a\"b","n":7}"#, Escapes::Maybe),
            (r#"{"plain":"p","doc":{"k":"\u0000"}}"#, Escapes::Maybe),
            (r#"{"plain":"p", "n":7}"#, Escapes::Maybe),
            (r#"{"plain":"p","n":7.0e}"#, Escapes::Maybe),
        ] {
            let read = fill(&columns, text, &mut slots);
            assert_eq!(
                read.ok(),
                (!text.ends_with("e}")).then_some(escapes),
                "{text}"
            );
        }
        // Strings after the point where the scan gave up are unescaped all the same.
        assert!(row(r#"{"n":7, "plain":"x\u0041"}"#).starts_with("xA\t"));
    }

    /// A string is copied as it is only when JSON escaped everything COPY would: a control
    /// character written raw inside a string is refused, never passed on.
    #[test]
    fn a_raw_control_character_in_a_string_is_an_error() {
        let def = table();
        let columns = Columns::new(&def);
        for text in [
            "{\"plain\":\"a\tb\"}",
            "{\"plain\":\"a\nb\"}",
            "{\"plain\":\"a\rb\"}",
            "{\"plain\":\"a\u{0}b\"}",
        ] {
            let mut slots = Vec::new();
            let mut out = Vec::new();
            assert!(
                encode_row(&mut out, &def, &columns, text, &mut slots).is_err(),
                "{text:?}"
            );
        }
        // Escaped, the same characters are unescaped and then escaped for COPY.
        let mut slots = Vec::new();
        let mut out = Vec::new();
        let text = r#"{"plain":"a\tb\nc\rd\\e"}"#;
        encode_row(&mut out, &def, &columns, text, &mut slots).unwrap();
        assert!(
            out.starts_with(b"a\\tb\\nc\\rd\\\\e\t"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }

    #[test]
    fn a_payload_that_is_not_an_object_is_an_error() {
        let def = table();
        let columns = Columns::new(&def);
        for text in ["[]", "1", "{\"plain\": 1", "{} {}", ""] {
            let mut slots = Vec::new();
            assert!(encode_row(&mut Vec::new(), &def, &columns, text, &mut slots).is_err());
        }
    }
}

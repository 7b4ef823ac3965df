//! From a column's text (its type's output function, as both pgoutput and the backfill read
//! it) to the record payload's JSON. The mapping is documented in
//! `docs/postgres-source.md`:
//!
//! | PostgreSQL | JSON |
//! |---|---|
//! | `boolean` | `true` / `false` |
//! | `smallint`, `integer`, `bigint`, `oid` | number |
//! | `real`, `double precision` | number with the server's exact digits; `NaN`, `±Infinity` and `-0` as strings |
//! | `numeric` | string with every digit (JSON numbers would round) |
//! | `json`, `jsonb` | the JSON itself, nested |
//! | `timestamp` | ISO 8601 without offset, `2024-05-01T12:00:00.5` |
//! | `timestamptz` | ISO 8601 in UTC, `2024-05-01T12:00:00.5+00:00` |
//! | `bytea` | string, PostgreSQL's hex form `\x0102` |
//! | arrays | JSON arrays (nested for multi-dimensional), elements mapped by these rules |
//! | enums, domains over text, `uuid`, `date`, `time`, `interval`, everything else | string |
//! | NULL | null |

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::Value as Json;
use sluice_core::bytes::JSON_ESCAPED;
use sqlx::PgConnection;

/// How a type's text becomes JSON.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Kind {
    Bool,
    Int,
    Float,
    Numeric,
    Json,
    Timestamp,
    TimestampTz,
    Array(Box<Kind>),
    Text,
}

/// Every type of the source database, by OID; reloaded when an unknown OID appears (a new enum).
#[derive(Default)]
pub(crate) struct TypeMap {
    /// Looked up for every field of every row: a fast hash, not SipHash (OIDs are not
    /// attacker-chosen keys).
    kinds: HashMap<u32, Kind, foldhash::fast::FixedState>,
}

struct PgType {
    elem: u32,
    base: u32,
    category: String,
    delim: String,
}

impl TypeMap {
    /// Loads every type of the database (a few hundred rows).
    pub async fn load(conn: &mut PgConnection) -> Result<Self, sqlx::Error> {
        let rows = sqlx::query!(
            r#"select oid::int8 as "oid!", typelem::int8 as "elem!", typbasetype::int8 as "base!",
                      typcategory::text as "category!", typdelim::text as "delim!"
               from pg_type"#
        )
        .fetch_all(conn)
        .await?;
        let types: HashMap<u32, PgType> = rows
            .into_iter()
            .map(|t| {
                (
                    t.oid as u32,
                    PgType {
                        elem: t.elem as u32,
                        base: t.base as u32,
                        category: t.category,
                        delim: t.delim,
                    },
                )
            })
            .collect();
        let kinds = types
            .keys()
            .map(|oid| (*oid, kind_of(*oid, &types, 0)))
            .collect();
        Ok(Self { kinds })
    }

    /// The built-in types sluice maps to JSON other than as text (for tests without a server).
    #[cfg(test)]
    pub fn builtin() -> Self {
        let none = HashMap::new();
        let kinds = [16, 20, 21, 23, 26, 700, 701, 1700, 114, 3802, 1114, 1184]
            .into_iter()
            .map(|oid| (oid, kind_of(oid, &none, 0)))
            .collect();
        Self { kinds }
    }

    /// The kind of `oid`, if the map knows it.
    pub fn get(&self, oid: u32) -> Option<&Kind> {
        self.kinds.get(&oid)
    }
}

fn kind_of(oid: u32, types: &HashMap<u32, PgType>, depth: u8) -> Kind {
    if depth > 8 {
        return Kind::Text;
    }
    match oid {
        16 => return Kind::Bool,
        20 | 21 | 23 | 26 => return Kind::Int,
        700 | 701 => return Kind::Float,
        1700 => return Kind::Numeric,
        114 | 3802 => return Kind::Json,
        1114 => return Kind::Timestamp,
        1184 => return Kind::TimestampTz,
        _ => {}
    }
    let Some(t) = types.get(&oid) else {
        return Kind::Text;
    };
    if t.base != 0 {
        // A domain: its base type decides.
        return kind_of(t.base, types, depth + 1);
    }
    if t.category == "A" && t.elem != 0 && t.delim == "," {
        return Kind::Array(Box::new(kind_of(t.elem, types, depth + 1)));
    }
    Kind::Text
}

/// One column's text as JSON.
pub(crate) fn to_json(kind: &Kind, text: &str) -> Json {
    match kind {
        Kind::Bool => match text {
            "t" | "true" => Json::Bool(true),
            "f" | "false" => Json::Bool(false),
            other => Json::String(other.to_owned()),
        },
        // The server's own text, kept as the number's digits: `real` and `double precision`
        // print the shortest text that reads back to the same bits, so passing that text on
        // (never an f64 in between) is what keeps every bit. `NaN` and `Infinity` are no JSON
        // numbers, and `jsonb` turns a number `-0` into `0`: those three stay strings.
        Kind::Float if text == "-0" => Json::String(text.to_owned()),
        Kind::Int | Kind::Float => exact_number(text)
            .map(Json::Number)
            .unwrap_or_else(|| Json::String(text.to_owned())),
        Kind::Numeric | Kind::Text => Json::String(text.to_owned()),
        Kind::Json => serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.to_owned())),
        Kind::Timestamp => Json::String(iso_timestamp(text, false)),
        Kind::TimestampTz => Json::String(iso_timestamp(text, true)),
        Kind::Array(elem) => {
            parse_array(text, elem).unwrap_or_else(|| Json::String(text.to_owned()))
        }
    }
}

/// Appends to `out` the JSON text of [`to_json`]`(kind, text)`, byte for byte what
/// serialising that value writes, without building it for the kinds that need no parsing
/// (every scalar: the row's hot path). JSON, arrays and numbers in exponent form go through
/// the value, so the two can never differ.
pub(crate) fn write_json(kind: &Kind, text: &str, out: &mut String) {
    match kind {
        Kind::Bool => match text {
            "t" | "true" => out.push_str("true"),
            "f" | "false" => out.push_str("false"),
            other => json_string(other, out),
        },
        Kind::Int | Kind::Float if text != "-0" && plain_decimal(text) => out.push_str(text),
        Kind::Numeric | Kind::Text => json_string(text, out),
        // The ISO form adds only `T` and `:00`: text that needs no escaping gives none.
        Kind::Timestamp | Kind::TimestampTz if JSON_ESCAPED.find(text.as_bytes(), 0).is_none() => {
            out.push('"');
            push_iso_timestamp(text, matches!(kind, Kind::TimestampTz), out);
            out.push('"');
        }
        // Written straight into `out` (`to_string` would grow a string of its own from
        // nothing, piece by piece, and copy it): the same `Display` text.
        _ => {
            let _ = write!(out, "{}", to_json(kind, text));
        }
    }
}

/// True when `text` is `-?(0|[1-9][0-9]*)(\.[0-9]+)?`: a JSON number that serde_json keeps
/// digit for digit (an exponent it writes in its own form, so those take the long way).
/// Byte by byte, in one pass (a search for the point first was 0.7% of sluice's CPU in the
/// initial load, `perf`).
fn plain_decimal(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits = bytes.strip_prefix(b"-").unwrap_or(bytes);
    let int = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    let all_digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    (int == 1 || (int > 1 && digits[0] != b'0'))
        && match &digits[int..] {
            [] => true,
            [b'.', frac @ ..] => all_digits(frac),
            _ => false,
        }
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it: `"` and `\\`, control
/// characters as `\n`, `\t`, `\r`, `\b`, `\f`, else `\u00XX`, everything else as it is.
pub(crate) fn json_string(text: &str, out: &mut String) {
    out.push('"');
    let bytes = text.as_bytes();
    let mut start = 0;
    while let Some(i) = JSON_ESCAPED.find(bytes, start) {
        // Every escaped byte is ASCII, so `i` is on a character boundary.
        out.push_str(&text[start..i]);
        match bytes[i] {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\r' => out.push_str("\\r"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            b => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.push_str("\\u00");
                out.push(HEX[(b >> 4) as usize] as char);
                out.push(HEX[(b & 0xf) as usize] as char);
            }
        }
        start = i + 1;
    }
    out.push_str(&text[start..]);
    out.push('"');
}

/// `text` as a JSON number with exactly these digits, if it is one in JSON's grammar.
fn exact_number(text: &str) -> Option<serde_json::Number> {
    let first = text.bytes().next()?;
    if !(first == b'-' || first.is_ascii_digit()) {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// `2024-05-01 12:00:00.5+00` → `2024-05-01T12:00:00.5+00:00` (ISO DateStyle in, ISO 8601 out).
fn iso_timestamp(text: &str, zoned: bool) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    push_iso_timestamp(text, zoned, &mut out);
    out
}

/// Appends [`iso_timestamp`]'s text to `out`: the date and time joined by `T`, an offset of
/// hours only completed with minutes; `infinity`, `-infinity` and BC dates as they are.
fn push_iso_timestamp(text: &str, zoned: bool, out: &mut String) {
    match sluice_core::bytes::split_once_byte(text, b' ') {
        Some((date, rest)) if !rest.ends_with("BC") => {
            out.push_str(date);
            out.push('T');
            out.push_str(rest);
            // The offset is `+HH`, `+HH:MM` or `+HH:MM:SS`; ISO 8601 wants at least `+HH:MM`.
            if zoned && rest.rfind(['+', '-']).is_some_and(|p| rest.len() - p == 3) {
                out.push_str(":00");
            }
        }
        _ => out.push_str(text),
    }
}

/// Parses an array literal (`{1,2,NULL}`, `{{1,2},{3,4}}`, `{"a b","c\"d"}`, `[0:1]={1,2}`).
fn parse_array(text: &str, elem: &Kind) -> Option<Json> {
    let body = match text.find('=') {
        Some(eq) if text.starts_with('[') => &text[eq + 1..],
        _ => text,
    };
    let mut chars = body.chars().peekable();
    let value = parse_level(&mut chars, elem)?;
    chars.next().is_none().then_some(value)
}

fn parse_level(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, elem: &Kind) -> Option<Json> {
    if chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(Json::Array(items));
    }
    loop {
        match chars.peek()? {
            '{' => items.push(parse_level(chars, elem)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\\' => s.push(chars.next()?),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(to_json(elem, &s));
            }
            _ => {
                let mut s = String::new();
                while let Some(c) = chars.peek() {
                    if *c == ',' || *c == '}' {
                        break;
                    }
                    s.push(*c);
                    chars.next();
                }
                let s = s.trim();
                items.push(if s.eq_ignore_ascii_case("NULL") {
                    Json::Null
                } else {
                    to_json(elem, s)
                });
            }
        }
        match chars.next()? {
            ',' => continue,
            '}' => return Some(Json::Array(items)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_map_as_documented() {
        assert_eq!(to_json(&Kind::Bool, "t"), json!(true));
        assert_eq!(to_json(&Kind::Int, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(to_json(&Kind::Float, "1.5"), json!(1.5));
        assert_eq!(to_json(&Kind::Float, "NaN"), json!("NaN"));
        assert_eq!(to_json(&Kind::Float, "-Infinity"), json!("-Infinity"));
        assert_eq!(to_json(&Kind::Float, "-0"), json!("-0"));
        // The digits are the server's, never an f64's: these would all change through one.
        for text in [
            "101.33333333333333",
            "-1.5",
            "4.9406564584124654e-324",
            "1e-310",
            "0.1",
        ] {
            assert_eq!(to_json(&Kind::Float, text).to_string(), text);
        }
        assert_eq!(
            to_json(
                &Kind::Json,
                r#"{"n": 12345678901234567890123, "r": 99.290, "e": 1e400}"#
            )
            .to_string(),
            r#"{"e":1e+400,"n":12345678901234567890123,"r":99.290}"#
        );
        assert_eq!(
            to_json(&Kind::Numeric, "12345678901234567890.000000000001"),
            json!("12345678901234567890.000000000001")
        );
        assert_eq!(
            to_json(&Kind::Json, r#"{"a": [1, {"b": null}]}"#),
            json!({"a": [1, {"b": null}]})
        );
        assert_eq!(
            to_json(&Kind::TimestampTz, "2024-05-01 12:00:00.5+00"),
            json!("2024-05-01T12:00:00.5+00:00")
        );
        assert_eq!(
            to_json(&Kind::TimestampTz, "2024-05-01 12:00:00+05:30"),
            json!("2024-05-01T12:00:00+05:30")
        );
        assert_eq!(
            to_json(&Kind::Timestamp, "2024-05-01 12:00:00"),
            json!("2024-05-01T12:00:00")
        );
        assert_eq!(to_json(&Kind::Timestamp, "infinity"), json!("infinity"));
    }

    /// The text written for a row is exactly the serialised value: every kind, edge texts,
    /// every ASCII character, and random strings over characters that need escaping.
    #[test]
    fn written_json_is_byte_equal_to_the_serialised_value() {
        let kinds = [
            Kind::Bool,
            Kind::Int,
            Kind::Float,
            Kind::Numeric,
            Kind::Json,
            Kind::Timestamp,
            Kind::TimestampTz,
            Kind::Array(Box::new(Kind::Int)),
            Kind::Array(Box::new(Kind::Text)),
            Kind::Text,
        ];
        let mut texts: Vec<String> = [
            "",
            "t",
            "f",
            "true",
            "false",
            "maybe",
            "0",
            "-0",
            "00",
            "01",
            "-01",
            "7",
            "-7",
            "1.5",
            "-1.50",
            "0.1",
            ".5",
            "5.",
            "1e5",
            "1E5",
            "1e+30",
            "1.5e-07",
            "-1e400",
            "NaN",
            "Infinity",
            "-Infinity",
            "9223372036854775807",
            "18446744073709551616",
            "101.33333333333333",
            "1.",
            "-",
            "--1",
            "1-",
            "+1",
            "1.2.3",
            "١٢",
            "2024-05-01 12:00:00",
            "2024-05-01 12:00:00.5+00",
            "2024-05-01 12:00:00+05:30",
            "2024-05-01 12:00:00-08",
            "2024-05-01 12:00:00+05:30:15",
            "0044-03-15 10:00:00+00 BC",
            "infinity",
            "-infinity",
            "2024-05-01",
            "a b",
            "a b c-01",
            r#"{"a": [1, {"b": null}], "e": 1e400, "n": 12345678901234567890123}"#,
            r#"{"k": 1, "k": 2}"#,
            "[1, 2]",
            "{1,2,NULL}",
            "{{1,2},{3,4}}",
            r#"{"a b","c\"d"}"#,
            "{1,2",
            "\u{0}",
            "é\u{1F600}",
            "tab\there",
            "quote\"back\\slash",
            "\u{7f}\u{80}",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        texts.extend((0u8..0x80).map(|b| format!("a{}b", b as char)));
        let mut random = sluice_core::Xorshift::new(0x9e37_79b9_7f4a_7c15);
        let alphabet: Vec<char> =
            "ab0-1.e+ :\"\\\n\t\r\u{0}\u{1}\u{8}\u{c}\u{1f}é\u{2028}\u{1F600}{},"
                .chars()
                .collect();
        for _ in 0..2000 {
            let state = random.next_u64();
            let len = (state % 12) as usize;
            texts.push(
                (0..len)
                    .map(|i| alphabet[((state >> (i * 5)) % alphabet.len() as u64) as usize])
                    .collect(),
            );
        }
        for kind in &kinds {
            for text in &texts {
                let mut written = String::from("prefix:");
                write_json(kind, text, &mut written);
                assert_eq!(
                    written,
                    format!("prefix:{}", to_json(kind, text)),
                    "{kind:?} {text:?}"
                );
            }
        }
    }

    #[test]
    fn arrays_parse_nested_quoted_and_null_elements() {
        let ints = Kind::Array(Box::new(Kind::Int));
        assert_eq!(to_json(&ints, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(to_json(&ints, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(to_json(&ints, "[0:1]={7,8}"), json!([7, 8]));
        assert_eq!(to_json(&ints, "{}"), json!([]));
        let texts = Kind::Array(Box::new(Kind::Text));
        assert_eq!(
            to_json(&texts, r#"{"a b","c\"d","NULL",NULL,plain}"#),
            json!(["a b", "c\"d", "NULL", null, "plain"])
        );
        // Malformed input stays text rather than being lost.
        assert_eq!(to_json(&ints, "{1,2"), json!("{1,2"));
    }
}

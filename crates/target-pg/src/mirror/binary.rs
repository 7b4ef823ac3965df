//! A table's rows in `COPY`'s binary format, when every column is of a type whose binary
//! form sluice can write exactly as the server would read the text `fields.rs` writes: then
//! the server parses no number or time and undoes no escapes (a 1,000,000-row table of
//! `bigint`, `timestamptz` and `text`: 1.43–1.47 s of `COPY` in binary against 2.08–2.19 s as
//! text, PostgreSQL 15).
//!
//! The types: `bigint`, `integer`, `smallint`, `numeric`, `text`, `character varying`,
//! `boolean`, `timestamp with time zone` and `jsonb`. A value is written in binary only in the
//! forms whose meaning is beyond doubt (an integer's digits in range, a plain decimal for a
//! `numeric`, `true`/`false`, a time as
//! `YYYY-MM-DD[T ]HH:MM:SS[.fraction](Z|±HH[:MM])` or as Unix seconds). Rows are encoded a
//! piece at a time as they are copied (`copy_pieces_binary_first`): from the first piece
//! holding any other value, the binary `COPY` ends and that piece and the rest of the batch
//! go as text in a second one, where the server reads each value (or refuses it) as it always
//! has. A table with a column of any other type is always written as text.

use std::borrow::Cow;
use std::ops::Range;

use sluice_core::{Change, Error, RecordKey, StreamEntry};

use super::fields::{self, Columns, Escapes};
use super::shape::{Kind, TableDef};
use super::text::unix_time;
use crate::copy::{binary, pg_micros};

/// How one column is written.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Column {
    Int8,
    Int4,
    Int2,
    Numeric,
    Text,
    Bool,
    Timestamptz,
    Jsonb,
}

fn column(sql_type: &str) -> Option<Column> {
    Some(match sql_type {
        "bigint" => Column::Int8,
        "integer" => Column::Int4,
        "smallint" => Column::Int2,
        t if t == "numeric" || t.starts_with("numeric(") => Column::Numeric,
        "text" => Column::Text,
        t if t.starts_with("character varying") => Column::Text,
        "boolean" => Column::Bool,
        "timestamp with time zone" | "timestamptz" => Column::Timestamptz,
        "jsonb" => Column::Jsonb,
        _ => return None,
    })
}

/// A table's rows in binary, written piece by piece as they are copied: `None` from
/// [`Binary::new`] when the table always goes as text (a column of another type, or the JSON
/// form).
pub(super) struct Binary<'d> {
    plan: Vec<Column>,
    def: &'d TableDef,
    columns: Columns<'d>,
}

impl<'d> Binary<'d> {
    pub(super) fn new(def: &'d TableDef) -> Option<Self> {
        if def.json {
            return None;
        }
        let plan = def
            .columns
            .iter()
            .map(|c| column(&c.sql_type))
            .collect::<Option<Vec<Column>>>()?;
        Some(Binary {
            plan,
            def,
            columns: Columns::new(def),
        })
    }

    /// Appends the rows of `entries` (upserts with their payloads' stored text) to `out`, and
    /// the keys of those whose NULs were replaced to `sanitized`: `Ok(true)`. `Ok(false)` when
    /// one of the values must go as text, with `out` and `sanitized` as they were. A payload
    /// that is not a JSON object is an error, as on the text path.
    pub(super) fn encode(
        &self,
        entries: &[&StreamEntry],
        out: &mut Vec<u8>,
        sanitized: &mut Vec<RecordKey>,
    ) -> Result<bool, Error> {
        let (start, noted) = (out.len(), sanitized.len());
        let undo = |out: &mut Vec<u8>, sanitized: &mut Vec<RecordKey>| {
            out.truncate(start);
            sanitized.truncate(noted);
            Ok(false)
        };
        let mut slots = Vec::new();
        for entry in entries {
            let (Change::Upsert { .. }, Some(text)) = (&entry.record.change, &entry.payload_text)
            else {
                return undo(out, sanitized);
            };
            let escapes = fields::fill(&self.columns, text.as_str(), &mut slots)
                .map_err(|e| fields::not_an_object(entry, e))?;
            binary::tuple(out, self.plan.len() as i16);
            let mut replaced = false;
            for ((&column, def), value) in self.plan.iter().zip(&self.def.columns).zip(&slots) {
                match push(out, column, def.kind, *value, escapes) {
                    Some(r) => replaced |= r,
                    None => return undo(out, sanitized),
                }
            }
            if replaced {
                sanitized.push(entry.record.key.clone());
            }
        }
        Ok(true)
    }
}

/// One field: `Some(whether a NUL was replaced)`, or `None` when this value must go as text.
/// Mirrors `fields::push_field` case by case.
fn push(
    out: &mut Vec<u8>,
    column: Column,
    kind: Kind,
    value: Option<&str>,
    escapes: Escapes,
) -> Option<bool> {
    let text = match value {
        None | Some("null") => {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            return Some(false);
        }
        Some(text) => text,
    };
    let is_string = text.starts_with('"');
    // A JSON string's value, else the JSON text itself (a number, say), as `push_field` takes
    // them.
    let scalar = || -> Option<Cow<'_, str>> {
        if is_string {
            fields::string(text, escapes).ok()
        } else {
            Some(text.into())
        }
    };
    match column {
        Column::Int8 | Column::Int4 | Column::Int2 => {
            integer(out, column, &scalar()?)?;
            Some(false)
        }
        Column::Numeric => {
            numeric(out, &scalar()?)?;
            Some(false)
        }
        Column::Text => match scalar()? {
            // A JSON string read without unescaping holds no NUL (see `fields::string`).
            Cow::Borrowed(s) if is_string => {
                binary::field(out, s.as_bytes());
                Some(false)
            }
            s => Some(binary::text(out, &s)),
        },
        Column::Bool => {
            let value = match text {
                "true" => 1,
                "false" => 0,
                _ => return None,
            };
            binary::field(out, &[value]);
            Some(false)
        }
        Column::Timestamptz => {
            let value = scalar()?;
            let micros = match unix_time(kind, &value) {
                Some(t) if (1..=9999).contains(&t.year()) => pg_micros(t),
                Some(_) => return None,
                None if is_string => iso_micros(&value)?,
                None => return None,
            };
            binary::field(out, &micros.to_be_bytes());
            Some(false)
        }
        Column::Jsonb => match fields::json_without_nul(text, escapes) {
            Some(replaced) => {
                binary::jsonb(out, &replaced);
                Some(true)
            }
            None => {
                binary::jsonb(out, text);
                Some(false)
            }
        },
    }
}

/// An integer column's value from its decimal digits (an optional `-`, then digits only),
/// when it is in the column's range.
fn integer(out: &mut Vec<u8>, column: Column, digits: &str) -> Option<()> {
    let body = digits.strip_prefix('-').unwrap_or(digits);
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    match column {
        Column::Int8 => binary::field(out, &n.to_be_bytes()),
        Column::Int4 => binary::field(out, &i32::try_from(n).ok()?.to_be_bytes()),
        _ => binary::field(out, &i16::try_from(n).ok()?.to_be_bytes()),
    }
    Some(())
}

/// A `numeric` from plain decimal text (`-?digits[.digits]`): base-10,000 digits, the weight
/// of the first, the sign and the display scale (the fraction's digits), as `numeric_in`
/// reads the same text; the server then applies the column's precision and scale to it as
/// it does to text. Exponents, `NaN`, infinities and other spellings go as text.
fn numeric(out: &mut Vec<u8>, text: &str) -> Option<()> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = sluice_core::bytes::split_once_byte(body, b'.').unwrap_or((body, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(fraction.is_empty() || digits(fraction)) || body.ends_with('.') {
        return None;
    }
    let scale = u16::try_from(fraction.len())
        .ok()
        .filter(|s| *s <= 0x3fff)?;
    // The digits as one run, the whole part padded on the left and the fraction on the
    // right to groups of four: group `g` is digits `4g .. 4g + 4` of it.
    let (whole, fraction) = (whole.as_bytes(), fraction.as_bytes());
    let pad = (4 - whole.len() % 4) % 4;
    let digit = |at: usize| -> i16 {
        let d = match at.checked_sub(pad) {
            None => b'0',
            Some(i) if i < whole.len() => whole[i],
            Some(i) => *fraction.get(i - whole.len()).unwrap_or(&b'0'),
        };
        i16::from(d - b'0')
    };
    let groups = (pad + whole.len() + fraction.len()).div_ceil(4);
    let group = |g: usize| (0..4).fold(0i16, |n, i| n * 10 + digit(4 * g + i));
    let first = (0..groups).find(|&g| group(g) != 0);
    let (count, weight) = match first {
        // Zero: no digits, weight 0, positive.
        None => (0, 0),
        Some(first) => {
            let last = (first..groups)
                .rev()
                .find(|&g| group(g) != 0)
                .unwrap_or(first);
            let weight = i64::try_from((pad + whole.len()) / 4).ok()? - 1 - first as i64;
            (last + 1 - first, i16::try_from(weight).ok()?)
        }
    };
    let sign: u16 = if negative && count > 0 { 0x4000 } else { 0 };
    out.extend_from_slice(&(8 + 2 * count as i32).to_be_bytes());
    out.extend_from_slice(&i16::try_from(count).ok()?.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&scale.to_be_bytes());
    if let Some(first) = first {
        for g in first..first + count {
            out.extend_from_slice(&group(g).to_be_bytes());
        }
    }
    Some(())
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.fraction](Z|±HH[:MM])` as microseconds since 2000-01-01 UTC, the
/// fraction rounded as the server rounds it ([`pg_micros`]); `None` for any other form, a
/// year outside 1–9999, a day the month does not have, or an offset beyond ±15:59 (which
/// the server reads otherwise, or refuses).
fn iso_micros(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let number = |range: Range<usize>| -> Option<u32> {
        let part = b.get(range)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let at = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"T ") && at(13, b":") && at(16, b":")) {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if year == 0 || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0;
    if at(i, b".") {
        let digits = b[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
        if !(1..=9).contains(&digits) {
            return None;
        }
        nanos = number(i + 1..i + 1 + digits)? * 10u32.pow(9 - digits as u32);
        i += 1 + digits;
    }
    let offset = match b.get(i..)? {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), rest @ ..] => {
            let (hours, minutes) = match rest.len() {
                2 => (number(i + 1..i + 3)?, 0),
                5 if rest[2] == b':' => (number(i + 1..i + 3)?, number(i + 4..i + 6)?),
                _ => return None,
            };
            if hours > 15 || minutes > 59 {
                return None;
            }
            let seconds = i64::from(hours * 3600 + minutes * 60);
            if *sign == b'-' { -seconds } else { seconds }
        }
        _ => return None,
    };
    let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = time::Date::from_calendar_date(year as i32, month, u8::try_from(day).ok()?).ok()?;
    let time = time::Time::from_hms_nano(hour as u8, minute as u8, second as u8, nanos).ok()?;
    let local = time::PrimitiveDateTime::new(date, time).assume_utc();
    Some(pg_micros(local) - offset * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of binary types goes binary; a piece with a value only the server reads goes
    /// as text, with nothing written; a table with a column of another type always does; a
    /// payload that is not an object is an error.
    #[test]
    fn rows_are_binary_only_when_every_value_is() {
        use super::super::shape::ColumnDef;
        use sluice_core::{PayloadText, Provider, Record, RecordKey, Seq, SyncId, Version};
        let def = |types: &[(&str, &str)]| TableDef {
            name: "t".into(),
            columns: types
                .iter()
                .map(|(name, sql_type)| ColumnDef {
                    name: (*name).into(),
                    sql_type: (*sql_type).into(),
                    kind: super::super::shape::kind_of(sql_type),
                })
                .collect(),
            key: vec!["id".into()],
            json: false,
            enums: Vec::new(),
            notices: Vec::new(),
        };
        let entry = |id: &str, text: &str| StreamEntry {
            seq: Seq(1),
            record: Record {
                key: RecordKey::new(SyncId(uuid::Uuid::nil()), "public.t", id),
                provider: Provider::Postgres,
                version: Version::new(1, 0),
                upstream_updated_at: time::OffsetDateTime::UNIX_EPOCH,
                change: Change::Upsert {
                    payload: Default::default(),
                },
            },
            payload_text: Some(PayloadText::whole(text.into())),
        };
        let typed = def(&[
            ("id", "bigint"),
            ("s", "text"),
            ("at", "timestamp with time zone"),
        ]);
        let (a, b) = (
            entry("1", r#"{"id":1,"s":"x","at":"2024-05-01T10:00:00Z"}"#),
            entry("2", r#"{"id":2,"s":"a\u0000b","at":null}"#),
        );
        let binary = Binary::new(&typed).expect("binary types");
        let (mut out, mut sanitized) = (Vec::new(), Vec::new());
        assert!(binary.encode(&[&a, &b], &mut out, &mut sanitized).unwrap());
        assert!(!out.is_empty());
        assert_eq!(
            sanitized,
            vec![b.record.key.clone()],
            "the NUL replaced in b"
        );
        // A piece with a value only the server reads writes nothing, and notes no NUL.
        let words = entry("3", r#"{"id":3,"s":"y","at":"May 1 2024"}"#);
        let before = out.clone();
        assert!(
            !binary
                .encode(&[&b, &words], &mut out, &mut sanitized)
                .unwrap()
        );
        assert_eq!(out, before);
        assert_eq!(sanitized.len(), 1);
        assert!(Binary::new(&def(&[("id", "bigint"), ("on", "date")])).is_none());
        let corrupt = entry("4", "[]");
        assert!(
            binary
                .encode(&[&corrupt], &mut out, &mut sanitized)
                .is_err()
        );
    }

    #[test]
    fn times_in_the_forms_written_in_binary_and_the_others_not() {
        use time::macros::datetime;
        let micros = |t: time::OffsetDateTime| Some(pg_micros(t));
        assert_eq!(iso_micros("2000-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            iso_micros("2024-05-01 12:00:00.5+02"),
            micros(datetime!(2024-05-01 10:00:00.5 UTC))
        );
        assert_eq!(
            iso_micros("2024-05-01T12:00:00.1234567-05:30"),
            micros(datetime!(2024-05-01 17:30:00.1234567 UTC))
        );
        assert_eq!(
            iso_micros("2024-02-29T23:59:59.999999999+00:00"),
            micros(datetime!(2024-02-29 23:59:59.999999999 UTC))
        );
        for other in [
            "2023-02-29T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T10:00:60Z",
            "2024-05-01T10:00:00",
            "2024-05-01T10:00:00+16:00",
            "2024-05-01T10:00:00+05:30:15",
            "2024-05-01T10:00:00.1234567890Z",
            "2024-05-01T10:00:00.Z",
            "2024-05-01t10:00:00Z",
            "12024-05-01T10:00:00Z",
            "2024-5-01T10:00:00Z",
            "2024-05-01T10:00:00 UTC",
            "2024-05-01T10:00:00+0530",
            "today",
            "",
        ] {
            assert_eq!(iso_micros(other), None, "{other}");
        }
    }

    /// The fields `numeric_send` writes for the same values.
    #[test]
    fn decimals_as_numeric_send_writes_them() {
        let field = |text: &str| {
            let mut out = Vec::new();
            numeric(&mut out, text).map(|()| out[4..].to_vec())
        };
        let words = |w: &[i16]| -> Vec<u8> { w.iter().flat_map(|x| x.to_be_bytes()).collect() };
        // ndigits, weight, sign, dscale, digits.
        assert_eq!(field("0"), Some(words(&[0, 0, 0, 0])));
        assert_eq!(field("-0.00"), Some(words(&[0, 0, 0, 2])));
        assert_eq!(field("123.45"), Some(words(&[2, 0, 0, 2, 123, 4500])));
        assert_eq!(
            field("-12345678.9"),
            Some(words(&[3, 1, 0x4000, 1, 1234, 5678, 9000]))
        );
        assert_eq!(field("0.00012"), Some(words(&[2, -1, 0, 5, 1, 2000])));
        assert_eq!(field("100000000"), Some(words(&[1, 2, 0, 0, 1])));
        assert_eq!(field("1.50"), Some(words(&[2, 0, 0, 2, 1, 5000])));
        assert_eq!(field("007"), Some(words(&[1, 0, 0, 0, 7])));
        for other in [
            "1e3", "1.", ".5", "+1", " 1", "NaN", "Infinity", "1.2.3", "-", "",
        ] {
            assert_eq!(field(other), None, "{other}");
        }
    }

    #[test]
    fn integers_in_range_and_nothing_else() {
        let mut out = Vec::new();
        assert!(integer(&mut out, Column::Int2, "-32768").is_some());
        assert_eq!(out, [0, 0, 0, 2, 0x80, 0]);
        for (column, digits) in [
            (Column::Int2, "-32769"),
            (Column::Int4, "2147483648"),
            (Column::Int8, "9223372036854775808"),
            (Column::Int8, "1.0"),
            (Column::Int8, "1e3"),
            (Column::Int8, " 1"),
            (Column::Int8, "+1"),
            (Column::Int8, "-"),
            (Column::Int8, ""),
        ] {
            assert!(
                integer(&mut Vec::new(), column, digits).is_none(),
                "{digits}"
            );
        }
    }
}

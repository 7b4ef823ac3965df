//! A payload's members found in one pass over its text, for the form the stream holds nearly
//! every payload in: serde_json's compact text (no whitespace) with no escape in any string.
//! Strings are skipped sixteen bytes at a time ([`JSON_ESCAPED`]), with no key or value built.
//!
//! Anything else (whitespace, an escape, nesting deeper than [`MAX_DEPTH`], text that is not
//! JSON at all) is not this form: [`members`] says so, and the caller reads the payload with
//! serde_json instead, which decides what it means or why it is refused. So this scan accepts
//! only text that serde_json accepts too, and finds the same members in it (a test holds the
//! two equal over thousands of texts, valid and not).

use sluice_core::bytes::JSON_ESCAPED;

/// Nesting this deep is left to serde_json (whose own limit is 128).
const MAX_DEPTH: usize = 64;

/// Calls `member(key, value)` for each member of the JSON object `text`, in order (`value` is
/// the member's JSON text), and returns true, when `text` is in the compact form above.
/// Returns false when it is not, perhaps after calling `member` for the members before the
/// point where it stopped.
pub(super) fn members<'a>(text: &'a str, mut member: impl FnMut(&'a str, &'a str)) -> bool {
    let mut scan = Scan {
        bytes: text.as_bytes(),
        at: 0,
    };
    let mut object = || {
        scan.eat(b'{').then_some(())?;
        if !scan.eat(b'}') {
            loop {
                let key = scan.string()?;
                scan.eat(b':').then_some(())?;
                let start = scan.at;
                scan.value(1)?;
                // Every boundary is at an ASCII byte, so on a character boundary.
                member(text.get(key.0..key.1)?, text.get(start..scan.at)?);
                if !scan.eat(b',') {
                    scan.eat(b'}').then_some(())?;
                    break;
                }
            }
        }
        (scan.at == scan.bytes.len()).then_some(())
    };
    object().is_some()
}

struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Scan<'_> {
    /// Moves past `b` if it is next.
    fn eat(&mut self, b: u8) -> bool {
        let next = self.bytes.get(self.at) == Some(&b);
        self.at += usize::from(next);
        next
    }

    /// A string with no escape and no control character: where its contents start and end.
    fn string(&mut self) -> Option<(usize, usize)> {
        self.eat(b'"').then_some(())?;
        let start = self.at;
        let end = JSON_ESCAPED.find(self.bytes, start)?;
        (self.bytes[end] == b'"').then_some(())?;
        self.at = end + 1;
        Some((start, end))
    }

    /// One value, `depth` levels inside the payload object.
    fn value(&mut self, depth: usize) -> Option<()> {
        match *self.bytes.get(self.at)? {
            b'"' => self.string().map(drop),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'-' | b'0'..=b'9' => self.number(),
            b'[' if depth < MAX_DEPTH => {
                self.at += 1;
                if self.eat(b']') {
                    return Some(());
                }
                loop {
                    self.value(depth + 1)?;
                    if !self.eat(b',') {
                        return self.eat(b']').then_some(());
                    }
                }
            }
            b'{' if depth < MAX_DEPTH => {
                self.at += 1;
                if self.eat(b'}') {
                    return Some(());
                }
                loop {
                    self.string()?;
                    self.eat(b':').then_some(())?;
                    self.value(depth + 1)?;
                    if !self.eat(b',') {
                        return self.eat(b'}').then_some(());
                    }
                }
            }
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.bytes.get(self.at..)?.starts_with(word).then_some(())?;
        self.at += word.len();
        Some(())
    }

    /// A number in JSON's grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`. What
    /// follows it is for the caller to check (`01` is `0` followed by a `1` no caller takes).
    fn number(&mut self) -> Option<()> {
        self.eat(b'-');
        if !self.eat(b'0') {
            self.digits()?;
        }
        if self.eat(b'.') {
            self.digits()?;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            self.digits()?;
        }
        Some(())
    }

    /// One or more digits.
    fn digits(&mut self) -> Option<()> {
        let start = self.at;
        while self.bytes.get(self.at).is_some_and(u8::is_ascii_digit) {
            self.at += 1;
        }
        (self.at > start).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use serde::de::{Deserializer as _, MapAccess, Visitor};
    use serde_json::value::RawValue;
    use sluice_core::Xorshift;

    use super::*;

    type Members = Vec<(String, String)>;

    /// serde_json's reading of `text` as an object: its members in order (duplicates kept),
    /// or `None` when it refuses the text.
    fn by_serde(text: &str) -> Option<Members> {
        struct Collect;
        impl<'de> Visitor<'de> for Collect {
            type Value = Members;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Members, M::Error> {
                let mut members = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: &RawValue = map.next_value()?;
                    members.push((key, value.get().to_owned()));
                }
                Ok(members)
            }
        }
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let members = (&mut deserializer).deserialize_map(Collect).ok()?;
        deserializer.end().ok()?;
        Some(members)
    }

    /// The scan's reading: `Some` only when it takes the text as its form.
    fn by_scan(text: &str) -> Option<Members> {
        let mut members = Vec::new();
        super::members(text, |k, v| members.push((k.to_owned(), v.to_owned()))).then_some(members)
    }

    /// What the scan takes, serde_json takes too, with the same members.
    fn agrees(text: &str) -> bool {
        let scanned = by_scan(text);
        if scanned.is_some() {
            assert_eq!(scanned, by_serde(text), "{text:?}");
        }
        scanned.is_some()
    }

    /// A random JSON value as serde_json would hold it: strings from an alphabet with the
    /// characters JSON escapes now and then, numbers at their edges, nesting.
    fn value(random: &mut Xorshift, depth: u32) -> serde_json::Value {
        const STRINGS: &[&str] = &[
            "",
            "a",
            "plain text",
            "é ☃ 𝄞",
            "\"",
            "\\",
            "\n",
            "\u{0}",
            "\u{1f}",
            "\u{7f}",
            "{",
            "}",
            ",",
            ":",
            "[1]",
            "null",
            "-",
            "0",
        ];
        const NUMBERS: &[&str] = &[
            "0",
            "-0",
            "7",
            "-17",
            "1.5",
            "-0.000",
            "99.290",
            "1e400",
            "1E5",
            "1e-5",
            "-2.5E+3",
            "18446744073709551616",
            "123456789012345678901234567890.5",
        ];
        let pick = |random: &mut Xorshift, n: usize| random.below(n as u64) as usize;
        match pick(random, if depth < 4 { 7 } else { 5 }) {
            0 => serde_json::Value::Null,
            1 => serde_json::Value::Bool(random.below(2) == 0),
            2 => serde_json::from_str(NUMBERS[pick(random, NUMBERS.len())]).unwrap(),
            3 | 4 => {
                let parts = pick(random, 3);
                let text: String = (0..parts)
                    .map(|_| STRINGS[pick(random, STRINGS.len())])
                    .collect();
                serde_json::Value::String(text)
            }
            5 => (0..pick(random, 4))
                .map(|_| value(random, depth + 1))
                .collect(),
            _ => serde_json::Value::Object(
                (0..pick(random, 4))
                    .map(|_| {
                        (
                            STRINGS[pick(random, STRINGS.len())].to_owned(),
                            value(random, depth + 1),
                        )
                    })
                    .collect(),
            ),
        }
    }

    /// Random payloads as the stream stores them: the scan takes every one without an escape
    /// (the form it is for) and finds what serde_json finds. Then the same texts broken one
    /// byte at a time (a byte dropped, a byte or space added, the text cut short): whatever
    /// the scan takes of those, serde_json takes too, with the same members.
    #[test]
    fn the_scan_finds_what_serde_json_finds_and_takes_nothing_it_refuses() {
        let mut random = Xorshift::new(0x9e37_79b9_7f4a_7c15);
        const INSERTED: &[u8] = b" \t\n{}[],:\"\\-+.eE0123456789ntfalseux";
        let (mut taken, mut broken_taken, mut broken) = (0, 0, 0);
        for _ in 0..3000 {
            let payload: serde_json::Map<String, serde_json::Value> = (0..random.below(6))
                .map(|_| (format!("k{}", random.below(8)), value(&mut random, 1)))
                .collect();
            let text = serde_json::to_string(&payload).unwrap();
            let scanned = agrees(&text);
            assert_eq!(scanned, !text.contains('\\'), "{text}");
            taken += usize::from(scanned);
            for _ in 0..8 {
                let mut bytes = text.clone().into_bytes();
                let at = random.below(bytes.len() as u64 + 1) as usize;
                match random.below(3) {
                    0 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    1 => bytes.insert(at, INSERTED[random.below(INSERTED.len() as u64) as usize]),
                    _ => bytes.truncate(at),
                }
                let Ok(changed) = String::from_utf8(bytes) else {
                    continue;
                };
                broken += 1;
                broken_taken += usize::from(agrees(&changed));
            }
        }
        // Both kinds were met: texts taken and texts left to serde_json.
        assert!(taken > 1000 && taken < 3000, "{taken}");
        assert!(
            broken_taken > 0 && broken_taken < broken,
            "{broken_taken} of {broken}"
        );
    }

    /// Texts at the edges of JSON's grammar, each taken or left as it must be.
    #[test]
    fn the_scan_takes_valid_compact_text_and_leaves_the_rest() {
        let deep = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        let taken = [
            "{}",
            r#"{"":1}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":-0,"b":0.0e0,"c":-0.5E-7,"d":1E+5,"e":1e400}"#,
            r#"{"a":[],"b":{},"c":[1,[2,{"x":null}],"y"],"d":{"e":{"f":true}}}"#,
            r#"{"é ☃ 𝄞":"é ☃ 𝄞","z":false}"#,
            &deep(MAX_DEPTH - 1),
        ];
        for text in taken {
            assert!(agrees(text), "{text} is taken");
        }
        let left = [
            "",
            "[]",
            "1",
            r#""a""#,
            r#"{"a":01}"#,
            r#"{"a":-01}"#,
            r#"{"a":00}"#,
            r#"{"a":-}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":1e+}"#,
            r#"{"a":+1}"#,
            r#"{"a":1.5.5}"#,
            r#"{"a":1e5e5}"#,
            r#"{"a":nul}"#,
            r#"{"a":nulls}"#,
            r#"{"a":tru}"#,
            r#"{"a":truex}"#,
            r#"{"a":1,}"#,
            "{,}",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a" :1}"#,
            r#"{"a": 1}"#,
            r#" {"a":1}"#,
            r#"{"a":1} "#,
            r#"{"a":1}x"#,
            r#"{"a":1}{"b":2}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":[,1]}"#,
            r#"{"a":[1 ]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":{"b":1,}}"#,
            r#"{"a":{1:2}}"#,
            r#"{"a":"x"y"}"#,
            r#"{"a":"x\"y"}"#,
            r#"{"a\"":1}"#,
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"tab\there\"}",
            r#"{"a":"unterminated}"#,
            r#"{"a":1"#,
            &deep(MAX_DEPTH),
            &deep(200),
        ];
        for text in left {
            assert!(by_scan(text).is_none(), "{text} is left to serde_json");
        }
        // What is left includes text serde_json reads: it is read there.
        assert!(by_serde(r#"{"a": 1}"#).is_some() && by_serde(&deep(MAX_DEPTH)).is_some());
    }
}

//! How a key's id is held in the `keys` table: an id that is a canonical decimal integer
//! within `i64` (`0`, `-12`, `4096`; not `007`, `+1`, `-0` or `1e3`) as an SQLite integer,
//! every other id as its text.
//!
//! The two forms never meet (SQLite orders every integer before every text, and no text
//! equals an integer in a column without affinity), and each is undone exactly: the integer's
//! decimal text is the id it came from. Ids of increasing integers, as a table's serial
//! keys are, then land at the end of the key index in order (SQLite's seek starts at the last
//! page when the key is past its first cell), rather than in the middle of it in text order,
//! where `"1000001"` sorts before `"999"`.

use std::cmp::Ordering;

use rusqlite::ToSql;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};

/// An id as the `keys` table holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StoredId<'a> {
    Integer(i64),
    Text(&'a str),
}

impl<'a> StoredId<'a> {
    pub fn of(id: &'a str) -> Self {
        match canonical_integer(id) {
            Some(n) => StoredId::Integer(n),
            None => StoredId::Text(id),
        }
    }
}

/// `id` as an integer, when its decimal text is exactly `id`.
fn canonical_integer(id: &str) -> Option<i64> {
    let digits = id.strip_prefix('-').unwrap_or(id);
    let canonical = match digits.as_bytes() {
        [] => false,
        [b'0'] => digits.len() == id.len(),
        [b'1'..=b'9', rest @ ..] => rest.len() < 19 && rest.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    canonical.then(|| id.parse().ok()).flatten()
}

/// SQLite's order: integers by value, before every text; texts by their bytes.
impl Ord for StoredId<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (StoredId::Integer(a), StoredId::Integer(b)) => a.cmp(b),
            (StoredId::Integer(_), StoredId::Text(_)) => Ordering::Less,
            (StoredId::Text(_), StoredId::Integer(_)) => Ordering::Greater,
            (StoredId::Text(a), StoredId::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
        }
    }
}

impl PartialOrd for StoredId<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl ToSql for StoredId<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            StoredId::Integer(n) => ToSqlOutput::Borrowed(ValueRef::Integer(n)),
            StoredId::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
        })
    }
}

/// An id read back from the `keys` table, in either form.
pub(super) struct ReadId(pub String);

impl FromSql for ReadId {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value {
            ValueRef::Integer(n) => Ok(ReadId(n.to_string())),
            ValueRef::Text(_) => String::column_result(value).map(ReadId),
            _ => Err(FromSqlError::InvalidType),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only an integer's own decimal text is held as an integer.
    #[test]
    fn only_canonical_integers_are_held_as_integers() {
        let integers = [
            ("0", 0),
            ("7", 7),
            ("10", 10),
            ("-1", -1),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ];
        for (id, n) in integers {
            assert_eq!(StoredId::of(id), StoredId::Integer(n), "{id:?}");
        }
        let texts = [
            "",
            "-",
            "-0",
            "00",
            "007",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "1e3",
            "0x10",
            "１２",
            "9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999",
            "1\0",
        ];
        for id in texts {
            assert_eq!(StoredId::of(id), StoredId::Text(id), "{id:?}");
        }
    }

    /// Every id reads back as itself, and Rust's order of stored ids is SQLite's order of the
    /// values in a column without a declared type (which the key sort relies on).
    #[test]
    fn ids_read_back_as_themselves_in_sqlites_order() {
        let ids = [
            "10",
            "9",
            "-3",
            "0",
            "",
            "abc",
            "007",
            "-0",
            "１２",
            "é",
            "100",
            "2",
            "Z",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "a\0b",
        ];
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("create table t (id not null)").unwrap();
        for id in ids {
            conn.execute("insert into t values (?)", [StoredId::of(id)])
                .unwrap();
        }
        let read: Vec<String> = conn
            .prepare("select id from t order by id")
            .unwrap()
            .query_map([], |r| r.get::<_, ReadId>(0).map(|id| id.0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let mut sorted: Vec<StoredId<'_>> = ids.iter().map(|id| StoredId::of(id)).collect();
        sorted.sort();
        let sorted: Vec<String> = sorted
            .iter()
            .map(|id| match id {
                StoredId::Integer(n) => n.to_string(),
                StoredId::Text(t) => t.to_string(),
            })
            .collect();
        assert_eq!(read, sorted);
        let mut given: Vec<&str> = ids.to_vec();
        given.sort_unstable();
        let mut back: Vec<&str> = read.iter().map(String::as_str).collect();
        back.sort_unstable();
        assert_eq!(back, given);
        // An integer and the text of another form of it are different ids.
        let equal: i64 = conn
            .query_row("select count(*) from t where id = ?", ["-0"], |r| r.get(0))
            .unwrap();
        assert_eq!(equal, 1);
        // The text "0" is not the integer 0: every statement binds ids through `StoredId`.
        let text_zero: i64 = conn
            .query_row("select count(*) from t where id = '0'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(text_zero, 0);
    }
}

//! One read's SQL (a keyset page, or rows by key) and its rows, as the server sent them.

use std::ops::Range;

use futures_util::TryStreamExt;
use sluice_core::Error;
use sluice_core::sql::{qualified, quote_ident, quote_literal};
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::Table;
use super::ranges::PAGE_BYTES;

/// The rows of one read, every column as the server's text: each value decoded and checked
/// once, when the page is fetched, and kept in one buffer (a value read again, as a key
/// column is, is not decoded again).
#[derive(Default)]
pub(super) struct Page {
    /// Every value's text, one after another.
    text: String,
    /// Each row's values in column order, as ranges of `text`; `None` for SQL NULL.
    values: Vec<Option<Range<usize>>>,
    rows: usize,
    columns: usize,
    /// The positions of the key's columns.
    key: Vec<usize>,
}

impl Page {
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Bytes of the values' text.
    pub fn bytes(&self) -> usize {
        self.text.len()
    }

    /// Column `column` of row `row`; `None` for SQL NULL.
    pub fn value(&self, row: usize, column: usize) -> Option<&str> {
        if column >= self.columns {
            return None;
        }
        let range = self.values.get(row * self.columns + column)?.clone()?;
        self.text.get(range)
    }

    /// Row `row`'s key, a text per key column.
    pub fn key(&self, row: usize) -> Vec<&str> {
        self.key
            .iter()
            .map(|&i| self.value(row, i).unwrap_or_default())
            .collect()
    }

    /// The last row's key, owned (where the next page starts); `None` for no rows.
    pub fn last_key(&self) -> Option<Vec<String>> {
        let last = self.len().checked_sub(1)?;
        Some(self.key(last).into_iter().map(str::to_owned).collect())
    }
}

/// The query for one keyset page: every column's text, in key order, after `after` and up to
/// `through` (each bound only when given).
pub(super) fn page_sql(
    table: &Table,
    after: Option<&[String]>,
    through: Option<&[String]>,
    limit: usize,
) -> Result<String, Error> {
    let keys: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let keys = keys.join(", ");
    let mut bounds = Vec::new();
    if let Some(after) = after {
        bounds.push(format!("({keys}) > ({})", key_literals(table, after)?));
    }
    if let Some(through) = through {
        bounds.push(format!("({keys}) <= ({})", key_literals(table, through)?));
    }
    let condition = match bounds.is_empty() {
        true => String::new(),
        false => format!("where {}", bounds.join(" and ")),
    };
    Ok(format!(
        "select {} from {} {condition} order by {keys} limit {limit}",
        select_list(table),
        qualified(&table.schema, &table.name),
    ))
}

/// The query for the rows with these keys (those that still exist); `keys` is not empty.
pub(super) fn keys_sql(table: &Table, keys: &[Vec<String>]) -> Result<String, Error> {
    let columns: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let wanted = keys
        .iter()
        .map(|key| key_literals(table, key).map(|l| format!("({l})")))
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(format!(
        "select {} from {} where ({}) in ({})",
        select_list(table),
        qualified(&table.schema, &table.name),
        columns.join(", "),
        wanted.join(", ")
    ))
}

fn select_list(table: &Table) -> String {
    table
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn key_literals(table: &Table, key: &[String]) -> Result<String, Error> {
    table
        .key
        .iter()
        .zip(key)
        .map(|(name, value)| {
            let column = table
                .columns
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "key column {name} is not a column of {}",
                        table.collection()
                    ))
                })?;
            Ok(format!("{}::{}", quote_literal(value), column.sql_type))
        })
        .collect::<Result<Vec<_>, Error>>()
        .map(|l| l.join(", "))
}

/// Runs `sql` as a simple query, so every value arrives as its type's output text: exactly
/// what pgoutput sends for the same value. `rows` is how many rows the query returns at most
/// (the page's limit, or the keys asked for), to size the page's list of values.
///
/// Each row's values are laid into the page as the row arrives, and the row is then dropped:
/// no list of the server's rows is collected first (whose growth copied every row, and which
/// was walked twice, once to size the text), and the page's text is one buffer, sized once
/// its first row has arrived.
pub(super) async fn fetch_rows(
    conn: &mut PgConnection,
    table: &Table,
    sql: &str,
    rows: usize,
) -> Result<Page, sqlx::Error> {
    let columns = table.columns.len();
    let mut text = Vec::new();
    let mut values = Vec::with_capacity(rows.min(MAX_ROWS_SIZED) * columns);
    let mut stream = sqlx::raw_sql(AssertSqlSafe(sql.to_owned())).fetch(&mut *conn);
    let mut count = 0;
    // Every value is read here, so a page that cannot be read fails as a whole. Its bytes are
    // checked as UTF-8 once, all together (see `checked_text`).
    while let Some(row) = stream.try_next().await? {
        for i in 0..columns {
            let value = row.try_get_raw(i)?;
            values.push(value.as_bytes().ok().map(|value| {
                let start = text.len();
                text.extend_from_slice(value);
                start..text.len()
            }));
        }
        count += 1;
        if count == 1 {
            // Room for the page at the first row's size and a quarter more, up to twice what
            // a page is sized for ([`PAGE_BYTES`]): the text then seldom grows (and so is
            // seldom copied) as its rows arrive.
            let page = text.len().saturating_mul(rows.saturating_add(rows / 4));
            text.reserve(page.min(2 * PAGE_BYTES));
        }
    }
    drop(stream);
    let text = checked_text(text, &values, columns)?;
    Ok(Page {
        text,
        values,
        rows: count,
        columns,
        key: table
            .key
            .iter()
            .filter_map(|k| table.columns.iter().position(|c| &c.name == k))
            .collect(),
    })
}

/// Rows a page's list of values is sized for at most before its first row arrives (a larger
/// page's list grows as its rows arrive).
const MAX_ROWS_SIZED: usize = 100_000;

/// A page's bytes as text, when every value in it is UTF-8 (a database whose encoding is
/// `SQL_ASCII` stores any bytes; the server checks them when it converts them for a UTF-8
/// connection, and this checks again). Values that are not UTF-8 each can still make UTF-8
/// together (a character's first bytes ending one, its last beginning the next), so each
/// value's ends are checked as well; else the first such value's error, as decoding it as
/// text says it.
fn checked_text(
    text: Vec<u8>,
    values: &[Option<Range<usize>>],
    columns: usize,
) -> Result<String, sqlx::Error> {
    let text = match String::from_utf8(text) {
        Ok(text)
            if values.iter().flatten().all(|value| {
                text.is_char_boundary(value.start) && text.is_char_boundary(value.end)
            }) =>
        {
            return Ok(text);
        }
        Ok(text) => text.into_bytes(),
        Err(e) => e.into_bytes(),
    };
    let first = values.iter().enumerate().find_map(|(n, value)| {
        let bytes = text.get(value.clone()?)?;
        std::str::from_utf8(bytes).err().map(|e| (n % columns, e))
    });
    Err(match first {
        Some((column, e)) => sqlx::Error::ColumnDecode {
            index: format!("{column:?}"),
            source: Box::new(e),
        },
        None => sqlx::Error::Decode("a page of rows that is not UTF-8".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values laid end to end, as `fetch_rows` lays them, with their ranges.
    fn laid(values: &[Option<&[u8]>]) -> (Vec<u8>, Vec<Option<Range<usize>>>) {
        let mut text = Vec::new();
        let ranges = values
            .iter()
            .map(|value| {
                value.map(|v| {
                    let start = text.len();
                    text.extend_from_slice(v);
                    start..text.len()
                })
            })
            .collect();
        (text, ranges)
    }

    /// A page read row by row holds what the server sent, value for value: NULLs, empty
    /// strings, multibyte text, rows much larger than the first (the text grows past the room
    /// the first row suggested), a first row much larger than the rest (the room is capped),
    /// and no rows at all.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_page_holds_every_value_the_server_sent() {
        let pg = sluice_localpg::Cluster::options().start().unwrap();
        let mut conn = pg.admin("postgres").await.unwrap();
        sqlx::raw_sql(
            "create table t (id int primary key, a text, b int, c text);
             insert into t select i,
                 case when i % 7 = 0 then null when i % 5 = 0 then '' else repeat('é☃', i) end,
                 i * 3,
                 case when i = 1 then repeat('x', 3000000) else 'c' || i end
             from generate_series(1, 1500) i;",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let table = super::super::describe(&mut conn, None, "public", "t")
            .await
            .unwrap()
            .unwrap();
        let after = |id: &str| Some(vec![id.to_owned()]);
        for (after, limit, rows) in [
            (None, 1500, 1500),
            (after("1"), 600, 600),
            (after("1500"), 10, 0),
        ] {
            let sql = page_sql(&table, after.as_deref(), None, limit).unwrap();
            let page = fetch_rows(&mut conn, &table, &sql, limit).await.unwrap();
            let sent = sqlx::raw_sql(AssertSqlSafe(sql.clone()))
                .fetch_all(&mut conn)
                .await
                .unwrap();
            assert_eq!((page.len(), sent.len()), (rows, rows), "{sql}");
            for (r, row) in sent.iter().enumerate() {
                for c in 0..table.columns.len() {
                    let value = row.try_get_raw(c).unwrap();
                    let want = value
                        .as_bytes()
                        .ok()
                        .map(|b| std::str::from_utf8(b).unwrap());
                    assert_eq!(page.value(r, c), want, "row {r}, column {c}");
                }
            }
            let text: usize = (0..rows * 4)
                .filter_map(|v| page.value(v / 4, v % 4))
                .map(str::len)
                .sum();
            assert_eq!(page.bytes(), text);
        }
    }

    /// A page of UTF-8 values is its text; a value that is not UTF-8 is refused, named by its
    /// column, even when it and the next make UTF-8 together.
    #[test]
    fn a_page_is_text_only_when_each_value_is() {
        let (text, ranges) = laid(&[Some(b"1"), Some("é ☃ 𝄞".as_bytes()), None]);
        assert_eq!(checked_text(text, &ranges, 3).unwrap(), "1é ☃ 𝄞");
        // `€` is e2 82 ac: its first two bytes end column 1, its last begins column 2.
        let split: [Option<&[u8]>; 6] = [
            Some(b"1"),
            Some(b"ok"),
            Some(b"ok"),
            Some(b"2"),
            Some(b"x\xe2\x82"),
            Some(b"\xac"),
        ];
        let (text, ranges) = laid(&split);
        assert!(std::str::from_utf8(&text).is_ok(), "UTF-8 as a whole");
        let refused = checked_text(text, &ranges, 3).unwrap_err();
        assert!(
            matches!(&refused, sqlx::Error::ColumnDecode { index, .. } if index == "1"),
            "{refused:?}"
        );
        let (text, ranges) = laid(&[Some(b"1"), None, Some(b"a\xffb")]);
        let refused = checked_text(text, &ranges, 3).unwrap_err();
        assert!(
            matches!(&refused, sqlx::Error::ColumnDecode { index, .. } if index == "2"),
            "{refused:?}"
        );
    }
}

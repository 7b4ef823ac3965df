//! Parallel backfill readers: a table split into key ranges, each read in keyset pages by
//! one connection at a time, with every page reconciled with the change stream on its own
//! (its own snapshot and watermark), and one stored state covering every range.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_core::sql::{qualified, quote_ident};
use sluice_core::{Error, ErrorClass, SourceState, TextBatch};
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::backfill::{Backfill, BackfillState, Rows};
use super::{Table, upstream_id};

/// One key range of a table and how far its reader has come.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct KeyRange {
    /// The last key appended from this range (its lower bound, exclusive, before the first
    /// page); `None`: from the table's first row.
    pub after: Option<Vec<String>>,
    /// The range's last key (inclusive); `None`: to the table's last row.
    pub through: Option<Vec<String>>,
    /// Every row of the range has been appended.
    #[serde(default)]
    pub done: bool,
}

impl KeyRange {
    /// The rest of the table after `key`.
    pub fn after(key: Vec<String>) -> Self {
        Self {
            after: Some(key),
            ..Self::default()
        }
    }
}

/// Rows sampled per reader to place the split keys.
const SAMPLE_PER_READER: u64 = 200;

/// Fewer sampled rows per reader than this, and the sample is taken again at 8 times the
/// rate (up to the whole table): `TABLESAMPLE SYSTEM` picks whole pages, so on a table of a
/// few hundred pages a small rate can pick one page or none.
const SAMPLE_AT_LEAST_PER_READER: usize = 50;

/// Key ranges for `readers` parallel readers of `table`, split at keys sampled from it
/// (`TABLESAMPLE SYSTEM`, ordered like the pages are; at least
/// [`SAMPLE_AT_LEAST_PER_READER`] keys per reader unless the table has fewer rows, so a table
/// of more rows than that gets one range per reader). One range, the whole table, when one
/// reader is asked for, when the planner expects fewer rows than a page per reader
/// (`estimate`, from [`planned_rows`]), or when the sample cannot be taken (a reason is
/// logged).
pub(crate) async fn split(
    conn: &mut PgConnection,
    table: &Table,
    readers: usize,
    page: usize,
    estimate: u64,
) -> Vec<KeyRange> {
    let whole = vec![KeyRange::default()];
    if readers < 2 {
        return whole;
    }
    if estimate < (readers * page.max(1)) as u64 {
        return whole;
    }
    let keys: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let keys = keys.join(", ");
    let mut percent =
        (100.0 * (SAMPLE_PER_READER * readers as u64) as f64 / estimate as f64).min(100.0);
    let sample = loop {
        match sample_keys(conn, table, &keys, percent).await {
            Ok(sample)
                if sample.len() >= readers * SAMPLE_AT_LEAST_PER_READER || percent >= 100.0 =>
            {
                break sample;
            }
            Ok(_) => percent = (percent * 8.0).min(100.0),
            Err(e) => {
                tracing::warn!(collection = table.collection(), error = %e, "backfill: one reader for this table (its keys could not be sampled)");
                return whole;
            }
        }
    };
    let mut splits: Vec<Vec<String>> = (1..readers)
        .filter_map(|i| sample.get(sample.len() * i / readers).cloned())
        .collect();
    splits.dedup();
    let mut ranges = Vec::with_capacity(splits.len() + 1);
    let mut after = None;
    for split in splits {
        ranges.push(KeyRange {
            after: after.replace(split.clone()),
            through: Some(split),
            done: false,
        });
    }
    ranges.push(KeyRange {
        after,
        through: None,
        done: false,
    });
    ranges
}

/// The keys (as text, in key order) of the rows in `percent` of the table's pages.
async fn sample_keys(
    conn: &mut PgConnection,
    table: &Table,
    keys: &str,
    percent: f64,
) -> Result<Vec<Vec<String>>, sqlx::Error> {
    let sql = format!(
        "select {keys} from {} tablesample system ({percent:.6}) order by {keys}",
        qualified(&table.schema, &table.name)
    );
    let rows = sqlx::raw_sql(AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    rows.iter()
        .map(|row| {
            (0..table.key.len())
                .map(|i| row.try_get_unchecked::<Option<String>, _>(i))
                .map(|v| v.map(Option::unwrap_or_default))
                .collect()
        })
        .collect()
}

/// The planner's estimate of the table's rows: from its statistics, or, for a table never
/// analysed (`reltuples` unknown), from its size on disk, as the planner extrapolates it; at
/// least `table.estimate`, which is 0 when neither can be had.
pub(crate) async fn planned_rows(conn: &mut PgConnection, table: &Table) -> u64 {
    let sql = format!(
        "explain (format json) select 1 from {}",
        qualified(&table.schema, &table.name)
    );
    let plan: Result<String, _> = sqlx::raw_sql(AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await
        .and_then(|row| row.try_get_unchecked::<String, _>(0));
    plan.ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|plan| plan[0]["Plan"]["Plan Rows"].as_f64())
        .map_or(0, |rows| rows as u64)
        .max(table.estimate)
}

/// The state shared by one table's readers: the stored backfill state (every range's
/// position), the rows appended from the table, and the ranges no reader has taken yet.
pub(crate) struct Reading {
    inner: tokio::sync::Mutex<(BackfillState, u64)>,
    waiting: std::sync::Mutex<VecDeque<usize>>,
}

impl Reading {
    pub fn new(state: BackfillState) -> Self {
        let waiting = (0..state.ranges.len())
            .filter(|i| !state.ranges[*i].done)
            .collect();
        Self {
            inner: tokio::sync::Mutex::new((state, 0)),
            waiting: std::sync::Mutex::new(waiting),
        }
    }

    /// The state, and the rows appended from the table.
    pub fn finish(self) -> (BackfillState, u64) {
        self.inner.into_inner()
    }

    fn next(&self) -> Option<usize> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
}

/// Bytes of the server's text a backfill page is sized to hold, once a page of the table has
/// shown how large its rows are: a page of `backfill_page` rows of a few hundred bytes is well
/// under it, while rows of kilobytes are read in fewer rows a page, so that a reader's two pages
/// in flight (one read while the one before is appended) stay megabytes whatever the rows.
pub(crate) const PAGE_BYTES: usize = 4 << 20;

/// Most rows of a reader's first page of a table, before a page has shown its rows' size (a
/// table of fewer rows is still read in one page).
pub(crate) const FIRST_PAGE_ROWS: usize = 1000;

/// Rows of each reader's first page of `table`, of about `rows` rows (from [`planned_rows`]):
/// as many as [`PAGE_BYTES`] holds at the table's bytes on disk per row (TOAST may compress
/// wide values, so the rows read can be larger, and the pages after adapt to them), at most
/// [`FIRST_PAGE_ROWS`] and `page`, and [`FIRST_PAGE_ROWS`] when the size cannot be had.
pub(crate) async fn first_limit(
    conn: &mut PgConnection,
    table: &Table,
    page: usize,
    rows: u64,
) -> usize {
    let bytes: i64 = sqlx::query_scalar("select pg_total_relation_size($1::int8::oid)")
        .bind(i64::from(table.oid))
        .fetch_one(&mut *conn)
        .await
        .unwrap_or(0);
    let fit = match (rows, u64::try_from(bytes).unwrap_or(0)) {
        (0, _) | (_, 0) => FIRST_PAGE_ROWS,
        (rows, bytes) => {
            usize::try_from(PAGE_BYTES as u64 / (bytes / rows).max(1)).unwrap_or(FIRST_PAGE_ROWS)
        }
    };
    fit.min(FIRST_PAGE_ROWS).min(page).max(1)
}

/// The rows the page after one of `rows` rows and `bytes` bytes of text asks for: as many as
/// [`PAGE_BYTES`] holds at its rows' size, at least one, at most four times as many as it
/// asked for (`limit`: a page that found few rows says little) and at most `page`; as many as
/// it asked for when it found none (that says nothing of their size).
pub(crate) fn next_limit(page: usize, limit: usize, rows: usize, bytes: usize) -> usize {
    let fit = match rows {
        0 => limit,
        _ => (PAGE_BYTES / bytes.div_ceil(rows).max(1)).min(limit.saturating_mul(4)),
    };
    fit.min(page).max(1)
}

/// One page of a range, read and made into records.
struct PageRead {
    /// Rows read (some may have raced, see `Backfill::records`).
    rows: usize,
    /// Bytes of the rows' text as the server sent it.
    bytes: usize,
    /// The last row's key.
    last: Option<Vec<String>>,
    records: TextBatch,
}

impl Backfill<'_> {
    /// One reader: takes ranges of `table` until none is left, and reads each to its end, the
    /// first page in `first` rows. `Some(error)` when a range cannot be read (the table then
    /// waits, see `Backfill::run`).
    pub(super) async fn read_ranges(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        reading: &Reading,
        first: usize,
    ) -> Result<Option<Error>, Error> {
        // Rows per page: `first` (see `first_limit`), then learnt from the pages read (see
        // `next_limit`).
        let mut limit = first;
        while let Some(index) = reading.next() {
            if let Some(unreadable) = self
                .read_range(conn, table, reading, index, &mut limit)
                .await?
            {
                return Ok(Some(unreadable));
            }
        }
        Ok(None)
    }

    /// Reads range `index` to its end, page by page: the next page is read (on `conn`) and
    /// made into records while the one before it is appended, so the source's server, this
    /// task and the stream's writer work at the same time. `limit` is the rows the next page
    /// asks for, sized by each page read.
    async fn read_range(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        reading: &Reading,
        index: usize,
        limit: &mut usize,
    ) -> Result<Option<Error>, Error> {
        let (mut after, through) = {
            let inner = reading.inner.lock().await;
            let range = &inner.0.ranges[index];
            (range.after.clone(), range.through.clone())
        };
        let mut read = self
            .read_page(conn, table, after.as_deref(), through.as_deref(), *limit)
            .await;
        loop {
            let page = match read {
                Ok(page) => page,
                Err(e) => return self.unreadable(table, after.as_deref(), *limit, e),
            };
            // A full page: the range may go on after its last key.
            let next = page.last.filter(|_| page.rows >= *limit);
            *limit = next_limit(self.page, *limit, page.rows, page.bytes);
            let append = self.append_page(
                table,
                reading,
                index,
                page.rows as u64,
                next.clone(),
                page.records,
            );
            let Some(key) = next else {
                append.await?;
                return Ok(None);
            };
            let (appended, next_read) = tokio::join!(
                append,
                self.read_page(conn, table, Some(&key), through.as_deref(), *limit)
            );
            appended?;
            after = Some(key);
            read = next_read;
        }
    }

    /// The page of up to `limit` rows of the range up to `through` after `after`, read
    /// consistently with the change stream and made into records.
    async fn read_page(
        &self,
        conn: &mut PgConnection,
        table: &Table,
        after: Option<&[String]>,
        through: Option<&[String]>,
        limit: usize,
    ) -> Result<PageRead, Error> {
        let rows = Rows::After {
            after,
            through,
            limit,
        };
        let (lsn, rows, raced) = self.read_consistent(conn, table, rows).await?;
        Ok(PageRead {
            rows: rows.len(),
            bytes: rows.bytes(),
            last: rows.last_key(),
            records: self.records(table, lsn, rows, &raced),
        })
    }

    /// What a failed page read means: `Ok(Some(error))` when the table waits (a fix, or data
    /// the server refuses) while the others are read, `Err` when the whole backfill stops.
    fn unreadable(
        &self,
        table: &Table,
        after: Option<&[String]>,
        limit: usize,
        e: Error,
    ) -> Result<Option<Error>, Error> {
        let collection = table.collection();
        match e.class() {
            ErrorClass::FixConfiguration => {
                // This table alone waits for its fix; the others are read, and its changes
                // keep streaming. The next backfill tries it again.
                tracing::warn!(collection, error = %e, "backfill: cannot read this table");
                Ok(Some(e))
            }
            ErrorClass::GiveUp => {
                // The server refuses this data: asking again gets the same answer. The table
                // stops here, named with the rows it could not read; the rows before them are
                // in the stream and its changes keep streaming.
                let rows = match after {
                    None => "its first rows".to_owned(),
                    Some(key) => format!(
                        "the rows after key {}",
                        upstream_id(&key.iter().map(String::as_str).collect::<Vec<_>>())
                    ),
                };
                let stopped = Error::invalid(format!(
                    "backfill of {collection} stopped at {rows} (a page of up to {limit} rows): {e}"
                ));
                tracing::error!(collection, error = %stopped, "backfill: this table stops; the others continue");
                Ok(Some(stopped))
            }
            _ => Err(e),
        }
    }

    /// Appends one page of range `index` (`n` rows read, made into `records`) with the state
    /// that resumes after it: after `next`, or with the range done when `next` is `None`.
    async fn append_page(
        &self,
        table: &Table,
        reading: &Reading,
        index: usize,
        n: u64,
        next: Option<Vec<String>>,
        records: TextBatch,
    ) -> Result<(), Error> {
        // Appends take turns, each storing every range's position as of the pages appended
        // so far: a restart resumes each range after its last appended page.
        let mut inner = reading.inner.lock().await;
        let (state, rows_here) = &mut *inner;
        *rows_here += n;
        state.rows += n;
        match next {
            Some(key) => state.ranges[index].after = Some(key),
            None => state.ranges[index].done = true,
        }
        let collection = table.collection();
        if state.ranges.iter().all(|r| r.done) {
            state.current = None;
            state.ranges.clear();
            state.done.insert(collection.clone());
        }
        let state_now = SourceState {
            owner: self.owner.clone(),
            value: serde_json::to_value(&*state).unwrap_or_default(),
        };
        // On a task of its own: the stream's write blocks the task it runs on, and the
        // caller's reads of the next pages go on meanwhile.
        let stream = Arc::clone(self.stream);
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            runtime.block_on(stream.append_texts(records, Some(state_now)))
        })
        .await
        .map_err(|e| Error::invalid(format!("backfill: the append failed: {e}")))??;
        let (rows_here, total, table_done) = (*rows_here, state.rows, state.current.is_none());
        drop(inner);
        self.set_progress(|p| {
            p.rows = rows_here;
            p.total_rows = total;
            if let Some(c) = p.collections.get_mut(&collection) {
                c.rows = rows_here;
                c.done = table_done;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_hold_megabytes_whatever_the_rows() {
        // Rows of ~250 bytes: four times the first page, then `backfill_page`.
        assert_eq!(next_limit(5000, 1000, 1000, 250_000), 4000);
        assert_eq!(next_limit(5000, 4000, 4000, 1_000_000), 5000);
        // Rows of 8 KB: what 4 MiB holds, from a first page of any size.
        assert_eq!(next_limit(5000, 1000, 1000, 8_192_000), 512);
        assert_eq!(next_limit(5000, 512, 512, 512 * 8192), 512);
        // A row larger than a page's bytes: one row a page, never none.
        assert_eq!(next_limit(5000, 1000, 3, 3 * (PAGE_BYTES + 1)), 1);
        assert_eq!(next_limit(0, 1000, 10, 100), 1);
        // A page that found no row says nothing of their size; rows of no text are small.
        assert_eq!(next_limit(5000, 174, 0, 0), 174);
        assert_eq!(next_limit(5000, 1000, 10, 0), 4000);
        // A small `backfill_page` stays as it is.
        assert_eq!(next_limit(7, 7, 7, 70), 7);
        assert_eq!(next_limit(usize::MAX, usize::MAX, 1, 1), PAGE_BYTES);
    }
}

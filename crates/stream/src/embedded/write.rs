//! Writing: the one transaction an append is (claimed seqs, multi-row upserts with the version
//! guard, the resume state, the head), and the tail kept exact with what was written.

use std::sync::LazyLock;

use rusqlite::Transaction;

use super::collections::Ids;
use super::ids::StoredId;
use super::*;

impl EmbeddedStream {
    /// One append: every chunk's records with their payloads' text, then `state`, in one
    /// transaction.
    pub(super) async fn write_records(
        &self,
        chunks: impl Iterator<Item = Result<TextBatch>> + Send,
        state: Option<&SourceState>,
    ) -> Result<AppendOutcome> {
        self.with_writer(|conn| {
            let (tx, head) = begin_write(conn, "an append")?;
            let appended_at = nanos(OffsetDateTime::now_utc());
            let mut next = head;
            let (mut appended, mut total) = (0u64, 0usize);
            let mut landed = Some(Vec::new());
            let mut ids = Ids::new(&self.collections);
            for batch in chunks {
                let (records, texts) = batch?.into_parts();
                for record in &records {
                    check_version(record)?;
                }
                let n = self.insert(&tx, &mut ids, &records, &texts, &mut next, appended_at)?;
                appended += n;
                total += records.len();
                match &mut landed {
                    // Whole chunks: each record moves once more, into the tail.
                    Some(landed) if n as usize == records.len() => landed.push((records, texts)),
                    // A record skipped as stale is not in the file, and which one was skipped
                    // is not known here: the tail then starts over.
                    _ => landed = None,
                }
            }
            packed::compact(&tx)?;
            if let Some(state) = state {
                tx.prepare_cached(
                    "insert into source_state (owner, value) values (?, ?) \
                     on conflict (owner) do update set value = excluded.value",
                )
                .and_then(|mut s| s.execute((&state.owner, state.value.to_string())))
                .or_storage("storing source state")?;
            }
            let head = self.finish_write(tx, head, next, "an append", landed)?;
            ids.commit();
            Ok(AppendOutcome {
                appended: appended as usize,
                skipped_stale: total - appended as usize,
                head,
            })
        })
        .await
    }

    /// Ends a write that began at `from`: moves the head to `next`, commits, updates the
    /// tail and wakes readers. `landed` holds the records of seqs `from + 1 ..= next`, in
    /// chunks, with their payloads' JSON text, when every one of them is in the file as given;
    /// `None` empties the tail instead.
    pub(super) fn finish_write(
        &self,
        tx: Transaction<'_>,
        from: i64,
        next: i64,
        what: &str,
        mut landed: Option<Vec<Landed>>,
    ) -> Result<Seq> {
        if !self.tail().holds_appends() {
            landed = None;
        }
        // Records as a read of the file gives them, before the tail's lock is taken.
        for record in landed.iter_mut().flatten().flat_map(|(records, _)| records) {
            as_stored(record);
        }
        tx.prepare_cached("update meta set value = ? where key = 'head'")
            .and_then(|mut s| s.execute([next]))
            .or_storage("moving the head")?;
        let mut tail = self.tail();
        tx.commit().or_storage(&format!("committing {what}"))?;
        let head = Seq(next as u64);
        match landed {
            Some(chunks) if tail.end() == Seq(from as u64) => tail.extend(chunks),
            _ => tail.reset(head),
        }
        drop(tail);
        self.head.send_replace(head);
        Ok(head)
    }
}

/// Starts a write on the writing connection: a transaction that holds the file's write lock
/// from its start (another process's writer waits, rather than failing mid-way), and the head
/// inside it.
pub(super) fn begin_write<'c>(
    conn: &'c mut Connection,
    what: &str,
) -> Result<(Transaction<'c>, i64)> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .or_storage(&format!("beginning {what}"))?;
    let head = read_head(&tx)?;
    Ok((tx, head))
}

/// The multi-row upsert for `rows` records (one of [`STATEMENT_ROWS`]), built once. The version
/// guard: a conflicting key is replaced only by a strictly newer version, and the replacement
/// moves to the end of the stream with a new seq.
pub(super) fn insert_sql(rows: usize) -> &'static str {
    static TEXTS: LazyLock<Vec<String>> = LazyLock::new(|| by_size(upsert));
    sized(&TEXTS, rows)
}

/// `build(rows)` for each of [`STATEMENT_ROWS`], in its order: a statement's texts, built once
/// (in a `LazyLock`) and picked by [`sized`].
pub(super) fn by_size(build: fn(usize) -> String) -> Vec<String> {
    STATEMENT_ROWS.iter().map(|&rows| build(rows)).collect()
}

/// The text for `rows` rows (one of [`STATEMENT_ROWS`]) among `texts`, made by [`by_size`].
pub(super) fn sized(texts: &[String], rows: usize) -> &str {
    let at = STATEMENT_ROWS.iter().position(|&r| r == rows);
    &texts[at.unwrap_or(STATEMENT_ROWS.len() - 1)]
}

fn upsert(rows: usize) -> String {
    let mut sql = String::with_capacity(600 + rows * 26);
    sql.push_str(
        "insert into keys (collection, upstream_id, seq, version_major, version_minor, \
         deleted, segment) values ",
    );
    for i in 0..rows {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?,?,?)"
        });
    }
    sql.push_str(
        " on conflict (collection, upstream_id) do update set \
           seq = excluded.seq, version_major = excluded.version_major, \
           version_minor = excluded.version_minor, deleted = excluded.deleted, segment = excluded.segment \
         where excluded.version_major > keys.version_major \
            or (excluded.version_major = keys.version_major and excluded.version_minor > keys.version_minor)",
    );
    sql
}

impl EmbeddedStream {
    /// Inserts `records` (with their payloads' `texts`) at the seqs after `next`, under the
    /// version guard, advancing `next`; returns how many landed (the others were stale, and their
    /// entries are dead from the start).
    ///
    /// The records go into packed segments in seq order (`packed.rs`); their keys' rows are
    /// written in the file's order of keys (collection, then id as `ids.rs` holds it; a stable
    /// sort, so a key given twice is still written in the order given and the version guard
    /// decides as before). Ids that come in no order (UUIDs, most SaaS ids) then change each index
    /// page once per statement rather than again and again: `cargo xtask bench stream-layouts`
    /// measured 21% less per new record and 18% less per update for such ids
    /// (`SLUICE_BENCH_SORTED=1`, 1,000,000 records in appends of 5,000), and no change for ids in
    /// order. The entries of the key rows they replace are marked dead once for all, as the
    /// file's trigger reports them (`connection::Replaced`).
    pub(super) fn insert(
        &self,
        tx: &Connection,
        ids: &mut Ids<'_>,
        records: &[Record],
        texts: &[Option<PayloadText>],
        next: &mut i64,
        appended_at: i64,
    ) -> Result<u64> {
        let first = *next;
        let mut entries = Vec::with_capacity(records.len());
        for (at, record) in records.iter().enumerate() {
            entries.push(packed::Entry {
                seq: first + 1 + at as i64,
                collection: ids.of(tx, record)?,
                key: record.key.upstream_id.0.as_str(),
                version: record.version,
                deleted: record.is_tombstone(),
                updated_at: nanos(record.upstream_updated_at),
                appended_at,
                text: texts[at].as_ref().map_or("", PayloadText::as_str),
            });
        }
        let places = packed::write(tx, &entries)?;
        // Left by an append that failed half-way (its transaction rolled back): none of it stands.
        self.replaced.take();
        let stored: Vec<(i64, StoredId<'_>)> = entries
            .iter()
            .map(|e| (e.collection, StoredId::of(e.key)))
            .collect();
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by(|&a, &b| stored[a].cmp(&stored[b]));
        let mut appended = 0;
        let mut rest = order.as_slice();
        while !rest.is_empty() {
            let rows = statement_rows(rest.len());
            let (chunk, after) = rest.split_at(rows);
            rest = after;
            let mut statement = tx
                .prepare_cached(insert_sql(rows))
                .or_storage("appending")?;
            // Everything bound is borrowed from `records`: no per-record copies.
            for (row, &at) in chunk.iter().enumerate() {
                bind_key(
                    &mut statement,
                    1 + row * KEY_COLUMNS,
                    &entries[at],
                    stored[at].1,
                    places[at],
                )
                .or_storage("appending")?;
            }
            appended += statement.raw_execute().or_storage("appending")? as u64;
        }
        *next = first + records.len() as i64;
        // The entries of the key rows replaced, reported by the file's trigger, marked dead
        // first: a record that a later one of this append replaced is then found in `dead`,
        // and not taken for stale.
        packed::kill_all(tx, &mut self.replaced.take())?;
        if (appended as usize) < entries.len() {
            kill_stale(tx, &entries, &places)?;
        }
        Ok(appended)
    }
}

/// Marks dead the entries of an append the version guard skipped (their key's row names
/// another seq, and no later record of the append replaced them), and drops the segments
/// left with no live entry. Only after an append with stale records: the upsert's count of the
/// rows it wrote says whether there were any, so other appends ask nothing more.
fn kill_stale(tx: &Connection, entries: &[packed::Entry<'_>], places: &[i64]) -> Result<()> {
    let what = "appending";
    let mut current = tx
        .prepare_cached("select seq from keys where collection = ? and upstream_id = ?")
        .or_storage(what)?;
    let mut replaced = tx
        .prepare_cached("select 1 from dead where seq = ?")
        .or_storage(what)?;
    let mut stale = Vec::new();
    for (entry, &segment) in entries.iter().zip(places) {
        let seq: Option<i64> = current
            .query_row((entry.collection, StoredId::of(entry.key)), |r| r.get(0))
            .optional()
            .or_storage(what)?;
        if seq != Some(entry.seq) && !replaced.exists([entry.seq]).or_storage(what)? {
            stale.push((segment, entry.seq));
        }
    }
    packed::kill_all(tx, &mut stale)?;
    packed::drop_unused(tx)
}

/// Values bound per key row.
const KEY_COLUMNS: usize = 7;

/// Binds one key row's values from parameter `at` on.
fn bind_key(
    statement: &mut rusqlite::Statement<'_>,
    at: usize,
    entry: &packed::Entry<'_>,
    id: StoredId<'_>,
    segment: i64,
) -> rusqlite::Result<()> {
    statement.raw_bind_parameter(at, entry.collection)?;
    statement.raw_bind_parameter(at + 1, id)?;
    statement.raw_bind_parameter(at + 2, entry.seq)?;
    statement.raw_bind_parameter(at + 3, entry.version.major as i64)?;
    statement.raw_bind_parameter(at + 4, entry.version.minor as i64)?;
    statement.raw_bind_parameter(at + 5, entry.deleted)?;
    statement.raw_bind_parameter(at + 6, segment)
}

/// How many of `left` records the next insert statement takes: one of a few sizes, so every
/// statement is prepared once and then found in the connection's statement cache (an append
/// of any other size would prepare a statement of that size, which costs more than the
/// insert itself for the small appends a source makes when caught up).
pub(super) fn statement_rows(left: usize) -> usize {
    STATEMENT_ROWS
        .into_iter()
        .find(|&rows| rows <= left)
        .unwrap_or(1)
}

/// Makes `record` as a read from the file returns it: its time at nanosecond precision in UTC.
/// A time in UTC within the years a count of nanoseconds in an `i64` spans is that already,
/// and is left as it is (the round trip cost 61 instructions a record, `callgrind`).
pub(super) fn as_stored(record: &mut Record) {
    let t = record.upstream_updated_at;
    if t.offset().is_utc() && (1678..=2261).contains(&t.year()) {
        return;
    }
    if let Ok(stored) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos(t))) {
        record.upstream_updated_at = stored;
    }
}

pub(super) fn check_version(record: &Record) -> Result<()> {
    let max = i64::MAX as u64;
    if record.version.major > max || record.version.minor > max {
        return Err(Error::invalid(format!(
            "record {}/{}: version {} is out of range (each part must be below 2^63)",
            record.key.collection_id, record.key.upstream_id, record.version
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::record;
    use super::*;
    use time::macros::datetime;

    /// What `as_stored` makes of a time is what the file gives back for it: the time through
    /// its nanoseconds since 1970 in UTC. Times it leaves alone (UTC, 1678–2261) and times it
    /// converts (other offsets, and years whose nanoseconds an `i64` does not hold) alike.
    #[test]
    fn a_time_is_made_what_a_read_of_the_file_gives() {
        for t in [
            datetime!(2026-12-06 15:30:00.123456789 UTC),
            datetime!(1678-01-01 00:00:00 UTC),
            datetime!(2261-12-31 23:59:59.999999999 UTC),
            datetime!(2026-12-06 16:30:00.5 +01:00),
            datetime!(1970-01-01 00:00:00 -00:30),
            datetime!(1677-06-01 00:00:00 UTC),
            datetime!(2262-06-01 00:00:00 UTC),
            datetime!(9999-12-31 23:59:59 +14:00),
        ] {
            let mut record = record(1, 1, None);
            record.upstream_updated_at = t;
            as_stored(&mut record);
            let read = OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos(t))).unwrap();
            assert_eq!(record.upstream_updated_at, read, "{t}");
            assert!(record.upstream_updated_at.offset().is_utc(), "{t}");
        }
    }
}

//! Writing: the one transaction an append is (claimed seqs, multi-row upserts with the version
//! guard, the resume state, the head), and the tail kept exact with what was written.

use std::sync::LazyLock;

use rusqlite::Transaction;

use super::collections::Ids;
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
                let n = insert(&tx, &mut ids, &records, &texts, &mut next, appended_at)?;
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
            segment::compact(&tx)?;
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
    static TEXTS: LazyLock<Vec<String>> =
        LazyLock::new(|| STATEMENT_ROWS.iter().map(|&rows| upsert(rows)).collect());
    let at = STATEMENT_ROWS.iter().position(|&r| r == rows);
    &TEXTS[at.unwrap_or(STATEMENT_ROWS.len() - 1)]
}

fn upsert(rows: usize) -> String {
    let mut sql = String::with_capacity(600 + rows * 26);
    sql.push_str(
        "insert into records (seq, collection, upstream_id, version_major, version_minor, \
         upstream_updated_at_ns, deleted, segment, slot, appended_at_ns) values ",
    );
    for i in 0..rows {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?,?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?,?,?,?,?,?)"
        });
    }
    sql.push_str(
        " on conflict (collection, upstream_id) do update set \
           seq = excluded.seq, version_major = excluded.version_major, \
           version_minor = excluded.version_minor, upstream_updated_at_ns = excluded.upstream_updated_at_ns, \
           deleted = excluded.deleted, segment = excluded.segment, slot = excluded.slot, appended_at_ns = excluded.appended_at_ns \
         where excluded.version_major > records.version_major \
            or (excluded.version_major = records.version_major and excluded.version_minor > records.version_minor)",
    );
    sql
}

/// Inserts `records` (with their payloads' `texts`, stored in segments first) at the seqs
/// after `next`, under the version guard, advancing `next`; returns how many landed (the
/// others were stale).
///
/// Each record keeps the seq of its place in `records`, but they are written in the key
/// index's order (collection, then id; a stable sort, so a key given twice is still written in
/// the order given and the version guard decides as before). Ids that come in no order (UUIDs,
/// most SaaS ids) then change each index page once per statement rather than again and again:
/// `cargo xtask bench stream-layouts` measured 21% less per new record and 18% less per update
/// for such ids (`SLUICE_BENCH_SORTED=1`, 1,000,000 records in appends of 5,000), and no change
/// for ids in order.
pub(super) fn insert(
    tx: &Connection,
    ids: &mut Ids<'_>,
    records: &[Record],
    texts: &[Option<PayloadText>],
    next: &mut i64,
    appended_at: i64,
) -> Result<u64> {
    let first = *next;
    let stored = segment::store(tx, records, texts, first, appended_at)?;
    let mut order = Vec::with_capacity(records.len());
    for (at, record) in records.iter().enumerate() {
        order.push((ids.of(tx, record)?, at));
    }
    order.sort_by(|(a_collection, a), (b_collection, b)| {
        a_collection.cmp(b_collection).then_with(|| {
            records[*a]
                .key
                .upstream_id
                .0
                .cmp(&records[*b].key.upstream_id.0)
        })
    });
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
        for (row, &(collection, at)) in chunk.iter().enumerate() {
            bind_record(
                &mut statement,
                1 + row * 10,
                first + 1 + at as i64,
                collection,
                &records[at],
                stored.places[at],
                stored.times[at],
            )
            .or_storage("appending")?;
        }
        appended += statement.raw_execute().or_storage("appending")? as u64;
    }
    *next = first + records.len() as i64;
    if (appended as usize) < texts.len() {
        // Stale records were not stored; neither are their payloads live.
        segment::recount(tx, &stored.segments, first, *next)?;
    }
    Ok(appended)
}

/// Binds one record's 10 values from parameter `at` on; `collection` is its collection's id,
/// `place` its payload's segment and slot, `times` its update and append times as its row
/// holds them (see `segment::Times`).
fn bind_record(
    statement: &mut rusqlite::Statement<'_>,
    at: usize,
    seq: i64,
    collection: i64,
    record: &Record,
    place: Option<(i64, i64)>,
    (updated_at, appended_at): (i64, i64),
) -> rusqlite::Result<()> {
    statement.raw_bind_parameter(at, seq)?;
    statement.raw_bind_parameter(at + 1, collection)?;
    statement.raw_bind_parameter(at + 2, record.key.upstream_id.0.as_str())?;
    statement.raw_bind_parameter(at + 3, record.version.major as i64)?;
    statement.raw_bind_parameter(at + 4, record.version.minor as i64)?;
    statement.raw_bind_parameter(at + 5, updated_at)?;
    statement.raw_bind_parameter(at + 6, record.is_tombstone())?;
    statement.raw_bind_parameter(at + 7, place.map(|(segment, _)| segment))?;
    statement.raw_bind_parameter(at + 8, place.map(|(_, slot)| slot))?;
    statement.raw_bind_parameter(at + 9, appended_at)
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
pub(super) fn as_stored(record: &mut Record) {
    if let Ok(stored) =
        OffsetDateTime::from_unix_timestamp_nanos(nanos(record.upstream_updated_at) as i128)
    {
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

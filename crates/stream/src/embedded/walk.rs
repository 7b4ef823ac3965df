//! Reading the segments in seq order: the live entries after a position (reads), and how
//! many there are (lag), skipping dead seqs and the segments of collections not wanted.

use super::packed::{Packed, Slot, dead_in, decode};
use super::*;

/// The next segments with live entries whose range ends after a position, in seq order.
pub(super) const WALK: &str = "select id, records, live, appended_at_ns, updated_at_ns, \
     first_seq, last_seq, collection from segments \
     where last_seq > ? and live > 0 order by last_seq limit 64";

/// A segment's row.
struct Row {
    id: i64,
    records: i64,
    live: i64,
    times: Times,
    first: i64,
    last: i64,
    /// The collection of all its entries, when they share one.
    collection: Option<i64>,
}

/// Calls `f` with the row of every segment with live entries whose range ends after `after`,
/// in seq order, until it breaks.
fn segments_after(
    conn: &Connection,
    after: Seq,
    mut f: impl FnMut(&Row) -> Result<ControlFlow<()>>,
) -> Result<()> {
    let mut position = after.0 as i64;
    loop {
        let found: Vec<Row> = conn
            .prepare_cached(WALK)
            .and_then(|mut s| {
                s.query_map([position], |r| {
                    Ok(Row {
                        id: r.get(0)?,
                        records: r.get(1)?,
                        live: r.get(2)?,
                        times: Times {
                            appended_at: r.get(3)?,
                            updated_at: r.get(4)?,
                        },
                        first: r.get(5)?,
                        last: r.get(6)?,
                        collection: r.get(7)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .or_storage("reading records")?;
        let Some(last) = found.last() else {
            return Ok(());
        };
        position = last.last;
        for row in &found {
            if f(row)?.is_break() {
                return Ok(());
            }
        }
    }
}

/// Calls `f` with the live entries after `after` of segment `row` whose collection is
/// `wanted`, in seq order, until it breaks; whether it broke.
fn live_entries(
    conn: &Connection,
    row: &Row,
    after: Seq,
    wanted: &impl Fn(i64) -> bool,
    f: &mut impl FnMut(&Packed, &Slot) -> Result<ControlFlow<()>>,
) -> Result<ControlFlow<()>> {
    let body: Vec<u8> = conn
        .prepare_cached("select body from segment_bodies where segment = ?")
        .and_then(|mut s| s.query_row([row.id], |r| r.get(0)))
        .or_storage("reading records")?;
    let packed = decode(&body, row.times)?;
    let dead = if row.live < row.records {
        dead_in(conn, row.first, row.last)?
    } else {
        Vec::new()
    };
    let mut dead = dead.into_iter().peekable();
    for slot in &packed.slots {
        if slot.seq <= after.0 {
            continue;
        }
        let seq = slot.seq as i64;
        while dead.next_if(|&d| d < seq).is_some() {}
        if dead.next_if_eq(&seq).is_some() || !wanted(slot.collection) {
            continue;
        }
        if f(&packed, slot)?.is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// Calls `f` with every live entry after `after` whose collection is `wanted`, in seq order,
/// until it breaks: the segments whose range ends after `after`, each one's dead seqs taken by
/// one range scan. A segment of one collection not wanted is not read.
pub(super) fn walk(
    conn: &Connection,
    after: Seq,
    wanted: impl Fn(i64) -> bool,
    mut f: impl FnMut(&Packed, &Slot) -> Result<ControlFlow<()>>,
) -> Result<()> {
    segments_after(conn, after, |row| match row.collection {
        Some(collection) if !wanted(collection) => Ok(ControlFlow::Continue(())),
        _ => live_entries(conn, row, after, &wanted, &mut f),
    })
}

/// How many live entries after `after` are of collections `wanted`, counting up to `cap`, and
/// the first one's append time. A segment wholly after `after` whose entries share one
/// collection is counted by its live count; only the others (the one holding `after`, those
/// of several collections, and the first counted, for its time) are decoded, so a consumer far
/// behind costs a row per segment, not a decoded record per record.
pub(super) fn count(
    conn: &Connection,
    after: Seq,
    cap: u64,
    wanted: impl Fn(i64) -> bool,
) -> Result<(u64, Option<i64>)> {
    let (mut records, mut oldest) = (0u64, None);
    segments_after(conn, after, |row| {
        if records >= cap {
            return Ok(ControlFlow::Break(()));
        }
        if let Some(collection) = row.collection.filter(|_| row.first > after.0 as i64) {
            if !wanted(collection) {
                return Ok(ControlFlow::Continue(()));
            }
            if oldest.is_some() {
                records += row.live as u64;
                return Ok(ControlFlow::Continue(()));
            }
        }
        live_entries(conn, row, after, &wanted, &mut |packed, slot| {
            records += 1;
            oldest.get_or_insert(packed.appended_at(slot));
            Ok(ControlFlow::Continue(()))
        })
    })?;
    Ok((records, oldest))
}

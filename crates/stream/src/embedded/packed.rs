//! Packed segments: the records of one append (up to [`SEGMENT_RECORDS`] of them, or
//! [`SEGMENT_BYTES`] of payload text), each with everything a read gives of it (seq, key,
//! version, times, tombstone flag and payload), compressed together with LZ4 and stored as one
//! row of `segment_bodies`, its counts and seq range one row of `segments`.
//!
//! The file keeps one small row per key (`keys`: its newest seq, version and segment), which
//! the version guard needs, and nothing per seq: a read walks the segments in seq order. A
//! record replaced by a newer version of its key (or a purged tombstone) leaves its entry in
//! its segment; its seq goes into `dead` (by the triggers that also lower the segment's live
//! count), and a read skips it (`walk.rs`). A segment's seqs lie between its `first_seq` and
//! `last_seq`, and no two segments' ranges overlap (a sparse segment is rewritten alone,
//! [`compact`]), so ordering segments by `last_seq` orders their records by seq. Measured
//! against a row per record (`cargo xtask bench stream-layouts`, and the stream itself):
//! ARCHITECTURE.md, "Key rows only".
//!
//! Body (see `segment::seal`): a format byte, then the LZ4 block (its size first) of
//! `text · header · u32 LE header length`, where the header is the entry count and then, per
//! entry, as LEB128 varints: the step of its seq from the previous one, its text's length, its
//! collection id, its key's length and the key's bytes, both version parts, a tombstone byte,
//! and its update and append times (0 where the segment's row holds them: [`Times`]).

use super::segment::{
    SEGMENT_BYTES, SEGMENT_RECORDS, Times, corrupt, open, read_varint, seal, stored, varint,
};
use super::write::{by_size, sized, statement_rows};
use super::*;
use std::sync::LazyLock;

/// Sparse segments rewritten per write at most (see [`compact`]).
const COMPACTIONS_PER_WRITE: usize = 4;

/// One record as a segment stores it; times are absolute (nanoseconds since the epoch).
pub(super) struct Entry<'a> {
    pub(super) seq: i64,
    pub(super) collection: i64,
    pub(super) key: &'a str,
    pub(super) version: Version,
    pub(super) deleted: bool,
    pub(super) updated_at: i64,
    pub(super) appended_at: i64,
    pub(super) text: &'a str,
}

/// A decoded segment.
pub(super) struct Packed {
    text: Arc<String>,
    header: Vec<u8>,
    pub(super) slots: Vec<Slot>,
    /// The times its row holds for entries that hold 0.
    pub(super) times: Times,
}

/// One entry of a decoded segment.
pub(super) struct Slot {
    pub(super) seq: u64,
    text: Range<usize>,
    pub(super) collection: i64,
    key: Range<usize>,
    version: Version,
    pub(super) deleted: bool,
    updated_at: i64,
    appended_at: i64,
}

impl Packed {
    pub(super) fn key(&self, slot: &Slot) -> &str {
        // Checked to be UTF-8 on decoding.
        std::str::from_utf8(&self.header[slot.key.clone()]).unwrap_or_default()
    }

    /// The entry's payload text (empty for a tombstone).
    pub(super) fn payload(&self, slot: &Slot) -> Option<PayloadText> {
        PayloadText::new(self.text.clone(), slot.text.clone())
    }

    pub(super) fn appended_at(&self, slot: &Slot) -> i64 {
        self.times.appended_at(slot.appended_at)
    }

    /// The slot holding `seq`.
    pub(super) fn find(&self, seq: i64) -> Option<&Slot> {
        let at = self
            .slots
            .binary_search_by_key(&(seq as u64), |s| s.seq)
            .ok()?;
        Some(&self.slots[at])
    }

    /// The entry in `slot` as a read gives it (collection names from `names`) and its payload's
    /// bytes.
    pub(super) fn entry(
        &self,
        slot: &Slot,
        form: Form,
        names: &mut Names<'_>,
    ) -> Result<(StreamEntry, usize)> {
        let collection = names.name(slot.collection)?;
        let mut payload_text = None;
        let mut size = 0;
        let change = if slot.deleted {
            Change::Delete
        } else {
            let text = self.payload(slot).ok_or_else(corrupt)?;
            size = text.len();
            if form == Form::Text {
                payload_text = Some(text);
                Change::Upsert {
                    payload: Default::default(),
                }
            } else {
                let payload = serde_json::from_str(text.as_str()).map_err(|_| corrupt())?;
                Change::Upsert { payload }
            }
        };
        let updated_ns = self.times.updated_at(slot.updated_at);
        let entry = StreamEntry {
            seq: Seq(slot.seq),
            record: Record {
                key: RecordKey {
                    sync_id: collection.sync_id,
                    collection_id: collection.collection_id.clone(),
                    upstream_id: UpstreamId(self.key(slot).to_owned()),
                },
                provider: collection.provider,
                version: slot.version,
                upstream_updated_at: OffsetDateTime::from_unix_timestamp_nanos(updated_ns as i128)
                    .map_err(|_| corrupt())?,
                change,
            },
            payload_text,
        };
        Ok((entry, size))
    }
}

/// Stores `entries` (in seq order) as segments of at most [`SEGMENT_RECORDS`] entries or
/// [`SEGMENT_BYTES`] of text; the segment of each entry.
pub(super) fn write(tx: &Connection, entries: &[Entry<'_>]) -> Result<Vec<i64>> {
    let mut places = Vec::with_capacity(entries.len());
    let mut start = 0;
    while start < entries.len() {
        let (mut end, mut bytes) = (start, 0);
        while end < entries.len() && end - start < SEGMENT_RECORDS && bytes < SEGMENT_BYTES {
            bytes += entries[end].text.len();
            end += 1;
        }
        let id = write_one(tx, &entries[start..end])?;
        places.resize(end, id);
        start = end;
    }
    Ok(places)
}

/// Stores `entries` (at least one, in seq order) as one segment; its id.
fn write_one(tx: &Connection, entries: &[Entry<'_>]) -> Result<i64> {
    // The first entry's times, unless another's is 0 (which its entry could then not tell
    // from the shared time).
    let share = |time: fn(&Entry<'_>) -> i64| {
        let first = time(&entries[0]);
        (first == 0 || entries.iter().all(|e| time(e) != 0)).then_some(first)
    };
    let times = Times {
        appended_at: share(|e| e.appended_at),
        updated_at: share(|e| e.updated_at),
    };
    let text_len: usize = entries.iter().map(|e| e.text.len()).sum();
    let mut raw = Vec::with_capacity(text_len + entries.len() * 32);
    let mut header = Vec::with_capacity(entries.len() * 32);
    varint(&mut header, entries.len() as u64);
    let mut previous = 0u64;
    for entry in entries {
        raw.extend_from_slice(entry.text.as_bytes());
        varint(&mut header, (entry.seq as u64).wrapping_sub(previous));
        previous = entry.seq as u64;
        varint(&mut header, entry.text.len() as u64);
        varint(&mut header, entry.collection as u64);
        varint(&mut header, entry.key.len() as u64);
        header.extend_from_slice(entry.key.as_bytes());
        varint(&mut header, entry.version.major);
        varint(&mut header, entry.version.minor);
        header.push(u8::from(entry.deleted));
        varint(
            &mut header,
            stored(times.updated_at, entry.updated_at) as u64,
        );
        varint(
            &mut header,
            stored(times.appended_at, entry.appended_at) as u64,
        );
    }
    let what = "storing records";
    let collection = entries[0].collection;
    let shared = entries.iter().all(|e| e.collection == collection);
    tx.prepare_cached(
        "insert into segments (records, live, appended_at_ns, updated_at_ns, first_seq, \
         last_seq, collection) values (?1, ?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute((
            entries.len() as i64,
            times.appended_at,
            times.updated_at,
            entries[0].seq,
            entries[entries.len() - 1].seq,
            shared.then_some(collection),
        ))
    })
    .or_storage(what)?;
    let id = tx.last_insert_rowid();
    seal(raw, &header, |body| {
        tx.prepare_cached("insert into segment_bodies (segment, body) values (?, ?)")
            .and_then(|mut s| s.execute((id, body)))
    })
    .or_storage(what)?;
    Ok(id)
}

/// Decodes a segment body (whose row holds `times`); a body that does not decode is reported
/// as a corrupt file.
pub(super) fn decode(body: &[u8], times: Times) -> Result<Packed> {
    let (text, header) = open(body)?;
    let mut rest = &header[..];
    let next = |rest: &mut &[u8]| read_varint(rest).ok_or_else(corrupt);
    let count = next(&mut rest)?;
    let mut slots = Vec::with_capacity((count as usize).min(SEGMENT_RECORDS * 4));
    let (mut seq, mut start) = (0u64, 0usize);
    for _ in 0..count {
        seq = seq.wrapping_add(next(&mut rest)?);
        let len = next(&mut rest)? as usize;
        let end = start.checked_add(len).filter(|&e| e <= text.len());
        let end = end.ok_or_else(corrupt)?;
        if !text.is_char_boundary(start) || !text.is_char_boundary(end) {
            return Err(corrupt());
        }
        let collection = next(&mut rest)? as i64;
        let key_len = next(&mut rest)? as usize;
        let key_at = header.len() - rest.len();
        let key = rest.get(..key_len).ok_or_else(corrupt)?;
        std::str::from_utf8(key).map_err(|_| corrupt())?;
        rest = &rest[key_len..];
        let version = Version::new(next(&mut rest)?, next(&mut rest)?);
        let (&deleted, after) = rest.split_first().ok_or_else(corrupt)?;
        rest = after;
        let updated_at = next(&mut rest)? as i64;
        let appended_at = next(&mut rest)? as i64;
        slots.push(Slot {
            seq,
            text: start..end,
            collection,
            key: key_at..key_at + key_len,
            version,
            deleted: deleted != 0,
            updated_at,
            appended_at,
        });
        start = end;
    }
    Ok(Packed {
        text: Arc::new(text),
        header,
        slots,
        times,
    })
}

/// Segment `id`, decoded; `None` if there is none.
pub(super) fn load(conn: &Connection, id: i64) -> Result<Option<Packed>> {
    let row: Option<(Option<i64>, Option<i64>, Vec<u8>)> = conn
        .prepare_cached(
            "select s.appended_at_ns, s.updated_at_ns, b.body \
             from segments s join segment_bodies b on b.segment = s.id where s.id = ?",
        )
        .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
        .optional()
        .or_storage("reading records")?;
    row.map(|(appended_at, updated_at, body)| {
        decode(
            &body,
            Times {
                appended_at,
                updated_at,
            },
        )
    })
    .transpose()
}

/// The dead seqs from `first` to `last`, in order.
pub(super) fn dead_in(conn: &Connection, first: i64, last: i64) -> Result<Vec<i64>> {
    conn.prepare_cached("select seq from dead where seq >= ? and seq <= ? order by seq")
        .and_then(|mut s| {
            s.query_map([first, last], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()
        })
        .or_storage("reading records")
}

/// Marks the entries `dead` names, as (segment, seq), no longer live: their seqs into `dead`
/// ([`STATEMENT_ROWS`] at a time), and one lowered count for each segment they are in.
pub(super) fn kill_all(tx: &Connection, dead: &mut [(i64, i64)]) -> Result<()> {
    let what = "storing records";
    // By segment, then seq: each segment's seqs together, in order.
    dead.sort_unstable();
    let mut rest = &*dead;
    while !rest.is_empty() {
        let rows = statement_rows(rest.len());
        let (chunk, after) = rest.split_at(rows);
        rest = after;
        let mut statement = tx.prepare_cached(dead_sql(rows)).or_storage(what)?;
        for (i, (_, seq)) in chunk.iter().enumerate() {
            statement.raw_bind_parameter(1 + i, seq).or_storage(what)?;
        }
        statement.raw_execute().or_storage(what)?;
    }
    let mut live = tx
        .prepare_cached("update segments set live = live - ? where id = ?")
        .or_storage(what)?;
    for group in dead.chunk_by(|a, b| a.0 == b.0) {
        live.execute((group.len() as i64, group[0].0))
            .or_storage(what)?;
    }
    Ok(())
}

/// The insert of `rows` dead seqs (one of [`STATEMENT_ROWS`]), built once.
fn dead_sql(rows: usize) -> &'static str {
    static TEXTS: LazyLock<Vec<String>> = LazyLock::new(|| {
        by_size(|rows| {
            format!(
                "insert into dead (seq) values {}",
                vec!["(?)"; rows].join(",")
            )
        })
    });
    sized(&TEXTS, rows)
}

/// Deletes the segments with no live entry, and their dead seqs (found through the sparse
/// segments' index).
pub(super) fn drop_unused(tx: &Connection) -> Result<()> {
    let what = "dropping unused records";
    let unused: Vec<(i64, i64, i64)> = tx
        .prepare_cached(
            "select id, first_seq, last_seq from segments where live * 2 < records and live <= 0",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .or_storage(what)?;
    for (id, first, last) in unused {
        forget(tx, id, first, last)?;
    }
    Ok(())
}

/// Deletes segment `id` (seqs `first ..= last`) and its dead seqs.
fn forget(tx: &Connection, id: i64, first: i64, last: i64) -> Result<()> {
    let what = "dropping unused records";
    tx.prepare_cached("delete from dead where seq >= ? and seq <= ?")
        .and_then(|mut s| s.execute([first, last]))
        .or_storage(what)?;
    tx.prepare_cached("delete from segment_bodies where segment = ?")
        .and_then(|mut s| s.execute([id]))
        .or_storage(what)?;
    tx.prepare_cached("delete from segments where id = ?")
        .and_then(|mut s| s.execute([id]))
        .or_storage(what)?;
    Ok(())
}

/// Deletes the segments with no live entry, then rewrites up to [`COMPACTIONS_PER_WRITE`]
/// segments fewer than half of whose entries are live, each one alone (so no two segments'
/// seq ranges overlap): its live entries go into a new segment, their keys name it, and the
/// old one goes with its dead seqs.
pub(super) fn compact(tx: &Connection) -> Result<()> {
    drop_unused(tx)?;
    let what = "compacting records";
    let sparse: Vec<(i64, i64, i64)> = tx
        .prepare_cached(
            "select id, first_seq, last_seq from segments where live * 2 < records \
             order by id limit ?",
        )
        .and_then(|mut s| {
            s.query_map([COMPACTIONS_PER_WRITE as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .or_storage(what)?;
    for (id, first, last) in sparse {
        let packed = load(tx, id)?.ok_or_else(corrupt)?;
        let dead = dead_in(tx, first, last)?;
        let live: Vec<&Slot> = packed
            .slots
            .iter()
            .filter(|s| dead.binary_search(&(s.seq as i64)).is_err())
            .collect();
        let entries: Vec<Entry<'_>> = live
            .iter()
            .map(|slot| Entry {
                seq: slot.seq as i64,
                collection: slot.collection,
                key: packed.key(slot),
                version: slot.version,
                deleted: slot.deleted,
                updated_at: packed.times.updated_at(slot.updated_at),
                appended_at: packed.appended_at(slot),
                text: &packed.text[slot.text.clone()],
            })
            .collect();
        if !entries.is_empty() {
            let moved = write_one(tx, &entries)?;
            let mut name = tx
                .prepare_cached(
                    "update keys set segment = ? where collection = ? and upstream_id = ?",
                )
                .or_storage(what)?;
            for entry in &entries {
                name.execute((moved, entry.collection, StoredId::of(entry.key)))
                    .or_storage(what)?;
            }
        }
        forget(tx, id, first, last)?;
    }
    Ok(())
}

/// The record at `seq` in segment `segment`, parsed.
pub(super) fn entry_at(
    segments: &mut Cache<'_>,
    names: &mut Names<'_>,
    segment: i64,
    seq: i64,
) -> Result<StreamEntry> {
    let packed = segments.get(segment)?;
    let slot = packed.find(seq).ok_or_else(|| {
        Error::invalid(format!(
            "records stream: segment {segment} lacks the record at seq {seq}"
        ))
    })?;
    Ok(packed.entry(slot, Form::Parsed, names)?.0)
}

/// Decoded segments kept for reads by key (the last few).
pub(super) struct Cache<'c> {
    conn: &'c Connection,
    cached: Vec<(i64, Packed)>,
}

impl<'c> Cache<'c> {
    pub(super) fn new(conn: &'c Connection) -> Self {
        Self {
            conn,
            cached: Vec::new(),
        }
    }

    /// Segment `id`, decoded.
    pub(super) fn get(&mut self, id: i64) -> Result<&Packed> {
        let at = match self.cached.iter().position(|(cached, _)| *cached == id) {
            Some(at) => at,
            None => {
                let packed = load(self.conn, id)?.ok_or_else(corrupt)?;
                if self.cached.len() >= 4 {
                    self.cached.remove(0);
                }
                self.cached.push((id, packed));
                self.cached.len() - 1
            }
        };
        Ok(&self.cached[at].1)
    }
}

/// Every entry's seq and the update and append times it holds (0 where its segment's row
/// holds them), in segment order.
#[cfg(test)]
pub(super) fn stored_times(conn: &Connection) -> Result<Vec<(u64, i64, i64)>> {
    let ids: Vec<i64> = conn
        .prepare("select id from segments order by last_seq")
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .or_storage("checking")?;
    let mut times = Vec::new();
    for id in ids {
        let packed = load(conn, id)?.ok_or_else(corrupt)?;
        times.extend(
            packed
                .slots
                .iter()
                .map(|s| (s.seq, s.updated_at, s.appended_at)),
        );
    }
    Ok(times)
}

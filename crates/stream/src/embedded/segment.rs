//! Payload segments: the payload texts of one append (up to [`SEGMENT_RECORDS`] of them, or
//! [`SEGMENT_BYTES`] of text), compressed together with LZ4 and stored as one row of
//! `segments`. A record names its payload by segment and slot.
//!
//! Compressing an append's payloads together finds what they repeat (JSON keys, shared
//! values) where one payload alone would not; the key index and the per-record columns stay
//! small rows in `records`. A segment counts the records still naming one of its payloads
//! (`live`, kept by triggers in the schema): it is deleted when none do, and rewritten with
//! only the live ones when fewer than half are ([`compact`]), so the file stays bounded under
//! churn.
//!
//! A segment also holds the times its records share ([`Times`]): a record's row then holds 0
//! for them, 16 bytes less per row.
//!
//! Body: a format byte ([`LZ4`]), then the LZ4 block (its size first) of
//! `text · header · u32 LE header length`, where the header is, as LEB128 varints, the slot
//! count and then each slot's seq (as the step from the previous one) and text length. The
//! text comes first so that decoding keeps it as it is decompressed, without a copy.

use super::*;

/// Payloads per segment at most.
pub(super) const SEGMENT_RECORDS: usize = 1000;

/// A segment is closed once its text reaches this many bytes (so a read of one record
/// decompresses at most about this much).
pub(super) const SEGMENT_BYTES: usize = 1 << 20;

/// Sparse segments rewritten per write at most (see [`compact`]).
const COMPACTIONS_PER_WRITE: usize = 4;

/// The body's format byte: an LZ4 block with its uncompressed size first.
const LZ4: u8 = 1;

/// The times a segment gives those of its records whose row holds 0 for them: the append's
/// time (every record of an append has it), and its first record's update time (a PostgreSQL
/// source's records of one page or one transaction all have it). Each row would otherwise
/// repeat these 16 bytes: a third of a small record's row (`cargo xtask bench initial-load`
/// with `SLUICE_BENCH_SHAPE=small`). `None` where the rows hold their own: in segments
/// rewritten by [`compact`] and those written before segments held times.
#[derive(Clone, Copy, Debug)]
pub(super) struct Times {
    pub(super) appended_at: Option<i64>,
    pub(super) updated_at: Option<i64>,
}

impl Times {
    /// The rows hold their own times.
    pub(super) const OWN: Times = Times {
        appended_at: None,
        updated_at: None,
    };

    /// A record's update time, from what its row holds.
    pub(super) fn updated_at(self, stored: i64) -> i64 {
        resolve(self.updated_at, stored)
    }

    /// A record's append time, from what its row holds.
    pub(super) fn appended_at(self, stored: i64) -> i64 {
        resolve(self.appended_at, stored)
    }
}

fn resolve(shared: Option<i64>, stored: i64) -> i64 {
    match shared {
        Some(shared) if stored == 0 => shared,
        _ => stored,
    }
}

/// What a row holds for `own`, given the segment's `shared` time: 0 when they are equal.
/// A segment shares no time that a record's 0 would be mistaken for ([`store`]).
fn stored(shared: Option<i64>, own: i64) -> i64 {
    match shared {
        Some(shared) if shared == own => 0,
        _ => own,
    }
}

/// A decoded segment: its text, each slot's seq and range in it, and its shared times.
pub(super) struct Segment {
    text: Arc<String>,
    slots: Vec<(u64, Range<usize>)>,
    times: Times,
}

impl Segment {
    /// The payload in `slot`.
    pub(super) fn payload(&self, slot: i64) -> Option<PayloadText> {
        let (_, range) = self.slots.get(usize::try_from(slot).ok()?)?;
        PayloadText::new(self.text.clone(), range.clone())
    }
}

/// Encodes payloads (each with the seq of the record naming it) as a segment body.
pub(super) fn encode<'a>(payloads: impl ExactSizeIterator<Item = (i64, &'a str)>) -> Vec<u8> {
    let mut raw = Vec::with_capacity(payloads.len() * 300);
    let mut header = Vec::with_capacity(payloads.len() * 4 + 4);
    varint(&mut header, payloads.len() as u64);
    let mut previous = 0u64;
    for (seq, text) in payloads {
        raw.extend_from_slice(text.as_bytes());
        varint(&mut header, (seq as u64).wrapping_sub(previous));
        varint(&mut header, text.len() as u64);
        previous = seq as u64;
    }
    let header_len = header.len() as u32;
    raw.extend_from_slice(&header);
    raw.extend_from_slice(&header_len.to_le_bytes());
    let mut body = Vec::with_capacity(raw.len() / 2 + 16);
    body.push(LZ4);
    body.extend_from_slice(&lz4_flex::block::compress_prepend_size(&raw));
    body
}

/// Decodes a segment body; a body that does not decode is reported as a corrupt file.
pub(super) fn decode(body: &[u8]) -> Result<Segment> {
    let corrupt = || Error::invalid("records stream: corrupt payload segment");
    let (&format, compressed) = body.split_first().ok_or_else(corrupt)?;
    if format != LZ4 {
        return Err(corrupt());
    }
    let mut raw = lz4_flex::block::decompress_size_prepended(compressed).map_err(|_| corrupt())?;
    let len_at = raw.len().checked_sub(4).ok_or_else(corrupt)?;
    let header_len = u32::from_le_bytes(raw[len_at..].try_into().map_err(|_| corrupt())?);
    let text_len = len_at
        .checked_sub(header_len as usize)
        .ok_or_else(corrupt)?;
    let mut header = &raw[text_len..len_at];
    let count = read_varint(&mut header).ok_or_else(corrupt)?;
    let mut slots = Vec::with_capacity((count as usize).min(SEGMENT_RECORDS * 4));
    let (mut seq, mut start) = (0u64, 0usize);
    for _ in 0..count {
        seq = seq.wrapping_add(read_varint(&mut header).ok_or_else(corrupt)?);
        let len = read_varint(&mut header).ok_or_else(corrupt)? as usize;
        let end = start.checked_add(len).filter(|&e| e <= text_len);
        let end = end.ok_or_else(corrupt)?;
        slots.push((seq, start..end));
        start = end;
    }
    raw.truncate(text_len);
    let text = String::from_utf8(raw).map_err(|_| corrupt())?;
    // Every slot must start and end on a character boundary for `PayloadText::new`.
    if slots
        .iter()
        .any(|(_, r)| !text.is_char_boundary(r.start) || !text.is_char_boundary(r.end))
    {
        return Err(corrupt());
    }
    Ok(Segment {
        text: Arc::new(text),
        slots,
        times: Times::OWN,
    })
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn read_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Where an append's payloads went: each record's `(segment, slot)` (`None` for a tombstone),
/// each record's times as its row holds them (`(upstream_updated_at_ns, appended_at_ns)`, 0
/// where its segment holds them), and the segments written.
pub(super) struct Stored {
    pub(super) places: Vec<Option<(i64, i64)>>,
    pub(super) times: Vec<(i64, i64)>,
    pub(super) segments: Vec<i64>,
}

/// Stores the payloads `texts` of `records`, whose seqs start after `first` and which are
/// appended at `appended_at`, as segments.
pub(super) fn store(
    tx: &Connection,
    records: &[Record],
    texts: &[Option<PayloadText>],
    first: i64,
    appended_at: i64,
) -> Result<Stored> {
    let mut places = vec![None; texts.len()];
    let mut times: Vec<(i64, i64)> = records
        .iter()
        .map(|r| (nanos(r.upstream_updated_at), appended_at))
        .collect();
    let mut segments = Vec::new();
    let mut pending: Vec<usize> = Vec::new();
    let mut bytes = 0;
    for (at, text) in texts.iter().enumerate() {
        if let Some(text) = text {
            pending.push(at);
            bytes += text.len();
        }
        let last = at + 1 == texts.len();
        if !pending.is_empty()
            && (last || pending.len() >= SEGMENT_RECORDS || bytes >= SEGMENT_BYTES)
        {
            let payloads = pending.iter().map(|&at| {
                let text = texts[at].as_ref().map_or("", PayloadText::as_str);
                (first + 1 + at as i64, text)
            });
            // The first record's update time, unless another's is 0 (which its row could
            // then not tell from the shared time).
            let updated = times[pending[0]].0;
            let shared = Times {
                appended_at: Some(appended_at),
                updated_at: (updated == 0 || pending.iter().all(|&at| times[at].0 != 0))
                    .then_some(updated),
            };
            let id = insert(tx, &encode(payloads), pending.len(), shared)?;
            segments.push(id);
            for (slot, &at) in pending.iter().enumerate() {
                places[at] = Some((id, slot as i64));
                let (updated, appended) = times[at];
                times[at] = (
                    stored(shared.updated_at, updated),
                    stored(shared.appended_at, appended),
                );
            }
            pending.clear();
            bytes = 0;
        }
    }
    Ok(Stored {
        places,
        times,
        segments,
    })
}

pub(super) fn insert(tx: &Connection, body: &[u8], records: usize, times: Times) -> Result<i64> {
    tx.prepare_cached(
        "insert into segments (records, live, appended_at_ns, updated_at_ns) \
         values (?1, ?1, ?2, ?3)",
    )
    .and_then(|mut s| s.execute((records as i64, times.appended_at, times.updated_at)))
    .or_storage("storing payloads")?;
    let id = tx.last_insert_rowid();
    tx.prepare_cached("insert into segment_bodies (segment, body) values (?, ?)")
        .and_then(|mut s| s.execute((id, body)))
        .or_storage("storing payloads")?;
    Ok(id)
}

/// Sets the live count of `segments`, written at seqs `first + 1 ..= last`, from the records
/// that name them: after an append some of whose records were stale (never stored), so their
/// payloads are not live. A segment left with none is deleted.
pub(super) fn recount(tx: &Connection, segments: &[i64], first: i64, last: i64) -> Result<()> {
    let mut count = tx
        .prepare_cached(
            "update segments set live = (select count(*) from records \
               where seq > ?1 and seq <= ?2 and segment = ?3) where id = ?3",
        )
        .or_storage("counting live payloads")?;
    for id in segments {
        count
            .execute((first, last, id))
            .or_storage("counting live payloads")?;
    }
    drop_unused(tx)
}

/// Deletes the segments no record names (found through the sparse segments' index).
pub(super) fn drop_unused(tx: &Connection) -> Result<()> {
    tx.prepare_cached(
        "delete from segment_bodies where segment in \
           (select id from segments where live * 2 < records and live <= 0)",
    )
    .and_then(|mut s| s.execute([]))
    .or_storage("dropping unused payloads")?;
    tx.prepare_cached("delete from segments where live * 2 < records and live <= 0")
        .and_then(|mut s| s.execute([]))
        .or_storage("dropping unused payloads")?;
    Ok(())
}

/// Deletes the segments no record names any more, then rewrites up to
/// [`COMPACTIONS_PER_WRITE`] segments fewer than half of whose payloads are still named by a
/// record: their live payloads move to one new segment (the records keep their seqs), and the
/// old segments, named by none any more, go.
pub(super) fn compact(tx: &Connection) -> Result<()> {
    drop_unused(tx)?;
    let sparse: Vec<(i64, Segment)> = tx
        .prepare_cached(
            "select s.id, s.appended_at_ns, s.updated_at_ns, b.body \
             from segments s join segment_bodies b on b.segment = s.id \
             where s.live * 2 < s.records order by s.id limit ?",
        )
        .and_then(|mut s| {
            s.query_map([COMPACTIONS_PER_WRITE as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, Vec<u8>>(3)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .or_storage("finding sparse payload segments")?
        .into_iter()
        .map(|(id, appended_at, updated_at, body)| {
            let mut segment = decode(&body)?;
            segment.times = Times {
                appended_at,
                updated_at,
            };
            Ok((id, segment))
        })
        .collect::<Result<_>>()?;
    if sparse.is_empty() {
        return Ok(());
    }
    // Each live payload with its record's seq and times (the new segment shares none).
    let mut live = Vec::new();
    {
        let mut named = tx
            .prepare_cached(
                "select segment, slot, upstream_updated_at_ns, appended_at_ns \
                 from records where seq = ?",
            )
            .or_storage("compacting payloads")?;
        for (id, segment) in &sparse {
            for (slot, (seq, _)) in segment.slots.iter().enumerate() {
                let row: Option<(Option<i64>, Option<i64>, i64, i64)> = named
                    .query_row([*seq as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .optional()
                    .or_storage("compacting payloads")?;
                let Some((Some(named_segment), Some(named_slot), updated, appended)) = row else {
                    continue;
                };
                if (named_segment, named_slot) == (*id, slot as i64) {
                    let text = segment.payload(slot as i64);
                    let times = (
                        segment.times.updated_at(updated),
                        segment.times.appended_at(appended),
                    );
                    live.push((*seq as i64, text.ok_or_else(|| corrupt_slot(*id))?, times));
                }
            }
        }
    }
    live.sort_by_key(|(seq, _, _)| *seq);
    for part in live.chunks(SEGMENT_RECORDS) {
        let body = encode(part.iter().map(|(seq, text, _)| (*seq, text.as_str())));
        let id = insert(tx, &body, part.len(), Times::OWN)?;
        let mut moved = tx
            .prepare_cached(
                "update records set segment = ?, slot = ?, upstream_updated_at_ns = ?, \
                 appended_at_ns = ? where seq = ?",
            )
            .or_storage("compacting payloads")?;
        for (slot, (seq, _, (updated, appended))) in part.iter().enumerate() {
            moved
                .execute((id, slot as i64, updated, appended, seq))
                .or_storage("compacting payloads")?;
        }
    }
    // Every sparse segment's live payloads moved: none names it any more.
    drop_unused(tx)
}

fn corrupt_slot(segment: i64) -> Error {
    Error::invalid(format!(
        "records stream: payload segment {segment} lacks a slot a record names"
    ))
}

/// Decoded segments for one read, so that a run of records from the same append decompresses
/// their segment once.
pub(super) struct Segments<'c> {
    conn: &'c Connection,
    cached: Vec<(i64, Segment)>,
}

/// Decoded segments kept by one read.
const CACHED_SEGMENTS: usize = 4;

impl<'c> Segments<'c> {
    pub(super) fn new(conn: &'c Connection) -> Self {
        Self {
            conn,
            cached: Vec::new(),
        }
    }

    /// The payload in `slot` of segment `id`, and the times the segment shares.
    pub(super) fn payload(&mut self, id: i64, slot: i64) -> Result<(PayloadText, Times)> {
        let at = match self.cached.iter().position(|(cached, _)| *cached == id) {
            Some(at) => at,
            None => {
                let (appended_at, updated_at, body): (_, _, Vec<u8>) = self
                    .conn
                    .prepare_cached(
                        "select s.appended_at_ns, s.updated_at_ns, b.body \
                         from segments s join segment_bodies b on b.segment = s.id \
                         where s.id = ?",
                    )
                    .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
                    .optional()
                    .or_storage("reading payloads")?
                    .ok_or_else(|| corrupt_slot(id))?;
                let mut segment = decode(&body)?;
                segment.times = Times {
                    appended_at,
                    updated_at,
                };
                if self.cached.len() >= CACHED_SEGMENTS {
                    self.cached.remove(0);
                }
                self.cached.push((id, segment));
                self.cached.len() - 1
            }
        };
        let segment = &self.cached[at].1;
        let text = segment.payload(slot).ok_or_else(|| corrupt_slot(id))?;
        Ok((text, segment.times))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_decodes_to_the_payloads_it_was_given() {
        let texts = ["{\"a\":1}", "", "{\"é\":\"\\u0000 ☃\"}", &"x".repeat(5000)];
        let body = encode(
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| (i as i64 * 300 + 7, *t)),
        );
        let segment = decode(&body).unwrap();
        for (slot, text) in texts.iter().enumerate() {
            assert_eq!(segment.payload(slot as i64).unwrap().as_str(), *text);
            assert_eq!(segment.slots[slot].0, slot as u64 * 300 + 7);
        }
        assert!(segment.payload(4).is_none());
        assert!(body.len() < 200, "{} bytes", body.len());
    }

    #[test]
    fn a_damaged_segment_is_reported_not_misread() {
        let body = encode([(1, "{\"a\":1}"), (2, "{\"b\":2}")].into_iter());
        for damaged in [
            Vec::new(),
            vec![9],
            body[..body.len() - 1].to_vec(),
            [&body[..2], &[0xff; 8][..]].concat(),
        ] {
            let error = decode(&damaged).err().expect("a damaged body decoded");
            assert!(error.to_string().contains("corrupt"), "{error}");
        }
    }
}

//! The stream's newest entries, kept in memory so that a consumer reading right behind the
//! sources is served without reading its records back from SQLite. Payloads are kept as the
//! JSON text the file holds, in the buffer the append wrote them into, and parsed when read.
//!
//! The tail mirrors the file exactly for the seqs it covers, or it is emptied: every write path
//! of [`crate::EmbeddedStream`] either records what it wrote here or calls [`Tail::reset`].
//! A read is answered from the tail only when the tail ends at the head the file shows, so an
//! append made by another process on the same file (which the tail never sees) sends readers
//! back to SQLite.
//!
//! An append's records are kept in the vectors the append wrote them from (a [`Landed`]
//! chunk), not moved one by one into a queue of their own: moving each 136-byte record once
//! more was two fifths of what recording an append here cost (`perf` on the initial load).
//! A chunk's records leave memory together, with its last entry: the tail may hold up to one
//! append's records (a PostgreSQL source's batch, 10,000 by default) beyond its limits. An
//! append larger than the tail (a large pushed body) is cut down to what the tail covers.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

use sluice_core::{Change, PayloadText, Record, RecordFilter, Seq, StreamEntry};

use crate::embedded::Form;

/// How much the tail holds at most.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TailLimits {
    /// Entries (seqs) covered.
    pub entries: usize,
    /// Approximate bytes held: each entry's payload JSON text plus [`ENTRY_OVERHEAD`].
    pub bytes: usize,
}

impl Default for TailLimits {
    fn default() -> Self {
        // Two source batches: a consumer that keeps up reads every batch from memory, while
        // the memory stays small (about 8 MiB).
        Self {
            entries: 20_000,
            bytes: 8 << 20,
        }
    }
}

/// What an entry costs in memory beyond its payload's JSON text: the record without its
/// payload (key strings, version, time) and its place in a chunk.
pub(crate) const ENTRY_OVERHEAD: usize = 192;

/// Records that landed in the file as given, at consecutive seqs, with their payloads' JSON
/// text as stored (`None` for a tombstone).
pub(crate) type Landed = (Vec<Record>, Vec<Option<PayloadText>>);

/// The records of one append (or of its part after a hash collision), at seqs `first ..`.
struct Chunk {
    first: u64,
    records: Vec<Record>,
    texts: Vec<Option<PayloadText>>,
    /// Each record's key hash (its key in [`Tail::newest`]), kept so that it is not hashed
    /// again when it leaves.
    hashes: Vec<u64>,
    /// `false` when the seq holds nothing in the file: a record replaced later by a newer
    /// version of the same key, or a purged tombstone.
    live: Vec<bool>,
    /// Records before this index have left the tail (they are dropped with the chunk).
    start: usize,
}

impl Chunk {
    /// One past the chunk's last seq.
    fn end(&self) -> u64 {
        self.first + self.records.len() as u64
    }
}

/// What an entry was charged when recorded. Kept until the entry leaves the front, even when
/// it is replaced: its text may keep its append's buffer alive until then.
fn charge(text: &Option<PayloadText>) -> usize {
    ENTRY_OVERHEAD + text.as_ref().map_or(0, PayloadText::len)
}

pub(crate) struct Tail<S = foldhash::fast::RandomState> {
    limits: TailLimits,
    /// The first seq covered; the tail covers `first .. first + len`.
    first: u64,
    len: usize,
    /// The covered seqs, in order and without gaps (a chunk's records before its `start`
    /// are not covered).
    chunks: VecDeque<Chunk>,
    /// Each key's newest seq in the tail, by a 64-bit hash of the key (no copy of the key
    /// per entry). Two keys with the same hash are told apart by the records' own keys, and
    /// then the tail starts over (see [`Tail::push`]).
    newest: HashMap<u64, u64, foldhash::fast::RandomState>,
    hasher: S,
    bytes: usize,
    /// Whether the last read was too far behind the head for the tail to serve it.
    read_far_behind: bool,
    /// Appends since a read the tail served, or was near enough the head to serve soon.
    appends_since_near_read: usize,
}

/// Appends after which a tail whose readers are all far behind stops holding them (see
/// [`Tail::holds_appends`]).
const IDLE_APPENDS: usize = 8;

impl Tail {
    /// An empty tail whose next entry will be `head + 1`.
    pub fn new(head: Seq, limits: TailLimits) -> Self {
        Self::with_hasher(head, limits, foldhash::fast::RandomState::default())
    }
}

impl<S: BuildHasher> Tail<S> {
    fn with_hasher(head: Seq, limits: TailLimits, hasher: S) -> Self {
        Self {
            limits,
            first: head.0 + 1,
            len: 0,
            chunks: VecDeque::new(),
            newest: HashMap::default(),
            hasher,
            bytes: 0,
            read_far_behind: false,
            appends_since_near_read: 0,
        }
    }

    /// Whether the append about to be committed should be recorded here. Not while every
    /// read is far behind the head (a consumer working through a backfill or a large
    /// transaction reads the file): recording appends nobody reads from memory cost 3.8% of
    /// sluice's CPU in an initial load (`perf`), and their memory. The next read near the
    /// head (or any read once this is false, by a reader that catches up) turns it back on;
    /// the tail then fills from the next append. Counts the append.
    pub fn holds_appends(&mut self) -> bool {
        self.appends_since_near_read = self.appends_since_near_read.saturating_add(1);
        !(self.read_far_behind && self.appends_since_near_read > IDLE_APPENDS)
    }

    /// Notes a read at position `after` with the file's head at `head`, and whether the tail
    /// `served` it.
    pub fn note_read(&mut self, after: Seq, head: Seq, served: bool) {
        let behind = head.0.saturating_sub(after.0);
        self.read_far_behind = !served && behind > self.limits.entries as u64;
        if !self.read_far_behind {
            self.appends_since_near_read = 0;
        }
    }

    /// The chunk holding `seq` and its index there, when the tail covers it.
    fn locate(&mut self, seq: u64) -> Option<(&mut Chunk, usize)> {
        if seq < self.first {
            return None;
        }
        let at = self.chunks.partition_point(|c| c.end() <= seq);
        let chunk = self.chunks.get_mut(at)?;
        let i = (seq - chunk.first) as usize;
        Some((chunk, i))
    }

    /// The last seq covered (the head the tail agrees with).
    pub fn end(&self) -> Seq {
        Seq(self.first + self.len as u64 - 1)
    }

    /// Forgets everything: the next entry recorded must be `head + 1`.
    pub fn reset(&mut self, head: Seq) {
        self.first = head.0 + 1;
        self.len = 0;
        self.chunks.clear();
        self.newest.clear();
        self.bytes = 0;
    }

    /// Records chunks just committed at consecutive seqs after [`Tail::end`]. Every record
    /// of them must have landed in the file (none skipped as stale); an earlier entry of the
    /// same key is then no longer in the file. Payloads are held as their text only (the
    /// parsed payload of an upsert is dropped here).
    pub fn extend(&mut self, chunks: impl IntoIterator<Item = Landed>) {
        for (records, texts) in chunks {
            self.push(records, texts);
        }
        while self.len > self.limits.entries || (self.bytes > self.limits.bytes && self.len > 0) {
            self.pop_front();
        }
        // An append larger than the tail itself (a large pushed body) gives back the memory of
        // the records that left at once, rather than when its last one does.
        if let Some(front) = self.chunks.front_mut()
            && front.records.len() > self.limits.entries
            && front.start * 2 >= front.records.len()
        {
            let gone = front.start;
            front.records.drain(..gone);
            front.texts.drain(..gone);
            front.hashes.drain(..gone);
            front.live.drain(..gone);
            front.first += gone as u64;
            front.start = 0;
        }
    }

    fn push(&mut self, mut records: Vec<Record>, mut texts: Vec<Option<PayloadText>>) {
        let n = records.len().min(texts.len());
        records.truncate(n);
        texts.truncate(n);
        let first = self.first + self.len as u64;
        let mut hashes = Vec::with_capacity(n);
        let mut live = vec![true; n];
        for i in 0..n {
            let seq = first + i as u64;
            let hash = self.hasher.hash_one(&records[i].key);
            hashes.push(hash);
            let Some(older) = self.newest.insert(hash, seq) else {
                continue;
            };
            let same = if older >= first {
                let j = (older - first) as usize;
                live[j] = false;
                records[j].key == records[i].key
            } else {
                match self.locate(older) {
                    Some((chunk, j)) => {
                        chunk.live[j] = false;
                        chunk.records[j].key == records[i].key
                    }
                    None => true,
                }
            };
            if !same {
                // Two keys, one hash (about never): the map can no longer say which seq is
                // newest for each. Start over after this record.
                records.drain(..=i);
                texts.drain(..=i);
                self.reset(Seq(seq));
                return self.push(records, texts);
            }
        }
        for record in &mut records {
            if let Change::Upsert { payload } = &mut record.change {
                // Held as text instead (dropped here, while it is still in the cache).
                *payload = Default::default();
            }
        }
        self.bytes += texts.iter().map(charge).sum::<usize>();
        self.len += n;
        if n > 0 {
            self.chunks.push_back(Chunk {
                first,
                records,
                texts,
                hashes,
                live,
                start: 0,
            });
        }
    }

    fn pop_front(&mut self) {
        let Some(chunk) = self.chunks.front_mut() else {
            return;
        };
        let i = chunk.start;
        let seq = chunk.first + i as u64;
        self.bytes -= charge(&chunk.texts[i]);
        // One lookup: a live entry is its key's newest.
        if chunk.live[i]
            && let Entry::Occupied(newest) = self.newest.entry(chunk.hashes[i])
            && *newest.get() == seq
        {
            newest.remove();
        }
        chunk.start += 1;
        if chunk.start == chunk.records.len() {
            self.chunks.pop_front();
        }
        self.first += 1;
        self.len -= 1;
    }

    /// Marks seqs that no longer hold anything in the file (purged tombstones).
    pub fn remove(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            let Some((chunk, i)) = self.locate(seq) else {
                continue;
            };
            if std::mem::replace(&mut chunk.live[i], false) {
                let hash = chunk.hashes[i];
                if self.newest.get(&hash) == Some(&seq) {
                    self.newest.remove(&hash);
                }
            }
        }
    }

    /// The entries after `after` passing `filter`, at most `limit`, with payloads in `form`,
    /// when the tail covers every seq after `after` up to `head`; `None` when the file must be
    /// read instead.
    pub fn read(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        head: Seq,
        form: Form,
    ) -> Option<Vec<StreamEntry>> {
        if head != self.end() || after.0 + 1 < self.first {
            return None;
        }
        let from = after.0 + 1;
        let at = self.chunks.partition_point(|c| c.end() <= from);
        // At most every entry the tail holds after `after`: the list never grows.
        let held = (self.end().0 + 1).saturating_sub(from);
        let mut entries = Vec::with_capacity((held as usize).min(limit));
        for chunk in self.chunks.range(at..) {
            let skip = from.saturating_sub(chunk.first) as usize;
            for i in skip..chunk.records.len() {
                if entries.len() == limit {
                    return Some(entries);
                }
                let record = &chunk.records[i];
                if !chunk.live[i] || !filter.matches(record.provider, &record.key) {
                    continue;
                }
                let mut entry = StreamEntry {
                    seq: Seq(chunk.first + i as u64),
                    record: record.clone(),
                    payload_text: chunk.texts[i].clone(),
                };
                if form == Form::Parsed
                    && let Some(text) = entry.payload_text.take()
                    && let Change::Upsert { payload } = &mut entry.record.change
                {
                    *payload = serde_json::from_str(text.as_str()).ok()?;
                }
                entries.push(entry);
            }
        }
        Some(entries)
    }
}

#[cfg(test)]
mod tests;

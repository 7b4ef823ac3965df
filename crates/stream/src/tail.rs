//! The stream's newest entries, kept in memory so that a consumer reading right behind the
//! sources is served without reading its records back from SQLite. Payloads are kept as the
//! JSON text the file holds, in the buffer the append wrote them into, and parsed when read.
//!
//! The tail mirrors the file exactly for the seqs it covers, or it is emptied: every write path
//! of [`crate::EmbeddedStream`] either records what it wrote here or calls [`Tail::reset`].
//! A read is answered from the tail only when the tail ends at the head the file shows, so an
//! append made by another process on the same file (which the tail never sees) sends readers
//! back to SQLite.

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
/// payload (key strings, version, time) and the slot.
pub(crate) const ENTRY_OVERHEAD: usize = 192;

/// One seq of the tail.
struct Slot {
    /// `None` when the seq holds nothing in the file: a record replaced later by a newer
    /// version of the same key, or a purged tombstone. An upsert's payload is left empty
    /// here and held as its text ([`StreamEntry::payload_text`]).
    entry: Option<StreamEntry>,
    /// What the slot was charged when recorded. Kept until the slot leaves the front, even
    /// when its entry is replaced: its text may keep its append's buffer alive until then.
    bytes: usize,
    /// The hash of the entry's key (its key in [`Tail::newest`]), kept so that the slot is
    /// not hashed again when it leaves.
    hash: u64,
}

pub(crate) struct Tail<S = foldhash::fast::RandomState> {
    limits: TailLimits,
    /// The seq of `slots[0]`; the tail covers `first ..= first + slots.len() - 1`.
    first: u64,
    slots: VecDeque<Slot>,
    /// Each key's newest seq in the tail, by a 64-bit hash of the key (no copy of the key
    /// per entry). Two keys with the same hash are told apart by the slot's own key, and then
    /// the tail starts over (see [`Tail::extend`]).
    newest: HashMap<u64, u64, foldhash::fast::RandomState>,
    hasher: S,
    bytes: usize,
}

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
            slots: VecDeque::new(),
            newest: HashMap::default(),
            hasher,
            bytes: 0,
        }
    }

    fn slot_of(&mut self, seq: u64) -> &mut Slot {
        &mut self.slots[(seq - self.first) as usize]
    }

    /// The last seq covered (the head the tail agrees with).
    pub fn end(&self) -> Seq {
        Seq(self.first + self.slots.len() as u64 - 1)
    }

    /// Forgets everything: the next entry recorded must be `head + 1`.
    pub fn reset(&mut self, head: Seq) {
        self.first = head.0 + 1;
        self.slots.clear();
        self.newest.clear();
        self.bytes = 0;
    }

    /// Records entries just committed at consecutive seqs after [`Tail::end`], each with its
    /// payload's JSON text as stored (`None` for a tombstone). Every one of them must have
    /// landed in the file (none skipped as stale); an earlier entry of the same key is then no
    /// longer in the file.
    pub fn extend(&mut self, committed: impl IntoIterator<Item = (Record, Option<PayloadText>)>) {
        for (mut record, text) in committed {
            let seq = self.first + self.slots.len() as u64;
            let hash = self.hasher.hash_one(&record.key);
            if let Some(older) = self.newest.insert(hash, seq) {
                let slot = self.slot_of(older);
                if slot
                    .entry
                    .as_ref()
                    .is_some_and(|e| e.record.key != record.key)
                {
                    // Two keys, one hash (about never): the map can no longer say which seq
                    // is newest for each. Start over after this entry.
                    self.reset(Seq(seq));
                    continue;
                }
                slot.entry = None;
            }
            if let Change::Upsert { payload } = &mut record.change {
                // Held as text instead (dropped here, while it is still in the cache).
                *payload = Default::default();
            }
            let bytes = ENTRY_OVERHEAD + text.as_ref().map_or(0, PayloadText::len);
            self.bytes += bytes;
            self.slots.push_back(Slot {
                entry: Some(StreamEntry {
                    seq: Seq(seq),
                    record,
                    payload_text: text,
                }),
                bytes,
                hash,
            });
        }
        while self.slots.len() > self.limits.entries
            || (self.bytes > self.limits.bytes && !self.slots.is_empty())
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(slot) = self.slots.pop_front() {
            self.bytes -= slot.bytes;
            if let Some(entry) = slot.entry
                && self.newest.get(&slot.hash) == Some(&entry.seq.0)
            {
                self.newest.remove(&slot.hash);
            }
        }
        self.first += 1;
    }

    /// Marks seqs that no longer hold anything in the file (purged tombstones).
    pub fn remove(&mut self, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            let Some(i) = seq.checked_sub(self.first) else {
                continue;
            };
            if let Some(slot) = self.slots.get_mut(i as usize)
                && slot.entry.take().is_some()
                && self.newest.get(&slot.hash) == Some(&seq)
            {
                self.newest.remove(&slot.hash);
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
        let start = (after.0 + 1 - self.first) as usize;
        self.slots
            .iter()
            .skip(start)
            .filter_map(|s| s.entry.as_ref())
            .filter(|e| filter.matches(e.record.provider, &e.record.key))
            .take(limit)
            .map(|e| {
                let mut entry = e.clone();
                if form == Form::Parsed
                    && let Some(text) = entry.payload_text.take()
                    && let Change::Upsert { payload } = &mut entry.record.change
                {
                    *payload = serde_json::from_str(text.as_str()).ok()?;
                }
                Some(entry)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::{Change, Provider, RecordKey, SyncId, Version};
    use time::OffsetDateTime;
    use uuid::Uuid;

    fn record(id: &str, version: u64) -> Record {
        Record {
            key: RecordKey::new(SyncId(Uuid::from_u128(1)), "public.t", id),
            provider: Provider::Postgres,
            version: Version::new(version, 0),
            upstream_updated_at: OffsetDateTime::UNIX_EPOCH,
            change: Change::Delete,
        }
    }

    fn ids(entries: &[StreamEntry]) -> Vec<(u64, String)> {
        entries
            .iter()
            .map(|e| (e.seq.0, e.record.key.upstream_id.0.clone()))
            .collect()
    }

    /// A tombstone's "payload" of `n` bytes: only its size matters to these tests.
    fn json(n: usize) -> Option<PayloadText> {
        Some(PayloadText::whole("x".repeat(n)))
    }

    const ALL: RecordFilter = RecordFilter::Provider(Provider::Postgres);

    #[test]
    fn a_newer_version_hides_the_older_seq_as_the_file_does() {
        let mut tail = Tail::new(Seq(10), TailLimits::default());
        tail.extend([(record("a", 1), json(10)), (record("b", 1), json(10))]);
        tail.extend([(record("a", 2), json(10))]);
        assert_eq!(tail.end(), Seq(13));
        let read = tail
            .read(&ALL, Seq(10), 100, Seq(13), Form::Parsed)
            .unwrap();
        assert_eq!(ids(&read), vec![(12, "b".into()), (13, "a".into())]);
        // The replaced entry stays charged until it leaves the front: its text shares its
        // append's buffer.
        assert_eq!(tail.bytes, 3 * (ENTRY_OVERHEAD + 10));
        // Limited, and from a later position.
        assert_eq!(
            ids(&tail.read(&ALL, Seq(10), 1, Seq(13), Form::Parsed).unwrap()),
            vec![(12, "b".into())]
        );
        assert_eq!(
            ids(&tail
                .read(&ALL, Seq(12), 100, Seq(13), Form::Parsed)
                .unwrap()),
            vec![(13, "a".into())]
        );
        assert!(
            tail.read(&ALL, Seq(13), 100, Seq(13), Form::Parsed)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn reads_it_cannot_answer_exactly_go_to_the_file() {
        let mut tail = Tail::new(Seq(10), TailLimits::default());
        tail.extend([(record("a", 1), None)]);
        // Behind the tail's start, or the file has moved on without it.
        assert!(
            tail.read(&ALL, Seq(9), 100, Seq(11), Form::Parsed)
                .is_none()
        );
        assert!(
            tail.read(&ALL, Seq(10), 100, Seq(12), Form::Parsed)
                .is_none()
        );
        let other = RecordFilter::Provider(Provider::Http);
        assert!(
            tail.read(&other, Seq(10), 100, Seq(11), Form::Parsed)
                .unwrap()
                .is_empty()
        );
        tail.reset(Seq(20));
        assert_eq!(tail.end(), Seq(20));
        assert!(
            tail.read(&ALL, Seq(10), 100, Seq(20), Form::Parsed)
                .is_none()
        );
        assert!(
            tail.read(&ALL, Seq(20), 100, Seq(20), Form::Parsed)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let limits = TailLimits {
            entries: 3,
            bytes: 3 * ENTRY_OVERHEAD + 25,
        };
        let mut tail = Tail::new(Seq(0), limits);
        tail.extend((0..5).map(|i| (record(&i.to_string(), 1), json(5))));
        assert_eq!(
            ids(&tail.read(&ALL, Seq(2), 10, Seq(5), Form::Parsed).unwrap()).len(),
            3
        );
        assert!(tail.read(&ALL, Seq(1), 10, Seq(5), Form::Parsed).is_none());
        tail.extend([(record("big", 1), json(ENTRY_OVERHEAD + 15))]);
        assert_eq!(
            ids(&tail.read(&ALL, Seq(4), 10, Seq(6), Form::Parsed).unwrap()),
            vec![(5, "4".into()), (6, "big".into())]
        );
        assert!(tail.bytes <= limits.bytes);
        // Evicted keys are forgotten: a newer version of one is just a new entry.
        tail.extend([(record("0", 2), None)]);
        assert_eq!(tail.newest.len(), tail.slots.len());
    }

    /// Every key hashes alike: each new key collides with the last one.
    #[derive(Default)]
    struct Colliding;
    impl BuildHasher for Colliding {
        type Hasher = Constant;
        fn build_hasher(&self) -> Constant {
            Constant
        }
    }
    struct Constant;
    impl std::hash::Hasher for Constant {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn two_keys_with_one_hash_start_the_tail_over() {
        let mut tail = Tail::with_hasher(Seq(0), TailLimits::default(), Colliding);
        tail.extend([(record("a", 1), None)]);
        // The same key again is told apart from a different one by the slot's key.
        tail.extend([(record("a", 2), None)]);
        assert_eq!(
            ids(&tail.read(&ALL, Seq(0), 10, Seq(2), Form::Parsed).unwrap()),
            vec![(2, "a".into())]
        );
        tail.extend([(record("b", 1), None), (record("c", 1), None)]);
        // "b" collided with "a": the tail starts after it, and "c" collided with nothing left.
        assert_eq!(tail.end(), Seq(4));
        assert!(tail.read(&ALL, Seq(2), 10, Seq(4), Form::Parsed).is_none());
        assert_eq!(
            ids(&tail.read(&ALL, Seq(3), 10, Seq(4), Form::Parsed).unwrap()),
            vec![(4, "c".into())]
        );
    }

    #[test]
    fn removed_seqs_are_skipped() {
        let mut tail = Tail::new(Seq(0), TailLimits::default());
        tail.extend([(record("a", 1), None), (record("b", 1), None)]);
        tail.remove([1, 99]);
        assert_eq!(
            ids(&tail.read(&ALL, Seq(0), 10, Seq(2), Form::Parsed).unwrap()),
            vec![(2, "b".into())]
        );
        tail.extend([(record("a", 2), None)]);
        assert_eq!(
            tail.read(&ALL, Seq(0), 10, Seq(3), Form::Parsed)
                .unwrap()
                .len(),
            2
        );
    }
}

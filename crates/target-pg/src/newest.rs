//! Each key's newest version in a batch, in stream order: both layouts write only that one,
//! and write rows in the order the stream holds them.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;

use sluice_core::StreamEntry;

/// The positions in `entries` of each key's newest version, in stream order (the order a
/// batch's entries come in; sorted here if they do not). `key(at)` names entry `at`'s row;
/// `newer(a, b)` says whether `a` replaces `b`, for two entries of one key. Keys are hashed
/// with foldhash, seeded per process: SipHash, the default, was 1% of sluice's CPU in `perf`.
pub(crate) fn newest<K: Hash + Eq>(
    entries: &[&StreamEntry],
    key: impl Fn(usize) -> K,
    newer: impl Fn(&StreamEntry, &StreamEntry) -> bool,
) -> Vec<usize> {
    let mut at_of: HashMap<K, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(entries.len(), Default::default());
    let mut kept = vec![false; entries.len()];
    for (at, entry) in entries.iter().enumerate() {
        match at_of.entry(key(at)) {
            Entry::Occupied(mut slot) => {
                if newer(entry, entries[*slot.get()]) {
                    kept[*slot.get()] = false;
                    kept[at] = true;
                    slot.insert(at);
                }
            }
            Entry::Vacant(slot) => {
                kept[at] = true;
                slot.insert(at);
            }
        }
    }
    let mut order: Vec<usize> = (0..entries.len()).filter(|&at| kept[at]).collect();
    if !order.is_sorted_by_key(|&at| entries[at].seq) {
        order.sort_by_key(|&at| entries[at].seq);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::{Change, Provider, Record, RecordKey, Seq, SyncId, Version};

    fn entry(seq: u64, id: &str, version: u64) -> StreamEntry {
        StreamEntry {
            seq: Seq(seq),
            record: Record {
                key: RecordKey::new(SyncId(uuid::Uuid::nil()), "c", id),
                provider: Provider::Http,
                version: Version::new(version, 0),
                upstream_updated_at: time::OffsetDateTime::UNIX_EPOCH,
                change: Change::Delete,
            },
            payload_text: None,
        }
    }

    #[test]
    fn each_keys_newest_in_stream_order_with_the_callers_rule_for_ties() {
        // Given out of stream order; "a" has two entries of version 2 (seqs 3 and 6).
        let given = [
            entry(7, "c", 1),
            entry(3, "a", 2),
            entry(2, "b", 5),
            entry(6, "a", 2),
            entry(1, "a", 1),
            entry(4, "b", 4),
        ];
        let entries: Vec<&StreamEntry> = given.iter().collect();
        let id = |at: usize| entries[at].record.key.upstream_id.0.as_str();
        let seqs = |order: Vec<usize>| {
            order
                .iter()
                .map(|&at| entries[at].seq.0)
                .collect::<Vec<_>>()
        };
        // The first of the highest versions (the mirror's rule).
        let first = newest(&entries, id, |a, b| a.record.version > b.record.version);
        assert_eq!(seqs(first), vec![2, 3, 7]);
        // The latest of the highest (the consumer table's rule).
        let latest = newest(&entries, id, |a, b| {
            (a.record.version, a.seq) > (b.record.version, b.seq)
        });
        assert_eq!(seqs(latest), vec![2, 6, 7]);
    }
}

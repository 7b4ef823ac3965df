//! The tail's own checks: what it covers, what it hides, what it holds.

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

/// Records `entries` as one append.
fn extend<S: BuildHasher>(
    tail: &mut Tail<S>,
    entries: impl IntoIterator<Item = (Record, Option<PayloadText>)>,
) {
    tail.extend([entries.into_iter().unzip()]);
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

/// Appends stop being held once every read is far behind the head and a few appends have
/// passed; a read near the head, or one the tail served, turns them back on.
#[test]
fn appends_are_held_while_some_reader_is_near_the_head() {
    let limits = TailLimits {
        entries: 10,
        bytes: 1 << 20,
    };
    let mut tail = Tail::new(Seq(0), limits);
    // No reader yet: held.
    for _ in 0..3 * IDLE_APPENDS {
        assert!(tail.holds_appends());
    }
    tail.note_read(Seq(0), Seq(100), false);
    assert!(!tail.holds_appends(), "idle appends already passed");
    tail.note_read(Seq(90), Seq(100), false);
    for _ in 0..IDLE_APPENDS {
        assert!(tail.holds_appends());
    }
    tail.note_read(Seq(50), Seq(100), false);
    assert!(!tail.holds_appends());
    // Served from memory: held again, however many appends follow.
    tail.note_read(Seq(99), Seq(100), true);
    for _ in 0..3 * IDLE_APPENDS {
        assert!(tail.holds_appends());
    }
}

#[test]
fn a_newer_version_hides_the_older_seq_as_the_file_does() {
    let mut tail = Tail::new(Seq(10), TailLimits::default());
    extend(
        &mut tail,
        [(record("a", 1), json(10)), (record("b", 1), json(10))],
    );
    extend(&mut tail, [(record("a", 2), json(10))]);
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
    extend(&mut tail, [(record("a", 1), None)]);
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
    extend(
        &mut tail,
        (0..5).map(|i| (record(&i.to_string(), 1), json(5))),
    );
    assert_eq!(
        ids(&tail.read(&ALL, Seq(2), 10, Seq(5), Form::Parsed).unwrap()).len(),
        3
    );
    assert!(tail.read(&ALL, Seq(1), 10, Seq(5), Form::Parsed).is_none());
    extend(&mut tail, [(record("big", 1), json(ENTRY_OVERHEAD + 15))]);
    assert_eq!(
        ids(&tail.read(&ALL, Seq(4), 10, Seq(6), Form::Parsed).unwrap()),
        vec![(5, "4".into()), (6, "big".into())]
    );
    assert!(tail.bytes <= limits.bytes);
    // Evicted keys are forgotten: a newer version of one is just a new entry.
    extend(&mut tail, [(record("0", 2), None)]);
    assert_eq!(tail.newest.len(), tail.len);
    // An append larger than the tail keeps only the records the tail covers in memory.
    extend(
        &mut tail,
        (0..100).map(|i| (record(&format!("k{i}"), 1), None)),
    );
    assert_eq!(tail.chunks.len(), 1);
    assert_eq!(tail.chunks[0].records.len(), 3);
    assert_eq!(
        ids(&tail
            .read(&ALL, Seq(104), 10, Seq(107), Form::Parsed)
            .unwrap()),
        vec![
            (105, "k97".into()),
            (106, "k98".into()),
            (107, "k99".into())
        ]
    );
    assert!(
        tail.read(&ALL, Seq(103), 10, Seq(107), Form::Parsed)
            .is_none()
    );
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
    extend(&mut tail, [(record("a", 1), None)]);
    // The same key again is told apart from a different one by the slot's key.
    extend(&mut tail, [(record("a", 2), None)]);
    assert_eq!(
        ids(&tail.read(&ALL, Seq(0), 10, Seq(2), Form::Parsed).unwrap()),
        vec![(2, "a".into())]
    );
    extend(&mut tail, [(record("b", 1), None), (record("c", 1), None)]);
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
    extend(&mut tail, [(record("a", 1), None), (record("b", 1), None)]);
    tail.remove([1, 99]);
    assert_eq!(
        ids(&tail.read(&ALL, Seq(0), 10, Seq(2), Form::Parsed).unwrap()),
        vec![(2, "b".into())]
    );
    extend(&mut tail, [(record("a", 2), None)]);
    assert_eq!(
        tail.read(&ALL, Seq(0), 10, Seq(3), Form::Parsed)
            .unwrap()
            .len(),
        2
    );
}

/// Appends of many sizes (most larger than the room left, some larger than the tail) and
/// purged seqs, against a plain model of the file: every read the tail answers must equal
/// the model's, whatever chunk it starts in or crosses, and the tail keeps within its
/// limits.
#[test]
fn chunks_evicted_in_part_read_as_the_file_does() {
    let limits = TailLimits {
        entries: 25,
        bytes: 25 * ENTRY_OVERHEAD,
    };
    let mut tail = Tail::new(Seq(0), limits);
    // The file: each seq's key while it still holds it.
    let mut file: Vec<Option<String>> = vec![None];
    let mut random = sluice_core::Xorshift::new(0x9e37_79b9_7f4a_7c15);
    let mut next = move |n: u64| random.below(n);
    for round in 0..400 {
        // Now and then an append larger than the tail.
        let size = if round % 50 == 49 { 60 } else { next(12) };
        let keys: Vec<String> = (0..size).map(|_| next(15).to_string()).collect();
        for id in &keys {
            if let Some(older) = file.iter().rposition(|k| k.as_ref() == Some(id)) {
                file[older] = None;
            }
            file.push(Some(id.clone()));
        }
        let text = if round % 3 == 0 { json(1) } else { None };
        extend(
            &mut tail,
            keys.iter().map(|id| (record(id, round + 1), text.clone())),
        );
        if next(4) == 0 {
            let seq = 1 + next(file.len() as u64 - 1);
            file[seq as usize] = None;
            tail.remove([seq]);
        }
        let head = Seq(file.len() as u64 - 1);
        assert_eq!(tail.end(), head);
        assert!(tail.len <= limits.entries && tail.bytes <= limits.bytes);
        let live = (tail.first..=head.0)
            .filter(|&seq| file[seq as usize].is_some())
            .count();
        assert_eq!(tail.newest.len(), live, "round {round}");
        for after in 0..=head.0 {
            let limit = 1 + next(10) as usize;
            let Some(read) = tail.read(&ALL, Seq(after), limit, head, Form::Text) else {
                assert!(after + 1 < tail.first, "round {round}: after {after}");
                continue;
            };
            let expected: Vec<(u64, String)> = (after + 1..=head.0)
                .filter_map(|seq| Some((seq, file[seq as usize].clone()?)))
                .take(limit)
                .collect();
            assert_eq!(ids(&read), expected, "round {round}: after {after}");
        }
    }
}

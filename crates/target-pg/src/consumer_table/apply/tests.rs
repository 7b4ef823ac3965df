//! Planning and encoding a partition's rows.

use super::*;
use sluice_core::{Provider, Record, SyncId, Version};

fn entry(seq: u64, id: &str, version: u64, change: Change) -> StreamEntry {
    StreamEntry {
        seq: Seq(seq),
        record: Record {
            key: RecordKey::new(SyncId(Uuid::from_u128(7)), "c", id),
            provider: Provider::Http,
            version: Version::new(version, 0),
            upstream_updated_at: time::OffsetDateTime::UNIX_EPOCH,
            change,
        },
        payload_text: None,
    }
}

#[test]
fn duplicate_keys_in_a_batch_keep_the_newest_version() {
    let up = |v: i64| Change::upsert(serde_json::json!({ "v": v })).unwrap();
    let a1 = entry(1, "a", 5, up(5));
    let a0 = entry(2, "a", 3, up(3)); // older version arriving later
    let b1 = entry(3, "b", 1, up(1));
    let b2 = entry(4, "b", 2, Change::Delete);
    let Planned { upserts, deletes } = plan_partition(&[&a1, &a0, &b1, &b2]);
    assert_eq!(upserts.len(), 1);
    assert_eq!(upserts[0].1.record.version, Version::new(5, 0));
    assert_eq!(upserts[0].0, upserts[0].1.record.key.row_id());
    assert_eq!(deletes, vec![b2.record.key.row_id()]);
}

#[test]
fn a_plan_is_in_stream_order_and_a_version_tie_goes_to_the_later_position() {
    let up = |v: i64| Change::upsert(serde_json::json!({ "v": v })).unwrap();
    let c = entry(9, "c", 1, up(1));
    let a = entry(3, "a", 2, up(2));
    let b_first = entry(4, "b", 7, up(1));
    let b_tie = entry(8, "b", 7, up(2)); // same version, later in the stream: kept
    let d = entry(5, "d", 1, Change::Delete);
    let e = entry(1, "e", 1, Change::Delete);
    // Given out of stream order: planned in it.
    let planned = plan_partition(&[&c, &b_tie, &a, &b_first, &d, &e]);
    let seqs: Vec<u64> = planned.upserts.iter().map(|(_, e)| e.seq.0).collect();
    assert_eq!(seqs, vec![3, 8, 9]);
    for (id, entry) in &planned.upserts {
        assert_eq!(*id, entry.record.key.row_id());
    }
    assert_eq!(
        planned.deletes,
        vec![e.record.key.row_id(), d.record.key.row_id()]
    );
    // Many keys, each twice: one row per key, the newer version, in stream order.
    let many: Vec<StreamEntry> = (0..3000u64)
        .map(|i| entry(i, &format!("k{}", i % 1500), i, up(i as i64)))
        .collect();
    let refs: Vec<&StreamEntry> = many.iter().collect();
    let planned = plan_partition(&refs);
    let seqs: Vec<u64> = planned.upserts.iter().map(|(_, e)| e.seq.0).collect();
    assert_eq!(seqs, (1500..3000).collect::<Vec<_>>());
}

/// A partition's rows as `copy_rows` sends them, in two pieces: the rows (without the
/// format's header and trailer), the keys whose NULs were replaced, and the plan.
fn encode_partition<'a>(
    entries: &[&'a StreamEntry],
    written_at: i64,
) -> (Vec<u8>, Vec<RecordKey>, Planned<'a>) {
    let planned = plan_partition(entries);
    let (mut rows, mut sanitized) = (Vec::new(), Vec::new());
    let half = planned.upserts.len() / 2;
    for piece in [&planned.upserts[..half], &planned.upserts[half..]] {
        encode_rows(piece, written_at, &mut rows, &mut sanitized);
    }
    (rows, sanitized, planned)
}

/// The entry as `read_text` hands it over: the stored JSON text, the payload unparsed.
fn as_text(entry: &StreamEntry) -> StreamEntry {
    let mut entry = entry.clone();
    if let Change::Upsert { payload } = &mut entry.record.change {
        entry.payload_text = Some(sluice_core::PayloadText::whole(
            serde_json::to_string(payload).unwrap(),
        ));
        *payload = Payload::new();
    }
    entry
}

#[test]
fn payloads_as_stored_text_encode_exactly_as_parsed_ones_nul_included() {
    let upsert = |v: serde_json::Value| Change::upsert(v).unwrap();
    let entries = [
        entry(
            1,
            "a",
            1,
            upsert(
                serde_json::json!({ "n": 1, "s": "t\tab\n\\", "f": 1.5e300, "o": {"x": [null, true]} }),
            ),
        ),
        entry(
            2,
            "b\0",
            1,
            upsert(serde_json::json!({ "k\u{0}": ["x\u{0}y"] })),
        ),
        entry(
            3,
            "c",
            1,
            upsert(serde_json::json!({ "s": "fine \\u0000 literal" })),
        ),
        entry(4, "d", 1, Change::Delete),
    ];
    let parsed: Vec<&StreamEntry> = entries.iter().collect();
    let texts: Vec<StreamEntry> = entries.iter().map(as_text).collect();
    let texts: Vec<&StreamEntry> = texts.iter().collect();
    let (a_rows, a_sanitized, a) = encode_partition(&parsed, 820_454_400_000_000);
    let (b_rows, b_sanitized, b) = encode_partition(&texts, 820_454_400_000_000);
    assert_eq!(a_rows, b_rows);
    let ids = |p: &Planned| p.upserts.iter().map(|(id, _)| *id).collect::<Vec<_>>();
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(a.upserts.len(), 3);
    assert_eq!(a.deletes, b.deletes);
    assert_eq!(a_sanitized, b_sanitized);
    assert_eq!(b_sanitized, vec![entries[1].record.key.clone()]);
}

/// The fields of one binary `COPY` row, and what follows it.
fn fields(mut row: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    fn take<'a>(row: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (head, rest) = row.split_at(n);
        *row = rest;
        head
    }
    let count = i16::from_be_bytes(take(&mut row, 2).try_into().unwrap());
    let fields = (0..count)
        .map(|_| {
            let len = i32::from_be_bytes(take(&mut row, 4).try_into().unwrap());
            take(&mut row, len as usize)
        })
        .collect();
    (fields, row)
}

#[test]
fn nul_characters_are_replaced_and_reported() {
    let clean = entry(
        1,
        "ok",
        1,
        Change::upsert(serde_json::json!({ "s": "fine \\u0000 literal" })).unwrap(),
    );
    let dirty = entry(
        2,
        "bad\0id",
        1,
        Change::upsert(serde_json::json!({ "k\u{0}": ["x\u{0}y"] })).unwrap(),
    );
    let (encoded, sanitized, planned) = encode_partition(&[&clean, &dirty], 7);
    assert_eq!(sanitized, vec![dirty.record.key.clone()]);
    // One row per upsert, in the plan's order, eight fields each, and nothing after them.
    let mut rest = encoded.as_slice();
    let rows: Vec<Vec<&[u8]>> = planned
        .upserts
        .iter()
        .map(|(id, _)| {
            let (fields, after) = fields(rest);
            rest = after;
            assert_eq!(fields.len(), 8);
            assert_eq!(fields[0], id.as_bytes());
            fields
        })
        .collect();
    assert!(rest.is_empty());
    let text = |f: &[u8]| String::from_utf8(f.to_vec()).unwrap();
    let by_id = |id: &str| rows.iter().find(|r| text(r[3]) == id).unwrap();
    let dirty_row = by_id("bad\u{FFFD}id");
    // jsonb: version 1, then the JSON text with the NULs replaced.
    assert_eq!(dirty_row[4][0], 1);
    let json = text(&dirty_row[4][1..]);
    assert!(!json.contains('\0') && !json.contains("\\u0000"), "{json}");
    assert!(
        json.contains("k\u{FFFD}") && json.contains("x\u{FFFD}y"),
        "{json}"
    );
    // A literal backslash-u0000 (escaped in JSON) is ordinary text, not a NUL.
    let clean_json = text(&by_id("ok")[4][1..]);
    assert!(clean_json.contains(r"fine \\u0000 literal"), "{clean_json}");
    // The sync id as 16 bytes, the record's time, and the written time in both of its
    // columns.
    assert_eq!(dirty_row[1], Uuid::from_u128(7).as_bytes());
    assert_eq!(
        dirty_row[5],
        pg_micros(time::OffsetDateTime::UNIX_EPOCH).to_be_bytes()
    );
    assert_eq!(dirty_row[6], 7i64.to_be_bytes());
    assert_eq!(dirty_row[7], 7i64.to_be_bytes());
}

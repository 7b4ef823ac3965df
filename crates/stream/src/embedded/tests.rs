//! The embedded store's own checks: its settings and its query plans.

use super::*;
use rusqlite::types::Value;

/// A new file gets 16 KiB pages and the WAL journal, and every connection syncs fully.
#[tokio::test]
async fn a_new_file_has_the_streams_settings() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let settings = stream
        .with_reader(|conn| {
            let get = |pragma: &str| {
                conn.query_row(&format!("pragma {pragma}"), [], |r| r.get::<_, Value>(0))
                    .or_storage("reading a setting")
            };
            Ok((get("page_size")?, get("journal_mode")?, get("synchronous")?))
        })
        .unwrap();
    assert_eq!(
        settings,
        (
            Value::Integer(16384),
            Value::Text("wal".into()),
            Value::Integer(2)
        )
    );
}

/// Reads find the segments after their position through the index of segments' last seqs,
/// never by scanning or sorting every segment.
#[tokio::test]
async fn reads_find_their_segments_by_seq() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let plan = stream
        .with_reader(|conn| {
            let mut statement = conn
                .prepare(&format!("explain query plan {}", walk::WALK))
                .or_storage("explaining")?;
            let mut rows = statement.query([0]).or_storage("explaining")?;
            let mut plan = Vec::new();
            while let Some(row) = rows.next().or_storage("explaining")? {
                plan.push(row.get::<_, String>(3).or_storage("explaining")?);
            }
            Ok(plan)
        })
        .unwrap();
    assert!(
        plan.iter()
            .any(|p| p.contains("USING INDEX segments_by_last (last_seq>?)"))
            && !plan.iter().any(|p| p.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}

pub(super) fn record(id: u64, version: u64, payload: Option<serde_json::Value>) -> Record {
    Record {
        key: RecordKey::new(SyncId(Uuid::from_u128(7)), "public.t", id.to_string()),
        provider: Provider::Postgres,
        version: Version::new(version, 0),
        upstream_updated_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        change: match payload {
            Some(p) => Change::upsert(p).unwrap(),
            None => Change::Delete,
        },
    }
}

pub(super) fn upsert(id: u64, version: u64) -> Record {
    let text = format!("{id}-{version}-").repeat(20);
    record(
        id,
        version,
        Some(serde_json::json!({"id": id, "v": version, "text": text})),
    )
}

/// Every segment's entry count and live count, beside the keys that name it; and the keys
/// naming a segment that is not there (with its body). Every segment's dead seqs must account
/// for the entries that are not live.
pub(super) fn segment_accounts(stream: &EmbeddedStream) -> (Vec<(i64, i64, i64, i64)>, i64) {
    stream
        .with_reader(|conn| {
            let mut s = conn
                .prepare(
                    "select s.id, s.records, s.live, \
                       (select count(*) from keys k where k.segment = s.id), \
                       (select count(*) from dead d where d.seq between s.first_seq and s.last_seq) \
                     from segments s",
                )
                .or_storage("checking")?;
            let rows: Vec<(i64, i64, i64, i64, i64)> = s
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .or_storage("checking")?;
            for (id, records, live, _, dead) in &rows {
                assert_eq!(records - live, *dead, "segment {id}'s dead seqs");
            }
            let strays: i64 = conn
                .query_row(
                    "select count(*) from dead where not exists (select 1 from segments s \
                       where dead.seq between s.first_seq and s.last_seq)",
                    [],
                    |r| r.get(0),
                )
                .or_storage("checking")?;
            assert_eq!(strays, 0, "dead seqs of no segment");
            let orphans = conn
                .query_row(
                    "select count(*) from keys where segment not in (select id from segments) \
                        or segment not in (select segment from segment_bodies)",
                    [],
                    |r| r.get(0),
                )
                .or_storage("checking")?;
            let rows = rows
                .into_iter()
                .map(|(id, records, live, named, _)| (id, records, live, named))
                .collect();
            Ok((rows, orphans))
        })
        .unwrap()
}

/// [`segment_accounts`], checked: no key names a missing segment, and every segment's live
/// count is the number of keys naming it.
pub(super) fn exact_counts(stream: &EmbeddedStream) -> Vec<(i64, i64, i64, i64)> {
    let (segments, orphans) = segment_accounts(stream);
    assert_eq!(orphans, 0);
    for (id, records, live, named) in &segments {
        assert_eq!(live, named, "segment {id} of {records}");
    }
    segments
}

/// Appends of new records, updates, a key twice in one batch, stale versions, tombstones, a
/// truncate and a purge: every segment's count of live payloads equals the records naming
/// it, none is kept with no record naming it, and every live record's payload reads back.
#[tokio::test]
async fn segment_counts_follow_every_kind_of_write() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    stream
        .append((1..=50).map(|i| upsert(i, 1)).collect())
        .await
        .unwrap();
    // Updates of some, one key twice in the batch, a stale version, a tombstone.
    let outcome = stream
        .append(vec![
            upsert(3, 2),
            upsert(4, 2),
            upsert(4, 3),
            upsert(5, 0),
            record(6, 2, None),
        ])
        .await
        .unwrap();
    assert_eq!(outcome.skipped_stale, 1);
    // A batch all of whose records are stale writes no live payload.
    let outcome = stream
        .append(vec![upsert(7, 0), upsert(8, 0)])
        .await
        .unwrap();
    assert_eq!(outcome.appended, 0);
    let sync = SyncId(Uuid::from_u128(7));
    stream
        .tombstone_collection(
            sync,
            &CollectionId("public.t".into()),
            Version::new(2, 5),
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    stream
        .append(vec![upsert(4, 9), upsert(60, 1)])
        .await
        .unwrap();
    let consumer = ConsumerId("c".into());
    let head = stream.head().await.unwrap();
    stream
        .acknowledge(&consumer, &RecordFilter::Provider(Provider::Postgres), head)
        .await
        .unwrap();
    let (segments, orphans) = segment_accounts(&stream);
    assert_eq!(orphans, 0);
    for (id, records, live, named) in &segments {
        assert_eq!(live, named, "segment {id} of {records}");
        assert!(*live > 0, "segment {id} is named by no record");
    }
    let live = stream.live_records().await.unwrap();
    let ids: Vec<(&str, u64)> = live
        .iter()
        .map(|e| (e.record.key.upstream_id.0.as_str(), e.record.version.major))
        .collect();
    assert_eq!(ids, [("4", 9), ("60", 1)]);
    assert_eq!(
        live[0].record.change.payload().unwrap()["text"],
        "4-9-".repeat(20)
    );
}

/// The file's pages holding data (not free), as a reader sees them.
fn used_pages(stream: &EmbeddedStream) -> i64 {
    stream
        .with_reader(|conn| {
            conn.query_row(
                "select page_count - freelist_count from pragma_page_count, pragma_freelist_count",
                [],
                |r| r.get(0),
            )
            .or_storage("checking")
        })
        .unwrap()
}

/// The same keys updated over and over: the segments and the file stay bounded by the live
/// records, not by the writes.
#[tokio::test]
async fn churn_keeps_the_segments_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let keys = 2000u64;
    stream
        .append((0..keys).map(|i| upsert(i, 1)).collect())
        .await
        .unwrap();
    // Rounds of updates to keys picked at random: every append leaves holes in older segments,
    // and a segment whose keys are not all updated again is never emptied by updates alone.
    let mut sizes = Vec::new();
    let mut random = sluice_core::Xorshift::new(0x2545_f491_4f6c_dd1d);
    let mut newest: Vec<u64> = vec![1; keys as usize];
    for round in 0..150u64 {
        let batch: Vec<Record> = (0..100)
            .map(|_| upsert(random.below(keys), round + 2))
            .collect();
        for r in &batch {
            newest[r.key.upstream_id.0.parse::<usize>().unwrap()] = r.version.major;
        }
        stream.append(batch).await.unwrap();
        if round % 50 == 49 {
            sizes.push(used_pages(&stream));
        }
    }
    let (segments, orphans) = segment_accounts(&stream);
    assert_eq!(orphans, 0);
    let stored: i64 = segments.iter().map(|(_, records, _, _)| records).sum();
    let live: i64 = segments.iter().map(|(_, _, live, _)| live).sum();
    assert_eq!(live, keys as i64);
    // Every segment is at least half live once compacted (without compaction: 9,900 kept).
    assert!(
        stored <= 2 * live,
        "{stored} payloads kept for {live} live records"
    );
    for (id, _, live, named) in &segments {
        assert_eq!(live, named, "segment {id}");
    }
    // After the first rounds the file's pages in use stay level rather than growing.
    assert!(
        sizes[2] <= sizes[0] * 5 / 4,
        "the pages in use grew: {sizes:?}"
    );
    // Read back from the file (a new handle, nothing in memory) through segments rewritten
    // alone: every key once, at its newest version, in seq order.
    drop(stream);
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let filter = RecordFilter::Provider(Provider::Postgres);
    let read = read_all(&stream, &filter, Seq::START, 300).await;
    assert!(read.windows(2).all(|w| w[0].seq < w[1].seq));
    let mut versions: Vec<(usize, u64)> = read
        .iter()
        .map(|e| {
            (
                e.record.key.upstream_id.0.parse().unwrap(),
                e.record.version.major,
            )
        })
        .collect();
    versions.sort_unstable();
    let want: Vec<(usize, u64)> = newest.into_iter().enumerate().collect();
    assert_eq!(versions, want);
    for entry in &read {
        let (id, version) = (&entry.record.key.upstream_id.0, entry.record.version.major);
        let text = format!("{id}-{version}-").repeat(20);
        assert_eq!(entry.record.change.payload().unwrap()["text"], text);
    }
}

/// Every entry after `after` passing `filter`, read `limit` at a time.
pub(super) async fn read_all(
    stream: &EmbeddedStream,
    filter: &RecordFilter,
    mut after: Seq,
    limit: usize,
) -> Vec<StreamEntry> {
    let mut read = Vec::new();
    loop {
        let got = stream.read(filter, after, limit).await.unwrap();
        if got.entries.is_empty() {
            return read;
        }
        after = got.through;
        read.extend(got.entries);
    }
}

/// A truncate of a collection of more keys than one step of it takes: every key gets its
/// tombstone once, and none of the other collection's records does.
#[tokio::test]
async fn a_truncate_of_many_keys_tombstones_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let other = |id: u64| Record {
        key: RecordKey::new(SyncId(Uuid::from_u128(7)), "public.other", id.to_string()),
        ..upsert(id, 1)
    };
    for first in (0..12_001u64).step_by(4000) {
        let batch = (first..(first + 4000).min(12_001))
            .map(|i| upsert(i, 1))
            .collect();
        stream.append(batch).await.unwrap();
    }
    stream.append((0..10).map(other).collect()).await.unwrap();
    // An empty id sorts first: it is tombstoned too.
    stream
        .append(vec![Record {
            key: RecordKey::new(SyncId(Uuid::from_u128(7)), "public.t", ""),
            ..upsert(0, 1)
        }])
        .await
        .unwrap();
    let done = stream
        .tombstone_collection(
            SyncId(Uuid::from_u128(7)),
            &CollectionId("public.t".into()),
            Version::new(5, 0),
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    assert_eq!(done, 12_002);
    assert_eq!(stream.tombstones().await.unwrap(), 12_002);
    let live = stream.live_records().await.unwrap();
    assert_eq!(live.len(), 10);
    assert!(
        live.iter()
            .all(|e| e.record.key.collection_id.0 == "public.other")
    );
    exact_counts(&stream);
}

/// `record` with its update time `ns` nanoseconds from the epoch.
fn at(record: Record, ns: i128) -> Record {
    Record {
        upstream_updated_at: OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap(),
        ..record
    }
}

/// The one number `sql` gives on the file.
pub(super) fn held(stream: &EmbeddedStream, sql: &str) -> i64 {
    stream
        .with_reader(|conn| {
            conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                .or_storage("checking")
        })
        .unwrap()
}

/// Every record's id, update time and append time as the stream reads them back.
async fn times(stream: &EmbeddedStream) -> Vec<(String, OffsetDateTime, OffsetDateTime)> {
    let filter = RecordFilter::Provider(Provider::Postgres);
    let read = stream.read(&filter, Seq::START, 10_000).await.unwrap();
    let mut times = Vec::new();
    for entry in read.entries {
        let lag = stream.lag(&filter, Seq(entry.seq.0 - 1), 1).await.unwrap();
        let appended = lag.oldest_appended_at.expect("an append time");
        let id = entry.record.key.upstream_id.0;
        times.push((id, entry.record.upstream_updated_at, appended));
    }
    times
}

/// A record's update and append times read back as given wherever they are held: in its
/// segment's row (the entries of an append that share them hold 0), in its entry (a time of 0
/// among others, a time before the epoch), and in a segment rewritten by compaction.
#[tokio::test]
async fn times_read_back_exactly_wherever_they_are_held() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let now = 1_700_000_000_000_000_005i128;
    let appends = [
        // One update time for every record: their rows hold none.
        (0..40).map(|i| at(upsert(i, 1), now)).collect::<Vec<_>>(),
        // The first record's time shared, with a 0 (the epoch) among them: each row holds
        // its own; a time before the epoch; a tombstone.
        vec![
            at(upsert(100, 1), now + 7),
            at(upsert(101, 1), 0),
            at(upsert(102, 1), -86_400_000_000_003),
            at(upsert(103, 1), now + 7),
            at(record(104, 1, None), now + 9),
        ],
        // The epoch first: shared, and told from the others.
        vec![
            at(upsert(200, 1), 0),
            at(upsert(201, 1), now + 11),
            at(upsert(202, 1), 0),
        ],
    ];
    for records in &appends {
        stream.append(records.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let given: Vec<(String, OffsetDateTime)> = appends
        .iter()
        .flatten()
        .map(|r| (r.key.upstream_id.0.clone(), r.upstream_updated_at))
        .collect();
    let as_given = |read: &[(String, OffsetDateTime, OffsetDateTime)]| {
        read.iter()
            .map(|(id, updated, _)| (id.clone(), *updated))
            .collect::<Vec<_>>()
    };
    let before = times(&stream).await;
    assert_eq!(as_given(&before), given);
    let append_times: Vec<(String, OffsetDateTime)> = stream
        .append_times()
        .await
        .unwrap()
        .into_iter()
        .map(|(key, at)| (key.upstream_id.0, at))
        .collect();
    let appended_as_read: Vec<(String, OffsetDateTime)> =
        before.iter().map(|(id, _, at)| (id.clone(), *at)).collect();
    assert_eq!(append_times, appended_as_read);
    // Each append's records share its append time, and the appends' times differ.
    let appended: Vec<OffsetDateTime> = before.iter().map(|(_, _, a)| *a).collect();
    assert!(appended[..40].iter().all(|a| *a == appended[0]));
    assert!(appended[40..45].iter().all(|a| *a == appended[40]));
    assert!(appended[0] < appended[40] && appended[40] < appended[45]);
    let count = |sql: &str| held(&stream, &format!("select count(*) from {sql}"));
    let stored = stream
        .with_reader(|conn| packed::stored_times(conn))
        .unwrap();
    assert_eq!(
        stored
            .iter()
            .filter(|(_, _, appended)| *appended == 0)
            .count(),
        48,
        "every entry leaves its append time to its segment"
    );
    assert_eq!(
        stored
            .iter()
            .filter(|(_, updated, _)| *updated == 0)
            .count(),
        43,
        "the first append's entries leave their update time to the segment (and the epochs are 0)"
    );
    assert_eq!(
        count("segments where updated_at_ns is null"),
        1,
        "a 0 among other update times: the segment shares none"
    );
    // Reopened, every read comes from the file.
    drop(stream);
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    assert_eq!(times(&stream).await, before);

    // 30 of the first append's 40 replaced: its segment is rewritten with the 10 left, which
    // then hold their own times.
    let later: Vec<Record> = (0..30).map(|i| at(upsert(i, 2), now + 13)).collect();
    stream.append(later.clone()).await.unwrap();
    stream.append(vec![at(upsert(300, 1), now)]).await.unwrap();
    let compacted = times(&stream).await;
    assert_eq!(
        compacted[..10],
        before[30..40],
        "the first append's last ten"
    );
    assert_eq!(compacted[10..15], before[40..45]);
}

//! The embedded store's own checks: its settings and its query plans.

use super::*;
use rusqlite::types::Value;
use std::collections::BTreeSet;

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

/// Every filtered read walks the table by seq: never every record of a sync by the key
/// index followed by a sort.
#[tokio::test]
async fn filtered_reads_walk_by_seq() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let sync_id = SyncId(Uuid::from_u128(1));
    let filters = [
        RecordFilter::Provider(Provider::Postgres),
        RecordFilter::Sync {
            sync_id,
            collections: None,
        },
        RecordFilter::Sync {
            sync_id,
            collections: Some(BTreeSet::from([CollectionId("public.t".into())])),
        },
    ];
    for filter in &filters {
        for sql in [
            format!(
                "select {COLUMNS} from records where seq > ?{} order by seq limit ?",
                filter_sql(filter)
            ),
            format!(
                "select count(*) from (select 1 from records where seq > ?{} limit ?)",
                filter_sql(filter)
            ),
        ] {
            let plan = stream
                .with_reader(|conn| {
                    let explain = format!("explain query plan {sql}");
                    let mut statement = positioned(conn, &explain, Seq(0), filter, Some(10))
                        .or_storage("explaining")?;
                    let mut rows = statement.raw_query();
                    let mut plan = Vec::new();
                    while let Some(row) = rows.next().or_storage("explaining")? {
                        plan.push(row.get::<_, String>(3).or_storage("explaining")?);
                    }
                    Ok(plan)
                })
                .unwrap();
            assert!(
                plan.iter()
                    .any(|p| p.contains("INTEGER PRIMARY KEY (rowid>?)"))
                    && !plan.iter().any(|p| p.contains("TEMP B-TREE")),
                "{sql}: {plan:?}"
            );
        }
    }
}

fn record(id: u64, version: u64, payload: Option<serde_json::Value>) -> Record {
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

fn upsert(id: u64, version: u64) -> Record {
    let text = format!("{id}-{version}-").repeat(20);
    record(
        id,
        version,
        Some(serde_json::json!({"id": id, "v": version, "text": text})),
    )
}

/// Every segment's live count, beside the records that name it; and every record's payload
/// slot, which must exist.
fn segment_accounts(stream: &EmbeddedStream) -> (Vec<(i64, i64, i64, i64)>, i64) {
    stream
        .with_reader(|conn| {
            let mut s = conn
                .prepare(
                    "select s.id, s.records, s.live, \
                       (select count(*) from records r where r.segment = s.id) from segments s",
                )
                .or_storage("checking")?;
            let rows = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .or_storage("checking")?;
            let orphans = conn
                .query_row(
                    "select count(*) from records where deleted = 0 and \
                       (segment is null or segment not in (select id from segments) \
                        or segment not in (select segment from segment_bodies))",
                    [],
                    |r| r.get(0),
                )
                .or_storage("checking")?;
            Ok((rows, orphans))
        })
        .unwrap()
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
    for round in 0..150u64 {
        let batch = (0..100)
            .map(|_| upsert(random.below(keys), round + 2))
            .collect();
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
}

/// A file written before payload segments (payloads inline in `records`) is moved to segments
/// when opened: every record reads back as it was, seqs, tombstones and cursors included.
#[tokio::test]
async fn a_file_with_inline_payloads_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(FILE_NAME);
    let sync = Uuid::from_u128(7);
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "pragma journal_mode = wal;
             create table records (seq integer primary key, provider text not null, sync_id blob not null,
               collection_id text not null, upstream_id text not null, version_major integer not null,
               version_minor integer not null, upstream_updated_at_ns integer not null,
               deleted integer not null, payload text, appended_at_ns integer not null,
               unique (sync_id, collection_id, upstream_id));
             create index tombstones on records (seq) where deleted = 1;
             create table cursors (consumer text primary key, provider text, sync_id blob,
               collections text, seq integer not null);
             create table meta (key text primary key, value integer not null);
             create table source_state (owner text primary key, value text not null);
             insert into meta values ('head', 2600);
             insert into cursors values ('c', 'postgres', null, null, 3);",
        )
        .unwrap();
        let mut insert = conn
            .prepare(
                "insert into records values (?, 'postgres', ?, 'public.t', ?, ?, 0, 5, ?, ?, 9)",
            )
            .unwrap();
        for i in 1..=2500i64 {
            let deleted = i % 10 == 0;
            let payload = (!deleted).then(|| format!("{{\"id\":{i},\"s\":\"é\\u0000{i}\"}}"));
            insert
                .execute((
                    i + 100,
                    sync.as_bytes().as_slice(),
                    i.to_string(),
                    i,
                    deleted,
                    payload,
                ))
                .unwrap();
        }
    }
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let read = stream
        .read_text(
            &RecordFilter::Provider(Provider::Postgres),
            Seq::START,
            10_000,
        )
        .await
        .unwrap();
    assert_eq!(read.entries.len(), 2500);
    assert_eq!(read.through, Seq(2600));
    for (entry, i) in read.entries.iter().zip(1..) {
        assert_eq!(entry.seq, Seq(i + 100));
        assert_eq!(entry.record.version.major, i);
        assert_eq!(entry.record.upstream_updated_at.unix_timestamp_nanos(), 5);
        if i % 10 == 0 {
            assert!(entry.record.is_tombstone());
        } else {
            let text = entry.payload_text.as_ref().unwrap().as_str();
            assert_eq!(text, format!("{{\"id\":{i},\"s\":\"é\\u0000{i}\"}}"));
        }
    }
    assert_eq!(stream.tombstones().await.unwrap(), 250);
    let (segments, orphans) = segment_accounts(&stream);
    assert_eq!((segments.len(), orphans), (3, 0));
    let leftovers = stream
        .with_reader(|conn| {
            conn.query_row(
                "select count(*) from sqlite_master where name = 'records_inline' \
                   or (name = 'tombstones' and tbl_name = 'records')",
                [],
                |r| r.get::<_, i64>(0),
            )
            .or_storage("checking")
        })
        .unwrap();
    assert_eq!(
        leftovers, 1,
        "the old table is gone and the tombstone index is back"
    );
    // Writes go on after the migrated records.
    let outcome = stream.append(vec![upsert(1, 9)]).await.unwrap();
    assert_eq!(outcome.head, Seq(2601));
}

/// `record` with its update time `ns` nanoseconds from the epoch.
fn at(record: Record, ns: i128) -> Record {
    Record {
        upstream_updated_at: OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap(),
        ..record
    }
}

/// The one number `sql` gives on the file.
fn held(stream: &EmbeddedStream, sql: &str) -> i64 {
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
/// segment (the rows of an append that share them hold 0), in its row (a time of 0 among
/// others, a tombstone, a segment rewritten by compaction), and in a file written before
/// segments held times.
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
    // Each append's records share its append time, and the appends' times differ.
    let appended: Vec<OffsetDateTime> = before.iter().map(|(_, _, a)| *a).collect();
    assert!(appended[..40].iter().all(|a| *a == appended[0]));
    assert!(appended[40..45].iter().all(|a| *a == appended[40]));
    assert!(appended[0] < appended[40] && appended[40] < appended[45]);
    let count = |sql: &str| held(&stream, &format!("select count(*) from {sql}"));
    assert_eq!(
        count("records where appended_at_ns = 0"),
        47,
        "every upsert's row leaves its append time to its segment; the tombstone's holds it"
    );
    assert_eq!(
        count("records where upstream_updated_at_ns = 0"),
        43,
        "the first append's rows leave their update time to the segment (and the epochs are 0)"
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
    assert_eq!(
        held(
            &stream,
            "select count(*) from records where seq <= 40 and upstream_updated_at_ns = 0"
        ),
        0,
        "the rewritten segment's records hold their own times"
    );

    // The file as an older sluice left it: every row holds its times, and segments none.
    drop(stream);
    {
        let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        conn.execute_batch(
            "update records set
               upstream_updated_at_ns = coalesce((select s.updated_at_ns from segments s
                 where s.id = records.segment and records.upstream_updated_at_ns = 0),
                 upstream_updated_at_ns),
               appended_at_ns = coalesce((select s.appended_at_ns from segments s
                 where s.id = records.segment and records.appended_at_ns = 0), appended_at_ns);
             alter table segments drop column appended_at_ns;
             alter table segments drop column updated_at_ns;",
        )
        .unwrap();
    }
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    assert_eq!(times(&stream).await, compacted);
    stream.append(vec![at(upsert(400, 1), now)]).await.unwrap();
    let last = times(&stream).await;
    assert_eq!(last[..last.len() - 1], compacted[..]);
    assert_eq!(
        last.last().unwrap().1,
        at(upsert(0, 0), now).upstream_updated_at
    );
}

/// A read from the file stops once its payloads reach `READ_BYTES`, whatever its limit: it
/// goes to its last entry, the next read goes on from there, and every record is read once, in
/// order. Reads of small records still stop at the limit.
#[tokio::test]
async fn reads_of_large_payloads_stop_at_read_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    // 40 payloads of about 1 MiB, then 10 small ones.
    let large = |id: u64| {
        let body = format!("{id:07}").repeat(150_000);
        record(id, 1, Some(serde_json::json!({"id": id, "body": body})))
    };
    for first in (0..40).step_by(5) {
        stream
            .append((first..first + 5).map(large).collect())
            .await
            .unwrap();
    }
    stream
        .append((40..50).map(|id| upsert(id, 1)).collect())
        .await
        .unwrap();
    // A new handle on the file: its tail holds nothing, so every read is from the file.
    drop(stream);
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let filter = RecordFilter::Provider(Provider::Postgres);
    let (mut after, mut ids, mut reads) = (Seq::START, Vec::new(), Vec::new());
    loop {
        let read = stream.read_text(&filter, after, 1000).await.unwrap();
        let Some(last) = read.entries.last() else {
            break;
        };
        let sizes: Vec<usize> = read
            .entries
            .iter()
            .map(|e| e.payload_text.as_ref().unwrap().as_str().len())
            .collect();
        let bytes: usize = sizes.iter().sum();
        assert!(bytes - sizes[sizes.len() - 1] < READ_BYTES, "{sizes:?}");
        if bytes >= READ_BYTES {
            assert_eq!(
                read.through, last.seq,
                "a read cut short goes to its last entry"
            );
        }
        ids.extend(
            read.entries
                .iter()
                .map(|e| e.record.key.upstream_id.0.clone()),
        );
        reads.push(read.entries.len());
        after = read.through;
    }
    let want: Vec<String> = (0..50).map(|id| id.to_string()).collect();
    assert_eq!(ids, want);
    // 8 MiB is eight of these payloads and a little: five reads of 8, then the small ones.
    assert_eq!(reads, [8, 8, 8, 8, 8, 10]);
    let small = stream.read_text(&filter, Seq(40), 3).await.unwrap();
    assert_eq!(small.entries.len(), 3);
    assert_eq!(small.through, Seq(43));
}

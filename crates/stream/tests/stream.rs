//! The embedded records stream's contract: compaction, the version guard, filters, tombstone
//! purging, waking, and durability across a killed writer.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;
use sluice_core::{
    Change, CollectionId, ConsumerId, Provider, Record, RecordFilter, RecordKey, RecordStream, Seq,
    SourceState, SyncId, TextBatch, Version,
};
use sluice_stream::EmbeddedStream;
use time::OffsetDateTime;
use uuid::Uuid;

const SYNC_A: SyncId = SyncId(Uuid::from_u128(0xA));
const SYNC_B: SyncId = SyncId(Uuid::from_u128(0xB));

fn record(sync: SyncId, collection: &str, id: &str, version: u64, change: Change) -> Record {
    Record {
        key: RecordKey::new(sync, collection, id),
        provider: if sync == SYNC_B {
            Provider::Http
        } else {
            Provider::Postgres
        },
        version: Version::new(version, 0),
        upstream_updated_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
        change,
    }
}

fn up(sync: SyncId, id: &str, version: u64) -> Record {
    record(
        sync,
        "public.orders",
        id,
        version,
        Change::upsert(json!({"id": id, "v": version})).unwrap(),
    )
}

fn del(sync: SyncId, id: &str, version: u64) -> Record {
    record(sync, "public.orders", id, version, Change::Delete)
}

async fn open() -> (tempfile::TempDir, EmbeddedStream) {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    (dir, stream)
}

fn all() -> RecordFilter {
    RecordFilter::Provider(Provider::Postgres)
}

#[tokio::test]
async fn an_update_replaces_the_entry_and_moves_it_to_the_end() {
    let (_dir, stream) = open().await;
    stream
        .append(vec![up(SYNC_A, "1", 1), up(SYNC_A, "2", 1)])
        .await
        .unwrap();
    let outcome = stream.append(vec![up(SYNC_A, "1", 2)]).await.unwrap();
    assert_eq!(
        (outcome.appended, outcome.skipped_stale, outcome.head),
        (1, 0, Seq(3))
    );
    let read = stream.read(&all(), Seq::START, 100).await.unwrap();
    let ids: Vec<(u64, &str, u64)> = read
        .entries
        .iter()
        .map(|e| {
            (
                e.seq.0,
                e.record.key.upstream_id.0.as_str(),
                e.record.version.major,
            )
        })
        .collect();
    assert_eq!(
        ids,
        vec![(2, "2", 1), (3, "1", 2)],
        "one entry per record, at its newest version"
    );
    assert_eq!(read.through, Seq(3));
}

/// The stream writes an append's records in its key index's order (collection, then id), so
/// each record must still get the seq of its place in the append, and a key given twice must
/// still be decided by its versions (a version older than one given earlier in the same append
/// is skipped: `an_older_version_never_replaces_a_newer_one_tombstones_included`). Read back
/// from memory and from the file.
#[tokio::test]
async fn an_appends_records_keep_their_places_whatever_their_ids_order() {
    let (dir, stream) = open().await;
    let other = |id: &str, version: u64| {
        record(
            SYNC_A,
            "public.accounts",
            id,
            version,
            Change::upsert(json!({"id": id})).unwrap(),
        )
    };
    let append = vec![
        up(SYNC_A, "f3a9", 1),
        other("zz", 1),
        up(SYNC_A, "07b2", 1),
        up(SYNC_A, "c", 2),
        other("aa", 1),
        up(SYNC_A, "c", 3),
        up(SYNC_A, "b", 5),
        del(SYNC_A, "0", 1),
        up(SYNC_A, "b", 6),
        up(SYNC_A, "a", 1),
    ];
    let outcome = stream.append(append).await.unwrap();
    assert_eq!(
        (outcome.appended, outcome.skipped_stale, outcome.head),
        (10, 0, Seq(10)),
        "every record lands (c and b twice, each time newer)"
    );
    let expected: Vec<(u64, &str, &str, u64)> = vec![
        (1, "public.orders", "f3a9", 1),
        (2, "public.accounts", "zz", 1),
        (3, "public.orders", "07b2", 1),
        (5, "public.accounts", "aa", 1),
        (6, "public.orders", "c", 3),
        (8, "public.orders", "0", 1),
        (9, "public.orders", "b", 6),
        (10, "public.orders", "a", 1),
    ];
    let owned = |rows: &[(u64, &str, &str, u64)]| {
        rows.iter()
            .map(|&(seq, c, id, v)| (seq, c.to_owned(), id.to_owned(), v))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        read_all(&stream).await,
        owned(&expected),
        "read from memory"
    );
    drop(stream);
    let reopened = EmbeddedStream::open(dir.path()).await.unwrap();
    assert_eq!(
        read_all(&reopened).await,
        owned(&expected),
        "read from the file"
    );
}

/// Every entry as (seq, collection, id, version major).
async fn read_all(stream: &EmbeddedStream) -> Vec<(u64, String, String, u64)> {
    let read = stream.read_text(&all(), Seq::START, 100).await.unwrap();
    read.entries
        .iter()
        .map(|e| {
            (
                e.seq.0,
                e.record.key.collection_id.0.clone(),
                e.record.key.upstream_id.0.clone(),
                e.record.version.major,
            )
        })
        .collect()
}

#[tokio::test]
async fn an_older_version_never_replaces_a_newer_one_tombstones_included() {
    let (_dir, stream) = open().await;
    stream.append(vec![up(SYNC_A, "1", 5)]).await.unwrap();
    let stale = stream
        .append(vec![up(SYNC_A, "1", 4), up(SYNC_A, "1", 5)])
        .await
        .unwrap();
    assert_eq!(
        (stale.appended, stale.skipped_stale),
        (0, 2),
        "older and equal versions are skipped"
    );
    stream.append(vec![del(SYNC_A, "1", 7)]).await.unwrap();
    let late = stream.append(vec![up(SYNC_A, "1", 6)]).await.unwrap();
    assert_eq!(
        late.skipped_stale, 1,
        "an upsert older than the tombstone does not resurrect it"
    );
    let entry = stream
        .get(&RecordKey::new(SYNC_A, "public.orders", "1"))
        .await
        .unwrap()
        .unwrap();
    assert!(entry.record.is_tombstone());
    assert_eq!(entry.record.version, Version::new(7, 0));
    // Within one batch, the newest version wins whatever the order.
    stream
        .append(vec![
            up(SYNC_A, "2", 3),
            up(SYNC_A, "2", 9),
            up(SYNC_A, "2", 4),
        ])
        .await
        .unwrap();
    let entry = stream
        .get(&RecordKey::new(SYNC_A, "public.orders", "2"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.record.version, Version::new(9, 0));
}

#[tokio::test]
async fn reads_filter_by_provider_sync_and_collection_and_report_how_far_they_looked() {
    let (_dir, stream) = open().await;
    stream
        .append(vec![
            up(SYNC_A, "1", 1),
            record(
                SYNC_A,
                "public.users",
                "u",
                1,
                Change::upsert(json!({})).unwrap(),
            ),
            up(SYNC_B, "1", 1),
        ])
        .await
        .unwrap();
    let count = |read: sluice_core::StreamRead| read.entries.len();
    assert_eq!(count(stream.read(&all(), Seq::START, 10).await.unwrap()), 2);
    assert_eq!(
        count(
            stream
                .read(&RecordFilter::Provider(Provider::Http), Seq::START, 10)
                .await
                .unwrap()
        ),
        1
    );
    let only_users = RecordFilter::Sync {
        sync_id: SYNC_A,
        collections: Some(BTreeSet::from([CollectionId::from("public.users")])),
    };
    let read = stream.read(&only_users, Seq::START, 10).await.unwrap();
    assert_eq!(read.entries[0].record.key.collection_id.0, "public.users");
    // Nothing passes, but the reader may move to the head.
    let none = stream.read(&only_users, Seq(2), 10).await.unwrap();
    assert!(none.entries.is_empty());
    assert_eq!(none.through, Seq(3));
    // With a limit, `through` is the last entry returned.
    let limited = stream.read(&all(), Seq::START, 1).await.unwrap();
    assert_eq!(limited.through, limited.entries[0].seq);
}

#[tokio::test]
async fn tombstones_stay_until_every_consumer_that_could_need_them_has_passed() {
    let (_dir, stream) = open().await;
    stream
        .append(vec![up(SYNC_A, "1", 1), up(SYNC_B, "9", 1)])
        .await
        .unwrap();
    let sync_a = RecordFilter::Sync {
        sync_id: SYNC_A,
        collections: None,
    };
    let http = RecordFilter::Provider(Provider::Http);
    // Three consumers register at the start.
    for (name, filter) in [
        ("by_sync", &sync_a),
        ("by_provider", &all()),
        ("other_provider", &http),
    ] {
        stream
            .acknowledge(&ConsumerId::from(name), filter, Seq::START)
            .await
            .unwrap();
    }
    stream.append(vec![del(SYNC_A, "1", 2)]).await.unwrap(); // seq 3
    stream
        .acknowledge(&ConsumerId::from("by_sync"), &sync_a, Seq(3))
        .await
        .unwrap();
    stream
        .acknowledge(&ConsumerId::from("other_provider"), &http, Seq(3))
        .await
        .unwrap();
    assert_eq!(
        stream.tombstones().await.unwrap(),
        1,
        "by_provider has not passed it yet"
    );
    stream
        .acknowledge(&ConsumerId::from("by_provider"), &all(), Seq(3))
        .await
        .unwrap();
    assert_eq!(stream.tombstones().await.unwrap(), 0);

    // A consumer on another provider never holds a tombstone back; a forgotten one neither.
    stream.append(vec![del(SYNC_B, "9", 2)]).await.unwrap(); // seq 4, provider http
    stream
        .acknowledge(&ConsumerId::from("by_sync"), &sync_a, Seq(4))
        .await
        .unwrap();
    assert_eq!(
        stream.tombstones().await.unwrap(),
        1,
        "other_provider still needs it"
    );
    stream
        .forget(&ConsumerId::from("other_provider"))
        .await
        .unwrap();
    stream
        .acknowledge(&ConsumerId::from("by_provider"), &all(), Seq(4))
        .await
        .unwrap();
    assert_eq!(stream.tombstones().await.unwrap(), 0);
}

#[tokio::test]
async fn a_waiting_reader_wakes_on_append_and_not_before() {
    let (_dir, stream) = open().await;
    let stream = std::sync::Arc::new(stream);
    let waiter = tokio::spawn({
        let stream = stream.clone();
        async move { stream.wait_past(Seq::START).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "nothing was appended yet");
    stream.append(vec![up(SYNC_A, "1", 1)]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("woken by the append")
        .unwrap();
}

#[tokio::test]
async fn lag_counts_pending_records_and_dates_the_oldest() {
    let (_dir, stream) = open().await;
    let before = OffsetDateTime::now_utc() - time::Duration::seconds(1);
    stream
        .append((0..10).map(|i| up(SYNC_A, &i.to_string(), 1)).collect())
        .await
        .unwrap();
    let lag = stream.lag(&all(), Seq(4), 100).await.unwrap();
    assert_eq!(lag.records, 6);
    assert!(lag.oldest_appended_at.unwrap() >= before);
    assert_eq!(
        stream.lag(&all(), Seq(4), 3).await.unwrap().records,
        3,
        "counting stops at the cap"
    );
    assert_eq!(
        stream.lag(&all(), Seq(10), 100).await.unwrap(),
        sluice_core::Lag::default()
    );
}

#[tokio::test]
async fn positions_survive_reopening_and_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let stream = EmbeddedStream::open(dir.path()).await.unwrap();
        stream
            .append(vec![up(SYNC_A, "1", 1), up(SYNC_A, "2", 1)])
            .await
            .unwrap();
        stream.append(vec![up(SYNC_A, "2", 2)]).await.unwrap(); // seq 3; seq 2 is gone
    }
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    assert_eq!(stream.head().await.unwrap(), Seq(3));
    let outcome = stream.append(vec![up(SYNC_A, "3", 1)]).await.unwrap();
    assert_eq!(outcome.head, Seq(4));
}

#[tokio::test]
async fn out_of_range_versions_are_rejected_before_anything_is_written() {
    let (_dir, stream) = open().await;
    let mut bad = up(SYNC_A, "1", 1);
    bad.version = Version::new(u64::MAX, 0);
    let err = stream
        .append(vec![up(SYNC_A, "0", 1), bad])
        .await
        .unwrap_err();
    assert_eq!(err.class(), sluice_core::ErrorClass::GiveUp);
    assert_eq!(stream.head().await.unwrap(), Seq::START);
}

/// Run by `a_writer_killed_mid_batch_leaves_whole_batches_only` in a child process: appends
/// batches of 2,000 until killed, printing each batch number once its append returned.
#[tokio::test]
async fn child_appends_until_killed() {
    let Some(dir) = std::env::var_os("SLUICE_STREAM_CHILD_DIR") else {
        return; // only meaningful as the child of the test below
    };
    let stream = EmbeddedStream::open(&dir).await.unwrap();
    for batch in 0u64.. {
        let records = (0..2000)
            .map(|i| up(SYNC_A, &format!("b{batch}-{i}"), batch + 1))
            .collect();
        stream.append(records).await.unwrap();
        println!("ACKED {batch}");
    }
}

#[tokio::test]
async fn a_writer_killed_mid_batch_leaves_whole_batches_only() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_appends_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SLUICE_STREAM_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut acked = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some((_, n)) = line.split_once("ACKED ") {
            let n: u64 = n.trim().parse().unwrap();
            acked = Some(n);
            if n >= 5 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL, most likely in the middle of the next append
    child.wait().unwrap();
    let acked = acked.expect("the child acknowledged batches");

    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let records = stream.live_records().await.unwrap();
    let mut per_batch = std::collections::BTreeMap::<u64, usize>::new();
    for e in &records {
        let batch: u64 = e.record.key.upstream_id.0[1..]
            .split('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        *per_batch.entry(batch).or_default() += 1;
    }
    for batch in 0..=acked {
        assert_eq!(
            per_batch.get(&batch),
            Some(&2000),
            "acknowledged batch {batch} must be whole"
        );
    }
    for (batch, count) in &per_batch {
        assert_eq!(*count, 2000, "batch {batch} is partially present");
    }
    assert!(per_batch.len() as u64 <= acked + 2);
}

#[tokio::test]
async fn truncating_a_collection_tombstones_its_live_records_under_the_version_guard() {
    let (_dir, stream) = open().await;
    let other = record(
        SYNC_A,
        "public.items",
        "1",
        1,
        Change::upsert(json!({"id": 1})).unwrap(),
    );
    stream
        .append(vec![
            up(SYNC_A, "1", 10),
            up(SYNC_A, "2", 10),
            up(SYNC_A, "3", 30), // newer than the truncate: must survive it
            del(SYNC_A, "4", 10),
            up(SYNC_B, "1", 10),
            other,
        ])
        .await
        .unwrap();
    let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
    let collection = CollectionId("public.orders".into());
    let n = stream
        .tombstone_collection(SYNC_A, &collection, Version::new(20, 0), at)
        .await
        .unwrap();
    assert_eq!(n, 2, "two live records older than the truncate");
    let live: Vec<(String, String, String)> = stream
        .live_records()
        .await
        .unwrap()
        .into_iter()
        .map(|e| {
            (
                e.record.key.sync_id.0.to_string(),
                e.record.key.collection_id.0,
                e.record.key.upstream_id.0,
            )
        })
        .collect();
    assert_eq!(
        live,
        vec![
            (SYNC_A.0.to_string(), "public.items".into(), "1".into()),
            (SYNC_A.0.to_string(), "public.orders".into(), "3".into()),
            (SYNC_B.0.to_string(), "public.orders".into(), "1".into()),
        ]
    );
    let one = stream
        .get(&RecordKey::new(SYNC_A, "public.orders", "1"))
        .await
        .unwrap()
        .unwrap();
    assert!(one.record.is_tombstone());
    assert_eq!(one.record.version, Version::new(20, 0));
    assert_eq!(one.record.upstream_updated_at, at);
    // The tombstones are new entries at the end, so consumers see them.
    assert_eq!(stream.head().await.unwrap(), Seq(8));
    // Repeating it (a replay after a crash) writes nothing.
    let again = stream
        .tombstone_collection(SYNC_A, &collection, Version::new(20, 0), at)
        .await
        .unwrap();
    assert_eq!(again, 0);
}

#[tokio::test]
async fn source_state_commits_with_its_append_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let owner = "sync/backfill";
    {
        let stream = EmbeddedStream::open(dir.path()).await.unwrap();
        assert_eq!(stream.source_state(owner).await.unwrap(), None);
        stream
            .append_with_state(
                vec![up(SYNC_A, "1", 1)],
                Some(SourceState {
                    owner: owner.into(),
                    value: json!({"after": "1"}),
                }),
            )
            .await
            .unwrap();
        // A failed append stores no state either.
        let bad = stream
            .append_with_state(
                vec![up(SYNC_A, "2", u64::MAX)],
                Some(SourceState {
                    owner: owner.into(),
                    value: json!({"after": "2"}),
                }),
            )
            .await;
        assert!(bad.is_err());
    }
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    assert_eq!(
        stream.source_state(owner).await.unwrap(),
        Some(json!({"after": "1"}))
    );
}

/// Reads answered from the newest entries kept in memory must equal reads of the file, through
/// updates, stale versions, duplicate keys in one batch, tombstones and their purging,
/// truncates, and appends by a second writer on the same file that the first never sees.
#[tokio::test]
async fn reads_from_memory_equal_reads_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    // Another writer on the same file, and a reader that never writes: its reads always come
    // from the file.
    let other = EmbeddedStream::open(dir.path()).await.unwrap();
    let file = EmbeddedStream::open(dir.path()).await.unwrap();
    let consumer = ConsumerId::from("c");
    let filters = [
        all(),
        RecordFilter::Provider(Provider::Http),
        RecordFilter::Sync {
            sync_id: SYNC_A,
            collections: Some(BTreeSet::from([CollectionId("public.items".into())])),
        },
    ];
    // A small deterministic generator: the same sequence on every run.
    let mut random = sluice_core::Xorshift::new(0x2545_f491_4f6c_dd1d);
    let mut next = move |n: u64| random.below(n);
    let mut version = 100u64;
    let mut acked = Seq::START;
    for round in 0..300 {
        let batch: Vec<Record> = (0..1 + next(40))
            .map(|_| {
                version += 1;
                let sync = if next(4) == 0 { SYNC_B } else { SYNC_A };
                let collection = if next(2) == 0 {
                    "public.orders"
                } else {
                    "public.items"
                };
                let id = next(60).to_string();
                // Now and then an old version, skipped as stale when the key is newer.
                let v = if next(10) == 0 { version - 50 } else { version };
                let change = if next(5) == 0 {
                    Change::Delete
                } else {
                    Change::upsert(json!({"id": id, "v": v, "text": "é\u{1F600}"})).unwrap()
                };
                // Update times shared by a batch's records, and not: the epoch among them.
                let updated_at = match next(4) {
                    0 => OffsetDateTime::UNIX_EPOCH,
                    1 => OffsetDateTime::from_unix_timestamp_nanos(next(1 << 62) as i128).unwrap(),
                    _ => OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
                };
                Record {
                    upstream_updated_at: updated_at,
                    ..record(sync, collection, &id, v, change)
                }
            })
            .collect();
        match next(20) {
            0 => {
                other.append(batch).await.unwrap();
            }
            1 => {
                version += 1;
                stream
                    .tombstone_collection(
                        SYNC_A,
                        &CollectionId("public.orders".into()),
                        Version::new(version, 0),
                        OffsetDateTime::now_utc(),
                    )
                    .await
                    .unwrap();
            }
            // Half the writes with payloads as text, as the PostgreSQL source writes them.
            2..10 => {
                let mut texts = TextBatch::default();
                batch.into_iter().for_each(|record| texts.push(record));
                stream.append_texts(texts, None).await.unwrap();
            }
            _ => {
                stream.append(batch).await.unwrap();
            }
        }
        let head = stream.head().await.unwrap();
        if next(3) == 0 {
            acked = Seq(acked.0 + next(head.0 - acked.0 + 1));
            stream.acknowledge(&consumer, &all(), acked).await.unwrap();
        }
        for filter in &filters {
            for after in [acked, Seq(head.0.saturating_sub(next(80))), head] {
                let limit = 1 + next(50) as usize;
                let from_stream = stream.read(filter, after, limit).await.unwrap();
                let from_file = file.read(filter, after, limit).await.unwrap();
                assert_eq!(
                    from_stream.entries, from_file.entries,
                    "round {round}: {filter:?} after {after} limit {limit}"
                );
                assert_eq!(from_stream.through, from_file.through, "round {round}");
                // The same with payloads as text: the same text from memory and from the
                // file, and it parses to the payload a parsed read gives.
                let text_stream = stream.read_text(filter, after, limit).await.unwrap();
                let text_file = file.read_text(filter, after, limit).await.unwrap();
                assert_eq!(text_stream.entries, text_file.entries, "round {round}");
                assert_eq!(text_stream.through, from_file.through, "round {round}");
                for (text, parsed) in text_stream.entries.iter().zip(&from_file.entries) {
                    assert_eq!(text.seq, parsed.seq);
                    let payload = text.payload_text.as_ref().map(|t| {
                        serde_json::from_str::<serde_json::Map<_, _>>(t.as_str()).unwrap()
                    });
                    assert_eq!(payload.as_ref(), parsed.record.change.payload());
                }
            }
        }
    }
    assert_eq!(file.reads_from_memory(), 0);
    assert!(
        stream.reads_from_memory() > 500,
        "most reads should come from memory: {}",
        stream.reads_from_memory()
    );
}

/// While every reader is far behind the head (a consumer working through a backfill reads
/// the file), appends are not also kept in memory; once a reader comes near the head they
/// are again. Every read equals the file's throughout.
#[tokio::test]
async fn appends_are_kept_in_memory_again_once_a_reader_is_near_the_head() {
    let (dir, stream) = open().await;
    let file = EmbeddedStream::open(dir.path()).await.unwrap();
    let append = async |n: usize| {
        let batch = (n * 1000..(n + 1) * 1000)
            .map(|i| up(SYNC_A, &i.to_string(), 1))
            .collect();
        stream.append(batch).await.unwrap();
    };
    let same_as_file = async |after: Seq| {
        let read = stream.read(&all(), after, 100).await.unwrap();
        assert_eq!(read, file.read(&all(), after, 100).await.unwrap());
    };
    // 25,000 records, more than memory keeps, and a reader at the start.
    for n in 0..25 {
        append(n).await;
    }
    same_as_file(Seq::START).await;
    let from_memory = stream.reads_from_memory();
    // With that reader far behind, the next appends stop being kept: a reader near the head
    // is served by the file.
    for n in 25..45 {
        append(n).await;
    }
    let head = stream.head().await.unwrap();
    same_as_file(Seq(head.0 - 10)).await;
    assert_eq!(stream.reads_from_memory(), from_memory);
    // That reader turned them back on: the next append is read from memory.
    append(45).await;
    same_as_file(head).await;
    assert_eq!(stream.reads_from_memory(), from_memory + 1);
}

/// Payloads a source wrote as text are stored as that text, byte for byte (never parsed and
/// written again), under the same version guard, with the source's state in the same
/// transaction; a parsed read gives their maps.
#[tokio::test]
async fn payload_texts_are_stored_as_written_under_the_version_guard() {
    let (_dir, stream) = open().await;
    let written = r#"{"z":1,"a":2.50,"s":"\u00e9\u0000"}"#;
    let mut batch = TextBatch::default();
    let empty = || Change::upsert(json!({})).unwrap();
    batch.push_text(record(SYNC_A, "public.orders", "1", 5, empty()), |b| {
        b.push_str(written)
    });
    batch.push(del(SYNC_A, "2", 5));
    let state = SourceState {
        owner: "backfill".into(),
        value: json!({"page": 1}),
    };
    let outcome = stream.append_texts(batch, Some(state)).await.unwrap();
    assert_eq!((outcome.appended, outcome.skipped_stale), (2, 0));
    assert_eq!(
        stream.source_state("backfill").await.unwrap(),
        Some(json!({"page": 1}))
    );
    let fresh = EmbeddedStream::open(_dir.path()).await.unwrap();
    for reader in [&stream, &fresh] {
        let read = reader.read_text(&all(), Seq::START, 10).await.unwrap();
        assert_eq!(read.entries.len(), 2);
        let text = read.entries[0].payload_text.as_ref().unwrap();
        assert_eq!(text.as_str(), written);
        assert!(read.entries[1].record.is_tombstone());
        let parsed = reader.read(&all(), Seq::START, 10).await.unwrap();
        assert_eq!(
            parsed.entries[0].record.change,
            Change::upsert(serde_json::from_str(written).unwrap()).unwrap()
        );
    }
    // An older version as text is stale, as it is as a map.
    let mut stale = TextBatch::default();
    stale.push_text(record(SYNC_A, "public.orders", "1", 4, empty()), |b| {
        b.push_str(r#"{"old":true}"#)
    });
    let outcome = stream.append_texts(stale, None).await.unwrap();
    assert_eq!((outcome.appended, outcome.skipped_stale), (0, 1));
    let read = stream.read_text(&all(), Seq::START, 10).await.unwrap();
    assert_eq!(
        read.entries[0].payload_text.as_ref().unwrap().as_str(),
        written
    );
}

/// A write that fails after creating a collection leaves no trace of it: a collection created
/// next (which the file may give the same number) reads back under its own name, and so does
/// the first once it is written.
#[tokio::test]
async fn a_failed_write_leaves_no_collection_behind() {
    let (_dir, stream) = open().await;
    let mut too_new = up(SYNC_A, "2", 1);
    too_new.version = Version::new(u64::MAX, 0);
    let first = vec![record(
        SYNC_A,
        "public.first",
        "1",
        1,
        Change::upsert(json!({"id": 1})).unwrap(),
    )];
    let failed = stream
        .append_chunks(vec![first.clone(), vec![too_new]].into_iter())
        .await;
    assert!(failed.is_err());
    let second = record(
        SYNC_A,
        "public.second",
        "1",
        1,
        Change::upsert(json!({"id": 1})).unwrap(),
    );
    stream.append(vec![second]).await.unwrap();
    stream.append(first).await.unwrap();
    let read = stream.read(&all(), Seq::START, 10).await.unwrap();
    let names: Vec<&str> = read
        .entries
        .iter()
        .map(|e| e.record.key.collection_id.0.as_str())
        .collect();
    assert_eq!(names, ["public.second", "public.first"]);
    let only_first = RecordFilter::Sync {
        sync_id: SYNC_A,
        collections: Some(BTreeSet::from([CollectionId("public.first".into())])),
    };
    let read = stream.read(&only_first, Seq::START, 10).await.unwrap();
    assert_eq!(read.entries.len(), 1);
    assert_eq!(read.entries[0].record.key.collection_id.0, "public.first");
}

/// Two processes on one file: collections one creates are named right when the other reads
/// them, and the other writing to the same collection keeps one record per key.
#[tokio::test]
async fn collections_created_by_another_writer_read_back_by_name() {
    let (dir, stream) = open().await;
    let other = EmbeddedStream::open(dir.path()).await.unwrap();
    other
        .append(vec![up(SYNC_A, "1", 1), up(SYNC_B, "1", 1)])
        .await
        .unwrap();
    stream.append(vec![up(SYNC_A, "1", 2)]).await.unwrap();
    let read = stream.read(&all(), Seq::START, 10).await.unwrap();
    let keys: Vec<(SyncId, &str, &str, u64)> = read
        .entries
        .iter()
        .map(|e| {
            (
                e.record.key.sync_id,
                e.record.key.collection_id.0.as_str(),
                e.record.key.upstream_id.0.as_str(),
                e.record.version.major,
            )
        })
        .collect();
    assert_eq!(keys, [(SYNC_A, "public.orders", "1", 2)]);
    let http = other
        .read(&RecordFilter::Provider(Provider::Http), Seq::START, 10)
        .await
        .unwrap();
    assert_eq!(http.entries.len(), 1);
    assert_eq!(http.entries[0].record.key.sync_id, SYNC_B);
}

/// The WAL is copied back into the file as appends go on (SQLite's automatic checkpoint on the
/// writing connection): however much is appended, the WAL stays near its checkpoint size, and
/// every record reads back, before and after reopening.
#[tokio::test]
async fn the_wal_is_copied_back_into_the_file_as_appends_go_on() {
    let (dir, stream) = open().await;
    // Payloads that LZ4 cannot shrink much: ~40 MB through the WAL, more than twice the
    // 1,000 pages of 16 KiB at which it is copied back.
    let mut random = sluice_core::Xorshift::new(0x9E37_79B9_7F4A_7C15);
    let mut noise = |len: usize| {
        (0..len)
            .map(|_| char::from(b'!' + random.below(90) as u8))
            .collect::<String>()
    };
    let (appends, per_append) = (40u64, 1000u64);
    for a in 0..appends {
        let records = (0..per_append)
            .map(|i| {
                let id = format!("{:08}", a * per_append + i);
                let payload = json!({"id": id, "noise": noise(1000)});
                record(
                    SYNC_A,
                    "public.orders",
                    &id,
                    1,
                    Change::upsert(payload).unwrap(),
                )
            })
            .collect();
        stream.append(records).await.unwrap();
    }
    let size = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let (file, wal) = (
        size(sluice_stream::FILE_NAME),
        size(&format!("{}-wal", sluice_stream::FILE_NAME)),
    );
    assert!(
        file > 26 << 20,
        "the records were copied back into the file ({file} bytes)"
    );
    assert!(
        wal < 24 << 20,
        "the WAL stays near 1,000 pages of 16 KiB, not the {} MB appended ({wal} bytes)",
        file >> 20
    );
    // Every record reads back (in reads of at most 8 MiB of payloads, whatever the limit).
    let (mut after, mut read) = (Seq::START, 0);
    loop {
        let next = stream
            .read_text(&all(), after, (appends * per_append) as usize + 1)
            .await
            .unwrap();
        if next.entries.is_empty() {
            break;
        }
        read += next.entries.len() as u64;
        after = next.through;
    }
    assert_eq!(read, appends * per_append);
    drop(stream);
    let reopened = EmbeddedStream::open(dir.path()).await.unwrap();
    assert_eq!(reopened.head().await.unwrap(), Seq(appends * per_append));
}

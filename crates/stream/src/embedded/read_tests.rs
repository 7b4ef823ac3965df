//! Reads and lag from the file: what they return, where they stop, what they count.

use super::tests::{read_all, record, upsert};
use super::*;

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

/// Lag counts what reads from the same position would return, whatever the filter, the cap
/// and the segments (of one collection or several, with replaced records and tombstones), and
/// gives the first such record's append time.
#[tokio::test]
async fn lag_counts_what_a_read_would_return() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let sync = SyncId(Uuid::from_u128(7));
    let other = |id: u64, version: u64| Record {
        key: RecordKey::new(sync, "public.other", id.to_string()),
        ..upsert(id, version)
    };
    // Appends of one collection, of the other, and of both (segments of several).
    stream
        .append((0..1500).map(|i| upsert(i, 1)).collect())
        .await
        .unwrap();
    stream
        .append((0..700).map(|i| other(i, 1)).collect())
        .await
        .unwrap();
    let mixed = (0..600)
        .flat_map(|i| [upsert(i, 2), other(i + 1000, 1)])
        .collect();
    stream.append(mixed).await.unwrap();
    stream
        .append(vec![record(3, 9, None), other(5, 2)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    stream
        .append((1500..1600).map(|i| upsert(i, 1)).collect())
        .await
        .unwrap();
    // From the file, with nothing in memory.
    drop(stream);
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let filters = [
        RecordFilter::Provider(Provider::Postgres),
        RecordFilter::Provider(Provider::Http),
        RecordFilter::Sync {
            sync_id: sync,
            collections: None,
        },
        RecordFilter::Sync {
            sync_id: sync,
            collections: Some([CollectionId("public.other".into())].into()),
        },
    ];
    let head = stream.head().await.unwrap().0;
    for filter in &filters {
        for after in [0, 1, 999, 1000, 1500, 2199, 2200, 2201, 3000, 3400, head] {
            let read: Vec<Seq> = read_all(&stream, filter, Seq(after), 1000)
                .await
                .into_iter()
                .map(|e| e.seq)
                .collect();
            for cap in [1, 10, 1000, u64::MAX] {
                let lag = stream.lag(filter, Seq(after), cap).await.unwrap();
                let want = (read.len() as u64).min(cap);
                assert_eq!(lag.records, want, "{filter:?} after {after}, cap {cap}");
                let first = match read.first() {
                    Some(seq) => {
                        let all = RecordFilter::Provider(Provider::Postgres);
                        stream
                            .lag(&all, Seq(seq.0 - 1), 1)
                            .await
                            .unwrap()
                            .oldest_appended_at
                    }
                    None => None,
                };
                assert_eq!(lag.oldest_appended_at, first, "{filter:?} after {after}");
            }
        }
    }
}

/// A read's list of entries is sized before it is filled, for the entries up to the head or
/// the limit, whichever is fewer (a list that grew as a consumer's batch of 5,000 was read
/// moved every entry read so far once more): from the tail and from the file alike.
#[tokio::test]
async fn a_reads_list_is_sized_before_it_is_filled() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    stream
        .append((0..6000).map(|id| upsert(id, 1)).collect())
        .await
        .unwrap();
    let filter = RecordFilter::Provider(Provider::Postgres);
    for from_memory in [true, false] {
        let stream = match from_memory {
            true => &stream,
            // A new handle on the file: its tail holds nothing.
            false => &EmbeddedStream::open(dir.path()).await.unwrap(),
        };
        let first = stream.read_text(&filter, Seq::START, 5000).await.unwrap();
        let rest = stream
            .read_text(&filter, first.through, 5000)
            .await
            .unwrap();
        let sizes = |read: &StreamRead| (read.entries.len(), read.entries.capacity());
        assert_eq!(sizes(&first), (5000, 5000), "from memory: {from_memory}");
        assert_eq!(sizes(&rest), (1000, 1000), "from memory: {from_memory}");
        assert_eq!(stream.reads_from_memory(), if from_memory { 2 } else { 0 });
    }
}

//! Ids held in both forms (`ids.rs`), through every statement that finds a key by its id, in a
//! new file and in one whose `keys` table was made before (its ids declared `text`).

use super::tests::{self, read_all, record};
use super::*;

/// Ids of both forms and the texts next to them: each must stay its own key.
const IDS: [&str; 22] = [
    "0",
    "1",
    "2",
    "9",
    "10",
    "11",
    "100",
    "-1",
    "-0",
    "007",
    "+1",
    "1.0",
    "1e3",
    " 1",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "",
    "abc",
    "é",
    "１２",
];

/// Ids left at their second version while the others are updated again and again.
const KEPT: [&str; 4] = ["10", "-9223372036854775808", "007", "１２"];

fn keyed(id: &str, version: u64) -> Record {
    Record {
        key: RecordKey::new(SyncId(Uuid::from_u128(7)), "public.t", id),
        ..record(
            0,
            version,
            Some(serde_json::json!({"id": id, "v": version})),
        )
    }
}

/// Opens a stream on `dir`, first giving it the `keys` table of the last release when `old`.
async fn open(dir: &Path, old: bool) -> EmbeddedStream {
    if old {
        let conn = Connection::open(dir.join(FILE_NAME)).unwrap();
        conn.execute_batch(
            "create table keys (collection integer not null, upstream_id text not null, \
               seq integer not null, version_major integer not null, \
               version_minor integer not null, deleted integer not null, \
               segment integer not null, primary key (collection, upstream_id)) without rowid;",
        )
        .unwrap();
    }
    EmbeddedStream::open(dir).await.unwrap()
}

/// Appends, the version guard, reads by key, compaction, reopening and a truncate treat every
/// id as its own key, whichever form it is held in.
#[tokio::test]
async fn ids_held_as_integers_or_text_are_each_their_own_key() {
    for old in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let stream = open(dir.path(), old).await;
        stream
            .append(IDS.iter().map(|id| keyed(id, 1)).collect())
            .await
            .unwrap();
        // Newer versions of every id, and stale ones of some, in one append.
        let mut batch: Vec<Record> = IDS.iter().map(|id| keyed(id, 3)).collect();
        batch.extend(IDS.iter().step_by(3).map(|id| keyed(id, 2)));
        assert_eq!(stream.append(batch).await.unwrap().appended, IDS.len());
        // Updates of all but a few ids, until the segment holding those few is sparse and
        // rewritten: its live entries are moved, and their keys' rows must follow them.
        for version in 4..40 {
            stream
                .append(
                    IDS.iter()
                        .filter(|id| !KEPT.contains(id))
                        .map(|id| keyed(id, version))
                        .collect(),
                )
                .await
                .unwrap();
        }
        let (segments, orphans) = tests::segment_accounts(&stream);
        assert_eq!(orphans, 0, "old: {old}");
        assert!(
            segments.len() < 40,
            "old: {old}: {} segments",
            segments.len()
        );
        drop(stream);
        let stream = EmbeddedStream::open(dir.path()).await.unwrap();
        let held: Vec<(String, i64)> = stream
            .with_reader(|conn| {
                let mut s = conn
                    .prepare("select typeof(upstream_id), count(*) from keys group by 1 order by 1")
                    .or_storage("checking")?;
                let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)));
                rows.and_then(Iterator::collect).or_storage("checking")
            })
            .unwrap();
        let expected = match old {
            false => vec![("integer".to_owned(), 10), ("text".to_owned(), 12)],
            true => vec![("text".to_owned(), 22)],
        };
        assert_eq!(held, expected, "old: {old}");
        for id in IDS {
            let key = RecordKey::new(SyncId(Uuid::from_u128(7)), "public.t", id);
            let got = stream.get(&key).await.unwrap().expect("every id is found");
            let newest = if KEPT.contains(&id) { 3 } else { 39 };
            assert_eq!(got.record.version, Version::new(newest, 0), "{id:?}");
            assert_eq!(
                got.record.change.payload().unwrap()["id"],
                serde_json::json!(id),
                "{id:?}"
            );
        }
        let missing = RecordKey::new(SyncId(Uuid::from_u128(7)), "public.t", "12");
        assert!(stream.get(&missing).await.unwrap().is_none());
        // Every id once, newest version, read in seq order; listed in the ids' text order.
        let filter = RecordFilter::Provider(Provider::Postgres);
        let read = read_all(&stream, &filter, Seq::START, 7).await;
        let mut ids: Vec<&str> = read
            .iter()
            .map(|e| e.record.key.upstream_id.0.as_str())
            .collect();
        ids.sort_unstable();
        let mut given = IDS.to_vec();
        given.sort_unstable();
        assert_eq!(ids, given, "old: {old}");
        let live: Vec<String> = stream
            .live_records()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.record.key.upstream_id.0)
            .collect();
        assert_eq!(live, given, "old: {old}");
        // A truncate finds every id, in either form, once.
        let done = stream
            .tombstone_collection(
                SyncId(Uuid::from_u128(7)),
                &CollectionId("public.t".into()),
                Version::new(100, 0),
                OffsetDateTime::now_utc(),
            )
            .await
            .unwrap();
        assert_eq!(done, IDS.len() as u64, "old: {old}");
        assert!(stream.live_records().await.unwrap().is_empty());
    }
}

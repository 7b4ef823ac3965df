//! Files written by an older sluice, opened by this one: their records move to packed
//! segments, every one as it was, and format 1's trigger is replaced. And a file written by a
//! newer sluice, which this one refuses; and one this sluice wrote, which a sluice from before
//! formats cannot miscount.

use super::tests::{exact_counts, held, segment_accounts, upsert};
use super::*;
use sluice_core::ErrorClass;

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
    assert!(
        segments
            .iter()
            .all(|(_, records, live, named)| records == live && live == named)
    );
    let leftovers = stream
        .with_reader(|conn| {
            conn.query_row(
                "select count(*) from sqlite_master where name in ('records_inline', 'records') \
                   or (name = 'tombstones' and tbl_name = 'keys')",
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
    let format = "select value from meta where key = 'format'";
    assert_eq!(
        held(&stream, format),
        schema::FORMAT,
        "the file now says its format"
    );
    // Writes go on after the migrated records.
    let outcome = stream.append(vec![upsert(1, 9)]).await.unwrap();
    assert_eq!(outcome.head, Seq(2601));
}

/// A file in a newer format than this sluice's is refused with its fix, and left as it was:
/// its format, its tables and its records. Once it says a format this sluice knows, it opens
/// and reads as before.
#[tokio::test]
async fn a_file_from_a_newer_sluice_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    {
        let stream = EmbeddedStream::open(dir.path()).await.unwrap();
        stream
            .append(vec![upsert(1, 1), upsert(2, 1)])
            .await
            .unwrap();
    }
    let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
    let file_format = || -> i64 {
        conn.query_row("select value from meta where key = 'format'", [], |r| {
            r.get(0)
        })
        .unwrap()
    };
    let tables = || -> Vec<String> {
        conn.prepare("select type || ' ' || name from sqlite_master order by 1")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    assert_eq!(file_format(), schema::FORMAT);
    let newer = schema::FORMAT + 1;
    conn.execute("update meta set value = ? where key = 'format'", [newer])
        .unwrap();
    let before = tables();

    let error = EmbeddedStream::open(dir.path()).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::FixConfiguration);
    let problem = error.problem();
    assert!(
        problem.contains("written by a newer sluice")
            && problem.contains(&format!("file format {newer}"))
            && problem.contains(FILE_NAME),
        "{problem}"
    );
    assert!(
        error
            .fix()
            .is_some_and(|fix| fix.contains("the sluice version that wrote it")),
        "{error}"
    );
    assert_eq!(file_format(), newer, "the refused file keeps its format");
    assert_eq!(tables(), before);

    conn.execute(
        "update meta set value = ? where key = 'format'",
        [schema::FORMAT],
    )
    .unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    let read = stream
        .read(&RecordFilter::Provider(Provider::Postgres), Seq::START, 10)
        .await
        .unwrap();
    assert_eq!(read.entries.len(), 2);
    assert_eq!(read.through, Seq(2));
}

/// The `key_replaced` trigger as format 1 made it: each replaced row counted a row at a time.
const FORMAT_1_TRIGGER: &str = "create trigger key_replaced after update of seq on keys
    begin
        update segments set live = live - 1 where id = old.segment;
        insert into dead (seq) values (old.seq);
    end";

/// A file in format 1 (the trigger counting each replaced row itself) gets the trigger that
/// reports replaced rows to the writer, and format 2, when opened; updates, a key given twice
/// in one append and stale records then keep every segment's count and dead seqs exact.
#[tokio::test]
async fn a_format_1_file_gets_the_reporting_trigger_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    {
        let stream = EmbeddedStream::open(dir.path()).await.unwrap();
        stream
            .append((1..=40).map(|id| upsert(id, 1)).collect())
            .await
            .unwrap();
    }
    let conn = Connection::open(dir.path().join(FILE_NAME)).unwrap();
    conn.execute_batch(&format!(
        "drop trigger key_replaced; {FORMAT_1_TRIGGER};
         update meta set value = 1 where key = 'format';"
    ))
    .unwrap();
    let trigger = || -> String {
        conn.query_row(
            "select sql from sqlite_master where type = 'trigger' and name = 'key_replaced'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert!(trigger().contains("update segments"));

    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    assert!(
        trigger().contains(connection::KEY_REPLACED),
        "{}",
        trigger()
    );
    assert_eq!(
        held(&stream, "select value from meta where key = 'format'"),
        2
    );
    let outcome = stream
        .append(vec![
            upsert(3, 2),
            upsert(4, 2),
            upsert(4, 3),
            upsert(5, 1),
            upsert(41, 1),
        ])
        .await
        .unwrap();
    assert_eq!((outcome.appended, outcome.skipped_stale), (4, 1));
    let segments = exact_counts(&stream);
    let live: i64 = segments.iter().map(|(_, _, live, _)| live).sum();
    assert_eq!(live, 41);
    assert_eq!(held(&stream, "select count(*) from dead"), 4);
}

/// A sluice from before formats were kept, writing a file in format 2 (it does not look at the
/// format, and has no `sluice_key_replaced`): its upsert of a key the file holds fails, and
/// leaves the file as it was, rather than replacing a key row without counting it. This
/// sluice's appends then go on, counted.
#[tokio::test]
async fn a_sluice_from_before_formats_cannot_replace_a_key_uncounted() {
    let dir = tempfile::tempdir().unwrap();
    let stream = EmbeddedStream::open(dir.path()).await.unwrap();
    stream
        .append((1..=3).map(|id| upsert(id, 1)).collect())
        .await
        .unwrap();
    let before = held(&stream, "select seq from keys where upstream_id = 2");

    let older = Connection::open(dir.path().join(FILE_NAME)).unwrap();
    let error = older
        .execute(
            "insert into keys (collection, upstream_id, seq, version_major, version_minor, \
               deleted, segment) values (1, 2, 99, 5, 0, 0, 1) \
             on conflict (collection, upstream_id) do update set seq = excluded.seq, \
               version_major = excluded.version_major, segment = excluded.segment",
            [],
        )
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no such function: sluice_key_replaced"),
        "{error}"
    );
    assert_eq!(
        held(&stream, "select seq from keys where upstream_id = 2"),
        before
    );

    stream.append(vec![upsert(2, 2)]).await.unwrap();
    exact_counts(&stream);
    assert_eq!(held(&stream, "select count(*) from dead"), 1);
}

/// The tables of a file written with a row per record (before packed segments), as that
/// sluice made them; `times` when its segments held the times their records share.
fn row_per_record_tables(times: bool) -> String {
    let segment_times = if times {
        ", appended_at_ns integer, updated_at_ns integer"
    } else {
        ""
    };
    format!(
        "pragma journal_mode = wal;
         create table cursors (consumer text primary key, provider text, sync_id blob,
           collections text, seq integer not null);
         create table meta (key text primary key, value integer not null);
         create table source_state (owner text primary key, value text not null);
         create table collections (id integer primary key, provider text not null,
           sync_id blob not null, collection_id text not null, unique (sync_id, collection_id));
         create table records (seq integer primary key, collection integer not null,
           upstream_id text not null, version_major integer not null,
           version_minor integer not null, upstream_updated_at_ns integer not null,
           deleted integer not null, segment integer, slot integer,
           appended_at_ns integer not null, unique (collection, upstream_id));
         create index tombstones on records (seq) where deleted = 1;
         create table segments (id integer primary key, records integer not null,
           live integer not null{segment_times});
         create table segment_bodies (segment integer primary key, body blob not null);
         create index sparse_segments on segments (id) where live * 2 < records;
         create trigger payload_replaced after update of segment, slot on records
         when old.segment is not null
          and (new.segment is null or new.segment != old.segment or new.slot != old.slot)
         begin update segments set live = live - 1 where id = old.segment; end;"
    )
}

/// A file written with a row per record naming its payload's segment and slot is moved to
/// packed segments when opened, with its segments' times and without (an older file still):
/// every record reads back as it was (seq, version, both times, payload, tombstone), the
/// cursors stay, the old tables go, and writes go on after its head.
#[tokio::test]
async fn a_file_with_a_row_per_record_is_migrated_on_open() {
    for times in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let sync = Uuid::from_u128(7);
        // Segment 1: seqs 1 to 10, of which 3 and 4 were replaced by seqs 21 and 22 in
        // segment 2; a tombstone at seq 30. With `times`, segment 1's rows hold 0 where its
        // times apply (seq 5 holds its own update time).
        let text = |seq: i64| format!("{{\"seq\":{seq},\"s\":\"é\\u0000\"}}");
        let row_time = |seq: i64, shared: i64| {
            if times && seq <= 10 && shared != 0 {
                0
            } else {
                shared
            }
        };
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&row_per_record_tables(times)).unwrap();
            conn.execute(
                "insert into collections values (1, 'postgres', ?, 'public.t')",
                [sync.as_bytes().as_slice()],
            )
            .unwrap();
            conn.execute_batch(
                "insert into meta values ('head', 30);
                 insert into cursors values ('c', 'postgres', null, null, 4);",
            )
            .unwrap();
            let first: Vec<(i64, String)> = (1..=10).map(|seq| (seq, text(seq))).collect();
            let second: Vec<(i64, String)> = [21, 22].map(|seq| (seq, text(seq))).to_vec();
            for (id, payloads, live) in [(1, &first, 8), (2, &second, 2)] {
                let body = segment::encode(payloads.iter().map(|(seq, t)| (*seq, t.as_str())));
                if times {
                    let shared: (Option<i64>, Option<i64>) = if id == 1 {
                        (Some(1000), Some(2000))
                    } else {
                        (None, None)
                    };
                    conn.execute(
                        "insert into segments values (?, ?, ?, ?, ?)",
                        (id, payloads.len() as i64, live, shared.0, shared.1),
                    )
                    .unwrap();
                } else {
                    conn.execute(
                        "insert into segments values (?, ?, ?)",
                        (id, payloads.len() as i64, live),
                    )
                    .unwrap();
                }
                conn.execute("insert into segment_bodies values (?, ?)", (id, body))
                    .unwrap();
            }
            let mut insert = conn
                .prepare("insert into records values (?, 1, ?, ?, 0, ?, ?, ?, ?, ?)")
                .unwrap();
            for seq in [1, 2, 5, 6, 7, 8, 9, 10] {
                let updated = if seq == 5 { 7 } else { row_time(seq, 2000) };
                insert
                    .execute((
                        seq,
                        seq.to_string(),
                        1,
                        updated,
                        0,
                        1,
                        seq - 1,
                        row_time(seq, 1000),
                    ))
                    .unwrap();
            }
            for (seq, key, slot) in [(21, 3, 0), (22, 4, 1)] {
                insert
                    .execute((seq, key.to_string(), 2, 3000 + seq, 0, 2, slot, 4000 + seq))
                    .unwrap();
            }
            insert
                .execute((30, "11", 3, 5000, 1, None::<i64>, None::<i64>, 6000))
                .unwrap();
        }
        let stream = EmbeddedStream::open(dir.path()).await.unwrap();
        let filter = RecordFilter::Provider(Provider::Postgres);
        let read = stream.read_text(&filter, Seq::START, 100).await.unwrap();
        let seqs: Vec<u64> = read.entries.iter().map(|e| e.seq.0).collect();
        assert_eq!(
            seqs,
            [1, 2, 5, 6, 7, 8, 9, 10, 21, 22, 30],
            "times: {times}"
        );
        assert_eq!(read.through, Seq(30));
        for entry in &read.entries {
            let seq = entry.seq.0 as i64;
            let (version, updated, appended) = match seq {
                5 => (1, 7, 1000),
                1..=10 => (1, 2000, 1000),
                30 => (3, 5000, 6000),
                _ => (2, 3000 + seq, 4000 + seq),
            };
            assert_eq!(entry.record.version.major, version, "seq {seq}");
            assert_eq!(
                entry.record.upstream_updated_at.unix_timestamp_nanos(),
                i128::from(updated),
                "seq {seq}"
            );
            let lag = stream.lag(&filter, Seq(seq as u64 - 1), 1).await.unwrap();
            assert_eq!(
                lag.oldest_appended_at.unwrap().unix_timestamp_nanos(),
                i128::from(appended),
                "seq {seq}"
            );
            if seq == 30 {
                assert!(entry.record.is_tombstone());
            } else {
                assert_eq!(entry.payload_text.as_ref().unwrap().as_str(), text(seq));
            }
        }
        assert_eq!(stream.tombstones().await.unwrap(), 1);
        let key = RecordKey::new(SyncId(sync), "public.t", "4");
        let got = stream.get(&key).await.unwrap().unwrap();
        assert_eq!((got.seq, got.record.version.major), (Seq(22), 2));
        let (segments, orphans) = segment_accounts(&stream);
        assert_eq!(orphans, 0);
        assert!(
            segments
                .iter()
                .all(|(_, records, live, named)| records == live && live == named)
        );
        let leftovers = held(
            &stream,
            "select count(*) from sqlite_master where name like '%by_seq' or name like '%by_slot' \
               or name = 'records'",
        );
        assert_eq!(leftovers, 0, "the old tables are gone");
        assert_eq!(
            held(&stream, "select seq from cursors where consumer = 'c'"),
            4
        );
        // Writes go on after the migrated records, under the same version guard.
        let outcome = stream
            .append(vec![upsert(4, 2), upsert(5, 2)])
            .await
            .unwrap();
        assert_eq!(
            (outcome.appended, outcome.skipped_stale, outcome.head),
            (1, 1, Seq(32))
        );
    }
}

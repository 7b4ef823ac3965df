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

//! Helpers the source's test files share: a table of `(id, n, body)` rows as the source holds
//! it and as the records stream holds it, in one comparable form.

use std::collections::BTreeMap;

use sluice_core::Payload;
use sluice_stream::EmbeddedStream;
use sqlx::PgConnection;

/// `id → (n, body)`, the form both sides are compared in.
pub type Rows = BTreeMap<String, (i64, String)>;

/// `select id::text, n, body from <table>` on `conn`.
pub async fn table_rows(conn: &mut PgConnection, table: &str) -> Rows {
    sqlx::query_as::<_, (String, i32, String)>(sqlx::AssertSqlSafe(format!(
        "select id::text, n, body from {table}"
    )))
    .fetch_all(conn)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, n, body)| (id, (n as i64, body)))
    .collect()
}

/// The live records of `collection`, by upstream id.
pub async fn live(stream: &EmbeddedStream, collection: &str) -> BTreeMap<String, Payload> {
    stream
        .live_records()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.record.key.collection_id.0 == collection)
        .map(|e| {
            (
                e.record.key.upstream_id.0.clone(),
                e.record.change.payload().cloned().unwrap(),
            )
        })
        .collect()
}

/// Payloads of `(id, n, body)` rows in the form of [`table_rows`].
pub fn stream_rows(rows: &BTreeMap<String, Payload>) -> Rows {
    rows.iter()
        .map(|(id, p)| {
            (
                id.clone(),
                (
                    p["n"].as_i64().unwrap(),
                    p["body"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

//! Batch writes into a consumer table, in one transaction per partition with its checkpoint.
//!
//! Before the transaction starts, each key's newest version is picked and its row id computed
//! (in parallel threads when there are several partitions). Rows are encoded for `COPY` as they
//! are sent, piece by piece, so the server stores one piece while the next is encoded. Inside
//! the transaction, one lookup finds which rows already exist: new rows are copied straight
//! into the table, existing ones go through a staging table and one merge,
//! deletes are one statement. While a partition's batches are all new, the next one is copied
//! straight in without the lookup; a key that exists then aborts the transaction, and the batch
//! is applied again with the lookup. If another writer inserts one of the "new" keys first, the
//! unique violation aborts the transaction and the partition is retried with every row going
//! through the merge, so the fast path never costs correctness.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};

use sluice_core::{Change, Payload, RecordKey, Seq, StreamEntry};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use uuid::Uuid;

use sluice_pg::Condition;

use super::ConsumerTable;
use super::statements::Statements;
use crate::checkpoint::CHECKPOINT_TABLE;
use crate::copy::{CopyFailure, PIECE_ROWS, binary, copy_pieces, pg_micros};
use crate::newest::newest;

/// The key a consumer table's checkpoints are stored under (its quoted name), so one
/// consumer may be pointed at another table and start over there.
pub(crate) fn table_key(table: &ConsumerTable) -> String {
    table.qualified()
}

/// Prepares a new connection: the checkpoint table (created by the sync user if missing) and
/// the session's staging table.
pub(crate) async fn prepare_connection(
    conn: &mut PgConnection,
    sql: &Statements,
) -> Result<(), sqlx::Error> {
    // Two statements in one simple query: one implicit transaction, so the lock covers it.
    sqlx::raw_sql(AssertSqlSafe(sql.checkpoints.create.clone()))
        .execute(&mut *conn)
        .await?;
    sqlx::query(sql.create_stage).execute(&mut *conn).await?;
    Ok(())
}

/// One partition's share of a batch, planned before its transaction starts: the newest
/// version of each key ([`plan_partition`]).
#[derive(Debug, Default)]
pub(crate) struct Planned<'a> {
    /// The upserts with their row ids, in stream order; encoded as they are copied
    /// ([`encode_rows`]).
    upserts: Vec<(Uuid, &'a StreamEntry)>,
    /// Row ids to delete.
    deletes: Vec<Uuid>,
}

/// What one partition's transaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PartitionOutcome {
    /// False when the partition's checkpoint was already at or past the batch (a replay).
    pub applied: bool,
    /// Rows inserted or changed.
    pub upserted: u64,
    /// Rows deleted.
    pub deleted: u64,
    /// Records whose text had NUL characters replaced (see [`encode_rows`]).
    pub sanitized: Vec<RecordKey>,
}

/// One partition's share of a batch, for one consumer.
pub(crate) struct PartitionWrite<'a> {
    pub consumer: &'a str,
    /// The table's checkpoint key.
    pub table: &'a str,
    pub partition: usize,
    pub planned: &'a Planned<'a>,
    /// `inserted_at` and `updated_at` of the rows (see [`encode_rows`]).
    pub written_at: i64,
    pub through: Seq,
    /// Whether this partition's last batch found none of its keys in the table: this one is
    /// then copied straight in, and a key found to exist applies it again with a lookup (see
    /// [`apply_partition`]). Updated by the apply.
    pub all_new: &'a AtomicBool,
}

/// Applies one partition's rows and moves its checkpoint to `through`, in one transaction.
pub(crate) async fn apply_partition(
    conn: &mut PgConnection,
    sql: &Statements,
    write: &PartitionWrite<'_>,
) -> Result<PartitionOutcome, sqlx::Error> {
    let duplicate = |e: &sqlx::Error| {
        Condition::of(e) == Some(Condition::DuplicateKey)
            && !e.to_string().contains(CHECKPOINT_TABLE)
    };
    let guessed_all_new = write.all_new.load(Ordering::Relaxed);
    let mut applied = try_apply(conn, sql, write, true).await;
    if guessed_all_new && applied.as_ref().is_err_and(duplicate) {
        // The rows were copied straight in as all new, and one was not: look the keys up.
        write.all_new.store(false, Ordering::Relaxed);
        applied = try_apply(conn, sql, write, true).await;
    }
    match applied {
        // Someone else inserted a key between our lookup and our COPY: take the safe path.
        Err(e) if duplicate(&e) => try_apply(conn, sql, write, false).await,
        other => other,
    }
}

async fn try_apply(
    conn: &mut PgConnection,
    sql: &Statements,
    write: &PartitionWrite<'_>,
    direct_inserts: bool,
) -> Result<PartitionOutcome, sqlx::Error> {
    let PartitionWrite {
        consumer,
        table,
        partition,
        planned,
        written_at,
        through,
        all_new,
    } = *write;
    let mut outcome = PartitionOutcome::default();
    let mut tx = conn.begin().await?;
    let stored = sql
        .checkpoints
        .lock(&mut tx, consumer, table, partition)
        .await?;
    if stored.is_some_and(|s| s >= through) {
        tx.rollback().await?;
        return Ok(outcome);
    }

    let upserts = planned.upserts.as_slice();
    let sanitized = &mut outcome.sanitized;
    let mut copy = async |tx: &mut PgConnection, statement: &str, rows: &[(Uuid, &StreamEntry)]| {
        copy_rows(tx, statement, rows, written_at, sanitized).await
    };
    let copied = direct_inserts && !upserts.is_empty() && all_new.load(Ordering::Relaxed);
    if copied {
        // Straight in, with no savepoint (two round trips fewer, which is most of a small
        // batch's time): a key that exists fails the whole transaction, and
        // `apply_partition` applies the batch again with a lookup.
        outcome.upserted += copy(&mut tx, &sql.copy_direct, upserts).await?;
    }
    if !upserts.is_empty() && !copied {
        let existing: HashSet<Uuid> = if direct_inserts {
            let ids: Vec<Uuid> = upserts.iter().map(|(id, _)| *id).collect();
            sqlx::query_scalar(AssertSqlSafe(sql.existing.clone()))
                .bind(ids)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect()
        } else {
            upserts.iter().map(|(id, _)| *id).collect()
        };
        if direct_inserts {
            all_new.store(existing.is_empty(), Ordering::Relaxed);
        }
        if existing.is_empty() {
            outcome.upserted += copy(&mut tx, &sql.copy_direct, upserts).await?;
        } else {
            let (changed_rows, new_rows): (Vec<_>, Vec<_>) =
                upserts.iter().partition(|(id, _)| existing.contains(id));
            if !new_rows.is_empty() {
                outcome.upserted += copy(&mut tx, &sql.copy_direct, &new_rows).await?;
            }
            copy(&mut tx, sql.copy_stage, &changed_rows).await?;
            // MERGE where the server has it and every staged row was seen to exist (faster
            // than INSERT … ON CONFLICT: docs/versions.md); ON CONFLICT when rows may be new,
            // since only it absorbs a concurrent writer's insert.
            let merge = if direct_inserts && tx.server_version_num().is_some_and(|v| v >= 150_000) {
                &sql.merge_existing
            } else {
                &sql.merge
            };
            outcome.upserted += sqlx::raw_sql(AssertSqlSafe(merge.clone()))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
    }
    if !planned.deletes.is_empty() {
        outcome.deleted = sqlx::query(AssertSqlSafe(sql.delete.clone()))
            .bind(&planned.deletes)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    sql.checkpoints
        .write(&mut tx, consumer, table, partition, through)
        .await?;
    tx.commit().await?;
    outcome.applied = true;
    Ok(outcome)
}

/// Copies `rows` with `statement` (`COPY`'s binary format), encoding them piece by piece as
/// they are sent ([`encode_rows`]); the keys of records whose NULs were replaced are pushed
/// onto `sanitized`.
async fn copy_rows(
    conn: &mut PgConnection,
    statement: &str,
    rows: &[(Uuid, &StreamEntry)],
    written_at: i64,
    sanitized: &mut Vec<RecordKey>,
) -> Result<u64, sqlx::Error> {
    let encode = |piece: &[(Uuid, &StreamEntry)], out: &mut Vec<u8>| {
        encode_rows(piece, written_at, out, sanitized);
        Ok::<(), Infallible>(())
    };
    copy_pieces(conn, statement, true, rows.chunks(PIECE_ROWS), encode)
        .await
        .map_err(|failure| match failure {
            CopyFailure::Server(e) => e,
            CopyFailure::Encoding(never) => match never {},
        })
}

/// Plans one partition's entries: keeps the newest version of each key (ties broken by stream
/// position) and splits them into upserts (with their row ids, computed once: a SHA-1 each)
/// and the row ids to delete.
pub(crate) fn plan_partition<'a>(entries: &[&'a StreamEntry]) -> Planned<'a> {
    let ids: Vec<Uuid> = entries.iter().map(|e| e.record.key.row_id()).collect();
    // In stream order, which also keeps the merge's row locks in a stable order across
    // partitions.
    let order = newest(
        entries,
        |at| ids[at],
        |a, b| (a.record.version, a.seq) > (b.record.version, b.seq),
    );
    let mut upserts = Vec::with_capacity(order.len());
    let mut deletes = Vec::new();
    for at in order {
        match entries[at].record.change {
            Change::Upsert { .. } => upserts.push((ids[at], entries[at])),
            Change::Delete => deletes.push(ids[at]),
        }
    }
    Planned { upserts, deletes }
}

/// Appends `upserts` to `out` as rows of `COPY`'s binary format with all eight columns (see
/// [`crate::copy::binary`]), without the format's header and trailer; `inserted_at` and
/// `updated_at` are `written_at` (microseconds since 2000, see [`pg_micros`]), the time sluice
/// wrote the batch by its own clock (a merge keeps an existing row's `inserted_at`).
///
/// **NUL policy.** PostgreSQL cannot store U+0000 in `text` or `jsonb` (`\u0000` in a JSON
/// string is rejected). Rather than fail the batch or drop the record, sluice replaces each
/// U+0000 in payload keys, payload string values, `collection_id` and `upstream_id` with
/// U+FFFD (the replacement character) and writes the record; the keys of records changed this
/// way are pushed onto `sanitized` so the target reports them in its health (`payload`
/// check). The row id is computed from the original identity, so two ids differing only by
/// NUL stay distinct rows.
fn encode_rows(
    upserts: &[(Uuid, &StreamEntry)],
    written_at: i64,
    out: &mut Vec<u8>,
    sanitized: &mut Vec<RecordKey>,
) {
    for &(row_id, entry) in upserts {
        let record = &entry.record;
        let Change::Upsert { payload } = &record.change else {
            continue;
        };
        let json: String;
        let mut text: &str = match &entry.payload_text {
            // As the stream stores it (the payload itself was not parsed).
            Some(text) => text.as_str(),
            // Serialising a map of JSON values cannot fail.
            None => {
                json = serde_json::to_string(payload).unwrap_or_default();
                &json
            }
        };
        let mut changed = false;
        let cleaned: String;
        // `str::contains` looks at many bytes at a time (comparing every 6-byte window was
        // 15% of the consumer table's samples in `perf`).
        if text.contains("\\u0000") {
            let parsed: Payload;
            let payload = match &entry.payload_text {
                Some(_) => {
                    parsed = serde_json::from_str(text).unwrap_or_default();
                    &parsed
                }
                None => payload,
            };
            let clean = strip_nul_payload(payload);
            if &clean != payload {
                cleaned = serde_json::to_string(&clean).unwrap_or_default();
                text = &cleaned;
                changed = true;
            }
        }
        binary::tuple(out, 8);
        binary::field(out, row_id.as_bytes());
        binary::field(out, record.key.sync_id.0.as_bytes());
        changed |= binary::text(out, &record.key.collection_id.0);
        changed |= binary::text(out, &record.key.upstream_id.0);
        binary::jsonb(out, text);
        binary::field(out, &pg_micros(record.upstream_updated_at).to_be_bytes());
        for _ in 0..2 {
            binary::field(out, &written_at.to_be_bytes());
        }
        if changed {
            sanitized.push(record.key.clone());
        }
    }
}

fn strip_nul_payload(payload: &Payload) -> Payload {
    payload
        .iter()
        .map(|(k, v)| (k.replace('\0', "\u{FFFD}"), strip_nul(v)))
        .collect()
}

fn strip_nul(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) if s.contains('\0') => Value::String(s.replace('\0', "\u{FFFD}")),
        Value::Array(items) => Value::Array(items.iter().map(strip_nul).collect()),
        Value::Object(map) => Value::Object(strip_nul_payload(map)),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests;

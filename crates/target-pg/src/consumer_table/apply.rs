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

use std::collections::{HashMap, HashSet};
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
    let mut newest: HashMap<Uuid, &'a StreamEntry> = HashMap::with_capacity(entries.len());
    for entry in entries {
        let id = entry.record.key.row_id();
        match newest.get(&id) {
            Some(kept) if (kept.record.version, kept.seq) >= (entry.record.version, entry.seq) => {}
            _ => {
                newest.insert(id, entry);
            }
        }
    }
    let mut upserts = Vec::with_capacity(newest.len());
    let mut deletes = Vec::new();
    for (id, entry) in newest {
        match entry.record.change {
            Change::Upsert { .. } => upserts.push((id, entry)),
            Change::Delete => deletes.push(id),
        }
    }
    // Stream order keeps the merge's row locks in a stable order across partitions.
    upserts.sort_by_key(|(_, e)| e.seq);
    Planned { upserts, deletes }
}

/// Appends `upserts` to `out` as rows of `COPY`'s binary format with all eight columns (see
/// [`crate::copy::binary`]), without the format's header and trailer; `inserted_at` and
/// `updated_at` are `written_at` (microseconds since 2000, see [`pg_micros`]), the time sluice wrote the
/// batch by its own clock (a merge keeps an existing row's `inserted_at`).
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
mod tests {
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
}

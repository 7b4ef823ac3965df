//! Writing a batch: rows copied in (in binary while they can be, `binary.rs`, else as text,
//! `text.rs`) or merged, deletes, the checkpoint, a partition of the records per connection.

use std::collections::{BTreeMap, HashSet};

use sluice_core::sql::{qualified, quote_ident as q};
use sluice_core::{Batch, ConsumerId, Error, RecordKey, Seq, StreamEntry, SyncId};
use sluice_pg::Condition;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::checkpoint::partition_of;
use crate::copy::{
    CopyFailure, PIECE_ROWS, copy, copy_pieces_binary_first, probing_key_index, push_text,
};
use crate::newest::newest;

use super::binary::Binary;
use super::shape::TableDef;
use super::text::encoder;
use super::{SchemaMirrorTarget, db};

/// One partition's share of a batch: per table, its newest version of each key.
type Share<'a> = Vec<(&'a TableDef, Vec<&'a StreamEntry>)>;

impl SchemaMirrorTarget {
    /// Makes every table the batch touches match its collection's shape (on the first
    /// connection), then writes each partition's share on its own connection, all at once.
    pub(super) async fn write(&self, consumer: &ConsumerId, batch: &Batch) -> Result<(), Error> {
        // Group by (sync, collection); the newest version per key wins.
        let mut groups: BTreeMap<(SyncId, &str), Vec<&StreamEntry>> = BTreeMap::new();
        for entry in &batch.entries {
            let key = &entry.record.key;
            groups
                .entry((key.sync_id, key.collection_id.0.as_str()))
                .or_default()
                .push(entry);
        }
        let defs = self
            .with_connection(0, async |conn| {
                let mut defs = Vec::with_capacity(groups.len());
                for (sync_id, collection) in groups.keys() {
                    defs.push(self.table_for(conn, *sync_id, collection).await?);
                }
                Ok(defs)
            })
            .await?;
        let n = self.connections.len();
        let mut shares: Vec<Share<'_>> = vec![Vec::new(); n];
        for (def, entries) in defs.iter().zip(groups.values()) {
            // In stream order: rows land in the table in the order they were written upstream
            // (a backfill's in key order, so the key's index grows at its end), and a batch is
            // copied the same way every time. Of one key's versions, the first of the highest.
            let kept = newest(
                entries,
                |at| entries[at].record.key.upstream_id.0.as_str(),
                |a, b| a.record.version > b.record.version,
            );
            let mut split: Vec<Vec<&StreamEntry>> = vec![Vec::new(); n];
            for e in kept.into_iter().map(|at| entries[at]) {
                split[partition_of(&e.record.key, n)].push(e);
            }
            for (share, entries) in shares.iter_mut().zip(split) {
                if !entries.is_empty() {
                    share.push((def, entries));
                }
            }
        }
        let work = shares.iter().enumerate().map(|(p, share)| {
            self.with_connection(p, async move |conn| {
                self.write_share(conn, consumer, p, share, batch.through)
                    .await
            })
        });
        let results: Vec<Result<(), Error>> = futures_util::future::join_all(work).await;
        results.into_iter().collect()
    }

    /// One partition's share and its checkpoint row, in one transaction; nothing when the
    /// row is already at or past `through` (a replay). NUL replacements are counted once the
    /// transaction commits.
    ///
    /// A table whose last batch found none of its keys is copied straight in, with no
    /// savepoint (two round trips fewer a batch, as in the consumer table): a key that exists
    /// aborts the transaction, which is rolled back and written again with that table looking
    /// its keys up ([`Written::MetExistingKey`]). Each such attempt takes one more table off
    /// the straight path, so a share is written at most once more than it has tables.
    async fn write_share(
        &self,
        conn: &mut PgConnection,
        consumer: &ConsumerId,
        partition: usize,
        share: &Share<'_>,
        through: Seq,
    ) -> Result<(), Error> {
        let key = self.checkpoint_key();
        let mut looked_up: HashSet<&str> = HashSet::new();
        'attempt: loop {
            let mut tx = conn
                .begin()
                .await
                .map_err(|e| db(&self.name, "beginning a batch", e))?;
            let stored = self
                .checkpoints
                .lock(&mut tx, &consumer.0, &key, partition)
                .await
                .map_err(|e| db(&self.name, "reading the checkpoint", e))?;
            if stored.is_some_and(|s| s >= through) {
                // Already applied: an idempotent replay. Ended now, not when the connection
                // is next used: the row's lock would hold up the other connections until then.
                return tx
                    .rollback()
                    .await
                    .map_err(|e| db(&self.name, "ending a replayed batch", e));
            }
            let mut sanitized = Vec::new();
            for (def, entries) in share {
                let straight = !looked_up.contains(def.name.as_str());
                let written = self
                    .write_table(&mut tx, partition, def, entries, straight, &mut sanitized)
                    .await?;
                if written == Written::MetExistingKey {
                    tx.rollback()
                        .await
                        .map_err(|e| db(&self.name, "ending a batch to write it again", e))?;
                    looked_up.insert(def.name.as_str());
                    continue 'attempt;
                }
            }
            self.checkpoints
                .write(&mut tx, &consumer.0, &key, partition, through)
                .await
                .map_err(|e| db(&self.name, "storing the checkpoint", e))?;
            tx.commit()
                .await
                .map_err(|e| db(&self.name, "committing a batch", e))?;
            if !sanitized.is_empty() {
                self.sanitized(&sanitized);
            }
            return Ok(());
        }
    }

    /// Writes one table's share of a batch, straight in when `straight` allows and its last
    /// batch found none of its keys; records whose NULs were replaced are pushed onto
    /// `sanitized`.
    pub(super) async fn write_table(
        &self,
        conn: &mut PgConnection,
        partition: usize,
        def: &TableDef,
        entries: &[&StreamEntry],
        straight: bool,
        sanitized: &mut Vec<RecordKey>,
    ) -> Result<Written, Error> {
        let optimistic_key = (partition, def.name.clone());
        let table = qualified(&self.schema, &def.name);
        let (upserts, deletes): (Vec<&StreamEntry>, Vec<&StreamEntry>) =
            entries.iter().partition(|e| !e.record.is_tombstone());
        let columns: Vec<String> = def.columns.iter().map(|c| q(&c.name)).collect();
        let key: Vec<String> = def.key.iter().map(|k| q(k)).collect();
        let fail = |what: &str, e: sqlx::Error| db(&self.name, &format!("{what} {table}"), e);
        // A COPY's failure as the batch's error: an encoding error as it is.
        let copy_failed = |e: CopyFailure<Error>| match e {
            CopyFailure::Server(e) => fail("copying into", e),
            CopyFailure::Encoding(e) => e,
        };
        // Binary rows while the table's types and the values allow, then text (see
        // `binary.rs`).
        let binary = Binary::new(def);
        let in_binary = |copy: &str| {
            binary
                .as_ref()
                .map(|_| format!("{copy} with (format binary)"))
        };
        let copy_in = format!("copy {table} ({}) from stdin", columns.join(", "));
        let copy_in_binary = in_binary(&copy_in);
        let mut upserts = upserts;
        // Optimistic first (the common case during a backfill): copy every upsert straight in.
        // A key that already exists aborts the COPY and the transaction; the table is then
        // marked, and batches for it take the lookup path until one finds no existing key.
        let optimistic = straight
            && !upserts.is_empty()
            && *self
                .optimistic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&optimistic_key)
                .unwrap_or(&true);
        if optimistic {
            let copied = copy_pieces_binary_first(
                conn,
                copy_in_binary.as_deref(),
                &copy_in,
                upserts.chunks(PIECE_ROWS),
                encoder(def, binary.as_ref(), sanitized),
            )
            .await;
            match copied {
                Ok(_) => upserts.clear(),
                Err(CopyFailure::Server(e))
                    if Condition::of(&e) == Some(Condition::DuplicateKey) =>
                {
                    self.optimistic
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(optimistic_key.clone(), false);
                    return Ok(Written::MetExistingKey);
                }
                Err(e) => return Err(copy_failed(e)),
            }
        }
        // With a one-column key, rows whose key is not in the table yet are copied straight in;
        // only the others go through the staging table and the merge.
        let mut fresh: Vec<&StreamEntry> = Vec::new();
        if let [k] = def.key.as_slice()
            && let Some(key_type) = def
                .columns
                .iter()
                .find(|c| &c.name == k)
                .map(|c| &c.sql_type)
            && !upserts.is_empty()
        {
            let ids: Vec<&str> = upserts
                .iter()
                .map(|e| e.record.key.upstream_id.0.as_str())
                .collect();
            let existing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "select {k}::text from {table} where {k} = any($1::text[]::{key_type}[])",
                k = q(k)
            )))
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| fail("looking up keys in", e))?;
            if existing.is_empty() {
                self.optimistic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(optimistic_key.clone(), true);
            }
            let existing: HashSet<String> = existing.into_iter().collect();
            (upserts, fresh) = upserts
                .into_iter()
                .partition(|e| existing.contains(&e.record.key.upstream_id.0));
        }
        if !fresh.is_empty() {
            copy_pieces_binary_first(
                conn,
                copy_in_binary.as_deref(),
                &copy_in,
                fresh.chunks(PIECE_ROWS),
                encoder(def, binary.as_ref(), sanitized),
            )
            .await
            .map_err(copy_failed)?;
        }
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(Written::All);
        }
        let joined = |statement: String| {
            let indexed = self
                .key_indexed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&def.name)
                .copied()
                .unwrap_or(false);
            if indexed {
                probing_key_index(&statement)
            } else {
                statement
            }
        };
        sqlx::raw_sql(AssertSqlSafe(format!(
            "create temp table if not exists _sluice_mirror_stage (like {table}) on commit drop;
             truncate _sluice_mirror_stage;"
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| fail("staging", e))?;
        // A staging table per target table in one transaction: dropped before the next table.
        if !upserts.is_empty() {
            let copy_stage = format!(
                "copy _sluice_mirror_stage ({}) from stdin",
                columns.join(", ")
            );
            copy_pieces_binary_first(
                conn,
                in_binary(&copy_stage).as_deref(),
                &copy_stage,
                upserts.chunks(PIECE_ROWS),
                encoder(def, binary.as_ref(), sanitized),
            )
            .await
            .map_err(copy_failed)?;
            let non_key: Vec<&str> = def
                .columns
                .iter()
                .filter(|c| !def.key.contains(&c.name))
                .map(|c| c.name.as_str())
                .collect();
            let cols = columns.join(", ");
            // MERGE where the server has it (15+), INSERT … ON CONFLICT before: the same
            // result, and MERGE is the faster of the two (docs/versions.md).
            let statement = if conn.server_version_num().is_some_and(|v| v >= 150_000) {
                let on: Vec<String> = key.iter().map(|k| format!("t.{k} = s.{k}")).collect();
                let set: Vec<String> = non_key
                    .iter()
                    .map(|c| format!("{n} = s.{n}", n = q(c)))
                    .collect();
                let values: Vec<String> = columns.iter().map(|c| format!("s.{c}")).collect();
                joined(format!(
                    "merge into {table} as t using _sluice_mirror_stage as s on {on} {matched}when not matched then insert ({cols}) values ({values})",
                    on = on.join(" and "),
                    matched = if set.is_empty() {
                        String::new()
                    } else {
                        format!("when matched then update set {} ", set.join(", "))
                    },
                    values = values.join(", ")
                ))
            } else {
                let set: Vec<String> = non_key
                    .iter()
                    .map(|c| format!("{n} = excluded.{n}", n = q(c)))
                    .collect();
                let on_conflict = if set.is_empty() {
                    "do nothing".to_owned()
                } else {
                    format!("do update set {}", set.join(", "))
                };
                format!(
                    "insert into {table} ({cols}) select {cols} from _sluice_mirror_stage on conflict ({key}) {on_conflict}",
                    key = key.join(", ")
                )
            };
            sqlx::raw_sql(AssertSqlSafe(statement))
                .execute(&mut *conn)
                .await
                .map_err(|e| fail("writing", e))?;
        }
        if !deletes.is_empty() {
            sqlx::raw_sql("truncate _sluice_mirror_stage")
                .execute(&mut *conn)
                .await
                .map_err(|e| fail("staging", e))?;
            let mut data = Vec::new();
            for e in &deletes {
                let parts = key_parts(def, &e.record.key.upstream_id.0);
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        data.push(b'\t');
                    }
                    push_text(&mut data, part);
                }
                data.push(b'\n');
            }
            copy(
                conn,
                &format!("copy _sluice_mirror_stage ({}) from stdin", key.join(", ")),
                &data,
            )
            .await
            .map_err(|e| fail("copying deletes for", e))?;
            let on: Vec<String> = key.iter().map(|k| format!("t.{k} = s.{k}")).collect();
            sqlx::raw_sql(AssertSqlSafe(joined(format!(
                "delete from {table} t using _sluice_mirror_stage s where {}",
                on.join(" and ")
            ))))
            .execute(&mut *conn)
            .await
            .map_err(|e| fail("deleting from", e))?;
        }
        sqlx::raw_sql("drop table _sluice_mirror_stage")
            .execute(&mut *conn)
            .await
            .map_err(|e| fail("staging", e))?;
        Ok(Written::All)
    }
}

/// How a table's share of a batch went.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Written {
    /// Every row is written.
    All,
    /// Copied straight in, it met a key that exists: the transaction is aborted, and the
    /// share must be written again with this table's keys looked up.
    MetExistingKey,
}

/// A composite key's parts (a JSON array of text), or the single key.
fn key_parts(def: &TableDef, upstream_id: &str) -> Vec<String> {
    if def.key.len() > 1 {
        serde_json::from_str::<Vec<String>>(upstream_id)
            .unwrap_or_else(|_| vec![upstream_id.to_owned()])
    } else {
        vec![upstream_id.to_owned()]
    }
}

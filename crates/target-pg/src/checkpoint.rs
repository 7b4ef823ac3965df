//! Consumers' checkpoints in the target, one row per partition, for both layouts.
//!
//! A target written through N connections splits each batch into N partitions by a hash of
//! the record identity ([`partition_of`]): a record always lands in the same partition, so
//! its order holds. Each partition commits its rows with its own checkpoint row, and the
//! consumer's checkpoint is the lowest of them, so a crash between partitions replays
//! (idempotently) rather than skips.
//!
//! The table is `<schema>._sluice_checkpoint (consumer, tbl, partition, seq, updated_at)`,
//! created by the sync user; `tbl` is what the consumer writes (a consumer table's quoted
//! name, a mirror's quoted schema), so a consumer pointed elsewhere starts over there.

use std::collections::HashSet;
use std::sync::Mutex;

use sluice_core::sql::qualified;
use sluice_core::{ConsumerId, RecordKey, Seq};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The checkpoint table, created by the sync user in the target's schema.
pub const CHECKPOINT_TABLE: &str = "_sluice_checkpoint";

/// The partition of `key` among `partitions` (stable across runs and processes).
pub(crate) fn partition_of(key: &RecordKey, partitions: usize) -> usize {
    if partitions <= 1 {
        0
    } else {
        (key.row_id().as_u128() % partitions as u128) as usize
    }
}

/// Consumers whose partition rows this process has aligned to its width
/// ([`Checkpoints::prepare`]). Until a consumer's are, no partition may skip a batch on the
/// strength of its own row: it may have been written under another width.
#[derive(Debug, Default)]
pub(crate) struct Aligned(Mutex<HashSet<ConsumerId>>);

impl Aligned {
    pub(crate) fn contains(&self, consumer: &ConsumerId) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(consumer)
    }

    pub(crate) fn insert(&self, consumer: &ConsumerId) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(consumer.clone());
    }
}

/// The SQL of one schema's checkpoint table, built once with every identifier quoted.
#[derive(Clone, Debug)]
pub(crate) struct Checkpoints {
    /// The table (a simple query: the schema's DDL lock, then the `create`).
    pub create: String,
    read: String,
    clear: String,
    rewind: String,
    reset: String,
    lock: String,
    write: String,
}

impl Checkpoints {
    pub(crate) fn new(schema: &str) -> Self {
        let checkpoint = qualified(schema, CHECKPOINT_TABLE);
        Self {
            create: format!(
                "{lock}; set local client_min_messages = warning; create table if not exists {checkpoint} (\
                   consumer text not null, tbl text not null, partition int not null, seq bigint not null, \
                   updated_at timestamptz not null default now(), primary key (consumer, tbl, partition))",
                lock = sluice_core::sql::schema_ddl_lock(schema)
            ),
            read: format!(
                "select partition, seq from {checkpoint} where consumer = $1 and tbl = $2 for update"
            ),
            clear: format!("delete from {checkpoint} where consumer = $1 and tbl = $2"),
            rewind: format!(
                "update {checkpoint} set seq = 0, updated_at = now() where consumer = $1 and tbl = $2"
            ),
            reset: format!(
                "insert into {checkpoint} (consumer, tbl, partition, seq) \
                 select $1, $2, p, $3 from generate_series(0, $4 - 1) p"
            ),
            lock: format!(
                "select seq from {checkpoint} where consumer = $1 and tbl = $2 and partition = $3 for update"
            ),
            write: format!(
                "insert into {checkpoint} (consumer, tbl, partition, seq) values ($1, $2, $3, $4) \
                 on conflict (consumer, tbl, partition) do update set seq = excluded.seq, updated_at = now()"
            ),
        }
    }

    /// Returns the consumer's checkpoint: the lowest across its partitions. When the number
    /// of partitions changed since the last run, every partition restarts from that lowest
    /// point (re-applying is idempotent; skipping is not).
    pub(crate) async fn prepare(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        tbl: &str,
        partitions: usize,
    ) -> Result<Seq, sqlx::Error> {
        let mut tx = conn.begin().await?;
        let rows: Vec<(i32, i64)> = sqlx::query_as(AssertSqlSafe(self.read.clone()))
            .bind(consumer)
            .bind(tbl)
            .fetch_all(&mut *tx)
            .await?;
        let lowest = rows.iter().map(|(_, seq)| *seq).min().unwrap_or(0);
        let mut stored: Vec<i32> = rows.iter().map(|(p, _)| *p).collect();
        stored.sort_unstable();
        let expected: Vec<i32> = (0..partitions as i32).collect();
        if stored != expected {
            // Two statements: within one, an insert does not see a data-modifying CTE's delete.
            sqlx::query(AssertSqlSafe(self.clear.clone()))
                .bind(consumer)
                .bind(tbl)
                .execute(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(self.reset.clone()))
                .bind(consumer)
                .bind(tbl)
                .bind(lowest)
                .bind(partitions as i32)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Seq(lowest as u64))
    }

    /// Moves every partition of the consumer back to the start of the stream.
    pub(crate) async fn rewind(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        tbl: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.rewind.clone()))
            .bind(consumer)
            .bind(tbl)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Locks one partition's row for the transaction and returns its seq.
    pub(crate) async fn lock(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        tbl: &str,
        partition: usize,
    ) -> Result<Option<Seq>, sqlx::Error> {
        let seq: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.lock.clone()))
            .bind(consumer)
            .bind(tbl)
            .bind(partition as i32)
            .fetch_optional(conn)
            .await?;
        Ok(seq.map(|s| Seq(s as u64)))
    }

    /// Moves one partition's row to `through`.
    pub(crate) async fn write(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        tbl: &str,
        partition: usize,
        through: Seq,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.write.clone()))
            .bind(consumer)
            .bind(tbl)
            .bind(partition as i32)
            .bind(through.0 as i64)
            .execute(conn)
            .await?;
        Ok(())
    }
}

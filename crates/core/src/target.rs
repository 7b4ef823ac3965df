//! The target contract.

use async_trait::async_trait;

use crate::{ConsumerId, Health, Result, Seq, StreamEntry};

/// A batch of stream entries for one consumer, and the checkpoint it moves to.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Entries in `seq` order. A key may appear more than once only if a caller merged
    /// reads; the target keeps the entry with the newest version.
    pub entries: Vec<StreamEntry>,
    /// The consumer's checkpoint once this batch is applied: every entry the consumer's
    /// filter passes with `seq <= through` has been read (some may have been filtered out,
    /// so `through` may exceed the last entry's `seq`).
    pub through: Seq,
}

/// A place consumers write records into (a PostgreSQL database with a layout).
///
/// Contract every implementation keeps:
/// - **Atomic with the checkpoint**: [`apply`](Target::apply) writes every upsert and
///   delete of the batch *and* the consumer's checkpoint in one transaction. After a crash at
///   any point, either all of it or none of it is visible.
/// - **Idempotent**: a batch whose `through` is not past the stored checkpoint changes
///   nothing, so replaying after a crash neither duplicates nor regresses a record. Within a
///   batch, the newest version of a key wins.
/// - **Durable on return**: `apply` returns `Ok` only after the commit.
/// - **Errors**: `Retry` (target unreachable, connection lost) means nothing of the batch
///   was committed; `FixConfiguration` carries the exact fix (a missing grant, a
///   wrong-typed column); `GiveUp` means this batch cannot be written as it is.
#[async_trait]
pub trait Target: Health {
    /// The target's configured name, for messages.
    fn name(&self) -> &str;

    /// The consumer's stored checkpoint ([`Seq::START`] for a new consumer).
    async fn checkpoint(&self, consumer: &ConsumerId) -> Result<Seq>;

    /// Moves the consumer's checkpoint back to [`Seq::START`], so that the next batches are
    /// applied again from the beginning (a restarted backfill). Rows already written stay and
    /// are overwritten as the backfill reaches them.
    async fn reset_checkpoint(&self, consumer: &ConsumerId) -> Result<()>;

    /// Writes the batch and moves the checkpoint to `batch.through`, atomically.
    async fn apply(&self, consumer: &ConsumerId, batch: &Batch) -> Result<()>;

    /// True when the target writes each payload whole as JSON, and so takes batches read with
    /// [`RecordStream::read_text`](crate::RecordStream::read_text): payloads it may get as
    /// text, unparsed ([`StreamEntry::payload_text`](crate::StreamEntry::payload_text)).
    fn takes_payload_text(&self) -> bool {
        false
    }
}

//! The records stream contract.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use time::OffsetDateTime;

use crate::{
    CollectionId, ConsumerId, Provider, Record, RecordKey, Result, SyncId, TextBatch, Version,
};

/// Bytes of payload text after which a store may end a read before its `limit`
/// ([`RecordStream::read`]); a reader whose entries hold this many has a full batch.
pub const READ_BYTES: usize = 8 << 20;

/// Bytes of payload text `entries` hold, as far as the read handed them over as text
/// ([`StreamEntry::payload_text`]).
pub fn payload_bytes(entries: &[StreamEntry]) -> usize {
    entries
        .iter()
        .filter_map(|e| e.payload_text.as_ref())
        .map(PayloadText::len)
        .sum()
}

/// A position in the records stream. Positions strictly increase over the whole stream;
/// [`Seq::START`] is before every entry, so reading after it is the backfill.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl Seq {
    /// Before the first entry: a consumer at `START` has seen nothing.
    pub const START: Seq = Seq(0);
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A record at its position in the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StreamEntry {
    /// Where the entry sits; unique across the stream.
    pub seq: Seq,
    /// The newest version of the record (possibly a tombstone).
    pub record: Record,
    /// Only from [`RecordStream::read_text`]: an upsert's payload as the JSON text the stream
    /// stores, in which case `record`'s payload is left empty, not parsed. `None` otherwise.
    #[serde(skip)]
    pub payload_text: Option<PayloadText>,
}

impl StreamEntry {
    /// An entry with its payload parsed (no [`StreamEntry::payload_text`]).
    pub fn new(seq: Seq, record: Record) -> Self {
        Self {
            seq,
            record,
            payload_text: None,
        }
    }
}

/// A payload's JSON text: a range of a buffer shared with other payloads (those of one
/// append, say), so handing it on copies nothing.
#[derive(Clone)]
pub struct PayloadText {
    buffer: Arc<String>,
    range: Range<usize>,
}

impl PayloadText {
    /// `buffer[range]`; `None` when the range is not a `str` slice of the buffer.
    pub fn new(buffer: Arc<String>, range: Range<usize>) -> Option<Self> {
        buffer.get(range.clone())?;
        Some(Self { buffer, range })
    }

    /// The whole of `text`.
    pub fn whole(text: String) -> Self {
        let range = 0..text.len();
        Self {
            buffer: Arc::new(text),
            range,
        }
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.buffer[self.range.clone()]
    }

    /// The text's length in bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// The bytes the shared buffer holds on to (tests of what a batch gives back).
    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.buffer.capacity()
    }

    /// True when the text is empty (a stored payload never is).
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl PartialEq for PayloadText {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

/// Only its length: a payload may hold anything.
impl fmt::Debug for PayloadText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PayloadText({} bytes)", self.range.len())
    }
}

/// Which records a consumer forwards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RecordFilter {
    /// Every sync of this provider, including syncs created later.
    Provider(Provider),
    /// One sync, optionally only some of its collections.
    Sync {
        /// The sync to forward.
        sync_id: SyncId,
        /// Only these collections; `None` forwards all, including ones added later.
        collections: Option<BTreeSet<CollectionId>>,
    },
}

impl RecordFilter {
    /// True when records of sync `sync_id` from `provider` can pass the filter.
    pub fn covers(&self, provider: Provider, sync_id: SyncId) -> bool {
        match self {
            RecordFilter::Provider(p) => *p == provider,
            RecordFilter::Sync { sync_id: s, .. } => *s == sync_id,
        }
    }

    /// True when a record from `provider` with `key` passes the filter.
    pub fn matches(&self, provider: Provider, key: &RecordKey) -> bool {
        self.matches_collection(provider, key.sync_id, &key.collection_id)
    }

    /// Whether records of `collection_id` in `sync_id`, from `provider`, pass.
    pub fn matches_collection(
        &self,
        provider: Provider,
        sync_id: SyncId,
        collection_id: &CollectionId,
    ) -> bool {
        match self {
            RecordFilter::Provider(p) => *p == provider,
            RecordFilter::Sync {
                sync_id: wanted,
                collections,
            } => {
                sync_id == *wanted
                    && collections
                        .as_ref()
                        .is_none_or(|c| c.contains(collection_id))
            }
        }
    }
}

/// The result of one read: the entries, and how far the read looked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamRead {
    /// Entries passing the filter, in `seq` order.
    pub entries: Vec<StreamEntry>,
    /// Every entry with `seq <= through` has been considered: the last entry's `seq` when the
    /// limit was reached, else the stream head at the time of the read. A consumer may move
    /// its checkpoint here even when the filter passed nothing.
    pub through: Seq,
}

/// How far a reader is behind the stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lag {
    /// Entries passing the filter after the cursor (counting stops at the cap asked for).
    pub records: u64,
    /// When the oldest such entry was appended, if there is one.
    pub oldest_appended_at: Option<OffsetDateTime>,
}

/// What an append did with each record it was given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Records stored (each got a new [`Seq`]).
    pub appended: usize,
    /// Records skipped because the stream already held the same or a newer version
    /// (the version guard); this is normal when a source replays after a crash.
    pub skipped_stale: usize,
    /// The stream head after the append.
    pub head: Seq,
}

/// How a source describes one collection's shape (a table's columns and key), so layouts that
/// mirror it (the schema mirror) can create typed tables. Stored in the stream beside the
/// records; a source updates it when the shape changes (a column added upstream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CollectionSchema {
    /// Columns in upstream order.
    pub columns: Vec<ColumnSchema>,
    /// The key columns, in key order.
    pub key: Vec<String>,
}

/// One column of a [`CollectionSchema`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ColumnSchema {
    /// The column's name.
    pub name: String,
    /// The type as SQL for a built-in type (`numeric(30,10)`, `timestamp with time zone`,
    /// `integer[]`); for an enum, the enum's name (with `[]` for an array of it).
    pub sql_type: String,
    /// The labels, in order, when the type is an enum (or an array of one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enum_labels: Option<Vec<String>>,
    /// Set when the upstream type cannot be reproduced; `sql_type` is then the stand-in
    /// (`text` or `jsonb`) and this names the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsupported: Option<String>,
}

/// A source's resume state, stored atomically with an append.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceState {
    /// Whose state this is (for example `"<sync id>/backfill"`).
    pub owner: String,
    /// The state itself.
    pub value: serde_json::Value,
}

/// The durable, compacted, ordered log of records between sources and consumers.
///
/// Contract every implementation keeps:
/// - **Compaction**: each record key appears at most once, at its newest version. Storing
///   a newer version removes the older entry and gives the record a new, greater [`Seq`].
/// - **Version guard**: a record whose version is not greater than the stored one
///   (tombstones included) is skipped, never stored. Appends are therefore idempotent.
/// - **Atomicity and durability**: [`append`](RecordStream::append) stores all of a batch
///   or none of it, and returns only once the batch survives a crash of the process.
/// - **Ordering**: strictly per record; across records by `seq` only.
/// - **Tombstones** are purged only below the lowest cursor acknowledged by every consumer
///   that could need them, so a consumer may stay offline indefinitely and still catch up.
///
/// Errors carry their [`crate::ErrorClass`]: `Retry` means nothing was stored and the same
/// call may be repeated.
#[async_trait]
pub trait RecordStream: Send + Sync {
    /// Appends a batch atomically under the version guard; returns after it is durable.
    async fn append(&self, records: Vec<Record>) -> Result<AppendOutcome> {
        self.append_with_state(records, None).await
    }

    /// Like [`append`](RecordStream::append), and in the same transaction stores a source's
    /// resume state (for example how far a backfill has read), so the state never claims more
    /// than the stream holds.
    async fn append_with_state(
        &self,
        records: Vec<Record>,
        state: Option<SourceState>,
    ) -> Result<AppendOutcome>;

    /// Like [`append_with_state`](RecordStream::append_with_state), for records whose
    /// payloads the source wrote as JSON text ([`TextBatch`]). A store that keeps payloads as
    /// text stores each one as it is, never parsing it; the default parses them into maps.
    async fn append_texts(
        &self,
        batch: TextBatch,
        state: Option<SourceState>,
    ) -> Result<AppendOutcome> {
        self.append_with_state(batch.into_records()?, state).await
    }

    /// The resume state last stored for `owner` by [`append_with_state`](RecordStream::append_with_state).
    async fn source_state(&self, owner: &str) -> Result<Option<serde_json::Value>>;

    /// Stores (replacing) the shape of one collection of one sync.
    async fn set_collection_schema(
        &self,
        sync_id: SyncId,
        collection: &CollectionId,
        schema: &CollectionSchema,
    ) -> Result<()>;

    /// The stored shape of one collection, if its source described it.
    async fn collection_schema(
        &self,
        sync_id: SyncId,
        collection: &CollectionId,
    ) -> Result<Option<CollectionSchema>>;

    /// Writes a tombstone at `version` for every live record of one collection of one sync
    /// (a `TRUNCATE` upstream), under the version guard; returns how many were written.
    async fn tombstone_collection(
        &self,
        sync_id: SyncId,
        collection: &CollectionId,
        version: Version,
        at: OffsetDateTime,
    ) -> Result<u64>;

    /// Up to `limit` entries with `seq > after` that pass `filter`, in `seq` order, and how far
    /// the read looked. Reading from [`Seq::START`] is the backfill; continuing from the
    /// returned `through` is real time. The two are the same call. A store may end a read
    /// sooner, once its entries' payloads reach [`READ_BYTES`] (`through` is then its last
    /// entry), so that large records are read a few megabytes at a time.
    async fn read(&self, filter: &RecordFilter, after: Seq, limit: usize) -> Result<StreamRead>;

    /// Like [`read`](RecordStream::read), but a store may hand each upsert's payload over as
    /// its stored JSON text ([`StreamEntry::payload_text`]) without parsing it, for a target
    /// that writes payloads as JSON. The default parses, as `read` does.
    async fn read_text(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
    ) -> Result<StreamRead> {
        self.read(filter, after, limit).await
    }

    /// How far a reader at `after` is behind; record counting stops at `cap`.
    async fn lag(&self, filter: &RecordFilter, after: Seq, cap: u64) -> Result<Lag>;

    /// The current newest entry for a key, if the stream holds one (tombstones included).
    async fn get(&self, key: &RecordKey) -> Result<Option<StreamEntry>>;

    /// The highest `seq` assigned so far ([`Seq::START`] when empty).
    async fn head(&self) -> Result<Seq>;

    /// Returns once the head is past `seq`. Cancellation-safe: dropping the future loses
    /// nothing. It wakes on appends; callers must still re-read, as a wake-up is a hint.
    async fn wait_past(&self, seq: Seq);

    /// Records that `consumer`, reading with `filter`, has durably applied everything up
    /// to `through`. Tombstone purging never passes the lowest such cursor. A consumer
    /// registers this way (with its checkpoint) before it reads, so that tombstones it may
    /// still need are kept from then on.
    async fn acknowledge(
        &self,
        consumer: &ConsumerId,
        filter: &RecordFilter,
        through: Seq,
    ) -> Result<()>;

    /// Drops a removed consumer's cursor, so it no longer holds tombstones back.
    async fn forget(&self, consumer: &ConsumerId) -> Result<()>;

    /// A source says whether sync `sync_id` (of `provider`) is reading upstream state in bulk
    /// (a backfill) right now. Not durable: a source sets it again when it starts. Consumers
    /// use it to tell their first backfill (which is not lag) from falling behind.
    fn set_backfilling(&self, sync_id: SyncId, provider: Provider, backfilling: bool) {
        let _ = (sync_id, provider, backfilling);
    }

    /// True while a sync whose records pass `filter` is backfilling (see
    /// [`set_backfilling`](RecordStream::set_backfilling)).
    fn backfilling(&self, filter: &RecordFilter) -> bool {
        let _ = filter;
        false
    }

    /// How many backfills of syncs whose records pass `filter` have begun since the stream
    /// was opened. A consumer that last reached the head before the latest of them still has
    /// that backfill's records to come: initial state, not lag, however the two were timed.
    fn backfills_begun(&self, filter: &RecordFilter) -> u64 {
        let _ = filter;
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_by_provider_sync_and_collection() {
        let sync = SyncId::new_random();
        let orders = RecordKey::new(sync, "public.orders", "1");
        let users = RecordKey::new(sync, "public.users", "1");
        let other = RecordKey::new(SyncId::new_random(), "public.orders", "1");

        assert!(RecordFilter::Provider(Provider::Postgres).matches(Provider::Postgres, &other));
        assert!(!RecordFilter::Provider(Provider::Http).matches(Provider::Postgres, &other));

        let whole_sync = RecordFilter::Sync {
            sync_id: sync,
            collections: None,
        };
        assert!(whole_sync.matches(Provider::Postgres, &orders));
        assert!(!whole_sync.matches(Provider::Postgres, &other));

        let only_orders = RecordFilter::Sync {
            sync_id: sync,
            collections: Some(BTreeSet::from([CollectionId::from("public.orders")])),
        };
        assert!(only_orders.matches(Provider::Postgres, &orders));
        assert!(!only_orders.matches(Provider::Postgres, &users));
    }
}

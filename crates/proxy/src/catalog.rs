//! What the proxy knows about the target's tables: which ones sluice writes, for which sync
//! and collection, and how far each consumer writing them has got.

use std::sync::Arc;

use async_trait::async_trait;
use sluice_core::{CollectionId, ConsumerId, Seq, SyncId, Writer};

/// A table sluice writes on the proxied target.
#[derive(Clone, Debug)]
pub struct SyncedTable {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub table: String,
    /// What it holds.
    pub layout: Layout,
    /// The consumers that write it (the proxy waits for them to show a write locally).
    pub consumers: Vec<ConsumerId>,
}

/// What a synced table holds.
#[derive(Clone, Debug)]
pub enum Layout {
    /// A schema-mirror table: one collection of one sync.
    Mirror {
        /// The sync whose records fill it.
        sync: SyncWriter,
        /// The collection it holds.
        collection: CollectionId,
        /// The columns whose values make a record's upstream id, in key order.
        key: Vec<String>,
    },
    /// A consumer table: every record of these syncs, one row each, keyed by
    /// `(sync_id, collection_id, upstream_id)` with the record in `payload`.
    ConsumerTable {
        /// The syncs its consumers forward.
        syncs: Vec<SyncWriter>,
    },
}

/// A sync and its writer.
#[derive(Clone)]
pub struct SyncWriter {
    /// The sync's id.
    pub sync_id: SyncId,
    /// Its name, for messages.
    pub name: String,
    /// Its writer, or why it has none (with the fix).
    pub writer: Result<Arc<dyn Writer>, String>,
}

impl std::fmt::Debug for SyncWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncWriter")
            .field("sync_id", &self.sync_id)
            .field("name", &self.name)
            .field("writer", &self.writer.as_ref().map(|_| "…"))
            .finish()
    }
}

/// A record's kind in messages (`Error updating customer: …`): the collection's last part
/// (`stripe:customer` → `customer`, `public.orders` → `orders`).
pub fn noun(collection: &CollectionId) -> &str {
    collection
        .0
        .rsplit([':', '.'])
        .next()
        .unwrap_or(&collection.0)
}

/// Where the proxy learns which tables are synced (`sluice serve` answers from what it runs).
#[async_trait]
pub trait Catalog: Send + Sync {
    /// Every table sluice writes on the proxied target, as of now.
    async fn synced_tables(&self) -> Vec<SyncedTable>;

    /// How far consumer `consumer` has applied the stream (`None`: it is not running).
    async fn applied_through(&self, consumer: &ConsumerId) -> Option<Seq>;
}

/// A catalog with no synced tables: everything passes through.
pub struct NoTables;

#[async_trait]
impl Catalog for NoTables {
    async fn synced_tables(&self) -> Vec<SyncedTable> {
        Vec::new()
    }

    async fn applied_through(&self, _consumer: &ConsumerId) -> Option<Seq> {
        None
    }
}

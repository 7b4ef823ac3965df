//! What the proxy knows about the target's tables: which ones sluice writes, for which sync
//! and collection, and how far each consumer writing them has got.

use std::sync::Arc;

use async_trait::async_trait;
use sluice_core::{CollectionId, ConsumerId, Seq, SyncId, Writer};

/// A table sluice writes on the proxied target (a schema-mirror table: one collection).
#[derive(Clone)]
pub struct SyncedTable {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub table: String,
    /// The sync whose records fill it.
    pub sync_id: SyncId,
    /// That sync's name, for messages.
    pub sync: String,
    /// The collection it holds.
    pub collection: CollectionId,
    /// The columns whose values make a record's upstream id, in key order.
    pub key: Vec<String>,
    /// The sync's writer, or why it has none (with the fix).
    pub writer: Result<Arc<dyn Writer>, String>,
    /// The consumers that write it (the proxy waits for them to show a write locally).
    pub consumers: Vec<ConsumerId>,
}

impl SyncedTable {
    /// The record's kind in messages (`Error updating customer: …`): the collection's last
    /// part (`stripe:customer` → `customer`, `public.orders` → `orders`).
    pub fn noun(&self) -> &str {
        self.collection
            .0
            .rsplit([':', '.'])
            .next()
            .unwrap_or(&self.collection.0)
    }
}

impl std::fmt::Debug for SyncedTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncedTable")
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("sync", &self.sync)
            .field("collection", &self.collection)
            .field("key", &self.key)
            .field("writer", &self.writer.as_ref().map(|_| "…"))
            .field("consumers", &self.consumers)
            .finish()
    }
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

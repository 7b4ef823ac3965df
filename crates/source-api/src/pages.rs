//! What an [`Api`](crate::Api) reads: backfill pages and change-feed entries.

use serde::{Deserialize, Serialize};
use sluice_core::{CollectionId, Payload};
use time::OffsetDateTime;

/// One object of a backfill page.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// The object's id upstream (the record's `upstream_id`).
    pub id: String,
    /// The object, as the API gave it.
    pub payload: Payload,
    /// When the object was created upstream (a backfilled row's `upstream_updated_at`).
    pub created: OffsetDateTime,
}

/// One page of a collection, in the API's order.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    /// The objects; the next page is asked for after the last one.
    pub items: Vec<Item>,
    /// Whether more pages follow.
    pub more: bool,
}

/// A position in a provider's change feed: the change's id and time (seconds since the epoch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The change's id (`evt_…`).
    pub id: String,
    /// When it happened, in seconds since the epoch.
    pub at: i64,
}

/// What one change says about an object.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// The object is now this.
    Upsert(Payload),
    /// The object was deleted.
    Delete,
    /// The change does not carry the object in a usable form (rendered at another API
    /// version, or partial): fetch it again.
    Refetch,
}

/// One change of one object, from the feed.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// Which collection (only configured collections are returned).
    pub collection: CollectionId,
    /// The object's id.
    pub id: String,
    /// When the change happened (the record's `upstream_updated_at`).
    pub at: OffsetDateTime,
    /// What it says.
    pub update: Update,
}

/// Changes after a mark, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Changes {
    /// The changes, oldest first, of configured collections only.
    pub changes: Vec<Change>,
    /// The newest change read (ignored or not): the next read starts after it. `None` when
    /// nothing was read.
    pub newest: Option<Mark>,
    /// Whether more changes are already waiting.
    pub more: bool,
}

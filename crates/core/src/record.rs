//! Records and their identity.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Error;

/// The id of one configured source instance (a *sync*).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct SyncId(pub Uuid);

impl SyncId {
    /// A new random sync id.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for SyncId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A kind of record inside a sync: a table `public.orders`, or `stripe:customer`.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct CollectionId(pub String);

/// The record's id in the upstream system (for a Postgres source, its primary key).
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct UpstreamId(pub String);

macro_rules! string_id {
    ($t:ty) => {
        impl From<&str> for $t {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
        impl From<String> for $t {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_id!(CollectionId);
string_id!(UpstreamId);

impl UpstreamId {
    /// The id of a row with these key values (as text, in key order): the value itself for a
    /// one-column key, a JSON array of the values for a composite key. Every source keyed by
    /// columns uses this rule, and the write-back proxy reverses it ([`UpstreamId::key_values`]).
    pub fn from_key(key: &[&str]) -> Self {
        match key {
            [one] => Self((*one).to_owned()),
            many => Self(serde_json::to_string(many).unwrap_or_default()),
        }
    }

    /// The key values this id was made from ([`UpstreamId::from_key`]) for a key of
    /// `columns` columns; `None` when the id is not such a value.
    pub fn key_values(&self, columns: usize) -> Option<Vec<String>> {
        if columns == 1 {
            return Some(vec![self.0.clone()]);
        }
        let values: Vec<String> = serde_json::from_str(&self.0).ok()?;
        (values.len() == columns).then_some(values)
    }
}

/// The identity of a record: `(sync_id, collection_id, upstream_id)`.
///
/// Two records with equal keys are versions of the same record; the records stream holds
/// only the newest of them.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub struct RecordKey {
    /// The sync the record came from.
    pub sync_id: SyncId,
    /// The collection inside that sync.
    pub collection_id: CollectionId,
    /// The record's id upstream.
    pub upstream_id: UpstreamId,
}

/// The namespace of [`RecordKey::row_id`]; fixed forever, since row ids are stored in targets.
const ROW_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5c1c_e000_7a4b_4d8e_9f3a_2b61_d0c8_e1f5);

impl RecordKey {
    /// Builds a key from its three parts.
    pub fn new(
        sync_id: SyncId,
        collection_id: impl Into<CollectionId>,
        upstream_id: impl Into<UpstreamId>,
    ) -> Self {
        Self {
            sync_id,
            collection_id: collection_id.into(),
            upstream_id: upstream_id.into(),
        }
    }

    /// The deterministic row id of this record in a target (the consumer table's
    /// `sequin_id`): a UUIDv5 over the sync id and the length-prefixed collection and
    /// upstream ids, so that no two distinct keys share an encoding.
    ///
    /// It is `Uuid::new_v5(ROW_ID_NAMESPACE, name)`, hashed here with the CPU's SHA
    /// instructions when it has them (uuid's own v5 hashes in software, at about 200 ns a key).
    pub fn row_id(&self) -> Uuid {
        use sha1::Digest;
        let collection = self.collection_id.0.as_bytes();
        let upstream = self.upstream_id.0.as_bytes();
        let mut hash = sha1::Sha1::new();
        hash.update(ROW_ID_NAMESPACE.as_bytes());
        hash.update(self.sync_id.0.as_bytes());
        hash.update((collection.len() as u64).to_be_bytes());
        hash.update(collection);
        hash.update((upstream.len() as u64).to_be_bytes());
        hash.update(upstream);
        let digest = hash.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Builder::from_sha1_bytes(bytes).into_uuid()
    }
}

/// The kind of a source.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Provider {
    /// A PostgreSQL database read through logical replication.
    Postgres,
    /// Records pushed to sluice's HTTP API.
    Http,
    /// Stripe's API (objects listed, then followed through `/v1/events`).
    Stripe,
}

impl Provider {
    /// Every provider, in a stable order.
    pub const ALL: [Provider; 3] = [Provider::Postgres, Provider::Http, Provider::Stripe];

    /// The provider's name as stored and shown (`postgres`, `http`).
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Postgres => "postgres",
            Provider::Http => "http",
            Provider::Stripe => "stripe",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "unknown provider {s:?}; expected one of: {}",
                    Provider::ALL.map(Provider::as_str).join(", ")
                ))
            })
    }
}

/// Orders the changes of one record: a later change has a greater version.
///
/// For a Postgres source `major` is the commit LSN and `minor` the change's index inside
/// its transaction; a backfill row carries the LSN read *before* its snapshot with
/// `minor = 0`, so any change that raced the snapshot wins. Other providers choose their own
/// monotonic scheme. Versions compare lexicographically.
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
pub struct Version {
    /// The primary position (a commit LSN for Postgres sources).
    pub major: u64,
    /// The position inside `major` (the change's index inside its transaction).
    pub minor: u64,
}

impl Version {
    /// A version from its two parts.
    pub const fn new(major: u64, minor: u64) -> Self {
        Self { major, minor }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A record's JSON payload: always a JSON object.
pub type Payload = serde_json::Map<String, serde_json::Value>;

/// What a version of a record says: here is the record now, or it was deleted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Change {
    /// The record exists with this payload.
    Upsert {
        /// The record's fields.
        payload: Payload,
    },
    /// The record was deleted upstream (a *tombstone* in the records stream).
    Delete,
}

impl Change {
    /// An upsert of `value`, which must be a JSON object.
    pub fn upsert(value: serde_json::Value) -> Result<Self, Error> {
        match value {
            serde_json::Value::Object(payload) => Ok(Change::Upsert { payload }),
            other => Err(Error::invalid(format!(
                "a record payload must be a JSON object, got {}",
                json_kind(&other)
            ))),
        }
    }

    /// The payload of an upsert; `None` for a tombstone.
    pub fn payload(&self) -> Option<&Payload> {
        match self {
            Change::Upsert { payload } => Some(payload),
            Change::Delete => None,
        }
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One version of one record, as sources produce it and the stream stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The record's identity.
    pub key: RecordKey,
    /// The kind of source it came from (consumers may filter on it).
    pub provider: Provider,
    /// Orders this change among the record's changes.
    pub version: Version,
    /// When the record last changed upstream (commit time for Postgres sources).
    #[serde(with = "time::serde::rfc3339")]
    pub upstream_updated_at: OffsetDateTime,
    /// The record's content, or its deletion.
    pub change: Change,
}

impl Record {
    /// True when this version says the record was deleted.
    pub fn is_tombstone(&self) -> bool {
        matches!(self.change, Change::Delete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_id_is_deterministic_and_separates_ambiguous_keys() {
        let sync = SyncId(Uuid::from_u128(1));
        let a = RecordKey::new(sync, "ab", "c");
        let b = RecordKey::new(sync, "a", "bc");
        assert_eq!(a.row_id(), RecordKey::new(sync, "ab", "c").row_id());
        assert_ne!(
            a.row_id(),
            b.row_id(),
            "length prefixes keep concatenations apart"
        );
        assert_eq!(a.row_id().get_version_num(), 5);
        // Pinned: row ids are stored in users' tables, so the scheme must never drift.
        assert_eq!(
            RecordKey::new(sync, "public.orders", "42")
                .row_id()
                .to_string(),
            "0f0a2e3b-b21c-5db1-b9d7-d5cc3c17326c"
        );
    }

    /// The row id is uuid's v5 over the length-prefixed name, for keys of every length (one
    /// SHA-1 block and several, empty parts, multi-byte text).
    #[test]
    fn row_id_is_uuid_v5_of_the_length_prefixed_name() {
        let reference = |key: &RecordKey| {
            let mut name = Vec::new();
            name.extend_from_slice(key.sync_id.0.as_bytes());
            name.extend_from_slice(&(key.collection_id.0.len() as u64).to_be_bytes());
            name.extend_from_slice(key.collection_id.0.as_bytes());
            name.extend_from_slice(&(key.upstream_id.0.len() as u64).to_be_bytes());
            name.extend_from_slice(key.upstream_id.0.as_bytes());
            Uuid::new_v5(&ROW_ID_NAMESPACE, &name)
        };
        for (i, collection) in ["", "c", "public.orders", &"x".repeat(200)]
            .iter()
            .enumerate()
        {
            for len in 0..150 {
                let upstream: String = "ké7".chars().cycle().take(len).collect();
                let key = RecordKey::new(
                    SyncId(Uuid::from_u128(i as u128 * 977)),
                    *collection,
                    upstream,
                );
                assert_eq!(key.row_id(), reference(&key), "{key:?}");
            }
        }
    }

    #[test]
    fn versions_order_by_major_then_minor() {
        assert!(Version::new(1, 9) < Version::new(2, 0));
        assert!(Version::new(2, 0) < Version::new(2, 1));
    }

    #[test]
    fn upsert_rejects_non_objects_with_a_reason() {
        let err = Change::upsert(serde_json::json!([1, 2])).unwrap_err();
        assert!(
            err.to_string()
                .contains("must be a JSON object, got an array"),
            "{err}"
        );
    }

    #[test]
    fn provider_round_trips_and_rejects_unknown_names() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>().unwrap(), p);
        }
        let err = "salesforce".parse::<Provider>().unwrap_err();
        assert!(
            err.to_string()
                .contains("expected one of: postgres, http, stripe"),
            "{err}"
        );
    }
}

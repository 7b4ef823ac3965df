//! The push source's request body: a batch of upserts and deletes as JSON.
//!
//! ```json
//! {"records": [
//!   {"collection": "stripe:customer", "id": "cus_1", "payload": {"email": "a@example.com"}},
//!   {"collection": "stripe:customer", "id": "cus_2", "deleted": true, "version": 17}
//! ]}
//! ```
//!
//! A body that is not this shape is refused whole (400, with where and why). Inside a good
//! body each record is checked on its own: the good ones are appended together (one atomic
//! append), the others are listed with their index and reason.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sluice_core::{Change, Provider, Record, RecordKey, SyncId, Version};
use time::OffsetDateTime;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<'a> {
    #[serde(borrow)]
    records: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Pushed {
    collection: String,
    id: String,
    #[serde(default)]
    payload: Option<Value>,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    updated_at: Option<OffsetDateTime>,
}

/// A record refused, and why.
#[derive(Debug, PartialEq, Serialize)]
pub struct Rejected {
    /// Its position in the body's `records`, from 0.
    pub index: usize,
    /// Why it was refused.
    pub reason: String,
}

/// Longest `collection` or `id`, in bytes.
const MAX_ID: usize = 1024;

/// Records parsed at a time: a large body never has all its records parsed at once.
const CHUNK: usize = 2000;

/// A push body of the right shape; its records are parsed as they are taken.
pub struct PushBody<'a> {
    records: Vec<&'a RawValue>,
}

/// Checks a push body's shape. Errors are for the whole body.
pub fn parse(body: &[u8]) -> Result<PushBody<'_>, String> {
    let body: Body = serde_json::from_slice(body)
        .map_err(|e| format!("the body must be {{\"records\": [ … ]}} in JSON: {e}"))?;
    Ok(PushBody {
        records: body.records,
    })
}

impl<'a> PushBody<'a> {
    /// How many records the body holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the body holds no records (`{"records": []}`).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records for `sync_id`, parsed [`CHUNK`] at a time. Those without a version get
    /// `base + index` (`base` from a strictly increasing clock). The refused ones are kept
    /// in [`Records::rejected`] with their index and reason.
    pub fn records(self, sync_id: SyncId, base: u64) -> Records<'a> {
        Records {
            raw: self.records.into_iter().enumerate(),
            sync_id,
            base,
            now: OffsetDateTime::now_utc(),
            accepted: 0,
            rejected: Vec::new(),
        }
    }
}

/// The records of a push body, chunk by chunk.
pub struct Records<'a> {
    raw: std::iter::Enumerate<std::vec::IntoIter<&'a RawValue>>,
    sync_id: SyncId,
    base: u64,
    now: OffsetDateTime,
    /// Records handed out so far.
    pub accepted: usize,
    /// Records refused so far, with why.
    pub rejected: Vec<Rejected>,
}

impl Iterator for Records<'_> {
    type Item = Vec<Record>;

    fn next(&mut self) -> Option<Vec<Record>> {
        let mut chunk = Vec::new();
        for (index, raw) in self.raw.by_ref() {
            let version = Version::new(self.base + index as u64, 0);
            match record(raw, self.sync_id, version, self.now) {
                Ok(r) => chunk.push(r),
                Err(reason) => self.rejected.push(Rejected { index, reason }),
            }
            if chunk.len() == CHUNK {
                break;
            }
        }
        self.accepted += chunk.len();
        (!chunk.is_empty()).then_some(chunk)
    }
}

fn record(
    raw: &RawValue,
    sync_id: SyncId,
    default_version: Version,
    now: OffsetDateTime,
) -> Result<Record, String> {
    let pushed: Pushed = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
    for (field, text) in [("collection", &pushed.collection), ("id", &pushed.id)] {
        if text.is_empty() {
            return Err(format!("{field} is empty"));
        }
        if text.len() > MAX_ID {
            return Err(format!("{field} is longer than {MAX_ID} bytes"));
        }
        if text.contains('\0') {
            return Err(format!("{field} contains a NUL character (\\u0000)"));
        }
    }
    let change = match (pushed.deleted, pushed.payload) {
        (true, None) => Change::Delete,
        (true, Some(_)) => return Err("a deleted record has no payload".into()),
        (false, None) => return Err("payload is missing (or set \"deleted\": true)".into()),
        (false, Some(payload)) => Change::upsert(payload).map_err(|e| e.to_string())?,
    };
    let version = match pushed.version {
        Some(v) if v > i64::MAX as u64 => return Err("version must be below 2^63".into()),
        Some(v) => Version::new(v, 0),
        None => default_version,
    };
    Ok(Record {
        key: RecordKey::new(sync_id, pushed.collection, pushed.id),
        provider: Provider::Http,
        version,
        upstream_updated_at: pushed.updated_at.unwrap_or(now),
        change,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const SYNC: SyncId = SyncId(Uuid::from_u128(9));

    #[test]
    fn good_records_pass_and_bad_ones_are_listed_with_reasons() {
        let body = br#"{"records": [
            {"collection": "c", "id": "1", "payload": {"a": "x\u0000y"}},
            {"collection": "c", "id": "2", "deleted": true, "version": 7},
            {"collection": "c", "id": "", "payload": {}},
            {"collection": "c", "id": "3", "payload": [1]},
            {"collection": "c", "id": "4"},
            {"collection": "c\u0000", "id": "5", "payload": {}},
            {"collection": "c", "id": "6", "payload": {}, "surprise": 1}
        ]}"#;
        let mut parsed = parse(body).unwrap().records(SYNC, 100);
        let records: Vec<Record> = parsed.by_ref().flatten().collect();
        assert_eq!(records.len(), 2);
        assert_eq!(parsed.accepted, 2);
        assert_eq!(records[0].version, Version::new(100, 0));
        assert_eq!(
            records[0].change.payload().unwrap()["a"],
            "x\u{0}y",
            "NUL inside a payload is kept; the target decides how to store it"
        );
        assert!(records[1].is_tombstone());
        assert_eq!(records[1].version, Version::new(7, 0));
        let reasons: Vec<(usize, &str)> = parsed
            .rejected
            .iter()
            .map(|r| (r.index, r.reason.as_str()))
            .collect();
        assert_eq!(reasons[0], (2, "id is empty"));
        assert!(
            reasons[1].1.contains("must be a JSON object"),
            "{reasons:?}"
        );
        assert!(reasons[2].1.contains("payload is missing"), "{reasons:?}");
        assert!(reasons[3].1.contains("NUL"), "{reasons:?}");
        assert!(
            reasons[4].1.contains("unknown field `surprise`"),
            "{reasons:?}"
        );
    }

    #[test]
    fn a_malformed_body_is_refused_whole_with_where_and_why() {
        let err = parse(b"{\"records\": [").err().unwrap();
        assert!(err.contains("line 1 column"), "{err}");
        let err = parse(b"[]").err().unwrap();
        assert!(err.contains("{\"records\""), "{err}");
    }
}

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
use sluice_core::{Change, Provider, Record, RecordKey, SyncId, Version};
use time::OffsetDateTime;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    records: Vec<Value>,
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
    pub index: usize,
    pub reason: String,
}

/// The records to append and the ones refused.
#[derive(Debug)]
pub struct Parsed {
    pub records: Vec<Record>,
    pub rejected: Vec<Rejected>,
}

/// Longest `collection` or `id`, in bytes.
const MAX_ID: usize = 1024;

/// Parses a push body for `sync_id`. `versions` hands out a strictly increasing base version
/// for records that carry none (they get `base + index`). Errors are for the whole body.
pub fn parse(
    body: &[u8],
    sync_id: SyncId,
    versions: impl FnOnce(usize) -> u64,
) -> Result<Parsed, String> {
    let body: Body = serde_json::from_slice(body)
        .map_err(|e| format!("the body must be {{\"records\": [ … ]}} in JSON: {e}"))?;
    let base = versions(body.records.len());
    let now = OffsetDateTime::now_utc();
    let mut records = Vec::with_capacity(body.records.len());
    let mut rejected = Vec::new();
    for (index, value) in body.records.into_iter().enumerate() {
        match record(value, sync_id, Version::new(base + index as u64, 0), now) {
            Ok(r) => records.push(r),
            Err(reason) => rejected.push(Rejected { index, reason }),
        }
    }
    Ok(Parsed { records, rejected })
}

fn record(
    value: Value,
    sync_id: SyncId,
    default_version: Version,
    now: OffsetDateTime,
) -> Result<Record, String> {
    let pushed: Pushed = serde_json::from_value(value).map_err(|e| e.to_string())?;
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
        let parsed = parse(body, SYNC, |_| 100).unwrap();
        assert_eq!(parsed.records.len(), 2);
        assert_eq!(parsed.records[0].version, Version::new(100, 0));
        assert_eq!(
            parsed.records[0].change.payload().unwrap()["a"],
            "x\u{0}y",
            "NUL inside a payload is kept; the target decides how to store it"
        );
        assert!(parsed.records[1].is_tombstone());
        assert_eq!(parsed.records[1].version, Version::new(7, 0));
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
        let err = parse(b"{\"records\": [", SYNC, |_| 1).unwrap_err();
        assert!(err.contains("line 1 column"), "{err}");
        let err = parse(b"[]", SYNC, |_| 1).unwrap_err();
        assert!(err.contains("{\"records\""), "{err}");
    }
}

//! The writer: the part of a source that applies a change upstream, for the write-back proxy.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;

use crate::{CollectionId, Record, RecordKey, UpstreamId, Version};

/// One column's value in a change: PostgreSQL's text for it (what `::text` prints with
/// `DateStyle = ISO`, `IntervalStyle = postgres`, `TimeZone = UTC`, `bytea_output = hex` and
/// shortest-exact floats; `None` is SQL `NULL`) and the column's type as `format_type` prints
/// it (`bigint`, `timestamp with time zone`, `jsonb`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// The value as text; `None` for `NULL`.
    pub text: Option<String>,
    /// The column's type.
    pub sql_type: String,
}

impl Column {
    /// The value as JSON, exactly: numbers keep their digits, `json`/`jsonb` are parsed,
    /// booleans are `true`/`false`, everything else (timestamps included) is a string.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        let Some(text) = &self.text else {
            return Value::Null;
        };
        let number = matches!(
            self.sql_type.as_str(),
            "smallint" | "integer" | "bigint" | "real" | "double precision"
        ) || self.sql_type.starts_with("numeric");
        match self.sql_type.as_str() {
            "boolean" => Value::Bool(text == "t" || text == "true"),
            "json" | "jsonb" => {
                serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
            }
            _ if number => serde_json::from_str::<serde_json::Number>(text)
                .map(Value::Number)
                .unwrap_or_else(|_| Value::String(text.clone())),
            _ => Value::String(text.clone()),
        }
    }
}

/// A row's columns by name.
pub type Columns = BTreeMap<String, Column>;

/// One row's change, as a client wrote it to a synced table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamChange {
    /// A new record with these columns (the ones the statement named; the upstream fills the
    /// rest, its id included when not given).
    Insert {
        /// The columns given.
        values: Columns,
    },
    /// New values for some columns of an existing record.
    Update {
        /// The record.
        id: UpstreamId,
        /// Only the columns the statement sets.
        values: Columns,
    },
    /// The record is deleted.
    Delete {
        /// The record.
        id: UpstreamId,
    },
}

impl UpstreamChange {
    /// `insert`, `update` or `delete`.
    pub fn verb(&self) -> &'static str {
        match self {
            UpstreamChange::Insert { .. } => "insert",
            UpstreamChange::Update { .. } => "update",
            UpstreamChange::Delete { .. } => "delete",
        }
    }
}

/// What an upstream did with the changes it accepted, so the proxy can show them locally.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Written {
    /// The upstream's resulting state of each record, for the proxy to append to the records
    /// stream (sources whose own feed would bring the change back only later, if at all). The
    /// version is the lowest the change may have (an upstream clock's second, minor 0); the
    /// proxy raises it to just above the stream's current version of the record when that is
    /// not lower, so the write shows at once and the source's next change still wins.
    pub records: Vec<Record>,
    /// Changes the source's own feed brings into the stream (a PostgreSQL source's
    /// replication): the stream holds each of them once it holds the key at this version or a
    /// later one.
    pub arriving: Vec<(RecordKey, Version)>,
    /// Each accepted change's record id, in order (an insert's new id included).
    pub ids: Vec<UpstreamId>,
}

/// Why an upstream did not take a change.
#[derive(Clone, PartialEq, Eq)]
pub struct WriteRefused {
    /// What kind of refusal.
    pub kind: RefusalKind,
    /// The upstream's message (`INVALID EMAIL ADDRESS`), or sluice's when it refused first.
    pub message: String,
    /// The upstream's own error code, when it gave one (`email_invalid`, a SQLSTATE).
    pub code: Option<String>,
}

/// The kinds of [`WriteRefused`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// The upstream rejected the change (validation, a constraint, a missing record).
    Rejected,
    /// A column the upstream cannot write (named in the message).
    ReadOnlyColumn,
    /// The upstream could not be reached or failed; the change may or may not have been
    /// applied (the message says which is known).
    Unavailable,
    /// The writer is not set up (no writer connection or webhook configured, or missing
    /// privileges); the message carries the fix.
    NotConfigured,
}

impl fmt::Debug for WriteRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteRefused")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("code", &self.code)
            .finish()
    }
}

impl WriteRefused {
    /// A refusal of `kind`.
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            code: None,
        }
    }

    /// With the upstream's own code.
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }
}

/// The result of [`Writer::apply`]: what was accepted (a prefix of the changes, in order), and
/// why the rest was not.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOutcome {
    /// The accepted changes' results.
    pub written: Written,
    /// How many changes were accepted (the first `applied` of them).
    pub applied: usize,
    /// Why change number `applied` was refused (and the rest not tried), if one was.
    pub refused: Option<WriteRefused>,
}

/// Applies changes upstream and says what the upstream made of them: the write-back proxy's
/// way to a source ([`crate::Source::writer`]).
///
/// Contract every implementation keeps:
/// - **Upstream first, in order.** Changes are applied in the order given; the first refusal
///   stops the rest, and the outcome says how many were applied before it.
/// - **Safe to retry.** A change sent again after an unclear failure is applied once (an
///   idempotency key, a transaction).
/// - **Says what it did.** [`Written`] holds what the proxy needs to show the accepted
///   changes locally: the records to append, or the versions the source's own feed will bring.
/// - **Least privilege.** It writes with credentials meant for writing (a writer role, the
///   provider's key), never with the sync user's.
#[async_trait]
pub trait Writer: Send + Sync {
    /// The most rows one statement may write, unless the proxy's config says otherwise.
    fn max_rows_per_statement(&self) -> u64 {
        1_000
    }

    /// Columns of `collection` the upstream cannot set in `change` (`insert`, `update`); a
    /// statement setting one is refused before anything is sent.
    fn read_only_columns(&self, collection: &CollectionId, verb: &str) -> Vec<String> {
        let _ = (collection, verb);
        Vec::new()
    }

    /// Applies `changes` to `collection` upstream (see the contract above).
    async fn apply(&self, collection: &CollectionId, changes: &[UpstreamChange]) -> WriteOutcome;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: Option<&str>, sql_type: &str) -> String {
        Column {
            text: text.map(str::to_owned),
            sql_type: sql_type.into(),
        }
        .to_json()
        .to_string()
    }

    #[test]
    fn values_become_json_without_losing_a_digit() {
        // Beyond 2^64, 40 significant digits, a float's shortest exact text: kept digit for digit.
        assert_eq!(
            json(Some("123456789012345678901234567890"), "numeric"),
            "123456789012345678901234567890"
        );
        assert_eq!(
            json(
                Some("1234567890123456789012345678901234567.891"),
                "numeric(40,3)"
            ),
            "1234567890123456789012345678901234567.891"
        );
        assert_eq!(
            json(Some("0.30000000000000004"), "double precision"),
            "0.30000000000000004"
        );
        assert_eq!(
            json(Some("-9223372036854775808"), "bigint"),
            "-9223372036854775808"
        );
        // What JSON has no number for stays the server's text.
        for special in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(
                json(Some(special), "double precision"),
                format!("\"{special}\"")
            );
        }
        assert_eq!(json(Some("NaN"), "numeric"), "\"NaN\"");
        // Text, NUL-free unicode, json as parsed, booleans, NULL.
        assert_eq!(json(Some("ünï ✓ \u{1F600}"), "text"), "\"ünï ✓ \u{1F600}\"");
        assert_eq!(
            json(Some(r#"{"ключ": [1.50, null]}"#), "jsonb"),
            r#"{"ключ":[1.50,null]}"#
        );
        assert_eq!(json(Some("t"), "boolean"), "true");
        assert_eq!(json(None, "integer"), "null");
    }
}

//! SQLSTATEs sluice sends as a server (the write-back proxy), by name. Codes sluice receives are
//! matched only in the classifier ([`crate::condition`]).

/// 08P01: the client broke the protocol (a malformed or oversized message).
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// 08006: the connection to the server behind the proxy failed.
pub const CONNECTION_FAILURE: &str = "08006";
/// 28000: the login cannot proceed this way (a method the proxy does not relay).
pub const INVALID_AUTHORIZATION: &str = "28000";
/// 0A000: a statement form the proxy does not support.
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// 25000: not allowed in the transaction's current state (a synced-table write in `BEGIN`).
pub const INVALID_TRANSACTION_STATE: &str = "25000";
/// 42501: the client's role may not do this.
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
/// 54000: over a configured limit (rows per statement).
pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
/// 55000: an object is not in a state that allows this (a read-only column).
pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
/// P0001: the upstream system refused the change (its message follows).
pub const RAISE_EXCEPTION: &str = "P0001";
/// 57014: the statement was canceled.
pub const QUERY_CANCELED: &str = "57014";
/// 428C9: a column that cannot be written (the upstream sets it).
pub const GENERATED_ALWAYS: &str = "428C9";
/// 22023: a value the upstream refused.
pub const INVALID_PARAMETER_VALUE: &str = "22023";
/// 01000: a warning.
pub const WARNING: &str = "01000";

/// An upstream PostgreSQL's own SQLSTATE, passed on when it refused a change (`23505`).
/// Anything that is not five letters or digits becomes [`INVALID_PARAMETER_VALUE`].
pub fn from_upstream(code: &str) -> &'static str {
    // The codes a client may act on, kept as they are; the rest by class.
    const KEPT: &[&str] = &[
        "23505", "23503", "23502", "23514", "23P01", "22001", "22003", "22007", "22008", "22P02",
        "42501", "40001", "40P01", "55P03",
    ];
    if let Some(code) = KEPT.iter().find(|k| **k == code) {
        return code;
    }
    match code.get(..2) {
        Some("23") => "23000",
        Some("22") => "22000",
        Some("42") => "42000",
        Some("40") => "40000",
        _ => INVALID_PARAMETER_VALUE,
    }
}
/// 00000: for a notice that reports, not warns.
pub const SUCCESSFUL_COMPLETION: &str = "00000";

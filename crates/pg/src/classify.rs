//! SQLSTATE → [`Condition`] → [`Error`] (with its class), in one place.

use sluice_core::Error;
use sqlx::error::DatabaseError;

/// What a server error means for the caller, by SQLSTATE (PostgreSQL's appendix A).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// The connection or the server is not available now (class 08, 57, 53, 58): retry.
    Unavailable,
    /// The statement lost a race and will pass when tried again: a deadlock or serialization
    /// failure (class 40), a lock not available (55P03), an invalid transaction state (25).
    Transient,
    /// Another session changed the same catalog rows at the same moment (a unique violation on
    /// a `pg_` catalog index, `tuple concurrently updated`): retry.
    CatalogRace,
    /// The role lacks a privilege (42501): the user must grant it.
    InsufficientPrivilege,
    /// The login was refused (class 28).
    Authentication,
    /// A database, schema, table, column or function that is needed does not exist (3D000,
    /// 3F000, 42P01, 42703, 42883, 42704).
    UndefinedObject,
    /// An object exists with another shape than needed (42804, 42P10, 42809), or a feature
    /// the statement needs is not supported by this server or object (class 0A).
    WrongShape,
    /// A unique constraint of the user's refused the row (23505): a key written meanwhile by
    /// someone else, which a caller may take as a lost race (its fallback path).
    DuplicateKey,
    /// Any other constraint refused the row (class 23).
    IntegrityViolation,
    /// The data itself cannot be stored (class 22: out of range, invalid text, bad encoding).
    DataException,
    /// A limit of the server was hit by this data (class 54: a row or value too large).
    ProgramLimit,
    /// An object another session holds (55006: a replication slot another process reads).
    InUse,
    /// A write in a read-only transaction (25006): a standby, `default_transaction_read_only`,
    /// or a function that writes called where sluice only reads.
    ReadOnly,
    /// Anything else (an internal error, an unknown code): retried with backoff.
    Other,
}

/// The condition a server error with `code` (and the constraint it names, and its message)
/// means.
pub fn condition(code: &str, constraint: Option<&str>, message: &str) -> Condition {
    let class = code.get(..2).unwrap_or_default();
    match (class, code) {
        (_, "42501") => Condition::InsufficientPrivilege,
        (_, "55P03") => Condition::Transient,
        (_, "55006") => Condition::InUse,
        (_, "25006") => Condition::ReadOnly,
        (_, "3D000" | "3F000" | "42P01" | "42703" | "42883" | "42704") => {
            Condition::UndefinedObject
        }
        (_, "42804" | "42P10" | "42809") => Condition::WrongShape,
        ("23", _) if constraint.is_some_and(|c| c.starts_with("pg_")) => Condition::CatalogRace,
        (_, "23505") => Condition::DuplicateKey,
        ("XX", _) if message.contains("concurrently") => Condition::CatalogRace,
        ("08" | "57" | "53" | "58", _) => Condition::Unavailable,
        ("40" | "25", _) => Condition::Transient,
        ("28", _) => Condition::Authentication,
        ("0A", _) => Condition::WrongShape,
        ("23", _) => Condition::IntegrityViolation,
        ("22", _) => Condition::DataException,
        ("54", _) => Condition::ProgramLimit,
        _ => Condition::Other,
    }
}

impl Condition {
    /// The condition of a server error; `None` for errors the server did not send (a lost
    /// connection, a timeout, bad settings).
    pub fn of(error: &sqlx::Error) -> Option<Condition> {
        let db = error.as_database_error()?;
        Some(condition(
            db.code().as_deref().unwrap_or_default(),
            db.constraint(),
            db.message(),
        ))
    }
}

/// The one classifier: `error`, met while doing `what`, as an [`Error`] of the right class.
/// `explain` may answer for a condition the caller knows more about (its exact fix); for the
/// rest the defaults below apply, and each `Configuration` error carries a real fix.
pub fn classify(
    error: sqlx::Error,
    what: &str,
    explain: impl FnOnce(Condition, &dyn DatabaseError) -> Option<Error>,
) -> Error {
    let db = match &error {
        sqlx::Error::Database(db) => db,
        sqlx::Error::Configuration(e) => {
            return Error::configuration(
                format!("{what}: the connection settings are not valid: {e}"),
                "correct the connection settings (`sluice config check` points at them)",
            );
        }
        _ => return Error::unavailable(format!("{what}: the connection failed"), error),
    };
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    let message = db.message().to_owned();
    let found = condition(&code, db.constraint(), &message);
    if let Some(explained) = explain(found, db.as_ref()) {
        return explained;
    }
    match found {
        Condition::Unavailable
        | Condition::Transient
        | Condition::CatalogRace
        | Condition::InUse
        | Condition::Other => {
            Error::unavailable(format!("{what} (SQLSTATE {code}); retrying"), error)
        }
        Condition::InsufficientPrivilege => Error::configuration(
            format!("{what}: permission denied: {message}"),
            "grant sluice's role the privilege the message names; `sluice check` lists every missing grant with its statement",
        ),
        Condition::Authentication => Error::configuration(
            format!("{what}: the server refused the login: {message}"),
            "check the user and password sluice is configured with; `sluice check` tries the login",
        ),
        Condition::ReadOnly => Error::configuration(
            format!("{what}: {message} (SQLSTATE {code})"),
            "a write was refused in a read-only transaction: if the server is a standby, point sluice at the primary; if the role defaults to read-only, alter role … set default_transaction_read_only = off; if a function or policy writes while sluice reads, make it read-only",
        ),
        Condition::UndefinedObject | Condition::WrongShape => Error::configuration(
            format!("{what}: {message} (SQLSTATE {code})"),
            "run `sluice check`: it shows what is missing or different and the statement that fixes it",
        ),
        Condition::DuplicateKey
        | Condition::IntegrityViolation
        | Condition::DataException
        | Condition::ProgramLimit => Error::invalid(format!(
            "{what}: the server refused the data: {message} (SQLSTATE {code})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::ErrorClass;

    /// Every SQLSTATE class of PostgreSQL's appendix A maps to exactly one condition.
    #[test]
    fn every_sqlstate_class_maps_once() {
        let classes = [
            ("00000", Condition::Other),
            ("01000", Condition::Other),
            ("02000", Condition::Other),
            ("03000", Condition::Other),
            ("08006", Condition::Unavailable),
            ("09000", Condition::Other),
            ("0A000", Condition::WrongShape),
            ("0B000", Condition::Other),
            ("0F000", Condition::Other),
            ("0L000", Condition::Other),
            ("0P000", Condition::Other),
            ("0Z000", Condition::Other),
            ("20000", Condition::Other),
            ("21000", Condition::Other),
            ("22003", Condition::DataException),
            ("23505", Condition::DuplicateKey),
            ("23503", Condition::IntegrityViolation),
            ("24000", Condition::Other),
            ("25P02", Condition::Transient),
            ("25006", Condition::ReadOnly),
            ("26000", Condition::Other),
            ("27000", Condition::Other),
            ("28P01", Condition::Authentication),
            ("2B000", Condition::Other),
            ("2D000", Condition::Other),
            ("2F000", Condition::Other),
            ("34000", Condition::Other),
            ("38000", Condition::Other),
            ("39000", Condition::Other),
            ("3B000", Condition::Other),
            ("3D000", Condition::UndefinedObject),
            ("3F000", Condition::UndefinedObject),
            ("40P01", Condition::Transient),
            ("40001", Condition::Transient),
            ("42501", Condition::InsufficientPrivilege),
            ("42P01", Condition::UndefinedObject),
            ("42804", Condition::WrongShape),
            ("42601", Condition::Other),
            ("44000", Condition::Other),
            ("53100", Condition::Unavailable),
            ("54000", Condition::ProgramLimit),
            ("55P03", Condition::Transient),
            ("55000", Condition::Other),
            ("55006", Condition::InUse),
            ("57P01", Condition::Unavailable),
            ("58030", Condition::Unavailable),
            ("72000", Condition::Other),
            ("F0000", Condition::Other),
            ("HV000", Condition::Other),
            ("P0001", Condition::Other),
            ("XX000", Condition::Other),
        ];
        for (code, expected) in classes {
            assert_eq!(condition(code, None, ""), expected, "{code}");
        }
        // Catalog races are told from user data by the constraint or the message.
        assert_eq!(
            condition("23505", Some("pg_type_typname_nsp_index"), ""),
            Condition::CatalogRace
        );
        assert_eq!(
            condition("XX000", None, "tuple concurrently updated"),
            Condition::CatalogRace
        );
    }

    #[test]
    fn connection_failures_retry_and_bad_settings_need_a_fix() {
        let lost = classify(sqlx::Error::PoolTimedOut, "reading", |_, _| None);
        assert_eq!(lost.class(), ErrorClass::Retry);
        let bad = classify(
            sqlx::Error::Configuration("bad port".into()),
            "connecting",
            |_, _| None,
        );
        assert_eq!(bad.class(), ErrorClass::FixConfiguration);
        assert!(bad.fix().is_some_and(|f| f.contains("sluice config check")));
    }
}

//! Errors classified by what the caller should do about them.

use std::fmt;

/// What a caller should do with an error. Retry loops consult this in one place
/// ([`crate::Backoff`] and the consumer runtime), never at each call site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The condition is expected to pass (a target restarting, a network blip): try again
    /// later with backoff. Nothing was written.
    Retry,
    /// The user must change something (a grant, a password, a setting); retrying without
    /// that change will fail the same way. The message says what to change.
    FixConfiguration,
    /// The input or the state is wrong in a way retrying or reconfiguring will not fix
    /// (malformed data, a broken invariant). Stop and report.
    GiveUp,
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorClass::Retry => "will retry",
            ErrorClass::FixConfiguration => "needs a configuration change",
            ErrorClass::GiveUp => "cannot continue",
        })
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error type of the core contracts. Crates keep their own `thiserror` enums and
/// convert into this at trait boundaries, choosing the class.
///
/// Messages never contain secrets: callers build them from names and settings, not
/// from credentials.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Something needed is temporarily unavailable; retry later.
    #[error("{what}{}", source_suffix(.source))]
    Unavailable {
        /// What could not be reached or done, for a person to read.
        what: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Source>,
    },
    /// The user must change configuration; `fix` says exactly what to run or set.
    #[error("{problem}\n  fix: {fix}")]
    Configuration {
        /// What is wrong.
        problem: String,
        /// What to do about it (a command, a setting, the SQL to run).
        fix: String,
    },
    /// Bad input or a broken invariant; retrying will not help.
    #[error("{0}")]
    Invalid(String),
}

fn source_suffix(source: &Option<Source>) -> String {
    source
        .as_ref()
        .map(|s| format!(": {s}"))
        .unwrap_or_default()
}

impl Error {
    /// A retryable error with its cause.
    pub fn unavailable(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Unavailable {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// An error the user fixes by changing configuration.
    pub fn configuration(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Error::Configuration {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// An error in the input or state that retrying will not fix.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }

    /// What the caller should do.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Unavailable { .. } => ErrorClass::Retry,
            Error::Configuration { .. } => ErrorClass::FixConfiguration,
            Error::Invalid(_) => ErrorClass::GiveUp,
        }
    }

    /// The fix to show the user, when there is one.
    pub fn fix(&self) -> Option<&str> {
        match self {
            Error::Configuration { fix, .. } => Some(fix),
            _ => None,
        }
    }

    /// What is wrong, without the fix: for reports and health checks that show the fix on
    /// its own ([`fix`](Error::fix)). `Display` gives both.
    pub fn problem(&self) -> String {
        match self {
            Error::Configuration { problem, .. } => problem.clone(),
            other => other.to_string(),
        }
    }
}

/// `Result` with the core [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_to_what_the_caller_should_do() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let retry = Error::unavailable("target \"warehouse\" is unreachable", io);
        assert_eq!(retry.class(), ErrorClass::Retry);
        assert_eq!(
            retry.to_string(),
            "target \"warehouse\" is unreachable: refused"
        );

        let fix = Error::configuration(
            "sluice cannot create schemas in database \"app\"",
            "grant connect, create on database \"app\" to sluice;",
        );
        assert_eq!(fix.class(), ErrorClass::FixConfiguration);
        assert_eq!(
            fix.fix(),
            Some("grant connect, create on database \"app\" to sluice;")
        );
        assert!(fix.to_string().contains("\n  fix: grant connect"));

        assert_eq!(
            Error::invalid("payload is not an object").class(),
            ErrorClass::GiveUp
        );
    }

    #[test]
    fn the_problem_is_the_message_without_its_fix() {
        let e = Error::configuration("no grant", "grant select on t to u;");
        assert_eq!(e.problem(), "no grant");
        assert_eq!(e.to_string(), "no grant\n  fix: grant select on t to u;");
        assert_eq!(Error::invalid("bad").problem(), "bad");
    }
}

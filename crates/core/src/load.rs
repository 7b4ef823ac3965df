//! Loading `sluice.toml`: `${VAR}` and `${VAR:-default}` interpolation, and errors that say
//! where (file, line, column) and what was expected.
//!
//! Errors never quote the file's text: a line may hold a value interpolated from the
//! environment, so only positions and the parser's description are shown.

use std::fmt;
use std::path::Path;

use crate::Config;
use crate::text::{closest, suggestion};

/// The most parallel backfill readers a Postgres source may ask for.
pub const MAX_BACKFILL_READERS: usize = 16;

/// The most connections a consumer table may be written through.
pub const MAX_WRITE_CONNECTIONS: usize = 16;

/// A config file that cannot be used, located in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (as given).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong and what was expected.
    pub message: String,
    /// What to change.
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                write!(f, "{}:{line}:{column}: {}", self.file, self.message)?
            }
            _ => write!(f, "{}: {}", self.file, self.message)?,
        }
        write!(f, "\n  fix: {}", self.fix)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and parses a config file, substituting environment variables.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            column: None,
            message: format!("cannot read it: {e}"),
            fix: "check the path, or write a starter file with `sluice init`".into(),
        })?;
        Config::parse(&text, &file, |name| std::env::var(name).ok())
    }

    /// Parses config text; `env` looks variables up (`std::env::var` in [`Config::load`]).
    pub fn parse(
        text: &str,
        file: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let at = |offset: Option<usize>, (message, fix): (String, String)| {
            let (line, column) = match offset {
                Some(offset) => {
                    let (line, column) = line_column(text, offset);
                    (Some(line), Some(column))
                }
                None => (None, None),
            };
            ConfigError {
                file: file.to_owned(),
                line,
                column,
                message,
                fix,
            }
        };
        // The shape is checked on the text as written (placeholders are strings), so every
        // mistake has a position.
        if let Err(e) = toml::from_str::<Config>(text) {
            let offset = e.span().map(|s| s.start);
            return Err(at(offset, explain(e.message().trim(), text, offset)));
        }
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            at(offset, explain(e.message(), text, offset))
        })?;
        for (_, value) in table.iter_mut() {
            substitute(value, &env)
                .map_err(|(placeholder, problem)| at(text.find(&placeholder), problem))?;
        }
        toml::Value::Table(table).try_into::<Config>().map_err(|e| {
            at(
                None,
                (
                    format!(
                        "after substituting environment variables: {}",
                        e.message().trim()
                    ),
                    "check the values the environment variables hold".to_owned(),
                ),
            )
        })
    }
}

/// The 1-based line and column (in characters) of a byte offset into `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Replaces `${NAME}` / `${NAME:-default}` in every string; `$$` is a literal `$`. On error,
/// returns the placeholder (to locate it) and the message.
fn substitute(
    value: &mut toml::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), BadPlaceholder> {
    match value {
        toml::Value::String(s) if s.contains('$') => *s = interpolate(s, env)?,
        toml::Value::Array(items) => items.iter_mut().try_for_each(|v| substitute(v, env))?,
        toml::Value::Table(table) => table.iter_mut().try_for_each(|(_, v)| substitute(v, env))?,
        _ => {}
    }
    Ok(())
}

/// A placeholder that cannot be substituted: the placeholder (to locate it), what is wrong,
/// and the fix.
type BadPlaceholder = (String, (String, String));

fn interpolate(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, BadPlaceholder> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let end = after.find('}').ok_or_else(|| {
                (
                    "${".to_owned(),
                    (
                        "a `${` is not closed by `}`".to_owned(),
                        "close it, or write `$$` for a literal dollar sign".to_owned(),
                    ),
                )
            })?;
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err((
                    format!("${{{inner}"),
                    (
                        format!("`${{{inner}}}` is not a variable name"),
                        "use letters, digits and _ (write `$$` for a literal dollar sign)"
                            .to_owned(),
                    ),
                ));
            }
            match (env(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err((
                        format!("${{{name}"),
                        (
                            format!("environment variable {name} is not set"),
                            format!(
                                "export {name}=… before running sluice, or give a default with ${{{name}:-value}}"
                            ),
                        ),
                    ));
                }
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// A parser's message with its fix: an unknown key gets the closest known one, and a sync
/// without an `id` gets why it needs one and a fresh one to paste.
fn explain(message: &str, text: &str, offset: Option<usize>) -> (String, String) {
    let message = message.trim();
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((unknown, expected)) = rest.split_once('`')
    {
        let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        if let Some(best) = closest(unknown, known.iter().copied()) {
            return (message.to_owned(), format!("did you mean `{best}`?"));
        }
    }
    let in_sync_table = offset.is_some_and(|o| {
        let o = o.min(text.len());
        let before = &text[..o];
        text[o..].trim_start().starts_with("[[sync]]")
            || before
                .rfind("[[")
                .is_some_and(|i| before[i..].starts_with("[[sync]]"))
    });
    if message.contains("missing field `id`") && in_sync_table {
        return (
            "this [[sync]] has no `id`. It is a UUID that names the sync's records for good: records, \
             checkpoints and consumer rows are keyed by it, so it must never change (a new id makes \
             every record new)"
                .to_owned(),
            format!(
                "add  id = \"{}\"  (freshly generated; keep it)",
                uuid::Uuid::new_v4()
            ),
        );
    }
    (
        message.to_owned(),
        "correct it at that position; `sluice config schema` lists every key and its type"
            .to_owned(),
    )
}

/// A mistake in a config that the parser could not see, with its fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong.
    pub message: String,
    /// What to change.
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n  fix: {}", self.message, self.fix)
    }
}

fn problem(message: String, fix: impl Into<String>) -> Problem {
    Problem {
        message,
        fix: fix.into(),
    }
}

impl Config {
    /// Problems a parser cannot see: duplicate names, consumers naming an unknown target or
    /// sync. Empty when the config is consistent.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.targets {
            if !seen.insert(("target", t.name.clone())) {
                problems.push(problem(
                    format!("two targets are named {:?}", t.name),
                    "give each [[target]] its own name",
                ));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for s in &self.syncs {
            if !seen.insert(("sync", s.name.clone())) {
                problems.push(problem(
                    format!("two syncs are named {:?}", s.name),
                    "give each [[sync]] its own name",
                ));
            }
            if let crate::SourceConfig::Postgres {
                backfill_readers: Some(readers),
                ..
            } = &s.source
                && !(1..=MAX_BACKFILL_READERS).contains(readers)
            {
                problems.push(problem(
                    format!(
                        "sync {:?} asks for {readers} backfill readers",
                        s.name
                    ),
                    format!(
                        "set backfill_readers between 1 and {MAX_BACKFILL_READERS} (each is one more connection to the source)"
                    ),
                ));
            }
            if !ids.insert(s.id) {
                problems.push(problem(
                    format!("sync {:?} reuses the id {} of another sync", s.name, s.id),
                    format!(
                        "give the newer sync its own id, e.g. id = \"{}\" (never change the id of a sync that has run)",
                        uuid::Uuid::new_v4()
                    ),
                ));
            }
        }
        for c in &self.consumers {
            if !seen.insert(("consumer", c.name.0.clone())) {
                problems.push(problem(
                    format!("two consumers are named {:?}", c.name.0),
                    "give each [[consumer]] its own name",
                ));
            }
            if !self.targets.iter().any(|t| t.name == c.target) {
                problems.push(problem(
                    format!(
                        "consumer {:?} writes to target {:?}, which is not configured",
                        c.name.0, c.target
                    ),
                    suggestion(
                        "target",
                        &c.target,
                        self.targets.iter().map(|t| t.name.as_str()),
                    ),
                ));
            }
            if let crate::LayoutConfig::ConsumerTable {
                connections: Some(connections),
                ..
            } = &c.layout
                && !(1..=MAX_WRITE_CONNECTIONS).contains(connections)
            {
                problems.push(problem(
                    format!(
                        "consumer {:?} asks for {connections} connections",
                        c.name.0
                    ),
                    format!(
                        "set connections between 1 and {MAX_WRITE_CONNECTIONS} (each is one more session on the target)"
                    ),
                ));
            }
            if let crate::FilterConfig::Sync { name, .. } = &c.filter
                && !self.syncs.iter().any(|s| &s.name == name)
            {
                problems.push(problem(
                    format!(
                        "consumer {:?} reads sync {name:?}, which is not configured",
                        c.name.0
                    ),
                    suggestion("sync", name, self.syncs.iter().map(|s| s.name.as_str())),
                ));
            }
        }
        for s in &self.syncs {
            if let crate::SourceConfig::Stripe(crate::StripeSourceConfig {
                collections,
                poll_interval_ms,
                rate_limit,
                concurrency,
                request_timeout_ms,
                ..
            }) = &s.source
            {
                for c in collections.iter().flatten() {
                    let object = c.strip_prefix("stripe:").unwrap_or(c);
                    if !crate::STRIPE_OBJECTS.contains(&object) {
                        problems.push(problem(
                            format!(
                                "sync {:?} names Stripe object {c:?}, which sluice does not sync",
                                s.name
                            ),
                            suggestion("object", object, crate::STRIPE_OBJECTS.into_iter()),
                        ));
                    }
                }
                if *poll_interval_ms < 50 {
                    problems.push(problem(
                        format!(
                            "sync {:?}: poll_interval_ms = {poll_interval_ms} is too short",
                            s.name
                        ),
                        "use at least 50 (the default is 1000: one request per second for events)",
                    ));
                }
                if rate_limit.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                    problems.push(problem(
                        format!("sync {:?}: rate_limit must be a positive number of requests per second", s.name),
                        "remove rate_limit to use Stripe's documented limit (25/s for test keys, 100/s for live keys)",
                    ));
                }
                if *concurrency == 0 || *request_timeout_ms == 0 {
                    problems.push(problem(
                        format!(
                            "sync {:?}: concurrency and request_timeout_ms must be at least 1",
                            s.name
                        ),
                        "remove them to use the defaults (4 requests at once, 30000 ms)",
                    ));
                }
            }
        }
        if let Some(email) = &self.alerts.email {
            if email.to.is_empty() {
                problems.push(problem(
                    "[alerts.email] has no recipients".to_owned(),
                    "add to = [\"ops@example.com\"], or remove [alerts.email]",
                ));
            }
            if email.security == crate::SmtpSecurity::None && email.password.is_some() {
                problems.push(problem(
                    "[alerts.email] would send the SMTP password without encryption (security = \"none\")".to_owned(),
                    "use security = \"starttls\" or \"tls\", or remove the password",
                ));
            }
        }
        for w in &self.alerts.webhooks {
            if !(w.url.starts_with("https://") || w.url.starts_with("http://")) {
                problems.push(problem(
                    format!("[[alerts.webhook]] url {:?} is not an http(s) URL", w.url),
                    "use a URL like https://hooks.example.com/sluice",
                ));
            }
        }
        if let Some(proxy) = &self.proxy
            && !self.targets.iter().any(|t| t.name == proxy.target)
        {
            let known: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
            problems.push(problem(
                format!(
                    "[proxy] target {:?} is not a configured target",
                    proxy.target
                ),
                format!("use one of the configured targets: {known:?}"),
            ));
        }
        // A connection through an agent needs that agent registered under [agents].
        let connections = self
            .targets
            .iter()
            .map(|t| (format!("target {:?}", t.name), &t.connection))
            .chain(self.syncs.iter().filter_map(|s| match &s.source {
                crate::SourceConfig::Postgres { connection, .. } => {
                    Some((format!("sync {:?}", s.name), connection))
                }
                crate::SourceConfig::Http { .. } | crate::SourceConfig::Stripe(_) => None,
            }));
        for (who, connection) in connections {
            if let Some(crate::TunnelConfig::Agent { name }) = &connection.tunnel {
                let registered = self
                    .agents
                    .as_ref()
                    .is_some_and(|a| a.agents.iter().any(|a| &a.name == name));
                if !registered {
                    problems.push(problem(
                        format!("{who} goes through agent {name:?}, which is not registered"),
                        format!(
                            "add it under [[agents.agent]]: name = {name:?}, public_key = what `sluice-agent keygen` printed"
                        ),
                    ));
                }
            }
        }
        problems
    }

    /// Secrets the config names whose environment variable is not set or whose file does
    /// not exist, each as `(where, what is missing)`. Values are never read into the result.
    pub fn missing_secrets(&self) -> Vec<(String, String)> {
        let mut named: Vec<(String, &crate::SecretSource)> =
            vec![("[api] token".to_owned(), &self.api.token)];
        if let Some(p) = &self.api.console_password {
            named.push(("[api] console_password".to_owned(), p));
        }
        if let Some(p) = self.alerts.email.as_ref().and_then(|e| e.password.as_ref()) {
            named.push(("[alerts.email] password".to_owned(), p));
        }
        for t in &self.targets {
            if let Some(p) = &t.connection.password {
                named.push((format!("target {:?} password", t.name), p));
            }
        }
        for s in &self.syncs {
            match &s.source {
                crate::SourceConfig::Postgres {
                    connection, writer, ..
                } => {
                    if let Some(p) = &connection.password {
                        named.push((format!("sync {:?} password", s.name), p));
                    }
                    if let Some(p) = writer.as_ref().and_then(|w| w.password.as_ref()) {
                        named.push((format!("sync {:?} writer password", s.name), p));
                    }
                }
                crate::SourceConfig::Stripe(stripe) => {
                    named.push((format!("sync {:?} key", s.name), &stripe.key));
                }
                crate::SourceConfig::Http { webhook } => {
                    if let Some(p) = webhook.as_ref().and_then(|w| w.secret.as_ref()) {
                        named.push((format!("sync {:?} webhook secret", s.name), p));
                    }
                }
            }
        }
        named
            .into_iter()
            .filter_map(|(who, source)| match source {
                crate::SecretSource::Env(var) => std::env::var_os(var)
                    .is_none()
                    .then(|| (who, format!("environment variable {var} is not set"))),
                crate::SecretSource::File(path) => (!path.exists())
                    .then(|| (who, format!("file {} does not exist", path.display()))),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"data_dir = "${DATA:-/var/lib/sluice}"

[[target]]
name = "warehouse"

[target.connection]
host = "${DB_HOST}"
database = "app_$${literal}"
user = "sluice"
password = { env = "SLUICE_TARGET_PASSWORD" }
"#;

    fn env(name: &str) -> Option<String> {
        (name == "DB_HOST").then(|| "db.internal".to_owned())
    }

    #[test]
    fn variables_defaults_and_escapes_are_substituted() {
        let config = Config::parse(TEXT, "sluice.toml", env).unwrap();
        assert_eq!(config.data_dir, std::path::PathBuf::from("/var/lib/sluice"));
        assert_eq!(config.targets[0].connection.host, "db.internal");
        assert_eq!(config.targets[0].connection.database, "app_${literal}");
    }

    #[test]
    fn a_missing_variable_is_located_and_named() {
        let err = Config::parse(TEXT, "sluice.toml", |_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sluice.toml:7:9: environment variable DB_HOST is not set\n  fix: export DB_HOST=… before running sluice, or give a default with ${DB_HOST:-value}"
        );
    }

    #[test]
    fn typos_get_the_closest_name_and_a_sync_without_id_gets_one() {
        let typo = TEXT.replace("database =", "databse =");
        let err = Config::parse(&typo, "sluice.toml", env).unwrap_err();
        assert_eq!(err.fix, "did you mean `database`?", "{err}");
        let far = TEXT.replace("database =", "xyzzy =");
        let err = Config::parse(&far, "sluice.toml", env).unwrap_err();
        assert!(!err.fix.contains("did you mean"), "{err}");
        assert!(
            err.to_string().contains("\n  fix: "),
            "every error has a fix: {err}"
        );
        let no_id = "[[sync]]\nname = \"app\"\nsource = { provider = \"http\" }\n";
        let err = Config::parse(no_id, "sluice.toml", env).unwrap_err();
        assert!(err.message.contains("must never change"), "{err}");
        let fresh = err.fix.split('"').nth(1).unwrap();
        assert!(uuid::Uuid::parse_str(fresh).is_ok(), "{err}");
        assert_eq!(
            closest("warehose", ["warehouse", "events"].into_iter()),
            Some("warehouse")
        );
        assert_eq!(
            closest("read_roll", ["read_role", "user"].into_iter()),
            Some("read_role")
        );
    }

    #[test]
    fn mistakes_are_located_with_what_was_expected_and_no_file_text() {
        let typo = TEXT.replace("database =", "databse =");
        let err = Config::parse(&typo, "sluice.toml", env).unwrap_err();
        assert_eq!((err.line, err.column), (Some(8), Some(1)));
        assert!(
            err.message.contains("unknown field `databse`") && err.message.contains("`database`"),
            "{err}"
        );

        let bad_port = TEXT.replace("user = \"sluice\"", "user = \"sluice\"\nport = \"5432x\"");
        let err = Config::parse(&bad_port, "sluice.toml", env).unwrap_err();
        assert_eq!(err.line, Some(10));
        assert!(err.message.contains("expected u16"), "{err}");

        let syntax = TEXT.replace("name = \"warehouse\"", "name = \"warehouse");
        let err = Config::parse(&syntax, "sluice.toml", env).unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(
            !err.to_string().contains("warehouse"),
            "the file's text is not quoted: {err}"
        );
    }
}

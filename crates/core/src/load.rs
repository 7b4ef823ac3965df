//! Loading `sluice.toml`: `${VAR}` and `${VAR:-default}` interpolation, and errors that say
//! where (file, line, column) and what was expected.
//!
//! Errors never quote the file's text: a line may hold a value interpolated from the
//! environment, so only positions and the parser's description are shown.

use std::fmt;
use std::path::Path;

use crate::Config;

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
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                write!(f, "{}:{line}:{column}: {}", self.file, self.message)
            }
            _ => write!(f, "{}: {}", self.file, self.message),
        }
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
        })?;
        Config::parse(&text, &file, |name| std::env::var(name).ok())
    }

    /// Parses config text; `env` looks variables up (`std::env::var` in [`Config::load`]).
    pub fn parse(
        text: &str,
        file: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let at = |offset: Option<usize>, message: String| {
            let (line, column) = match offset {
                Some(offset) => {
                    let before = &text[..offset.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before
                        .rsplit('\n')
                        .next()
                        .map(|l| l.chars().count())
                        .unwrap_or(0)
                        + 1;
                    (Some(line), Some(column))
                }
                None => (None, None),
            };
            ConfigError {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        };
        // The shape is checked on the text as written (placeholders are strings), so every
        // mistake has a position.
        if let Err(e) = toml::from_str::<Config>(text) {
            return Err(at(e.span().map(|s| s.start), e.message().trim().to_owned()));
        }
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| at(e.span().map(|s| s.start), e.message().to_owned()))?;
        for (_, value) in table.iter_mut() {
            substitute(value, &env)
                .map_err(|(placeholder, message)| at(text.find(&placeholder), message))?;
        }
        toml::Value::Table(table).try_into::<Config>().map_err(|e| {
            at(
                None,
                format!(
                    "after substituting environment variables: {}",
                    e.message().trim()
                ),
            )
        })
    }
}

/// Replaces `${NAME}` / `${NAME:-default}` in every string; `$$` is a literal `$`. On error,
/// returns the placeholder (to locate it) and the message.
fn substitute(
    value: &mut toml::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), (String, String)> {
    match value {
        toml::Value::String(s) if s.contains('$') => *s = interpolate(s, env)?,
        toml::Value::Array(items) => items.iter_mut().try_for_each(|v| substitute(v, env))?,
        toml::Value::Table(table) => table.iter_mut().try_for_each(|(_, v)| substitute(v, env))?,
        _ => {}
    }
    Ok(())
}

fn interpolate(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, (String, String)> {
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
                    "a `${` is not closed by `}` (write `$$` for a literal dollar sign)".to_owned(),
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
                    format!("`${{{inner}}}` is not a variable name (letters, digits, _)"),
                ));
            }
            match (env(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err((
                        format!("${{{name}"),
                        format!(
                            "environment variable {name} is not set (give a default with ${{{name}:-value}})"
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

impl Config {
    /// Problems a parser cannot see: duplicate names, consumers naming an unknown target or
    /// sync. Empty when the config is consistent.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.targets {
            if !seen.insert(("target", t.name.clone())) {
                problems.push(format!("two targets are named {:?}", t.name));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for s in &self.syncs {
            if !seen.insert(("sync", s.name.clone())) {
                problems.push(format!("two syncs are named {:?}", s.name));
            }
            if !ids.insert(s.id) {
                problems.push(format!(
                    "sync {:?} reuses the id {} of another sync",
                    s.name, s.id
                ));
            }
        }
        for c in &self.consumers {
            if !seen.insert(("consumer", c.name.0.clone())) {
                problems.push(format!("two consumers are named {:?}", c.name.0));
            }
            if !self.targets.iter().any(|t| t.name == c.target) {
                let known: Vec<&str> = self.targets.iter().map(|t| t.name.as_str()).collect();
                problems.push(format!("consumer {:?} writes to target {:?}, which is not configured (targets: {known:?})", c.name.0, c.target));
            }
            if let Err(e) = c.filter.resolve(&self.syncs) {
                problems.push(format!("consumer {:?}: {e}", c.name.0));
            }
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
                crate::SourceConfig::Http {} => None,
            }));
        for (who, connection) in connections {
            if let Some(crate::TunnelConfig::Agent { name }) = &connection.tunnel {
                let registered = self
                    .agents
                    .as_ref()
                    .is_some_and(|a| a.agents.iter().any(|a| &a.name == name));
                if !registered {
                    problems.push(format!(
                        "{who} goes through agent {name:?}, which is not registered: add it under [[agents.agent]] with its public key"
                    ));
                }
            }
        }
        problems
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
            "sluice.toml:7:9: environment variable DB_HOST is not set (give a default with ${DB_HOST:-value})"
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

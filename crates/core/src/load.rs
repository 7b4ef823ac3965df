//! Loading `sluice.toml`: `${VAR}` and `${VAR:-default}` interpolation, and errors that say
//! where (file, line, column) and what was expected.
//!
//! Errors never quote the file's text: a line may hold a value interpolated from the
//! environment, so only positions and the parser's description are shown.

use std::fmt;
use std::path::Path;

use crate::Config;
use crate::text::closest;

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

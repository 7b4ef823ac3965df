//! What a parsed config can still get wrong, which the parser cannot see: duplicate names,
//! references to what is not configured, counts out of range, secrets that are missing.

use std::fmt;

use crate::Config;
use crate::text::suggestion;

/// The most parallel backfill readers a Postgres source may ask for.
pub const MAX_BACKFILL_READERS: usize = 16;

/// The most connections a consumer may write its target through.
pub const MAX_WRITE_CONNECTIONS: usize = 16;

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

/// A count setting of `whose` outside 1 to its most: `(key, what it counts, most)`; each one
/// is one more `each`.
fn count_outside(
    whose: &str,
    count: usize,
    (key, counts, most): (&str, &str, usize),
    each: &str,
) -> Option<Problem> {
    (!(1..=most).contains(&count)).then(|| {
        problem(
            format!("{whose} asks for {count} {counts}"),
            format!("set {key} between 1 and {most} (each is one more {each})"),
        )
    })
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
            {
                problems.extend(count_outside(
                    &format!("sync {:?}", s.name),
                    *readers,
                    ("backfill_readers", "backfill readers", MAX_BACKFILL_READERS),
                    "connection to the source",
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
            }
            | crate::LayoutConfig::SchemaMirror {
                connections: Some(connections),
                ..
            } = &c.layout
            {
                problems.extend(count_outside(
                    &format!("consumer {:?}", c.name.0),
                    *connections,
                    ("connections", "connections", MAX_WRITE_CONNECTIONS),
                    "session on the target",
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

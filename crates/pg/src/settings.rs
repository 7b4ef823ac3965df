//! Connection settings: from a URL or from fields, with the password kept secret.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sluice_core::{CheckReport, ConnectionConfig, SslMode};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, PgConnection};

use crate::diagnose::{ConnectError, diagnose};

/// How to reach a PostgreSQL server as one role.
///
/// What each [`SslMode`] checks (sqlx's behaviour, which differs from libpq for `require`):
///
/// | mode | TLS used | certificate chain checked | host name checked |
/// |---|---|---|---|
/// | `disable` | never | no | no |
/// | `prefer` | if the server offers it | no | no |
/// | `require` | always (fails if the server has none) | **no, even with a root certificate** | no |
/// | `verify-ca` | always | yes, against `root_cert` | no |
/// | `verify-full` | always | yes, against `root_cert` | yes |
///
/// Use `verify-full` whenever the server's certificate can be checked. `Debug` output never
/// shows the password.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Database name.
    pub database: String,
    /// Role to log in as.
    pub user: String,
    /// Password, if the server asks for one.
    pub password: Option<SecretString>,
    /// TLS mode.
    pub ssl_mode: SslMode,
    /// Root certificate (PEM file) for `verify-ca` / `verify-full`.
    pub root_cert: Option<PathBuf>,
    /// Client certificate (PEM file).
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM file).
    pub client_key: Option<PathBuf>,
    /// How long to wait for a connection before calling it a timeout.
    pub connect_timeout: Duration,
    /// `application_name` shown in `pg_stat_activity`.
    pub application_name: String,
}

/// A URL or config that cannot become [`ConnectionSettings`]. Messages never repeat the URL
/// (it may hold a password).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid connection URL: {0}")]
pub struct SettingsError(String);

impl ConnectionSettings {
    /// Settings with defaults: port 5432 unless given, `sslmode=prefer`, 10 s timeout.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        database: impl Into<String>,
        user: impl Into<String>,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            database: database.into(),
            user: user.into(),
            password: None,
            ssl_mode: SslMode::Prefer,
            root_cert: None,
            client_cert: None,
            client_key: None,
            connect_timeout: Duration::from_secs(10),
            application_name: "sluice".to_owned(),
        }
    }

    /// Parses `postgres://user:password@host:port/database?sslmode=…&sslrootcert=…&sslcert=…
    /// &sslkey=…&connect_timeout=…&application_name=…`.
    pub fn from_url(url: &str) -> Result<Self, SettingsError> {
        let parsed = url::Url::parse(url).map_err(|e| SettingsError(e.to_string()))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(SettingsError(format!(
                "the scheme must be postgres:// or postgresql://, not {}://",
                parsed.scheme()
            )));
        }
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let host = parsed
            .host_str()
            .ok_or_else(|| SettingsError("the URL has no host".into()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let database = parsed.path().trim_start_matches('/');
        if database.is_empty() {
            return Err(SettingsError(
                "the URL names no database (postgres://…/DATABASE)".into(),
            ));
        }
        if parsed.username().is_empty() {
            return Err(SettingsError(
                "the URL names no user (postgres://USER@…)".into(),
            ));
        }
        let mut settings = Self::new(
            host,
            parsed.port().unwrap_or(5432),
            decode(database),
            decode(parsed.username()),
        );
        settings.password = parsed.password().map(|p| SecretString::from(decode(p)));
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "sslmode" => settings.ssl_mode = parse_ssl_mode(&value)?,
                "sslrootcert" => settings.root_cert = Some(PathBuf::from(value.as_ref())),
                "sslcert" => settings.client_cert = Some(PathBuf::from(value.as_ref())),
                "sslkey" => settings.client_key = Some(PathBuf::from(value.as_ref())),
                "connect_timeout" => {
                    let secs: u64 = value.parse().map_err(|_| {
                        SettingsError(format!(
                            "connect_timeout must be whole seconds, not {value:?}"
                        ))
                    })?;
                    settings.connect_timeout = Duration::from_secs(secs.max(1));
                }
                "application_name" => settings.application_name = value.into_owned(),
                other => {
                    return Err(SettingsError(format!(
                        "unknown parameter {other:?}; known: sslmode, sslrootcert, sslcert, sslkey, \
                         connect_timeout, application_name"
                    )));
                }
            }
        }
        Ok(settings)
    }

    /// Settings from config, reading the password from its source.
    pub fn from_config(config: &ConnectionConfig) -> Result<Self, sluice_core::Error> {
        let mut settings = Self::new(&config.host, config.port, &config.database, &config.user);
        settings.password = config.password.as_ref().map(|p| p.resolve()).transpose()?;
        settings.ssl_mode = config.ssl.mode;
        settings.root_cert = config.ssl.root_cert.clone();
        settings.client_cert = config.ssl.client_cert.clone();
        settings.client_key = config.ssl.client_key.clone();
        settings.connect_timeout = Duration::from_secs(config.connect_timeout_secs.max(1));
        settings.application_name = config.application_name.clone();
        Ok(settings)
    }

    /// `user@host:port/database`: for messages (never includes the password).
    pub fn endpoint(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }

    /// sqlx connection options for these settings.
    pub fn options(&self) -> PgConnectOptions {
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(&self.host)
            .port(self.port)
            .database(&self.database)
            .username(&self.user)
            .application_name(&self.application_name)
            .ssl_mode(match self.ssl_mode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require => PgSslMode::Require,
                SslMode::VerifyCa => PgSslMode::VerifyCa,
                SslMode::VerifyFull => PgSslMode::VerifyFull,
            })
            .disable_statement_logging();
        if let Some(password) = &self.password {
            options = options.password(password.expose_secret());
        }
        if let Some(path) = &self.root_cert {
            options = options.ssl_root_cert(path);
        }
        if let Some(path) = &self.client_cert {
            options = options.ssl_client_cert(path);
        }
        if let Some(path) = &self.client_key {
            options = options.ssl_client_key(path);
        }
        options
    }

    /// Connects, within `connect_timeout`, and explains any failure.
    pub async fn connect(&self) -> Result<PgConnection, ConnectError> {
        let error = match self.attempt(self.options()).await {
            Ok(conn) => return Ok(conn),
            Err(error) => error,
        };
        // "no encryption" (PostgreSQL 14 and later; "SSL off" before) in a pg_hba rejection may
        // mean "no rule for you at all" or "only TLS connections are allowed". Without TLS
        // configured, one probe with TLS tells which.
        if let ConnectError::NoHbaEntry {
            detail,
            user,
            database,
        } = &error
            && (detail.contains("no encryption") || detail.contains("SSL off"))
            && self.ssl_mode == SslMode::Disable
        {
            let probe = self
                .attempt(self.options().ssl_mode(PgSslMode::Require))
                .await;
            let tls_gets_further = !matches!(
                probe,
                Err(ConnectError::NoHbaEntry { .. }
                    | ConnectError::TlsUnsupportedByServer { .. }
                    | ConnectError::Timeout { .. }
                    | ConnectError::Refused { .. })
            );
            if tls_gets_further {
                return Err(ConnectError::TlsRequiredByServer {
                    user: user.clone(),
                    database: database.clone(),
                    mode: ssl_mode_name(self.ssl_mode),
                });
            }
        }
        Err(error)
    }

    /// Connects and runs `checks`, turning a failed connection or a catalog error into
    /// findings: the frame of every `… check` command.
    pub async fn check_with(
        &self,
        checks: impl AsyncFnOnce(&mut PgConnection, &mut CheckReport) -> Result<(), sqlx::Error>,
    ) -> CheckReport {
        let mut report = CheckReport::default();
        match self.connect().await {
            Err(e) => report.push("connect", false, e.to_string(), e.health_fix()),
            Ok(mut conn) => {
                if let Err(e) = checks(&mut conn, &mut report).await {
                    report.push(
                        "catalog",
                        false,
                        format!("could not read the catalog: {e}"),
                        None,
                    );
                }
            }
        }
        report
    }

    /// Connects and reports who and where it reached (role, database, version, TLS), or why
    /// it could not, with the fix: `sluice check` for a target.
    pub async fn check_reachable(&self) -> CheckReport {
        self.check_with(async |conn, report| {
            let facts = crate::catalog::server_facts(conn).await?;
            report.push(
                "connect",
                true,
                format!(
                    "connected as {} to {} (PostgreSQL {}, TLS {})",
                    facts.current_user,
                    facts.database,
                    facts.version,
                    if facts.ssl { "on" } else { "off" }
                ),
                None,
            );
            Ok(())
        })
        .await
    }

    async fn attempt(&self, options: PgConnectOptions) -> Result<PgConnection, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, options.connect()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(error)) => Err(diagnose(self, error)),
            Err(_) => Err(ConnectError::Timeout {
                host: self.host.clone(),
                port: self.port,
                secs: self.connect_timeout.as_secs(),
            }),
        }
    }
}

fn parse_ssl_mode(value: &str) -> Result<SslMode, SettingsError> {
    Ok(match value {
        "disable" => SslMode::Disable,
        "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        "allow" => {
            return Err(SettingsError(
                "sslmode=allow is not supported (it uses TLS only when the server insists); \
                 use prefer, or require / verify-full to insist on TLS"
                    .into(),
            ));
        }
        other => {
            return Err(SettingsError(format!(
                "unknown sslmode {other:?}; use disable, prefer, require, verify-ca or verify-full"
            )));
        }
    })
}

/// The name libpq and sluice's config use for a mode.
pub fn ssl_mode_name(mode: SslMode) -> &'static str {
    match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_settings_and_debug_hides_the_password() {
        let s = ConnectionSettings::from_url(
            "postgres://sync%20user:p%40ss%2Fword@db.example.com:6543/my%20db?sslmode=verify-full\
             &sslrootcert=/etc/ca.pem&connect_timeout=3&application_name=x",
        )
        .unwrap();
        assert_eq!(
            (
                s.host.as_str(),
                s.port,
                s.database.as_str(),
                s.user.as_str()
            ),
            ("db.example.com", 6543, "my db", "sync user")
        );
        assert_eq!(
            s.password
                .as_ref()
                .map(|p| p.expose_secret().to_owned())
                .as_deref(),
            Some("p@ss/word")
        );
        assert_eq!(s.ssl_mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(s.connect_timeout, Duration::from_secs(3));
        assert!(
            !format!("{s:?}").contains("p@ss"),
            "Debug must not show the password"
        );
        assert_eq!(s.endpoint(), "sync user@db.example.com:6543/my db");
    }

    #[test]
    fn bad_urls_are_explained_without_echoing_them() {
        let cases = [
            ("mysql://u:secretpw@h/db", "scheme"),
            ("postgres://u:secretpw@h/", "no database"),
            ("postgres://u:secretpw@h/db?sslmode=allow", "sslmode=allow"),
            ("postgres://u:secretpw@h/db?sslmode=on", "unknown sslmode"),
            (
                "postgres://u:secretpw@h/db?sslcompression=1",
                "unknown parameter",
            ),
            (
                "postgres://u:secretpw@h/db?connect_timeout=soon",
                "whole seconds",
            ),
        ];
        for (url, expected) in cases {
            let err = ConnectionSettings::from_url(url).unwrap_err().to_string();
            assert!(err.contains(expected), "{url}: {err}");
            assert!(
                !err.contains("secretpw"),
                "{url}: the error leaks the password: {err}"
            );
        }
    }
}

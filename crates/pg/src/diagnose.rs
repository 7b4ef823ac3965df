//! Connection failures, classified and explained with what to do.
//!
//! The cases are the ones users meet when they first connect: timeouts (firewall or routing), refused connections (host or port), DNS, the
//! four TLS permutations, wrong passwords, `invalid_authorization_specification` (no
//! `pg_hba.conf` rule), a missing database or role, and a missing CONNECT privilege.

use sluice_core::ErrorClass;
use sluice_core::sql::quote_ident;

use crate::settings::{ConnectionSettings, ssl_mode_name};

/// Why a connection failed, and what to do about it. Messages never contain the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No answer within the timeout.
    #[error(
        "no answer from {host}:{port} within {secs}s: a firewall may be dropping the traffic, or \
         the network route to the database is wrong (is it reachable from outside its private \
         network?). Check from this machine: `nc -vz {host} {port}` (it stays open when the \
         port is reachable)"
    )]
    Timeout {
        /// Host tried.
        host: String,
        /// Port tried.
        port: u16,
        /// Seconds waited.
        secs: u64,
    },
    /// The host answered that nothing listens on the port.
    #[error(
        "connection refused by {host}:{port}: nothing is listening there. Either the database is \
         down, or the host and port are not your database's (PostgreSQL's default port is 5432)"
    )]
    Refused {
        /// Host tried.
        host: String,
        /// Port tried.
        port: u16,
    },
    /// The host name does not resolve.
    #[error(
        "cannot resolve the host name {host:?} ({detail}): check its spelling, or use an IP address"
    )]
    Dns {
        /// The name.
        host: String,
        /// The resolver's words.
        detail: String,
    },
    /// sluice wants TLS; the server has none.
    #[error(
        "sluice is configured to use TLS (sslmode={mode}), but the database at {host}:{port} does \
         not support it. Enable TLS on the server (ssl = on with a certificate), or if the network \
         is trusted, set sslmode=prefer or disable"
    )]
    TlsUnsupportedByServer {
        /// Host tried.
        host: String,
        /// Port tried.
        port: u16,
        /// The configured mode.
        mode: &'static str,
    },
    /// The server requires TLS; sluice connected without it.
    #[error(
        "the database requires TLS, but sluice is configured not to use it (sslmode={mode}): \
         the server rejects unencrypted connections for {user} to {database:?}. Set \
         sslmode=verify-full with the server's root certificate (or sslmode=require)"
    )]
    TlsRequiredByServer {
        /// Role.
        user: String,
        /// Database.
        database: String,
        /// The configured mode.
        mode: &'static str,
    },
    /// The server's certificate failed verification.
    #[error(
        "the database's TLS certificate was rejected (sslmode={mode}): {detail}. Give the root \
         certificate that signed it (root_cert / sslrootcert), and with verify-full connect by a \
         host name the certificate names"
    )]
    CertificateRejected {
        /// The configured mode.
        mode: &'static str,
        /// The TLS library's words.
        detail: String,
    },
    /// The TLS handshake failed for another reason (e.g. an unreadable certificate file).
    #[error("TLS setup failed (sslmode={mode}): {detail}")]
    Tls {
        /// The configured mode.
        mode: &'static str,
        /// The TLS library's words.
        detail: String,
    },
    /// The server requires a client certificate that was not given or not accepted.
    #[error(
        "the database requires a valid client certificate for {user}: set client_cert and \
         client_key (sslcert / sslkey) to a certificate whose common name is {user:?}, signed by \
         a CA the server trusts"
    )]
    ClientCertificateRequired {
        /// Role.
        user: String,
    },
    /// Wrong password (or none where one is needed).
    #[error(
        "password authentication failed for {user}: the password is wrong or the role has none. \
         Check the configured password, or set a new one: alter role {ident} with password '…';"
    )]
    WrongPassword {
        /// Role.
        user: String,
        /// The role, quoted for SQL.
        ident: String,
    },
    /// `invalid_authorization_specification`: no `pg_hba.conf` rule admits this connection.
    #[error(
        "invalid_authorization_specification: the server has no pg_hba.conf rule that lets {user} \
         connect to {database:?} this way ({detail}). This usually means the authentication \
         method the server expects does not match how sluice connects: make sure a password \
         method (scram-sha-256 or md5) applies to sluice's address, or turn TLS on if the rule is \
         hostssl. Example rule: `hostssl {database} {user} <sluice's address>/32 scram-sha-256`, \
         then `select pg_reload_conf();`"
    )]
    NoHbaEntry {
        /// Role.
        user: String,
        /// Database.
        database: String,
        /// The server's words.
        detail: String,
    },
    /// The role does not exist.
    #[error(
        "the role {user:?} does not exist on this server: create it first (`sluice setup sql` prints the statements)"
    )]
    RoleMissing {
        /// Role.
        user: String,
    },
    /// The database does not exist.
    #[error(
        "database {database:?} does not exist on {host}:{port}: check the name (psql's \\l lists databases)"
    )]
    DatabaseMissing {
        /// Database.
        database: String,
        /// Host tried.
        host: String,
        /// Port tried.
        port: u16,
    },
    /// The role lacks CONNECT on the database.
    #[error("{user} may not connect to database {database:?}. Fix: {fix}")]
    NoConnectPrivilege {
        /// Role.
        user: String,
        /// Database.
        database: String,
        /// The GRANT to run.
        fix: String,
    },
    /// The server is starting up, shutting down, or out of connection slots.
    #[error("the database at {host}:{port} is not accepting connections right now: {detail}")]
    Unavailable {
        /// Host tried.
        host: String,
        /// Port tried.
        port: u16,
        /// The server's words.
        detail: String,
    },
    /// Anything else, with the driver's words.
    #[error("connecting to {endpoint} failed: {detail}")]
    Other {
        /// `user@host:port/database`.
        endpoint: String,
        /// The driver's words.
        detail: String,
    },
}

impl ConnectError {
    /// What the caller should do.
    pub fn class(&self) -> ErrorClass {
        match self {
            ConnectError::Timeout { .. }
            | ConnectError::Refused { .. }
            | ConnectError::Unavailable { .. }
            | ConnectError::Other { .. } => ErrorClass::Retry,
            _ => ErrorClass::FixConfiguration,
        }
    }

    /// The SQL to run when the fix is a statement.
    pub fn fix_sql(&self) -> Option<&str> {
        match self {
            ConnectError::NoConnectPrivilege { fix, .. } => Some(fix),
            _ => None,
        }
    }

    /// What to do about it, in one line (the message says why): the SQL to run when the fix
    /// is a statement.
    pub fn fix(&self) -> String {
        match self {
            ConnectError::NoConnectPrivilege { fix, .. } => fix.clone(),
            ConnectError::Timeout { host, port, .. } => format!(
                "check the route and firewall from this machine to {host}:{port}: `nc -vz {host} {port}`"
            ),
            ConnectError::Refused { .. } => {
                "start the database, or set the host and port to your database's (PostgreSQL's default port is 5432)".into()
            }
            ConnectError::Dns { .. } => "check the host name's spelling, or use an IP address".into(),
            ConnectError::TlsUnsupportedByServer { .. } => "enable TLS on the server (ssl = on with a certificate), or on a trusted network set the ssl mode to prefer or disable".into(),
            ConnectError::TlsRequiredByServer { .. } => {
                "set the ssl mode to verify-full with the server's root certificate (or require)".into()
            }
            ConnectError::CertificateRejected { .. } => "set root_cert to the root certificate that signed the server's; with verify-full, connect by a host name the certificate names".into(),
            ConnectError::Tls { .. } => {
                "check the certificate and key files the ssl settings name (readable PEM files)".into()
            }
            ConnectError::ClientCertificateRequired { user } => format!(
                "set client_cert and client_key to a certificate whose common name is {user:?}, signed by a CA the server trusts"
            ),
            ConnectError::WrongPassword { ident, .. } => format!(
                "correct the configured password, or set a new one: alter role {ident} with password '…';"
            ),
            ConnectError::NoHbaEntry { user, database, .. } => format!(
                "add a pg_hba.conf rule such as `hostssl {database} {user} <sluice's address>/32 scram-sha-256`, then: select pg_reload_conf();"
            ),
            ConnectError::RoleMissing { .. } => {
                "create the role first (`sluice setup sql` prints the statements)".into()
            }
            ConnectError::DatabaseMissing { .. } => {
                "correct the database name (psql's \\l lists the databases)".into()
            }
            ConnectError::Unavailable { .. } | ConnectError::Other { .. } => {
                "wait for the server, or check its log; sluice retries by itself".into()
            }
        }
    }

    /// The fix for a health check, which shows it beside the message: `None` where the
    /// message already says what to do.
    pub fn health_fix(&self) -> Option<String> {
        match self {
            ConnectError::Refused { .. }
            | ConnectError::Unavailable { .. }
            | ConnectError::Other { .. }
            | ConnectError::NoConnectPrivilege { .. } => Some(self.fix()),
            _ => None,
        }
    }

    /// The name of the health check this failure belongs to.
    pub fn check_name(&self) -> &'static str {
        match self {
            ConnectError::Timeout { .. }
            | ConnectError::Refused { .. }
            | ConnectError::Dns { .. }
            | ConnectError::Unavailable { .. }
            | ConnectError::Other { .. } => "reachable",
            ConnectError::TlsUnsupportedByServer { .. }
            | ConnectError::TlsRequiredByServer { .. }
            | ConnectError::CertificateRejected { .. }
            | ConnectError::Tls { .. }
            | ConnectError::ClientCertificateRequired { .. } => "tls",
            ConnectError::WrongPassword { .. }
            | ConnectError::NoHbaEntry { .. }
            | ConnectError::RoleMissing { .. } => "authenticated",
            ConnectError::DatabaseMissing { .. } | ConnectError::NoConnectPrivilege { .. } => {
                "privileges"
            }
        }
    }
}

impl From<ConnectError> for sluice_core::Error {
    fn from(error: ConnectError) -> Self {
        match error.class() {
            ErrorClass::Retry => sluice_core::Error::Unavailable {
                what: error.to_string(),
                source: None,
            },
            _ => {
                let fix = error.fix();
                sluice_core::Error::configuration(error.to_string(), fix)
            }
        }
    }
}

/// Turns a driver error from a connection attempt into an explained [`ConnectError`].
pub(crate) fn diagnose(settings: &ConnectionSettings, error: sqlx::Error) -> ConnectError {
    let host = settings.host.clone();
    let port = settings.port;
    let mode = ssl_mode_name(settings.ssl_mode);
    match error {
        sqlx::Error::Io(io) => {
            let text = io.to_string();
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => ConnectError::Refused { host, port },
                // The server hung up during the handshake: it is shutting down or restarting.
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                    ConnectError::Unavailable {
                        host,
                        port,
                        detail: format!(
                            "it closed the connection while sluice logged in ({text}); it may be shutting down or restarting"
                        ),
                    }
                }
                std::io::ErrorKind::TimedOut => ConnectError::Timeout {
                    host,
                    port,
                    secs: settings.connect_timeout.as_secs(),
                },
                _ if text.contains("lookup address")
                    || text.contains("Name or service not known") =>
                {
                    ConnectError::Dns { host, detail: text }
                }
                // rustls reports verification failures through the I/O layer.
                _ if text.contains("peer certificate") => {
                    ConnectError::CertificateRejected { mode, detail: text }
                }
                _ => ConnectError::Other {
                    endpoint: settings.endpoint(),
                    detail: text,
                },
            }
        }
        sqlx::Error::Tls(tls) => {
            let detail = tls.to_string();
            if detail.contains("server does not support TLS") {
                ConnectError::TlsUnsupportedByServer { host, port, mode }
            } else if detail.contains("certificate") || detail.contains("Certificate") {
                ConnectError::CertificateRejected { mode, detail }
            } else {
                ConnectError::Tls { mode, detail }
            }
        }
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = db.message().to_owned();
            let user = settings.user.clone();
            let database = settings.database.clone();
            match code.as_str() {
                "28P01" => ConnectError::WrongPassword {
                    ident: quote_ident(&user),
                    user,
                },
                "28000" if message.contains("certificate") => {
                    ConnectError::ClientCertificateRequired { user }
                }
                "28000" if message.contains("does not exist") => ConnectError::RoleMissing { user },
                "28000" => ConnectError::NoHbaEntry {
                    user,
                    database,
                    detail: message,
                },
                "3D000" => ConnectError::DatabaseMissing {
                    database,
                    host,
                    port,
                },
                "42501" => ConnectError::NoConnectPrivilege {
                    fix: format!(
                        "grant connect on database {} to {};",
                        quote_ident(&database),
                        quote_ident(&user)
                    ),
                    user,
                    database,
                },
                "57P03" | "53300" | "57P01" => ConnectError::Unavailable {
                    host,
                    port,
                    detail: message,
                },
                _ => ConnectError::Other {
                    endpoint: settings.endpoint(),
                    detail: format!("{message} (SQLSTATE {code})"),
                },
            }
        }
        other => ConnectError::Other {
            endpoint: settings.endpoint(),
            detail: other.to_string(),
        },
    }
}

//! Throwaway local PostgreSQL clusters.
//!
//! `sluice-localpg` starts real PostgreSQL servers on free loopback ports in temporary
//! directories, for tests, for `cargo xtask db`, and for `sluice demo`. A cluster can have
//! logical replication on, TLS with a certificate authority made at start (server and client
//! certificates from `rcgen`), and `pg_hba.conf` rules that require TLS, reject plain
//! connections, require client certificates, or require `scram-sha-256` passwords. It creates
//! roles and databases for tests.
//!
//! It works as root (CI runs as root and `initdb` refuses to): the server then runs as an
//! unprivileged OS user ([`OsUser`]). A supervisor process stops the server and removes its
//! directory when the [`Cluster`] is dropped *or* when the owning process dies, even by
//! `kill -9`, so a `static` cluster shared by a test binary never outlives it.
//!
//! It is not a way to manage production databases, and nothing in sluice's runtime depends
//! on it except the demo.
//!
//! ```no_run
//! # async fn example() -> Result<(), sluice_localpg::Error> {
//! use sluice_localpg::{Cluster, Tls};
//!
//! let pg = Cluster::options().logical_replication().tls(Tls::Required).start()?;
//! let db = pg.fresh_database("orders").await?;
//! pg.execute(&db, "create table t (id int primary key)").await?;
//! let url = pg.url(&db); // postgres://postgres:…@127.0.0.1:PORT/orders_1?sslmode=verify-full&…
//! # let _ = url; Ok(()) }
//! ```

mod binaries;
mod cpu;
mod files;
mod sql;
mod standby;
mod supervisor;
mod tls;
mod versions;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use sluice_core::sql::{quote_ident, quote_literal};
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};

pub use binaries::{Binaries, OsUser};
pub use cpu::process_cpu_seconds;
pub use standby::StandbyOptions;
pub use supervisor::stop_kept;
pub use tls::{Authority, ClientCert, write_private};
pub use versions::{
    FALLBACK_MAJOR, NPM_PACKAGE, RELEASES, Release, VERSION_VAR, cache_dir, release,
    requested_major,
};

use supervisor::spawn_supervisor;

/// The superuser every cluster is created with.
pub const SUPERUSER: &str = "postgres";

/// Errors starting or using a local cluster; each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (searched: {searched}); install them \
         (Debian: apt-get install -y postgresql), or install npm (apt-get install -y npm) so the \
         pinned release can be fetched, or set SLUICE_PG_BIN to the directory holding initdb"
    )]
    NoBinaries {
        /// Where the search looked.
        searched: String,
    },
    /// A major version the test kit has no pinned release of.
    #[error(
        "PostgreSQL version {asked:?} is not one the test kit runs; choose one of {supported} (SLUICE_PG_VERSION)"
    )]
    UnknownVersion {
        /// What was asked for.
        asked: String,
        /// The supported major versions.
        supported: String,
    },
    /// A release must be fetched, and npm is missing.
    #[error(
        "PostgreSQL {major} is not installed here and npm, which fetches it, is not on PATH; \
         install npm (Debian: apt-get install -y npm) or set SLUICE_PG_BIN to a PostgreSQL {major} bin directory"
    )]
    NoNpm {
        /// The major version needed.
        major: u32,
    },
    /// Running as root with no unprivileged user to hand the server to.
    #[error(
        "running as root, but no unprivileged OS user ({tried}) exists to run PostgreSQL; \
         create one (useradd --system postgres) or set SLUICE_PG_OS_USER"
    )]
    NoOsUser {
        /// The user names tried.
        tried: String,
    },
    /// A file-system or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A PostgreSQL tool failed; its output (and the server log, when relevant) is included.
    #[error("{what} failed ({status}):\n{output}")]
    Command {
        /// What was being done.
        what: String,
        /// The exit status.
        status: String,
        /// What the tool printed, and the server log's tail.
        output: String,
    },
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A SQL command against the cluster failed.
    #[error("{0}")]
    Sql(#[from] sqlx::Error),
    /// A kept cluster's directory already holds a cluster.
    #[error("{0} already holds a cluster; stop it first (cargo xtask db down) or reuse it")]
    AlreadyExists(PathBuf),
}

impl Error {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// TLS on a cluster, and what `pg_hba.conf` demands of clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tls {
    /// `ssl = off`: clients asking for TLS are refused.
    #[default]
    Off,
    /// TLS offered; plain connections allowed too.
    Optional,
    /// TLS required: plain TCP connections are rejected (`hostnossl … reject`).
    Required,
    /// TLS and a client certificate signed by the cluster's CA, whose common name is the role
    /// (`hostssl … clientcert=verify-full`), plus the password rule of [`Auth`].
    ClientCertRequired,
}

/// How TCP clients authenticate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Auth {
    /// `scram-sha-256` passwords (the default).
    #[default]
    ScramSha256,
    /// No password needed.
    Trust,
}

/// How to start a cluster; see [`Cluster::options`].
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    logical: bool,
    tls: Tls,
    auth: Auth,
    hba_lines: Vec<String>,
    settings: Vec<(String, String)>,
    keep_at: Option<PathBuf>,
    major: Option<u32>,
    role: Option<Role>,
}

/// What a test uses a cluster for, so that a cross-version run can give sources and targets
/// different versions (`SLUICE_PG_SOURCE_VERSION`, `SLUICE_PG_TARGET_VERSION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The upstream database sluice replicates from.
    Source,
    /// The database sluice writes to.
    Target,
}

impl Role {
    /// The environment variable choosing this role's major version.
    pub fn version_var(self) -> &'static str {
        match self {
            Role::Source => "SLUICE_PG_SOURCE_VERSION",
            Role::Target => "SLUICE_PG_TARGET_VERSION",
        }
    }
}

impl ClusterOptions {
    /// `wal_level = logical`, with room for replication slots and senders.
    pub fn logical_replication(mut self) -> Self {
        self.logical = true;
        self
    }

    /// TLS mode and the matching `pg_hba.conf` rules.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }

    /// Authentication method for TCP connections.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// A `pg_hba.conf` line placed before the generated TCP rules (first match wins), e.g.
    /// `host all mallory 127.0.0.1/32 reject`.
    pub fn hba_line(mut self, line: impl Into<String>) -> Self {
        self.hba_lines.push(line.into());
        self
    }

    /// A `postgresql.conf` setting; `value` is written as given (quote strings yourself).
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Run PostgreSQL `major` (12 … 18) rather than the default: the machine's own binaries
    /// when they are that version, else the pinned release ([`RELEASES`]).
    pub fn version(mut self, major: u32) -> Self {
        self.major = Some(major);
        self
    }

    /// What the cluster is for. Its major version is then `SLUICE_PG_SOURCE_VERSION` or
    /// `SLUICE_PG_TARGET_VERSION` when set (else `SLUICE_PG_VERSION`, else the default).
    pub fn role(mut self, role: Role) -> Self {
        self.role = Some(role);
        self
    }

    /// A logical-replication source ([`logical_replication`](Self::logical_replication) and
    /// [`Role::Source`]).
    pub fn source(self) -> Self {
        self.logical_replication().role(Role::Source)
    }

    /// A target ([`Role::Target`]).
    pub fn target(self) -> Self {
        self.role(Role::Target)
    }

    /// Keep the cluster in `dir` after this process exits (for `cargo xtask db up`): no
    /// supervisor, nothing removed on drop. Stop it with [`stop_kept`].
    pub fn keep_at(mut self, dir: impl Into<PathBuf>) -> Self {
        self.keep_at = Some(dir.into());
        self
    }

    /// The server binaries the cluster would run: the chosen version, else the role's
    /// (`SLUICE_PG_SOURCE_VERSION` / `SLUICE_PG_TARGET_VERSION`), else `SLUICE_PG_VERSION`,
    /// else the machine's own.
    pub fn binaries(&self) -> Result<Binaries, Error> {
        let major = match (self.major, self.role) {
            (Some(major), _) => Some(major),
            (None, Some(role)) => versions::major_from(role.version_var())?,
            (None, None) => None,
        };
        match major {
            Some(major) => Binaries::of_major(major),
            None => Binaries::find(),
        }
    }

    /// Creates and starts the cluster; returns once it accepts connections.
    pub fn start(self) -> Result<Cluster, Error> {
        Cluster::create(self)
    }
}

/// A running local PostgreSQL cluster. Dropping it stops the server and removes its files
/// (unless it was made with [`ClusterOptions::keep_at`]).
pub struct Cluster {
    binaries: Binaries,
    user: OsUser,
    root: PathBuf,
    port: u16,
    tls: Tls,
    password: String,
    authority: Option<Authority>,
    superuser_cert: Option<ClientCert>,
    supervisor: Mutex<Option<(Child, ChildStdin)>>,
    databases: AtomicU32,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The superuser password is deliberately left out.
        f.debug_struct("Cluster")
            .field("root", &self.root)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// Bump when the template's `initdb` flags change, so stale templates are not reused.
const TEMPLATE_REVISION: u32 = 1;

impl Cluster {
    /// Options for a new cluster (no TLS, `scram-sha-256`, `wal_level = replica`).
    pub fn options() -> ClusterOptions {
        ClusterOptions::default()
    }

    /// A cluster with default options.
    pub fn start_default() -> Result<Cluster, Error> {
        Self::options().start()
    }

    fn create(opts: ClusterOptions) -> Result<Cluster, Error> {
        let binaries = opts.binaries()?;
        let user = OsUser::for_server()?;
        let root = match &opts.keep_at {
            Some(dir) => {
                if dir.join("data").exists() {
                    return Err(Error::AlreadyExists(dir.clone()));
                }
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
                dir.clone()
            }
            None => tempfile::Builder::new()
                .prefix("sluice-pg-")
                .tempdir()
                .map_err(|e| Error::io("creating a temporary directory", e))?
                .keep(),
        };
        set_mode(&root, 0o700)?;
        user.own(&root)?;
        // The supervisor comes first, so that nothing below can leak a server or files.
        let supervisor = match opts.keep_at {
            Some(_) => None,
            None => Some(spawn_supervisor(&binaries, &user, &root)?),
        };
        let mut cluster = Cluster {
            binaries,
            user,
            root,
            port: 0,
            tls: opts.tls,
            password: uuid::Uuid::new_v4().simple().to_string(),
            authority: None,
            superuser_cert: None,
            supervisor: Mutex::new(supervisor),
            databases: AtomicU32::new(0),
        };
        cluster.init_data_dir()?;
        cluster.write_hba(&opts)?;
        if opts.tls != Tls::Off {
            cluster.write_tls_files()?;
        }
        let original_conf = read(&cluster.data_dir().join("postgresql.conf"))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            cluster.port = free_port()?;
            let conf = format!("{original_conf}\n{}", cluster.settings_block(&opts));
            std::fs::write(cluster.data_dir().join("postgresql.conf"), conf)
                .map_err(|e| Error::io("writing postgresql.conf", e))?;
            match cluster.start() {
                Ok(()) => break,
                // Another process may take the port between our probe and the server's bind.
                Err(e) if attempt < 5 && cluster.log_tail(20).contains("could not bind") => {
                    let _ = e;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        cluster.set_superuser_password()?;
        Ok(cluster)
    }

    /// Starts the server (after [`stop`](Cluster::stop)); returns once it accepts connections.
    pub fn start(&self) -> Result<(), Error> {
        std::fs::create_dir_all(self.socket_dir())
            .map_err(|e| Error::io("creating the socket directory", e))?;
        self.user.own(&self.socket_dir())?;
        let result = run(
            self.binaries
                .command(&self.user, "pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "start"])
                .current_dir(&self.root),
            "pg_ctl start",
        );
        result.map(drop).map_err(|e| self.with_log(e))
    }

    /// Stops the server (fast shutdown: connections are closed, nothing committed is lost).
    /// The files stay; [`start`](Cluster::start) brings it back on the same port.
    pub fn stop(&self) -> Result<(), Error> {
        run(
            self.binaries
                .command(&self.user, "pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "fast", "-w", "stop"])
                .current_dir(&self.root),
            "pg_ctl stop",
        )
        .map(drop)
    }

    /// True while the server process is running.
    pub fn is_running(&self) -> bool {
        self.binaries
            .command(&self.user, "pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("status")
            .current_dir(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The address TCP clients use.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's TLS mode.
    pub fn tls_mode(&self) -> Tls {
        self.tls
    }

    /// The superuser's password (for tests that build their own connection settings).
    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// The directory holding everything of this cluster.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// The binaries this cluster runs.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// The CA certificate clients verify the server against (`None` without TLS).
    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.authority.as_ref().map(|_| self.root.join("ca.crt"))
    }

    /// Issues a client certificate for `role`, signed by the cluster's CA.
    pub fn client_cert(&self, role: &str) -> Result<ClientCert, Error> {
        let authority = self.authority.as_ref().ok_or_else(|| Error::Command {
            what: "issuing a client certificate".into(),
            status: "no TLS".into(),
            output: "the cluster was started with Tls::Off, so it has no certificate authority"
                .into(),
        })?;
        let stem = format!("client-{}", uuid::Uuid::new_v4().simple());
        authority.client(role, &self.root, &stem)
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    fn with_log(&self, error: Error) -> Error {
        match error {
            Error::Command {
                what,
                status,
                output,
            } => Error::Command {
                what,
                status,
                output: format!(
                    "{output}\n--- server log ({}) ---\n{}",
                    self.log_path().display(),
                    self.log_tail(30)
                ),
            },
            other => other,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let supervisor = self
            .supervisor
            .get_mut()
            .map(Option::take)
            .unwrap_or_else(|p| p.into_inner().take());
        if let Some((mut child, stdin)) = supervisor {
            // Closing its standard input tells the supervisor to stop the server and remove
            // the directory; wait so the next test starts from a clean machine.
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn free_port() -> Result<u16, Error> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::io("finding a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("finding a free port", e))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
}

fn run(cmd: &mut Command, what: &str) -> Result<String, Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io(format!("running {what}"), e))?;
    check_output(what, out)
}

fn check_output(what: &str, out: std::process::Output) -> Result<String, Error> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(Error::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            output: text,
        })
    }
}

//! The write-back proxy: a PostgreSQL wire-protocol server in front of one target.
//!
//! Clients log in with their own target credentials; the proxy relays the SCRAM exchange to
//! the target ([`login`]), so the target checks the password and everything the client does
//! runs as that role, under its privileges and row-level security. Everything passes through
//! unchanged ([`session`]): the simple and extended protocols, transactions, `COPY` both ways,
//! `LISTEN`/`NOTIFY`, cancel requests and errors.
//!
//! ```no_run
//! # async fn run(target: sluice_pg::ConnectionSettings) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:6432").await?;
//! let proxy = sluice_proxy::Proxy::new(target, None);
//! proxy.serve(listener, Box::pin(std::future::pending())).await;
//! # Ok(())
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::{Error, RecordStream, Stop};
use sluice_pg::ConnectionSettings;
use sluice_pg::tls::Io;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

mod apply;
pub mod catalog;
mod consumer_table;
mod internal;
mod local;
mod login;
mod session;
mod statement;
pub mod wire;
mod write;

pub use catalog::{Catalog, Layout, NoTables, SyncWriter, SyncedTable};

/// How long a client may take from connecting to being logged in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the list of synced tables is used before it is asked for again.
const TABLES_FOR: Duration = Duration::from_secs(2);

/// Writes to synced tables: where to learn which tables are synced, the records stream the
/// accepted changes go into, and the `[proxy]` settings for them.
pub struct WriteBack {
    /// Which tables are synced, and how far consumers have applied.
    pub catalog: Arc<dyn Catalog>,
    /// The records stream.
    pub stream: Arc<dyn RecordStream>,
    /// Apply synced-table writes inside `BEGIN … COMMIT` (each at once, with a NOTICE).
    pub writes_in_transactions: bool,
    /// The most rows one statement may write upstream (default: the writer's own).
    pub max_rows_per_statement: Option<u64>,
}

/// What every session shares.
pub(crate) struct Shared {
    /// Where the target is (the client's own user name replaces the configured one).
    target: ConnectionSettings,
    /// TLS to clients, when configured.
    tls: Option<TlsAcceptor>,
    /// Writes to synced tables; without it everything passes through.
    write_back: Option<Arc<WriteBack>>,
    /// The synced tables, and when they were last asked for.
    tables: tokio::sync::Mutex<(Option<Instant>, Arc<Vec<SyncedTable>>)>,
}

impl Shared {
    /// The synced tables, asked for again when the last answer is older than [`TABLES_FOR`].
    async fn tables(&self) -> Arc<Vec<SyncedTable>> {
        let Some(write_back) = &self.write_back else {
            return Arc::default();
        };
        let mut cached = self.tables.lock().await;
        if cached.0.is_none_or(|at| at.elapsed() > TABLES_FOR) {
            *cached = (
                Some(Instant::now()),
                Arc::new(write_back.catalog.synced_tables().await),
            );
        }
        cached.1.clone()
    }

    /// A new connection to the target, encrypted as the target's `sslmode` says; `true` when
    /// it is.
    async fn connect_target(&self) -> Result<(Box<dyn Io>, bool), Error> {
        let endpoint = self.target.endpoint();
        let tcp = tokio::time::timeout(
            self.target.connect_timeout,
            TcpStream::connect((self.target.host.as_str(), self.target.port)),
        )
        .await
        .map_err(|_| Error::unavailable(format!("connecting to {endpoint}"), "timed out"))?
        .map_err(|e| Error::unavailable(format!("connecting to {endpoint}"), e))?;
        let _ = tcp.set_nodelay(true);
        sluice_pg::tls::negotiate(tcp, &self.target).await
    }
}

/// The proxy in front of one target.
pub struct Proxy {
    shared: Arc<Shared>,
}

impl Proxy {
    /// A proxy in front of the target at `target` (its host, port and TLS settings; clients
    /// bring their own user and password), serving clients over TLS with `tls` when given.
    pub fn new(target: ConnectionSettings, tls: Option<TlsAcceptor>) -> Self {
        Self::with_write_back(target, tls, None)
    }

    /// Like [`Proxy::new`], applying writes to synced tables upstream first as `write_back`
    /// says.
    pub fn with_write_back(
        target: ConnectionSettings,
        tls: Option<TlsAcceptor>,
        write_back: Option<WriteBack>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                target,
                tls,
                write_back: write_back.map(Arc::new),
                tables: tokio::sync::Mutex::new((None, Arc::default())),
            }),
        }
    }

    /// Serves clients from `listener` until `stop` resolves; sessions still open then are
    /// closed.
    pub async fn serve(&self, listener: TcpListener, mut stop: Stop) {
        // Sessions run on a few threads of their own, each with a single-threaded runtime, and
        // a session stays on its thread: a message read from one socket is written to the other
        // by the thread that woke for it, with no hand-over between threads (the latency a
        // multi-threaded runtime adds measured at ~150 µs per round trip here; see
        // `cargo xtask bench proxy`).
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8);
        let mut workers = Vec::with_capacity(threads);
        let mut finished = Vec::with_capacity(threads);
        for i in 0..threads {
            let (to_worker, from_acceptor) =
                tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
            let (done, worker_done) = tokio::sync::oneshot::channel::<()>();
            let shared = self.shared.clone();
            let started = std::thread::Builder::new()
                .name(format!("sluice-proxy-{i}"))
                .spawn(move || worker(shared, from_acceptor, done));
            match started {
                Ok(_) => {
                    workers.push(to_worker);
                    finished.push(worker_done);
                }
                Err(e) => tracing::error!(error = %e, "proxy: cannot start a session thread"),
            }
        }
        if workers.is_empty() {
            tracing::error!("proxy: no session thread could start; not serving");
            return;
        }
        let mut next = 0;
        loop {
            let accepted = tokio::select! {
                () = &mut stop => break,
                accepted = listener.accept() => accepted,
            };
            match accepted.and_then(|(tcp, peer)| {
                let _ = tcp.set_nodelay(true);
                Ok((tcp.into_std()?, peer))
            }) {
                Ok(client) => {
                    let _ = workers[next % workers.len()].send(client);
                    next += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "proxy: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        // Closing the channels ends the threads, which close their sessions.
        drop(workers);
        for worker in finished {
            let _ = worker.await;
        }
    }
}

/// One session thread: serves the clients it is handed until the acceptor is gone.
fn worker(
    shared: Arc<Shared>,
    mut clients: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    done: tokio::sync::oneshot::Sender<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "proxy: cannot start a session runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let mut sessions = JoinSet::new();
        loop {
            tokio::select! {
                client = clients.recv() => match client {
                    Some((tcp, peer)) => match TcpStream::from_std(tcp) {
                        Ok(tcp) => {
                            sessions.spawn(serve_client(shared.clone(), tcp, peer));
                        }
                        Err(e) => tracing::warn!(error = %e, "proxy: a connection could not be taken"),
                    },
                    None => break,
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        sessions.shutdown().await;
    });
    let _ = done.send(());
}

async fn serve_client(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let logged_in = match tokio::time::timeout(LOGIN_TIMEOUT, login::login(&shared, tcp)).await {
        Err(_) => {
            tracing::debug!(%peer, "proxy: a client took too long to log in");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "proxy: a login ended");
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(logged_in))) => logged_in,
    };
    tracing::debug!(%peer, user = logged_in.user, database = logged_in.database, "proxy: client logged in");
    if let Err(e) = session::Session::new(shared, logged_in).relay().await {
        tracing::debug!(%peer, error = %e, "proxy: a session ended");
    }
}

//! `sluice serve`: runs every sync and consumer of the config, reconciles when the config
//! changes (SIGHUP or the file's modification time), and stops cleanly on SIGTERM / SIGINT.
//! Only assembly lives here: the work is done by the crates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_consumer::{ConsumerHandle, ConsumerRuntime};
use sluice_core::sql::quote_ident;
use sluice_core::{
    Config, ConnectionConfig, ConsumerConfig, EntityKind, EntityRef, Error, Health, HealthReport,
    LayoutConfig, RecordFilter, RecordStream, SourceConfig, Status, SyncConfig, Target,
    TargetConfig, TunnelConfig,
};
use sluice_source_pg::{PostgresSource, SourceOptions, SourceSpec};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{
    ConnectionSettings, ConsumerTable, ConsumerTableTarget, JsonCollection, SchemaMirrorTarget,
};
use time::OffsetDateTime;
use tokio::sync::{RwLock, watch};

/// A running task and the switch that stops it.
struct Task {
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
    /// Tunnels the task's connections go through; closed when the task ends.
    _tunnels: Vec<sluice_tunnel::BastionTunnel>,
}

impl Task {
    async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.join.await;
    }
}

pub enum SyncKind {
    Postgres(PostgresSource),
    Http,
}

pub struct SyncEntry {
    pub config: SyncConfig,
    pub kind: SyncKind,
    /// Records accepted by the push API (http syncs).
    pub pushed: AtomicU64,
    task: Option<Task>,
}

pub struct ConsumerEntry {
    pub config: ConsumerConfig,
    pub filter: RecordFilter,
    pub handle: ConsumerHandle,
    pub target: Arc<dyn Target>,
    /// The consumer's definition including its target's, to notice changes.
    fingerprint: String,
    task: Option<Task>,
}

pub struct TargetEntry {
    pub config: TargetConfig,
}

/// Everything `serve` runs.
#[derive(Default)]
pub struct Entities {
    pub syncs: BTreeMap<String, SyncEntry>,
    pub consumers: BTreeMap<String, ConsumerEntry>,
    pub targets: BTreeMap<String, TargetEntry>,
    /// Consumers in the config that could not start, with why (tried again at each reload).
    pub failed_consumers: BTreeMap<String, HealthReport>,
}

/// A report for an entity that is configured but not running, with the reason and its fix.
fn failed_report(kind: EntityKind, name: &str, check: &str, error: &Error) -> HealthReport {
    let mut state = sluice_core::HealthState::new(EntityRef {
        kind,
        name: name.to_owned(),
    });
    let message = error.to_string();
    state.observe(
        check,
        Status::Error,
        message.lines().next().unwrap_or_default().to_owned(),
        error.fix().map(str::to_owned),
        OffsetDateTime::now_utc(),
    );
    state.report()
}

pub struct Server {
    pub stream: Arc<EmbeddedStream>,
    pub entities: RwLock<Entities>,
    pub started_at: OffsetDateTime,
    /// Last version handed to a pushed record without one (nanoseconds; strictly increasing).
    push_clock: Mutex<u64>,
    /// The reverse-tunnel endpoint, when `[agents]` is configured.
    pub reverse: Option<sluice_tunnel::ReverseServer>,
    /// The last reload of the config file that was refused, until one is applied.
    pub rejected_reload: Mutex<Option<HealthReport>>,
}

impl Server {
    pub async fn open(config: &Config) -> Result<Arc<Self>, Error> {
        let stream = Arc::new(EmbeddedStream::open(&config.data_dir).await?);
        let reverse = match &config.agents {
            None => None,
            Some(agents) => Some(start_agents(agents).await?),
        };
        Ok(Arc::new(Self {
            stream,
            entities: RwLock::new(Entities::default()),
            started_at: OffsetDateTime::now_utc(),
            push_clock: Mutex::new(0),
            reverse,
            rejected_reload: Mutex::new(None),
        }))
    }

    /// A strictly increasing version for pushed records that carry none.
    pub fn next_push_version(&self, n: usize) -> u64 {
        let now = OffsetDateTime::now_utc().unix_timestamp_nanos().max(0) as u64;
        let mut clock = self.push_clock.lock().unwrap_or_else(|e| e.into_inner());
        let first = now.max(*clock + 1);
        *clock = first + n as u64;
        first
    }

    /// Brings the running syncs and consumers in line with `config`: stops what was removed
    /// or changed, starts what is new or changed, leaves the rest running. Problems with one
    /// entity are logged and reported in its health; they do not stop the others.
    pub async fn reconcile(&self, config: &Config) {
        let mut entities = self.entities.write().await;
        entities.targets = config
            .targets
            .iter()
            .map(|t| (t.name.clone(), TargetEntry { config: t.clone() }))
            .collect();

        // Syncs.
        let wanted: BTreeMap<&str, &SyncConfig> =
            config.syncs.iter().map(|s| (s.name.as_str(), s)).collect();
        let stale: Vec<String> = entities
            .syncs
            .iter()
            .filter(|(name, e)| wanted.get(name.as_str()).is_none_or(|c| **c != e.config))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(entry) = entities.syncs.remove(&name) {
                tracing::info!(sync = %name, "stopping sync");
                if let Some(task) = entry.task {
                    task.stop().await;
                }
            }
        }
        for (name, sync) in wanted {
            if entities.syncs.contains_key(name) {
                continue;
            }
            tracing::info!(sync = %name, provider = %sync.source.provider().as_str(), "starting sync");
            let entry = self.start_sync(sync).await;
            entities.syncs.insert(name.to_owned(), entry);
        }

        // Consumers (a consumer restarts when its own config or its target's changes).
        let mut wanted = BTreeMap::new();
        for consumer in &config.consumers {
            let target = config.targets.iter().find(|t| t.name == consumer.target);
            let fingerprint = format!("{consumer:?}{target:?}");
            wanted.insert(consumer.name.0.clone(), (consumer, target, fingerprint));
        }
        let stale: Vec<String> = entities
            .consumers
            .iter()
            .filter(|(name, e)| wanted.get(*name).is_none_or(|w| w.2 != e.fingerprint))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(entry) = entities.consumers.remove(&name) {
                tracing::info!(consumer = %name, "stopping consumer");
                let new_layout = wanted.get(&name).map(|w| &w.0.layout);
                if let (
                    LayoutConfig::SchemaMirror { schema: old, .. },
                    Some(LayoutConfig::SchemaMirror { schema: new, .. }),
                ) = (&entry.config.layout, new_layout)
                    && old != new
                {
                    tracing::warn!(
                        consumer = %name,
                        "the consumer now writes schema {} (backfilled from the records stream); schema {} is left as it was and no longer updated. When nothing uses it any more: drop schema {} cascade;",
                        quote_ident(new),
                        quote_ident(old),
                        quote_ident(old)
                    );
                }
                if let Some(task) = entry.task {
                    task.stop().await;
                }
            }
        }
        entities
            .failed_consumers
            .retain(|name, _| wanted.contains_key(name));
        for (name, (consumer, target, fingerprint)) in wanted {
            if entities.consumers.contains_key(&name) {
                continue;
            }
            let started = match target {
                None => Err(Error::configuration(
                    format!(
                        "the consumer's target {:?} is not configured",
                        consumer.target
                    ),
                    format!(
                        "add a [[target]] named {:?}, or set the consumer's target to one that exists",
                        consumer.target
                    ),
                )),
                Some(target) => {
                    self.start_consumer(config, consumer, target, fingerprint)
                        .await
                }
            };
            match started {
                Ok(entry) => {
                    tracing::info!(consumer = %name, target = %consumer.target, "started consumer");
                    entities.failed_consumers.remove(&name);
                    entities.consumers.insert(name, entry);
                }
                Err(e) => {
                    tracing::error!(consumer = %name, error = %e, "cannot start consumer");
                    let report = failed_report(EntityKind::Consumer, &name, "start", &e);
                    entities.failed_consumers.insert(name, report);
                }
            }
        }
    }

    async fn start_sync(&self, sync: &SyncConfig) -> SyncEntry {
        let (kind, task) = match &sync.source {
            SourceConfig::Http {} => (SyncKind::Http, None),
            SourceConfig::Postgres {
                connection,
                publication,
                slot,
                create_missing,
            } => {
                let (settings, tunnels) = match settings_for(connection, self.reverse.as_ref())
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(sync = %sync.name, error = %e, "cannot reach the source");
                        // Keep an entry (health shows the problem) with settings that fail.
                        (failing_settings(connection), Vec::new())
                    }
                };
                let source = PostgresSource::new(
                    sync.name.clone(),
                    sync.id,
                    settings,
                    SourceSpec {
                        publication: publication.clone(),
                        slot: slot.clone(),
                    },
                    self.stream.clone(),
                    SourceOptions {
                        create_missing: *create_missing,
                        ..SourceOptions::default()
                    },
                );
                let (stop, stopped) = watch::channel(false);
                let join = tokio::spawn({
                    let source = source.clone();
                    async move { source.run(stopped).await }
                });
                (
                    SyncKind::Postgres(source),
                    Some(Task {
                        stop,
                        join,
                        _tunnels: tunnels,
                    }),
                )
            }
        };
        SyncEntry {
            config: sync.clone(),
            kind,
            pushed: AtomicU64::new(0),
            task,
        }
    }

    async fn start_consumer(
        &self,
        config: &Config,
        consumer: &ConsumerConfig,
        target: &TargetConfig,
        fingerprint: String,
    ) -> Result<ConsumerEntry, Error> {
        let filter = consumer.filter.resolve(&config.syncs)?;
        let (settings, tunnels) = settings_for(&target.connection, self.reverse.as_ref()).await?;
        let target_impl: Arc<dyn Target> = match &consumer.layout {
            LayoutConfig::ConsumerTable { schema, table } => Arc::new(
                ConsumerTableTarget::new(
                    target.name.clone(),
                    settings,
                    ConsumerTable::new(schema, table),
                    1,
                )
                .create_if_missing(&target.read_role),
            ),
            LayoutConfig::SchemaMirror {
                schema,
                collections,
            } => Arc::new(SchemaMirrorTarget::new(
                target.name.clone(),
                settings,
                schema.clone(),
                target.read_role.clone(),
                self.stream.clone(),
                collections
                    .iter()
                    .map(|(id, c)| {
                        (
                            id.clone(),
                            JsonCollection {
                                table: c.table.clone(),
                                schema: c.json_schema.clone(),
                            },
                        )
                    })
                    .collect(),
            )),
        };
        let runtime = ConsumerRuntime::new(
            consumer.name.clone(),
            filter.clone(),
            self.stream.clone(),
            target_impl.clone(),
            consumer.batch,
            consumer.lag,
        );
        let handle = runtime.handle();
        let (stop, stopped) = watch::channel(false);
        let join = tokio::spawn(runtime.run(stopped));
        Ok(ConsumerEntry {
            config: consumer.clone(),
            filter,
            handle,
            target: target_impl,
            fingerprint,
            task: Some(Task {
                stop,
                join,
                _tunnels: tunnels,
            }),
        })
    }

    /// Stops everything: each consumer finishes or abandons its in-flight batch safely (its
    /// checkpoint always matches the target), each source appends what it holds and confirms.
    pub async fn shutdown(&self) {
        let mut entities = self.entities.write().await;
        let consumers = std::mem::take(&mut entities.consumers);
        let syncs = std::mem::take(&mut entities.syncs);
        for (_, entry) in syncs {
            if let Some(task) = entry.task {
                task.stop().await;
            }
        }
        for (_, entry) in consumers {
            if let Some(task) = entry.task {
                task.stop().await;
            }
        }
    }

    /// Every entity's health, targets first.
    pub async fn health(&self) -> Vec<HealthReport> {
        let entities = self.entities.read().await;
        let mut reports = Vec::new();
        for name in entities.targets.keys() {
            reports.push(target_health(&entities, name).await);
        }
        for (name, sync) in &entities.syncs {
            reports.push(sync_health(name, sync).await);
        }
        for consumer in entities.consumers.values() {
            reports.push(consumer.handle.health().await);
        }
        reports.extend(entities.failed_consumers.values().cloned());
        let rejected = self
            .rejected_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        reports.extend(rejected);
        reports
    }

    /// Notes that a reload of the config was refused (`None`: the last one was applied).
    pub fn reload_refused(&self, why: Option<String>) {
        let report = why.map(|why| {
            failed_report(
                EntityKind::Config,
                "sluice.toml",
                "reload",
                &Error::configuration(
                    format!("the changed config was not applied, the previous one still runs: {why}"),
                    "correct the file (`sluice config check` shows each problem with its line); it is reloaded when saved",
                ),
            )
        });
        *self
            .rejected_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = report;
    }
}

pub async fn sync_health(name: &str, sync: &SyncEntry) -> HealthReport {
    match &sync.kind {
        SyncKind::Postgres(source) => source.health().await,
        SyncKind::Http => {
            let now = OffsetDateTime::now_utc();
            let mut state = sluice_core::HealthState::new(EntityRef {
                kind: EntityKind::Sync,
                name: name.to_owned(),
            });
            state.observe(
                "push",
                Status::Healthy,
                format!(
                    "accepting records at POST /v1/syncs/{name}/records ({} accepted since start)",
                    sync.pushed.load(Ordering::Relaxed)
                ),
                None,
                now,
            );
            state.report()
        }
    }
}

/// A target's health: its consumers' views of it (reachable, TLS, privileges, table, payload),
/// each check at the worst any consumer sees.
pub async fn target_health(entities: &Entities, name: &str) -> HealthReport {
    let mut merged: Option<HealthReport> = None;
    for c in entities
        .consumers
        .values()
        .filter(|c| c.config.target == name)
    {
        let view = c.target.health().await;
        match &mut merged {
            None => merged = Some(view),
            Some(report) => report.merge(&view),
        }
    }
    match merged {
        Some(mut report) => {
            report.entity = EntityRef {
                kind: EntityKind::Target,
                name: name.to_owned(),
            };
            report
        }
        None => {
            let mut state = sluice_core::HealthState::new(EntityRef {
                kind: EntityKind::Target,
                name: name.to_owned(),
            });
            state.observe(
                "consumers",
                Status::Healthy,
                "no consumer writes to this target",
                None,
                OffsetDateTime::now_utc(),
            );
            state.report()
        }
    }
}

/// Starts the reverse-tunnel endpoint with the registered agents.
async fn start_agents(
    config: &sluice_core::AgentsConfig,
) -> Result<sluice_tunnel::ReverseServer, Error> {
    let problem = |e: sluice_tunnel::TunnelError| {
        Error::configuration(
            format!("[agents]: {e}"),
            "check [agents] listen, host_key_file and each agent's public_key",
        )
    };
    let bind: std::net::SocketAddr = config.listen.parse().map_err(|_| {
        Error::configuration(
            format!("[agents] listen = {:?} is not an address", config.listen),
            "use ip:port, e.g. 0.0.0.0:7722",
        )
    })?;
    let host_key = sluice_tunnel::keys::load_or_generate(&config.host_key_file).map_err(problem)?;
    let mut agents = Vec::new();
    for agent in &config.agents {
        let key = sluice_tunnel::keys::parse_public(&agent.public_key).map_err(problem)?;
        agents.push((agent.name.clone(), key));
    }
    let server = sluice_tunnel::ReverseServer::start(bind, host_key, agents)
        .await
        .map_err(problem)?;
    tracing::info!(
        address = %server.addr(),
        host_key_fingerprint = %server.host_key_fingerprint(),
        "agent endpoint listening (agents pin this fingerprint)"
    );
    Ok(server)
}

/// The tunnel to `connection`'s database through the configured bastion.
/// `None` when the connection names no bastion.
fn bastion_config(connection: &ConnectionConfig) -> Option<sluice_tunnel::BastionConfig> {
    let Some(TunnelConfig::Bastion {
        host,
        port,
        user,
        key_file,
        host_key_fingerprint,
    }) = &connection.tunnel
    else {
        return None;
    };
    let mut bastion = sluice_tunnel::BastionConfig::new(host, *port, user, key_file);
    bastion.host_key_fingerprint = host_key_fingerprint.clone();
    bastion.forward_host = connection.host.clone();
    bastion.forward_port = connection.port;
    Some(bastion)
}

/// Serves the API until `stopped` turns true (graceful: requests in flight finish).
pub fn spawn_api(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut stopped: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    })
}

/// Connection settings, through a bastion tunnel or an agent when the config names one.
async fn settings_for(
    connection: &ConnectionConfig,
    reverse: Option<&sluice_tunnel::ReverseServer>,
) -> Result<(ConnectionSettings, Vec<sluice_tunnel::BastionTunnel>), Error> {
    let mut settings = ConnectionSettings::from_config(connection)?;
    match &connection.tunnel {
        None => Ok((settings, Vec::new())),
        Some(TunnelConfig::Bastion { .. }) => {
            let bastion = bastion_config(connection).expect("a bastion tunnel");
            let tunnel = sluice_tunnel::BastionTunnel::open(bastion)
                .await
                .map_err(|e| {
                    Error::configuration(
                        format!("tunnel to {}: {e}", connection.host),
                        "run `sluice tunnel check` for each hop's status",
                    )
                })?;
            let local = tunnel.local_addr();
            settings.host = local.ip().to_string();
            settings.port = local.port();
            Ok((settings, vec![tunnel]))
        }
        Some(TunnelConfig::Agent { name }) => {
            let local = reverse.and_then(|r| r.local_addr_for(name)).ok_or_else(|| {
                Error::configuration(
                    format!("the connection to {} goes through agent {name:?}, which is not registered", connection.host),
                    "add it under [[agents.agent]] with the public key `sluice-agent keygen` printed",
                )
            })?;
            // Connections wait at the loopback address until the agent has dialled in.
            settings.host = local.ip().to_string();
            settings.port = local.port();
            Ok((settings, Vec::new()))
        }
    }
}

/// Settings that will fail with the same endpoint (so health shows where it was meant to go).
fn failing_settings(connection: &ConnectionConfig) -> ConnectionSettings {
    let mut s = ConnectionSettings::new(
        &connection.host,
        connection.port,
        &connection.database,
        &connection.user,
    );
    s.connect_timeout = Duration::from_secs(1);
    s
}

/// The config file's modification time, to notice edits.
pub fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Loads the config, with the error printed as `file:line:column: …`.
pub fn load(path: &Path) -> Result<Config, String> {
    Config::load(path).map_err(|e| e.to_string())
}

/// Runs until SIGTERM or SIGINT; reloads on SIGHUP and when the file changes.
pub async fn serve(path: PathBuf, listen: Option<String>) -> Result<(), String> {
    let config = load(&path)?;
    let problems = config.problems();
    if !problems.is_empty() {
        return Err(problems.join("\n"));
    }
    let server = Server::open(&config).await.map_err(|e| e.to_string())?;
    let token = config.api.token.resolve().map_err(|e| {
        format!("{e}\n  the API needs a bearer token: set it, or point [api] token at a file")
    })?;
    let listen = listen.unwrap_or_else(|| config.api.listen.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or(listen.clone()),
        data_dir = %config.data_dir.display(),
        "sluice serve: API listening"
    );
    server.reconcile(&config).await;
    let app = crate::api::router(server.clone(), token, config.api.max_body_bytes);
    let (stop_api, api_stopped) = watch::channel(false);
    let api = spawn_api(listener, app, api_stopped);

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut seen = modified(&path);
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    loop {
        let reload = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => true,
            _ = poll.tick() => {
                let now = modified(&path);
                let changed = now != seen;
                seen = now;
                changed
            }
        };
        if reload {
            match load(&path) {
                Ok(config) if config.problems().is_empty() => {
                    tracing::info!(file = %path.display(), "config changed: reconciling");
                    server.reload_refused(None);
                    server.reconcile(&config).await;
                }
                Ok(config) => {
                    let problems = config.problems().join("; ");
                    tracing::error!(problems = %problems, "config not applied");
                    server.reload_refused(Some(problems));
                }
                Err(e) => {
                    tracing::error!(error = %e, "config not applied");
                    server.reload_refused(Some(e));
                }
            }
        }
    }
    tracing::info!("shutting down: finishing in-flight batches and checkpointing");
    server.shutdown().await;
    stop_api.send_replace(true);
    let _ = api.await;
    tracing::info!("stopped");
    Ok(())
}

/// How far behind a consumer is, for metrics.
pub async fn consumer_lag(stream: &EmbeddedStream, entry: &ConsumerEntry) -> (u64, f64) {
    match stream
        .lag(&entry.filter, entry.handle.cursor(), 1_000_000_000)
        .await
    {
        Ok(lag) => {
            let seconds = lag
                .oldest_appended_at
                .map(|t| (OffsetDateTime::now_utc() - t).as_seconds_f64().max(0.0))
                .unwrap_or(0.0);
            (lag.records, seconds)
        }
        Err(_) => (0, 0.0),
    }
}

/// `sluice config plan`: what `serve` would create or change, found by connecting (as the
/// configured users) and looking. Nothing is changed. Returns the lines and whether every
/// entity can start.
pub async fn plan(config: &Config) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    for problem in config.problems() {
        lines.push(format!("config: {problem}"));
        ok = false;
    }
    for consumer in &config.consumers {
        let name = &consumer.name;
        let Some(target) = config.targets.iter().find(|t| t.name == consumer.target) else {
            continue; // reported by problems()
        };
        let (schema, table) = match &consumer.layout {
            LayoutConfig::ConsumerTable { schema, table } => (schema, table),
            LayoutConfig::SchemaMirror { schema, .. } => {
                let owner = async {
                    let (settings, _tunnels) = settings_for(&target.connection, None).await?;
                    let mut conn = settings.connect().await?;
                    let owner: Option<String> = sqlx::query_scalar(
                        "select pg_get_userbyid(nspowner)::text from pg_namespace where nspname = $1",
                    )
                    .bind(schema)
                    .fetch_optional(&mut conn)
                    .await
                    .map_err(|e| Error::unavailable("reading the catalog", e))?;
                    Ok::<_, Error>((owner, settings.user))
                }
                .await;
                let line = match owner {
                    Ok((None, user)) => format!(
                        "would create schema {} owned by {user}, with a typed table per collection",
                        quote_ident(schema)
                    ),
                    Ok((Some(owner), user)) if owner == user => format!(
                        "schema {} exists (owned by {user}): tables are created or extended per collection",
                        quote_ident(schema)
                    ),
                    Ok((Some(owner), _)) => {
                        ok = false;
                        format!(
                            "schema {} belongs to {owner}; sluice only writes into schemas its sync user owns",
                            quote_ident(schema)
                        )
                    }
                    Err(e) => {
                        ok = false;
                        e.to_string()
                    }
                };
                lines.push(format!("consumer {name} → target {}: {line}", target.name));
                continue;
            }
        };
        let table = ConsumerTable::new(schema, table);
        if let Some(TunnelConfig::Agent { name: agent }) = &target.connection.tunnel {
            lines.push(format!(
                "consumer {name} → target {}: through agent {agent:?}; {} is created if missing once the agent connects",
                target.name,
                table.qualified()
            ));
            continue;
        }
        let outcome = async {
            let (settings, _tunnels) = settings_for(&target.connection, None).await?;
            let mut conn = settings.connect().await?;
            let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
                .bind(table.qualified())
                .fetch_one(&mut conn)
                .await
                .map_err(|e| Error::unavailable("reading the catalog", e))?;
            if !exists {
                return Ok::<_, Error>(vec![format!(
                    "would create {} (and schema {} if missing) as {}, readable by {}",
                    table.qualified(),
                    quote_ident(schema),
                    settings.user,
                    target.read_role
                )]);
            }
            let v = table
                .verify(&mut conn)
                .await
                .map_err(|e| Error::unavailable("verifying the table", e))?;
            if v.findings.is_empty() {
                Ok(vec![format!(
                    "{} exists and is ready: no change",
                    table.qualified()
                )])
            } else {
                Ok(v.findings
                    .iter()
                    .map(|f| format!("{:?}: {} (fix: {})", f.severity, f.message, f.fix))
                    .collect())
            }
        }
        .await;
        match outcome {
            Ok(found) => {
                for line in found {
                    lines.push(format!("consumer {name} → target {}: {line}", target.name));
                }
            }
            Err(e) => {
                ok = false;
                lines.push(format!("consumer {name} → target {}: {e}", target.name));
            }
        }
    }
    for sync in &config.syncs {
        let name = &sync.name;
        match &sync.source {
            SourceConfig::Http {} => lines.push(format!(
                "sync {name}: accepts pushed records at POST /v1/syncs/{name}/records"
            )),
            SourceConfig::Postgres {
                connection,
                publication,
                slot,
                create_missing,
            } => {
                if let Some(TunnelConfig::Agent { name: agent }) = &connection.tunnel {
                    lines.push(format!(
                        "sync {name}: through agent {agent:?}; inspected once the agent connects"
                    ));
                    continue;
                }
                let outcome = async {
                    let (settings, _tunnels) = settings_for(connection, None).await?;
                    let mut conn = settings.connect().await?;
                    let (has_pub, has_slot): (bool, bool) = sqlx::query_as(
                        "select exists (select 1 from pg_publication where pubname = $1),
                                exists (select 1 from pg_replication_slots where slot_name = $2)",
                    )
                    .bind(publication)
                    .bind(slot)
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|e| Error::unavailable("reading the catalog", e))?;
                    Ok::<_, Error>((has_pub, has_slot))
                }
                .await;
                match outcome {
                    Ok((has_pub, has_slot)) => {
                        for (what, object, exists) in [
                            ("publication", publication, has_pub),
                            ("slot", slot, has_slot),
                        ] {
                            let line = match (exists, create_missing) {
                                (true, _) => format!("adopt the existing {what} {object}"),
                                (false, true) => format!("would create the {what} {object}"),
                                (false, false) => {
                                    ok = false;
                                    format!(
                                        "the {what} {object} is missing and create_missing is false: run `sluice source check` for the SQL"
                                    )
                                }
                            };
                            lines.push(format!("sync {name}: {line}"));
                        }
                        lines.push(format!(
                            "sync {name}: backfill every published table not yet read, then stream"
                        ));
                    }
                    Err(e) => {
                        ok = false;
                        lines.push(format!("sync {name}: {e}"));
                    }
                }
            }
        }
    }
    (lines, ok)
}

/// `sluice check`: every target and sync of the config, hop by hop for tunnelled connections
/// (bastion reachable, host key, key accepted, forward allowed, database reachable), then the
/// connection itself (and, for a Postgres source, its replication prerequisites).
pub async fn check(config: &Config) -> Vec<(EntityRef, sluice_core::CheckReport)> {
    let mut out = Vec::new();
    let entities = config
        .targets
        .iter()
        .map(|t| {
            (
                EntityRef {
                    kind: EntityKind::Target,
                    name: t.name.clone(),
                },
                &t.connection,
                None,
            )
        })
        .chain(config.syncs.iter().filter_map(|s| match &s.source {
            SourceConfig::Postgres {
                connection,
                publication,
                slot,
                ..
            } => Some((
                EntityRef {
                    kind: EntityKind::Sync,
                    name: s.name.clone(),
                },
                connection,
                Some(SourceSpec {
                    publication: publication.clone(),
                    slot: slot.clone(),
                }),
            )),
            SourceConfig::Http {} => None,
        }));
    for (entity, connection, source) in entities {
        let mut report = sluice_core::CheckReport::default();
        match &connection.tunnel {
            Some(TunnelConfig::Bastion { .. }) => {
                let bastion = bastion_config(connection).expect("a bastion tunnel");
                for (hop, status) in sluice_tunnel::BastionTunnel::hops(&bastion).await {
                    let name = format!("tunnel: {hop}");
                    match status {
                        Some(Ok(())) => report.push(&name, true, "ok", None),
                        Some(Err(message)) => report.push(&name, false, message, None),
                        None => report.push(&name, false, "not reached", None),
                    }
                }
            }
            Some(TunnelConfig::Agent { name }) => {
                report.push(
                    "tunnel: agent",
                    true,
                    format!("through agent {name:?}: reachable while the agent is connected to `sluice serve` (see `sluice status`)"),
                    None,
                );
                out.push((entity, report));
                continue;
            }
            None => {}
        }
        if !report.is_ok() {
            out.push((entity, report));
            continue;
        }
        let (settings, _tunnels) = match settings_for(connection, None).await {
            Ok(s) => s,
            Err(e) => {
                report.push("connect", false, e.to_string(), e.fix().map(str::to_owned));
                out.push((entity, report));
                continue;
            }
        };
        let connection_report = match &source {
            Some(spec) => sluice_source_pg::check(&settings, spec).await,
            None => {
                settings
                    .check_with(async |conn, report| {
                        let facts = sluice_target_pg::catalog::server_facts(conn).await?;
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
        };
        report.findings.extend(connection_report.findings);
        out.push((entity, report));
    }
    out
}

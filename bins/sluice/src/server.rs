//! `sluice serve`: runs every sync and consumer of the config, reconciles when the config
//! changes (SIGHUP or the file's modification time), and stops cleanly on SIGTERM / SIGINT.
//! Only assembly lives here: the work is done by the crates. [`source_for`] is the one place
//! a sync's config becomes a [`Source`]; everything else handles every source alike.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_consumer::ConsumerHandle;
use sluice_core::{
    Config, ConsumerConfig, EntityKind, EntityRef, Error, HealthReport, RecordFilter, RecordStream,
    Source, SourceConfig, Status, SyncConfig, Target, TargetConfig,
};
use sluice_source_http::HttpSource;
use sluice_source_pg::{PostgresSource, SourceOptions, SourceSpec};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::ConnectionSettings;

use crate::connect::{failing_settings, start_agents};
use crate::health::HealthCache;
use crate::reconcile::Failed;
use time::OffsetDateTime;
use tokio::sync::{RwLock, watch};

/// A running task and the switch that stops it.
pub(crate) struct Task {
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) join: tokio::task::JoinHandle<()>,
    /// Tunnels the task's connections go through; closed when the task ends.
    pub(crate) _tunnels: Vec<sluice_tunnel::BastionTunnel>,
}

impl Task {
    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.join.await;
    }
}

pub struct SyncEntry {
    pub config: SyncConfig,
    pub source: Arc<dyn Source>,
    pub(crate) task: Option<Task>,
}

/// The source a sync's config names. `settings`: where its database is (through its tunnel),
/// for sources that read one; `None` when it could not be reached, so the source reports that
/// endpoint failing in its health. Adding a kind of source means one arm here.
pub fn source_for(
    sync: &SyncConfig,
    stream: Arc<EmbeddedStream>,
    settings: Option<ConnectionSettings>,
) -> Arc<dyn Source> {
    match &sync.source {
        SourceConfig::Http { webhook } => {
            let source = HttpSource::new(sync.name.clone(), sync.id, stream);
            Arc::new(match webhook {
                Some(webhook) => source.with_webhook(
                    webhook.url.clone(),
                    webhook.secret.as_ref().and_then(|s| s.resolve().ok()),
                ),
                None => source,
            })
        }
        SourceConfig::Stripe(stripe) => Arc::new(sluice_source_stripe::source(
            &sync.name, sync.id, stripe, stream,
        )),
        SourceConfig::Postgres {
            connection,
            publication,
            slot,
            create_missing,
            writer,
            failover_slot,
            slot_lag_warning_bytes,
            backfill_readers,
        } => {
            let settings = settings.unwrap_or_else(|| failing_settings(connection));
            // The writer role reaches the source the way the sync does (tunnel included).
            let writer = writer.as_ref().map(|login| {
                let mut writer = settings.clone();
                writer.user = login.user.clone();
                writer.password = login.password.as_ref().and_then(|p| p.resolve().ok());
                writer.application_name = "sluice writer".into();
                writer
            });
            Arc::new(PostgresSource::new(
                sync.name.clone(),
                sync.id,
                settings,
                SourceSpec {
                    publication: publication.clone(),
                    slot: slot.clone(),
                    failover: *failover_slot,
                },
                stream,
                {
                    let defaults = SourceOptions::default();
                    SourceOptions {
                        create_missing: *create_missing,
                        slot_lag_warning_bytes: slot_lag_warning_bytes
                            .unwrap_or(defaults.slot_lag_warning_bytes),
                        backfill_readers: backfill_readers.unwrap_or(defaults.backfill_readers),
                        writer,
                        ..defaults
                    }
                },
            ))
        }
    }
}

pub struct ConsumerEntry {
    pub config: ConsumerConfig,
    pub filter: RecordFilter,
    pub handle: ConsumerHandle,
    pub target: Arc<dyn Target>,
    /// The consumer's definition including its target's, to notice changes.
    pub(crate) fingerprint: String,
    pub(crate) task: Option<Task>,
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
    /// Syncs in the config that could not start, with why; tried again until they run.
    pub failed_syncs: BTreeMap<String, Failed>,
    /// Consumers in the config that could not start, with why; tried again until they run.
    pub failed_consumers: BTreeMap<String, Failed>,
}

/// A report for an entity that is configured but not running, with the reason and its fix.
pub(crate) fn failed_report(
    kind: EntityKind,
    name: &str,
    check: &str,
    error: &Error,
) -> HealthReport {
    let mut state = sluice_core::HealthState::new(EntityRef {
        kind,
        name: name.to_owned(),
    });
    state.observe(
        check,
        Status::Error,
        error.problem(),
        error.fix().map(str::to_owned),
        OffsetDateTime::now_utc(),
    );
    state.report()
}

pub struct Server {
    pub stream: Arc<EmbeddedStream>,
    pub entities: RwLock<Entities>,
    pub started_at: OffsetDateTime,
    /// The reverse-tunnel endpoint, when `[agents]` is configured.
    pub reverse: Option<sluice_tunnel::ReverseServer>,
    /// The last reload of the config file that was refused, until one is applied.
    pub rejected_reload: Mutex<Option<HealthReport>>,
    /// The config last reconciled (failed starts are retried against it).
    pub(crate) applied: Mutex<Option<Config>>,
    /// Reconciles run one at a time.
    pub(crate) reconciling: tokio::sync::Mutex<()>,
    /// Every entity's latest health (see `health`).
    pub(crate) health: Arc<HealthCache>,
    /// Turns health changes into alerts (`[alerts]`).
    pub(crate) alerter: sluice_alerts::Alerter,
    /// The config file `serve` runs (none for the demo): the API's writes check it.
    pub(crate) config_path: std::sync::OnceLock<PathBuf>,
    /// The API's writes run one at a time.
    pub(crate) writes: tokio::sync::Mutex<()>,
    /// The console's chart data.
    pub(crate) samples: Mutex<crate::console::samples::Samples>,
}

impl Server {
    pub async fn open(config: &Config) -> Result<Arc<Self>, Error> {
        let stream = Arc::new(EmbeddedStream::open(&config.data_dir).await?);
        let reverse = match &config.agents {
            None => None,
            Some(agents) => Some(start_agents(agents).await?),
        };
        let health = Arc::new(HealthCache::default());
        let alerter = sluice_alerts::Alerter::new(sluice_alerts::channels(&config.alerts)?);
        let server = Arc::new(Self {
            alerter,
            stream,
            entities: RwLock::new(Entities::default()),
            started_at: OffsetDateTime::now_utc(),
            reverse,
            rejected_reload: Mutex::new(None),
            applied: Mutex::new(None),
            reconciling: tokio::sync::Mutex::new(()),
            health: health.clone(),
            config_path: std::sync::OnceLock::new(),
            writes: tokio::sync::Mutex::new(()),
            samples: Mutex::new(Default::default()),
        });
        tokio::spawn(crate::health::refresh_loop(Arc::downgrade(&server), health));
        Ok(server)
    }

    /// Stops everything: each consumer finishes or abandons its in-flight batch safely (its
    /// checkpoint always matches the target), each source appends what it holds and confirms.
    pub async fn shutdown(&self) {
        let _no_reconcile_meanwhile = self.reconciling.lock().await;
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

    /// The config last applied (`None` until the first reconcile).
    pub(crate) fn applied_config(&self) -> Option<Config> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        self.health_changed();
    }
}

/// A [`Stop`](sluice_core::Stop) that resolves when `switch` turns true (or is dropped).
pub fn stop_when(mut switch: watch::Receiver<bool>) -> sluice_core::Stop {
    Box::pin(async move {
        let _ = switch.wait_for(|stop| *stop).await;
    })
}

/// A target's health: its consumers' views of it (reachable, TLS, privileges, table, payload),
/// each check at the worst any consumer sees. A target no consumer writes to yet is reached
/// directly (`connection`), so a wrong host or password shows before the first consumer.
pub async fn target_health(
    entity: EntityRef,
    views: Vec<Arc<dyn Target>>,
    connection: Option<sluice_core::ConnectionConfig>,
) -> HealthReport {
    let mut merged: Option<HealthReport> = None;
    for target in views {
        let view = target.health().await;
        match &mut merged {
            None => merged = Some(view),
            Some(report) => report.merge(&view),
        }
    }
    if let Some(mut report) = merged {
        report.entity = entity;
        return report;
    }
    let mut state = sluice_core::HealthState::new(entity);
    let now = OffsetDateTime::now_utc();
    match connection.filter(|c| c.tunnel.is_none()) {
        Some(connection) => match ConnectionSettings::from_config(&connection) {
            Ok(settings) => match settings.connect().await {
                Ok(_) => state.observe(
                    "reachable",
                    Status::Healthy,
                    format!(
                        "connected to {}:{} as {}; no consumer writes to it yet",
                        settings.host, settings.port, settings.user
                    ),
                    None,
                    now,
                ),
                Err(e) => state.observe(
                    e.check_name(),
                    Status::Error,
                    e.to_string(),
                    e.health_fix(),
                    now,
                ),
            },
            Err(e) => state.observe(
                "reachable",
                Status::Error,
                e.problem(),
                e.fix().map(str::to_owned),
                now,
            ),
        },
        None => state.observe(
            "consumers",
            Status::Healthy,
            "no consumer writes to this target (it is reached through a tunnel when one does)",
            None,
            now,
        ),
    };
    state.report()
}

/// Serves the API until `stopped` turns true (graceful: requests in flight finish).
pub fn spawn_api(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut stopped: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
    })
}

/// The config file's modification time, to notice edits.
pub fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Loads the config that runs (the file and what the API created), with an error printed
/// as `file:line:column: …`.
pub fn load(path: &Path) -> Result<Config, String> {
    Config::load_running(path)
}

/// Runs until SIGTERM or SIGINT; reloads on SIGHUP and when the file changes. With `proxy`
/// (`sluice proxy`), the config must have `[proxy]`, listening where `proxy` says if it says.
pub async fn serve(
    path: PathBuf,
    listen: Option<String>,
    proxy: Option<Option<String>>,
) -> Result<(), String> {
    let mut config = load(&path)?;
    if let Some(listen) = proxy {
        let Some(section) = config.proxy.as_mut() else {
            return Err(format!(
                "{} has no [proxy] section; add one with listen and target (docs/proxy.md)",
                path.display()
            ));
        };
        if let Some(listen) = listen {
            section.listen = listen;
        }
    }
    let problems = config.problems();
    if !problems.is_empty() {
        let all: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        return Err(all.join("\nerror: "));
    }
    let server = Server::open(&config).await.map_err(|e| e.to_string())?;
    let _ = server.config_path.set(path.clone());
    let token = config.api.token.resolve().map_err(|e| {
        format!("{e}\n  the API needs a bearer token: set it, or point [api] token at a file")
    })?;
    let tls = match &config.api.tls {
        Some(tls) => Some(crate::https::acceptor(tls)?),
        None => None,
    };
    let listen = listen.unwrap_or_else(|| config.api.listen.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or(listen.clone()),
        data_dir = %config.data_dir.display(),
        https = tls.is_some(),
        "sluice serve: API and console listening"
    );
    let console_password = match &config.api.console_password {
        Some(source) => Some(source.resolve().map_err(|e| {
            format!("{e}\n  [api] console_password is read at start; set it, or remove it to log in to the console with the API token")
        })?),
        None => None,
    };
    server.reconcile(&config).await;
    let (stop_proxy, proxy_stopped) = watch::channel(false);
    let proxy = crate::proxy::start(&server, &config, proxy_stopped).await?;
    let app = crate::api::router(
        server.clone(),
        token,
        console_password,
        tls.is_some(),
        config.api.max_body_bytes,
    );
    let (stop_api, api_stopped) = watch::channel(false);
    let api = match &tls {
        Some(acceptor) => crate::https::spawn(listener, app, acceptor.clone(), api_stopped),
        None => spawn_api(listener, app, api_stopped),
    };

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut seen = modified(&path);
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    // What could not start is tried again in the background (starting may take seconds).
    let retries = tokio::spawn({
        let server = server.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                server.retry_failed().await;
            }
        }
    });
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
                    match sluice_alerts::channels(&config.alerts) {
                        Ok(channels) => {
                            tracing::info!(file = %path.display(), "config changed: reconciling");
                            server.alerter.set_channels(channels);
                            server.reload_refused(None);
                            server.reconcile(&config).await;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "config not applied");
                            server.reload_refused(Some(format!("[alerts]: {e}")));
                        }
                    }
                }
                Ok(config) => {
                    let problems: Vec<String> =
                        config.problems().iter().map(|p| p.to_string()).collect();
                    let problems = problems.join("; ");
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
    retries.abort();
    let _ = retries.await;
    stop_proxy.send_replace(true);
    if let Some(proxy) = proxy {
        let _ = proxy.await;
    }
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

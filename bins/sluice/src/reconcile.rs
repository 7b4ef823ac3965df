//! Bringing what runs in line with the config, and starting again what could not start.
//!
//! Every sync and consumer of the config is registered, whatever happens at start: one that
//! cannot start (a bastion still booting, a wrong pin, a target's tunnel down) is kept as
//! [`Failed`], reported with the reason and its fix, and tried again by the error's class
//! (`Retry` soon and then less often, `FixConfiguration` no more often than every 5 s) until it
//! runs. A changed definition is tried at once.
//!
//! Starting can be slow (a tunnel's SSH handshake times out after seconds), so it happens
//! outside the entities' lock: the API and health keep answering meanwhile. Reconciles run one
//! at a time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sluice_consumer::ConsumerRuntime;
use sluice_core::sql::quote_ident;
use sluice_core::{
    Backoff, Config, ConsumerConfig, EntityKind, Error, HealthReport, LayoutConfig, SyncConfig,
    Target, TargetConfig,
};
use sluice_target_pg::{ConsumerTable, ConsumerTableTarget, JsonCollection, SchemaMirrorTarget};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::connect::settings_for;
use crate::server::{
    ConsumerEntry, Server, SyncEntry, TargetEntry, Task, failed_report, source_for, stop_when,
};

/// A sync or consumer of the config that is not running because it could not start.
pub struct Failed {
    /// Its health: `error`, with why and the fix.
    pub report: HealthReport,
    /// The definition it failed with: a changed one is tried at once.
    fingerprint: String,
    backoff: Backoff,
    next_try: Instant,
}

impl Failed {
    fn new(
        kind: EntityKind,
        name: &str,
        fingerprint: String,
        error: &Error,
        previous: Option<Failed>,
    ) -> Self {
        let mut backoff = previous
            .filter(|p| p.fingerprint == fingerprint)
            .map(|p| p.backoff)
            .unwrap_or_else(|| Backoff::new(Duration::from_millis(500), Duration::from_secs(30)));
        let delay = backoff.next_delay_after(error.class());
        let mut report = failed_report(kind, name, "start", error);
        for check in &mut report.checks {
            check.message = format!(
                "cannot start (tried again in {}s): {}",
                delay.as_secs().max(1),
                check.message
            );
        }
        Self {
            report,
            fingerprint,
            backoff,
            next_try: Instant::now() + delay,
        }
    }

    /// Whether to try starting it now, as defined by `fingerprint`.
    fn due(&self, fingerprint: &str) -> bool {
        self.fingerprint != fingerprint || Instant::now() >= self.next_try
    }
}

/// The identity of a definition, to notice a change (kept in memory only).
fn fingerprint_of(sync: &SyncConfig) -> String {
    format!("{sync:?}")
}

fn consumer_fingerprint(consumer: &ConsumerConfig, target: Option<&TargetConfig>) -> String {
    format!("{consumer:?}{target:?}")
}

impl Server {
    /// Brings the running syncs and consumers in line with `config`: stops what was removed
    /// or changed, starts what is new or changed (and what failed to start before, when its
    /// retry is due), leaves the rest running. Problems with one entity are logged and
    /// reported in its health; they do not stop the others.
    pub async fn reconcile(&self, config: &Config) {
        let _one_at_a_time = self.reconciling.lock().await;
        *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = Some(config.clone());

        let wanted_syncs: BTreeMap<&str, &SyncConfig> =
            config.syncs.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut wanted_consumers = BTreeMap::new();
        for consumer in &config.consumers {
            let target = config.targets.iter().find(|t| t.name == consumer.target);
            let fingerprint = consumer_fingerprint(consumer, target);
            wanted_consumers.insert(consumer.name.0.clone(), (consumer, target, fingerprint));
        }

        // What to stop and what to start, decided under the lock without waiting on anything.
        let (stop_syncs, stop_consumers, start_syncs, start_consumers) = {
            let mut entities = self.entities.write().await;
            entities.targets = config
                .targets
                .iter()
                .map(|t| (t.name.clone(), TargetEntry { config: t.clone() }))
                .collect();
            let stale: Vec<String> = entities
                .syncs
                .iter()
                .filter(|(name, e)| {
                    wanted_syncs
                        .get(name.as_str())
                        .is_none_or(|c| **c != e.config)
                })
                .map(|(name, _)| name.clone())
                .collect();
            let stop_syncs: Vec<(String, SyncEntry)> = stale
                .into_iter()
                .filter_map(|name| entities.syncs.remove(&name).map(|e| (name, e)))
                .collect();
            entities
                .failed_syncs
                .retain(|name, _| wanted_syncs.contains_key(name.as_str()));
            let start_syncs: Vec<SyncConfig> = wanted_syncs
                .iter()
                .filter(|(name, sync)| {
                    !entities.syncs.contains_key(**name)
                        && entities
                            .failed_syncs
                            .get(**name)
                            .is_none_or(|f| f.due(&fingerprint_of(sync)))
                })
                .map(|(_, sync)| (*sync).clone())
                .collect();

            let stale: Vec<String> = entities
                .consumers
                .iter()
                .filter(|(name, e)| {
                    wanted_consumers
                        .get(*name)
                        .is_none_or(|w| w.2 != e.fingerprint)
                })
                .map(|(name, _)| name.clone())
                .collect();
            let stop_consumers: Vec<(String, ConsumerEntry)> = stale
                .into_iter()
                .filter_map(|name| entities.consumers.remove(&name).map(|e| (name, e)))
                .collect();
            entities
                .failed_consumers
                .retain(|name, _| wanted_consumers.contains_key(name));
            let start_consumers: Vec<(ConsumerConfig, Option<TargetConfig>, String)> =
                wanted_consumers
                    .iter()
                    .filter(|(name, (_, _, fingerprint))| {
                        !entities.consumers.contains_key(*name)
                            && entities
                                .failed_consumers
                                .get(*name)
                                .is_none_or(|f| f.due(fingerprint))
                    })
                    .map(|(_, (c, t, f))| ((*c).clone(), t.cloned(), f.clone()))
                    .collect();
            (stop_syncs, stop_consumers, start_syncs, start_consumers)
        };

        for (name, entry) in stop_syncs {
            tracing::info!(sync = %name, "stopping sync");
            if let Some(task) = entry.task {
                task.stop().await;
            }
        }
        for (name, entry) in stop_consumers {
            tracing::info!(consumer = %name, "stopping consumer");
            let new_layout = wanted_consumers.get(&name).map(|w| &w.0.layout);
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

        for sync in start_syncs {
            tracing::info!(sync = %sync.name, provider = %sync.source.provider().as_str(), "starting sync");
            let started = self.start_sync(&sync).await;
            let mut entities = self.entities.write().await;
            let previous = entities.failed_syncs.remove(&sync.name);
            match started {
                Ok(entry) => {
                    entities.syncs.insert(sync.name.clone(), entry);
                }
                Err(e) => {
                    tracing::error!(sync = %sync.name, error = %e, "cannot start sync; trying again");
                    let failed = Failed::new(
                        EntityKind::Sync,
                        &sync.name,
                        fingerprint_of(&sync),
                        &e,
                        previous,
                    );
                    entities.failed_syncs.insert(sync.name.clone(), failed);
                }
            }
        }
        for (consumer, target, fingerprint) in start_consumers {
            let name = consumer.name.0.clone();
            let started = match &target {
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
                    self.start_consumer(config, &consumer, target, fingerprint.clone())
                        .await
                }
            };
            let mut entities = self.entities.write().await;
            let previous = entities.failed_consumers.remove(&name);
            match started {
                Ok(entry) => {
                    tracing::info!(consumer = %name, target = %consumer.target, "started consumer");
                    entities.consumers.insert(name, entry);
                }
                Err(e) => {
                    tracing::error!(consumer = %name, error = %e, "cannot start consumer; trying again");
                    let failed =
                        Failed::new(EntityKind::Consumer, &name, fingerprint, &e, previous);
                    entities.failed_consumers.insert(name, failed);
                }
            }
        }
        self.health_changed();
    }

    /// Starts again whatever could not start, once its retry is due (called every fraction of
    /// a second by `serve`; cheap when nothing is due).
    pub async fn retry_failed(&self) {
        let due = {
            let entities = self.entities.read().await;
            let now = Instant::now();
            entities
                .failed_syncs
                .values()
                .chain(entities.failed_consumers.values())
                .any(|f| now >= f.next_try)
        };
        if !due {
            return;
        }
        let applied = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(config) = applied {
            self.reconcile(&config).await;
        }
    }

    async fn start_sync(&self, sync: &SyncConfig) -> Result<SyncEntry, Error> {
        let (settings, tunnels) = match sync.source.connection() {
            None => (None, Vec::new()),
            Some(connection) => {
                let (settings, tunnels) = settings_for(connection, self.reverse.as_ref()).await?;
                (Some(settings), tunnels)
            }
        };
        let source = source_for(sync, self.stream.clone(), settings);
        let (stop, stopped) = watch::channel(false);
        let join = tokio::spawn({
            let source = source.clone();
            async move { source.run(stop_when(stopped)).await }
        });
        Ok(SyncEntry {
            config: sync.clone(),
            source,
            task: Some(Task {
                stop,
                join,
                _tunnels: tunnels,
            }),
        })
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
            LayoutConfig::ConsumerTable {
                schema,
                table,
                connections,
            } => Arc::new(
                ConsumerTableTarget::new(
                    target.name.clone(),
                    settings,
                    ConsumerTable::new(schema, table),
                    connections.unwrap_or(1),
                )
                .create_if_missing(&target.read_role),
            ),
            LayoutConfig::SchemaMirror {
                schema,
                collections,
                connections,
            } => Arc::new(
                SchemaMirrorTarget::new(
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
                )
                .with_connections(connections.unwrap_or(1)),
            ),
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
}

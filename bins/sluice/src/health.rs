//! Health served from memory: every entity's checks are run in the background, at most every
//! [`REFRESH_EVERY`] (and soon after a reconcile), each bounded by [`CHECK_TIMEOUT`]. `GET
//! /v1/status`, `/metrics` and `sluice status` read the latest reports and open no connection,
//! so they answer at once whatever is down.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use sluice_core::{Check, EntityKind, EntityRef, Health, HealthReport, Status};
use time::OffsetDateTime;
use tokio::task::JoinSet;

use crate::server::Server;

/// How often the checks run.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// The longest one entity's checks may take; past it, its previous report is kept, marked.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The latest report of each entity, and when it was stored.
#[derive(Default)]
pub struct HealthCache {
    reports: std::sync::Mutex<BTreeMap<EntityRef, (HealthReport, Instant)>>,
    changed: tokio::sync::Notify,
}

impl HealthCache {
    /// The latest report for `entity`, or one saying its first check is pending.
    pub fn get(&self, entity: &EntityRef) -> HealthReport {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(entity)
            .map(|(report, _)| report.clone())
            .unwrap_or_else(|| pending(entity.clone()))
    }
}

fn pending(entity: EntityRef) -> HealthReport {
    let mut state = sluice_core::HealthState::new(entity);
    state.observe(
        "health",
        Status::Initializing,
        "starting: the first check has not finished yet",
        None,
        OffsetDateTime::now_utc(),
    );
    state.report()
}

/// One entity's checks, as a task that owns what it needs.
type Job = std::pin::Pin<Box<dyn Future<Output = HealthReport> + Send>>;

impl Server {
    /// Asks for the checks to run soon (after a reconcile, a pause, a resume).
    pub fn health_changed(&self) {
        self.health.changed.notify_one();
    }

    /// Runs every entity's checks now (each bounded by [`CHECK_TIMEOUT`]) and keeps the
    /// reports. The entities' lock is held only to list them.
    pub async fn refresh_health(&self) {
        let started = Instant::now();
        // The checks to run, and which target each consumer writes to.
        let (jobs, writes_to): (Vec<(EntityRef, Job)>, Vec<_>) = {
            let entities = self.entities.read().await;
            let writes_to = entities
                .consumers
                .iter()
                .map(|(name, c)| (name.clone(), c.config.target.clone()))
                .collect::<Vec<(String, String)>>();
            let mut jobs: Vec<(EntityRef, Job)> = Vec::new();
            for (name, target) in &entities.targets {
                let views: Vec<Arc<dyn sluice_core::Target>> = entities
                    .consumers
                    .values()
                    .filter(|c| c.config.target == *name)
                    .map(|c| c.target.clone())
                    .collect();
                let entity = EntityRef {
                    kind: EntityKind::Target,
                    name: name.clone(),
                };
                jobs.push((
                    entity.clone(),
                    Box::pin(crate::server::target_health(
                        entity,
                        views,
                        Some(target.config.connection.clone()),
                    )),
                ));
            }
            for (name, sync) in &entities.syncs {
                let source = sync.source.clone();
                jobs.push((
                    EntityRef {
                        kind: EntityKind::Sync,
                        name: name.clone(),
                    },
                    Box::pin(async move { source.health().await }),
                ));
            }
            for (name, consumer) in &entities.consumers {
                let handle = consumer.handle.clone();
                jobs.push((
                    EntityRef {
                        kind: EntityKind::Consumer,
                        name: name.clone(),
                    },
                    Box::pin(async move { handle.health().await }),
                ));
            }
            (jobs, writes_to)
        };
        let mut running = JoinSet::new();
        for (entity, job) in jobs {
            running.spawn(async move { (entity, tokio::time::timeout(CHECK_TIMEOUT, job).await) });
        }
        let mut fresh = BTreeMap::new();
        while let Some(done) = running.join_next().await {
            let Ok((entity, report)) = done else { continue };
            let report = match report {
                Ok(report) => report,
                Err(_) => self.timed_out(&entity),
            };
            fresh.insert(entity, (report, started));
        }
        let mut reports = self
            .health
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A report stored while these checks ran (a pause answered at once) is newer than
        // what they saw: it stays.
        for (entity, entry) in fresh.iter_mut() {
            if let Some(newer) = reports.get(entity).filter(|(_, at)| *at > started) {
                *entry = newer.clone();
            }
        }
        for (consumer, target) in writes_to {
            let target_report = fresh
                .get(&EntityRef {
                    kind: EntityKind::Target,
                    name: target.clone(),
                })
                .map(|(r, _)| r.clone());
            let consumer_ref = EntityRef {
                kind: EntityKind::Consumer,
                name: consumer,
            };
            if let (Some(target_report), Some((report, _))) =
                (target_report, fresh.get_mut(&consumer_ref))
            {
                paused_by_target(report, &target, &target_report);
            }
        }
        *reports = fresh;
    }

    /// The previous report of an entity whose checks did not finish in time, saying so.
    fn timed_out(&self, entity: &EntityRef) -> HealthReport {
        let mut report = self.health.get(entity);
        let now = OffsetDateTime::now_utc();
        report.set_check(Check {
            name: "health".into(),
            status: Status::Warning,
            message: format!(
                "the checks did not finish within {}s; the others shown are from before",
                CHECK_TIMEOUT.as_secs()
            ),
            fix: None,
            since: now,
            last_ok_at: None,
        });
        report
    }

    /// Every entity's latest health, targets first, then syncs, consumers, what could not
    /// start, and a refused reload. Answers from memory.
    pub async fn health(&self) -> Vec<HealthReport> {
        let entities = self.entities.read().await;
        let mut reports = Vec::new();
        let mut add = |kind, name: &String| {
            reports.push(self.health.get(&EntityRef {
                kind,
                name: name.clone(),
            }))
        };
        for name in entities.targets.keys() {
            add(EntityKind::Target, name);
        }
        for name in entities.syncs.keys() {
            add(EntityKind::Sync, name);
        }
        for name in entities.consumers.keys() {
            add(EntityKind::Consumer, name);
        }
        reports.extend(entities.failed_syncs.values().map(|f| f.report.clone()));
        reports.extend(entities.failed_consumers.values().map(|f| f.report.clone()));
        let rejected = self
            .rejected_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        reports.extend(rejected);
        reports
    }

    /// Keeps `report` as its entity's latest (a check made outside the refresh).
    pub fn store_health(&self, report: HealthReport) {
        self.health
            .reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(report.entity.clone(), (report, Instant::now()));
    }

    /// Runs every check now and returns the reports (for the demo, which prints them).
    pub async fn health_now(&self) -> Vec<HealthReport> {
        self.refresh_health().await;
        self.health().await
    }

    /// The latest report of one entity.
    pub fn cached_health(&self, kind: EntityKind, name: &str) -> HealthReport {
        self.health.get(&EntityRef {
            kind,
            name: name.to_owned(),
        })
    }
}

/// A consumer whose target cannot be reached is paused, whether or not it has tried to write
/// since (an idle consumer would otherwise look healthy): its `target` check says so, with
/// the target's reason and fix.
fn paused_by_target(report: &mut HealthReport, target: &str, target_report: &HealthReport) {
    let Some(down) = target_report.checks.iter().find(|c| {
        c.status == Status::Error
            && matches!(c.name.as_str(), "reachable" | "authenticated" | "tls")
    }) else {
        return;
    };
    if report
        .checks
        .iter()
        .any(|c| c.name == "target" && c.status >= Status::Paused)
    {
        return; // it already says why
    }
    report.set_check(Check {
        name: "target".into(),
        status: Status::Paused,
        message: format!(
            "target {target:?} is unavailable ({}); writes resume by themselves when it is back",
            down.message
        ),
        fix: down.fix.clone(),
        since: down.since,
        last_ok_at: down.last_ok_at,
    });
}

/// Refreshes `server`'s health every [`REFRESH_EVERY`], or sooner when asked, until the server
/// is dropped.
pub async fn refresh_loop(server: Weak<Server>, cache: Arc<HealthCache>) {
    loop {
        match server.upgrade() {
            Some(server) => {
                server.refresh_health().await;
                let reports = server.health().await;
                server.alerter.observe(&reports);
                crate::console::samples::sample(&server).await;
            }
            None => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH_EVERY) => {}
            _ = cache.changed.notified() => {
                // A burst of changes is checked once.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

//! Health checks, overall status, and status transitions.

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The status of one check or one entity.
///
/// The variants are ordered by how much attention they need, so the overall status of an
/// entity is the greatest of its checks' statuses.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Working as configured.
    Healthy,
    /// Starting up or backfilling; not yet known to be healthy.
    Initializing,
    /// Working, but something needs attention soon (lag over the warning threshold).
    Warning,
    /// Deliberately or automatically not working (the user paused it, or its target is
    /// unreachable); it resumes by itself or on request.
    Paused,
    /// Not working; the check's message says why and what to do.
    Error,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Healthy => "healthy",
            Status::Initializing => "initializing",
            Status::Warning => "warning",
            Status::Paused => "paused",
            Status::Error => "error",
        })
    }
}

/// The kind of thing a health report is about.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum EntityKind {
    /// A configured source (a sync).
    Sync,
    /// A configured target database.
    Target,
    /// A configured consumer.
    Consumer,
    /// The configuration file itself (a reload that was refused).
    Config,
}

/// Which entity a report or transition is about.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub struct EntityRef {
    /// Its kind.
    pub kind: EntityKind,
    /// Its configured name.
    pub name: String,
}

impl fmt::Display for EntityRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            EntityKind::Sync => "sync",
            EntityKind::Target => "target",
            EntityKind::Consumer => "consumer",
            EntityKind::Config => "config",
        };
        write!(f, "{kind} {:?}", self.name)
    }
}

/// One named check of an entity (`reachable`, `privileges`, `lag`, …).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Check {
    /// Stable name of the check.
    pub name: String,
    /// Its current status.
    pub status: Status,
    /// What was found, for a person.
    pub message: String,
    /// What to do about it, when something is wrong and the fix is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// When the check entered its current status.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub since: OffsetDateTime,
    /// When the check was last healthy, if ever.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schemars(with = "Option<String>")]
    pub last_ok_at: Option<OffsetDateTime>,
}

/// The health of one entity: its checks and the overall status they add up to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HealthReport {
    /// The entity reported on.
    pub entity: EntityRef,
    /// The worst status among the checks ([`Status::Initializing`] with no checks yet).
    pub status: Status,
    /// Every check, by name.
    pub checks: Vec<Check>,
}

impl HealthReport {
    /// The checks that are not healthy, worst first: the reasons to show a person.
    pub fn problems(&self) -> Vec<&Check> {
        let mut problems: Vec<&Check> = self
            .checks
            .iter()
            .filter(|c| c.status != Status::Healthy)
            .collect();
        problems.sort_by_key(|c| std::cmp::Reverse(c.status));
        problems
    }

    /// Folds in another view of the same entity (one target seen by several consumers): each
    /// check keeps its worse state, checks only `other` has are added, and the overall status
    /// is the worst again.
    pub fn merge(&mut self, other: &HealthReport) {
        for check in &other.checks {
            match self.checks.iter_mut().find(|c| c.name == check.name) {
                Some(mine) if check.status > mine.status => *mine = check.clone(),
                Some(_) => {}
                None => self.checks.push(check.clone()),
            }
        }
        self.recompute();
    }

    /// Puts `check` in place of the check of the same name (or adds it), and the overall
    /// status is the worst again: a finding made outside the entity's own checks.
    pub fn set_check(&mut self, check: Check) {
        match self.checks.iter_mut().find(|c| c.name == check.name) {
            Some(mine) => *mine = check,
            None => self.checks.push(check),
        }
        self.recompute();
    }

    fn recompute(&mut self) {
        self.status = self
            .checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Initializing);
    }
}

/// Anything that can report its health (sources, targets, consumers).
#[async_trait]
pub trait Health: Send + Sync {
    /// The entity's current checks. Never fails: a failure to check is itself a check
    /// with [`Status::Error`].
    async fn health(&self) -> HealthReport;
}

/// A change of an entity's overall status, for alert sinks (log, webhook).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Transition {
    /// The entity whose status changed.
    pub entity: EntityRef,
    /// The status before.
    pub from: Status,
    /// The status now.
    pub to: Status,
    /// The worst check's message now (empty when healthy).
    pub reason: String,
    /// When it changed.
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String")]
    pub at: OffsetDateTime,
}

/// Keeps an entity's checks across observations: when each entered its status, when it
/// was last healthy, and whether the overall status changed.
#[derive(Clone, Debug)]
pub struct HealthState {
    entity: EntityRef,
    checks: BTreeMap<String, Check>,
}

impl HealthState {
    /// A state with no checks yet (overall [`Status::Initializing`]).
    pub fn new(entity: EntityRef) -> Self {
        Self {
            entity,
            checks: BTreeMap::new(),
        }
    }

    /// Records one check's latest result and returns the overall transition, if any.
    pub fn observe(
        &mut self,
        name: &str,
        status: Status,
        message: impl Into<String>,
        fix: Option<String>,
        now: OffsetDateTime,
    ) -> Option<Transition> {
        let before = self.status();
        let message = message.into();
        let last_ok = (status == Status::Healthy).then_some(now);
        match self.checks.get_mut(name) {
            Some(check) => {
                if check.status != status {
                    check.since = now;
                }
                check.status = status;
                check.message = message;
                check.fix = fix;
                check.last_ok_at = last_ok.or(check.last_ok_at);
            }
            None => {
                let check = Check {
                    name: name.to_owned(),
                    status,
                    message,
                    fix,
                    since: now,
                    last_ok_at: last_ok,
                };
                self.checks.insert(name.to_owned(), check);
            }
        }
        let after = self.status();
        (before != after).then(|| Transition {
            entity: self.entity.clone(),
            from: before,
            to: after,
            reason: self
                .report()
                .problems()
                .first()
                .map(|c| c.message.clone())
                .unwrap_or_default(),
            at: now,
        })
    }

    /// The overall status: the worst check, or [`Status::Initializing`] with none.
    pub fn status(&self) -> Status {
        self.checks
            .values()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Initializing)
    }

    /// A report of the current checks.
    pub fn report(&self) -> HealthReport {
        HealthReport {
            entity: self.entity.clone(),
            status: self.status(),
            checks: self.checks.values().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn consumer() -> EntityRef {
        EntityRef {
            kind: EntityKind::Consumer,
            name: "orders".into(),
        }
    }

    #[test]
    fn overall_status_is_the_worst_check_and_transitions_are_reported_once() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let mut state = HealthState::new(consumer());
        assert_eq!(state.status(), Status::Initializing);

        let up = state
            .observe("target", Status::Healthy, "reachable", None, t0)
            .unwrap();
        assert_eq!((up.from, up.to), (Status::Initializing, Status::Healthy));
        assert!(
            state
                .observe("lag", Status::Healthy, "3 records behind", None, t0)
                .is_none()
        );

        let t1 = t0 + Duration::seconds(5);
        let paused = state
            .observe(
                "target",
                Status::Paused,
                "target \"warehouse\" is unreachable",
                None,
                t1,
            )
            .unwrap();
        assert_eq!((paused.from, paused.to), (Status::Healthy, Status::Paused));
        assert_eq!(paused.reason, "target \"warehouse\" is unreachable");
        // Same status again: no new transition, and `since` keeps the first time.
        let t2 = t1 + Duration::seconds(5);
        assert!(
            state
                .observe("target", Status::Paused, "still unreachable", None, t2)
                .is_none()
        );
        let report = state.report();
        let target = report.checks.iter().find(|c| c.name == "target").unwrap();
        assert_eq!(target.since, t1);
        assert_eq!(target.last_ok_at, Some(t0));
        assert_eq!(report.problems()[0].message, "still unreachable");

        let back = state
            .observe("target", Status::Healthy, "reachable", None, t2)
            .unwrap();
        assert_eq!((back.from, back.to), (Status::Paused, Status::Healthy));
    }

    #[test]
    fn statuses_are_ordered_by_severity() {
        assert!(Status::Healthy < Status::Initializing);
        assert!(Status::Warning < Status::Paused);
        assert!(Status::Paused < Status::Error);
    }
}

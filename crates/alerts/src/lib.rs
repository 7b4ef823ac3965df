//! Alerts that reach people. The [`Alerter`] is given every entity's health report each time
//! they are refreshed, and turns changes of status into [`Alert`]s: one when an entity turns
//! `warning` or `error` (or changes between them), naming the entity, the reason and the fix,
//! and one recovery notice when it is healthy again. The same status reported again is not
//! sent again. Alerts go to the log and to every configured [`Channel`]: webhooks
//! ([`WebhookChannel`]) and email over SMTP ([`EmailChannel`]). Delivery never blocks the
//! caller; a failed delivery is retried twice, then logged.
//!
//! What it is not for: deciding health (each entity does that), or a consumer's own
//! transitions in its loop (`sluice-consumer`'s log sink).
//!
//! ```
//! use std::sync::Arc;
//! use sluice_alerts::Alerter;
//! use sluice_core::{EntityKind, EntityRef, HealthState, Status};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let alerter = Alerter::new(Vec::new());
//! let mut state = HealthState::new(EntityRef { kind: EntityKind::Consumer, name: "orders".into() });
//! let now = time::OffsetDateTime::now_utc();
//! state.observe("target", Status::Error, "target \"warehouse\" is unreachable", Some("start it".into()), now);
//! let sent = alerter.observe(&[state.report()]);
//! assert_eq!(sent.len(), 1);
//! assert!(alerter.observe(&[state.report()]).is_empty(), "not sent twice");
//! # });
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use sluice_core::{EntityRef, Error, HealthReport, Status};
use time::OffsetDateTime;

mod email;

pub use email::EmailChannel;

/// One alert: an entity's status changed for the worse, or it recovered.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    /// The entity.
    pub entity: EntityRef,
    /// Its status now.
    pub status: Status,
    /// Its status as last alerted (`healthy` for a first problem).
    pub previous: Status,
    /// The check that is worst now (empty on recovery).
    pub check: String,
    /// What is wrong (on recovery: that it is healthy again).
    pub reason: String,
    /// What to do about it, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// When it was noticed.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// True for a recovery notice.
    pub recovered: bool,
}

/// One entry of the event log: an entity's status changed (every change, not only those
/// alerted), or the entity is gone.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// The entity.
    pub entity: EntityRef,
    /// Its status before (`None`: first seen).
    pub from: Option<Status>,
    /// Its status now (`None`: removed from the configuration).
    pub to: Option<Status>,
    /// Why, from its worst check (empty when healthy).
    pub reason: String,
    /// What to do about it, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// When it was noticed.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl Alert {
    /// A one-line summary (an email subject).
    pub fn summary(&self) -> String {
        if self.recovered {
            format!("[sluice] recovered: {} is healthy again", self.entity)
        } else {
            let mut reason: String = self.reason.chars().take(100).collect();
            if self.reason.chars().count() > 100 {
                reason.push('…');
            }
            format!("[sluice] {}: {} — {reason}", self.status, self.entity)
        }
    }

    /// The whole alert as text (an email body).
    pub fn text(&self) -> String {
        if self.recovered {
            return format!(
                "{} is healthy again (it was {}), at {}.\n",
                self.entity, self.previous, self.at
            );
        }
        let mut out = format!(
            "{} is {} (was {}), at {}.\n\nWhy: {}\n",
            self.entity, self.status, self.previous, self.at, self.reason
        );
        if let Some(fix) = &self.fix {
            out.push_str(&format!("Fix: {fix}\n"));
        }
        out.push_str(&format!(
            "\nCheck: {}\nA recovery notice follows when it is healthy again; `sluice status` shows every check.\n",
            self.check
        ));
        out
    }
}

/// Somewhere alerts are delivered.
#[async_trait]
pub trait Channel: Send + Sync {
    /// What it is, for the log (`webhook https://…`, `email to ops@…`); never a secret.
    fn describe(&self) -> String;
    /// Delivers one alert.
    async fn deliver(&self, alert: &Alert) -> Result<(), Error>;
}

/// POSTs each alert as JSON ([`Alert`]'s fields) to a URL; a 2xx answer is delivery.
#[derive(Clone, Debug)]
pub struct WebhookChannel {
    url: String,
    client: reqwest::Client,
}

impl WebhookChannel {
    /// A channel posting to `url`, with a 10-second timeout per delivery.
    pub fn new(url: impl Into<String>) -> Result<Self, Error> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::invalid(format!("cannot build the webhook client: {e}")))?;
        Ok(Self {
            url: url.into(),
            client,
        })
    }
}

#[async_trait]
impl Channel for WebhookChannel {
    fn describe(&self) -> String {
        format!("webhook {}", self.url)
    }

    async fn deliver(&self, alert: &Alert) -> Result<(), Error> {
        let response = self
            .client
            .post(&self.url)
            .json(alert)
            .send()
            .await
            .map_err(|e| Error::unavailable(format!("webhook {}", self.url), e.without_url()))?;
        if !response.status().is_success() {
            return Err(Error::Unavailable {
                what: format!("webhook {} answered {}", self.url, response.status()),
                source: None,
            });
        }
        Ok(())
    }
}

/// Turns health reports into alerts and delivers them.
pub struct Alerter {
    /// Where alerts go besides the log; replaced when the config is reloaded.
    channels: Mutex<Vec<Arc<Route>>>,
    /// Each entity's status as last alerted (only entities in trouble).
    alerted: Mutex<BTreeMap<EntityRef, Status>>,
    /// Each entity's status as last seen, and the latest events, newest last.
    seen: Mutex<(BTreeMap<EntityRef, Status>, VecDeque<Event>)>,
}

/// How many events [`Alerter::events`] keeps.
pub const RECENT: usize = 200;

impl std::fmt::Debug for Alerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let channels: Vec<String> = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|r| r.channel.describe())
            .collect();
        f.debug_struct("Alerter")
            .field("channels", &channels)
            .finish()
    }
}

/// One channel and its queue: a channel's alerts are delivered one at a time, in order (a
/// recovery never arrives before the problem it ends).
struct Route {
    channel: Arc<dyn Channel>,
    /// Started with the first alert (inside the runtime).
    queue: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Alert>>,
}

impl Route {
    fn all(channels: Vec<Arc<dyn Channel>>) -> Vec<Arc<Route>> {
        channels
            .into_iter()
            .map(|channel| {
                Arc::new(Route {
                    channel,
                    queue: std::sync::OnceLock::new(),
                })
            })
            .collect()
    }

    fn send(&self, alert: Alert) {
        let queue = self.queue.get_or_init(|| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Alert>();
            let channel = self.channel.clone();
            // Ends once the route is replaced (a reload) and its queue is empty.
            tokio::spawn(async move {
                while let Some(alert) = rx.recv().await {
                    deliver(channel.as_ref(), &alert).await;
                }
            });
            tx
        });
        let _ = queue.send(alert);
    }
}

/// Delivers one alert, retrying after [`RETRIES`]; a failure is logged, never a secret.
async fn deliver(channel: &dyn Channel, alert: &Alert) {
    let mut last = None;
    for pause in std::iter::once(Duration::ZERO).chain(RETRIES) {
        tokio::time::sleep(pause).await;
        match channel.deliver(alert).await {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        tracing::warn!(entity = %alert.entity, channel = %channel.describe(), error = %e, "could not deliver an alert");
    }
}

/// Attempts per delivery, and the pause before each retry.
const RETRIES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(4)];

impl Alerter {
    /// An alerter sending to `channels` (and the log).
    pub fn new(channels: Vec<Arc<dyn Channel>>) -> Self {
        Self {
            channels: Mutex::new(Route::all(channels)),
            alerted: Mutex::new(BTreeMap::new()),
            seen: Mutex::new((BTreeMap::new(), VecDeque::new())),
        }
    }

    /// Sends later alerts to `channels` instead (a reloaded `[alerts]`).
    pub fn set_channels(&self, channels: Vec<Arc<dyn Channel>>) {
        *self.channels.lock().unwrap_or_else(|e| e.into_inner()) = Route::all(channels);
    }

    /// The latest status changes (at most [`RECENT`]), newest first: the event log.
    pub fn events(&self) -> Vec<Event> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.1.iter().rev().cloned().collect()
    }

    /// Notes every status change in the event log.
    fn log_events(&self, reports: &[HealthReport], now: OffsetDateTime) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let (last, events) = &mut *seen;
        let mut push = |event: Event| {
            if events.len() == RECENT {
                events.pop_front();
            }
            events.push_back(event);
        };
        for report in reports {
            let before = last.insert(report.entity.clone(), report.status);
            if before == Some(report.status) {
                continue;
            }
            let worst = report.problems().into_iter().next();
            push(Event {
                entity: report.entity.clone(),
                from: before,
                to: Some(report.status),
                reason: worst.map(|c| c.message.clone()).unwrap_or_default(),
                fix: worst.and_then(|c| c.fix.clone()),
                at: now,
            });
        }
        let gone: Vec<EntityRef> = last
            .keys()
            .filter(|e| !reports.iter().any(|r| &r.entity == *e))
            .cloned()
            .collect();
        for entity in gone {
            let before = last.remove(&entity);
            push(Event {
                reason: format!("{entity} was removed from the configuration"),
                entity,
                from: before,
                to: None,
                fix: None,
                at: now,
            });
        }
    }

    /// Compares `reports` (every entity there is now) with what was last alerted, and sends
    /// what changed: a problem when an entity turns `warning` or `error` or moves between
    /// them, a recovery when one in trouble is healthy again (or gone). Starting, paused and
    /// unchanged entities send nothing. Returns the alerts sent (delivery runs in the
    /// background).
    pub fn observe(&self, reports: &[HealthReport]) -> Vec<Alert> {
        let now = OffsetDateTime::now_utc();
        self.log_events(reports, now);
        let mut alerted = self.alerted.lock().unwrap_or_else(|e| e.into_inner());
        let mut alerts = Vec::new();
        for report in reports {
            let before = alerted.get(&report.entity).copied();
            match report.status {
                Status::Warning | Status::Error if before != Some(report.status) => {
                    let worst = report
                        .checks
                        .iter()
                        .filter(|c| c.status == report.status)
                        .min_by_key(|c| c.since);
                    alerts.push(Alert {
                        entity: report.entity.clone(),
                        status: report.status,
                        previous: before.unwrap_or(Status::Healthy),
                        check: worst.map(|c| c.name.clone()).unwrap_or_default(),
                        reason: worst.map(|c| c.message.clone()).unwrap_or_default(),
                        fix: worst.and_then(|c| c.fix.clone()),
                        at: now,
                        recovered: false,
                    });
                    alerted.insert(report.entity.clone(), report.status);
                }
                Status::Healthy if before.is_some() => {
                    alerts.push(recovery(&report.entity, before, now));
                    alerted.remove(&report.entity);
                }
                _ => {}
            }
        }
        // Entities in trouble that are gone (removed from the config) are over too.
        let gone: Vec<EntityRef> = alerted
            .keys()
            .filter(|e| !reports.iter().any(|r| &r.entity == *e))
            .cloned()
            .collect();
        for entity in gone {
            let before = alerted.remove(&entity);
            let mut alert = recovery(&entity, before, now);
            alert.reason = format!("{entity} was removed from the configuration");
            alerts.push(alert);
        }
        drop(alerted);
        for alert in &alerts {
            self.send(alert.clone());
        }
        alerts
    }

    fn send(&self, alert: Alert) {
        if alert.recovered {
            tracing::info!(entity = %alert.entity, "alert: recovered");
        } else {
            tracing::warn!(entity = %alert.entity, status = %alert.status, reason = %alert.reason, fix = alert.fix.as_deref().unwrap_or(""), "alert");
        }
        let routes = self
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for route in routes {
            route.send(alert.clone());
        }
    }
}

fn recovery(entity: &EntityRef, before: Option<Status>, at: OffsetDateTime) -> Alert {
    Alert {
        entity: entity.clone(),
        status: Status::Healthy,
        previous: before.unwrap_or(Status::Error),
        check: String::new(),
        reason: format!("{entity} is healthy again"),
        fix: None,
        at,
        recovered: true,
    }
}

/// The channels `config` names: its webhooks, then email. The error names the setting.
pub fn channels(config: &sluice_core::AlertsConfig) -> Result<Vec<Arc<dyn Channel>>, Error> {
    let mut out: Vec<Arc<dyn Channel>> = Vec::new();
    for w in &config.webhooks {
        out.push(Arc::new(WebhookChannel::new(&w.url)?));
    }
    if let Some(email) = &config.email {
        out.push(Arc::new(EmailChannel::new(email)?));
    }
    Ok(out)
}

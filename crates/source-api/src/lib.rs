//! The pull runtime every SaaS API source shares: Stripe today, HubSpot and Salesforce on the
//! same runtime later. It knows no provider: a provider implements [`Api`] (how to list a
//! collection page by page, how to read the change feed, how to fetch one object) and the
//! runtime does the rest for it:
//!
//! - **Backfill, then changes, with one handoff rule.** For each account, the change cursor
//!   is noted *before* the first page of any collection is read. Backfilled objects carry the
//!   version noted with it; every change read after it carries a greater one. So a change made
//!   while the backfill runs always wins over the page that saw the older state, and nothing
//!   made during the backfill is missed (the feed reads it from the noted cursor on).
//! - **Resume state in the stream transaction.** Each page is appended together with its
//!   collection's page cursor, each batch of changes with the change cursor
//!   ([`RecordStream::append_with_state`]), so a `kill -9` anywhere resumes without loss, and a
//!   finished collection is not read again.
//! - **One limiter per credential** ([`Client`]): at most the configured requests per second
//!   in any one-second window, `429` + `Retry-After` honoured for every request of the
//!   credential, bounded concurrency, a timeout on every request. Failures go through the one
//!   retry policy ([`sluice_core::Backoff`] by [`sluice_core::ErrorClass`]).
//! - **An expired change cursor** (sluice was stopped longer than the provider keeps changes)
//!   starts a new generation: the cursor is noted again, every collection is read again, and
//!   objects that vanished upstream meanwhile get tombstones once their collection is read.
//!   Health says why.
//! - **Connected accounts**: each account is its own sync id, derived from the configured
//!   sync's id and the account id ([`account_sync_id`]), so one provider filter serves them all.
//! - **Typed collections**: each collection's [`CollectionSchema`] comes from the JSON Schema
//!   the provider ships ([`schema::from_json_schema`]) and is widened by payloads ([`schema`]),
//!   stored before the records that need it.
//!
//! What it is not for: pushed records (`sluice-source-http`) and databases (`sluice-source-pg`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::{
    CheckReport, CollectionId, CollectionInfo, CollectionSchema, EntityKind, EntityRef, Error,
    ErrorClass, Health, HealthReport, HealthState, Payload, Provider, RecordStream, Result, Source,
    SourceProgress, Status, Stop, SyncId,
};
use time::OffsetDateTime;
use tokio::sync::watch;

mod client;
mod feed;
mod limit;
mod pages;
pub mod schema;
mod view;
mod write;

pub use client::{Answer, ApiError, Client, ClientSettings};
pub use limit::Limiter;
pub use pages::{Change, Changes, Item, Mark, Page, Update};
/// HTTP methods, for [`Client::send`].
pub use reqwest::Method;
pub use write::{ApiWriter, ApiWrites, Applied};

use feed::Ctx;
use view::FeedView;

/// One collection an [`Api`] can list and follow.
#[derive(Clone, Debug, PartialEq)]
pub struct Collection {
    /// The collection id (`stripe:customer`).
    pub id: CollectionId,
    /// What a restricted credential needs to read it, as the provider names it
    /// (`Customers: Read`), for the fix when it is missing.
    pub permission: String,
    /// Its columns (from the provider's JSON Schema); widened by payloads as they come.
    pub schema: CollectionSchema,
}

/// What a provider implements; the runtime ([`ApiSource`]) does everything else.
///
/// Contract: lists and feeds are read as the API documents them, and an answer that breaks the
/// documented contract (out of order, fields missing) is [`ApiError::Malformed`], never guessed
/// at. `account` is a connected account's id (`None`: the credential's own account).
#[async_trait]
pub trait Api: Send + Sync + 'static {
    /// The provider records are tagged with.
    fn provider(&self) -> Provider;
    /// The provider's name in messages (`Stripe`).
    fn title(&self) -> &'static str;
    /// The configured collections.
    fn collections(&self) -> &[Collection];
    /// What a restricted credential needs to read the change feed (`Events: Read`).
    fn changes_permission(&self) -> &str;
    /// What to do when the credential is refused.
    fn key_fix(&self) -> String;
    /// What to do when the credential lacks `permission`.
    fn permission_fix(&self, permission: &str) -> String;
    /// The connected accounts the credential can act for (default: none).
    async fn accounts(&self, client: &Client) -> std::result::Result<Vec<String>, ApiError> {
        let _ = client;
        Ok(Vec::new())
    }
    /// One page of `collection`, after the object `after` (the first page when `None`).
    async fn page(
        &self,
        client: &Client,
        account: Option<&str>,
        collection: &Collection,
        after: Option<&str>,
    ) -> std::result::Result<Page, ApiError>;
    /// The newest change now (`None` when the feed is empty).
    async fn newest_change(
        &self,
        client: &Client,
        account: Option<&str>,
    ) -> std::result::Result<Option<Mark>, ApiError>;
    /// Changes after `after` (every retained change when `None`), oldest first.
    /// [`ApiError::Missing`] when `after` is no longer retained.
    async fn changes(
        &self,
        client: &Client,
        account: Option<&str>,
        after: Option<&Mark>,
    ) -> std::result::Result<Changes, ApiError>;
    /// One object now (`None`: it no longer exists).
    async fn fetch(
        &self,
        client: &Client,
        account: Option<&str>,
        collection: &Collection,
        id: &str,
    ) -> std::result::Result<Option<Payload>, ApiError>;
    /// How the API takes the write-back proxy's changes (default: it does not).
    fn writes(&self) -> Option<Arc<dyn ApiWrites>> {
        None
    }
}

/// Which connected accounts a source follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accounts {
    /// These.
    Listed(Vec<String>),
    /// Every account [`Api::accounts`] returns, looked up again every `discover_interval`.
    All,
}

/// How the runtime runs one source.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// Time between change-feed reads when the last one found nothing more.
    pub poll_interval: Duration,
    /// Connected accounts to follow.
    pub accounts: Accounts,
    /// Whether to follow the credential's own account.
    pub platform: bool,
    /// With [`Accounts::All`], how often to look for new accounts.
    pub discover_interval: Duration,
}

/// The sync id of a connected account's records: a UUIDv5 of the account id in the
/// namespace of the configured sync's id. Fixed forever (it keys rows in targets).
pub fn account_sync_id(sync_id: SyncId, account: &str) -> SyncId {
    SyncId(uuid::Uuid::new_v5(&sync_id.0, account.as_bytes()))
}

/// A source that pulls from an API through a provider's [`Api`].
pub struct ApiSource {
    name: String,
    sync_id: SyncId,
    provider: Provider,
    settings: ApiSettings,
    collections: Vec<Collection>,
    /// The running parts, or why there are none (a secret that cannot be read).
    ctx: std::result::Result<Arc<Ctx>, (String, String)>,
    feeds: Mutex<BTreeMap<String, Arc<FeedView>>>,
    /// Why connected accounts could not be listed, until they can.
    discovery: Mutex<Option<String>>,
}

impl std::fmt::Debug for ApiSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSource")
            .field("name", &self.name)
            .field("sync_id", &self.sync_id)
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

impl ApiSource {
    /// Sync `name` (`sync_id`) through `api`, with a client built from `client` and the
    /// credential `key` (or, when the key could not be read, the error saying why: the source
    /// then reports it and does nothing).
    pub fn new(
        name: impl Into<String>,
        sync_id: SyncId,
        api: Arc<dyn Api>,
        client: std::result::Result<Client, Error>,
        stream: Arc<dyn RecordStream>,
        settings: ApiSettings,
    ) -> Self {
        let ctx = client
            .map(|client| {
                Arc::new(Ctx::new(
                    api.clone(),
                    Arc::new(client),
                    stream,
                    settings.poll_interval,
                ))
            })
            .map_err(|e| (e.problem(), e.fix().unwrap_or_default().to_owned()));
        Self {
            name: name.into(),
            sync_id,
            provider: api.provider(),
            collections: api.collections().to_vec(),
            settings,
            ctx,
            feeds: Mutex::new(BTreeMap::new()),
            discovery: Mutex::new(None),
        }
    }

    /// The accounts to follow now, as (label, account, sync id); the platform's label is "".
    fn wanted(&self, discovered: &[String]) -> Vec<(String, Option<String>, SyncId)> {
        let mut out = Vec::new();
        if self.settings.platform {
            out.push((String::new(), None, self.sync_id));
        }
        let listed: Vec<String> = match &self.settings.accounts {
            Accounts::Listed(a) => a.clone(),
            Accounts::All => discovered.to_vec(),
        };
        for account in listed {
            let id = account_sync_id(self.sync_id, &account);
            out.push((account.clone(), Some(account), id));
        }
        out
    }

    fn start_feeds(
        &self,
        ctx: &Arc<Ctx>,
        accounts: Vec<(String, Option<String>, SyncId)>,
        tasks: &mut tokio::task::JoinSet<()>,
        stop: &watch::Receiver<bool>,
    ) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        for (label, account, sync_id) in accounts {
            if feeds.contains_key(&label) {
                continue;
            }
            let view = Arc::new(FeedView::new(account, sync_id, &self.collections));
            feeds.insert(label, view.clone());
            tasks.spawn(feed::run(ctx.clone(), view, stop.clone()));
        }
    }

    fn note_discovery(&self, problem: Option<String>) {
        *self.discovery.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }
}

#[async_trait]
impl Health for ApiSource {
    async fn health(&self) -> HealthReport {
        let mut state = HealthState::new(EntityRef {
            kind: EntityKind::Sync,
            name: self.name.clone(),
        });
        let now = OffsetDateTime::now_utc();
        let ctx = match &self.ctx {
            Ok(ctx) => ctx,
            Err((problem, fix)) => {
                state.observe(
                    "key",
                    Status::Error,
                    problem.clone(),
                    Some(fix.clone()),
                    now,
                );
                return state.report();
            }
        };
        let feeds: Vec<Arc<FeedView>> = self
            .feeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        if feeds.is_empty() {
            state.observe("feed", Status::Initializing, "starting", None, now);
        }
        for feed in feeds {
            feed.observe_into(&mut state, ctx, now);
        }
        if let Some(why) = self
            .discovery
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            state.observe(
                "accounts",
                Status::Warning,
                format!("connected accounts could not be listed: {why}"),
                Some("sluice keeps following the accounts it knows and tries again".into()),
                now,
            );
        }
        state.observe(
            "rate limit",
            Status::Healthy,
            format!(
                "{} requests so far; {:.1} s spent waiting on the rate limit ({})",
                ctx.client.requests(),
                ctx.client.rate_limit_wait().as_secs_f64(),
                ctx.client.rate_limit()
            ),
            None,
            now,
        );
        state.report()
    }
}

#[async_trait]
impl Source for ApiSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn provider(&self) -> Provider {
        self.provider
    }

    async fn run(&self, mut stop: Stop) {
        let ctx = match &self.ctx {
            Ok(ctx) => ctx.clone(),
            Err(_) => return stop.await,
        };
        let (tell, stopping) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        self.start_feeds(&ctx, self.wanted(&[]), &mut tasks, &stopping);
        if self.settings.accounts == Accounts::All {
            let mut backoff =
                sluice_core::Backoff::new(Duration::from_secs(1), self.settings.discover_interval);
            loop {
                let delay = match ctx.api.accounts(&ctx.client).await {
                    Ok(found) => {
                        self.note_discovery(None);
                        backoff.reset();
                        self.start_feeds(&ctx, self.wanted(&found), &mut tasks, &stopping);
                        self.settings.discover_interval
                    }
                    Err(e) => {
                        let (_, class, message, _) =
                            ctx.problem("listing connected accounts", "", &e);
                        self.note_discovery(Some(message));
                        backoff.next_delay_after(class)
                    }
                };
                tokio::select! {
                    () = &mut stop => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        } else {
            stop.await;
        }
        let _ = tell.send(true);
        // Feeds stop at their next await point; a page being appended commits or not as a whole.
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
    }

    async fn collections(&self) -> Result<Vec<CollectionInfo>> {
        Ok(self
            .collections
            .iter()
            .map(|c| CollectionInfo {
                id: c.id.clone(),
                schema: Some(c.schema.clone()),
            })
            .collect())
    }

    async fn check(&self) -> CheckReport {
        let mut report = CheckReport::default();
        let ctx = match &self.ctx {
            Ok(ctx) => ctx,
            Err((problem, fix)) => {
                report.push("key", false, problem.clone(), Some(fix.clone()));
                return report;
            }
        };
        let account = match &self.settings.accounts {
            Accounts::Listed(a) if !self.settings.platform => a.first().map(String::as_str),
            _ => None,
        };
        for c in &self.collections {
            match ctx.api.page(&ctx.client, account, c, None).await {
                Ok(_) => report.push(
                    format!("read {}", c.id),
                    true,
                    format!("the key can read {} ({})", c.id, c.permission),
                    None,
                ),
                Err(e) => {
                    let (_, _, message, fix) =
                        ctx.problem(&format!("reading {}", c.id), &c.permission, &e);
                    report.push(format!("read {}", c.id), false, message, fix);
                }
            }
        }
        match ctx.api.newest_change(&ctx.client, account).await {
            Ok(_) => report.push(
                "changes",
                true,
                format!(
                    "the key can read the change feed ({})",
                    ctx.api.changes_permission()
                ),
                None,
            ),
            Err(e) => {
                let (_, _, message, fix) =
                    ctx.problem("reading changes", ctx.api.changes_permission(), &e);
                report.push("changes", false, message, fix);
            }
        }
        report
    }

    async fn plan(&self) -> CheckReport {
        let mut report = CheckReport::default();
        if let Err((problem, fix)) = &self.ctx {
            report.push("key", false, problem.clone(), Some(fix.clone()));
            return report;
        }
        let ids: Vec<&str> = self.collections.iter().map(|c| c.id.0.as_str()).collect();
        let accounts = match (&self.settings.accounts, self.settings.platform) {
            (Accounts::All, true) => "the platform account and every connected account".to_owned(),
            (Accounts::All, false) => "every connected account".to_owned(),
            (Accounts::Listed(a), true) if a.is_empty() => "the platform account".to_owned(),
            (Accounts::Listed(a), true) => format!("the platform account and {}", a.join(", ")),
            (Accounts::Listed(a), false) => a.join(", "),
        };
        report.push(
            "collections",
            !ids.is_empty(),
            format!(
                "would read {} of {accounts} once, then follow its changes every {} ms",
                ids.join(", "),
                self.settings.poll_interval.as_millis()
            ),
            ids.is_empty()
                .then(|| "name at least one object in collections".to_owned()),
        );
        report
    }

    fn writer(&self) -> Option<Arc<dyn sluice_core::Writer>> {
        let ctx = self.ctx.as_ref().ok().filter(|_| self.settings.platform)?;
        Some(Arc::new(ApiWriter {
            writes: ctx.api.writes()?,
            client: ctx.client.clone(),
            sync_id: self.sync_id,
            provider: self.provider,
            account: None,
        }))
    }

    fn writer_missing(&self) -> String {
        match &self.ctx {
            Err((problem, _)) => format!("sync {:?} cannot reach its API: {problem}", self.name),
            Ok(_) if !self.settings.platform => format!(
                "sync {:?} follows connected accounts only; writes go to the platform account (platform = true)",
                self.name
            ),
            Ok(_) => format!("sync {:?}: this API does not take writes", self.name),
        }
    }

    fn progress(&self) -> SourceProgress {
        let mut details = serde_json::Map::new();
        let mut appended = 0;
        if let Ok(ctx) = &self.ctx {
            appended = ctx.appended.load(Ordering::Relaxed);
            details.insert("requests".into(), ctx.client.requests().into());
            details.insert(
                "rate_limit_wait_seconds".into(),
                serde_json::json!(
                    (ctx.client.rate_limit_wait().as_secs_f64() * 10.0).round() / 10.0
                ),
            );
        }
        let feeds = self.feeds.lock().unwrap_or_else(|e| e.into_inner());
        let mut accounts = serde_json::Map::new();
        for (label, feed) in feeds.iter() {
            let label = if label.is_empty() {
                "platform"
            } else {
                label.as_str()
            };
            accounts.insert(label.to_owned(), feed.progress());
        }
        details.insert("accounts".into(), serde_json::Value::Object(accounts));
        SourceProgress { appended, details }
    }
}

/// Shared by feeds: classifies an API error in what (`reading stripe:customer`) and says what
/// to do. Returns the health status, the retry class, the message and the fix.
pub(crate) fn classify(
    api: &dyn Api,
    what: &str,
    permission: &str,
    e: &ApiError,
) -> (Status, ErrorClass, String, Option<String>) {
    let title = api.title();
    match e {
        ApiError::Unauthorized(m) => (
            Status::Error,
            ErrorClass::FixConfiguration,
            format!("{title} refused the API key while {what}: {m}"),
            Some(api.key_fix()),
        ),
        ApiError::Forbidden(m) => (
            Status::Error,
            ErrorClass::FixConfiguration,
            format!("the API key may not do this: {what} needs the permission \"{permission}\" ({m})"),
            Some(api.permission_fix(permission)),
        ),
        ApiError::Refused { .. } => (
            Status::Error,
            ErrorClass::GiveUp,
            format!("{title} refused the request while {what}: {e}"),
            Some("this is a bug or an API change: report it with this message; the rest of the sync carries on".into()),
        ),
        ApiError::RateLimited(_) => (
            Status::Warning,
            ErrorClass::Retry,
            format!("{what}: {e}; waiting before trying again"),
            Some("lower rate_limit if other programs use the same key".into()),
        ),
        _ => (
            Status::Error,
            ErrorClass::Retry,
            format!("{what}: {e}; nothing from this answer was written, trying again"),
            None,
        ),
    }
}

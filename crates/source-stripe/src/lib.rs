//! The Stripe provider: what the API source runtime (`sluice-source-api`) needs to know
//! about Stripe, and nothing the runtime does itself.
//!
//! - Collections `stripe:<object>` for the objects in [`sluice_core::STRIPE_OBJECTS`], each
//!   typed by the JSON Schema committed in `schemas/stripe.json`.
//! - Backfill with the list endpoints (`limit=100`, `starting_after`), newest first as Stripe
//!   lists; subscriptions with `status=all`, so canceled ones are kept too.
//! - Changes from `/v1/events`. Stripe lists events **newest first**: after a cursor the
//!   runtime asks for `ending_before=<cursor>`, which gives the page just newer than it (still
//!   newest first), processes it oldest first, and moves the cursor to the page's newest
//!   event, while `has_more`. A list that is not newest first, or holds the cursor itself or
//!   older events, breaks Stripe's documented contract and is refused, never applied out of
//!   order.
//! - `<object>.deleted` events are tombstones (`customer.subscription.deleted` is not: the
//!   subscription still exists, canceled). An event rendered at another API version than the
//!   one sluice asks for, or without its object, is fetched again.
//! - Connected accounts through the `Stripe-Account` header; `/v1/accounts` lists them.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sluice_core::{
    AccountsConfig, CollectionId, Error, Payload, Provider, RecordStream, STRIPE_OBJECTS,
    StripeSourceConfig, SyncId,
};
use sluice_source_api::{
    Accounts, Api, ApiError, ApiSettings, ApiSource, Change, Changes, Client, ClientSettings,
    Collection, Item, Mark, Page, Update,
};
use time::OffsetDateTime;

mod writes;

/// The API version sluice asks for, and the one `schemas/stripe.json` describes.
pub const API_VERSION: &str = "2024-06-20";

/// Stripe's documented rate limits, requests per second.
pub const LIVE_RATE_LIMIT: f64 = 100.0;
/// In test mode.
pub const TEST_RATE_LIMIT: f64 = 25.0;

/// The object schemas, committed.
const SCHEMAS: &str = include_str!("../schemas/stripe.json");

/// (object, list path, restricted-key permission)
const OBJECTS: [(&str, &str, &str); 14] = [
    ("customer", "customers", "Customers: Read"),
    ("product", "products", "Products: Read"),
    ("price", "prices", "Prices: Read"),
    ("subscription", "subscriptions", "Subscriptions: Read"),
    ("invoice", "invoices", "Invoices: Read"),
    ("invoiceitem", "invoiceitems", "Invoices: Read"),
    ("charge", "charges", "Charges: Read"),
    ("payment_intent", "payment_intents", "PaymentIntents: Read"),
    ("refund", "refunds", "Refunds: Read"),
    (
        "balance_transaction",
        "balance_transactions",
        "Balance: Read",
    ),
    ("dispute", "disputes", "Disputes: Read"),
    ("payout", "payouts", "Payouts: Read"),
    ("coupon", "coupons", "Coupons: Read"),
    ("plan", "plans", "Plans: Read"),
];

/// The permission reading events needs.
pub const EVENTS_PERMISSION: &str = "Events: Read";

/// Every object's list path and permission, for the docs and `sluice source check`.
pub fn objects() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    OBJECTS.into_iter()
}

/// The collection id of a Stripe object (`stripe:customer`).
pub fn collection_id(object: &str) -> CollectionId {
    CollectionId(format!("stripe:{object}"))
}

/// Stripe, as the runtime's [`Api`].
#[derive(Debug)]
pub struct Stripe {
    collections: Vec<Collection>,
    api_version: String,
}

impl Stripe {
    /// A provider for `objects` (object names or `stripe:` ids; all when `None`), asking for
    /// `api_version`.
    pub fn new(objects: Option<&[String]>, api_version: &str) -> Result<Self, Error> {
        let schemas: Value = serde_json::from_str(SCHEMAS)
            .map_err(|e| Error::invalid(format!("schemas/stripe.json: {e}")))?;
        let wanted: Vec<&str> = match objects {
            Some(list) => list
                .iter()
                .map(|o| o.strip_prefix("stripe:").unwrap_or(o))
                .collect(),
            None => STRIPE_OBJECTS.to_vec(),
        };
        let mut collections = Vec::new();
        for object in wanted {
            let Some((_, _, permission)) = OBJECTS.iter().find(|(o, ..)| *o == object) else {
                return Err(Error::configuration(
                    format!("sluice does not sync the Stripe object {object:?}"),
                    sluice_core::text::suggestion("object", object, STRIPE_OBJECTS.into_iter()),
                ));
            };
            let schema = &schemas["objects"][object];
            collections.push(Collection {
                id: collection_id(object),
                permission: (*permission).to_owned(),
                schema: sluice_source_api::schema::from_json_schema(schema),
            });
        }
        Ok(Self {
            collections,
            api_version: api_version.to_owned(),
        })
    }

    fn path(collection: &Collection) -> &'static str {
        let object = collection.id.0.trim_start_matches("stripe:");
        OBJECTS
            .iter()
            .find(|(o, ..)| *o == object)
            .map_or("", |(_, path, _)| path)
    }
}

fn account_header(account: Option<&str>) -> Vec<(&'static str, &str)> {
    account.map(|a| ("Stripe-Account", a)).into_iter().collect()
}

/// `{"object": "list", "data": [...], "has_more": bool}`, checked.
fn list(value: Value, what: &str) -> Result<(Vec<Value>, bool), ApiError> {
    let malformed = |why: &str| ApiError::Malformed(format!("{what}: {why}"));
    let Value::Object(mut map) = value else {
        return Err(malformed("the answer is not a JSON object"));
    };
    let has_more = map
        .get("has_more")
        .and_then(Value::as_bool)
        .ok_or_else(|| malformed("the list has no has_more"))?;
    match map.remove("data") {
        Some(Value::Array(data)) => Ok((data, has_more)),
        _ => Err(malformed("the list has no data array")),
    }
}

fn unix(value: Option<&Value>) -> Option<i64> {
    value.and_then(|v| {
        v.as_i64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    })
}

fn time_of(seconds: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// One event, checked: (mark, type, object or None, api_version).
struct Event {
    mark: Mark,
    kind: String,
    object: Option<Payload>,
    related: Option<(String, String)>,
    api_version: Option<String>,
}

fn event(value: Value) -> Result<Event, ApiError> {
    let id = value
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::Malformed("an event has no id".into()))?
        .to_owned();
    let malformed = |why: &str| ApiError::Malformed(format!("event {id}: {why}"));
    let at = unix(value.get("created")).ok_or_else(|| malformed("no created time"))?;
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("no type"))?
        .to_owned();
    let object = match value.pointer("/data/object") {
        Some(Value::Object(o)) => Some(o.clone()),
        _ => None,
    };
    let related = value.get("related_object").and_then(|r| {
        Some((
            r.get("type")?.as_str()?.to_owned(),
            r.get("id")?.as_str()?.to_owned(),
        ))
    });
    if object.is_none() && related.is_none() {
        return Err(malformed("no data.object and no related_object"));
    }
    Ok(Event {
        mark: Mark { id, at },
        kind,
        object,
        related,
        api_version: value
            .get("api_version")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// Checks a page of events is newest first and, after `after`, only newer than it.
fn check_order(events: &[Event], after: Option<&Mark>) -> Result<(), ApiError> {
    for pair in events.windows(2) {
        if pair[0].mark.at < pair[1].mark.at {
            return Err(ApiError::Malformed(format!(
                "/v1/events is not newest first ({} at {} comes before {} at {}); Stripe documents newest first, and applying events out of order would store older states over newer ones",
                pair[0].mark.id, pair[0].mark.at, pair[1].mark.id, pair[1].mark.at
            )));
        }
    }
    if let Some(after) = after
        && let Some(e) = events
            .iter()
            .find(|e| e.mark.id == after.id || e.mark.at < after.at)
    {
        return Err(ApiError::Malformed(format!(
            "/v1/events?ending_before={} returned {} (from {}), which is not newer than the cursor; the API ignored ending_before",
            after.id, e.mark.id, e.mark.at
        )));
    }
    Ok(())
}

impl Stripe {
    fn change(&self, e: Event) -> Result<Option<Change>, ApiError> {
        let (object, id) = match (&e.object, &e.related) {
            (Some(o), _) => {
                let object = o.get("object").and_then(Value::as_str);
                let id = o.get("id").and_then(Value::as_str);
                match (object, id) {
                    (Some(object), Some(id)) => (object.to_owned(), id.to_owned()),
                    _ => {
                        return Err(ApiError::Malformed(format!(
                            "event {}: data.object has no object or id",
                            e.mark.id
                        )));
                    }
                }
            }
            (None, Some((kind, id))) => (kind.clone(), id.clone()),
            (None, None) => return Ok(None),
        };
        let collection = collection_id(&object);
        if !self.collections.iter().any(|c| c.id == collection) {
            return Ok(None);
        }
        let deleted = e.kind == format!("{object}.deleted")
            || e.object
                .as_ref()
                .and_then(|o| o.get("deleted"))
                .and_then(Value::as_bool)
                == Some(true);
        let update = if deleted {
            Update::Delete
        } else if e.api_version.as_deref() != Some(self.api_version.as_str()) {
            Update::Refetch
        } else {
            match e.object {
                Some(o) => Update::Upsert(o),
                None => Update::Refetch,
            }
        };
        Ok(Some(Change {
            collection,
            id,
            at: time_of(e.mark.at),
            update,
        }))
    }

    async fn events(
        &self,
        client: &Client,
        account: Option<&str>,
        query: Vec<(&str, String)>,
    ) -> Result<(Vec<Event>, bool), ApiError> {
        let value = client
            .get("/v1/events", &query, &account_header(account))
            .await?;
        let (data, more) = list(value, "/v1/events")?;
        let events = data.into_iter().map(event).collect::<Result<Vec<_>, _>>()?;
        Ok((events, more))
    }
}

#[async_trait]
impl Api for Stripe {
    fn provider(&self) -> Provider {
        Provider::Stripe
    }

    fn writes(&self) -> Option<Arc<dyn sluice_source_api::ApiWrites>> {
        Some(Arc::new(writes::StripeWrites))
    }

    fn title(&self) -> &'static str {
        "Stripe"
    }

    fn collections(&self) -> &[Collection] {
        &self.collections
    }

    fn changes_permission(&self) -> &str {
        EVENTS_PERMISSION
    }

    fn key_fix(&self) -> String {
        "create a restricted key (Stripe dashboard → Developers → API keys → Create restricted key) with Read on the synced objects and on Events (docs/stripe.md lists them), put it where the sync's `key` points, and restart sluice or reload the config; until then sluice retries slowly".into()
    }

    fn permission_fix(&self, permission: &str) -> String {
        format!(
            "in the Stripe dashboard (Developers → API keys), edit the restricted key and set \"{permission}\"; or remove the object from the sync's collections"
        )
    }

    async fn accounts(&self, client: &Client) -> Result<Vec<String>, ApiError> {
        let mut ids = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut query = vec![("limit", "100".to_owned())];
            if let Some(a) = &after {
                query.push(("starting_after", a.clone()));
            }
            let (data, more) = list(
                client.get("/v1/accounts", &query, &[]).await?,
                "/v1/accounts",
            )?;
            for a in &data {
                let id = a.get("id").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::Malformed("/v1/accounts: an account has no id".into())
                })?;
                ids.push(id.to_owned());
            }
            after = ids.last().cloned();
            if !more || data.is_empty() {
                return Ok(ids);
            }
        }
    }

    async fn page(
        &self,
        client: &Client,
        account: Option<&str>,
        collection: &Collection,
        after: Option<&str>,
    ) -> Result<Page, ApiError> {
        let path = format!("/v1/{}", Self::path(collection));
        let mut query = vec![("limit", "100".to_owned())];
        if collection.id.0 == "stripe:subscription" {
            query.push(("status", "all".to_owned()));
        }
        if let Some(after) = after {
            query.push(("starting_after", after.to_owned()));
        }
        let (data, more) = list(
            client.get(&path, &query, &account_header(account)).await?,
            &path,
        )?;
        let object = collection.id.0.trim_start_matches("stripe:");
        let mut items = Vec::with_capacity(data.len());
        for value in data {
            let Value::Object(payload) = value else {
                return Err(ApiError::Malformed(format!(
                    "{path}: an item is not an object"
                )));
            };
            let id = payload
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::Malformed(format!("{path}: an item has no id")))?
                .to_owned();
            if payload.get("object").and_then(Value::as_str) != Some(object) {
                return Err(ApiError::Malformed(format!(
                    "{path}: {id} is not a {object} (object = {})",
                    payload
                        .get("object")
                        .map(Value::to_string)
                        .unwrap_or_else(|| "missing".into())
                )));
            }
            let created =
                unix(payload.get("created")).map_or_else(OffsetDateTime::now_utc, time_of);
            items.push(Item {
                id,
                payload,
                created,
            });
        }
        Ok(Page { items, more })
    }

    async fn newest_change(
        &self,
        client: &Client,
        account: Option<&str>,
    ) -> Result<Option<Mark>, ApiError> {
        let (events, _) = self
            .events(client, account, vec![("limit", "1".to_owned())])
            .await?;
        Ok(events.into_iter().next().map(|e| e.mark))
    }

    async fn changes(
        &self,
        client: &Client,
        account: Option<&str>,
        after: Option<&Mark>,
    ) -> Result<Changes, ApiError> {
        let (events, more) = match after {
            Some(after) => {
                let (events, more) = self
                    .events(
                        client,
                        account,
                        vec![
                            ("limit", "100".to_owned()),
                            ("ending_before", after.id.clone()),
                        ],
                    )
                    .await?;
                check_order(&events, Some(after))?;
                (events, more)
            }
            None => {
                // No cursor (there were no events when it was noted): every retained event.
                let mut all: Vec<Event> = Vec::new();
                loop {
                    let mut query = vec![("limit", "100".to_owned())];
                    if let Some(last) = all.last() {
                        query.push(("starting_after", last.mark.id.clone()));
                    }
                    let (events, more) = self.events(client, account, query).await?;
                    let empty = events.is_empty();
                    all.extend(events);
                    if !more || empty {
                        break;
                    }
                }
                check_order(&all, None)?;
                (all, false)
            }
        };
        let newest = events.first().map(|e| e.mark.clone());
        let mut changes = Vec::new();
        for e in events.into_iter().rev() {
            if let Some(c) = self.change(e)? {
                changes.push(c);
            }
        }
        Ok(Changes {
            changes,
            newest,
            more,
        })
    }

    async fn fetch(
        &self,
        client: &Client,
        account: Option<&str>,
        collection: &Collection,
        id: &str,
    ) -> Result<Option<Payload>, ApiError> {
        let path = format!("/v1/{}/{id}", Self::path(collection));
        match client.get(&path, &[], &account_header(account)).await {
            Ok(Value::Object(o)) if o.get("deleted").and_then(Value::as_bool) == Some(true) => {
                Ok(None)
            }
            Ok(Value::Object(o)) if o.get("id").and_then(Value::as_str) == Some(id) => Ok(Some(o)),
            Ok(_) => Err(ApiError::Malformed(format!(
                "{path}: not the object asked for"
            ))),
            Err(ApiError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The source of Stripe sync `name` (`sync_id`): the runtime running [`Stripe`] with the
/// sync's settings. A key that cannot be read, or objects sluice does not sync, make a
/// source that reports the problem with its fix and reads nothing.
pub fn source(
    name: &str,
    sync_id: SyncId,
    config: &StripeSourceConfig,
    stream: Arc<dyn RecordStream>,
) -> ApiSource {
    let StripeSourceConfig {
        key,
        collections,
        accounts,
        platform,
        poll_interval_ms,
        rate_limit,
        concurrency,
        request_timeout_ms,
        api_version,
        api_base,
        discover_interval_s,
    } = config;
    let api_version = api_version
        .clone()
        .unwrap_or_else(|| API_VERSION.to_owned());
    let settings = ApiSettings {
        poll_interval: Duration::from_millis(*poll_interval_ms),
        accounts: match accounts {
            None => Accounts::Listed(Vec::new()),
            Some(AccountsConfig::Listed(a)) => Accounts::Listed(a.clone()),
            Some(AccountsConfig::All(_)) => Accounts::All,
        },
        platform: *platform,
        discover_interval: Duration::from_secs((*discover_interval_s).max(1)),
    };
    let client = |_: &Stripe| {
        let secret: SecretString = key.resolve()?;
        let limit = rate_limit.unwrap_or_else(|| default_rate_limit(&secret));
        let settings = ClientSettings {
            base_url: api_base
                .clone()
                .unwrap_or_else(|| "https://api.stripe.com".into()),
            rate_limit: limit,
            concurrency: *concurrency,
            timeout: Duration::from_millis(*request_timeout_ms),
            headers: vec![("Stripe-Version".into(), api_version.clone())],
        };
        Client::new(&settings, secret).map_err(|e| Error::invalid(e.to_string()))
    };
    let (stripe, client) = match Stripe::new(collections.as_deref(), &api_version) {
        Ok(stripe) => {
            let client = client(&stripe);
            (stripe, client)
        }
        Err(e) => (
            Stripe {
                collections: Vec::new(),
                api_version: api_version.clone(),
            },
            Err(e),
        ),
    };
    ApiSource::new(name, sync_id, Arc::new(stripe), client, stream, settings)
}

/// Stripe's documented limit for the key's mode: 25/s for test keys, 100/s for live keys.
pub fn default_rate_limit(key: &SecretString) -> f64 {
    let key = key.expose_secret();
    if key.starts_with("sk_test_") || key.starts_with("rk_test_") {
        TEST_RATE_LIMIT
    } else {
        LIVE_RATE_LIMIT
    }
}

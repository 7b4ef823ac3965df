//! A Stripe emulator for tests: a small HTTP server that behaves as Stripe's API documents.
//!
//! `sluice-stripe-emulator` is part of the test kit (like `sluice-localpg`), for the Stripe
//! source's tests and benchmark; nothing in sluice's runtime depends on it. What it does:
//!
//! - create (`POST /v1/{resource}`, form-encoded like Stripe, `metadata[k]=v` nesting),
//!   retrieve, update (`POST /v1/{resource}/{id}`), delete and list for the common objects;
//! - lists newest first with `limit` (1–100), `starting_after` and `ending_before`, answered
//!   as `{"object": "list", "data": […], "has_more": …, "url": …}`;
//! - `/v1/events`, newest first, one event per change (`customer.created`, `….updated` with
//!   `previous_attributes`, `….deleted`), kept for a retention window measured on a clock the
//!   test controls ([`Emulator::advance`]); a cursor older than the window is
//!   `resource_missing`, as Stripe answers;
//! - API keys (`Authorization: Bearer sk_…`): unknown or revoked keys get 401 with Stripe's
//!   error JSON; `429` for a configurable share of requests, with `Retry-After`;
//! - connected accounts: the `Stripe-Account` header selects an account's own objects and
//!   events, and `/v1/accounts` lists them;
//! - writes as Stripe checks them (`writes.rs`): `Idempotency-Key` replays, parameters
//!   Stripe sets itself refused as unknown, `email_invalid`;
//! - it counts requests, with their times, so a test can check a client's rate.
//!
//! This file is long because it is one small HTTP server whose state, handlers and test-facing
//! methods read best side by side; `localstripe.rs` is the only other idea in the crate.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let stripe = sluice_stripe_emulator::Emulator::start("sk_test_1").await;
//! let customer = stripe.create("customers", &[("email", "a@example.com")]);
//! assert!(customer["id"].as_str().unwrap().starts_with("cus_"));
//! assert_eq!(stripe.events(None).len(), 1); // customer.created
//! # });
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};

mod localstripe;
mod writes;
pub use localstripe::LocalStripe;

/// The objects the emulator knows: (resource path, object name, id prefix, deletable).
pub const RESOURCES: [(&str, &str, &str, bool); 14] = [
    ("customers", "customer", "cus", true),
    ("products", "product", "prod", true),
    ("prices", "price", "price", false),
    ("subscriptions", "subscription", "sub", true),
    ("invoices", "invoice", "in", true),
    ("invoiceitems", "invoiceitem", "ii", true),
    ("charges", "charge", "ch", false),
    ("payment_intents", "payment_intent", "pi", false),
    ("refunds", "refund", "re", false),
    ("balance_transactions", "balance_transaction", "txn", false),
    ("disputes", "dispute", "dp", false),
    ("payouts", "payout", "po", false),
    ("coupons", "coupon", "co", true),
    ("plans", "plan", "plan", true),
];

/// A broken answer, for tests of what a client does with one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `200` with a body that is not JSON.
    NotJson,
    /// `200` with a list that has no `has_more`.
    MissingField,
    /// `200` whose body stops before its declared length.
    Truncated,
    /// `500` with Stripe's error JSON.
    ServerError,
}

impl Fault {
    fn respond(self) -> Response {
        match self {
            Fault::NotJson => (StatusCode::OK, "<html>upstream proxy error</html>").into_response(),
            Fault::MissingField => {
                axum::Json(json!({"object": "list", "data": [], "url": "/v1/x"})).into_response()
            }
            Fault::Truncated => {
                let body = r#"{"object": "list", "data": [{"id": "cus_"#;
                // The text, then an error: the connection is cut mid-body.
                let stream = futures_util::stream::iter([
                    Ok(Bytes::from_static(body.as_bytes())),
                    Err(std::io::Error::other("connection cut")),
                ]);
                let mut response = Response::new(axum::body::Body::from_stream(stream));
                response.headers_mut().insert(
                    axum::http::header::CONTENT_LENGTH,
                    axum::http::HeaderValue::from_static("4096"),
                );
                response
            }
            Fault::ServerError => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                None,
                "An unknown error occurred".into(),
            )
            .into_response(),
        }
    }
}

/// The account whose data requests without `Stripe-Account` see.
const PLATFORM: &str = "";

#[derive(Default)]
struct Account {
    /// Objects by resource, in creation order.
    objects: BTreeMap<&'static str, Vec<Value>>,
    /// Events, oldest first.
    events: Vec<Value>,
}

struct Inner {
    keys: Vec<String>,
    revoked: Vec<String>,
    accounts: BTreeMap<String, Account>,
    /// Seconds since the epoch, as `created` fields show it.
    now: i64,
    /// Events older than this many seconds are gone.
    retention: i64,
    next_id: u64,
    /// This share of requests is answered 429 (0: never), spread evenly.
    throttle_share: f64,
    /// Requests answered so far that counted for the throttle.
    admitted: u64,
    /// Faults to answer the next requests with, in order.
    faults: std::collections::VecDeque<Fault>,
    retry_after: u64,
    /// Times of every request (seconds, fractional) and its path.
    requests: Vec<(f64, String)>,
    /// Times of the requests answered 429.
    throttled: Vec<f64>,
    api_version: String,
    /// Answers by `Idempotency-Key`, with the request they answered.
    idempotency: std::collections::HashMap<String, (String, Result<Value, StripeError>)>,
}

/// A running emulator; stops when dropped.
pub struct Emulator {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An error as Stripe answers it: status, `{"error": {"type", "code", "message"}}`, and for
/// 429 a `Retry-After`.
#[derive(Clone, Debug)]
struct StripeError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
    retry_after: Option<u64>,
}

impl IntoResponse for StripeError {
    fn into_response(self) -> Response {
        let mut e = json!({ "type": self.kind, "message": self.message });
        if let Some(code) = self.code {
            e["code"] = json!(code);
        }
        let mut response = (self.status, axum::Json(json!({ "error": e }))).into_response();
        if let Some(value) = self.retry_after.and_then(|s| s.to_string().parse().ok()) {
            response.headers_mut().insert("retry-after", value);
        }
        response
    }
}

fn error(
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
) -> StripeError {
    StripeError {
        status,
        kind,
        code,
        message,
        retry_after: None,
    }
}

/// `resource_missing`, as Stripe answers for an id it does not know.
fn missing_error(path: &str, id: &str) -> StripeError {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("resource_missing"),
        format!("No such {path}: '{id}'"),
    )
}

fn resource(path: &str) -> Option<(&'static str, &'static str, &'static str, bool)> {
    RESOURCES.iter().copied().find(|r| r.0 == path)
}

/// Form fields as JSON, with `a[b]=c` nested one level (`metadata[plan]=pro`).
fn form(body: &[u8]) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in url::form_urlencoded::parse(body) {
        match key.split_once('[') {
            Some((outer, rest)) => {
                let inner = rest.trim_end_matches(']').to_owned();
                let entry = out
                    .entry(outer.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(map) = entry {
                    map.insert(inner, Value::String(value.into_owned()));
                }
            }
            None => {
                out.insert(key.into_owned(), Value::String(value.into_owned()));
            }
        }
    }
    out
}

impl Inner {
    fn account(&mut self, id: &str) -> &mut Account {
        self.accounts.entry(id.to_owned()).or_default()
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_{:014}", self.next_id)
    }

    fn event(&mut self, account: &str, kind: String, object: Value, previous: Option<Value>) {
        let id = self.id("evt");
        let mut data = json!({ "object": object });
        if let Some(previous) = previous {
            data["previous_attributes"] = previous;
        }
        let event = json!({
            "id": id, "object": "event", "type": kind, "created": self.now,
            "api_version": self.api_version, "data": data, "livemode": false,
            "account": (account != PLATFORM).then_some(account),
        });
        self.account(account).events.push(event);
    }

    fn create(&mut self, account: &str, path: &str, fields: Map<String, Value>) -> Option<Value> {
        let (path, object, prefix, _) = resource(path)?;
        let id = match fields.get("id").and_then(Value::as_str) {
            Some(id) => id.to_owned(),
            None => self.id(prefix),
        };
        let mut value = Map::new();
        value.insert("id".into(), json!(id));
        value.insert("object".into(), json!(object));
        value.insert("created".into(), json!(self.now));
        value.insert("livemode".into(), json!(false));
        value.insert("metadata".into(), json!({}));
        value.extend(fields);
        let value = Value::Object(value);
        self.account(account)
            .objects
            .entry(path)
            .or_default()
            .push(value.clone());
        self.event(account, format!("{object}.created"), value.clone(), None);
        Some(value)
    }

    fn update(
        &mut self,
        account: &str,
        path: &str,
        id: &str,
        fields: Map<String, Value>,
    ) -> Option<Value> {
        let (path, object, _, _) = resource(path)?;
        let list = self.account(account).objects.get_mut(path)?;
        let found = list.iter_mut().find(|o| o["id"] == id)?;
        let mut previous = Map::new();
        for (k, v) in fields {
            previous.insert(k.clone(), found.get(&k).cloned().unwrap_or(Value::Null));
            found[&k] = v;
        }
        let value = found.clone();
        self.event(
            account,
            format!("{object}.updated"),
            value.clone(),
            Some(Value::Object(previous)),
        );
        Some(value)
    }

    fn delete(&mut self, account: &str, path: &str, id: &str) -> Option<Result<Value, String>> {
        let (path, object, _, deletable) = resource(path)?;
        if !deletable {
            return Some(Err(format!("{object}s cannot be deleted")));
        }
        let list = self.account(account).objects.get_mut(path)?;
        let at = list.iter().position(|o| o["id"] == id)?;
        let gone = list.remove(at);
        self.event(account, format!("{object}.deleted"), gone, None);
        Some(Ok(json!({ "id": id, "object": object, "deleted": true })))
    }

    /// Stripe's list: newest first, `limit`, `starting_after` (older than), `ending_before`
    /// (newer than: the page closest to the cursor, still newest first).
    fn list(
        items: &[&Value],
        query: &BTreeMap<String, String>,
        url: &str,
    ) -> Result<Value, StripeError> {
        let limit: usize = match query.get("limit").map(|l| l.parse()) {
            None => 10,
            Some(Ok(l)) if (1..=100).contains(&l) => l,
            Some(_) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    Some("parameter_invalid_integer"),
                    "limit must be an integer between 1 and 100".into(),
                ));
            }
        };
        let newest_first: Vec<&Value> = items.iter().rev().copied().collect();
        let position = |id: &String| -> Result<usize, StripeError> {
            newest_first
                .iter()
                .position(|o| o["id"] == id.as_str())
                .ok_or_else(|| {
                    error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        Some("resource_missing"),
                        format!("No such object: '{id}'"),
                    )
                })
        };
        let (page, has_more): (Vec<&Value>, bool) = if let Some(before) = query.get("ending_before")
        {
            let at = position(before)?;
            let start = at.saturating_sub(limit);
            (newest_first[start..at].to_vec(), start > 0)
        } else {
            let from = match query.get("starting_after") {
                Some(after) => position(after)? + 1,
                None => 0,
            };
            let end = (from + limit).min(newest_first.len());
            (newest_first[from..end].to_vec(), end < newest_first.len())
        };
        Ok(json!({ "object": "list", "data": page, "has_more": has_more, "url": url }))
    }
}

type App = Arc<Mutex<Inner>>;

/// Why a request is not served: Stripe's error, or a fault the test asked for.
enum Refusal {
    Error(StripeError),
    Fault(Fault),
}

impl From<StripeError> for Refusal {
    fn from(e: StripeError) -> Self {
        Refusal::Error(e)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Error(e) => e.into_response(),
            Refusal::Fault(f) => f.respond(),
        }
    }
}

/// Checks the key, counts the request, throttles; the account the request acts for.
fn admit(app: &App, headers: &HeaderMap, path: &str) -> Result<String, Refusal> {
    let mut inner = app.lock().unwrap_or_else(|e| e.into_inner());
    let at = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as f64 / 1e9;
    inner.requests.push((at, path.to_owned()));
    // Stripe takes the key as a bearer token or as the basic-auth user (`curl -u sk_…:`).
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let key = match (
        authorization.strip_prefix("Bearer "),
        authorization.strip_prefix("Basic "),
    ) {
        (Some(bearer), _) => bearer.to_owned(),
        (None, Some(basic)) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .map(|user| user.split(':').next().unwrap_or_default().to_owned())
                .unwrap_or_default()
        }
        _ => String::new(),
    };
    let shown = format!(
        "{}****{}",
        &key.get(..8).unwrap_or(""),
        &key.get(key.len().saturating_sub(4)..).unwrap_or("")
    );
    if inner.revoked.contains(&key) {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("api_key_expired"),
            format!("Expired API Key provided: {shown}"),
        )
        .into());
    }
    if !inner.keys.contains(&key) {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            format!("Invalid API Key provided: {shown}"),
        )
        .into());
    }
    inner.admitted += 1;
    let n = inner.admitted as f64;
    let share = inner.throttle_share;
    if share > 0.0 && (n * share).floor() > ((n - 1.0) * share).floor() {
        let mut refused = error(
            StatusCode::TOO_MANY_REQUESTS,
            "invalid_request_error",
            Some("rate_limit"),
            "Too many requests hit the API too quickly.".into(),
        );
        refused.retry_after = Some(inner.retry_after);
        inner.throttled.push(at);
        return Err(refused.into());
    }
    if let Some(fault) = inner.faults.pop_front() {
        return Err(Refusal::Fault(fault));
    }
    Ok(headers
        .get("stripe-account")
        .and_then(|v| v.to_str().ok())
        .unwrap_or(PLATFORM)
        .to_owned())
}

async fn list_or_create(
    State(app): State<App>,
    Path(path): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    method: axum::http::Method,
    body: Bytes,
) -> Response {
    let account = match admit(&app, &headers, &path) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    let mut inner = app.lock().unwrap_or_else(|e| e.into_inner());
    let url = format!("/v1/{path}");
    if path == "events" && method == axum::http::Method::GET {
        let horizon = inner.now - inner.retention;
        let events: Vec<&Value> = inner
            .accounts
            .get(&account)
            .map(|a| {
                a.events
                    .iter()
                    .filter(|e| e["created"].as_i64().unwrap_or(0) >= horizon)
                    .collect()
            })
            .unwrap_or_default();
        return match Inner::list(&events, &query, &url) {
            Ok(v) => axum::Json(v).into_response(),
            Err(r) => r.into_response(),
        };
    }
    if path == "accounts" && method == axum::http::Method::GET {
        let accounts: Vec<Value> = inner
            .accounts
            .keys()
            .filter(|a| !a.is_empty())
            .map(|a| json!({ "id": a, "object": "account" }))
            .collect();
        let accounts: Vec<&Value> = accounts.iter().collect();
        return match Inner::list(&accounts, &query, &url) {
            Ok(v) => axum::Json(v).into_response(),
            Err(r) => r.into_response(),
        };
    }
    let Some((known, _, _, _)) = resource(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            None,
            format!("Unrecognized request URL (GET: /v1/{path})."),
        )
        .into_response();
    };
    if method == axum::http::Method::POST {
        let fields = form(&body);
        let request = format!("POST /v1/{path} {}", String::from_utf8_lossy(&body));
        return writes::once(&mut inner, &headers, request, |inner| {
            writes::check(known, true, &fields)?;
            Ok(inner.create(&account, known, fields).unwrap_or_default())
        });
    }
    let items: Vec<&Value> = inner
        .accounts
        .get(&account)
        .and_then(|a| a.objects.get(known))
        .map(|l| l.iter().collect())
        .unwrap_or_default();
    match Inner::list(&items, &query, &url) {
        Ok(v) => axum::Json(v).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn one(
    State(app): State<App>,
    Path((path, id)): Path<(String, String)>,
    headers: HeaderMap,
    method: axum::http::Method,
    body: Bytes,
) -> Response {
    let account = match admit(&app, &headers, &format!("{path}/{id}")) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    let mut inner = app.lock().unwrap_or_else(|e| e.into_inner());
    let missing = || {
        error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("resource_missing"),
            format!("No such {path}: '{id}'"),
        )
        .into_response()
    };
    match method {
        axum::http::Method::GET => {
            let found = resource(&path).and_then(|(p, ..)| {
                inner
                    .account(&account)
                    .objects
                    .get(p)
                    .and_then(|l| l.iter().find(|o| o["id"] == id.as_str()).cloned())
            });
            found.map_or_else(missing, |v| axum::Json(v).into_response())
        }
        axum::http::Method::POST => {
            let fields = form(&body);
            let request = format!("POST /v1/{path}/{id} {}", String::from_utf8_lossy(&body));
            writes::once(&mut inner, &headers, request, |inner| {
                writes::check(&path, false, &fields)?;
                inner
                    .update(&account, &path, &id, fields)
                    .ok_or_else(|| missing_error(&path, &id))
            })
        }
        axum::http::Method::DELETE => {
            let request = format!("DELETE /v1/{path}/{id}");
            writes::once(&mut inner, &headers, request, |inner| {
                match inner.delete(&account, &path, &id) {
                    None => Err(missing_error(&path, &id)),
                    Some(Ok(v)) => Ok(v),
                    Some(Err(why)) => Err(error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        None,
                        why,
                    )),
                }
            })
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            None,
            "method not allowed".into(),
        )
        .into_response(),
    }
}

impl Emulator {
    /// Starts an emulator on a free loopback port accepting the API key `key`.
    pub async fn start(key: &str) -> Emulator {
        Self::start_on(0, key).await.expect("a free loopback port")
    }

    /// Starts an emulator on loopback port `port` (0: any free one) accepting the API key `key`.
    pub async fn start_on(port: u16, key: &str) -> std::io::Result<Emulator> {
        let inner = Arc::new(Mutex::new(Inner {
            keys: vec![key.to_owned()],
            revoked: Vec::new(),
            accounts: BTreeMap::new(),
            now: time::OffsetDateTime::now_utc().unix_timestamp(),
            retention: 30 * 24 * 3600,
            next_id: 0,
            throttle_share: 0.0,
            admitted: 0,
            faults: std::collections::VecDeque::new(),
            retry_after: 1,
            requests: Vec::new(),
            throttled: Vec::new(),
            api_version: "2024-06-20".into(),
            idempotency: Default::default(),
        }));
        let app = Router::new()
            .route("/v1/{resource}", get(list_or_create).post(list_or_create))
            .route("/v1/{resource}/{id}", get(one).post(one).delete(one))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Emulator { addr, inner, task })
    }

    /// The base URL (`http://127.0.0.1:PORT`), for the client's API base setting.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Creates an object on the platform account, as `POST /v1/{resource}` would.
    pub fn create(&self, resource: &str, fields: &[(&str, &str)]) -> Value {
        self.create_in(PLATFORM, resource, fields)
    }

    /// Creates an object in a connected account (`Stripe-Account: account`).
    pub fn create_in(&self, account: &str, resource: &str, fields: &[(&str, &str)]) -> Value {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.with(|i| i.create(account, resource, form(body.as_bytes())))
            .unwrap_or_else(|| panic!("unknown resource {resource}"))
    }

    /// Updates an object, as `POST /v1/{resource}/{id}` would.
    pub fn update(&self, resource: &str, id: &str, fields: &[(&str, &str)]) -> Value {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.with(|i| i.update(PLATFORM, resource, id, form(body.as_bytes())))
            .unwrap_or_else(|| panic!("no {resource} {id}"))
    }

    /// Deletes an object, as `DELETE /v1/{resource}/{id}` would.
    pub fn delete(&self, resource: &str, id: &str) {
        let deleted = self.with(|i| i.delete(PLATFORM, resource, id));
        assert!(
            matches!(deleted, Some(Ok(_))),
            "cannot delete {resource} {id}: {deleted:?}"
        );
    }

    /// Every live object of `resource` on the platform account, oldest first.
    pub fn objects(&self, resource: &str) -> Vec<Value> {
        self.with(|i| {
            i.account(PLATFORM)
                .objects
                .get(resource)
                .cloned()
                .unwrap_or_default()
        })
    }

    /// The events of an account (`None`: the platform), oldest first, including expired ones.
    pub fn events(&self, account: Option<&str>) -> Vec<Value> {
        self.with(|i| i.account(account.unwrap_or(PLATFORM)).events.clone())
    }

    /// Moves the emulator's clock forward (new objects and events are created later; events
    /// older than the retention window disappear).
    pub fn advance(&self, seconds: i64) {
        self.with(|i| i.now += seconds);
    }

    /// How long events are kept, in seconds (Stripe: 30 days).
    pub fn set_retention(&self, seconds: i64) {
        self.with(|i| i.retention = seconds);
    }

    /// Answers `share` of the requests (0.3: three in ten, spread evenly) with 429 and
    /// `Retry-After: retry_after` seconds (0.0: none).
    pub fn throttle(&self, share: f64, retry_after: u64) {
        self.with(|i| {
            i.throttle_share = share;
            i.retry_after = retry_after;
        });
    }

    /// Answers the next requests (after the key check) with `faults`, one each.
    pub fn fail_next(&self, faults: &[Fault]) {
        self.with(|i| i.faults.extend(faults.iter().copied()));
    }

    /// Renders events created from now on at API version `version` (Stripe renders an event
    /// at the account's version when it happened).
    pub fn set_api_version(&self, version: &str) {
        self.with(|i| i.api_version = version.to_owned());
    }

    /// Updates an object of a connected account.
    pub fn update_in(
        &self,
        account: &str,
        resource: &str,
        id: &str,
        fields: &[(&str, &str)],
    ) -> Value {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.with(|i| i.update(account, resource, id, form(body.as_bytes())))
            .unwrap_or_else(|| panic!("no {resource} {id} in {account}"))
    }

    /// Every live object of `resource` in a connected account, oldest first.
    pub fn objects_in(&self, account: &str, resource: &str) -> Vec<Value> {
        self.with(|i| {
            i.account(account)
                .objects
                .get(resource)
                .cloned()
                .unwrap_or_default()
        })
    }

    /// Revokes an API key: it is then refused with `api_key_expired`.
    pub fn revoke(&self, key: &str) {
        self.with(|i| i.revoked.push(key.to_owned()));
    }

    /// When requests were answered 429 (seconds since the epoch).
    pub fn throttled(&self) -> Vec<f64> {
        self.with(|i| i.throttled.clone())
    }

    /// Every request so far: its time (seconds since the epoch) and resource path.
    pub fn requests(&self) -> Vec<(f64, String)> {
        self.with(|i| i.requests.clone())
    }
}

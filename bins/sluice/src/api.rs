//! The HTTP API of `sluice serve`: management (JSON), the push source, `/metrics`, and the
//! OpenAPI document. Every route needs `Authorization: Bearer <token>`.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sluice_core::{
    Consumer, EntityKind, Health, Managed, ManagedKind, RecordStream, Refused, Status,
};

use crate::api_tools as t;
use crate::api_write::{managed_now, routes as w};
use crate::server::{self, Server};

#[derive(Clone)]
pub(crate) struct App {
    pub(crate) server: Arc<Server>,
    token: Arc<SecretString>,
}

/// The OpenAPI document's path.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";

/// The API, and the web console at `/` (which logs in with the token or `console_password`).
pub fn router(
    server: Arc<Server>,
    token: SecretString,
    console_password: Option<SecretString>,
    tls: bool,
    max_body: usize,
) -> Router {
    let token = Arc::new(token);
    let console = crate::console::router(server.clone(), token.clone(), console_password, tls);
    let app = App { server, token };
    let api = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/targets", get(targets).post(w::create_target))
        .route(
            "/v1/targets/{name}",
            get(target).put(w::replace_target).delete(w::delete_target),
        )
        .route("/v1/targets/{name}/setup", get(t::target_setup))
        .route("/v1/targets/{name}/check", post(t::target_check))
        .route("/v1/targets/{name}/grant-read", post(t::grant))
        .route("/v1/targets/{name}/revoke-read", post(t::revoke))
        .route(
            "/v1/consumers/{name}/create-table",
            get(t::consumer_create_table),
        )
        .route("/v1/consumers/{name}/verify", post(t::consumer_verify))
        .route("/v1/syncs", get(syncs).post(w::create_sync))
        .route(
            "/v1/syncs/{name}",
            get(sync).put(w::replace_sync).delete(w::delete_sync),
        )
        .route("/v1/syncs/{name}/records", post(push))
        .route("/v1/consumers", get(consumers).post(w::create_consumer))
        .route(
            "/v1/consumers/{name}",
            get(consumer)
                .put(w::replace_consumer)
                .delete(w::delete_consumer),
        )
        .route("/v1/consumers/{name}/pause", post(pause))
        .route("/v1/consumers/{name}/resume", post(resume))
        .route(
            "/v1/consumers/{name}/restart-backfill",
            post(restart_backfill),
        )
        .route("/metrics", get(metrics))
        .route(OPENAPI_PATH, get(openapi))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route; see /v1/openapi.json (the console is at /)",
            )
        })
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app);
    console.merge(api)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// Bearer-token check, in constant time.
async fn authenticate(State(app): State<App>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let reason = match presented {
        None => "missing bearer token: send Authorization: Bearer <token>",
        Some(t) if equal(t.as_bytes(), app.token.expose_secret().as_bytes()) => {
            return next.run(request).await;
        }
        Some(_) => "invalid bearer token",
    };
    let mut response = error(StatusCode::UNAUTHORIZED, reason);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// A time as RFC 3339 text (API answers and console pages).
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Compares secrets in constant time.
pub(crate) fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn status(State(app): State<App>) -> Response {
    axum::Json(json!({
        "started_at": rfc3339(app.server.started_at),
        "entities": app.server.health().await,
    }))
    .into_response()
}

async fn targets(State(app): State<App>) -> Response {
    let managed = managed_now(&app.server);
    let entities = app.server.entities.read().await;
    let out: Vec<Value> = entities
        .targets
        .iter()
        .map(|(name, entry)| target_json(&app.server, name, entry, &managed))
        .collect();
    axum::Json(json!({ "targets": out })).into_response()
}

async fn target(State(app): State<App>, Path(name): Path<String>) -> Response {
    let entities = app.server.entities.read().await;
    match entities.targets.get(&name) {
        Some(entry) => axum::Json(target_json(
            &app.server,
            &name,
            entry,
            &managed_now(&app.server),
        ))
        .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no target named {name:?}")),
    }
}

fn target_json(
    server: &Server,
    name: &str,
    entry: &server::TargetEntry,
    managed: &Managed,
) -> Value {
    let c = &entry.config.connection;
    json!({
        "name": name,
        "host": c.host, "port": c.port, "database": c.database, "user": c.user,
        "ssl_mode": c.ssl.mode,
        "read_role": entry.config.read_role,
        "origin": origin(managed, ManagedKind::Target, name),
        "health": server.cached_health(EntityKind::Target, name),
    })
}

async fn syncs(State(app): State<App>) -> Response {
    let managed = managed_now(&app.server);
    let entities = app.server.entities.read().await;
    let mut out: Vec<Value> = entities
        .syncs
        .iter()
        .map(|(name, entry)| sync_json(&app.server, name, entry, &managed))
        .collect();
    out.extend(
        entities
            .failed_syncs
            .iter()
            .map(|(name, f)| not_running(name, &f.report)),
    );
    axum::Json(json!({ "syncs": out })).into_response()
}

async fn sync(State(app): State<App>, Path(name): Path<String>) -> Response {
    let entities = app.server.entities.read().await;
    if let Some(entry) = entities.syncs.get(&name) {
        let managed = managed_now(&app.server);
        return axum::Json(sync_json(&app.server, &name, entry, &managed)).into_response();
    }
    match entities.failed_syncs.get(&name) {
        Some(failed) => axum::Json(not_running(&name, &failed.report)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no sync named {name:?}")),
    }
}

fn sync_json(server: &Server, name: &str, entry: &server::SyncEntry, managed: &Managed) -> Value {
    let mut value = json!({
        "name": name,
        "id": entry.config.id,
        "provider": entry.config.source.provider().as_str(),
        "running": true,
        "origin": origin(managed, ManagedKind::Sync, name),
        "health": server.cached_health(EntityKind::Sync, name),
    });
    for (key, detail) in entry.source.progress().details {
        value[key] = detail;
    }
    value
}

/// `api` for an entity created through the API, `file` for one the config file declares.
fn origin(managed: &Managed, kind: ManagedKind, name: &str) -> &'static str {
    if managed.has(kind, name) {
        "api"
    } else {
        "file"
    }
}

/// A configured sync or consumer that could not start (it is tried again by itself).
fn not_running(name: &str, report: &sluice_core::HealthReport) -> Value {
    json!({ "name": name, "running": false, "health": report })
}

async fn push(State(app): State<App>, Path(name): Path<String>, body: Bytes) -> Response {
    let entities = app.server.entities.read().await;
    let Some(entry) = entities.syncs.get(&name) else {
        if let Some(failed) = entities.failed_syncs.get(&name) {
            let why = failed.report.checks.first().map(|c| c.message.clone());
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "sync {name:?} is not running, nothing was written: {}",
                    why.unwrap_or_default()
                ),
            );
        }
        return error(StatusCode::NOT_FOUND, format!("no sync named {name:?}"));
    };
    match entry.source.receive(&body).await {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(Refused::NotAccepted(why)) => error(StatusCode::CONFLICT, why),
        Err(Refused::BadRequest(why)) => error(StatusCode::BAD_REQUEST, why),
        Err(Refused::Unavailable(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("nothing was written: {e}"),
        ),
    }
}

async fn consumers(State(app): State<App>) -> Response {
    let managed = managed_now(&app.server);
    let entities = app.server.entities.read().await;
    let mut out = Vec::new();
    for entry in entities.consumers.values() {
        out.push(consumer_json(&app, entry, &managed).await);
    }
    out.extend(
        entities
            .failed_consumers
            .iter()
            .map(|(name, f)| not_running(name, &f.report)),
    );
    axum::Json(json!({ "consumers": out })).into_response()
}

async fn consumer(State(app): State<App>, Path(name): Path<String>) -> Response {
    let entities = app.server.entities.read().await;
    if let Some(entry) = entities.consumers.get(&name) {
        let managed = managed_now(&app.server);
        return axum::Json(consumer_json(&app, entry, &managed).await).into_response();
    }
    match entities.failed_consumers.get(&name) {
        Some(failed) => axum::Json(not_running(&name, &failed.report)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no consumer named {name:?}")),
    }
}

async fn consumer_json(app: &App, entry: &server::ConsumerEntry, managed: &Managed) -> Value {
    let (lag_records, lag_seconds) = server::consumer_lag(&app.server.stream, entry).await;
    let stats = entry.handle.stats();
    json!({
        "name": entry.config.name,
        "target": entry.config.target,
        "filter": entry.config.filter,
        "layout": entry.config.layout,
        "cursor": entry.handle.cursor(),
        "applied": stats.applied,
        "lag": { "records": lag_records, "seconds": lag_seconds },
        "last_write": entry.handle.last_write().map(rfc3339),
        "last_error": entry.handle.last_error(),
        "origin": origin(managed, ManagedKind::Consumer, &entry.config.name.0),
        "health": app.server.cached_health(EntityKind::Consumer, &entry.config.name.0),
    })
}

/// Pauses (with `reason`), resumes or restarts the backfill of a consumer; its health is
/// brought up to date at once. The API's and the console's one way to do it.
pub(crate) async fn control_consumer(
    server: &Server,
    name: &str,
    action: &str,
    reason: String,
) -> Result<(), (StatusCode, String)> {
    let entities = server.entities.read().await;
    let Some(entry) = entities.consumers.get(name) else {
        return Err((StatusCode::NOT_FOUND, format!("no consumer named {name:?}")));
    };
    let result = match action {
        "pause" => entry.handle.pause(reason).await,
        "resume" => entry.handle.resume().await,
        _ => entry.handle.restart_backfill().await,
    };
    result.map_err(|e| (StatusCode::CONFLICT, e.to_string()))?;
    // The consumer's own checks are local: its report is brought up to date at once.
    server.store_health(entry.handle.health().await);
    server.health_changed();
    Ok(())
}

async fn control(
    app: App,
    name: String,
    action: &str,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reason = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["reason"].as_str().map(str::to_owned))
        .unwrap_or_else(|| {
            let by = headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("the API");
            format!("paused by a user ({by})")
        });
    if let Err((status, why)) = control_consumer(&app.server, &name, action, reason).await {
        return error(status, why);
    }
    let entities = app.server.entities.read().await;
    match entities.consumers.get(&name) {
        Some(entry) => {
            let managed = managed_now(&app.server);
            axum::Json(consumer_json(&app, entry, &managed).await).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no consumer named {name:?}")),
    }
}

async fn pause(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    control(app, name, "pause", headers, body).await
}

async fn resume(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    control(app, name, "resume", headers, body).await
}

async fn restart_backfill(
    State(app): State<App>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    control(app, name, "restart", headers, body).await
}

/// One histogram family, per consumer, in Prometheus' text format.
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    series: &[(String, sluice_consumer::HistogramSnapshot)],
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (consumer, h) in series {
        let mut cumulative = 0;
        for (i, count) in h.buckets.iter().enumerate() {
            cumulative += count;
            let le = sluice_consumer::HISTOGRAM_BOUNDS
                .get(i)
                .map_or("+Inf".to_owned(), |b| b.to_string());
            let l = labels(&[("consumer", consumer), ("le", &le)]);
            let _ = writeln!(out, "{name}_bucket{l} {cumulative}");
        }
        let l = labels(&[("consumer", consumer)]);
        let _ = writeln!(out, "{name}_sum{l} {:.6}", h.sum_seconds);
        let _ = writeln!(out, "{name}_count{l} {}", h.count());
    }
}

/// Prometheus text exposition.
async fn metrics(State(app): State<App>) -> Response {
    let server = &app.server;
    let entities = server.entities.read().await;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let head = server.stream.head().await.map(|h| h.0).unwrap_or(0);
    family(
        "sluice_stream_head",
        "gauge",
        "The records stream's highest position.",
        vec![(String::new(), head.to_string())],
    );
    let (mut appended, mut retained, mut rows, mut estimated) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, entry) in &entities.syncs {
        let progress = entry.source.progress();
        appended.push((labels(&[("sync", name)]), progress.appended.to_string()));
        if let Some(bytes) = progress.details.get("slot_retained_wal_bytes") {
            retained.push((labels(&[("sync", name)]), bytes.to_string()));
        }
        let collections = progress.details.get("backfill").map(|b| &b["collections"]);
        for (collection, c) in collections.and_then(Value::as_object).into_iter().flatten() {
            let l = labels(&[("sync", name), ("collection", collection)]);
            rows.push((l.clone(), c["rows"].to_string()));
            estimated.push((l, c["estimate"].to_string()));
        }
    }
    family(
        "sluice_records_appended_total",
        "counter",
        "Records a sync has appended to the stream since start.",
        appended,
    );
    family(
        "sluice_slot_retained_wal_bytes",
        "gauge",
        "WAL the source's replication slot holds, at the last health check.",
        retained,
    );
    family(
        "sluice_backfill_rows",
        "gauge",
        "Rows a sync's backfill has read from each table.",
        rows,
    );
    family(
        "sluice_backfill_rows_estimated",
        "gauge",
        "The planner's estimate of each table's rows, for the backfill's progress.",
        estimated,
    );
    let (mut applied, mut lag_r, mut lag_s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut batch, mut latency) = (Vec::new(), Vec::new());
    for (name, entry) in &entities.consumers {
        let l = labels(&[("consumer", name)]);
        let stats = entry.handle.stats();
        let (records, seconds) = server::consumer_lag(&server.stream, entry).await;
        applied.push((l.clone(), stats.applied.to_string()));
        lag_r.push((l.clone(), records.to_string()));
        lag_s.push((l, format!("{seconds:.3}")));
        batch.push((name.clone(), stats.batch_duration));
        latency.push((name.clone(), stats.change_to_target));
    }
    family(
        "sluice_records_applied_total",
        "counter",
        "Records a consumer has written to its target since start.",
        applied,
    );
    family(
        "sluice_consumer_lag_records",
        "gauge",
        "Records in the stream the consumer has not written yet.",
        lag_r,
    );
    family(
        "sluice_consumer_lag_seconds",
        "gauge",
        "Age of the oldest record the consumer has not written yet.",
        lag_s,
    );
    let mut histograms = String::new();
    histogram(
        &mut histograms,
        "sluice_batch_duration_seconds",
        "How long writing one batch to the target took.",
        &batch,
    );
    histogram(
        &mut histograms,
        "sluice_change_to_target_seconds",
        "From a change upstream (its upstream_updated_at) to its commit in the target.",
        &latency,
    );
    drop(entities);
    let mut health = Vec::new();
    for report in server.health().await {
        let kind = format!("{:?}", report.entity.kind).to_lowercase();
        for status in [
            Status::Healthy,
            Status::Initializing,
            Status::Warning,
            Status::Paused,
            Status::Error,
        ] {
            let value = if report.status == status { "1" } else { "0" };
            health.push((
                labels(&[
                    ("kind", &kind),
                    ("name", &report.entity.name),
                    ("status", &status.to_string()),
                ]),
                value.to_owned(),
            ));
        }
    }
    family(
        "sluice_health_status",
        "gauge",
        "1 for each entity's current status.",
        health,
    );
    out.push_str(&histograms);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

async fn openapi() -> Response {
    axum::Json(crate::openapi::document()).into_response()
}

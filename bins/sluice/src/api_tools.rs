//! The management API's tools for a target and a consumer: the setup SQL, the setup check,
//! read-role grants, the consumer table's `CREATE TABLE` and its verification. The same
//! work as `sluice setup …`, `grant-read`, `revoke-read` and `config plan`, for the running
//! config's entities.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_core::{Config, ConsumerConfig, Error, LayoutConfig, TargetConfig};
use sluice_provisioning::{check, generate_password, grant_read, plan, revoke_read};
use sluice_target_pg::ConsumerTable;

use crate::api::App;
use crate::server::Server;

/// A refused request: its status and JSON body (`error`, and `fix` when there is one).
pub(crate) struct Failure {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
}

impl Failure {
    /// The error and its fix, for a person (the console).
    pub(crate) fn text(&self) -> String {
        let mut out = self.body["error"].as_str().unwrap_or_default().to_owned();
        if let Some(fix) = self.body["fix"].as_str() {
            out.push_str(&format!("\nfix: {fix}"));
        }
        out
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Failure {
    Failure {
        status,
        body: json!({ "error": message.into() }),
    }
}

fn applied(server: &Server) -> Result<Config, Failure> {
    server
        .applied_config()
        .ok_or_else(|| refuse(StatusCode::SERVICE_UNAVAILABLE, "sluice is still starting"))
}

fn find_target(config: &Config, name: &str) -> Result<TargetConfig, Failure> {
    config
        .targets
        .iter()
        .find(|t| t.name == name)
        .cloned()
        .ok_or_else(|| refuse(StatusCode::NOT_FOUND, format!("no target named {name:?}")))
}

fn find_consumer(config: &Config, name: &str) -> Result<ConsumerConfig, Failure> {
    config
        .consumers
        .iter()
        .find(|c| c.name.0 == name)
        .cloned()
        .ok_or_else(|| refuse(StatusCode::NOT_FOUND, format!("no consumer named {name:?}")))
}

fn failed(e: &Error) -> Failure {
    let mut body = json!({ "error": e.problem() });
    if let Some(fix) = e.fix() {
        body["fix"] = json!(fix);
    }
    let status = match e.class() {
        sluice_core::ErrorClass::Retry => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    Failure { status, body }
}

/// What a target needs set up, as SQL to run yourself (the manual path; the sync user's
/// password is a placeholder) and as the command of the automated path.
pub(crate) fn setup_of(config: &Config, target: &TargetConfig) -> Result<Value, Error> {
    let spec = crate::setup::target_spec(target, config);
    let plan = plan(&spec, None, &generate_password())
        .map_err(|r| Error::configuration(r.problem, r.fix))?;
    Ok(json!({
        "target": target.name,
        "database": spec.database,
        "sync_user": spec.sync_user,
        "read_role": spec.read_role,
        "schemas": spec.schemas,
        "manual_sql": plan.script(false),
        "automated": format!(
            "SLUICE_ADMIN_URL=postgres://<admin>@{}:{}/{} sluice setup apply --target {}",
            target.connection.host, target.connection.port, target.connection.database, target.name
        ),
    }))
}

pub(crate) async fn target_setup(State(app): State<App>, Path(name): Path<String>) -> Response {
    let (config, target) =
        match applied(&app.server).and_then(|c| find_target(&c, &name).map(|t| (c, t))) {
            Ok(found) => found,
            Err(r) => return r.into_response(),
        };
    match setup_of(&config, &target) {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => failed(&e).into_response(),
    }
}

/// The setup check of a target, as its sync user: each finding with its fix.
pub(crate) async fn check_target(
    server: &Server,
    name: &str,
) -> Result<sluice_core::CheckReport, Failure> {
    let config = applied(server)?;
    let target = find_target(&config, name)?;
    let (settings, _tunnels) =
        crate::connect::settings_for(&target.connection, server.reverse.as_ref())
            .await
            .map_err(|e| failed(&e))?;
    let mut spec = crate::setup::target_spec(&target, &config);
    spec.sync_user = settings.user.clone();
    Ok(check(&settings, &spec).await)
}

/// A check report as the API answers it.
fn report_json(result: Result<sluice_core::CheckReport, Failure>) -> Response {
    match result {
        Ok(report) => {
            axum::Json(json!({"ok": report.is_ok(), "findings": report.findings})).into_response()
        }
        Err(r) => r.into_response(),
    }
}

pub(crate) async fn target_check(State(app): State<App>, Path(name): Path<String>) -> Response {
    report_json(check_target(&app.server, &name).await)
}

/// Grants (or revokes) a target's read role to users, as the sync user.
pub(crate) async fn read_access(
    server: &Server,
    name: &str,
    users: &[String],
    grant: bool,
) -> Result<String, Failure> {
    if users.is_empty() || users.iter().any(|u| u.is_empty()) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "users: expected a non-empty list of role names",
        ));
    }
    let config = applied(server)?;
    let target = find_target(&config, name)?;
    let (settings, _tunnels) =
        crate::connect::settings_for(&target.connection, server.reverse.as_ref())
            .await
            .map_err(|e| failed(&e))?;
    let done = if grant {
        grant_read(&settings, &target.read_role, users).await
    } else {
        revoke_read(&settings, &target.read_role, users).await
    };
    done.map_err(|e| failed(&e))?;
    Ok(if grant {
        format!("granted {} to {}", target.read_role, users.join(", "))
    } else {
        format!("revoked {} from {}", target.read_role, users.join(", "))
    })
}

fn users_of(body: &[u8]) -> Result<Vec<String>, Failure> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Users {
        users: Vec<String>,
    }
    serde_json::from_slice::<Users>(body)
        .map(|u| u.users)
        .map_err(|e| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"users\": [\"role\", …]}}: {e}"),
            )
        })
}

async fn read_route(app: App, name: String, body: Bytes, grant: bool) -> Response {
    let users = match users_of(&body) {
        Ok(u) => u,
        Err(r) => return r.into_response(),
    };
    match read_access(&app.server, &name, &users, grant).await {
        Ok(message) => axum::Json(json!({ "done": message })).into_response(),
        Err(r) => r.into_response(),
    }
}

pub(crate) async fn grant(
    State(app): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    read_route(app, name, body, true).await
}

pub(crate) async fn revoke(
    State(app): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    read_route(app, name, body, false).await
}

/// A consumer's table statement: `CREATE TABLE` for a consumer table; a schema mirror's
/// tables are created by the sync user itself.
pub(crate) fn create_table_of(consumer: &ConsumerConfig) -> Value {
    match &consumer.layout {
        LayoutConfig::ConsumerTable { schema, table, .. } => json!({
            "layout": "consumer_table",
            "sql": ConsumerTable::new(schema, table).ddl(),
            "note": "sluice creates it if missing, as the sync user; or run this yourself in a schema you own and grant the sync user insert, update, delete and select on it",
        }),
        LayoutConfig::SchemaMirror { schema, .. } => json!({
            "layout": "schema_mirror",
            "sql": Value::Null,
            "note": format!("a schema mirror's tables are created by the sync user in schema {schema:?}, one per collection"),
        }),
    }
}

pub(crate) async fn consumer_create_table(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Response {
    match applied(&app.server).and_then(|c| find_consumer(&c, &name)) {
        Ok(c) => axum::Json(create_table_of(&c)).into_response(),
        Err(r) => r.into_response(),
    }
}

/// Verifies a consumer's table on its target: there, with the columns sluice writes, and
/// writable by the sync user.
pub(crate) async fn verify_consumer(
    server: &Server,
    name: &str,
) -> Result<sluice_core::CheckReport, Failure> {
    let config = applied(server)?;
    let consumer = find_consumer(&config, name)?;
    let target = find_target(&config, &consumer.target)?;
    let LayoutConfig::ConsumerTable { schema, table, .. } = &consumer.layout else {
        return Err(refuse(
            StatusCode::CONFLICT,
            "a schema mirror has no consumer table to verify; its target's setup check covers its schema",
        ));
    };
    let (settings, _tunnels) =
        crate::connect::settings_for(&target.connection, server.reverse.as_ref())
            .await
            .map_err(|e| failed(&e))?;
    Ok(ConsumerTable::new(schema, table)
        .plan(&settings, &target.read_role)
        .await)
}

pub(crate) async fn consumer_verify(State(app): State<App>, Path(name): Path<String>) -> Response {
    report_json(verify_consumer(&app.server, &name).await)
}

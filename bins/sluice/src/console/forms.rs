//! The console's forms: adding a target (with the manual-SQL path) and a consumer, and the
//! actions on their pages. Each goes through the same code as the management API, so the
//! checks and messages are the same.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::json;
use sluice_core::ManagedKind;

use super::pages::{Flash, consumer_page, findings, target_page};
use super::{Checked, Console, CsrfToken, Session, document, query_value, segment};
use crate::api_tools;
use crate::api_write::{Write, apply};

fn redirect(path: &str, note: Option<&str>, error: Option<&str>) -> Response {
    let mut to = path.to_owned();
    if let Some(note) = note {
        to.push_str(&format!("?note={}", query_value(note)));
    } else if let Some(error) = error {
        to.push_str(&format!("?error={}", query_value(error)));
    }
    Redirect::to(&to).into_response()
}

/// The "Add a target" form's fields (the password is never sent back to the page).
#[derive(Deserialize, Default)]
pub(crate) struct TargetForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    host: String,
    #[serde(default)]
    port: String,
    #[serde(default)]
    database: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    password_env: String,
    #[serde(default)]
    ssl_mode: String,
    #[serde(default)]
    read_role: String,
}

macro_rules! csrf_token {
    ($($form:ty),*) => {
        $(impl CsrfToken for $form {
            fn csrf(&self) -> &str {
                &self.csrf
            }
        })*
    };
}

csrf_token!(TargetForm, CsrfForm, ReadersForm, ConsumerForm, ControlForm);

/// PostgreSQL's default port, the form's default.
const DEFAULT_PORT: u16 = 5432;

const SSL_MODES: [(&str, &str); 5] = [
    (
        "verify-full",
        "verify-full: TLS, certificate and host name checked",
    ),
    ("verify-ca", "verify-ca: TLS, certificate checked"),
    ("require", "require: TLS, no certificate check"),
    ("prefer", "prefer: TLS when offered"),
    ("disable", "disable: no TLS (trusted networks only)"),
];

fn target_form(session: &Session, f: &TargetForm, error: Option<&str>) -> Markup {
    let value = |v: &str, default: &str| {
        if v.is_empty() {
            default.to_owned()
        } else {
            v.to_owned()
        }
    };
    let ssl = value(&f.ssl_mode, "verify-full");
    html! {
        main #main {
            h1 { "Add a target" }
            p { "The PostgreSQL database sluice writes into, reached as its own sync user. After saving, the target's page shows the setup SQL to run yourself (the manual path) or the command that runs it with admin credentials lent once (the automated path), then checks it." }
            @if let Some(error) = error {
                div.error role="alert" { @for line in error.lines() { p { (line) } } }
            }
            form method="post" action="/targets/new" {
                input type="hidden" name="csrf" value=(session.csrf);
                fieldset {
                    legend { "Target" }
                    label for="name" { "Name" }
                    input #name type="text" name="name" value=(f.name) required;
                }
                fieldset {
                    legend { "Connection" }
                    label for="host" { "Host" }
                    input #host type="text" name="host" value=(f.host) required;
                    label for="port" { "Port" }
                    input #port type="number" name="port" min="1" max=(u16::MAX) value=(value(&f.port, &DEFAULT_PORT.to_string())) required;
                    label for="database" { "Database" }
                    input #database type="text" name="database" value=(f.database) required;
                    label for="user" { "Sync user (created by the setup SQL if missing)" }
                    input #user type="text" name="user" value=(value(&f.user, "sluice")) required;
                    label for="password" { "Sync user's password (stored in a file only sluice can read)" }
                    input #password type="password" name="password" autocomplete="new-password";
                    label for="password_env" { "…or the environment variable holding it" }
                    input #password_env type="text" name="password_env" value=(f.password_env);
                    label for="ssl_mode" { "SSL mode" }
                    select #ssl_mode name="ssl_mode" {
                        @for (mode, text) in SSL_MODES {
                            option value=(mode) selected[ssl == mode] { (text) }
                        }
                    }
                }
                fieldset {
                    legend { "Readers" }
                    label for="read_role" { "Read role (granted to the users who read synced data)" }
                    input #read_role type="text" name="read_role" value=(value(&f.read_role, "sluice_read")) required;
                }
                p.muted { "SSH bastions and agents are set in sluice.toml ([target.connection.tunnel]); see docs/tunnels.md." }
                button type="submit" { "Save and show the setup" }
            }
        }
    }
}

pub(crate) async fn new_target(Extension(session): Extension<Session>) -> Response {
    document(
        "Add a target",
        Some(&session),
        target_form(&session, &TargetForm::default(), None),
    )
    .into_response()
}

pub(crate) async fn create_target(
    State(console): State<Console>,
    Checked(session, f): Checked<TargetForm>,
) -> Response {
    let password = match (f.password.is_empty(), f.password_env.trim()) {
        (false, _) => Some(json!({"value": f.password})),
        (true, "") => None,
        (true, var) => Some(json!({"env": var})),
    };
    let port = match f.port.trim().parse::<u16>() {
        Ok(p) => json!(p),
        Err(_) => json!(f.port),
    };
    let mut body = json!({
        "name": f.name.trim(),
        "connection": {
            "host": f.host.trim(), "port": port, "database": f.database.trim(),
            "user": f.user.trim(), "ssl": {"mode": f.ssl_mode},
        },
        "read_role": f.read_role.trim(),
    });
    if let Some(password) = password {
        body["connection"]["password"] = password;
    }
    let name = f.name.trim().to_owned();
    match apply(
        &console.server,
        ManagedKind::Target,
        Write::Create(body.to_string().into()),
    )
    .await
    {
        Ok(_) => redirect(
            &format!("/targets/{}", segment(&name)),
            Some("Target saved. Run the setup below (manual or automated), then the setup check."),
            None,
        ),
        Err(refusal) => (
            StatusCode::BAD_REQUEST,
            document(
                "Add a target",
                Some(&session),
                target_form(&session, &f, Some(&refusal.text())),
            ),
        )
            .into_response(),
    }
}

/// A check's findings, or why it could not run.
fn outcome(title: &str, result: Result<sluice_core::CheckReport, api_tools::Failure>) -> Markup {
    match result {
        Ok(report) => findings(title, &report),
        Err(failure) => html! { div.error role="alert" { p { (failure.text()) } } },
    }
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn check_target(
    State(console): State<Console>,
    Path(name): Path<String>,
    Checked(session, _): Checked<CsrfForm>,
) -> Response {
    let extra = outcome(
        "Setup check",
        api_tools::check_target(&console.server, &name).await,
    );
    target_page(&console, &session, &name, &Flash::default(), Some(extra)).await
}

#[derive(Deserialize)]
pub(crate) struct ReadersForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    users: String,
    #[serde(default)]
    action: String,
}

pub(crate) async fn readers(
    State(console): State<Console>,
    Path(name): Path<String>,
    Checked(_, f): Checked<ReadersForm>,
) -> Response {
    let users: Vec<String> = f
        .users
        .split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    let page = format!("/targets/{}", segment(&name));
    match api_tools::read_access(&console.server, &name, &users, f.action != "revoke").await {
        Ok(done) => redirect(&page, Some(&done), None),
        Err(failure) => redirect(&page, None, Some(&failure.text())),
    }
}

async fn delete(console: &Console, kind: ManagedKind, name: String) -> Response {
    let page = format!("/{}s/{}", kind.name(), segment(&name));
    match apply(&console.server, kind, Write::Delete(name.clone())).await {
        Ok(_) => redirect(
            "/",
            Some(&format!("Deleted {} {name:?}.", kind.name())),
            None,
        ),
        Err(refusal) => redirect(&page, None, Some(&refusal.text())),
    }
}

pub(crate) async fn delete_target(
    State(console): State<Console>,
    Path(name): Path<String>,
    _checked: Checked<CsrfForm>,
) -> Response {
    delete(&console, ManagedKind::Target, name).await
}

pub(crate) async fn delete_consumer(
    State(console): State<Console>,
    Path(name): Path<String>,
    _checked: Checked<CsrfForm>,
) -> Response {
    delete(&console, ManagedKind::Consumer, name).await
}

/// The "Add a consumer" form's fields.
#[derive(Deserialize, Default)]
pub(crate) struct ConsumerForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    target: String,
    /// `provider:<p>` or `sync:<name>`.
    #[serde(default)]
    source: String,
    /// `consumer_table` or `schema_mirror`.
    #[serde(default)]
    layout: String,
    #[serde(default)]
    schema: String,
    #[serde(default)]
    table: String,
}

fn consumer_form(
    console: &Console,
    session: &Session,
    f: &ConsumerForm,
    error: Option<&str>,
) -> Markup {
    let config = console.server.applied_config();
    let targets: Vec<String> = config
        .as_ref()
        .map(|c| c.targets.iter().map(|t| t.name.clone()).collect())
        .unwrap_or_default();
    let syncs: Vec<String> = config
        .as_ref()
        .map(|c| c.syncs.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default();
    let layout = if f.layout.is_empty() {
        "consumer_table"
    } else {
        f.layout.as_str()
    };
    let schema = if f.schema.is_empty() {
        "sluice"
    } else {
        f.schema.as_str()
    };
    html! {
        main #main {
            h1 { "Add a consumer" }
            p { "Records from a provider or a sync, written into a target. After saving, its page shows the table's CREATE TABLE statement and verifies it; the consumer starts at once (pause it there)." }
            @if let Some(error) = error {
                div.error role="alert" { @for line in error.lines() { p { (line) } } }
            }
            form method="post" action="/consumers/new" {
                input type="hidden" name="csrf" value=(session.csrf);
                label for="name" { "Name" }
                input #name type="text" name="name" value=(f.name) required;
                label for="target" { "Target" }
                select #target name="target" required {
                    @for t in &targets { option value=(t) selected[f.target == *t] { (t) } }
                }
                label for="source" { "Records from" }
                select #source name="source" {
                    @for p in ["postgres", "http", "stripe"] {
                        @let v = format!("provider:{p}");
                        option value=(v) selected[f.source == v] { "every " (p) " sync" }
                    }
                    @for s in &syncs {
                        @let v = format!("sync:{s}");
                        option value=(v) selected[f.source == v] { "sync " (s) }
                    }
                }
                fieldset {
                    legend { "Layout" }
                    label { input type="radio" name="layout" value="consumer_table" checked[layout == "consumer_table"]; " One table for every record (consumer table)" }
                    label { input type="radio" name="layout" value="schema_mirror" checked[layout == "schema_mirror"]; " A typed table per collection (schema mirror)" }
                    label for="schema" { "Schema" }
                    input #schema type="text" name="schema" value=(schema) required;
                    label for="table" { "Table (consumer table only)" }
                    input #table type="text" name="table" value=(f.table);
                }
                button type="submit" { "Create the consumer" }
            }
        }
    }
}

pub(crate) async fn new_consumer(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
) -> Response {
    document(
        "Add a consumer",
        Some(&session),
        consumer_form(&console, &session, &ConsumerForm::default(), None),
    )
    .into_response()
}

pub(crate) async fn create_consumer(
    State(console): State<Console>,
    Checked(session, f): Checked<ConsumerForm>,
) -> Response {
    let filter = match f.source.split_once(':') {
        Some(("sync", name)) => json!({"sync": {"name": name}}),
        Some((_, provider)) => json!({ "provider": provider }),
        None => json!({}),
    };
    let layout = if f.layout == "schema_mirror" {
        json!({"kind": "schema_mirror", "schema": f.schema.trim()})
    } else {
        json!({"kind": "consumer_table", "schema": f.schema.trim(), "table": f.table.trim()})
    };
    let body = json!({
        "name": f.name.trim(), "target": f.target, "filter": filter, "layout": layout,
    });
    let name = f.name.trim().to_owned();
    match apply(
        &console.server,
        ManagedKind::Consumer,
        Write::Create(body.to_string().into()),
    )
    .await
    {
        Ok(_) => redirect(
            &format!("/consumers/{}", segment(&name)),
            Some("Consumer created; it is starting."),
            None,
        ),
        Err(refusal) => (
            StatusCode::BAD_REQUEST,
            document(
                "Add a consumer",
                Some(&session),
                consumer_form(&console, &session, &f, Some(&refusal.text())),
            ),
        )
            .into_response(),
    }
}

pub(crate) async fn verify_consumer(
    State(console): State<Console>,
    Path(name): Path<String>,
    Checked(session, _): Checked<CsrfForm>,
) -> Response {
    let extra = outcome(
        "Verification",
        api_tools::verify_consumer(&console.server, &name).await,
    );
    consumer_page(&console, &session, &name, &Flash::default(), Some(extra)).await
}

#[derive(Deserialize)]
pub(crate) struct ControlForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    reason: String,
}

pub(crate) async fn control(
    State(console): State<Console>,
    Path(name): Path<String>,
    Checked(_, f): Checked<ControlForm>,
) -> Response {
    let action = match f.action.as_str() {
        "pause" | "resume" | "restart-backfill" => f.action.as_str(),
        _ => return (StatusCode::BAD_REQUEST, "unknown action").into_response(),
    };
    let reason = if f.reason.trim().is_empty() {
        "paused by a user (console)".to_owned()
    } else {
        f.reason.trim().to_owned()
    };
    let page = format!("/consumers/{}", segment(&name));
    match crate::api::control_consumer(&console.server, &name, action, reason).await {
        Ok(()) => {
            let done = match action {
                "pause" => "Paused.",
                "resume" => "Resumed.",
                _ => "The backfill starts again from the beginning of the stream.",
            };
            redirect(&page, Some(done), None)
        }
        Err((_, why)) => redirect(&page, None, Some(&why)),
    }
}

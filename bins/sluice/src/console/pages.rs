//! The console's pages: overview, target, consumer, sync, record lookup, event log.

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;
use sluice_core::{EntityKind, HealthReport, ManagedKind, Status};

use super::samples::{chart, number};
use super::{Console, Session, document, segment};
use crate::api_tools;
use crate::server::Server;

/// A note or an error carried back to a page after a form (`?note=…` / `?error=…`).
#[derive(Deserialize, Default)]
pub(crate) struct Flash {
    note: Option<String>,
    error: Option<String>,
}

pub(super) fn flash(flash: &Flash) -> Markup {
    html! {
        @if let Some(note) = &flash.note {
            p.note role="status" { (note) }
        }
        @if let Some(error) = &flash.error {
            div.error role="alert" {
                @for line in error.lines() { p { (line) } }
            }
        }
    }
}

pub(super) fn badge(status: Status) -> Markup {
    let name = status.to_string();
    html! { span class={"status status-" (name)} { (name) } }
}

/// The reasons an entity is not healthy, each with its fix.
pub(super) fn reasons(report: &HealthReport) -> Markup {
    html! {
        @for check in report.problems() {
            div.reason {
                p { strong { (check.name) ": " } (check.message) }
                @if let Some(fix) = &check.fix {
                    p.fix { "Fix: " code { (fix) } }
                }
            }
        }
    }
}

/// Every check of a report, as a table.
pub(super) fn checks(report: &HealthReport) -> Markup {
    html! {
        table {
            caption { "Health checks" }
            thead { tr { th scope="col" { "Check" } th scope="col" { "Status" } th scope="col" { "What was found" } th scope="col" { "Fix" } } }
            tbody {
                @for c in &report.checks {
                    tr {
                        td { (c.name) }
                        td { (badge(c.status)) }
                        td { (c.message) }
                        td { @if let Some(fix) = &c.fix { code { (fix) } } }
                    }
                }
            }
        }
    }
}

/// Backfill progress from a source's details: a bar per table or collection.
pub(super) fn backfill(details: &serde_json::Map<String, Value>) -> Markup {
    let mut rows: Vec<(String, u64, Option<u64>, bool)> = Vec::new();
    if let Some(collections) = details
        .get("backfill")
        .and_then(|b| b["collections"].as_object())
    {
        for (name, c) in collections {
            let read = c["rows"].as_u64().unwrap_or(0);
            let estimate = c["estimate"].as_u64();
            let done = c["done"].as_bool().unwrap_or(false);
            rows.push((name.clone(), read, estimate, done));
        }
    }
    if let Some(accounts) = details.get("accounts").and_then(Value::as_object) {
        for (account, a) in accounts {
            for (id, b) in a["backfill"].as_object().into_iter().flatten() {
                let label = if accounts.len() > 1 {
                    format!("{account}: {id}")
                } else {
                    id.clone()
                };
                let read = b["read"].as_u64().unwrap_or(0);
                rows.push((label, read, None, b["done"].as_bool().unwrap_or(false)));
            }
        }
    }
    html! {
        @if rows.is_empty() {
            span.muted { "—" }
        } @else {
            ul.bars {
                @for (name, read, estimate, done) in &rows {
                    @let total = estimate.map(|e| e.max(*read)).unwrap_or(0);
                    @let text = match (done, total) {
                        (true, _) => format!("{name}: {read} read, done"),
                        (false, 0) => format!("{name}: {read} read"),
                        (false, t) => format!("{name}: {read} of ~{t}"),
                    };
                    li {
                        label { (text)
                            @if *done {
                                progress value="1" max="1" { "done" }
                            } @else if total > 0 {
                                progress value=(read) max=(total) { (text) }
                            } @else {
                                progress { (text) }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) async fn overview(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Query(f): Query<Flash>,
) -> Response {
    let server = &console.server;
    let reports = server.health().await;
    let config = server.applied_config();
    let troubled = reports
        .iter()
        .filter(|r| matches!(r.status, Status::Warning | Status::Error | Status::Paused))
        .count();
    let progress: Vec<(String, serde_json::Map<String, Value>)> = {
        let entities = server.entities.read().await;
        entities
            .syncs
            .iter()
            .map(|(name, e)| (name.clone(), e.source.progress().details))
            .collect()
    };
    let samples = server.samples.lock().unwrap_or_else(|e| e.into_inner());
    let of = |kind| reports.iter().filter(move |r| r.entity.kind == kind);
    let body = html! {
        main #main {
            h1 { "Overview" }
            (flash(&f))
            p.summary {
                (reports.len()) " entities; "
                @if troubled == 0 { "everything is healthy or starting." }
                @else { (troubled) " need attention (their reasons and fixes are below)." }
            }
            @for report in of(EntityKind::Config) {
                section.config { h2 { "Configuration" } (badge(report.status)) (reasons(report)) }
            }
            section {
                h2 { "Targets" }
                table {
                    thead { tr { th scope="col" { "Target" } th scope="col" { "Status" } th scope="col" { "Why" } } }
                    tbody {
                        @for r in of(EntityKind::Target) {
                            tr {
                                td { a href={"/targets/" (segment(&r.entity.name))} { (r.entity.name) } }
                                td { (badge(r.status)) }
                                td { (reasons(r)) }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Sources" }
                table {
                    thead { tr { th scope="col" { "Sync" } th scope="col" { "Provider" } th scope="col" { "Status" } th scope="col" { "Backfill" } th scope="col" { "Why" } } }
                    tbody {
                        @for r in of(EntityKind::Sync) {
                            @let provider = config.as_ref().and_then(|c| c.syncs.iter().find(|s| s.name == r.entity.name)).map(|s| s.source.provider().as_str()).unwrap_or("");
                            tr {
                                td { a href={"/syncs/" (segment(&r.entity.name))} { (r.entity.name) } }
                                td { (provider) }
                                td { (badge(r.status)) }
                                td {
                                    @if let Some((_, details)) = progress.iter().find(|(n, _)| *n == r.entity.name) { (backfill(details)) }
                                }
                                td { (reasons(r)) }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Consumers" }
                table {
                    thead { tr { th scope="col" { "Consumer" } th scope="col" { "Target" } th scope="col" { "Status" } th scope="col" { "Lag" } th scope="col" { "Why" } } }
                    tbody {
                        @for r in of(EntityKind::Consumer) {
                            @let target = config.as_ref().and_then(|c| c.consumers.iter().find(|c| c.name.0 == r.entity.name)).map(|c| c.target.clone()).unwrap_or_default();
                            @let records = samples.get(&r.entity.name, "lag_records");
                            @let seconds = samples.get(&r.entity.name, "lag_seconds");
                            tr {
                                td { a href={"/consumers/" (segment(&r.entity.name))} { (r.entity.name) } }
                                td { a href={"/targets/" (segment(&target))} { (target) } }
                                td { (badge(r.status)) }
                                td {
                                    @match (records.last(), seconds.last()) {
                                        (Some((_, n)), Some((_, s))) => { (number(*n)) " records, " (number(*s)) " s" }
                                        _ => span.muted { "—" },
                                    }
                                }
                                td { (reasons(r)) }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Lag over the last hour" }
                div.charts {
                    @for r in of(EntityKind::Consumer) {
                        (chart(&format!("{} lag (records)", r.entity.name), "records", &samples.get(&r.entity.name, "lag_records")))
                        (chart(&format!("{} lag (seconds)", r.entity.name), "s", &samples.get(&r.entity.name, "lag_seconds")))
                    }
                    @for r in of(EntityKind::Sync) {
                        @let slot = samples.get(&r.entity.name, "slot_bytes");
                        @if !slot.is_empty() { (chart(&format!("{} replication slot lag (bytes)", r.entity.name), "bytes", &slot)) }
                        @let waits = samples.get(&r.entity.name, "rate_limit_wait_seconds");
                        @if !waits.is_empty() { (chart(&format!("{} time waited on rate limits (seconds, since start)", r.entity.name), "s", &waits)) }
                    }
                }
            }
        }
    };
    drop(samples);
    document("Overview", Some(&session), body).into_response()
}

pub(crate) fn not_found(session: &Session, what: &str) -> Response {
    let body = html! { main #main { h1 { "Not found" } p { (what) } p { a href="/" { "Back to the overview" } } } };
    (
        StatusCode::NOT_FOUND,
        document("Not found", Some(session), body),
    )
        .into_response()
}

/// The form that deletes an entity created in the console or through the API.
fn delete_section(session: &Session, kind: &str, name: &str, note: Option<&str>) -> Markup {
    html! {
        section {
            h2 { "Delete" }
            @if let Some(note) = note { p { (note) } }
            form method="post" action={"/" (kind) "s/" (segment(name)) "/delete"} {
                input type="hidden" name="csrf" value=(session.csrf);
                button.danger type="submit" { "Delete this " (kind) }
            }
        }
    }
}

fn origin_of(server: &Server, kind: ManagedKind, name: &str) -> bool {
    crate::api_write::managed_now(server).has(kind, name)
}

/// A target's page; `extra` is the result of a form just sent (a setup check).
pub(crate) async fn target_page(
    console: &Console,
    session: &Session,
    name: &str,
    f: &Flash,
    extra: Option<Markup>,
) -> Response {
    let server = &console.server;
    let Some(config) = server.applied_config() else {
        return not_found(session, "sluice is still starting");
    };
    let Some(target) = config.targets.iter().find(|t| t.name == name) else {
        return not_found(session, &format!("No target named {name:?}."));
    };
    let report = server.cached_health(EntityKind::Target, name);
    let setup = api_tools::setup_of(&config, target);
    let c = &target.connection;
    let managed = origin_of(server, ManagedKind::Target, name);
    let consumers: Vec<&str> = config
        .consumers
        .iter()
        .filter(|c| c.target == name)
        .map(|c| c.name.0.as_str())
        .collect();
    let body = html! {
        main #main {
            h1 { "Target " (name) " " (badge(report.status)) }
            (flash(f))
            (reasons(&report))
            section {
                h2 { "Connection" }
                dl {
                    dt { "Host" } dd { (c.host) ":" (c.port) }
                    dt { "Database" } dd { (c.database) }
                    dt { "Sync user" } dd { (c.user) }
                    dt { "Password" } dd { @if c.password.is_some() { "set" } @else { "unset" } }
                    dt { "SSL mode" } dd { (format!("{:?}", c.ssl.mode).to_lowercase()) }
                    dt { "Tunnel" } dd { @if c.tunnel.is_some() { "yes" } @else { "none" } }
                    dt { "Read role" } dd { (target.read_role) }
                    dt { "Declared in" } dd { @if managed { "the console or API (managed.toml)" } @else { "sluice.toml" } }
                    dt { "Consumers" } dd { @if consumers.is_empty() { "none" } @else { (consumers.join(", ")) } }
                }
            }
            (checks(&report))
            section {
                h2 { "Setup" }
                @match &setup {
                    Ok(setup) => {
                        h3 { "Automated" }
                        p { "Lend admin credentials for one run; sluice creates the roles and grants and forgets them:" }
                        pre { code { (setup["automated"].as_str().unwrap_or_default()) } }
                        h3 { "Manual" }
                        p { "Run this as a database owner or superuser (safe to run twice). Put the sync user's password where the placeholder is, the one sluice is configured with." }
                        pre.sql { code { (setup["manual_sql"].as_str().unwrap_or_default()) } }
                    }
                    Err(e) => { p.error { (e.to_string()) } }
                }
                form method="post" action={"/targets/" (segment(name)) "/check"} {
                    input type="hidden" name="csrf" value=(session.csrf);
                    button type="submit" { "Run the setup check" }
                }
                @if let Some(extra) = extra { (extra) }
            }
            section {
                h2 { "Read access" }
                p { "Users granted " code { (target.read_role) } " can read everything sluice writes to this target." }
                form method="post" action={"/targets/" (segment(name)) "/readers"} {
                    input type="hidden" name="csrf" value=(session.csrf);
                    label for="users" { "Users (comma-separated roles)" }
                    input #users type="text" name="users" required;
                    button type="submit" name="action" value="grant" { "Grant the read role" }
                    button type="submit" name="action" value="revoke" { "Revoke it" }
                }
            }
            @if managed { (delete_section(session, "target", name, None)) }
        }
    };
    document(&format!("Target {name}"), Some(session), body).into_response()
}

pub(crate) async fn target(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    target_page(&console, &session, &name, &f, None).await
}

/// A check report as a list of findings with their fixes.
pub(super) fn findings(title: &str, report: &sluice_core::CheckReport) -> Markup {
    html! {
        section.findings aria-live="polite" {
            h3 { (title) ": " @if report.is_ok() { span.status.status-healthy { "all good" } } @else { span.status.status-error { "needs fixing" } } }
            ul {
                @for f in &report.findings {
                    li {
                        @if f.ok { "✓ " } @else { "✗ " }
                        strong { (f.check) } ": " (f.message)
                        @if let Some(fix) = &f.fix { div.fix { "Fix: " pre { code { (fix) } } } }
                    }
                }
            }
        }
    }
}

/// A consumer's page; `extra` is the result of a form just sent (a verification).
pub(crate) async fn consumer_page(
    console: &Console,
    session: &Session,
    name: &str,
    f: &Flash,
    extra: Option<Markup>,
) -> Response {
    let server = &console.server;
    let Some(config) = server.applied_config() else {
        return not_found(session, "sluice is still starting");
    };
    let Some(consumer) = config.consumers.iter().find(|c| c.name.0 == name) else {
        return not_found(session, &format!("No consumer named {name:?}."));
    };
    let report = server.cached_health(EntityKind::Consumer, name);
    let table = api_tools::create_table_of(consumer);
    let managed = origin_of(server, ManagedKind::Consumer, name);
    let paused_by_user = report
        .checks
        .iter()
        .any(|c| c.name == "state" && c.status == Status::Paused);
    let (records, seconds) = {
        let samples = server.samples.lock().unwrap_or_else(|e| e.into_inner());
        (
            samples.get(name, "lag_records"),
            samples.get(name, "lag_seconds"),
        )
    };
    let filter = serde_json::to_string(&consumer.filter).unwrap_or_default();
    let layout = serde_json::to_string(&consumer.layout).unwrap_or_default();
    let body = html! {
        main #main {
            h1 { "Consumer " (name) " " (badge(report.status)) }
            (flash(f))
            (reasons(&report))
            dl {
                dt { "Target" } dd { a href={"/targets/" (segment(&consumer.target))} { (consumer.target) } }
                dt { "Filter" } dd { code { (filter) } }
                dt { "Layout" } dd { code { (layout) } }
                dt { "Declared in" } dd { @if managed { "the console or API (managed.toml)" } @else { "sluice.toml" } }
            }
            section {
                h2 { "Control" }
                form.inline method="post" action={"/consumers/" (segment(name)) "/control"} {
                    input type="hidden" name="csrf" value=(session.csrf);
                    @if paused_by_user {
                        button type="submit" name="action" value="resume" { "Resume" }
                    } @else {
                        label for="reason" { "Reason for pausing (optional)" }
                        input #reason type="text" name="reason";
                        button type="submit" name="action" value="pause" { "Pause" }
                    }
                    button type="submit" name="action" value="restart-backfill" { "Restart the backfill" }
                }
            }
            (checks(&report))
            section {
                h2 { "Lag" }
                div.charts {
                    (chart("Lag (records)", "records", &records))
                    (chart("Lag (seconds)", "s", &seconds))
                }
            }
            section {
                h2 { "Table" }
                @if let Some(sql) = table["sql"].as_str() {
                    pre.sql { code { (sql) } }
                }
                p { (table["note"].as_str().unwrap_or_default()) }
                form method="post" action={"/consumers/" (segment(name)) "/verify"} {
                    input type="hidden" name="csrf" value=(session.csrf);
                    button type="submit" { "Verify the table" }
                }
                @if let Some(extra) = extra { (extra) }
            }
            @if managed { (delete_section(session, "consumer", name, Some("Its rows stay in the target."))) }
        }
    };
    document(&format!("Consumer {name}"), Some(session), body).into_response()
}

pub(crate) async fn consumer(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    consumer_page(&console, &session, &name, &f, None).await
}

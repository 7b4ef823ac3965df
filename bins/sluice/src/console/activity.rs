//! The console's pages about what flows: a sync's collections and cursors, record lookup, and
//! the event log.

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;
use serde_json::Value;
use sluice_core::{EntityKind, RecordKey, RecordStream, Status, SyncId};

use super::pages::{backfill, badge, checks, not_found, reasons};
use super::samples::chart;
use super::{Console, Session, document};
use crate::api::rfc3339;

pub(crate) async fn sync(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Path(name): Path<String>,
) -> Response {
    let server = &console.server;
    let Some(config) = server.applied_config() else {
        return not_found(&session, "sluice is still starting");
    };
    let Some(sync) = config.syncs.iter().find(|s| s.name == name) else {
        return not_found(&session, &format!("No sync named {name:?}."));
    };
    let report = server.cached_health(EntityKind::Sync, &name);
    let details = {
        let entities = server.entities.read().await;
        entities.syncs.get(&name).map(|e| e.source.progress())
    };
    let (slot, waits) = {
        let samples = server.samples.lock().unwrap_or_else(|e| e.into_inner());
        (
            samples.get(&name, "slot_bytes"),
            samples.get(&name, "rate_limit_wait_seconds"),
        )
    };
    let now = time::OffsetDateTime::now_utc();
    let body = html! {
        main #main {
            h1 { "Sync " (name) " " (badge(report.status)) }
            (reasons(&report))
            dl {
                dt { "Provider" } dd { (sync.source.provider().as_str()) }
                dt { "Sync id" } dd { code { (sync.id) } }
                @if let Some(p) = &details {
                    dt { "Records appended since start" } dd { (p.appended) }
                    @if let Some(lsn) = p.details.get("confirmed_lsn").and_then(Value::as_str) {
                        dt { "Confirmed position" } dd { code { (lsn) } }
                    }
                }
            }
            @if let Some(p) = &details {
                section {
                    h2 { "Collections and backfill" }
                    (backfill(&p.details))
                }
                @if let Some(accounts) = p.details.get("accounts").and_then(Value::as_object) {
                    section {
                        h2 { "Change cursors" }
                        table {
                            thead { tr { th scope="col" { "Account" } th scope="col" { "Cursor" } th scope="col" { "Last successful poll" } } }
                            tbody {
                                @for (account, a) in accounts {
                                    tr {
                                        td { (account) }
                                        td { code { (a["cursor"].as_str().unwrap_or("—")) } }
                                        td { (a["last_poll"].as_str().unwrap_or("not yet")) }
                                    }
                                }
                            }
                        }
                    }
                }
            } @else {
                p.muted { "Not running: see the health checks." }
            }
            (checks(&report))
            @if !slot.is_empty() || !waits.is_empty() {
                section {
                    h2 { "Over the last hour" }
                    div.charts {
                        @if !slot.is_empty() { (chart("Replication slot lag (bytes)", "bytes", &slot)) }
                        @if !waits.is_empty() { (chart("Time waited on rate limits (seconds, since start)", "s", &waits)) }
                    }
                }
            }
            p.muted { "As of " (rfc3339(now)) }
        }
    };
    document(&format!("Sync {name}"), Some(&session), body).into_response()
}

#[derive(Deserialize, Default)]
pub(crate) struct Lookup {
    sync: Option<String>,
    collection: Option<String>,
    id: Option<String>,
}

pub(crate) async fn records(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
    Query(q): Query<Lookup>,
) -> Response {
    let server = &console.server;
    let syncs: Vec<(String, SyncId)> = server
        .applied_config()
        .map(|c| c.syncs.iter().map(|s| (s.name.clone(), s.id)).collect())
        .unwrap_or_default();
    let wanted = match (&q.sync, &q.collection, &q.id) {
        (Some(s), Some(c), Some(i)) if !c.is_empty() && !i.is_empty() => Some((s, c, i)),
        _ => None,
    };
    let found = match wanted {
        None => None,
        Some((s, c, i)) => match syncs.iter().find(|(n, _)| n == s) {
            None => Some(Err(format!("No sync named {s:?}."))),
            Some((_, sync_id)) => {
                let key = RecordKey::new(*sync_id, c.as_str(), i.as_str());
                Some(match server.stream.get(&key).await {
                    Ok(Some(entry)) => Ok(entry),
                    Ok(None) => Err(format!(
                        "No record {i:?} in collection {c:?} of sync {s:?}."
                    )),
                    Err(e) => Err(e.to_string()),
                })
            }
        },
    };
    let body = html! {
        main #main {
            h1 { "Record lookup" }
            form method="get" action="/records" {
                label for="sync" { "Sync" }
                select #sync name="sync" {
                    @for (name, _) in &syncs {
                        option value=(name) selected[q.sync.as_deref() == Some(name.as_str())] { (name) }
                    }
                }
                label for="collection" { "Collection (a table like public.orders, or stripe:customer)" }
                input #collection type="text" name="collection" value=(q.collection.clone().unwrap_or_default()) required;
                label for="id" { "Record id (the upstream key)" }
                input #id type="text" name="id" value=(q.id.clone().unwrap_or_default()) required;
                button type="submit" { "Find" }
            }
            @match &found {
                Some(Ok(entry)) => {
                    section.record {
                        h2 { "Current version" }
                        dl {
                            dt { "Position in the stream" } dd { (entry.seq.0) }
                            dt { "Version" } dd { code { (format!("{:?}", entry.record.version)) } }
                            dt { "Changed upstream at" } dd { (rfc3339(entry.record.upstream_updated_at)) }
                            dt { "Deleted" } dd { @if entry.record.is_tombstone() { "yes (a tombstone)" } @else { "no" } }
                        }
                        @if let sluice_core::Change::Upsert { payload } = &entry.record.change {
                            h3 { "Payload" }
                            pre { code { (serde_json::to_string_pretty(payload).unwrap_or_default()) } }
                        }
                    }
                }
                Some(Err(why)) => { p.error role="alert" { (why) } }
                None => {}
            }
        }
    };
    document("Record lookup", Some(&session), body).into_response()
}

pub(crate) async fn events(
    State(console): State<Console>,
    Extension(session): Extension<Session>,
) -> Response {
    let events = console.server.alerter.events();
    let status = |s: Option<Status>| match s {
        Some(s) => badge(s),
        None => html! { span.muted { "—" } },
    };
    let body = html! {
        main #main {
            h1 { "Event log" }
            p { "Every change of an entity's status, newest first (the last " (sluice_alerts::RECENT) "), including refused config reloads." }
            table {
                thead { tr { th scope="col" { "When" } th scope="col" { "Entity" } th scope="col" { "From" } th scope="col" { "To" } th scope="col" { "Why" } } }
                tbody {
                    @for e in &events {
                        tr {
                            td { (rfc3339(e.at)) }
                            td { (e.entity.to_string()) }
                            td { (status(e.from)) }
                            td { @if e.to.is_none() { "removed" } @else { (status(e.to)) } }
                            td { (e.reason) @if let Some(fix) = &e.fix { p.fix { "Fix: " code { (fix) } } } }
                        }
                    }
                }
            }
            @if events.is_empty() { p.muted { "Nothing has changed yet." } }
        }
    };
    document("Event log", Some(&session), body).into_response()
}

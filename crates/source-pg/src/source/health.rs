//! The source's health: replication, backfill, slot, heartbeat and tables checks.

use async_trait::async_trait;
use sluice_core::{Error, ErrorClass, Health, HealthReport, Status};
use sluice_pg::ConnectionSettings;
use time::OffsetDateTime;

use super::{PostgresSource, db};

#[async_trait]
impl Health for PostgresSource {
    async fn health(&self) -> HealthReport {
        let now = OffsetDateTime::now_utc();
        let inner = &self.inner;
        let (streaming, last_error, last_activity, notices) = self.status(|s| {
            (
                s.streaming,
                s.last_error
                    .as_ref()
                    .map(|e| (e.problem(), e.fix().map(str::to_owned), e.class())),
                s.last_activity,
                s.notices.clone(),
            )
        });
        let progress = self.backfill_progress();
        let slot = slot_facts(&inner.settings, &inner.spec.slot).await;
        let mut health = inner.health.lock().unwrap_or_else(|e| e.into_inner());
        match (&last_error, streaming) {
            (_, true) => {
                health.observe(
                    "replication",
                    Status::Healthy,
                    "streaming changes",
                    None,
                    now,
                );
            }
            (Some((message, _, ErrorClass::GiveUp)), false) => {
                health.observe(
                    "replication",
                    Status::Error,
                    format!("stopped: {message}"),
                    Some("the source stopped because this data would be refused again; correct it upstream, then restart sluice (the slot keeps every change after the last confirmed one)".to_owned()),
                    now,
                );
            }
            (Some((message, fix, class)), false) => {
                let status = if *class == ErrorClass::FixConfiguration {
                    Status::Error
                } else {
                    Status::Warning
                };
                health.observe("replication", status, message.clone(), fix.clone(), now);
            }
            (None, false) => {
                health.observe("replication", Status::Initializing, "connecting", None, now);
            }
        }
        if progress.done {
            health.observe(
                "backfill",
                Status::Healthy,
                format!(
                    "complete ({} rows)",
                    sluice_core::text::thousands(progress.total_rows)
                ),
                None,
                now,
            );
        } else if let Some(collection) = &progress.collection {
            health.observe(
                "backfill",
                Status::Initializing,
                format!(
                    "reading {collection}: {} of ~{} rows ({} more tables)",
                    sluice_core::text::thousands(progress.rows),
                    sluice_core::text::thousands(progress.estimate),
                    progress.remaining
                ),
                None,
                now,
            );
        }
        if let Ok(Some((lag, _))) = &slot {
            // Kept for metrics, which open no connection.
            self.status(|s| s.slot_retained_bytes = Some(*lag));
        }
        match slot {
            Ok(Some((lag, active))) => {
                let warn = lag > inner.options.slot_lag_warning_bytes;
                health.observe(
                    "slot",
                    if warn || !active { Status::Warning } else { Status::Healthy },
                    format!(
                        "slot {} {} and holds {lag} bytes of WAL",
                        inner.spec.slot,
                        if active { "is active" } else { "is not active" }
                    ),
                    warn.then(|| "the source is producing WAL faster than sluice appends it, or sluice is stopped; check sluice's logs and the records stream's disk".to_owned()),
                    now,
                );
            }
            // Not made yet: the source makes it when it connects. (Once it has streamed, a
            // slot gone is an error whatever `create_missing` says: changes were lost.)
            Ok(None) if inner.options.create_missing && last_activity.is_none() && !streaming => {
                health.observe(
                    "slot",
                    Status::Initializing,
                    format!(
                        "slot {} is created when the source connects (create_missing = true)",
                        inner.spec.slot
                    ),
                    None,
                    now,
                );
            }
            Ok(None) => {
                health.observe(
                    "slot",
                    Status::Error,
                    format!("slot {} does not exist", inner.spec.slot),
                    Some(
                        "set create_missing = true, or create it: see `sluice source check`".into(),
                    ),
                    now,
                );
            }
            Err(e) => {
                health.observe(
                    "slot",
                    Status::Warning,
                    format!("cannot read slot state: {e}"),
                    None,
                    now,
                );
            }
        }
        let quiet = last_activity.map(|t| now - t);
        let limit = inner.options.heartbeat * 3;
        match quiet {
            Some(q) if q <= limit => {
                health.observe(
                    "heartbeat",
                    Status::Healthy,
                    format!("last change or heartbeat {:.0}s ago", q.as_seconds_f64()),
                    None,
                    now,
                );
            }
            Some(q) => {
                health.observe(
                    "heartbeat",
                    Status::Warning,
                    format!("no change or heartbeat for {:.0}s", q.as_seconds_f64()),
                    Some("the replication path may be stalled; check that sluice is connected and the role may call pg_logical_emit_message".into()),
                    now,
                );
            }
            None => {}
        }
        let unreadable = self.unreadable();
        if !unreadable.is_empty() {
            // Only these tables wait; every other table keeps streaming.
            let problems: Vec<&str> = unreadable.iter().map(|(p, _)| p.as_str()).collect();
            let fixes: Vec<&str> = unreadable
                .iter()
                .filter_map(|(_, f)| f.as_deref())
                .collect();
            health.observe(
                "tables",
                Status::Error,
                problems.join("; "),
                (!fixes.is_empty()).then(|| fixes.join(" ")),
                now,
            );
        } else {
            health.observe(
                "tables",
                if notices.is_empty() {
                    Status::Healthy
                } else {
                    Status::Warning
                },
                if notices.is_empty() {
                    "every published table can be read".to_owned()
                } else {
                    notices.join("; ")
                },
                None,
                now,
            );
        }
        health.report()
    }
}

/// `(bytes of WAL the slot holds, active)`, or `None` when the slot is missing.
async fn slot_facts(
    settings: &ConnectionSettings,
    slot: &str,
) -> Result<Option<(u64, bool)>, Error> {
    let mut conn = settings
        .connect()
        .await
        .map_err(|e| Error::unavailable(format!("source: {e}"), "connect"))?;
    let row = sqlx::query!(
        // On a standby the WAL ends where replay has reached.
        r#"select coalesce(pg_wal_lsn_diff(case when pg_is_in_recovery() then pg_last_wal_replay_lsn()
                                                else pg_current_wal_lsn() end,
                                           confirmed_flush_lsn), 0)::int8 as "lag!",
                  active as "active!"
           from pg_replication_slots where slot_name = $1"#,
        slot
    )
    .fetch_optional(&mut conn)
    .await
    .map_err(db)?;
    Ok(row.map(|r| (r.lag.max(0) as u64, r.active)))
}

//! `sluice config plan` and `sluice check`: each entity of a config inspected by the crate that
//! owns it (a source through its [`Source`] implementation, a layout through its target
//! crate), after its tunnel is checked hop by hop. Nothing is changed.

use std::sync::Arc;

use sluice_core::{
    CheckReport, Config, ConnectionConfig, EntityKind, EntityRef, LayoutConfig, SyncConfig,
    TunnelConfig,
};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{ConsumerTable, SchemaMirrorTarget};

use crate::connect::{bastion_config, settings_for};
use crate::server::source_for;

/// `sluice config plan`: what `serve` would create or change, found by connecting (as the
/// configured users) and looking. Nothing is changed. Returns the lines and whether every
/// entity can start.
pub async fn plan(config: &Config) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut ok = true;
    for problem in config.problems() {
        lines.push(format!("config: {}: {}", problem.message, problem.fix));
        ok = false;
    }
    for consumer in &config.consumers {
        let Some(target) = config.targets.iter().find(|t| t.name == consumer.target) else {
            continue; // reported by problems()
        };
        let prefix = format!("consumer {} → target {}", consumer.name, target.name);
        if let Some(TunnelConfig::Agent { name: agent }) = &target.connection.tunnel {
            lines.push(format!(
                "{prefix}: through agent {agent:?}; inspected once the agent connects"
            ));
            continue;
        }
        let settings = match settings_for(&target.connection, None).await {
            Ok((settings, _tunnels)) => settings,
            Err(e) => {
                ok = false;
                lines.push(format!("{prefix}: {e}"));
                continue;
            }
        };
        let report = match &consumer.layout {
            LayoutConfig::ConsumerTable { schema, table, .. } => {
                ConsumerTable::new(schema, table)
                    .plan(&settings, &target.read_role)
                    .await
            }
            LayoutConfig::SchemaMirror { schema, .. } => {
                SchemaMirrorTarget::plan(&settings, schema).await
            }
        };
        ok &= render(&prefix, &report, &mut lines);
    }
    let scratch = match Scratch::open().await {
        Ok(scratch) => scratch,
        Err(e) => {
            lines.push(format!("plan: {e}"));
            return (lines, false);
        }
    };
    for sync in &config.syncs {
        let prefix = format!("sync {}", sync.name);
        if let Some(TunnelConfig::Agent { name: agent }) =
            sync.source.connection().and_then(|c| c.tunnel.as_ref())
        {
            lines.push(format!(
                "{prefix}: through agent {agent:?}; inspected once the agent connects"
            ));
            continue;
        }
        let (settings, _tunnels) = match sync.source.connection() {
            None => (None, Vec::new()),
            Some(connection) => match settings_for(connection, None).await {
                Ok((settings, tunnels)) => (Some(settings), tunnels),
                Err(e) => {
                    ok = false;
                    lines.push(format!("{prefix}: {e}"));
                    continue;
                }
            },
        };
        let source = source_for(sync, scratch.stream.clone(), settings);
        ok &= render(&prefix, &source.plan().await, &mut lines);
    }
    (lines, ok)
}

/// Adds a report's findings as plan lines (the fix after a problem); false if any failed.
fn render(prefix: &str, report: &CheckReport, lines: &mut Vec<String>) -> bool {
    for f in &report.findings {
        match (&f.fix, f.ok) {
            (Some(fix), false) => lines.push(format!("{prefix}: {}: {fix}", f.message)),
            _ => lines.push(format!("{prefix}: {}", f.message)),
        }
    }
    report.is_ok()
}

/// A records stream in a temporary directory, removed on drop: sources are built with a
/// stream, and `plan` and `check` must not touch the real one (nor create the data directory).
/// They never append to it.
struct Scratch {
    stream: Arc<EmbeddedStream>,
    _dir: tempfile::TempDir,
}

impl Scratch {
    async fn open() -> Result<Self, String> {
        let dir =
            tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        let stream = EmbeddedStream::open(dir.path())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            stream: Arc::new(stream),
            _dir: dir,
        })
    }
}

/// `sluice check`: every target and sync of the config, hop by hop for tunnelled connections
/// (bastion reachable, host key, key accepted, forward allowed, database reachable), then the
/// connection itself (for a source, everything it needs upstream).
pub async fn check(config: &Config) -> Vec<(EntityRef, CheckReport)> {
    let mut out = Vec::new();
    for target in &config.targets {
        let entity = EntityRef {
            kind: EntityKind::Target,
            name: target.name.clone(),
        };
        let mut report = CheckReport::default();
        if tunnel_hops(&target.connection, &mut report).await {
            match settings_for(&target.connection, None).await {
                Ok((settings, _tunnels)) => report
                    .findings
                    .extend(settings.check_reachable().await.findings),
                Err(e) => report.push("connect", false, e.problem(), e.fix().map(str::to_owned)),
            }
        }
        out.push((entity, report));
    }
    let scratch = match Scratch::open().await {
        Ok(scratch) => scratch,
        Err(e) => {
            let mut report = CheckReport::default();
            report.push("check", false, e, None);
            let entity = EntityRef {
                kind: EntityKind::Config,
                name: "sluice.toml".into(),
            };
            out.push((entity, report));
            return out;
        }
    };
    for sync in &config.syncs {
        let entity = EntityRef {
            kind: EntityKind::Sync,
            name: sync.name.clone(),
        };
        out.push((entity, check_sync(sync, &scratch).await));
    }
    out
}

/// One sync: its tunnel hop by hop, then everything its source needs upstream.
async fn check_sync(sync: &SyncConfig, scratch: &Scratch) -> CheckReport {
    let mut report = CheckReport::default();
    let mut settings = None;
    let mut _tunnels = Vec::new();
    if let Some(connection) = sync.source.connection() {
        if !tunnel_hops(connection, &mut report).await {
            return report;
        }
        match settings_for(connection, None).await {
            Ok((s, t)) => (settings, _tunnels) = (Some(s), t),
            Err(e) => {
                report.push("connect", false, e.problem(), e.fix().map(str::to_owned));
                return report;
            }
        }
    }
    let source = source_for(sync, scratch.stream.clone(), settings);
    report.findings.extend(source.check().await.findings);
    report
}

/// `sluice source check --sync NAME`: that sync of the config, as `sluice check` checks it.
pub async fn check_one_sync(sync: &SyncConfig) -> Result<CheckReport, sluice_core::Error> {
    let scratch = Scratch::open().await.map_err(sluice_core::Error::invalid)?;
    Ok(check_sync(sync, &scratch).await)
}

/// Checks a tunnelled connection hop by hop into `report`. False when the database cannot be
/// checked from here: a hop failed, or the connection goes through an agent (reachable only
/// while it is connected to `sluice serve`).
async fn tunnel_hops(connection: &ConnectionConfig, report: &mut CheckReport) -> bool {
    match &connection.tunnel {
        None => true,
        Some(TunnelConfig::Bastion { .. }) => {
            let bastion = bastion_config(connection).expect("a bastion tunnel");
            for (hop, status) in sluice_tunnel::BastionTunnel::hops(&bastion).await {
                let name = format!("tunnel: {hop}");
                match status {
                    Some(Ok(())) => report.push(&name, true, "ok", None),
                    Some(Err(message)) => report.push(&name, false, message, None),
                    None => report.push(&name, false, "not reached", None),
                }
            }
            report.is_ok()
        }
        Some(TunnelConfig::Agent { name }) => {
            report.push(
                "tunnel: agent",
                true,
                format!("through agent {name:?}: reachable while the agent is connected to `sluice serve` (see `sluice status`)"),
                None,
            );
            false
        }
    }
}

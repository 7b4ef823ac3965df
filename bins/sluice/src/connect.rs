//! Reaching the databases a config names: through a bastion (an SSH tunnel opened here), or
//! through an agent that dialled in to `[agents]` (the reverse-tunnel endpoint), or directly.

use std::time::Duration;

use sluice_core::{ConnectionConfig, Error, TunnelConfig};
use sluice_target_pg::ConnectionSettings;

/// Starts the reverse-tunnel endpoint with the registered agents.
pub async fn start_agents(
    config: &sluice_core::AgentsConfig,
) -> Result<sluice_tunnel::ReverseServer, Error> {
    let problem = |e: sluice_tunnel::TunnelError| {
        Error::configuration(
            format!("[agents]: {e}"),
            "check [agents] listen, host_key_file and each agent's public_key",
        )
    };
    let bind: std::net::SocketAddr = config.listen.parse().map_err(|_| {
        Error::configuration(
            format!("[agents] listen = {:?} is not an address", config.listen),
            "use ip:port, e.g. 0.0.0.0:7722",
        )
    })?;
    let host_key = sluice_tunnel::keys::load_or_generate(&config.host_key_file).map_err(problem)?;
    let mut agents = Vec::new();
    for agent in &config.agents {
        let key = sluice_tunnel::keys::parse_public(&agent.public_key).map_err(problem)?;
        agents.push((agent.name.clone(), key));
    }
    let server = sluice_tunnel::ReverseServer::start(bind, host_key, agents)
        .await
        .map_err(problem)?;
    tracing::info!(
        address = %server.addr(),
        host_key_fingerprint = %server.host_key_fingerprint(),
        "agent endpoint listening (agents pin this fingerprint)"
    );
    Ok(server)
}

/// The tunnel to `connection`'s database through the configured bastion.
/// `None` when the connection names no bastion.
pub fn bastion_config(connection: &ConnectionConfig) -> Option<sluice_tunnel::BastionConfig> {
    let Some(TunnelConfig::Bastion {
        host,
        port,
        user,
        key_file,
        host_key_fingerprint,
    }) = &connection.tunnel
    else {
        return None;
    };
    let mut bastion = sluice_tunnel::BastionConfig::new(host, *port, user, key_file);
    bastion.host_key_fingerprint = host_key_fingerprint.clone();
    bastion.forward_host = connection.host.clone();
    bastion.forward_port = connection.port;
    Some(bastion)
}

/// Connection settings, through a bastion tunnel or an agent when the config names one.
pub async fn settings_for(
    connection: &ConnectionConfig,
    reverse: Option<&sluice_tunnel::ReverseServer>,
) -> Result<(ConnectionSettings, Vec<sluice_tunnel::BastionTunnel>), Error> {
    let mut settings = ConnectionSettings::from_config(connection)?;
    match &connection.tunnel {
        None => Ok((settings, Vec::new())),
        Some(TunnelConfig::Bastion { .. }) => {
            let bastion = bastion_config(connection).expect("a bastion tunnel");
            // A bastion that is down is retried; a wrong pin or a refused key needs its fix.
            let tunnel = sluice_tunnel::BastionTunnel::open(bastion)
                .await
                .map_err(|e| match Error::from(e) {
                    Error::Configuration { problem, fix } => Error::configuration(
                        format!("tunnel to {}: {problem}", connection.host),
                        fix,
                    ),
                    Error::Unavailable { what, source } => Error::Unavailable {
                        what: format!("tunnel to {}: {what}", connection.host),
                        source,
                    },
                    other => other,
                })?;
            let local = tunnel.local_addr();
            settings.host = local.ip().to_string();
            settings.port = local.port();
            Ok((settings, vec![tunnel]))
        }
        Some(TunnelConfig::Agent { name }) => {
            let local = reverse.and_then(|r| r.local_addr_for(name)).ok_or_else(|| {
                Error::configuration(
                    format!("the connection to {} goes through agent {name:?}, which is not registered", connection.host),
                    "add it under [[agents.agent]] with the public key `sluice-agent keygen` printed",
                )
            })?;
            // Connections wait at the loopback address until the agent has dialled in.
            settings.host = local.ip().to_string();
            settings.port = local.port();
            Ok((settings, Vec::new()))
        }
    }
}

/// Settings that will fail with the same endpoint (so health shows where it was meant to go).
pub fn failing_settings(connection: &ConnectionConfig) -> ConnectionSettings {
    let mut s = ConnectionSettings::new(
        &connection.host,
        connection.port,
        &connection.database,
        &connection.user,
    );
    s.connect_timeout = Duration::from_secs(1);
    s
}

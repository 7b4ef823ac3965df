//! `sluice-agent`: runs next to a database sluice cannot reach (a laptop, a private network),
//! dials out to the sluice server, authenticates with its own registered key, and carries
//! sluice's connections to the one database it was started for. Exit codes: 0 ok, 1 failure,
//! 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_tunnel::{AgentConfig, run_agent};

/// Reverse-tunnel agent for a database behind NAT.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the agent's key pair and print the public key to register on the sluice server.
    Keygen {
        /// Where to write the private key (mode 0600).
        #[arg(long, default_value = "sluice_agent_ed25519")]
        out: PathBuf,
    },
    /// Connect to the sluice server and carry its connections to the database.
    Run {
        /// The sluice server's agent endpoint, `host:port`.
        #[arg(long)]
        server: String,
        /// The server's host key fingerprint (`SHA256:…`), shown by the server.
        #[arg(long)]
        server_fingerprint: String,
        /// This agent's registered name.
        #[arg(long)]
        name: String,
        /// This agent's private key.
        #[arg(long)]
        key: PathBuf,
        /// The database, `host:port`, as this machine reaches it. The agent reaches nothing else.
        #[arg(long, default_value = "127.0.0.1:5432")]
        db: String,
    },
}

fn split(addr: &str, what: &str) -> Result<(String, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{what} must be host:port, not {addr:?}"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{what}: {port:?} is not a port"))?;
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    ))
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Keygen { out } => sluice_tunnel::keys::generate(&out)
            .map_err(|e| e.to_string())
            .map(|key| {
                println!(
                    "wrote {} (private, mode 0600) and {}.pub",
                    out.display(),
                    out.display()
                );
                println!(
                    "register this public key for the agent on the sluice server:\n{}",
                    key.public
                );
                println!("fingerprint: {}", key.fingerprint);
            }),
        Command::Run {
            server,
            server_fingerprint,
            name,
            key,
            db,
        } => run(server, server_fingerprint, name, key, db),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    server: String,
    fingerprint: String,
    name: String,
    key: PathBuf,
    db: String,
) -> Result<(), String> {
    let (server_host, server_port) = split(&server, "--server")?;
    let (db_host, db_port) = split(&db, "--db")?;
    let config = AgentConfig {
        server_host,
        server_port,
        name,
        key_file: key,
        server_fingerprint: Some(fingerprint),
        db_host,
        db_port,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.send_replace(true);
        });
        eprintln!(
            "agent {:?} carrying connections to {}:{}",
            config.name, config.db_host, config.db_port
        );
        run_agent(config, stopped)
            .await
            .map_err(|e| format!("{e}\n  fix: {}", e.fix()))
    })
}

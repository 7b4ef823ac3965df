//! `cargo xtask db up|down|env`: a source and a target cluster kept running for manual use.

use std::path::PathBuf;

use clap::Subcommand;
use sluice_localpg::{Cluster, Tls};

use crate::Result;

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Start the clusters (or show them, if they are already running) and print their URLs.
    Up,
    /// Stop the clusters and remove their files.
    Down,
    /// Print the URLs as `export` lines: `eval "$(cargo xtask db env)"`.
    Env,
}

/// Where the kept clusters live: `SLUICE_DB_DIR`, or a fixed directory under the system
/// temporary directory (which the unprivileged server user can reach, unlike `/root`).
fn base_dir() -> PathBuf {
    std::env::var_os("SLUICE_DB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sluice-xtask-db"))
}

fn env_file() -> PathBuf {
    base_dir().join("env")
}

pub fn run(action: Action) -> Result {
    match action {
        Action::Up => up(),
        Action::Down => down(),
        Action::Env => {
            let env = std::fs::read_to_string(env_file()).map_err(|_| {
                "the local databases are not up; run `cargo xtask db up`".to_owned()
            })?;
            print!("{env}");
            Ok(())
        }
    }
}

fn running(env: &str) -> bool {
    // Each URL line carries `127.0.0.1:PORT/`; all servers must accept TCP.
    let ports: Vec<u16> = env
        .lines()
        .filter_map(|l| {
            l.split("@127.0.0.1:")
                .nth(1)?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    !ports.is_empty()
        && ports
            .iter()
            .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
}

fn up() -> Result {
    if let Ok(env) = std::fs::read_to_string(env_file()) {
        if running(&env) {
            eprintln!("the local databases are already up:");
            print!("{env}");
            return Ok(());
        }
        eprintln!("found stopped local databases; recreating them");
        down()?;
    }
    let base = base_dir();
    let source = Cluster::options()
        .logical_replication()
        .tls(Tls::Optional)
        .keep_at(base.join("source"))
        .start()
        .map_err(|e| format!("starting the source cluster: {e}"))?;
    let target = Cluster::options()
        .tls(Tls::Required)
        .keep_at(base.join("target"))
        .start()
        .map_err(|e| format!("starting the target cluster: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime
        .block_on(async {
            source.create_database("app").await?;
            target.create_database("warehouse").await
        })
        .map_err(|e| format!("creating databases: {e}"))?;

    let env = format!(
        "# source: wal_level=logical, TLS optional, scram-sha-256\n\
         export SLUICE_SOURCE_URL='{}'\n\
         # target: TLS required (plain TCP is rejected), scram-sha-256\n\
         export SLUICE_TARGET_URL='{}'\n",
        source.url("app"),
        target.url("warehouse"),
    );
    // The file holds passwords of throwaway clusters: owner-only, like any credential.
    sluice_localpg::write_private(&env_file(), &env).map_err(|e| e.to_string())?;
    eprintln!("local databases are up (stop them with `cargo xtask db down`):");
    print!("{env}");
    eprintln!("try: psql \"$SLUICE_TARGET_URL\" -c 'select version()'");
    Ok(())
}

fn down() -> Result {
    let base = base_dir();
    let mut stopped = 0;
    for name in ["source", "target"] {
        if sluice_localpg::stop_kept(&base.join(name))
            .map_err(|e| format!("stopping {name}: {e}"))?
        {
            stopped += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&base);
    eprintln!("stopped {stopped} local database cluster(s)");
    Ok(())
}

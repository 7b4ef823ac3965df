//! `sluice`: keep records from upstream systems in your own PostgreSQL, in real time.
//!
//! The binary is a thin layer over the crates: argument parsing, output, exit codes
//! (0 ok, 1 failure, 2 usage). Logic lives in the crates.

mod setup;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Keep records from upstream systems in your own PostgreSQL, in real time.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Set up a target: the sync user, the read role, schemas and grants.
    Setup {
        #[command(subcommand)]
        action: setup::Action,
    },
    /// Let users read everything sluice writes (grants the read role, as the sync user).
    GrantRead(setup::ReadAccess),
    /// Take that back (revokes the read role, as the sync user).
    RevokeRead(setup::ReadAccess),
    /// SSH tunnels through a bastion.
    Tunnel {
        #[command(subcommand)]
        action: TunnelAction,
    },
    /// Print the JSON Schema of `sluice.toml`, for editors that validate config files.
    ConfigSchema,
}

#[derive(Subcommand, Debug)]
enum TunnelAction {
    /// Create an ed25519 key pair for a bastion and print the authorized_keys line to install,
    /// restricted to forwarding to the database.
    Keygen {
        /// Where to write the private key (mode 0600); the public key goes next to it (.pub).
        #[arg(long, default_value = "sluice_tunnel_ed25519")]
        out: std::path::PathBuf,
        /// The database host, as the bastion reaches it.
        #[arg(long)]
        db_host: String,
        /// The database port.
        #[arg(long, default_value_t = 5432)]
        db_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Setup { action } => setup::run(action).await,
            Command::GrantRead(args) => setup::read_access(args, true).await,
            Command::RevokeRead(args) => setup::read_access(args, false).await,
            Command::Tunnel {
                action:
                    TunnelAction::Keygen {
                        out,
                        db_host,
                        db_port,
                    },
            } => {
                let key = sluice_tunnel::keys::generate(&out).map_err(sluice_core::Error::from)?;
                let line =
                    sluice_tunnel::keys::authorized_keys_line(&key.public, &db_host, db_port);
                println!(
                    "wrote {} (private, mode 0600) and {}.pub",
                    out.display(),
                    out.display()
                );
                println!(
                    "key fingerprint: {}
",
                    key.fingerprint
                );
                println!(
                    "authorized_keys line:
{line}
"
                );
                println!("{}", sluice_tunnel::keys::install_steps(&line));
                Ok(ExitCode::SUCCESS)
            }
            Command::ConfigSchema => {
                print!("{}", sluice_core::config_schema_json());
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

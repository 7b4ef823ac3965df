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
    /// Print the JSON Schema of `sluice.toml`, for editors that validate config files.
    ConfigSchema,
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

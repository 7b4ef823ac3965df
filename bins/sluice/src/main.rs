//! `sluice`: keep records from upstream systems in your own PostgreSQL, in real time.
//!
//! The binary is a thin layer over the crates: argument parsing, output, exit codes.
//! Commands arrive with their issues; today it answers `--help`, `--version` and prints the
//! configuration JSON Schema.

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
    /// Print the JSON Schema of `sluice.toml`, for editors that validate config files.
    ConfigSchema,
}

fn main() {
    match Cli::parse().command {
        Command::ConfigSchema => println!("{}", sluice_core::config_schema_json()),
    }
}

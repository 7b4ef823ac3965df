//! `sluice-agent`: runs next to a database sluice cannot reach, dials out to the sluice
//! server and carries its connections to the database. The tunnel arrives with the
//! connectivity issue; today the binary only answers `--help` and `--version`.

use clap::Parser;

/// Reverse-tunnel agent for a database behind NAT.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}

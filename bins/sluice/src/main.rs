//! `sluice`: keep records from upstream systems in your own PostgreSQL, in real time.
//!
//! The binary is a thin layer over the crates: argument parsing, output, exit codes
//! (0 ok, 1 failure, 2 usage). Logic lives in the crates.

#[macro_use]
mod out;

mod api;
mod api_tools;
mod api_write;
mod client;
mod config_file;
mod connect;
mod console;
mod consumer_cmd;
mod demo;
mod health;
mod https;
mod init;
mod openapi;
mod plan;
mod progress;
mod proxy;
mod reconcile;
mod server;
mod setup;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Keep records from upstream systems in your own PostgreSQL, in real time.
///
/// Exit codes: 0 success, 1 failure (including an unhealthy `status`), 2 usage error.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every sync and consumer in the config, with the HTTP API (management, push,
    /// metrics). Reloads on SIGHUP or when the file changes; SIGTERM stops cleanly.
    Serve {
        #[command(flatten)]
        config: config_file::ConfigFile,
        /// Listen here instead of [api] listen.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run the config with its write-back proxy required: the same as `serve` (the proxy needs
    /// the syncs and consumers running to show writes locally), refusing a config without
    /// [proxy]. Do not run it beside a `serve` of the same config.
    Proxy {
        #[command(flatten)]
        config: config_file::ConfigFile,
        /// Listen here instead of [proxy] listen.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Write a commented starter sluice.toml (asks on a terminal; flags otherwise).
    Init(init::Args),
    /// See sluice work, with nothing to set up: two throwaway local PostgreSQL clusters, the
    /// target provisioned, a sample table backfilled and kept in sync while you watch.
    Demo(demo::Args),
    /// Check every target and sync of the config: each tunnel hop, the connection, and a
    /// Postgres source's replication prerequisites. Exits 1 if anything fails.
    Check {
        #[command(flatten)]
        config: config_file::ConfigFile,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print every entity's health from a running `sluice serve`, with the reason for anything
    /// not healthy. Exits 1 when anything is not healthy.
    Status(status::Args),
    /// Set up a target: the sync user, the read role, schemas and grants.
    Setup {
        #[command(subcommand)]
        action: setup::Action,
    },
    /// Pause, resume or restart the backfill of a consumer of a running `sluice serve`.
    Consumer {
        #[command(subcommand)]
        action: consumer_cmd::Action,
    },
    /// Print a shell completion script: `sluice completions bash > /etc/bash_completion.d/sluice`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Let users read everything sluice writes (grants the read role, as the sync user).
    GrantRead(setup::ReadAccess),
    /// Take that back (revokes the read role, as the sync user).
    RevokeRead(setup::ReadAccess),
    /// A PostgreSQL source: check its logical-replication prerequisites.
    Source {
        #[command(subcommand)]
        action: SourceAction,
    },
    /// SSH tunnels through a bastion.
    Tunnel {
        #[command(subcommand)]
        action: TunnelAction,
    },
    /// Check `sluice.toml`, see what `serve` would do, or print its JSON Schema.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// The same as `config schema` (the older spelling).
    #[command(hide = true)]
    ConfigSchema,
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Parse the file (with environment variables substituted) and check its references,
    /// without connecting to anything.
    Check {
        #[command(flatten)]
        config: config_file::ConfigFile,
    },
    /// Connect (as the configured users) and show what `serve` would create or change.
    /// Changes nothing.
    Plan {
        #[command(flatten)]
        config: config_file::ConfigFile,
    },
    /// Print the JSON Schema of `sluice.toml`, for editors that validate config files.
    Schema,
}

#[derive(Subcommand, Debug)]
enum SourceAction {
    /// Check version, wal_level, the REPLICATION attribute, grants, the publication, its
    /// tables and the slot, as the replication user; every gap comes with its fix.
    Check {
        /// The replication user's connection URL (or --sync NAME).
        #[arg(long, env = "SLUICE_SOURCE_URL", hide_env_values = true)]
        url: Option<String>,
        /// A sync of the config: its connection (through its tunnel), publication and slot.
        #[arg(long, value_name = "NAME")]
        sync: Option<String>,
        #[command(flatten)]
        config: config_file::ConfigFile,
        /// The publication.
        #[arg(long, default_value = "sluice_publication")]
        publication: String,
        /// The replication slot.
        #[arg(long, default_value = "sluice_slot")]
        slot: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
    /// Check each hop of a bastion tunnel: bastion reachable, host key, key accepted, forward
    /// allowed, database reachable.
    Check {
        /// Bastion `host:port`.
        #[arg(long)]
        bastion: String,
        /// SSH user on the bastion.
        #[arg(long)]
        user: String,
        /// The tunnel's private key.
        #[arg(long)]
        key: std::path::PathBuf,
        /// The bastion's pinned host key fingerprint (`SHA256:…`); leave out to be shown it.
        #[arg(long)]
        host_key_fingerprint: Option<String>,
        /// The database `host:port`, as the bastion reaches it.
        #[arg(long)]
        db: String,
    },
}

/// jemalloc, whose background threads return memory freed after a burst (a large push, a
/// target outage) to the system within seconds; glibc's malloc kept it (measured in
/// the test `memory_stays_bounded_through_a_push_burst_and_a_target_outage_and_comes_back`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo narrates on stdout; only warnings go to the log unless SLUICE_LOG says otherwise.
    let quiet = matches!(cli.command, Command::Demo(_));
    init_logs(cli.log_format, if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
            Command::Serve { config, listen } => server::serve(config.path()?, listen, None)
                .await
                .map(|()| ExitCode::SUCCESS)
                .map_err(sluice_core::Error::invalid),
            Command::Proxy { config, listen } => {
                server::serve(config.path()?, None, Some(listen))
                    .await
                    .map(|()| ExitCode::SUCCESS)
                    .map_err(sluice_core::Error::invalid)
            }
            Command::Status(args) => status::run(args).await,
            Command::Check { config, json } => {
                let (_, config) = config.load()?;
                let reports = plan::check(&config).await;
                let ok = reports.iter().all(|(_, r)| r.is_ok());
                if json {
                    let value: Vec<serde_json::Value> = reports
                        .iter()
                        .map(|(entity, report)| serde_json::json!({"entity": entity, "report": report}))
                        .collect();
                    sayln!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
                } else {
                    for (entity, report) in &reports {
                        sayln!("{entity}\n{}", report.render());
                    }
                }
                Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
            }
            Command::Demo(args) => demo::run(args).await,
            Command::Init(args) => init::run(args),
            Command::Consumer { action } => consumer_cmd::run(action).await,
            Command::Completions { shell } => {
                use clap::CommandFactory;
                let mut command = Cli::command();
                let mut script = Vec::new();
                clap_complete::generate(shell, &mut command, "sluice", &mut script);
                say!("{}", String::from_utf8_lossy(&script));
                Ok(ExitCode::SUCCESS)
            }
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
                sayln!(
                    "wrote {} (private, mode 0600) and {}.pub",
                    out.display(),
                    out.display()
                );
                sayln!(
                    "key fingerprint: {}
",
                    key.fingerprint
                );
                sayln!(
                    "authorized_keys line:
{line}
"
                );
                sayln!("{}", sluice_tunnel::keys::install_steps(&line));
                Ok(ExitCode::SUCCESS)
            }
            Command::Tunnel {
                action:
                    TunnelAction::Check {
                        bastion,
                        user,
                        key,
                        host_key_fingerprint,
                        db,
                    },
            } => {
                let parse =
                    |addr: &str, default: u16| -> Result<(String, u16), sluice_core::Error> {
                        match addr.rsplit_once(':') {
                            None => Ok((addr.to_owned(), default)),
                            Some((h, p)) => p.parse().map(|p| (h.to_owned(), p)).map_err(|_| {
                                sluice_core::Error::invalid(format!("{p:?} is not a port"))
                            }),
                        }
                    };
                let (host, port) = parse(&bastion, 22)?;
                let (db_host, db_port) = parse(&db, 5432)?;
                let mut config = sluice_tunnel::BastionConfig::new(host, port, user, key);
                config.host_key_fingerprint = host_key_fingerprint;
                config.forward_host = db_host;
                config.forward_port = db_port;
                let mut ok = true;
                for (hop, status) in sluice_tunnel::BastionTunnel::hops(&config).await {
                    match status {
                        Some(Ok(())) => sayln!("ok   {hop}"),
                        Some(Err(message)) => {
                            ok = false;
                            sayln!("FAIL {hop}: {message}");
                        }
                        None => sayln!("--   {hop} (not reached)"),
                    }
                }
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::Source {
                action:
                    SourceAction::Check {
                        url,
                        sync,
                        config,
                        publication,
                        slot,
                        json,
                    },
            } => {
                let report = match (sync, url) {
                    (Some(name), _) => {
                        let (path, config) = config.load()?;
                        let sync = config.syncs.iter().find(|s| s.name == name).ok_or_else(|| {
                            sluice_core::Error::configuration(
                                format!("{} has no sync named {name:?}", path.display()),
                                sluice_core::text::suggestion("sync", &name, config.syncs.iter().map(|s| s.name.as_str())),
                            )
                        })?;
                        plan::check_one_sync(sync).await?
                    }
                    (None, Some(url)) => {
                        let spec = sluice_source_pg::SourceSpec { publication, slot, failover: false, };
                        sluice_source_pg::check(&setup::settings(&url)?, &spec).await
                    }
                    (None, None) => {
                        return Err(sluice_core::Error::configuration(
                            "no source given",
                            "pass --url (or set SLUICE_SOURCE_URL) with the replication user's URL, or --sync NAME from the config",
                        ));
                    }
                };
                Ok(setup::print_report(&report, json))
            }
            Command::Config {
                action: ConfigAction::Check { config },
            } => {
                let (file, config) = config.load()?;
                let problems = config.problems();
                // Not an error here (the values may be set where `serve` runs), but named.
                for (who, missing) in config.missing_secrets() {
                    eprintln!("warning: {}: {who}: {missing}", file.display());
                }
                if problems.is_empty() {
                    sayln!(
                        "{}: ok ({} target(s), {} sync(s), {} consumer(s))",
                        file.display(),
                        config.targets.len(),
                        config.syncs.len(),
                        config.consumers.len()
                    );
                    Ok(ExitCode::SUCCESS)
                } else {
                    for p in &problems {
                        eprintln!("error: {}: {p}", file.display());
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
            Command::Config {
                action: ConfigAction::Plan { config },
            } => {
                let (_, config) = config.load()?;
                let (lines, ok) = plan::plan(&config).await;
                for line in lines {
                    sayln!("{line}");
                }
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            Command::ConfigSchema
            | Command::Config {
                action: ConfigAction::Schema,
            } => {
                say!("{}", sluice_core::config_schema_json());
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

fn init_logs(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

//! `sluice init`: a commented starter `sluice.toml`, from flags or (on a terminal, without
//! flags) from a few questions. Passwords are never written: each names the environment
//! variable it is read from. Every sync gets a fresh id.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use sluice_core::Error;

/// Write a commented starter sluice.toml.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write it.
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        default_value = "sluice.toml"
    )]
    config: PathBuf,
    /// The database to sync from (PostgreSQL, logical replication), as a URL without the
    /// password: postgres://user@host:port/database.
    #[arg(long, value_name = "URL")]
    source: Option<String>,
    /// The database sluice writes into, as a URL without the password.
    #[arg(long, value_name = "URL")]
    target: Option<String>,
    /// Also accept records pushed over the HTTP API.
    #[arg(long)]
    push: bool,
    /// Write typed tables per source table (schema mirror) instead of one consumer table.
    #[arg(long)]
    mirror: bool,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
}

/// One database's connection, as parsed from a URL.
struct Endpoint {
    host: String,
    port: u16,
    database: String,
    user: String,
    ssl: &'static str,
}

fn endpoint(url: &str, role: &str) -> Result<Endpoint, Error> {
    let bad = |why: String| {
        Error::configuration(
            format!("the {role} URL {url:?} {why}"),
            "give it as postgres://user@host:5432/database (the password is read from an environment variable, never written)",
        )
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(format!("is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(bad("does not start with postgres://".into()));
    }
    if parsed.password().is_some() {
        return Err(bad(
            "holds a password; sluice.toml never does (it names an environment variable instead)"
                .into(),
        ));
    }
    let database = parsed.path().trim_start_matches('/').to_owned();
    if database.is_empty() {
        return Err(bad("names no database".into()));
    }
    let ssl = match parsed
        .query_pairs()
        .find(|(k, _)| k == "sslmode")
        .map(|(_, v)| v.into_owned())
        .as_deref()
    {
        Some("disable") => "disable",
        Some("require") => "require",
        Some("verify-ca") => "verify-ca",
        Some("verify-full") => "verify-full",
        // A local server often has no TLS; anything else is verified by default.
        None if matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "::1")) => "prefer",
        None => "verify-full",
        Some("prefer") | Some("allow") => "prefer",
        Some(other) => return Err(bad(format!("has an unknown sslmode {other:?}"))),
    };
    Ok(Endpoint {
        host: parsed.host_str().unwrap_or("localhost").to_owned(),
        port: parsed.port().unwrap_or(5432),
        database,
        user: if parsed.username().is_empty() {
            "sluice".to_owned()
        } else {
            parsed.username().to_owned()
        },
        ssl,
    })
}

fn connection(e: &Endpoint, password_env: &str) -> String {
    format!(
        "host = {:?}\nport = {}\ndatabase = {:?}\nuser = {:?}\npassword = {{ env = {password_env:?} }}\nssl = {{ mode = {:?} }}",
        e.host, e.port, e.database, e.user, e.ssl
    )
}

/// The starter file's text.
fn render(source: Option<&Endpoint>, target: &Endpoint, push: bool, mirror: bool) -> String {
    let mut out = String::from(
        "# sluice.toml, written by `sluice init`. Every key and its type: `sluice config schema`.\n\
         # Secrets are never written here: each password names the environment variable it is\n\
         # read from. Check this file with `sluice config check`, then `sluice config plan`.\n\n\
         data_dir = \"sluice-data\"\n\n\
         # The API of `sluice serve` (management, pushed records, /metrics); every request needs\n\
         # this bearer token.\n\
         [api]\n\
         listen = \"127.0.0.1:7780\"\n\
         token = { env = \"SLUICE_API_TOKEN\" }\n\n\
         # Your PostgreSQL, where synced records land, as the sync user `sluice setup` creates.\n\
         [[target]]\n\
         name = \"warehouse\"\n\
         read_role = \"sluice_read\"\n\n\
         [target.connection]\n",
    );
    out.push_str(&connection(target, "SLUICE_TARGET_PASSWORD"));
    out.push('\n');
    let id_note = "# The id names this sync's records for good: never change it.\n";
    if let Some(source) = source {
        out.push_str(&format!(
            "\n# A PostgreSQL database read through logical replication (`sluice source check`\n\
             # lists what it needs). create_missing: sluice creates the publication and slot.\n\
             [[sync]]\n\
             name = \"app\"\n\
             {id_note}\
             id = \"{}\"\n\n\
             [sync.source]\n\
             provider = \"postgres\"\n\
             publication = \"sluice_publication\"\n\
             slot = \"sluice_slot\"\n\
             create_missing = true\n\n\
             [sync.source.connection]\n\
             {}\n",
            uuid::Uuid::new_v4(),
            connection(source, "SLUICE_SOURCE_PASSWORD")
        ));
        let layout = if mirror {
            "layout = { kind = \"schema_mirror\", schema = \"app\" }"
        } else {
            "layout = { kind = \"consumer_table\", schema = \"sluice\", table = \"records\" }"
        };
        out.push_str(&format!(
            "\n# Forwards the sync's records into the target.\n\
             [[consumer]]\n\
             name = \"app-to-warehouse\"\n\
             target = \"warehouse\"\n\
             filter = {{ sync = {{ name = \"app\" }} }}\n\
             {layout}\n"
        ));
    }
    if push {
        out.push_str(&format!(
            "\n# Records pushed over the API: POST /v1/syncs/events/records\n\
             [[sync]]\n\
             name = \"events\"\n\
             {id_note}\
             id = \"{}\"\n\
             source = {{ provider = \"http\" }}\n\n\
             [[consumer]]\n\
             name = \"events-to-warehouse\"\n\
             target = \"warehouse\"\n\
             filter = {{ sync = {{ name = \"events\" }} }}\n\
             layout = {{ kind = \"consumer_table\", schema = \"sluice\", table = \"events\" }}\n",
            uuid::Uuid::new_v4()
        ));
    }
    out
}

/// Asks `question` on the terminal; empty answers give `default`.
fn ask(question: &str, default: &str) -> Result<String, Error> {
    let mut stderr = std::io::stderr();
    let _ = write!(
        stderr,
        "{question}{}: ",
        if default.is_empty() {
            String::new()
        } else {
            format!(" [{default}]")
        }
    );
    let _ = stderr.flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| Error::invalid(format!("cannot read the answer: {e}")))?;
    let line = line.trim();
    Ok(if line.is_empty() { default } else { line }.to_owned())
}

pub fn run(mut args: Args) -> Result<ExitCode, Error> {
    if args.config.exists() && !args.force {
        return Err(Error::configuration(
            format!("{} already exists", args.config.display()),
            "pass --force to overwrite it, or --config to write another file",
        ));
    }
    let asked = args.source.is_none() && args.target.is_none() && !args.push;
    if asked && std::io::stdin().is_terminal() {
        let source = ask(
            "Database to sync from (postgres://user@host:5432/db, empty for none)",
            "",
        )?;
        args.source = (!source.is_empty()).then_some(source);
        args.target = Some(ask(
            "Database to write into (postgres://user@host:5432/db)",
            "postgres://sluice@localhost:5432/postgres",
        )?);
        args.push = ask("Also accept records pushed over HTTP? (y/n)", "n")?
            .to_lowercase()
            .starts_with('y');
    }
    let target = args.target.as_deref().ok_or_else(|| {
        Error::configuration(
            "no target database given",
            "pass --target postgres://user@host:5432/database (and --source, --push), or run `sluice init` on a terminal to be asked",
        )
    })?;
    let target = endpoint(target, "target")?;
    let source = args
        .source
        .as_deref()
        .map(|url| endpoint(url, "source"))
        .transpose()?;
    if source.is_none() && !args.push {
        return Err(Error::configuration(
            "nothing to sync from",
            "pass --source postgres://user@host:5432/database and/or --push",
        ));
    }
    let text = render(source.as_ref(), &target, args.push, args.mirror);
    std::fs::write(&args.config, &text).map_err(|e| {
        Error::configuration(
            format!("cannot write {}: {e}", args.config.display()),
            "choose a writable place with --config",
        )
    })?;
    sayln!("wrote {}", args.config.display());
    sayln!("next:");
    sayln!(
        "  export SLUICE_API_TOKEN=… SLUICE_TARGET_PASSWORD=…{}",
        if source.is_some() {
            " SLUICE_SOURCE_PASSWORD=…"
        } else {
            ""
        }
    );
    sayln!("  sluice config check && sluice config plan && sluice serve");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_starter_file_parses_with_fresh_ids_and_no_password() {
        let source = endpoint(
            "postgres://repl@db.internal:6432/app?sslmode=require",
            "source",
        )
        .unwrap();
        let target = endpoint("postgres://sluice@localhost/warehouse", "target").unwrap();
        let text = render(Some(&source), &target, true, false);
        let config = sluice_core::Config::parse(&text, "sluice.toml", |_| None).unwrap();
        assert!(config.problems().is_empty(), "{:?}", config.problems());
        assert_eq!(config.syncs.len(), 2);
        assert_ne!(config.syncs[0].id, config.syncs[1].id);
        assert_eq!(config.targets[0].connection.port, 5432);
        let again = render(Some(&source), &target, true, false);
        assert_ne!(text, again, "each file gets fresh ids");
        assert!(endpoint("postgres://u:secret@h/db", "target").is_err());
        assert!(endpoint("mysql://u@h/db", "target").is_err());
    }
}

//! `sluice setup sql|apply|check`, `grant-read`, `revoke-read`: thin wrappers over
//! `sluice-provisioning`.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use secrecy::SecretString;
use sluice_core::Error;
use sluice_provisioning::{
    Preset, SchemaUse, SetupSpec, apply, check, drop_schema, generate_password, grant_read, plan,
    rename_schema, revoke_read,
};
use sluice_target_pg::ConnectionSettings;

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Print the setup as a SQL script to run yourself (the manual path). Safe to run twice.
    Sql(SpecArgs),
    /// Run the setup with admin credentials lent for this run only (the automated path).
    Apply {
        /// Admin connection URL, used for this run and dropped. Prefer the environment
        /// variable: a command-line argument is visible to other users of the machine.
        #[arg(long, env = "SLUICE_ADMIN_URL", hide_env_values = true)]
        admin_url: String,
        #[command(flatten)]
        spec: SpecArgs,
        /// Print what was done as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Verify the setup as the sync user; every gap comes with the SQL that fixes it.
    Check {
        /// The sync user's connection URL.
        #[arg(long, env = "SLUICE_TARGET_URL", hide_env_values = true)]
        url: String,
        #[command(flatten)]
        spec: SpecArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a sync to a new schema: creates it (owned by the sync user) and leaves the old one,
    /// printing the `drop schema … cascade` you may run later.
    RenameSchema {
        /// The sync user's connection URL.
        #[arg(long, env = "SLUICE_TARGET_URL", hide_env_values = true)]
        url: String,
        /// The read role.
        #[arg(long, default_value = "sluice_read")]
        read_role: String,
        /// The schema the sync writes to now.
        #[arg(long)]
        from: String,
        /// The new schema.
        #[arg(long)]
        to: String,
    },
    /// Empty the tables sluice owns in a schema so they are refilled from the records stream
    /// (then restart the consumer's backfill). Your own views and tables are untouched.
    RebuildSchema {
        /// The sync user's connection URL.
        #[arg(long, env = "SLUICE_TARGET_URL", hide_env_values = true)]
        url: String,
        /// The schema.
        schema: String,
    },
    /// Drop a sync schema; refused while it holds (or others depend on) objects the sync user
    /// does not own.
    DropSchema {
        /// The sync user's connection URL.
        #[arg(long, env = "SLUICE_TARGET_URL", hide_env_values = true)]
        url: String,
        /// The schema.
        schema: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PresetArg {
    /// Supabase: anon and authenticated may read synced tables, service_role may read and
    /// write them; TLS required.
    Supabase,
}

/// What the target should look like.
#[derive(Args, Debug)]
pub struct SpecArgs {
    /// The database sluice writes into (default: the URL's database).
    #[arg(long)]
    database: Option<String>,
    /// The role sluice logs in as.
    #[arg(long, default_value = "sluice")]
    sync_user: String,
    /// The role that can read everything sluice writes.
    #[arg(long, default_value = "sluice_read")]
    read_role: String,
    /// Use the legacy names: sluice_<random> and sluice_read_<same random>.
    #[arg(long, conflicts_with_all = ["sync_user", "read_role"])]
    legacy_names: bool,
    /// A sync schema sluice creates and owns (schema-mirror layout). Repeatable.
    #[arg(long = "schema")]
    schemas: Vec<String>,
    /// A schema you own that holds a consumer table (consumer-table layout). Repeatable.
    #[arg(long = "granted-schema")]
    granted_schemas: Vec<String>,
    /// Sync into an existing schema that holds objects sluice does not own. Repeatable.
    #[arg(long = "adopt-existing-schema")]
    adopted_schemas: Vec<String>,
    /// A hosted-database preset.
    #[arg(long, value_enum)]
    preset: Option<PresetArg>,
    /// With --preset supabase: let anon and authenticated write synced tables too (ALL), as
    /// older setups did. Anyone holding the public API key could then change or delete synced
    /// rows (and the next sync overwrites what they change); writes are meant to go through
    /// sluice's write-back proxy.
    #[arg(long, requires = "preset")]
    api_roles_write: bool,
    /// Existing roles to grant the read role to. Repeatable.
    #[arg(long = "grant-read")]
    readers: Vec<String>,
    /// Environment variable holding the sync user's password when it is created (otherwise
    /// one is generated and printed once).
    #[arg(long)]
    sync_password_env: Option<String>,
}

impl SpecArgs {
    fn spec(&self, default_database: Option<&str>) -> Result<SetupSpec, Error> {
        let database = self
            .database
            .as_deref()
            .or(default_database)
            .ok_or_else(|| Error::configuration("no database named", "pass --database NAME"))?;
        let mut spec = SetupSpec::new(database);
        if self.legacy_names {
            spec = spec.legacy_names();
        } else {
            spec.sync_user = self.sync_user.clone();
            spec.read_role = self.read_role.clone();
        }
        for name in &self.schemas {
            spec = spec.schema(name, SchemaUse::Owned);
        }
        for name in self.granted_schemas.iter().chain(&self.adopted_schemas) {
            spec = spec.schema(name, SchemaUse::Granted);
        }
        spec.preset = self.preset.map(|PresetArg::Supabase| Preset::Supabase);
        spec.readers = self.readers.clone();
        spec.api_roles_write = self.api_roles_write;
        if let Some(var) = &self.sync_password_env {
            let value = std::env::var(var).map_err(|_| {
                Error::configuration(format!("{var} is not set"), format!("export {var}=…"))
            })?;
            spec.sync_password = Some(SecretString::from(value));
        }
        Ok(spec)
    }
}

pub(crate) fn settings(url: &str) -> Result<ConnectionSettings, Error> {
    ConnectionSettings::from_url(url)
        .map_err(|e| Error::configuration(e.to_string(), "check the URL's syntax"))
}

/// Prints a check report for a person or as JSON; the exit code says whether anything needs fixing.
pub(crate) fn print_report(report: &sluice_core::CheckReport, json: bool) -> ExitCode {
    if json {
        sayln!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    } else {
        say!("{}", report.render());
    }
    if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

pub async fn run(action: Action) -> Result<ExitCode, Error> {
    match action {
        Action::Sql(args) => {
            let spec = args.spec(None)?;
            let password = spec.sync_password.clone().unwrap_or_else(generate_password);
            let plan =
                plan(&spec, None, &password).map_err(|r| Error::configuration(r.problem, r.fix))?;
            sayln!(
                "-- sluice setup for database {:?}: run as a database owner or superuser.",
                spec.database
            );
            sayln!(
                "-- Safe to run twice. Keep the sync user's password below where sluice reads it.\n"
            );
            say!("{}", plan.script(true));
            Ok(ExitCode::SUCCESS)
        }
        Action::Apply {
            admin_url,
            spec,
            json,
        } => {
            let admin = settings(&admin_url)?;
            drop(admin_url);
            let spec = spec.spec(Some(&admin.database))?;
            let applied = apply(&admin, &spec).await;
            drop(admin); // the lent credentials go now, whatever happened
            let applied = applied?;
            if json {
                let out = serde_json::json!({
                    "sync_user": spec.sync_user,
                    "read_role": spec.read_role,
                    "plan": applied.plan,
                    "generated_password": applied.generated_password.as_ref().map(secrecy::ExposeSecret::expose_secret),
                });
                sayln!("{out:#}");
            } else if applied.plan.is_empty() {
                sayln!("nothing to do: the target is already set up");
            } else {
                say!("{}", applied.plan.script(false));
                sayln!("-- done: {} statement(s) applied", applied.plan.steps.len());
            }
            if let (false, Some(password)) = (json, &applied.generated_password) {
                use secrecy::ExposeSecret;
                sayln!(
                    "\nthe sync user {:?} was created with this password, shown once and stored nowhere:\n  {}\nput it where sluice reads it (for example an environment variable named in sluice.toml)",
                    spec.sync_user,
                    password.expose_secret()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Action::Check { url, spec, json } => {
            let sync = settings(&url)?;
            let mut spec = spec.spec(Some(&sync.database))?;
            spec.sync_user = sync.user.clone();
            Ok(print_report(&check(&sync, &spec).await, json))
        }
        Action::RenameSchema {
            url,
            read_role,
            from,
            to,
        } => {
            let renamed = rename_schema(&settings(&url)?, &read_role, &from, &to).await?;
            say!("{}", renamed.plan.script(false));
            sayln!("{}", renamed.message);
            Ok(ExitCode::SUCCESS)
        }
        Action::RebuildSchema { url, schema } => {
            let emptied = sluice_provisioning::rebuild_schema(&settings(&url)?, &schema).await?;
            sayln!(
                "emptied {} table(s) in {schema:?}: {}",
                emptied.len(),
                emptied.join(", ")
            );
            sayln!(
                "now restart the consumer's backfill: POST /v1/consumers/<name>/restart-backfill"
            );
            Ok(ExitCode::SUCCESS)
        }
        Action::DropSchema { url, schema } => {
            drop_schema(&settings(&url)?, &schema).await?;
            sayln!("dropped schema {schema:?}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Arguments of `grant-read` / `revoke-read`.
#[derive(Args, Debug)]
pub struct ReadAccess {
    /// The sync user's connection URL.
    #[arg(long, env = "SLUICE_TARGET_URL", hide_env_values = true)]
    url: String,
    /// The read role.
    #[arg(long, default_value = "sluice_read")]
    read_role: String,
    /// The users.
    #[arg(required = true)]
    users: Vec<String>,
}

pub async fn read_access(args: ReadAccess, grant: bool) -> Result<ExitCode, Error> {
    let sync = settings(&args.url)?;
    if grant {
        grant_read(&sync, &args.read_role, &args.users).await?;
        sayln!("granted {} to {}", args.read_role, args.users.join(", "));
    } else {
        revoke_read(&sync, &args.read_role, &args.users).await?;
        sayln!("revoked {} from {}", args.read_role, args.users.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

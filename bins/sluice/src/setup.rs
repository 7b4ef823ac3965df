//! `sluice setup sql|apply|check`, `grant-read`, `revoke-read`: thin wrappers over
//! `sluice-provisioning`.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use secrecy::SecretString;
use sluice_core::text::suggestion;
use sluice_core::{Config, Error, TargetConfig};
use sluice_provisioning::{
    Preset, SchemaUse, SetupSpec, apply, check, drop_schema, generate_password, grant_read, plan,
    rename_schema, revoke_read,
};
use sluice_target_pg::ConnectionSettings;

use crate::config_file::ConfigFile;

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
        /// The sync user's connection URL (or --target NAME).
        #[arg(long, env = "SLUICE_TARGET_URL", hide_env_values = true)]
        url: Option<String>,
        #[command(flatten)]
        spec: SchemaArgs,
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

/// Which database, read role and schemas; from flags, or from a target of the config.
#[derive(Args, Debug)]
pub struct SchemaArgs {
    /// A target of the config: its database, sync user, read role and the schemas its
    /// consumers write are used wherever the flags below leave them out.
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
    #[command(flatten)]
    config: ConfigFile,
    /// The database sluice writes into [default: the URL's, or the target's]
    #[arg(long)]
    database: Option<String>,
    /// The role that can read everything sluice writes [default: sluice_read, or the
    /// target's read_role]
    #[arg(long)]
    read_role: Option<String>,
    /// A sync schema sluice creates and owns (schema-mirror layout). Repeatable.
    #[arg(long = "schema")]
    schemas: Vec<String>,
    /// A schema you own that holds a consumer table (consumer-table layout). Repeatable.
    #[arg(long = "granted-schema")]
    granted_schemas: Vec<String>,
    /// Sync into an existing schema that holds objects sluice does not own. Repeatable.
    #[arg(long = "adopt-existing-schema")]
    adopted_schemas: Vec<String>,
}

/// What the target should look like, for `setup sql` and `setup apply`.
#[derive(Args, Debug)]
pub struct SpecArgs {
    #[command(flatten)]
    schema: SchemaArgs,
    /// The role sluice logs in as [default: sluice, or the target's user]
    #[arg(long)]
    sync_user: Option<String>,
    /// Use the legacy names: sluice_<random> and sluice_read_<same random>.
    #[arg(long, conflicts_with_all = ["sync_user", "read_role"])]
    legacy_names: bool,
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

/// A target of the config file, found by name (with the closest name when there is none),
/// and the config it is in.
pub(crate) fn config_target(
    config: &ConfigFile,
    name: &str,
) -> Result<(TargetConfig, Config), Error> {
    let (path, loaded) = config.load()?;
    let found = loaded.targets.iter().find(|t| t.name == name).cloned();
    let target = found.ok_or_else(|| {
        let known = loaded.targets.iter().map(|t| t.name.as_str());
        Error::configuration(
            format!("{} has no target named {name:?}", path.display()),
            suggestion("target", name, known),
        )
    })?;
    Ok((target, loaded))
}

/// The schemas a target's consumers write into, and how.
type TargetSchemas = Vec<(String, SchemaUse)>;

/// The schemas the consumers of target `name` write into, and how.
pub(crate) fn target_schemas(config: &Config, name: &str) -> TargetSchemas {
    let mut schemas = Vec::new();
    for consumer in config.consumers.iter().filter(|c| c.target == name) {
        let schema = match &consumer.layout {
            sluice_core::LayoutConfig::ConsumerTable { schema, .. } => {
                (schema.clone(), SchemaUse::Granted)
            }
            sluice_core::LayoutConfig::SchemaMirror { schema, .. } => {
                (schema.clone(), SchemaUse::Owned)
            }
        };
        if !schemas.contains(&schema) {
            schemas.push(schema);
        }
    }
    schemas
}

/// The setup a target of `config` needs: its database, sync user, read role, and the schemas
/// its consumers write into.
pub(crate) fn target_spec(target: &TargetConfig, config: &Config) -> SetupSpec {
    let mut spec = SetupSpec::new(&target.connection.database);
    spec.sync_user = target.connection.user.clone();
    spec.read_role = target.read_role.clone();
    for (name, usage) in target_schemas(config, &target.name) {
        spec = spec.schema(&name, usage);
    }
    spec
}

impl SchemaArgs {
    /// The target the command names, with the schemas its consumers write into.
    fn target(&self) -> Result<Option<(TargetConfig, TargetSchemas)>, Error> {
        let Some(name) = &self.target else {
            return Ok(None);
        };
        let (target, config) = config_target(&self.config, name)?;
        let schemas = target_schemas(&config, name);
        Ok(Some((target, schemas)))
    }

    /// The spec's database, read role and schemas; `default_database` is the URL's.
    fn apply_to(&self, default_database: Option<&str>) -> Result<SetupSpec, Error> {
        let target = self.target()?;
        let database = self
            .database
            .as_deref()
            .or(target.as_ref().map(|(t, _)| t.connection.database.as_str()))
            .or(default_database)
            .ok_or_else(|| {
                Error::configuration("no database named", "pass --database NAME or --target NAME")
            })?;
        let mut spec = SetupSpec::new(database);
        if let Some((t, _)) = &target {
            spec.sync_user = t.connection.user.clone();
            spec.read_role = t.read_role.clone();
        }
        if let Some(role) = &self.read_role {
            spec.read_role = role.clone();
        }
        let flagged = !(self.schemas.is_empty()
            && self.granted_schemas.is_empty()
            && self.adopted_schemas.is_empty());
        if !flagged && let Some((_, schemas)) = &target {
            for (name, usage) in schemas {
                spec = spec.schema(name, *usage);
            }
        }
        for name in &self.schemas {
            spec = spec.schema(name, SchemaUse::Owned);
        }
        for name in self.granted_schemas.iter().chain(&self.adopted_schemas) {
            spec = spec.schema(name, SchemaUse::Granted);
        }
        Ok(spec)
    }

    /// The sync user's connection: `url`, or the target's (through its tunnel, kept open
    /// while the returned tunnels live).
    async fn connection(
        &self,
        url: Option<&str>,
    ) -> Result<(ConnectionSettings, Vec<sluice_tunnel::BastionTunnel>), Error> {
        match (url, self.target()?) {
            (_, Some((target, _))) => crate::connect::settings_for(&target.connection, None).await,
            (Some(url), None) => Ok((settings(url)?, Vec::new())),
            (None, None) => Err(Error::configuration(
                "no connection given",
                "pass --url (or set SLUICE_TARGET_URL) with the sync user's URL, or --target NAME from the config",
            )),
        }
    }
}

impl SpecArgs {
    fn spec(&self, default_database: Option<&str>) -> Result<SetupSpec, Error> {
        let mut spec = self.schema.apply_to(default_database)?;
        if self.legacy_names {
            spec = spec.legacy_names();
        } else if let Some(user) = &self.sync_user {
            spec.sync_user = user.clone();
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
            let (sync, _tunnels) = spec.connection(url.as_deref()).await?;
            let mut setup = spec.apply_to(Some(&sync.database))?;
            setup.sync_user = sync.user.clone();
            Ok(print_report(&check(&sync, &setup).await, json))
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
    /// The sync user's connection URL (or --target NAME).
    #[arg(long, env = "SLUICE_TARGET_URL", hide_env_values = true)]
    url: Option<String>,
    /// A target of the config: its connection and read role.
    #[arg(long, value_name = "NAME")]
    target: Option<String>,
    #[command(flatten)]
    config: ConfigFile,
    /// The read role [default: sluice_read, or the target's read_role]
    #[arg(long)]
    read_role: Option<String>,
    /// The users.
    #[arg(required = true)]
    users: Vec<String>,
}

pub async fn read_access(args: ReadAccess, grant: bool) -> Result<ExitCode, Error> {
    let (sync, read_role, _tunnels) = match (&args.target, &args.url) {
        (Some(name), _) => {
            let (target, _) = config_target(&args.config, name)?;
            let (sync, tunnels) = crate::connect::settings_for(&target.connection, None).await?;
            (sync, target.read_role, tunnels)
        }
        (None, Some(url)) => (settings(url)?, "sluice_read".to_owned(), Vec::new()),
        (None, None) => {
            return Err(Error::configuration(
                "no connection given",
                "pass --url (or set SLUICE_TARGET_URL) with the sync user's URL, or --target NAME from the config",
            ));
        }
    };
    let read_role = args.read_role.clone().unwrap_or(read_role);
    if grant {
        grant_read(&sync, &read_role, &args.users).await?;
        sayln!("granted {read_role} to {}", args.users.join(", "));
    } else {
        revoke_read(&sync, &read_role, &args.users).await?;
        sayln!("revoked {read_role} from {}", args.users.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

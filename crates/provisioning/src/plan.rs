//! Plans: the statements that take a target from its current state to the desired one.

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sluice_core::sql::{quote_ident as q, quote_literal};

use crate::inspect::{State, api_levels};
use crate::spec::{SchemaUse, SetupSpec};

/// One statement and why it is needed.
#[derive(Clone, Serialize)]
pub struct Step {
    /// Why, in one line (printed as a comment above the statement).
    pub reason: String,
    /// The statement as printed (a generated password is shown as a placeholder unless the
    /// script is for the manual path).
    pub shown: String,
    #[serde(skip)]
    sql: String,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("reason", &self.reason)
            .field("sql", &self.shown)
            .finish()
    }
}

impl Step {
    pub(crate) fn new(reason: impl Into<String>, sql: impl Into<String>) -> Self {
        let sql = sql.into();
        Self {
            reason: reason.into(),
            shown: sql.clone(),
            sql,
        }
    }

    fn secret(reason: impl Into<String>, sql: String, password: &SecretString) -> Self {
        let shown = sql.replace(
            &quote_literal(password.expose_secret()),
            "'<the sync user password>'",
        );
        Self {
            reason: reason.into(),
            shown,
            sql,
        }
    }

    /// The statement to execute.
    pub(crate) fn sql(&self) -> &str {
        &self.sql
    }

    /// Whether the statement acts as the sync user `u` (quoted): a schema it owns, or its
    /// default privileges. A role that is not a superuser must be its member for that.
    fn acts_as(&self, u: &str) -> bool {
        self.sql.contains(&format!("authorization {u}"))
            || self.sql.contains(&format!("for role {u} "))
    }
}

/// The statements to run, in order, and anything the user should know.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Plan {
    /// Statements in order.
    pub steps: Vec<Step>,
    /// Things sluice adopted or noticed (an existing read role, …).
    pub notes: Vec<String>,
}

/// Why sluice will not set a target up as asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// What is wrong.
    pub problem: String,
    /// What the user can do.
    pub fix: String,
}

impl Plan {
    /// True when the target is already as desired.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The plan as a SQL script, each statement under a comment giving its reason.
    /// `reveal` includes a generated password (for the manual path, where the user runs it).
    pub fn script(&self, reveal: bool) -> String {
        let mut out = String::new();
        for note in &self.notes {
            out.push_str(&format!("-- note: {note}\n"));
        }
        for step in &self.steps {
            let sql = if reveal { &step.sql } else { &step.shown };
            out.push_str(&format!("-- {}\n{sql};\n\n", step.reason));
        }
        out
    }
}

/// Why setup revokes CREATE on `public` from PUBLIC (shown with the statement).
pub(crate) const PUBLIC_SCHEMA_REASON: &str = "before PostgreSQL 15 every role, the sync user too, may create objects in schema public; least privilege needs that taken from PUBLIC, as PostgreSQL 15 does by default (a no-op there). Roles of yours that create objects in public then need: grant create on schema public to <role>";

/// Plans the setup. With `state` (read by [`crate::inspect()`]) only what is missing is
/// planned; without it, every statement is planned in a form that is safe to run again
/// (the manual script). `password` is used if the sync user has to be created.
pub fn plan(
    spec: &SetupSpec,
    state: Option<&State>,
    password: &SecretString,
) -> Result<Plan, Refusal> {
    let (u, r, d) = (q(&spec.sync_user), q(&spec.read_role), q(&spec.database));
    let mut plan = Plan::default();
    let manual = state.is_none();
    let need = |missing: bool| manual || missing;

    if let Some(state) = state
        && state.version_num < 100_000
    {
        return Err(Refusal {
            problem: format!(
                "the server runs PostgreSQL {}, older than 10, which sluice does not support",
                state.version_num
            ),
            fix: "upgrade the server to PostgreSQL 10 or newer (12 or newer for a Postgres source)"
                .into(),
        });
    }

    // The sync user.
    // Stored as a SCRAM verifier on every version (12 and 13 default to md5, which a
    // scram-sha-256 rule cannot check; an md5 rule accepts SCRAM verifiers too).
    let create_user = format!(
        "set password_encryption = 'scram-sha-256'; create role {u} with login password {}",
        quote_literal(password.expose_secret())
    );
    match state {
        None => plan.steps.push(Step::secret(
            "the sync user sluice logs in as (created only if missing; store its password where sluice reads it)",
            format!(
                "set password_encryption = 'scram-sha-256'; do $sluice$ begin if not exists (select from pg_roles where rolname = {}) then create role {u} with login password {}; end if; end $sluice$",
                quote_literal(&spec.sync_user),
                quote_literal(password.expose_secret())
            ),
            password,
        )),
        Some(s) if !s.sync_exists => plan.steps.push(Step::secret("the sync user sluice logs in as", create_user, password)),
        Some(s) if !s.sync_can_login => {
            plan.steps.push(Step::new("the sync user exists but may not log in", format!("alter role {u} with login")))
        }
        Some(_) => {}
    }
    if need(state.is_some_and(|s| !(s.db_connect && s.db_create))) {
        plan.steps.push(Step::new(
            "connect to the database and create the schemas sluice syncs into (nothing else)",
            format!("grant connect, create on database {d} to {u}"),
        ));
    }

    // Before PostgreSQL 15 every role may create objects in `public`, the sync user too. A
    // grant to PUBLIC cannot be taken from one role alone, so it is taken from PUBLIC, which
    // is what PostgreSQL 15 and later do by default.
    if !spec.schemas.iter().any(|s| s.name == "public")
        && need(state.is_some_and(|s| s.public_schema_open))
    {
        match state.and_then(|s| s.public_schema_owner_elsewhere.as_deref()) {
            // Only the schema's owner (or a superuser) can; this admin would revoke nothing.
            Some(owner) => plan.notes.push(format!(
                "schema public: {PUBLIC_SCHEMA_REASON}. Only its owner {} can do that: ask them to run `revoke create on schema public from public;`",
                q(owner)
            )),
            None => plan.steps.push(Step::new(
                PUBLIC_SCHEMA_REASON,
                "revoke create on schema public from public",
            )),
        }
    }

    // The read role, created with the sync user as its admin, or adopted.
    match state {
        None => {
            plan.steps.push(Step::new(
                "the read role, granted to the users who read synced data (created only if missing)",
                format!(
                    "do $sluice$ begin if not exists (select from pg_roles where rolname = {}) then create role {r} with admin {u}; end if; end $sluice$",
                    quote_literal(&spec.read_role)
                ),
            ));
            plan.steps.push(Step::new(
                "the sync user administers the read role, so it can grant it to readers",
                format!("grant {r} to {u} with admin option"),
            ));
        }
        Some(s) if !s.read_exists => plan.steps.push(Step::new(
            "the read role, granted to the users who read synced data",
            format!("create role {r} with admin {u}"),
        )),
        Some(s) => {
            plan.notes
                .push(format!("adopted the existing role {r} as the read role"));
            if !s.sync_is_read_admin {
                plan.steps.push(Step::new(
                    format!("{r} exists; the sync user must administer it to grant it to readers"),
                    format!("grant {r} to {u} with admin option"),
                ));
            }
        }
    }

    let api_roles: Vec<String> = spec
        .preset
        .map(|p| p.api_roles().iter().map(|r| q(r)).collect())
        .unwrap_or_default();
    if let Some(state) = state
        && !state.preset_roles_absent.is_empty()
    {
        return Err(Refusal {
            problem: format!(
                "the {:?} preset grants to {}, which do not exist here",
                spec.preset,
                state.preset_roles_absent.join(", ")
            ),
            fix: "run setup without the preset, or against the hosted database it is for".into(),
        });
    }

    if spec.preset.is_some()
        && let Some(state) = state
        && !state.ssl
    {
        return Err(Refusal {
            problem: "the Supabase preset is set up over TLS only, and this admin session is not encrypted (the admin's password and the sync user's would cross the network in clear)".into(),
            fix: "connect with sslmode=verify-full (or sslmode=require) in the admin URL".into(),
        });
    }

    if let Some(state) = state
        && !state.readers_absent.is_empty()
    {
        let roles: Vec<String> = state.readers_absent.iter().map(|r| q(r)).collect();
        return Err(Refusal {
            problem: format!(
                "cannot grant the read role {r} to {}: no such role in this database cluster",
                roles.join(", ")
            ),
            fix: format!(
                "check the spelling, or create the role first ({}), then run setup again",
                roles
                    .iter()
                    .map(|role| format!("create role {role} login;"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        });
    }

    for (i, schema) in spec.schemas.iter().enumerate() {
        let s = q(&schema.name);
        let st = state.map(|st| st.schemas[i].clone()).unwrap_or_default();
        let owned_by_sync = st.owner.as_deref() == Some(spec.sync_user.as_str());
        match schema.usage {
            SchemaUse::Owned => {
                if st.exists && !owned_by_sync {
                    let objects: Vec<String> = st
                        .foreign_objects
                        .iter()
                        .map(|o| format!("{} {} (owner {})", o.kind, q(&o.name), q(&o.owner)))
                        .collect();
                    return Err(Refusal {
                        problem: format!(
                            "schema {s} already exists and is owned by {}{}; sluice syncs into schemas it creates and owns, so it will not write there",
                            q(st.owner.as_deref().unwrap_or("?")),
                            if objects.is_empty() {
                                String::new()
                            } else {
                                format!(", and holds {}", objects.join(", "))
                            }
                        ),
                        fix: format!(
                            "choose a new schema name (recommended), or opt in to syncing into the existing schema (--adopt-existing-schema {}), which needs: grant usage, create on schema {s} to {u};",
                            schema.name
                        ),
                    });
                }
                if need(!st.exists) {
                    let sql = if manual {
                        format!("create schema if not exists {s} authorization {u}")
                    } else {
                        format!("create schema {s} authorization {u}")
                    };
                    plan.steps.push(Step::new(
                        "the sync schema, created and owned by the sync user",
                        sql,
                    ));
                }
            }
            SchemaUse::Granted => {
                if need(!st.exists) {
                    let sql = if manual {
                        format!("create schema if not exists {s}")
                    } else {
                        format!("create schema {s}")
                    };
                    plan.steps.push(Step::new(
                        "the schema sluice's tables live in (owned by you)",
                        sql,
                    ));
                }
                if need(!(st.sync_usage && st.sync_create)) {
                    plan.steps.push(Step::new(
                        "use the schema; create is for sluice's checkpoint table and diagnostics",
                        format!("grant usage, create on schema {s} to {u}"),
                    ));
                }
                if need(st.sync_tables_missing > 0) {
                    plan.steps.push(Step::new(
                        "read and write the tables already in the schema",
                        format!("grant all privileges on all tables in schema {s} to {u}"),
                    ));
                }
                if need(!st.sync_default) {
                    plan.steps.push(Step::new(
                        "read and write tables you add to the schema later",
                        format!(
                            "alter default privileges in schema {s} grant all on tables to {u}"
                        ),
                    ));
                }
                if need(!st.read_default_for_current) {
                    plan.steps.push(Step::new(
                        "readers can read tables you add to the schema later",
                        format!(
                            "alter default privileges in schema {s} grant select on tables to {r}"
                        ),
                    ));
                }
            }
        }
        if need(!st.read_usage) {
            plan.steps.push(Step::new(
                "readers can use the schema",
                format!("grant usage on schema {s} to {r}"),
            ));
        }
        if need(st.read_tables_missing > 0) {
            plan.steps.push(Step::new(
                "readers can read the tables already there",
                format!("grant select on all tables in schema {s} to {r}"),
            ));
        }
        if need(!st.read_default_for_sync) {
            plan.steps.push(Step::new(
                "readers can read every table sluice creates in the schema later",
                format!("alter default privileges for role {u} in schema {s} grant select on tables to {r}"),
            ));
        }
        if !api_roles.is_empty() {
            let list = |roles: &[&str]| roles.iter().map(|r| q(r)).collect::<Vec<_>>().join(", ");
            let (readers, writers) = api_levels(spec);
            if need(st.api_usage_missing) {
                plan.steps.push(Step::new(
                    "Supabase preset: the data API's roles can use the schema",
                    format!("grant usage on schema {s} to {}", api_roles.join(", ")),
                ));
            }
            if !readers.is_empty() {
                let readers = list(&readers);
                if need(st.api_tables_missing > 0) {
                    plan.steps.push(Step::new(
                        format!("Supabase preset: {readers} can read the tables already there (read only: writes go through sluice's write-back proxy, or the next sync overwrites them)"),
                        format!("grant select on all tables in schema {s} to {readers}"),
                    ));
                }
                if need(st.api_default_missing) {
                    plan.steps.push(Step::new(
                        format!("Supabase preset: {readers} can read tables sluice creates later (read only: writes go through sluice's write-back proxy, or the next sync overwrites them)"),
                        format!("alter default privileges for role {u} in schema {s} grant select on tables to {readers}"),
                    ));
                }
                if need(st.api_readers_write_tables > 0) {
                    plan.steps.push(Step::new(
                        format!("Supabase preset: {readers} may write synced tables (an older setup granted ALL): taken back, since anyone with the public API key acts as anon"),
                        format!("revoke insert, update, delete, truncate, references, trigger on all tables in schema {s} from {readers}"),
                    ));
                }
                if need(st.api_readers_write_default) {
                    plan.steps.push(Step::new(
                        format!("Supabase preset: {readers} would be able to write tables sluice creates later: taken back"),
                        format!("alter default privileges for role {u} in schema {s} revoke insert, update, delete, truncate, references, trigger on tables from {readers}"),
                    ));
                }
            }
            if !writers.is_empty() {
                let writers_list = list(&writers);
                let who = if spec.api_roles_write {
                    format!(
                        "{writers_list} (--api-roles-write: anyone with the public API key can then change or delete synced rows, and the next sync overwrites what they change)"
                    )
                } else {
                    writers_list.clone()
                };
                if need(st.api_write_tables_missing > 0) {
                    plan.steps.push(Step::new(
                        format!(
                            "Supabase preset: {who} can read and write the tables already there"
                        ),
                        format!("grant all on all tables in schema {s} to {writers_list}"),
                    ));
                }
                if need(st.api_write_default_missing) {
                    plan.steps.push(Step::new(
                        format!("Supabase preset: {who} can read and write tables sluice creates later"),
                        format!("alter default privileges for role {u} in schema {s} grant all on tables to {writers_list}"),
                    ));
                }
            }
        }
    }

    let mut readers: Vec<String> = match state {
        Some(st) => st.read_missing_for.clone(),
        None => {
            let mut all = spec.readers.clone();
            if spec.preset.is_some() {
                all.push("postgres".into());
                all.extend(
                    spec.preset
                        .map(|p| {
                            p.api_roles()
                                .iter()
                                .map(|r| r.to_string())
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default(),
                );
            }
            all
        }
    };
    readers.dedup();
    if !readers.is_empty() {
        plan.steps.push(Step::new(
            "these roles can read everything sluice writes",
            format!(
                "grant {r} to {}",
                readers.iter().map(|x| q(x)).collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    // A role that is not a superuser (Supabase's `postgres` has CREATEROLE and owns the
    // database, nothing more) may act as the sync user only as its member: it becomes one for
    // these steps and stops being one after them.
    let needs_membership = match state {
        Some(st) => st.admin_needs_membership,
        None => spec.preset.is_some(),
    };
    if needs_membership && let Some(first) = plan.steps.iter().position(|s| s.acts_as(&u)) {
        plan.steps.insert(
            first,
            Step::new(
                format!("the role running setup becomes a member of {u} for the next steps only (it is not a superuser, and only a member may create a schema {u} owns or set {u}'s default privileges); revoked at the end"),
                format!("grant {u} to current_user"),
            ),
        );
        plan.steps.push(Step::new(
            format!("the role running setup stops being a member of {u}"),
            format!("revoke {u} from current_user"),
        ));
    }
    Ok(plan)
}

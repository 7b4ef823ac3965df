//! The automated path: plan against the live state with lent admin credentials, apply, drop.

use secrecy::SecretString;
use sluice_core::{Error, ErrorClass};
use sluice_pg::ConnectionSettings;
use sqlx::{AssertSqlSafe, Connection};

use crate::inspect::inspect;
use crate::plan::{Plan, plan};
use crate::spec::{SetupSpec, generate_password};

/// What an automated setup did.
#[derive(Debug)]
pub struct Applied {
    /// The statements run (empty when the target was already set up).
    pub plan: Plan,
    /// The sync user's password, when this run created the user with a generated one. It is
    /// not stored anywhere: show it to the user once.
    pub generated_password: Option<SecretString>,
}

/// Connects with the lent admin settings, plans what is missing, applies it in one
/// transaction, and closes the connection. The admin settings are borrowed, never stored or
/// printed; errors name the admin role, never its password.
pub async fn apply(admin: &ConnectionSettings, spec: &SetupSpec) -> Result<Applied, Error> {
    let mut conn = admin.connect().await?;
    let result = apply_on(&mut conn, spec).await;
    // The admin session ends here whatever happened.
    let _ = conn.close().await;
    result
}

async fn apply_on(conn: &mut sqlx::PgConnection, spec: &SetupSpec) -> Result<Applied, Error> {
    let state = inspect(conn, spec).await.map_err(sql_error)?;
    let generated = spec.sync_password.is_none() && !state.sync_exists;
    let password = spec.sync_password.clone().unwrap_or_else(generate_password);
    let plan =
        plan(spec, Some(&state), &password).map_err(|r| Error::configuration(r.problem, r.fix))?;
    if !plan.is_empty() {
        let mut tx = conn.begin().await.map_err(sql_error)?;
        for step in &plan.steps {
            sqlx::raw_sql(AssertSqlSafe(step.sql().to_owned())).execute(&mut *tx).await.map_err(|e| {
                let base = sql_error(e);
                Error::configuration(format!("setup step failed: {}\n  statement: {}\n  error: {base}", step.reason, step.shown), "run the statement by hand as a database owner or superuser, or lend sluice such a role")
            })?;
        }
        tx.commit().await.map_err(sql_error)?;
    }
    Ok(Applied {
        plan,
        generated_password: generated.then_some(password),
    })
}

pub(crate) fn sql_error(e: sqlx::Error) -> Error {
    sluice_pg::classify(e, "setup", |condition, db| {
        (condition == sluice_pg::Condition::InsufficientPrivilege).then(|| {
            Error::configuration(
                format!("the role running setup lacks a privilege: {}", db.message()),
                "lend sluice a role that owns the database (or a superuser) for setup, or run `sluice setup sql` and apply the script yourself",
            )
        })
    })
}

/// True for errors worth retrying (used by callers that loop).
pub fn is_transient(e: &Error) -> bool {
    e.class() == ErrorClass::Retry
}

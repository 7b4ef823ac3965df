//! `sluice grant-read` / `revoke-read`: done by the sync user through its admin option on the
//! read role, so no admin credentials are needed.

use sluice_core::Error;
use sluice_core::sql::quote_ident as q;
use sluice_pg::ConnectionSettings;
use sqlx::{AssertSqlSafe, Connection};

/// Grants the read role to each of `users`.
pub async fn grant_read(
    sync: &ConnectionSettings,
    read_role: &str,
    users: &[String],
) -> Result<(), Error> {
    change(sync, read_role, users, true).await
}

/// Revokes the read role from each of `users`.
pub async fn revoke_read(
    sync: &ConnectionSettings,
    read_role: &str,
    users: &[String],
) -> Result<(), Error> {
    change(sync, read_role, users, false).await
}

async fn change(
    sync: &ConnectionSettings,
    read_role: &str,
    users: &[String],
    grant: bool,
) -> Result<(), Error> {
    if users.is_empty() {
        return Err(Error::invalid("name at least one user"));
    }
    let mut conn = sync.connect().await?;
    let list = users.iter().map(|u| q(u)).collect::<Vec<_>>().join(", ");
    let sql = if grant {
        format!("grant {} to {list}", q(read_role))
    } else {
        format!("revoke {} from {list}", q(read_role))
    };
    let result = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await;
    let _ = conn.close().await;
    result.map(drop).map_err(|e| {
        let what = format!("changing who holds {}", q(read_role));
        sluice_pg::classify(e, &what, |condition, db| {
            (condition == sluice_pg::Condition::InsufficientPrivilege).then(|| {
                Error::configuration(
                    format!(
                        "{} may not grant {}: {}",
                        q(&sync.user),
                        q(read_role),
                        db.message()
                    ),
                    format!(
                        "grant {} to {} with admin option;",
                        q(read_role),
                        q(&sync.user)
                    ),
                )
            })
        })
    })
}

//! Schema lifecycle: rename, rebuild and drop a sync schema, never touching what the sync user
//! does not own. Everything here runs as the sync user; no admin credentials are needed.

use serde::Serialize;
use sluice_core::Error;
use sluice_core::sql::{qualified, quote_ident as q};
use sluice_pg::ConnectionSettings;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::apply::sql_error;
use crate::inspect::{ForeignObject, foreign_objects};
use crate::plan::{Plan, Step};

/// What renaming a sync's schema did, and what is left for the user.
#[derive(Debug, Serialize)]
pub struct Renamed {
    /// The statements run to create the new schema.
    pub plan: Plan,
    /// The sync must be backfilled into the new schema from the records stream.
    pub backfill_required: bool,
    /// For the user: the old schema is left in place, and how to drop it.
    pub message: String,
}

/// Creates `to` (owned by the sync user, readable by the read role) for a sync that wrote to
/// `from`. The old schema is left as it is; the message gives the `drop schema … cascade` the
/// user may run once they no longer need it.
pub async fn rename_schema(
    sync: &ConnectionSettings,
    read_role: &str,
    from: &str,
    to: &str,
) -> Result<Renamed, Error> {
    let mut conn = sync.connect().await?;
    let (u, r, s) = (q(&sync.user), q(read_role), q(to));
    let mut plan = Plan::default();
    let exists = sqlx::query_scalar!(
        r#"select exists (select 1 from pg_namespace where nspname = $1) as "e!""#,
        to
    )
    .fetch_one(&mut conn)
    .await
    .map_err(sql_error)?;
    if exists {
        let foreign = foreign_objects(&mut conn, to, &sync.user)
            .await
            .map_err(sql_error)?;
        if !foreign.is_empty() {
            return Err(Error::configuration(
                format!("schema {s} already exists and holds {}", describe(&foreign)),
                "choose another name for the new schema",
            ));
        }
    } else {
        plan.steps.push(Step::new(
            "the new sync schema, owned by the sync user",
            format!("create schema {s} authorization {u}"),
        ));
    }
    plan.steps.push(Step::new(
        "readers can use the new schema",
        format!("grant usage on schema {s} to {r}"),
    ));
    plan.steps.push(Step::new(
        "readers can read every table sluice creates there",
        format!(
            "alter default privileges for role {u} in schema {s} grant select on tables to {r}"
        ),
    ));
    run(&mut conn, &plan).await?;
    let _ = conn.close().await;
    Ok(Renamed {
        plan,
        backfill_required: true,
        message: format!(
            "sluice now writes to {s} and backfills it from the records stream. The old schema {old} is left \
             as it was; when nothing needs it any more, drop it (and everything in it) with:\n  drop schema {old} cascade;",
            old = q(from)
        ),
    })
}

/// Empties every table the sync user owns in `schema`, to be refilled from the stream. Tables
/// and views owned by anyone else are not touched, and views on sluice's tables keep working.
/// Returns the tables emptied.
pub async fn rebuild_schema(sync: &ConnectionSettings, schema: &str) -> Result<Vec<String>, Error> {
    let mut conn = sync.connect().await?;
    let tables = sqlx::query_scalar!(
        r#"select c.relname::text as "name!" from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where n.nspname = $1 and c.relkind in ('r', 'p') and c.relowner = (select oid from pg_roles where rolname = current_user)
           order by 1"#,
        schema
    )
    .fetch_all(&mut conn)
    .await
    .map_err(sql_error)?;
    if !tables.is_empty() {
        let list = tables
            .iter()
            .map(|t| qualified(schema, t))
            .collect::<Vec<_>>()
            .join(", ");
        sqlx::raw_sql(AssertSqlSafe(format!("truncate table {list}")))
            .execute(&mut conn)
            .await
            .map_err(sql_error)?;
    }
    let _ = conn.close().await;
    Ok(tables)
}

/// Drops a sync schema and everything sluice created in it — but refuses, naming them, while
/// the schema holds objects the sync user does not own, or objects elsewhere owned by others
/// depend on it (a cascade would take them too).
pub async fn drop_schema(sync: &ConnectionSettings, schema: &str) -> Result<(), Error> {
    let mut conn = sync.connect().await?;
    let s = q(schema);
    let inside = foreign_objects(&mut conn, schema, &sync.user)
        .await
        .map_err(sql_error)?;
    let outside = dependents_elsewhere(&mut conn, schema)
        .await
        .map_err(sql_error)?;
    if !inside.is_empty() || !outside.is_empty() {
        let mut what = Vec::new();
        if !inside.is_empty() {
            what.push(format!("it holds {}", describe(&inside)));
        }
        if !outside.is_empty() {
            what.push(format!("{} depend on it", describe(&outside)));
        }
        return Err(Error::configuration(
            format!(
                "will not drop schema {s}: {}, and sluice never drops what its sync user does not own",
                what.join("; ")
            ),
            "move or drop those objects yourself first (to see owners: select tableowner from pg_tables where schemaname = …;)",
        ));
    }
    sqlx::raw_sql(AssertSqlSafe(format!("drop schema {s} cascade")))
        .execute(&mut conn)
        .await
        .map_err(sql_error)?;
    let _ = conn.close().await;
    Ok(())
}

/// Views and other relations outside `schema`, not owned by the current user, that depend on
/// relations inside it.
async fn dependents_elsewhere(
    conn: &mut PgConnection,
    schema: &str,
) -> Result<Vec<ForeignObject>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"select distinct (dn.nspname || '.' || dv.relname)::text as "name!", pg_get_userbyid(dv.relowner)::text as "owner!"
           from pg_class t
           join pg_namespace tn on tn.oid = t.relnamespace
           join pg_depend d on d.refobjid = t.oid and d.classid = 'pg_rewrite'::regclass
           join pg_rewrite rw on rw.oid = d.objid
           join pg_class dv on dv.oid = rw.ev_class
           join pg_namespace dn on dn.oid = dv.relnamespace
           where tn.nspname = $1 and dn.nspname <> $1
             and dv.relowner <> (select oid from pg_roles where rolname = current_user)"#,
        schema
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ForeignObject {
            kind: "view".into(),
            name: r.name,
            owner: r.owner,
        })
        .collect())
}

fn describe(objects: &[ForeignObject]) -> String {
    objects
        .iter()
        .map(|o| format!("{} {} (owner {})", o.kind, q(&o.name), q(&o.owner)))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn run(conn: &mut PgConnection, plan: &Plan) -> Result<(), Error> {
    let mut tx = conn.begin().await.map_err(sql_error)?;
    for step in &plan.steps {
        sqlx::raw_sql(AssertSqlSafe(step.sql().to_owned()))
            .execute(&mut *tx)
            .await
            .map_err(sql_error)?;
    }
    tx.commit().await.map_err(sql_error)
}

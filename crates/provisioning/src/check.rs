//! `sluice setup check`: verification as the sync user, each gap with the SQL that fixes it.

use sluice_core::CheckReport;
use sluice_core::sql::{quote_ident as q, quote_literal};
use sluice_pg::{ConnectionSettings, catalog};

use crate::inspect::foreign_objects;
use crate::spec::{Preset, SchemaUse, SetupSpec};

/// Verifies the target as the sync user would use it.
pub async fn check(sync: &ConnectionSettings, spec: &SetupSpec) -> CheckReport {
    sync.check_with(async |conn, report| check_on(conn, spec, report).await)
        .await
}

async fn check_on(
    conn: &mut sqlx::PgConnection,
    spec: &SetupSpec,
    report: &mut CheckReport,
) -> Result<(), sqlx::Error> {
    let (u, r, d) = (q(&spec.sync_user), q(&spec.read_role), q(&spec.database));
    let facts = catalog::server_facts(conn).await?;
    report.push(
        "connect",
        true,
        format!(
            "connected as {} to {} (PostgreSQL {})",
            facts.current_user, facts.database, facts.version
        ),
        None,
    );
    report.push(
        "version",
        facts.major_version() >= 10,
        format!("PostgreSQL {}", facts.major_version()),
        Some("upgrade the server to PostgreSQL 10 or newer".into()),
    );
    if spec.preset == Some(Preset::Supabase) {
        report.push(
            "tls",
            facts.ssl,
            if facts.ssl {
                "the session uses TLS".to_owned()
            } else {
                "the Supabase preset requires TLS, but this session is not encrypted".to_owned()
            },
            Some("set sslmode=verify-full (or require) for this target".into()),
        );
    }
    let privileges = catalog::database_privileges(conn, &spec.database)
        .await?
        .unwrap_or(catalog::DatabasePrivileges {
            connect: false,
            create: false,
        });
    report.push(
        "database",
        privileges.connect && privileges.create,
        format!(
            "CONNECT {}, CREATE {} on {d}",
            yes(privileges.connect),
            yes(privileges.create)
        ),
        Some(format!("grant connect, create on database {d} to {u};")),
    );
    if !spec.schemas.iter().any(|s| s.name == "public") {
        let open = sqlx::query_scalar!(
            r#"select coalesce((select has_schema_privilege(n.oid, 'CREATE')
                                from pg_namespace n where n.nspname = 'public'), false) as "open!""#
        )
        .fetch_one(&mut *conn)
        .await?;
        report.push(
            "schema public",
            !open,
            if open {
                format!("{u} may create objects in schema public, which sluice does not need")
            } else {
                format!("{u} may not create objects in schema public")
            },
            Some(format!(
                "revoke create on schema public from public;  -- {}",
                crate::plan::PUBLIC_SCHEMA_REASON
            )),
        );
    }
    let read_exists = sqlx::query_scalar!(
        r#"select exists (select 1 from pg_roles where rolname = $1) as "e!""#,
        spec.read_role
    )
    .fetch_one(&mut *conn)
    .await?;
    let read_admin = sqlx::query_scalar!(
        r#"select exists (select 1 from pg_auth_members m join pg_roles g on g.oid = m.roleid
                          where g.rolname = $1 and m.member = (select oid from pg_roles where rolname = current_user)
                            and m.admin_option) as "e!""#,
        spec.read_role
    )
    .fetch_one(&mut *conn)
    .await?;
    report.push(
        "read_role",
        read_exists && read_admin,
        match (read_exists, read_admin) {
            (false, _) => format!("the read role {r} does not exist"),
            (true, false) => {
                format!("{u} is not an admin of the read role {r}, so it cannot grant it")
            }
            (true, true) => format!("{u} administers the read role {r}"),
        },
        Some(if read_exists {
            format!("grant {r} to {u} with admin option;")
        } else {
            format!("create role {r} with admin {u};")
        }),
    );
    for schema in &spec.schemas {
        let s = q(&schema.name);
        let row = sqlx::query!(
            r#"select pg_get_userbyid(nspowner)::text as "owner!", has_schema_privilege(oid, 'USAGE') as "usage!",
                      has_schema_privilege(oid, 'CREATE') as "create!"
               from pg_namespace where nspname = $1"#,
            schema.name
        )
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            let fix = match schema.usage {
                SchemaUse::Owned => format!("create schema {s} authorization {u};"),
                SchemaUse::Granted => {
                    format!("create schema {s}; grant usage, create on schema {s} to {u};")
                }
            };
            report.push(
                format!("schema {s}"),
                schema.usage == SchemaUse::Owned && privileges.create,
                if schema.usage == SchemaUse::Owned && privileges.create {
                    format!("{s} does not exist yet; sluice will create it")
                } else {
                    format!("{s} does not exist")
                },
                Some(fix),
            );
            continue;
        };
        report.push(
            format!("schema {s}"),
            row.usage && row.create,
            format!(
                "owner {}, USAGE {}, CREATE {}",
                q(&row.owner),
                yes(row.usage),
                yes(row.create)
            ),
            Some(format!("grant usage, create on schema {s} to {u};")),
        );
        if schema.usage == SchemaUse::Owned {
            report.push(
                format!("schema {s} owner"),
                row.owner == facts.current_user,
                format!("{s} is owned by {}", q(&row.owner)),
                Some(format!(
                    "alter schema {s} owner to {u};  -- or choose a schema sluice creates itself"
                )),
            );
            for object in foreign_objects(conn, &schema.name, &facts.current_user).await? {
                report.push(
                    format!("{} {s}.{}", object.kind, q(&object.name)),
                    true,
                    format!(
                        "owned by {}, so sluice will never drop or alter it (check with: select tableowner from pg_tables where schemaname = {} and tablename = {};)",
                        q(&object.owner),
                        quote_literal(&schema.name),
                        quote_literal(&object.name)
                    ),
                    None,
                );
            }
        }
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

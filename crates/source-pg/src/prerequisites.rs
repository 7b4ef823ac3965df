//! `sluice source check`: everything logical replication needs, each gap with its fix
//! (`docs/postgres-source.md` lists them for users).

use sluice_core::sql::{qualified, quote_ident as q, quote_literal};
use sluice_core::{CheckReport, Error};
use sluice_pg::{ConnectionSettings, catalog};
use sqlx::PgConnection;

/// What the source should offer.
#[derive(Clone, Debug)]
pub struct SourceSpec {
    /// The publication to read.
    pub publication: String,
    /// The replication slot.
    pub slot: String,
    /// Create the slot as a failover slot (PostgreSQL 17+), which standbys with
    /// `sync_replication_slots` keep in step, so that it survives a failover.
    pub failover: bool,
}

const WAL_LEVEL_HINTS: &str = "Standard PostgreSQL: set wal_level = logical in postgresql.conf (or: alter system set wal_level = logical;) and restart.\n\
AWS RDS / Aurora: in the parameter group, set rds.logical_replication = 1, then reboot.\n\
Google Cloud SQL: set the cloudsql.logical_decoding flag to on.\n\
Azure: set wal_level = logical in the server parameters.\n\
Neon: enable logical replication in the project settings.\n\
Supabase: enabled by default.\n\
Enabling logical replication usually needs a restart.";

/// Checks the source as the replication user: version, `wal_level`, the REPLICATION attribute,
/// CONNECT, the publication and its tables (SELECT, partitioning, replica identity), the slot.
pub async fn check(settings: &ConnectionSettings, spec: &SourceSpec) -> CheckReport {
    settings
        .check_with(async |conn, report| check_on(conn, spec, report).await)
        .await
}

async fn check_on(
    conn: &mut PgConnection,
    spec: &SourceSpec,
    report: &mut CheckReport,
) -> Result<(), sqlx::Error> {
    let facts = catalog::server_facts(conn).await?;
    let user = q(&facts.current_user);
    report.push(
        "connect",
        true,
        format!("connected as {} to {}", facts.current_user, facts.database),
        None,
    );
    report.push(
        "version",
        facts.major_version() >= 12,
        format!("PostgreSQL {} (12 or newer is needed)", facts.version),
        Some("upgrade the source to PostgreSQL 12 or newer".into()),
    );
    report.push(
        "wal_level",
        facts.wal_level == "logical",
        format!("wal_level = {}", facts.wal_level),
        Some(WAL_LEVEL_HINTS.into()),
    );
    let standby = check_standby(conn, &facts, report).await?;
    let role = catalog::role(conn, &facts.current_user).await?;
    let rds = sqlx::query_scalar!(
        r#"select exists (select 1 from pg_auth_members m join pg_roles g on g.oid = m.roleid
                          where g.rolname = 'rds_replication' and m.member = (select oid from pg_roles where rolname = current_user)) as "e!""#
    )
    .fetch_one(&mut *conn)
    .await?;
    let replication = role.as_ref().is_some_and(|r| r.replication || r.superuser) || rds;
    report.push(
        "replication",
        replication,
        if replication {
            format!("{user} may replicate")
        } else {
            format!("{user} lacks the REPLICATION attribute")
        },
        Some(format!(
            "alter user {user} with replication;  -- on AWS RDS: grant rds_replication to {user};"
        )),
    );
    let privileges = catalog::database_privileges(conn, &facts.database).await?;
    report.push(
        "database",
        privileges.is_some_and(|p| p.connect),
        format!("CONNECT on {}", q(&facts.database)),
        Some(format!(
            "grant connect on database {} to {user};",
            q(&facts.database)
        )),
    );

    let publication = sqlx::query!(
        r#"select puballtables as "all_tables!", pubupdate as "updates!", pubdelete as "deletes!",
                  -- pubviaroot is there from PostgreSQL 13 on
                  coalesce((to_jsonb(p) ->> 'pubviaroot')::bool, false) as "via_root!"
           from pg_publication p where pubname = $1"#,
        spec.publication
    )
    .fetch_optional(&mut *conn)
    .await?;
    let p = q(&spec.publication);
    let Some(publication) = publication else {
        report.push(
            "publication",
            false,
            format!("the publication {p} does not exist"),
            Some(format!(
                "{}create publication {p} for all tables{};  -- or: for table t1, t2; or: for tables in schema public;  (create it before the slot)",
                if standby { "on the primary (a standby is read-only): " } else { "" },
                if facts.major_version() >= 13 { " with (publish_via_partition_root = true)" } else { "" }
            )),
        );
        return check_slot(conn, spec, &facts, standby, report).await;
    };
    let tables = sqlx::query!(
        r#"select pt.schemaname::text as "schema!", pt.tablename::text as "table!",
                  has_table_privilege(c.oid, 'SELECT') as "select!",
                  c.relkind::text as "kind!", c.relispartition as "is_partition!",
                  c.relreplident::text as "identity!",
                  exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary) as "has_pk!"
           from pg_publication_tables pt
           join pg_namespace n on n.nspname = pt.schemaname
           join pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
           where pt.pubname = $1
           order by 1, 2"#,
        spec.publication
    )
    .fetch_all(&mut *conn)
    .await?;
    report.push(
        "publication",
        !tables.is_empty(),
        if tables.is_empty() {
            format!("the publication {p} publishes no tables")
        } else {
            format!(
                "{p} publishes {} table(s){}",
                tables.len(),
                if publication.all_tables { " (all tables)" } else { "" }
            )
        },
        Some(format!("alter publication {p} add table …;  -- or recreate it: create publication {p} for all tables;")),
    );
    report.push(
        "publication changes",
        publication.updates && publication.deletes,
        format!(
            "publishes updates: {}, deletes: {}",
            publication.updates, publication.deletes
        ),
        Some(format!(
            "alter publication {p} set (publish = 'insert, update, delete, truncate');"
        )),
    );
    let partitioned = sqlx::query_scalar!(
        r#"select count(*) as "n!" from pg_class c join pg_namespace n on n.oid = c.relnamespace
           where c.relkind = 'p' and (exists (select 1 from pg_publication_tables pt where pt.pubname = $1 and pt.schemaname = n.nspname and pt.tablename = c.relname)
                 or exists (select 1 from pg_inherits i join pg_class ch on ch.oid = i.inhrelid join pg_namespace cn on cn.oid = ch.relnamespace
                            join pg_publication_tables pt on pt.pubname = $1 and pt.schemaname = cn.nspname and pt.tablename = ch.relname
                            where i.inhparent = c.oid))"#,
        spec.publication
    )
    .fetch_one(&mut *conn)
    .await?;
    if partitioned > 0 && facts.major_version() < 13 {
        report.push(
            "partitioned tables",
            true,
            format!("{partitioned} partitioned table(s) are published partition by partition: PostgreSQL {} has no publish_via_partition_root (13 and later do), so each partition syncs as a table of its own, and a partition created later must be added to the publication unless it is for all tables", facts.major_version()),
            None,
        );
    } else if partitioned > 0 {
        report.push(
            "partitioned tables",
            publication.via_root,
            format!("{partitioned} partitioned table(s) are published; publish_via_partition_root is {}", publication.via_root),
            Some(format!(
                "alter publication {p} set (publish_via_partition_root = true);  -- so changes arrive as the partitioned table, including partitions created later"
            )),
        );
    }
    for t in &tables {
        let name = qualified(&t.schema, &t.table);
        if !t.select {
            report.push(
                format!("table {name}"),
                false,
                format!("{user} cannot SELECT {name} (needed for the backfill)"),
                Some(format!("grant select on table {name} to {user};")),
            );
        }
        let (ok, consequence) = match (t.identity.as_str(), t.has_pk) {
            ("f", _) | ("i", _) => (true, String::new()),
            ("d", true) => (true, String::new()),
            ("n", _) => (false, "replica identity NOTHING: updates and deletes on it fail at the source, and nothing identifies its rows".to_owned()),
            _ => (false, "no primary key: updates and deletes on it fail at the source while it is published, and its rows have no stable identity".to_owned()),
        };
        if !ok {
            report.push(
                format!("table {name}"),
                false,
                format!("{name} has {consequence}"),
                Some(format!("alter table {name} add primary key (…);  -- or: alter table {name} replica identity full;")),
            );
        }
    }
    check_slot(conn, spec, &facts, standby, report).await
}

/// On a standby (in recovery): whether this version can decode there (16+), and the settings
/// that keep its slot valid. Returns whether the server is a standby.
async fn check_standby(
    conn: &mut PgConnection,
    facts: &catalog::ServerFacts,
    report: &mut CheckReport,
) -> Result<bool, sqlx::Error> {
    let row = sqlx::query!(
        r#"select pg_is_in_recovery() as "standby!",
                  current_setting('hot_standby_feedback') as "feedback!",
                  current_setting('primary_slot_name') as "primary_slot!""#
    )
    .fetch_one(&mut *conn)
    .await?;
    if !row.standby {
        return Ok(false);
    }
    let major = facts.major_version();
    if major < 16 {
        report.push(
            "standby",
            false,
            format!("this server is a standby (in recovery), and PostgreSQL {major} cannot decode logical changes on a standby (16 and later can)"),
            Some("point the sync at the primary, or upgrade the primary and the standby to PostgreSQL 16 or newer".into()),
        );
        return Ok(true);
    }
    report.push(
        "standby",
        true,
        format!("a standby (in recovery): PostgreSQL {major} decodes logical changes on standbys, so the primary carries no decoding load"),
        None,
    );
    report.push(
        "hot_standby_feedback",
        row.feedback == "on",
        format!("hot_standby_feedback = {}", row.feedback),
        Some("on the standby: alter system set hot_standby_feedback = on; select pg_reload_conf();  -- without it the primary may remove catalog rows the slot still needs, and PostgreSQL invalidates the slot".into()),
    );
    report.push(
        "primary_slot_name",
        !row.primary_slot.is_empty(),
        if row.primary_slot.is_empty() {
            "the standby streams without a physical slot on the primary".to_owned()
        } else {
            format!("the standby streams through the physical slot {}", quote_literal(&row.primary_slot))
        },
        Some("on the primary: select pg_create_physical_replication_slot('standby_1'); on the standby: alter system set primary_slot_name = 'standby_1'; select pg_reload_conf();  -- hot_standby_feedback then holds even while the standby is disconnected".into()),
    );
    Ok(true)
}

/// Why `failover_slot` cannot be had on this server, with the fix; `None` when it can.
fn failover_refusal(major: i32, standby: bool) -> Option<(String, &'static str)> {
    if major < 17 {
        Some((
            format!(
                "failover_slot is set, and PostgreSQL {major} has no failover slots (17 and later do)"
            ),
            "upgrade to PostgreSQL 17 or newer, or turn failover_slot off",
        ))
    } else if standby {
        Some((
            "failover_slot is set, and a failover slot is made on the primary, not on a standby"
                .into(),
            "point the sync at the primary (a standby with sync_replication_slots = on keeps a copy), or turn failover_slot off",
        ))
    } else {
        None
    }
}

async fn check_slot(
    conn: &mut PgConnection,
    spec: &SourceSpec,
    facts: &catalog::ServerFacts,
    standby: bool,
    report: &mut CheckReport,
) -> Result<(), sqlx::Error> {
    if spec.failover {
        match failover_refusal(facts.major_version(), standby) {
            Some((problem, fix)) => report.push("failover slot", false, problem, Some(fix.into())),
            None => report.push("failover slot", true, "failover slots are supported", None),
        }
    }
    let slot = sqlx::query!(
        r#"select plugin::text as "plugin", active as "active!", database::text as "database",
                  -- the failover column is there from PostgreSQL 17 on
                  coalesce((to_jsonb(s) ->> 'failover')::bool, false) as "failover!"
           from pg_replication_slots s where slot_name = $1"#,
        spec.slot
    )
    .fetch_optional(&mut *conn)
    .await?;
    let s = quote_literal(&spec.slot);
    match slot {
        None => report.push(
            "slot",
            false,
            format!("the replication slot {s} does not exist"),
            Some(format!("select pg_create_logical_replication_slot({s}, 'pgoutput');  -- after the publication exists")),
        ),
        Some(slot) => {
            if spec.failover && facts.major_version() >= 17 && !standby {
                report.push(
                    "slot failover",
                    slot.failover,
                    format!("slot {s} is{} a failover slot", if slot.failover { "" } else { " not" }),
                    Some(format!(
                        "a slot cannot be changed into a failover slot while sluice uses it: stop the sync, then select pg_drop_replication_slot({s}); and start it again with create_missing = true (it backfills again), or turn failover_slot off"
                    )),
                );
            }
            let pgoutput = slot.plugin.as_deref() == Some("pgoutput");
            report.push(
                "slot",
                pgoutput,
                format!("slot {s} uses {}{}", slot.plugin.as_deref().unwrap_or("?"), if slot.active { " and is in use" } else { "" }),
                Some(format!(
                    "the slot must use pgoutput: create another one and configure it, e.g. select pg_create_logical_replication_slot({}, 'pgoutput');",
                    quote_literal(&format!("{}_pgoutput", spec.slot))
                )),
            );
        }
    }
    Ok(())
}

/// Creates the publication (if missing) and then the slot (if missing) — in that order,
/// because a slot created first would hold WAL for changes the publication cannot decode yet —
/// and adopts existing ones. Never drops anything. Returns what it did.
pub async fn ensure_publication_and_slot(
    settings: &ConnectionSettings,
    spec: &SourceSpec,
) -> Result<Vec<String>, Error> {
    let mut conn = settings.connect().await?;
    let mut done = Vec::new();
    let sql_error = |e: sqlx::Error| {
        sluice_pg::classify(e, "setting up the source", |condition, db| {
            (condition == sluice_pg::Condition::InsufficientPrivilege).then(|| {
                Error::configuration(
                    format!("not allowed: {}", db.message()),
                    "create the publication as a superuser or the tables' owner (create publication … for all tables needs a superuser), or grant the REPLICATION attribute for the slot",
                )
            })
        })
    };
    let (has_publication, has_slot) = existing(&mut conn, spec).await.map_err(sql_error)?;
    let facts = catalog::server_facts(&mut conn).await.map_err(sql_error)?;
    let standby: bool = sqlx::query_scalar!(r#"select pg_is_in_recovery() as "r!""#)
        .fetch_one(&mut conn)
        .await
        .map_err(sql_error)?;
    let major = facts.major_version();
    if standby && major < 16 {
        return Err(Error::configuration(
            format!(
                "the source is a standby, and PostgreSQL {major} cannot decode logical changes on a standby (16 and later can)"
            ),
            "point the sync at the primary, or upgrade the primary and the standby to PostgreSQL 16 or newer",
        ));
    }
    if spec.failover
        && let Some((problem, fix)) = failover_refusal(major, standby)
    {
        return Err(Error::configuration(problem, fix));
    }
    // From 13 on, a partitioned table's changes arrive as the table itself, not as each
    // partition (which on 12 they always do).
    let via_root = if major >= 13 {
        " with (publish_via_partition_root = true)"
    } else {
        ""
    };
    if !has_publication && standby {
        return Err(Error::configuration(
            format!(
                "the publication {} does not exist, and a standby is read-only",
                q(&spec.publication)
            ),
            format!(
                "on the primary: create publication {} for all tables{via_root};  (it reaches the standby by replication)",
                q(&spec.publication)
            ),
        ));
    }
    if has_publication {
        done.push(format!(
            "adopted the existing publication {}",
            q(&spec.publication)
        ));
    } else {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "create publication {} for all tables{via_root}",
            q(&spec.publication)
        )))
        .execute(&mut conn)
        .await
        .map_err(sql_error)?;
        done.push(format!(
            "created the publication {} for all tables{via_root}",
            q(&spec.publication)
        ));
    }
    if has_slot {
        done.push(format!(
            "adopted the existing slot {}",
            quote_literal(&spec.slot)
        ));
    } else {
        // On a standby this waits for the primary to log its running transactions (it does
        // every 15 seconds while it is busy; pg_log_standby_snapshot() on the primary hurries it).
        let create = if spec.failover {
            // slot name, plugin, temporary, two-phase, failover
            "select pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
        } else {
            "select pg_create_logical_replication_slot($1, 'pgoutput')"
        };
        sqlx::query(create)
            .bind(&spec.slot)
            .execute(&mut conn)
            .await
            .map_err(sql_error)?;
        done.push(format!(
            "created the {}slot {} (pgoutput){}",
            if spec.failover { "failover " } else { "" },
            quote_literal(&spec.slot),
            if standby { " on the standby" } else { "" }
        ));
    }
    Ok(done)
}

/// Whether the publication and the slot exist.
async fn existing(conn: &mut PgConnection, spec: &SourceSpec) -> Result<(bool, bool), sqlx::Error> {
    let row = sqlx::query!(
        r#"select exists (select 1 from pg_publication where pubname = $1) as "publication!",
                  exists (select 1 from pg_replication_slots where slot_name = $2) as "slot!""#,
        spec.publication,
        spec.slot
    )
    .fetch_one(conn)
    .await?;
    Ok((row.publication, row.slot))
}

/// `sluice config plan` for a source: what starting it would adopt or create. Changes nothing.
pub async fn plan(
    settings: &ConnectionSettings,
    spec: &SourceSpec,
    create_missing: bool,
) -> CheckReport {
    settings
        .check_with(async |conn, report| {
            let (has_publication, has_slot) = existing(conn, spec).await?;
            for (what, object, exists) in [
                ("publication", &spec.publication, has_publication),
                ("slot", &spec.slot, has_slot),
            ] {
                match (exists, create_missing) {
                    (true, _) => report.push(what, true, format!("adopt the existing {what} {object}"), None),
                    (false, true) => report.push(what, true, format!("would create the {what} {object}"), None),
                    (false, false) => report.push(
                        what,
                        false,
                        format!("the {what} {object} is missing and create_missing is false"),
                        Some("run `sluice source check` for the SQL that creates it, or set create_missing = true".into()),
                    ),
                }
            }
            report.push("backfill", true, "backfill every published table not yet read, then stream", None);
            Ok(())
        })
        .await
}

//! Creating and changing the mirror's schema, enums and tables as collection shapes change.

use serde_json::Value;
use sluice_core::sql::{qualified, quote_ident as q, quote_literal};
use sluice_core::{CollectionId, Error, Status, SyncId};
use sqlx::{AssertSqlSafe, PgConnection};

use super::shape::{TableDef, default_table_name};
use super::{SchemaMirrorTarget, db};
use crate::checkpoint::CHECKPOINT_TABLE;

impl SchemaMirrorTarget {
    /// The schema (owned by the sync user), read access for the read role (also for tables
    /// created later), and the checkpoint table (`crate::checkpoint`).
    pub(super) async fn prepare(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let s = q(&self.schema);
        let owner = sluice_pg::catalog::schema_owner(conn, &self.schema)
            .await
            .map_err(|e| db(&self.name, "reading the schema", e))?;
        if let Some(owner) = &owner
            && owner != &self.settings.user
        {
            return Err(Error::configuration(
                format!(
                    "target {:?}: schema {s} exists and belongs to {owner:?}, not to the sync user {:?}; sluice only writes into schemas it owns",
                    self.name, self.settings.user
                ),
                format!(
                    "choose another schema name for this consumer, or: alter schema {s} owner to {};",
                    q(&self.settings.user)
                ),
            ));
        }
        let role = q(&self.read_role);
        let lock = sluice_core::sql::schema_ddl_lock(&self.schema);
        let sql = format!(
            "{lock};
             set local client_min_messages = warning;
             create schema if not exists {s};"
        );
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(|e| db(&self.name, "creating the schema", e))?;
        self.migrate_checkpoints(conn).await?;
        sqlx::raw_sql(AssertSqlSafe(self.checkpoints.create.clone()))
            .execute(&mut *conn)
            .await
            .map_err(|e| db(&self.name, "creating the checkpoint table", e))?;
        let grants = format!(
            "grant usage on schema {s} to {role};
             grant select on all tables in schema {s} to {role};
             alter default privileges in schema {s} grant select on tables to {role};"
        );
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(grants))
            .execute(&mut *conn)
            .await
        {
            self.observe(
                "read role",
                Status::Warning,
                format!("could not give {role} read access to {s}: {e}"),
                Some(format!(
                    "create role {role}; (or set read_role to an existing role)"
                )),
            );
        } else {
            self.observe(
                "read role",
                Status::Healthy,
                format!("{role} can read {s}"),
                None,
            );
        }
        Ok(())
    }

    /// Gives a checkpoint table made before partitions (`consumer` its primary key, `seq`) the
    /// shape both layouts share (`crate::checkpoint`): each consumer's row becomes its
    /// partition 0 under this mirror's key, its seq unchanged. Safe to run twice at once: the
    /// second waits for the schema's DDL lock and changes nothing that matters.
    async fn migrate_checkpoints(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let table = qualified(&self.schema, CHECKPOINT_TABLE);
        let before: bool = sqlx::query_scalar(
            "select to_regclass($1) is not null and not exists (select 1 from pg_attribute \
             where attrelid = to_regclass($1) and attname = 'tbl' and not attisdropped)",
        )
        .bind(&table)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| db(&self.name, "reading the checkpoint table", e))?;
        if !before {
            return Ok(());
        }
        let sql = format!(
            "{lock};
             alter table {table}
               add column if not exists tbl text not null default {key},
               add column if not exists partition int not null default 0,
               add column if not exists updated_at timestamptz not null default now(),
               drop constraint if exists {pkey},
               add primary key (consumer, tbl, partition);
             alter table {table} alter column tbl drop default, alter column partition drop default;",
            lock = sluice_core::sql::schema_ddl_lock(&self.schema),
            key = quote_literal(&self.checkpoint_key()),
            pkey = q(&format!("{CHECKPOINT_TABLE}_pkey")),
        );
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(|e| db(&self.name, "giving the checkpoint table its partitions", e))?;
        tracing::info!(
            target = %self.name,
            table = %table,
            "schema mirror: the checkpoint table now keeps a row per partition (a one-time step)"
        );
        Ok(())
    }

    /// The table for a collection, made to match its current shape.
    pub(super) async fn table_for(
        &self,
        conn: &mut PgConnection,
        sync_id: SyncId,
        collection: &str,
    ) -> Result<TableDef, Error> {
        let cached = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(sync_id, collection.to_owned()))
            .cloned();
        let described = self
            .stream
            .collection_schema(sync_id, &CollectionId(collection.to_owned()))
            .await?;
        let def = match (&described, self.json.get(collection)) {
            (Some(schema), _) => TableDef::from_collection_schema(
                default_table_name(collection),
                schema,
                &self.schema,
            ),
            (None, Some(json)) => TableDef::from_json_schema(
                json.table
                    .clone()
                    .unwrap_or_else(|| default_table_name(collection)),
                &json.schema,
            ),
            (None, None) => {
                TableDef::from_json_schema(default_table_name(collection), &Value::Null)
            }
        };
        if cached.as_ref() == Some(&def) {
            return Ok(def);
        }
        // One table holds one collection of one sync.
        let clash = self
            .applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|((s, c), d)| d.name == def.name && (*s != sync_id || c != collection))
            .map(|((s, c), _)| (*s, c.clone()));
        if let Some((other_sync, other)) = clash {
            let problem = format!(
                "target {:?}: collection {collection} would be written into {}, which already holds collection {other}{}",
                self.name,
                qualified(&self.schema, &def.name),
                if other_sync != sync_id {
                    " of another sync"
                } else {
                    ""
                }
            );
            self.observe("tables", Status::Error, problem.clone(), None);
            return Err(Error::configuration(
                problem,
                "a schema mirror holds one sync: filter the consumer by one sync, and give colliding collections their own table (collections.\"<id>\".table) or their own consumer",
            ));
        }
        self.reconcile_table(conn, &def).await?;
        let indexed = key_indexed(conn, &qualified(&self.schema, &def.name), &def.key)
            .await
            .map_err(|e| db(&self.name, "reading a table's indexes", e))?;
        self.key_indexed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(def.name.clone(), indexed);
        for notice in &def.notices {
            self.observe(
                &format!("column {}", def.name),
                Status::Warning,
                notice.clone(),
                None,
            );
        }
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sync_id, collection.to_owned()), def.clone());
        Ok(def)
    }

    /// Creates the table (and its enums), or brings an existing one in line: adds columns,
    /// converts retyped ones, never drops anything.
    pub(super) async fn reconcile_table(
        &self,
        conn: &mut PgConnection,
        def: &TableDef,
    ) -> Result<(), Error> {
        for (name, labels) in &def.enums {
            let existing: Option<Vec<String>> = sqlx::query_scalar(
                "select array_agg(e.enumlabel::text order by e.enumsortorder)
                 from pg_type t join pg_namespace n on n.oid = t.typnamespace
                 left join pg_enum e on e.enumtypid = t.oid
                 where n.nspname = $1 and t.typname = $2 group by t.oid",
            )
            .bind(&self.schema)
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| db(&self.name, "reading enums", e))?;
            let ty = qualified(&self.schema, name);
            let sql = match existing {
                None => vec![format!(
                    "create type {ty} as enum ({})",
                    labels
                        .iter()
                        .map(|l| quote_literal(l))
                        .collect::<Vec<_>>()
                        .join(", ")
                )],
                Some(have) => labels
                    .iter()
                    .filter(|l| !have.contains(l))
                    .map(|l| {
                        format!(
                            "alter type {ty} add value if not exists {}",
                            quote_literal(l)
                        )
                    })
                    .collect(),
            };
            for statement in sql {
                sqlx::raw_sql(AssertSqlSafe(self.locked(&statement)))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| db(&self.name, &format!("creating enum {ty}"), e))?;
            }
        }
        let table = qualified(&self.schema, &def.name);
        let existing: Vec<(String, String)> = sqlx::query_as(
            "select a.attname::text, format_type(a.atttypid, a.atttypmod)
             from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = $1 and c.relname = $2 and a.attnum > 0 and not a.attisdropped order by a.attnum",
        )
        .bind(&self.schema)
        .bind(&def.name)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| db(&self.name, "reading a table", e))?;
        if existing.is_empty() {
            let columns: Vec<String> = def
                .columns
                .iter()
                .map(|c| format!("{} {}", q(&c.name), c.sql_type))
                .collect();
            let key: Vec<String> = def.key.iter().map(|k| q(k)).collect();
            let sql = format!(
                "create table if not exists {table} ({}, primary key ({}))",
                columns.join(", "),
                key.join(", ")
            );
            sqlx::raw_sql(AssertSqlSafe(self.locked(&sql)))
                .execute(&mut *conn)
                .await
                .map_err(|e| db(&self.name, &format!("creating {table}"), e))?;
            tracing::info!(table = %table, "schema mirror: created table");
            return Ok(());
        }
        for column in &def.columns {
            match existing.iter().find(|(n, _)| n == &column.name) {
                None => {
                    let sql = format!(
                        "alter table {table} add column {} {}",
                        q(&column.name),
                        column.sql_type
                    );
                    sqlx::raw_sql(AssertSqlSafe(self.locked(&sql)))
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| {
                            db(
                                &self.name,
                                &format!("adding column {} to {table}", column.name),
                                e,
                            )
                        })?;
                    tracing::info!(table = %table, column = %column.name, "schema mirror: added column");
                }
                Some((_, have)) if !same_type(have, &column.sql_type, &self.schema) => {
                    let sql = format!(
                        "alter table {table} alter column {c} type {t} using {c}::text::{t}",
                        c = q(&column.name),
                        t = column.sql_type
                    );
                    if let Err(e) = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *conn).await {
                        let depended_on =
                            sluice_pg::Condition::of(&e) == Some(sluice_pg::Condition::WrongShape);
                        let what = format!(
                            "target {:?}: column {table}.{} changed type upstream from {have} to {}",
                            self.name,
                            q(&column.name),
                            column.sql_type
                        );
                        let (message, fix) = if depended_on {
                            // Views (or rules) depend on the column: name them.
                            let views: Vec<String> = sqlx::query_scalar(
                                "select distinct v.oid::regclass::text from pg_depend d
                                 join pg_rewrite r on r.oid = d.objid join pg_class v on v.oid = r.ev_class
                                 where d.refobjid = $1::regclass and v.oid <> $1::regclass
                                   and d.refobjsubid = (select attnum from pg_attribute
                                                        where attrelid = $1::regclass and attname = $2)",
                            )
                            .bind(&table)
                            .bind(&column.name)
                            .fetch_all(&mut *conn)
                            .await
                            .unwrap_or_default();
                            (
                                format!("{what}, and view(s) {} depend on it", views.join(", ")),
                                format!(
                                    "sluice never drops what it does not own. Either drop the view(s) {} (sluice then converts the column and carries on; recreate them afterwards), or point the consumer at a new schema (it is backfilled from the records stream) and keep this one as it is",
                                    views.join(", ")
                                ),
                            )
                        } else {
                            // Existing values do not convert by a plain cast (the source used
                            // its own USING expression, which logical replication does not send).
                            (
                                format!(
                                    "{what}, and the rows already mirrored do not convert by a cast: {e}"
                                ),
                                format!(
                                    "convert them the way the source did, as the sync user or a superuser (sluice then carries on): alter table {table} alter column {} type {} using <the source's expression>;",
                                    q(&column.name),
                                    column.sql_type
                                ),
                            )
                        };
                        self.observe(
                            "schema changes",
                            Status::Error,
                            message.clone(),
                            Some(fix.clone()),
                        );
                        return Err(Error::configuration(message, fix));
                    }
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

fn same_type(have: &str, want: &str, schema: &str) -> bool {
    let norm = |t: &str| {
        t.replace('"', "")
            .trim_start_matches(&format!("{schema}."))
            .to_owned()
    };
    norm(have) == norm(want)
}

/// Whether `table` has a valid unique index on key columns alone (the primary key sluice
/// creates, or one of the user's): a staged row then matches at most one row, found through it.
async fn key_indexed(
    conn: &mut PgConnection,
    table: &str,
    key: &[String],
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "select exists (select 1 from pg_index i
           where i.indrelid = $1::regclass and i.indisunique and i.indisvalid
             and i.indpred is null and i.indexprs is null
             and not exists (select 1 from unnest((i.indkey::int2[])[0:i.indnkeyatts - 1]) k
                             join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k
                             where a.attname <> all($2::text[])))",
    )
    .bind(table)
    .bind(key)
    .fetch_one(conn)
    .await
}

//! The consumer-table layout: one generic table per consumer, eight fixed columns, one row per
//! record identity. This module holds the table itself (its DDL, and verifying an existing
//! one column by column); `apply` writes batches into it with the checkpoint, `target` is the
//! [`Target`](sluice_core::Target) that runs those writes on a pool of connections.

mod apply;
mod statements;
mod target;

pub use target::ConsumerTableTarget;

use sluice_core::CheckReport;
use sluice_core::sql::{qualified, quote_ident, quote_literal};
use sluice_pg::{ConnectionSettings, catalog};
use sqlx::{AssertSqlSafe, PgConnection};

/// The table every consumer-table consumer writes: these eight columns, exactly as the
/// reference product named them, so existing tables and views keep working.
pub const COLUMNS: [(&str, &str); 8] = [
    ("sequin_id", "uuid"),
    ("sync_id", "uuid"),
    ("collection_id", "text"),
    ("upstream_id", "text"),
    ("payload", "jsonb"),
    ("upstream_updated_at", "timestamp with time zone"),
    ("inserted_at", "timestamp with time zone"),
    ("updated_at", "timestamp with time zone"),
];

const CONSTRAINT_REASON: &str = "APIs do not enforce constraints the way PostgreSQL does, and \
    sluice guarantees strict ordering per record but not across records, so two records can \
    briefly hold the same value; when that breaks a constraint, the consumer halts";
const FOREIGN_KEY_REASON: &str = "there is no guarantee that the parent of a record is forwarded \
    before the child, so a child can briefly reference a parent that is not in the table yet; \
    the foreign key then halts the consumer";
const TRIGGER_REASON: &str = "the table is expected to have exactly sluice's structure, and \
    straying from it (a trigger that fails or rejects a row) will cause the consumer to fail";

/// A consumer table: its schema and name (any names: quotes, spaces, unicode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerTable {
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
}

/// How bad a verification finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Writes will work, but something is likely to halt the consumer later.
    Warning,
    /// Writes cannot work until this is fixed.
    Error,
}

/// One verification finding, with the SQL that fixes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// What is wrong, and why it matters.
    pub message: String,
    /// The statement(s) that fix it.
    pub fix: String,
}

/// The result of verifying a table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Every finding, errors first.
    pub findings: Vec<Finding>,
    /// The table does not exist (its one finding then says so, with the `create table`).
    pub missing: bool,
}

impl Verification {
    /// True when nothing prevents writing (warnings allowed).
    pub fn is_writable(&self) -> bool {
        self.findings
            .iter()
            .all(|f| f.severity == Severity::Warning)
    }

    /// The findings of one severity.
    pub fn of(&self, severity: Severity) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.severity == severity)
    }

    fn push(&mut self, severity: Severity, message: String, fix: String) {
        self.findings.push(Finding {
            severity,
            message,
            fix,
        });
    }
}

impl ConsumerTable {
    /// A table `schema.table`.
    pub fn new(schema: impl Into<String>, table: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            table: table.into(),
        }
    }

    /// `"schema"."table"`, quoted.
    pub fn qualified(&self) -> String {
        qualified(&self.schema, &self.table)
    }

    /// The `CREATE TABLE` a user runs to create the table.
    pub fn ddl(&self) -> String {
        let mut ddl = format!("create table {} (\n", self.qualified());
        for (i, (name, ty)) in COLUMNS.iter().enumerate() {
            let key = if i == 0 { " primary key" } else { " not null" };
            let comma = if i + 1 < COLUMNS.len() { "," } else { "" };
            ddl.push_str(&format!("  {name} {ty}{key}{comma}\n"));
        }
        ddl.push_str(");");
        ddl
    }

    /// Creates the table, and its schema if needed, when it does not exist; then grants
    /// `read_role` usage of the schema and SELECT on the table (a missing read role only
    /// skips the grant). Returns whether it created the table. An existing table is untouched.
    pub async fn create_if_missing(
        &self,
        conn: &mut PgConnection,
        read_role: &str,
    ) -> Result<bool, sqlx::Error> {
        let exists = catalog::relation_exists(conn, &self.qualified()).await?;
        if exists {
            return Ok(false);
        }
        let schema = quote_ident(&self.schema);
        // Consumers started together may all find the table missing: under the schema's DDL
        // lock, the first creates it and the others find it made.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "{}; set local client_min_messages = warning; create schema if not exists {schema}",
            sluice_core::sql::schema_ddl_lock(&self.schema)
        )))
        .execute(&mut *tx)
        .await?;
        let made_meanwhile = catalog::relation_exists(&mut tx, &self.qualified()).await?;
        if made_meanwhile {
            tx.commit().await?;
            return Ok(false);
        }
        sqlx::raw_sql(AssertSqlSafe(self.ddl()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        let grant = format!(
            "grant usage on schema {schema} to {role}; grant select on {t} to {role}",
            role = quote_ident(read_role),
            t = self.qualified()
        );
        if let Err(e) = sqlx::raw_sql(AssertSqlSafe(grant))
            .execute(&mut *conn)
            .await
        {
            tracing::warn!(error = %e, table = %self.qualified(), "could not grant the read role access");
        }
        Ok(true)
    }

    /// `sluice config plan` for this table, as the user `settings` connects as: whether a
    /// consumer would create it, finds it ready, or finds something to fix (each with its
    /// fix). Changes nothing.
    pub async fn plan(&self, settings: &ConnectionSettings, read_role: &str) -> CheckReport {
        settings
            .check_with(async |conn, report| {
                let table = self.qualified();
                if !catalog::relation_exists(conn, &table).await? {
                    report.push(
                        "table",
                        true,
                        format!(
                            "would create {table} (and schema {} if missing) as {}, readable by {read_role}",
                            quote_ident(&self.schema),
                            settings.user
                        ),
                        None,
                    );
                    return Ok(());
                }
                let verification = self.verify(conn).await?;
                if verification.findings.is_empty() {
                    report.push("table", true, format!("{table} exists and is ready: no change"), None);
                }
                for f in verification.findings {
                    match f.severity {
                        Severity::Warning => report.push(
                            "table",
                            true,
                            format!("warning: {} (fix: {})", f.message, f.fix),
                            None,
                        ),
                        Severity::Error => report.push("table", false, f.message, Some(f.fix)),
                    }
                }
                Ok(())
            })
            .await
    }

    /// Checks an existing table column by column, plus the primary key, the connected role's
    /// privileges, and the constraints, foreign keys and triggers that would make an apply fail or
    /// fire on every row.
    pub async fn verify(&self, conn: &mut PgConnection) -> Result<Verification, sqlx::Error> {
        let mut v = Verification::default();
        let name = self.qualified();
        let Some(table) = sqlx::query!(
            r#"select c.oid as "oid!", c.relkind::text as "kind!", pg_get_userbyid(c.relowner)::text as "owner!",
                      current_user::text as "me!",
                      has_table_privilege(c.oid, 'SELECT') as "select!",
                      has_table_privilege(c.oid, 'INSERT') as "insert!",
                      has_table_privilege(c.oid, 'UPDATE') as "update!",
                      has_table_privilege(c.oid, 'DELETE') as "delete!"
               from pg_class c join pg_namespace n on n.oid = c.relnamespace
               where n.nspname = $1 and c.relname = $2"#,
            self.schema,
            self.table
        )
        .fetch_optional(&mut *conn)
        .await?
        else {
            v.push(Severity::Error, format!("table {name} does not exist"), self.ddl());
            v.missing = true;
            return Ok(v);
        };
        if table.kind != "r" && table.kind != "p" {
            v.push(
                Severity::Error,
                format!(
                    "{name} is not a table (relkind {:?}); sluice writes into a plain table",
                    table.kind
                ),
                self.ddl(),
            );
            return Ok(v);
        }
        if !(table.select && table.insert && table.update && table.delete) {
            v.push(
                Severity::Error,
                format!("{} may not read and write {name}", table.me),
                format!(
                    "grant select, insert, update, delete on table {name} to {};",
                    quote_ident(&table.me)
                ),
            );
        }

        let columns = sqlx::query!(
            r#"select a.attname::text as "name!", format_type(a.atttypid, a.atttypmod) as "ty!",
                      a.attnotnull as "not_null!", a.atthasdef as "has_default!"
               from pg_attribute a
               where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped
               order by a.attnum"#,
            table.oid
        )
        .fetch_all(&mut *conn)
        .await?;
        for (col, ty) in COLUMNS {
            match columns.iter().find(|c| c.name == col) {
                None => v.push(
                    Severity::Error,
                    format!("{name} has no column {col} ({ty})"),
                    format!("alter table {name} add column {col} {ty} not null;"),
                ),
                Some(c) if c.ty != ty => v.push(
                    Severity::Error,
                    format!("column {col} of {name} is {}, but sluice writes {ty}", c.ty),
                    format!("alter table {name} alter column {col} type {ty} using {col}::{ty};"),
                ),
                Some(c) if !c.not_null => v.push(
                    Severity::Error,
                    format!("column {col} of {name} allows nulls; it must be not null"),
                    format!("alter table {name} alter column {col} set not null;"),
                ),
                Some(_) => {}
            }
        }
        for extra in columns
            .iter()
            .filter(|c| !COLUMNS.iter().any(|(n, _)| *n == c.name))
        {
            if extra.not_null && !extra.has_default {
                let col = quote_ident(&extra.name);
                v.push(
                    Severity::Error,
                    format!(
                        "{name} has a column {col} that sluice does not write; it is not null without a \
                         default, so every insert would fail"
                    ),
                    format!("alter table {name} alter column {col} drop not null;"),
                );
            }
        }

        let constraints = sqlx::query!(
            r#"select conname::text as "name!", contype::text as "kind!", pg_get_constraintdef(oid) as "def!"
               from pg_constraint where conrelid = $1 and contype <> 'n' order by conname"#,
            table.oid
        )
        .fetch_all(&mut *conn)
        .await?;
        let has_pk = constraints
            .iter()
            .any(|c| c.kind == "p" && c.def == "PRIMARY KEY (sequin_id)");
        if !has_pk {
            let fix = match constraints.iter().find(|c| c.kind == "p") {
                Some(other) => format!(
                    "alter table {name} drop constraint {}; alter table {name} add primary key (sequin_id);",
                    quote_ident(&other.name)
                ),
                None => format!("alter table {name} add primary key (sequin_id);"),
            };
            v.push(
                Severity::Error,
                format!("{name} needs sequin_id as its primary key"),
                fix,
            );
        }
        for c in constraints.iter().filter(|c| c.kind != "p") {
            let drop = format!(
                "alter table {name} drop constraint {};",
                quote_ident(&c.name)
            );
            let (what, reason) = match c.kind.as_str() {
                "f" => ("foreign key", FOREIGN_KEY_REASON),
                "u" => ("unique constraint", CONSTRAINT_REASON),
                _ => ("constraint", CONSTRAINT_REASON),
            };
            v.push(
                Severity::Warning,
                format!(
                    "{name} has a {what} {} ({}): {reason}",
                    quote_ident(&c.name),
                    c.def
                ),
                drop,
            );
        }
        let unique_indexes = sqlx::query_scalar!(
            r#"select i.indexrelid::regclass::text as "name!"
               from pg_index i
               where i.indrelid = $1 and i.indisunique and not i.indisprimary
                 and not exists (select 1 from pg_constraint c where c.conindid = i.indexrelid)"#,
            table.oid
        )
        .fetch_all(&mut *conn)
        .await?;
        for index in unique_indexes {
            v.push(
                Severity::Warning,
                format!("{name} has a unique index {index}: {CONSTRAINT_REASON}"),
                format!("drop index {index};"),
            );
        }
        let triggers = sqlx::query_scalar!(
            r#"select tgname::text as "name!" from pg_trigger where tgrelid = $1 and not tgisinternal order by tgname"#,
            table.oid
        )
        .fetch_all(&mut *conn)
        .await?;
        for trigger in triggers {
            v.push(
                Severity::Warning,
                format!(
                    "{name} has a trigger {}: {TRIGGER_REASON}",
                    quote_ident(&trigger)
                ),
                format!("drop trigger {} on {name};", quote_ident(&trigger)),
            );
        }
        if table.owner != table.me && !v.findings.is_empty() {
            // Only the owner (or a superuser) can run the fixes.
            let note = format!(
                " (run the fix as the table's owner, {}; check with: select tableowner from pg_tables where schemaname = {} and tablename = {};)",
                quote_ident(&table.owner),
                quote_literal(&self.schema),
                quote_literal(&self.table)
            );
            for f in &mut v.findings {
                f.message.push_str(&note);
            }
        }
        v.findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddl_has_the_eight_columns_with_sequin_id_as_primary_key() {
        let ddl = ConsumerTable::new("my schema", "We're \"odd\"").ddl();
        assert!(
            ddl.starts_with("create table \"my schema\".\"We're \"\"odd\"\"\" (\n"),
            "{ddl}"
        );
        assert!(ddl.contains("  sequin_id uuid primary key,\n"));
        assert!(ddl.contains("  payload jsonb not null,\n"));
        assert!(
            ddl.ends_with("  updated_at timestamp with time zone not null\n);"),
            "{ddl}"
        );
        assert_eq!(ddl.matches(" not null").count(), 7);
    }
}

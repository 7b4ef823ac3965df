//! The schema-mirror layout: one schema per sync (named by the user), one typed table per
//! collection, created and owned by the sync user and readable by the read role.
//!
//! Table shapes come from the collection's [`CollectionSchema`] in the records stream (a
//! Postgres source describes its tables there), or from a JSON Schema given in the config
//! (top-level properties become columns, everything else stays in a `payload jsonb` column).
//! Schema changes are applied without a restart: a new column is added; a column that
//! disappears upstream stays (and is no longer filled), so views on it keep working; a retyped
//! column is converted in place, and if a view the sync user does not own depends on it, the
//! consumer stops with a message naming the view and the choices.
//!
//! Writes: per batch, one transaction holding every table's upserts (`COPY` into a staging
//! table, then one `insert … on conflict … do update` per table), its deletes, and the
//! consumer's checkpoint (`<schema>._sluice_checkpoint`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;
use sluice_core::sql::{qualified, quote_ident as q, quote_literal};
use sluice_core::{
    Batch, CollectionId, CollectionSchema, ColumnSchema, ConsumerId, EntityKind, EntityRef, Error,
    Health, HealthReport, HealthState, RecordKey, Seq, Status, StreamEntry, SyncId, Target,
};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use time::OffsetDateTime;

use crate::apply::{copy, copy_if_all_new, map_in_parallel, push_text};
use crate::settings::ConnectionSettings;

/// A collection typed from a JSON Schema (for sources that do not describe their shape).
#[derive(Clone, Debug, PartialEq)]
pub struct JsonCollection {
    /// The table name (default: the collection id after its last `:` or `.`).
    pub table: Option<String>,
    /// The JSON Schema of the records (`{"type": "object", "properties": {…}}`).
    pub schema: Value,
}

/// The table a collection is written into.
#[derive(Clone, Debug, PartialEq)]
struct TableDef {
    name: String,
    columns: Vec<ColumnDef>,
    key: Vec<String>,
    /// JSON collections: the upstream id goes into `id`, and unmapped fields into `payload`.
    json: bool,
    enums: Vec<(String, Vec<String>)>,
    notices: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
struct ColumnDef {
    name: String,
    sql_type: String,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Json,
    Array,
    Bool,
    Plain,
}

fn kind_of(sql_type: &str) -> Kind {
    if sql_type.ends_with("[]") {
        Kind::Array
    } else if sql_type == "json" || sql_type == "jsonb" {
        Kind::Json
    } else if sql_type == "boolean" {
        Kind::Bool
    } else {
        Kind::Plain
    }
}

/// `public.orders` → `orders`, `stripe:customer` → `customer`.
pub fn default_table_name(collection: &str) -> String {
    collection
        .rsplit([':', '.'])
        .next()
        .unwrap_or(collection)
        .to_owned()
}

impl TableDef {
    fn from_collection_schema(
        name: String,
        schema: &CollectionSchema,
        target_schema: &str,
    ) -> Self {
        let mut enums: Vec<(String, Vec<String>)> = Vec::new();
        let mut notices = Vec::new();
        let columns = schema
            .columns
            .iter()
            .map(|c: &ColumnSchema| {
                let sql_type = match &c.enum_labels {
                    Some(labels) => {
                        let array = c.sql_type.ends_with("[]");
                        let base = c.sql_type.trim_end_matches("[]");
                        let base = base.rsplit('.').next().unwrap_or(base).trim_matches('"');
                        if !enums.iter().any(|(n, _)| n == base) {
                            enums.push((base.to_owned(), labels.clone()));
                        }
                        format!("{}{}", qualified(target_schema, base), if array { "[]" } else { "" })
                    }
                    None => c.sql_type.clone(),
                };
                if let Some(original) = &c.unsupported {
                    notices.push(format!(
                        "column {}.{} has type {original}, which sluice cannot reproduce: it is stored as {}",
                        name, c.name, c.sql_type
                    ));
                }
                ColumnDef {
                    kind: kind_of(&c.sql_type),
                    name: c.name.clone(),
                    sql_type,
                }
            })
            .collect();
        Self {
            name,
            columns,
            key: schema.key.clone(),
            json: false,
            enums,
            notices,
        }
    }

    fn from_json_schema(name: String, schema: &Value) -> Self {
        let mut columns = vec![ColumnDef {
            name: "id".into(),
            sql_type: "text".into(),
            kind: Kind::Plain,
        }];
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (prop, spec) in properties {
                if prop == "id" || prop == "payload" {
                    continue;
                }
                let ty = spec.get("type").and_then(|t| match t {
                    Value::String(s) => Some(s.as_str()),
                    // ["string", "null"]: the non-null type
                    Value::Array(a) => a.iter().filter_map(Value::as_str).find(|s| *s != "null"),
                    _ => None,
                });
                let format = spec.get("format").and_then(Value::as_str);
                let sql_type = match (ty, format) {
                    (Some("string"), Some("date-time")) => "timestamptz",
                    (Some("string"), Some("date")) => "date",
                    (Some("string"), Some("uuid")) => "uuid",
                    (Some("string"), _) => "text",
                    (Some("integer"), _) => "bigint",
                    (Some("number"), _) => "numeric",
                    (Some("boolean"), _) => "boolean",
                    _ => "jsonb", // objects, arrays, anything unspecified
                };
                columns.push(ColumnDef {
                    name: prop.clone(),
                    sql_type: sql_type.into(),
                    kind: kind_of(sql_type),
                });
            }
        }
        columns.push(ColumnDef {
            name: "payload".into(),
            sql_type: "jsonb".into(),
            kind: Kind::Json,
        });
        Self {
            name,
            columns,
            key: vec!["id".into()],
            json: true,
            enums: Vec::new(),
            notices: Vec::new(),
        }
    }
}

/// Writes consumers' records into a schema of typed tables.
pub struct SchemaMirrorTarget {
    name: String,
    settings: ConnectionSettings,
    schema: String,
    read_role: String,
    stream: Arc<dyn sluice_core::RecordStream>,
    json: BTreeMap<String, JsonCollection>,
    connection: tokio::sync::Mutex<Option<PgConnection>>,
    /// Tables as last made to match, by (sync, collection).
    applied: Mutex<HashMap<(SyncId, String), TableDef>>,
    /// Tables whose last batch had only new keys (see `write_table`).
    optimistic: Mutex<HashMap<String, bool>>,
    /// NUL replacements: how many records so far, those of the batch being written, the
    /// latest record's key.
    sanitized: Mutex<(u64, Vec<RecordKey>, Option<RecordKey>)>,
    health: Mutex<HealthState>,
}

impl std::fmt::Debug for SchemaMirrorTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaMirrorTarget")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

fn db(target: &str, what: &str, e: sqlx::Error) -> Error {
    match &e {
        sqlx::Error::Database(d) if crate::diagnose::is_transient(d.as_ref()) => {
            Error::unavailable(format!("target {target:?}: {what} (retrying)"), e)
        }
        sqlx::Error::Database(d) if d.code().as_deref() == Some("42501") => Error::configuration(
            format!(
                "target {target:?}: permission denied {what}: {}",
                d.message()
            ),
            "the sync user needs CREATE on the database (sluice setup apply grants it) and must own the mirror schema",
        ),
        sqlx::Error::Database(d) => Error::configuration(
            format!(
                "target {target:?}: {what}: {} (SQLSTATE {})",
                d.message(),
                d.code().unwrap_or_default()
            ),
            "see the message; `sluice check` verifies the target",
        ),
        _ => Error::unavailable(format!("target {target:?}: {what}"), e),
    }
}

impl SchemaMirrorTarget {
    /// A mirror into `schema`, readable by `read_role`. `stream` supplies collection shapes;
    /// `json` types collections from JSON Schemas.
    pub fn new(
        name: impl Into<String>,
        settings: ConnectionSettings,
        schema: impl Into<String>,
        read_role: impl Into<String>,
        stream: Arc<dyn sluice_core::RecordStream>,
        json: BTreeMap<String, JsonCollection>,
    ) -> Self {
        let name = name.into();
        Self {
            health: Mutex::new(HealthState::new(EntityRef {
                kind: EntityKind::Target,
                name: name.clone(),
            })),
            name,
            settings,
            schema: schema.into(),
            read_role: read_role.into(),
            stream,
            json,
            connection: tokio::sync::Mutex::new(None),
            applied: Mutex::new(HashMap::new()),
            optimistic: Mutex::new(HashMap::new()),
            sanitized: Mutex::new((0, Vec::new(), None)),
        }
    }

    /// The schema written.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// `statement` preceded by the schema's DDL lock, as one implicit transaction.
    fn locked(&self, statement: &str) -> String {
        format!(
            "{}; {statement}",
            sluice_core::sql::schema_ddl_lock(&self.schema)
        )
    }

    fn checkpoint_table(&self) -> String {
        qualified(&self.schema, crate::apply::CHECKPOINT_TABLE)
    }

    /// Records of the batch being written whose NULs were replaced; counted once it commits.
    fn sanitized_in_batch(&self, keys: Vec<RecordKey>) {
        if !keys.is_empty() {
            self.sanitized
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .1
                .extend(keys);
        }
    }

    /// Counts the committed batch's NUL replacements into the `payload` check (or forgets
    /// them when the batch failed).
    fn sanitized_batch_done(&self, committed: bool) {
        let mut s = self.sanitized.lock().unwrap_or_else(|e| e.into_inner());
        let keys = std::mem::take(&mut s.1);
        if committed && let Some(last) = keys.last() {
            s.0 += keys.len() as u64;
            s.2 = Some(last.clone());
        }
        let (status, message, fix) = crate::apply::payload_check(s.0, s.2.as_ref());
        drop(s);
        self.observe("payload", status, message, fix);
    }

    fn observe(
        &self,
        check: &str,
        status: Status,
        message: impl Into<String>,
        fix: Option<String>,
    ) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.observe(check, status, message, fix, OffsetDateTime::now_utc());
    }

    async fn with_connection<T>(
        &self,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut guard = self.connection.lock().await;
        if guard.is_none() {
            let mut conn = match self.settings.connect().await {
                Ok(c) => c,
                Err(e) => {
                    self.observe(
                        "reachable",
                        Status::Error,
                        e.to_string(),
                        e.fix_sql().map(str::to_owned),
                    );
                    return Err(e.into());
                }
            };
            self.observe(
                "reachable",
                Status::Healthy,
                format!("connected to {}", self.settings.endpoint()),
                None,
            );
            self.prepare(&mut conn).await?;
            *guard = Some(conn);
        }
        let conn = guard
            .as_mut()
            .ok_or_else(|| Error::invalid("no connection"))?;
        let result = work(conn).await;
        if result.is_err() {
            *guard = None;
        }
        result
    }

    /// The schema (owned by the sync user), read access for the read role (also for tables
    /// created later), and the checkpoint table.
    async fn prepare(&self, conn: &mut PgConnection) -> Result<(), Error> {
        let s = q(&self.schema);
        let owner: Option<String> = sqlx::query_scalar(
            "select pg_get_userbyid(nspowner)::text from pg_namespace where nspname = $1",
        )
        .bind(&self.schema)
        .fetch_optional(&mut *conn)
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
        let sql = format!(
            "{lock};
             set local client_min_messages = warning;
             create schema if not exists {s};
             create table if not exists {cp} (consumer text primary key, seq bigint not null);",
            cp = self.checkpoint_table(),
            lock = sluice_core::sql::schema_ddl_lock(&self.schema)
        );
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(|e| db(&self.name, "creating the schema", e))?;
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

    /// The table for a collection, made to match its current shape.
    async fn table_for(
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
    async fn reconcile_table(&self, conn: &mut PgConnection, def: &TableDef) -> Result<(), Error> {
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
                        let code = match &e {
                            sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
                            _ => None,
                        };
                        let what = format!(
                            "target {:?}: column {table}.{} changed type upstream from {have} to {}",
                            self.name,
                            q(&column.name),
                            column.sql_type
                        );
                        let (message, fix) = if code.as_deref() == Some("0A000") {
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

    async fn write(
        &self,
        conn: &mut PgConnection,
        consumer: &ConsumerId,
        batch: &Batch,
    ) -> Result<(), Error> {
        // Group by (sync, collection); the newest version per key wins.
        let mut groups: BTreeMap<(SyncId, String), Vec<&StreamEntry>> = BTreeMap::new();
        for entry in &batch.entries {
            groups
                .entry((
                    entry.record.key.sync_id,
                    entry.record.key.collection_id.0.clone(),
                ))
                .or_default()
                .push(entry);
        }
        let mut defs = Vec::new();
        for ((sync_id, collection), entries) in &groups {
            let def = self.table_for(conn, *sync_id, collection).await?;
            let mut newest: HashMap<&str, &StreamEntry> = HashMap::new();
            for e in entries {
                let id = e.record.key.upstream_id.0.as_str();
                match newest.get(id) {
                    Some(old) if old.record.version >= e.record.version => {}
                    _ => {
                        newest.insert(id, e);
                    }
                }
            }
            defs.push((def, newest.into_values().collect::<Vec<_>>()));
        }
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| db(&self.name, "beginning a batch", e))?;
        let stored: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
            "select seq from {} where consumer = $1 for update",
            self.checkpoint_table()
        )))
        .bind(&consumer.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| db(&self.name, "reading the checkpoint", e))?;
        if stored.is_some_and(|s| s as u64 >= batch.through.0) {
            return Ok(()); // already applied: idempotent replay
        }
        for (def, entries) in &defs {
            self.write_table(&mut tx, def, entries).await?;
        }
        sqlx::query(AssertSqlSafe(format!(
            "insert into {} (consumer, seq) values ($1, $2) on conflict (consumer) do update set seq = excluded.seq",
            self.checkpoint_table()
        )))
        .bind(&consumer.0)
        .bind(batch.through.0 as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| db(&self.name, "storing the checkpoint", e))?;
        tx.commit()
            .await
            .map_err(|e| db(&self.name, "committing a batch", e))?;
        Ok(())
    }

    async fn write_table(
        &self,
        conn: &mut PgConnection,
        def: &TableDef,
        entries: &[&StreamEntry],
    ) -> Result<(), Error> {
        let table = qualified(&self.schema, &def.name);
        let (upserts, deletes): (Vec<&StreamEntry>, Vec<&StreamEntry>) =
            entries.iter().partition(|e| !e.record.is_tombstone());
        let columns: Vec<String> = def.columns.iter().map(|c| q(&c.name)).collect();
        let key: Vec<String> = def.key.iter().map(|k| q(k)).collect();
        let fail = |what: &str, e: sqlx::Error| db(&self.name, &format!("{what} {table}"), e);
        let copy_in = format!("copy {table} ({}) from stdin", columns.join(", "));
        let mut upserts = upserts;
        // Optimistic first (the common case during a backfill): copy every upsert straight in,
        // inside a savepoint. A key that already exists aborts that COPY; the table is then
        // marked, and batches for it take the lookup path until one finds no existing key.
        let optimistic = !upserts.is_empty()
            && *self
                .optimistic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&def.name)
                .unwrap_or(&true);
        if optimistic {
            let (data, sanitized) = encode_rows(def, &upserts);
            match copy_if_all_new(conn, &copy_in, &data).await {
                Ok(Some(_)) => {
                    self.sanitized_in_batch(sanitized);
                    upserts.clear();
                }
                Ok(None) => {
                    self.optimistic
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(def.name.clone(), false);
                }
                Err(e) => return Err(fail("copying into", e)),
            }
        }
        // With a one-column key, rows whose key is not in the table yet are copied straight in;
        // only the others go through the staging table and the merge.
        let mut fresh: Vec<&StreamEntry> = Vec::new();
        if let [k] = def.key.as_slice()
            && let Some(key_type) = def
                .columns
                .iter()
                .find(|c| &c.name == k)
                .map(|c| &c.sql_type)
            && !upserts.is_empty()
        {
            let ids: Vec<&str> = upserts
                .iter()
                .map(|e| e.record.key.upstream_id.0.as_str())
                .collect();
            let existing: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
                "select {k}::text from {table} where {k} = any($1::text[]::{key_type}[])",
                k = q(k)
            )))
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| fail("looking up keys in", e))?;
            if existing.is_empty() {
                self.optimistic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(def.name.clone(), true);
            }
            let existing: std::collections::HashSet<String> = existing.into_iter().collect();
            (upserts, fresh) = upserts
                .into_iter()
                .partition(|e| existing.contains(&e.record.key.upstream_id.0));
        }
        if !fresh.is_empty() {
            let (data, sanitized) = encode_rows(def, &fresh);
            copy(conn, &copy_in, &data)
                .await
                .map_err(|e| fail("copying into", e))?;
            self.sanitized_in_batch(sanitized);
        }
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        sqlx::raw_sql(AssertSqlSafe(format!(
            "create temp table if not exists _sluice_mirror_stage (like {table}) on commit drop;
             truncate _sluice_mirror_stage;"
        )))
        .execute(&mut *conn)
        .await
        .map_err(|e| fail("staging", e))?;
        // A staging table per target table in one transaction: dropped before the next table.
        if !upserts.is_empty() {
            let (data, sanitized) = encode_rows(def, &upserts);
            self.sanitized_in_batch(sanitized);
            copy(
                conn,
                &format!(
                    "copy _sluice_mirror_stage ({}) from stdin",
                    columns.join(", ")
                ),
                &data,
            )
            .await
            .map_err(|e| fail("copying into", e))?;
            let updates: Vec<String> = def
                .columns
                .iter()
                .filter(|c| !def.key.contains(&c.name))
                .map(|c| format!("{n} = excluded.{n}", n = q(&c.name)))
                .collect();
            let on_conflict = if updates.is_empty() {
                "do nothing".to_owned()
            } else {
                format!("do update set {}", updates.join(", "))
            };
            sqlx::raw_sql(AssertSqlSafe(format!(
                "insert into {table} ({cols}) select {cols} from _sluice_mirror_stage on conflict ({key}) {on_conflict}",
                cols = columns.join(", "),
                key = key.join(", ")
            )))
            .execute(&mut *conn)
            .await
            .map_err(|e| fail("writing", e))?;
        }
        if !deletes.is_empty() {
            sqlx::raw_sql("truncate _sluice_mirror_stage")
                .execute(&mut *conn)
                .await
                .map_err(|e| fail("staging", e))?;
            let mut data = Vec::new();
            for e in &deletes {
                let parts = key_parts(def, &e.record.key.upstream_id.0);
                for (i, part) in parts.iter().enumerate() {
                    if i > 0 {
                        data.push(b'\t');
                    }
                    push_text(&mut data, part);
                }
                data.push(b'\n');
            }
            copy(
                conn,
                &format!("copy _sluice_mirror_stage ({}) from stdin", key.join(", ")),
                &data,
            )
            .await
            .map_err(|e| fail("copying deletes for", e))?;
            let on: Vec<String> = key.iter().map(|k| format!("t.{k} = s.{k}")).collect();
            sqlx::raw_sql(AssertSqlSafe(format!(
                "delete from {table} t using _sluice_mirror_stage s where {}",
                on.join(" and ")
            )))
            .execute(&mut *conn)
            .await
            .map_err(|e| fail("deleting from", e))?;
        }
        sqlx::raw_sql("drop table _sluice_mirror_stage")
            .execute(&mut *conn)
            .await
            .map_err(|e| fail("staging", e))?;
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

/// A composite key's parts (a JSON array of text), or the single key.
fn key_parts(def: &TableDef, upstream_id: &str) -> Vec<String> {
    if def.key.len() > 1 {
        serde_json::from_str::<Vec<String>>(upstream_id)
            .unwrap_or_else(|_| vec![upstream_id.to_owned()])
    } else {
        vec![upstream_id.to_owned()]
    }
}

/// COPY text for `entries`; large batches are encoded on two threads.
/// Also returns the records whose text had NUL characters replaced (the target's NUL policy).
fn encode_rows(def: &TableDef, entries: &[&StreamEntry]) -> (Vec<u8>, Vec<RecordKey>) {
    let encode = |part: &[&StreamEntry]| {
        let mut data = Vec::with_capacity(part.len() * 512);
        let mut sanitized = Vec::new();
        for e in part {
            if encode_row(&mut data, def, e) {
                sanitized.push(e.record.key.clone());
            }
        }
        (data, sanitized)
    };
    if entries.len() < 1000 {
        return encode(entries);
    }
    let halves: Vec<&[&StreamEntry]> = entries.chunks(entries.len().div_ceil(2)).collect();
    let (data, sanitized): (Vec<Vec<u8>>, Vec<Vec<RecordKey>>) =
        map_in_parallel(&halves, |part| encode(part))
            .into_iter()
            .unzip();
    (data.concat(), sanitized.concat())
}

/// One COPY text line for an upsert, in the table's column order. Returns whether a NUL
/// character had to be replaced.
fn encode_row(out: &mut Vec<u8>, def: &TableDef, entry: &StreamEntry) -> bool {
    let Some(payload) = entry.record.change.payload() else {
        return false;
    };
    let mut sanitized = false;
    for (i, column) in def.columns.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        if def.json && column.name == "id" {
            sanitized |= push_text(out, &entry.record.key.upstream_id.0);
            continue;
        }
        if def.json && column.name == "payload" {
            // Everything no column took.
            let rest: serde_json::Map<String, Value> = payload
                .iter()
                .filter(|(k, _)| {
                    matches!(k.as_str(), "id" | "payload")
                        || !def.columns.iter().any(|c| &c.name == *k)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let (text, nul) = json_text(&Value::Object(rest));
            sanitized |= nul;
            push_text(out, &text);
            continue;
        }
        match payload.get(&column.name) {
            None | Some(Value::Null) => out.extend_from_slice(b"\\N"),
            Some(Value::String(s)) if column.kind != Kind::Json => {
                sanitized |= push_text(out, s);
            }
            Some(v) if column.kind == Kind::Json => {
                let (text, nul) = json_text(v);
                sanitized |= nul;
                push_text(out, &text);
            }
            Some(v) => {
                sanitized |= push_text(out, &pg_text(v, column.kind));
            }
        }
    }
    out.push(b'\n');
    sanitized
}

/// JSON text `jsonb` accepts: `\u0000` (which it refuses) becomes U+FFFD. Returns whether it did.
fn json_text(value: &Value) -> (String, bool) {
    let text = value.to_string();
    if text.contains("\\u0000") {
        (text.replace("\\u0000", "\u{FFFD}"), true)
    } else {
        (text, false)
    }
}

/// A JSON value as PostgreSQL input text for a column of `kind`.
fn pg_text(value: &Value, kind: Kind) -> String {
    match (kind, value) {
        (Kind::Json, v) => json_text(v).0,
        (Kind::Array, Value::Array(items)) => array_literal(items),
        (Kind::Bool, Value::Bool(b)) => if *b { "t" } else { "f" }.to_owned(),
        (_, Value::String(s)) => s.clone(),
        (_, Value::Bool(b)) => b.to_string(),
        (_, v) => v.to_string(),
    }
}

/// `{1,NULL,"a b"}` from a JSON array (nested arrays for more dimensions).
fn array_literal(items: &[Value]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|v| match v {
            Value::Null => "NULL".to_owned(),
            Value::Array(inner) => array_literal(inner),
            Value::Bool(b) => if *b { "t" } else { "f" }.to_owned(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => quote_element(s),
            other => quote_element(&other.to_string()),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn quote_element(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[async_trait]
impl Target for SchemaMirrorTarget {
    fn name(&self) -> &str {
        &self.name
    }

    async fn checkpoint(&self, consumer: &ConsumerId) -> Result<Seq, Error> {
        let table = self.checkpoint_table();
        self.with_connection(async |conn| {
            let seq: Option<i64> = sqlx::query_scalar(AssertSqlSafe(format!(
                "select seq from {table} where consumer = $1"
            )))
            .bind(&consumer.0)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| db(&self.name, "reading the checkpoint", e))?;
            Ok(Seq(seq.unwrap_or(0) as u64))
        })
        .await
    }

    async fn reset_checkpoint(&self, consumer: &ConsumerId) -> Result<(), Error> {
        let table = self.checkpoint_table();
        self.with_connection(async |conn| {
            sqlx::query(AssertSqlSafe(format!(
                "delete from {table} where consumer = $1"
            )))
            .bind(&consumer.0)
            .execute(&mut *conn)
            .await
            .map_err(|e| db(&self.name, "resetting the checkpoint", e))?;
            Ok(())
        })
        .await
    }

    async fn apply(&self, consumer: &ConsumerId, batch: &Batch) -> Result<(), Error> {
        let result = self
            .with_connection(async |conn| self.write(conn, consumer, batch).await)
            .await;
        self.sanitized_batch_done(result.is_ok());
        match &result {
            Ok(()) => self.observe(
                "writes",
                Status::Healthy,
                format!(
                    "wrote {} record(s) into schema {}",
                    batch.entries.len(),
                    q(&self.schema)
                ),
                None,
            ),
            Err(e) => self.observe(
                "writes",
                Status::Error,
                e.to_string(),
                e.fix().map(str::to_owned),
            ),
        }
        result
    }
}

#[async_trait]
impl Health for SchemaMirrorTarget {
    async fn health(&self) -> HealthReport {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .report()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_values_become_postgres_input_text() {
        assert_eq!(
            pg_text(&json!([1, null, [2, 3]]), Kind::Array),
            "{1,NULL,{2,3}}"
        );
        assert_eq!(
            pg_text(&json!(["a b", "c\"d", "e\\f"]), Kind::Array),
            r#"{"a b","c\"d","e\\f"}"#
        );
        assert_eq!(pg_text(&json!({"a": 1}), Kind::Json), r#"{"a":1}"#);
        assert_eq!(pg_text(&json!("x\u{0}y"), Kind::Json), "\"x\u{FFFD}y\"");
        assert_eq!(pg_text(&json!(true), Kind::Bool), "t");
        assert_eq!(pg_text(&json!("12.50"), Kind::Plain), "12.50");
    }

    #[test]
    fn json_schema_properties_become_columns_and_the_rest_stays_in_payload() {
        let def = TableDef::from_json_schema(
            "customer".into(),
            &json!({"type": "object", "properties": {
                "email": {"type": "string"}, "created": {"type": "string", "format": "date-time"},
                "balance": {"type": "integer"}, "metadata": {"type": "object"},
                "delinquent": {"type": ["boolean", "null"]}
            }}),
        );
        let cols: Vec<(&str, &str)> = def
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.sql_type.as_str()))
            .collect();
        assert_eq!(
            cols,
            vec![
                ("id", "text"),
                ("balance", "bigint"),
                ("created", "timestamptz"),
                ("delinquent", "boolean"),
                ("email", "text"),
                ("metadata", "jsonb"),
                ("payload", "jsonb")
            ]
        );
        assert_eq!(default_table_name("stripe:customer"), "customer");
        assert_eq!(default_table_name("public.orders"), "orders");
    }
}

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
//! Writes: per batch and partition (one unless `connections` asks for more:
//! `crate::checkpoint`), one transaction holding every table's upserts (`COPY` straight in, or
//! through a staging table and one merge per table), its deletes, and the partition's
//! checkpoint row (`<schema>._sluice_checkpoint`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sluice_core::sql::quote_ident as q;
use sluice_core::{
    Batch, CheckReport, ConsumerId, EntityKind, EntityRef, Error, Health, HealthReport,
    HealthState, RecordKey, Seq, Status, SyncId, Target,
};
use sqlx::PgConnection;
use time::OffsetDateTime;

use sluice_pg::ConnectionSettings;

use crate::checkpoint::{Aligned, Checkpoints};
use crate::copy::NulReplacements;

mod binary;
mod ddl;
mod fields;
mod scan;
mod shape;
mod text;
mod write;

use shape::TableDef;
pub use shape::{JsonCollection, default_table_name};

/// Writes consumers' records into a schema of typed tables.
pub struct SchemaMirrorTarget {
    name: String,
    settings: ConnectionSettings,
    schema: String,
    read_role: String,
    stream: Arc<dyn sluice_core::RecordStream>,
    json: BTreeMap<String, JsonCollection>,
    /// One connection per partition (see `crate::checkpoint`); the first also makes the
    /// tables match their collections' shapes.
    connections: Vec<tokio::sync::Mutex<Option<PgConnection>>>,
    checkpoints: Checkpoints,
    aligned: Aligned,
    /// Tables as last made to match, by (sync, collection).
    applied: Mutex<HashMap<(SyncId, String), TableDef>>,
    /// Tables whose last batch had only new keys, by (partition, table) (see `write_table`).
    optimistic: Mutex<HashMap<(usize, String), bool>>,
    /// Tables whose key has a unique index, found when the table was last made to match:
    /// their staged merges and deletes probe it (`copy::probing_key_index`).
    key_indexed: Mutex<HashMap<String, bool>>,
    /// NUL replacements: how many records so far, the latest record's key.
    sanitized: Mutex<NulReplacements>,
    health: Mutex<HealthState>,
}

impl std::fmt::Debug for SchemaMirrorTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaMirrorTarget")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("schema", &self.schema)
            .field("connections", &self.connections.len())
            .finish_non_exhaustive()
    }
}

fn db(target: &str, what: &str, e: sqlx::Error) -> Error {
    sluice_pg::classify(e, &format!("target {target:?}: {what}"), |condition, d| {
        (condition == sluice_pg::Condition::InsufficientPrivilege).then(|| {
            Error::configuration(
                format!("target {target:?}: permission denied {what}: {}", d.message()),
                "the sync user needs CREATE on the database (sluice setup apply grants it) and must own the mirror schema",
            )
        })
    })
}

impl SchemaMirrorTarget {
    /// `sluice config plan` for a mirror into `schema`, as the user `settings` connects as:
    /// whether the schema would be created, is the user's to extend, or belongs to someone
    /// else (sluice only writes into schemas its sync user owns). Changes nothing.
    pub async fn plan(settings: &ConnectionSettings, schema: &str) -> CheckReport {
        settings
            .check_with(async |conn, report| {
                let user = &settings.user;
                let s = q(schema);
                match sluice_pg::catalog::schema_owner(conn, schema).await? {
                    None => report.push(
                        "schema",
                        true,
                        format!("would create schema {s} owned by {user}, with a typed table per collection"),
                        None,
                    ),
                    Some(owner) if &owner == user => report.push(
                        "schema",
                        true,
                        format!("schema {s} exists (owned by {user}): tables are created or extended per collection"),
                        None,
                    ),
                    Some(owner) => report.push(
                        "schema",
                        false,
                        format!("schema {s} belongs to {owner}; sluice only writes into schemas its sync user owns"),
                        Some(format!(
                            "choose another schema name for this consumer, or: alter schema {s} owner to {};",
                            q(user)
                        )),
                    ),
                }
                Ok(())
            })
            .await
    }

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
        let schema = schema.into();
        Self {
            health: Mutex::new(HealthState::new(EntityRef {
                kind: EntityKind::Target,
                name: name.clone(),
            })),
            name,
            settings,
            read_role: read_role.into(),
            stream,
            json,
            connections: vec![tokio::sync::Mutex::new(None)],
            checkpoints: Checkpoints::new(&schema),
            aligned: Aligned::default(),
            applied: Mutex::new(HashMap::new()),
            optimistic: Mutex::new(HashMap::new()),
            key_indexed: Mutex::new(HashMap::new()),
            sanitized: Mutex::new(NulReplacements::default()),
            schema,
        }
    }

    /// Writes each batch through `connections` connections (at least 1), a partition of the
    /// records on each, in its own transaction with its own checkpoint row
    /// (see `crate::checkpoint`). Nothing connects until first use.
    pub fn with_connections(mut self, connections: usize) -> Self {
        self.connections = (0..connections.max(1))
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        self
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

    /// What this mirror's checkpoint rows are kept under: its quoted schema.
    fn checkpoint_key(&self) -> String {
        q(&self.schema)
    }

    /// Counts a committed partition's NUL replacements into the `payload` check.
    fn sanitized(&self, keys: &[RecordKey]) {
        let mut s = self.sanitized.lock().unwrap_or_else(|e| e.into_inner());
        s.add(keys);
        let (status, message, fix) = s.check();
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
        slot: usize,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut guard = self.connections[slot].lock().await;
        if guard.is_none() {
            let mut conn = match self.settings.connect().await {
                Ok(c) => c,
                Err(e) => {
                    self.observe("reachable", Status::Error, e.to_string(), e.health_fix());
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
}

#[async_trait]
impl Target for SchemaMirrorTarget {
    fn name(&self) -> &str {
        &self.name
    }

    /// Typed tables take each field from the payload's stored text (`fields.rs`), with no
    /// parsed payload in between.
    fn takes_payload_text(&self) -> bool {
        true
    }

    async fn checkpoint(&self, consumer: &ConsumerId) -> Result<Seq, Error> {
        let partitions = self.connections.len();
        let seq = self
            .with_connection(0, async |conn| {
                self.checkpoints
                    .prepare(conn, &consumer.0, &self.checkpoint_key(), partitions)
                    .await
                    .map_err(|e| db(&self.name, "reading the checkpoint", e))
            })
            .await?;
        self.aligned.insert(consumer);
        Ok(seq)
    }

    async fn reset_checkpoint(&self, consumer: &ConsumerId) -> Result<(), Error> {
        self.with_connection(0, async |conn| {
            self.checkpoints
                .rewind(conn, &consumer.0, &self.checkpoint_key())
                .await
                .map_err(|e| db(&self.name, "resetting the checkpoint", e))
        })
        .await
    }

    async fn apply(&self, consumer: &ConsumerId, batch: &Batch) -> Result<(), Error> {
        if !self.aligned.contains(consumer) {
            self.checkpoint(consumer).await?;
        }
        let result = self.write(consumer, batch).await;
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
                e.problem(),
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

//! [`ConsumerTableTarget`]: the [`Target`] and [`Health`] implementation for the
//! consumer-table layout.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use sluice_core::sql::{qualified, quote_ident};
use sluice_core::{
    Batch, ConsumerId, EntityKind, EntityRef, Error, Health, HealthReport, HealthState, RecordKey,
    Seq, SslMode, Status, StreamEntry, Target,
};
use sluice_pg::Condition;
use sqlx::PgConnection;
use time::OffsetDateTime;

use super::apply::{
    PartitionOutcome, PartitionWrite, Planned, apply_partition, plan_partition, prepare_connection,
    table_key,
};
use super::statements::Statements;
use super::{ConsumerTable, Severity, Verification};
use crate::checkpoint::{Aligned, CHECKPOINT_TABLE, partition_of};
use crate::copy::NulReplacements;
use sluice_pg::catalog;
use sluice_pg::{ConnectionSettings, ssl_mode_name};

/// Writes consumers' records into one consumer table.
///
/// With `parallelism` N > 1, each batch is split by a hash of the record identity into N
/// partitions applied concurrently on N connections, each in its own transaction with its own
/// checkpoint row; a record always lands in the same partition, so per-record order holds, and
/// [`Target::checkpoint`] is the lowest partition checkpoint, so a crash between partitions
/// replays (idempotently) rather than skips.
pub struct ConsumerTableTarget {
    name: String,
    settings: ConnectionSettings,
    table: ConsumerTable,
    table_key: String,
    sql: Statements,
    connections: Vec<tokio::sync::Mutex<Option<PgConnection>>>,
    /// Per partition: its last batch found none of its keys in the table.
    all_new: Vec<AtomicBool>,
    health: Mutex<HealthState>,
    sanitized: Mutex<NulReplacements>,
    aligned: Aligned,
    /// Create the table (as the sync user) when missing, readable by this role.
    create_for: Option<String>,
    /// A connection has made sure the table exists (with `create_for`).
    created: AtomicBool,
}

impl std::fmt::Debug for ConsumerTableTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerTableTarget")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("table", &self.table)
            .field("parallelism", &self.connections.len())
            .finish()
    }
}

impl ConsumerTableTarget {
    /// A target named `name` writing `table` through `parallelism` connections (at least 1).
    /// Nothing connects until first use.
    pub fn new(
        name: impl Into<String>,
        settings: ConnectionSettings,
        table: ConsumerTable,
        parallelism: usize,
    ) -> Self {
        let name = name.into();
        let entity = EntityRef {
            kind: EntityKind::Target,
            name: name.clone(),
        };
        Self {
            table_key: table_key(&table),
            sql: Statements::new(&table),
            connections: (0..parallelism.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            all_new: (0..parallelism.max(1))
                .map(|_| AtomicBool::new(true))
                .collect(),
            health: Mutex::new(HealthState::new(entity)),
            sanitized: Mutex::new(NulReplacements::default()),
            aligned: Aligned::default(),
            create_for: None,
            created: AtomicBool::new(false),
            name,
            settings,
            table,
        }
    }

    /// Creates the table (and its schema) on first connection when it does not exist, as the
    /// sync user, and lets `read_role` read it. An existing table is never altered.
    pub fn create_if_missing(mut self, read_role: impl Into<String>) -> Self {
        self.create_for = Some(read_role.into());
        self
    }

    /// The table written.
    pub fn table(&self) -> &ConsumerTable {
        &self.table
    }

    /// The connection settings.
    pub fn settings(&self) -> &ConnectionSettings {
        &self.settings
    }

    /// Verifies the table on a fresh connection (see [`ConsumerTable::verify`]).
    pub async fn verify(&self) -> Result<Verification, Error> {
        let mut conn = self.settings.connect().await?;
        self.table
            .verify(&mut conn)
            .await
            .map_err(|e| write_error(&self.name, &self.table, &self.settings.user, e))
    }

    /// How many records so far had NUL characters replaced, and the last one's key.
    pub fn sanitized(&self) -> (u64, Option<RecordKey>) {
        let s = self.sanitized.lock().unwrap_or_else(|p| p.into_inner());
        (s.count, s.latest.clone())
    }

    async fn with_connection<T>(
        &self,
        slot: usize,
        work: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, Error> {
        let mut guard = self.connections[slot].lock().await;
        if guard.is_none() {
            let mut conn = self.settings.connect().await?;
            if let Some(read_role) = &self.create_for {
                self.table
                    .create_if_missing(&mut conn, read_role)
                    .await
                    .map_err(|e| write_error(&self.name, &self.table, &self.settings.user, e))?;
                self.created.store(true, Ordering::Relaxed);
            }
            prepare_connection(&mut conn, &self.sql)
                .await
                .map_err(|e| write_error(&self.name, &self.table, &self.settings.user, e))?;
            *guard = Some(conn);
        }
        let conn = guard
            .as_mut()
            .ok_or_else(|| Error::invalid("connection slot is empty"))?;
        match work(conn).await {
            Ok(value) => Ok(value),
            Err(e) => {
                // The connection may be mid-transaction or dead: start the next try afresh.
                *guard = None;
                Err(write_error(&self.name, &self.table, &self.settings.user, e))
            }
        }
    }

    /// Runs every health check now and returns the report.
    pub async fn check(&self) -> HealthReport {
        let now = OffsetDateTime::now_utc();
        let observations = self.observe().await;
        let mut state = self.health.lock().unwrap_or_else(|p| p.into_inner());
        for (name, status, message, fix) in observations {
            state.observe(name, status, message, fix, now);
        }
        state.report()
    }

    async fn observe(&self) -> Vec<(&'static str, Status, String, Option<String>)> {
        let mut out = Vec::new();
        let (status, message, fix) = self
            .sanitized
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check();
        out.push(("payload", status, message, fix));
        let started = Instant::now();
        let mut conn = match self.settings.connect().await {
            Ok(conn) => conn,
            Err(e) => {
                let fix = e.health_fix();
                out.push((e.check_name(), Status::Error, e.to_string(), fix));
                return out;
            }
        };
        let elapsed = started.elapsed().as_millis();
        out.push((
            "reachable",
            Status::Healthy,
            format!(
                "connected to {}:{} in {elapsed} ms",
                self.settings.host, self.settings.port
            ),
            None,
        ));
        out.push((
            "authenticated",
            Status::Healthy,
            format!("logged in as {}", self.settings.user),
            None,
        ));
        match self.observe_session(&mut conn).await {
            Ok(mut checks) => out.append(&mut checks),
            Err(e) => out.push((
                "privileges",
                Status::Error,
                write_error(&self.name, &self.table, &self.settings.user, e).to_string(),
                None,
            )),
        }
        out
    }

    async fn observe_session(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Vec<(&'static str, Status, String, Option<String>)>, sqlx::Error> {
        let mut out = Vec::new();
        let facts = catalog::server_facts(conn).await?;
        let mode = ssl_mode_name(self.settings.ssl_mode);
        out.push(match (self.settings.ssl_mode, facts.ssl) {
            (SslMode::Disable, false) => (
                "tls",
                Status::Healthy,
                "TLS disabled by configuration (sslmode=disable)".to_owned(),
                None,
            ),
            (SslMode::Prefer, false) => (
                "tls",
                Status::Warning,
                "connected without TLS: the server does not offer it (sslmode=prefer)".to_owned(),
                Some("enable TLS on the server, then use sslmode=verify-full".to_owned()),
            ),
            (_, true) => {
                let verified = match self.settings.ssl_mode {
                    SslMode::VerifyFull => "certificate and host name verified",
                    SslMode::VerifyCa => "certificate chain verified, host name not checked",
                    _ => "certificate not verified",
                };
                (
                    "tls",
                    Status::Healthy,
                    format!("TLS in use, {verified} (sslmode={mode})"),
                    None,
                )
            }
            (_, false) => (
                "tls",
                Status::Error,
                format!("sslmode={mode} but the session is not encrypted"),
                None,
            ),
        });

        let user = quote_ident(&self.settings.user);
        let schema = quote_ident(&self.table.schema);
        let privileges = sqlx::query!(
            r#"select has_schema_privilege(n.oid, 'USAGE') as "usage!",
                      has_schema_privilege(n.oid, 'CREATE') as "create!",
                      exists (select 1 from pg_class c where c.relnamespace = n.oid and c.relname = $2) as "has_checkpoints!"
               from pg_namespace n where n.nspname = $1"#,
            self.table.schema,
            CHECKPOINT_TABLE
        )
        .fetch_optional(&mut *conn)
        .await?;
        let may_create = privileges.as_ref().is_some_and(|p| p.usage && p.create);
        out.push(match privileges {
            None => (
                "privileges",
                Status::Error,
                format!("schema {schema} does not exist"),
                Some(format!("create schema {schema}; grant usage, create on schema {schema} to {user};")),
            ),
            Some(p) if !p.usage || (!p.create && !p.has_checkpoints) => (
                "privileges",
                Status::Error,
                format!(
                    "{user} needs usage and create on schema {schema} (create makes sluice's checkpoint table {})",
                    qualified(&self.table.schema, CHECKPOINT_TABLE)
                ),
                Some(format!("grant usage, create on schema {schema} to {user};")),
            ),
            Some(_) => ("privileges", Status::Healthy, format!("{user} may use schema {schema}"), None),
        });

        let verification = self.table.verify(conn).await?;
        // Not made yet: the first write makes it. (Once a connection has made it, a table
        // gone is an error: the rows written so far went with it.)
        let to_be_created = verification.missing
            && self.create_for.is_some()
            && may_create
            && !self.created.load(Ordering::Relaxed);
        let worst = verification.findings.first().map(|f| f.severity);
        let summary = |sev: Severity| -> (String, Option<String>) {
            let found: Vec<_> = verification.of(sev).collect();
            (
                found
                    .iter()
                    .map(|f| f.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                Some(
                    found
                        .iter()
                        .map(|f| f.fix.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
            )
        };
        out.push(match worst {
            _ if to_be_created => (
                "table",
                Status::Initializing,
                format!(
                    "{} is created when the consumer first writes",
                    self.table.qualified()
                ),
                None,
            ),
            None => (
                "table",
                Status::Healthy,
                format!("{} has the expected columns", self.table.qualified()),
                None,
            ),
            Some(Severity::Error) => {
                let (message, fix) = summary(Severity::Error);
                ("table", Status::Error, message, fix)
            }
            Some(Severity::Warning) => {
                let (message, fix) = summary(Severity::Warning);
                ("table", Status::Warning, message, fix)
            }
        });
        Ok(out)
    }
}

#[async_trait]
impl Health for ConsumerTableTarget {
    async fn health(&self) -> HealthReport {
        self.check().await
    }
}

#[async_trait]
impl Target for ConsumerTableTarget {
    fn name(&self) -> &str {
        &self.name
    }

    /// The payload column is the payload's JSON whole: the stream's text is written as it is.
    fn takes_payload_text(&self) -> bool {
        true
    }

    async fn checkpoint(&self, consumer: &ConsumerId) -> Result<Seq, Error> {
        let partitions = self.connections.len();
        let seq = self
            .with_connection(0, async |conn| {
                self.sql
                    .checkpoints
                    .prepare(conn, &consumer.0, &self.table_key, partitions)
                    .await
            })
            .await?;
        self.aligned.insert(consumer);
        Ok(seq)
    }

    async fn reset_checkpoint(&self, consumer: &ConsumerId) -> Result<(), Error> {
        self.with_connection(0, async |conn| {
            self.sql
                .checkpoints
                .rewind(conn, &consumer.0, &self.table_key)
                .await
        })
        .await
    }

    async fn apply(&self, consumer: &ConsumerId, batch: &Batch) -> Result<(), Error> {
        if !self.aligned.contains(consumer) {
            self.checkpoint(consumer).await?;
        }
        let planned = self.plan(batch);
        let written_at = crate::copy::pg_micros(OffsetDateTime::now_utc());
        let work = planned.iter().enumerate().map(|(p, planned)| {
            let write = PartitionWrite {
                consumer: &consumer.0,
                table: &self.table_key,
                partition: p,
                planned,
                written_at,
                through: batch.through,
                all_new: &self.all_new[p],
            };
            self.with_connection(p, async move |conn| {
                apply_partition(conn, &self.sql, &write).await
            })
        });
        let results: Vec<Result<PartitionOutcome, Error>> =
            futures_util::future::join_all(work).await;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(outcome) if outcome.applied => {
                    self.sanitized
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .add(&outcome.sanitized);
                }
                Ok(_) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

impl ConsumerTableTarget {
    /// Splits a batch by identity hash and plans each partition's rows (the newest version of
    /// each key, with its row id: a SHA-1 each): on one thread for one partition, on a thread
    /// per partition otherwise.
    fn plan<'a>(&self, batch: &'a Batch) -> Vec<Planned<'a>> {
        let n = self.connections.len();
        let mut partitions: Vec<Vec<&StreamEntry>> = vec![Vec::new(); n];
        for entry in &batch.entries {
            partitions[partition_of(&entry.record.key, n)].push(entry);
        }
        if n == 1 {
            return vec![plan_partition(&partitions[0])];
        }
        crate::copy::map_in_parallel(&partitions, |entries| plan_partition(entries))
    }
}

/// Classifies a failed write by what the caller should do.
pub(crate) fn write_error(
    target: &str,
    table: &ConsumerTable,
    user: &str,
    error: sqlx::Error,
) -> Error {
    let name = table.qualified();
    let user = quote_ident(user);
    let what = format!("target {target:?}: writing {name}");
    sluice_pg::classify(error, &what, |condition, db| {
        let message = db.message();
        Some(match condition {
            Condition::InsufficientPrivilege => Error::configuration(
                format!("target {target:?}: permission denied writing {name}: {message}"),
                format!(
                    "grant usage, create on schema {schema} to {user}; grant select, insert, update, delete on table {name} to {user};",
                    schema = quote_ident(&table.schema)
                ),
            ),
            Condition::UndefinedObject
                if message.contains(&format!("relation \"{}\"", table.table))
                    || message
                        .contains(&format!("relation \"{}.{}\"", table.schema, table.table)) =>
            {
                Error::configuration(
                    format!("target {target:?}: table {name} does not exist"),
                    table.ddl(),
                )
            }
            Condition::UndefinedObject if message.contains("column") => Error::configuration(
                format!(
                    "target {target:?}: {name} does not have the consumer table's shape: {message}"
                ),
                "run `sluice check` to see each column to fix",
            ),
            Condition::WrongShape => Error::configuration(
                format!(
                    "target {target:?}: {name} does not have the consumer table's shape: {message}"
                ),
                "run `sluice check` to see each column to fix",
            ),
            Condition::IntegrityViolation | Condition::DuplicateKey
                if message.contains(CHECKPOINT_TABLE) =>
            {
                Error::invalid(format!(
                    "target {target:?}: sluice's checkpoint table rejected a write: {message}"
                ))
            }
            Condition::IntegrityViolation | Condition::DuplicateKey => Error::configuration(
                format!(
                    "target {target:?}: a constraint on {name} rejected a write ({message}). Consumer tables \
                     must not carry constraints, foreign keys or triggers of their own: sluice guarantees \
                     ordering per record, not across records"
                ),
                format!(
                    "drop the constraint named in the message (alter table {name} drop constraint …;) — \
                     `sluice check` lists every one"
                ),
            ),
            Condition::DataException => Error::invalid(format!(
                "target {target:?}: a record could not be stored in {name}: {message} (SQLSTATE {})",
                db.code().unwrap_or_default()
            )),
            _ => return None,
        })
    })
}

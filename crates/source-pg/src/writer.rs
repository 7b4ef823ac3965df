//! The writer of a PostgreSQL source: the write-back proxy's changes applied to the source
//! table through a connection of its own, as a role meant for it (docs/proxy.md gives its
//! grants: `SELECT, INSERT, UPDATE, DELETE` on the published tables, nothing else).
//!
//! One statement's changes go in one transaction, so they are applied all or none. Nothing is
//! appended to the stream here: the change comes back through replication like any other,
//! with its commit's version, and [`Written::arriving`] says which version to wait for. The
//! position is read inside the transaction after the rows are locked, so any other change to
//! those rows committed before it, and the version waited for is this change's or a newer one.

use async_trait::async_trait;
use sluice_core::sql::quote_ident;
use sluice_core::{
    CollectionId, RecordKey, RefusalKind, SyncId, UpstreamChange, UpstreamId, Version,
    WriteOutcome, WriteRefused, Writer, Written,
};
use sluice_pg::ConnectionSettings;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};

use crate::wire::Lsn;

/// Applies the proxy's changes to a PostgreSQL source's tables.
pub struct PgWriter {
    sync_id: SyncId,
    settings: ConnectionSettings,
    connection: tokio::sync::Mutex<Option<PgConnection>>,
}

impl std::fmt::Debug for PgWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgWriter")
            .field("sync_id", &self.sync_id)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// `value` as a string constant, whatever `standard_conforming_strings` says; `NULL` for none.
fn literal(value: Option<&str>) -> String {
    value.map_or_else(|| "NULL".into(), sluice_core::sql::quote_literal_escaped)
}

fn refused(kind: RefusalKind, message: impl Into<String>) -> WriteRefused {
    WriteRefused::new(kind, message)
}

impl PgWriter {
    /// A writer for sync `sync_id` connecting as `settings` says (the writer role).
    pub fn new(sync_id: SyncId, settings: ConnectionSettings) -> Self {
        Self {
            sync_id,
            settings,
            connection: tokio::sync::Mutex::new(None),
        }
    }

    /// The table of `collection` (`schema.table`) and its key columns, from the catalog.
    async fn table(
        conn: &mut PgConnection,
        collection: &CollectionId,
    ) -> Result<(String, Vec<String>), WriteRefused> {
        let rows = sqlx::query(
            "select n.nspname::text, c.relname::text, a.attname::text
               from pg_catalog.pg_class c
               join pg_catalog.pg_namespace n on n.oid = c.relnamespace
               join pg_catalog.pg_index i on i.indrelid = c.oid and i.indisprimary
               join lateral unnest(i.indkey) with ordinality k(attnum, position) on true
               join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attnum = k.attnum
              where n.nspname || '.' || c.relname = $1
              order by k.position",
        )
        .bind(&collection.0)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| {
            refused(
                RefusalKind::Unavailable,
                format!("reading the catalog: {e}"),
            )
        })?;
        let Some(first) = rows.first() else {
            return Err(refused(
                RefusalKind::NotConfigured,
                format!(
                    "the source has no table {} with a primary key that the writer role can see",
                    collection.0
                ),
            ));
        };
        let table = format!(
            "{}.{}",
            quote_ident(first.get::<&str, _>(0)),
            quote_ident(first.get::<&str, _>(1))
        );
        Ok((table, rows.iter().map(|r| r.get::<String, _>(2)).collect()))
    }

    /// Applies `changes` in one transaction on `conn`: the ids and the position to wait for.
    async fn transaction(
        conn: &mut PgConnection,
        collection: &CollectionId,
        changes: &[UpstreamChange],
    ) -> Result<(Vec<UpstreamId>, Lsn), WriteRefused> {
        let (table, key) = Self::table(conn, collection).await?;
        let returning: Vec<String> = key
            .iter()
            .map(|k| format!("{}::text", quote_ident(k)))
            .collect();
        let returning = returning.join(", ");
        let mut tx = conn.begin().await.map_err(|e| {
            refused(
                RefusalKind::Unavailable,
                format!("starting a transaction: {e}"),
            )
        })?;
        let mut ids = Vec::with_capacity(changes.len());
        for change in changes {
            let matches = |id: &UpstreamId| -> Result<String, WriteRefused> {
                let values = id.key_values(key.len()).ok_or_else(|| {
                    refused(
                        RefusalKind::Rejected,
                        format!("{id:?} is not a key of {table}"),
                    )
                })?;
                Ok(key
                    .iter()
                    .zip(&values)
                    .map(|(k, v)| format!("{} = {}", quote_ident(k), literal(Some(v))))
                    .collect::<Vec<_>>()
                    .join(" and "))
            };
            let sql = match change {
                UpstreamChange::Insert { values } if values.is_empty() => {
                    format!("insert into {table} default values returning {returning}")
                }
                UpstreamChange::Insert { values } => {
                    let columns: Vec<String> = values.keys().map(|c| quote_ident(c)).collect();
                    let literals: Vec<String> = values
                        .values()
                        .map(|v| literal(v.text.as_deref()))
                        .collect();
                    format!(
                        "insert into {table} ({}) values ({}) returning {returning}",
                        columns.join(", "),
                        literals.join(", ")
                    )
                }
                UpstreamChange::Update { id, values } => {
                    let set: Vec<String> = values
                        .iter()
                        .map(|(c, v)| {
                            format!("{} = {}", quote_ident(c), literal(v.text.as_deref()))
                        })
                        .collect();
                    format!(
                        "update {table} set {} where {} returning {returning}",
                        set.join(", "),
                        matches(id)?
                    )
                }
                UpstreamChange::Delete { id } => {
                    format!(
                        "delete from {table} where {} returning {returning}",
                        matches(id)?
                    )
                }
            };
            let row = sqlx::query(AssertSqlSafe(sql))
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| match e.as_database_error() {
                    Some(db) => {
                        let mut r = refused(RefusalKind::Rejected, db.message().to_owned());
                        if let Some(code) = db.code() {
                            r = r.code(code.into_owned());
                        }
                        r
                    }
                    None => refused(
                        RefusalKind::Unavailable,
                        format!("{e}; nothing was applied"),
                    ),
                })?;
            let Some(row) = row else {
                let id = match change {
                    UpstreamChange::Update { id, .. } | UpstreamChange::Delete { id } => {
                        id.0.as_str()
                    }
                    UpstreamChange::Insert { .. } => "",
                };
                return Err(refused(
                    RefusalKind::Rejected,
                    format!("no row with key {id} in {table} (it was deleted upstream)"),
                ));
            };
            let key_values: Vec<String> = (0..key.len()).map(|i| row.get::<String, _>(i)).collect();
            let key_values: Vec<&str> = key_values.iter().map(String::as_str).collect();
            ids.push(UpstreamId::from_key(&key_values));
        }
        let position: String =
            sqlx::query_scalar("select pg_catalog.pg_current_wal_insert_lsn()::text")
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| {
                    refused(
                        RefusalKind::Unavailable,
                        format!("{e}; nothing was applied"),
                    )
                })?;
        tx.commit().await.map_err(|e| {
            refused(RefusalKind::Unavailable, format!("the commit's outcome is unknown ({e}); check the source table before writing again"))
        })?;
        let lsn = position.parse::<Lsn>().map_err(|e| {
            refused(
                RefusalKind::Unavailable,
                format!("reading the position: {e}"),
            )
        })?;
        Ok((ids, lsn))
    }
}

#[async_trait]
impl Writer for PgWriter {
    async fn apply(&self, collection: &CollectionId, changes: &[UpstreamChange]) -> WriteOutcome {
        let mut connection = self.connection.lock().await;
        if connection.is_none() {
            match self.settings.connect().await {
                Ok(conn) => *connection = Some(conn),
                Err(e) => {
                    return WriteOutcome {
                        written: Written::default(),
                        applied: 0,
                        refused: Some(refused(
                            RefusalKind::NotConfigured,
                            format!(
                                "the writer cannot connect to the source: {}. {}",
                                e,
                                e.fix()
                            ),
                        )),
                    };
                }
            }
        }
        let conn = connection.as_mut().expect("connected above");
        match Self::transaction(conn, collection, changes).await {
            Ok((ids, lsn)) => WriteOutcome {
                applied: ids.len(),
                written: Written {
                    records: Vec::new(),
                    arriving: ids
                        .iter()
                        .map(|id| {
                            (
                                RecordKey::new(self.sync_id, collection.0.as_str(), id.0.as_str()),
                                Version::new(lsn.0, 0),
                            )
                        })
                        .collect(),
                    ids,
                },
                refused: None,
            },
            Err(why) => {
                if why.kind == RefusalKind::Unavailable {
                    *connection = None;
                }
                WriteOutcome {
                    written: Written::default(),
                    applied: 0,
                    refused: Some(why),
                }
            }
        }
    }
}

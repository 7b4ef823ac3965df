//! What a write to a synced table does, upstream first.
//!
//! A statement that may write a synced table (its text names one) is looked at closely: its
//! table is resolved in the client's session (its `search_path`), and if sluice writes that
//! table, the proxy applies the statement itself:
//!
//! 1. refuses what cannot be applied upstream (a form, a transaction, a read-only column);
//! 2. reads the rows it touches as the client, with the client's privileges and row-level
//!    security (`SELECT … FOR UPDATE` over the statement's own `WHERE`), the new values cast
//!    to the columns' types as the assignment would;
//! 3. refuses statements over the row limit before anything is sent;
//! 4. sends each change upstream through the sync's [`sluice_core::Writer`];
//! 5. shows what the upstream accepted locally: the records go into the stream (or arrive
//!    through the source's own feed) and the proxy waits until the consumers writing the
//!    table have applied them, so the client's next read sees its write;
//! 6. answers like PostgreSQL would: `RETURNING` rows, the command tag, or an error naming
//!    the upstream's message (and how many rows were applied before it).

use std::collections::HashMap;

use bytes::{BufMut, BytesMut};
use sluice_core::sql::quote_ident;
use sluice_core::{
    Column, RefusalKind, UpstreamChange, UpstreamId, WriteOutcome, WriteRefused, Written,
};
use sluice_pg::sqlstate;
use tokio::io::AsyncWriteExt;

use crate::catalog::{Layout, SyncWriter, SyncedTable, noun};
use crate::consumer_table;
use crate::internal::{Outcome, Params, Query, Rows};
use crate::session::Session;
use crate::statement::{self, Relation, Verb, literal};
use crate::wire::{self, Message, Report, WireError};

/// A write to a synced table, resolved.
pub(crate) struct Resolved {
    pub table: SyncedTable,
    pub relation: Relation,
    pub verb: Verb,
    pub statement: Box<pg_query::protobuf::Node>,
}

/// Why a write failed, as the client is told.
pub(crate) enum Failure {
    /// The proxy's own error.
    Report(Report),
    /// The target's error, forwarded as it came.
    Target(Message),
}

/// A write's answer.
pub(crate) struct Reply {
    returning: Option<Rows>,
    tag: String,
    warning: Option<Report>,
}

impl Session {
    /// Applies a resolved write (see the module's steps). `Err` only when a connection broke.
    pub(crate) async fn apply(
        &mut self,
        w: &Resolved,
        params: &Params,
        result_formats: &[i16],
        simple: bool,
    ) -> Result<Result<Reply, Failure>, WireError> {
        let write_back = self.shared.write_back.clone().expect("checked in may_take");
        let table = &w.table;
        let qualified = format!(
            "{}.{}",
            quote_ident(&table.schema),
            quote_ident(&table.table)
        );
        let refuse = |report: Report| Ok(Err(Failure::Report(report)));
        if let Layout::Mirror { sync, .. } = &table.layout
            && let Err(why) = &sync.writer
        {
            return refuse(
                Report::error(sqlstate::FEATURE_NOT_SUPPORTED, format!("{qualified} is synced by sluice and its upstream does not take writes: {why}"))
                    .hint("configure a writer for the sync (docs/proxy.md)"),
            );
        }
        match self.status {
            b'T' if !write_back.writes_in_transactions => {
                return refuse(
                    Report::error(sqlstate::INVALID_TRANSACTION_STATE, format!("cannot {} synced table {qualified} inside a transaction block: the upstream change cannot be rolled back", w.verb.word()))
                        .hint("run it outside BEGIN … COMMIT, or set writes_in_transactions = true under [proxy] to apply each such statement at once"),
                );
            }
            b'E' => {
                return refuse(Report::error(
                    sqlstate::INVALID_TRANSACTION_STATE,
                    "current transaction is aborted, commands ignored until end of transaction block",
                ));
            }
            _ => {}
        }
        let in_transaction = self.status == b'T';

        // The table's columns and types, as the client sees them.
        let columns = match self.exchange(&[Query::text(format!(
            "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a WHERE a.attrelid = pg_catalog.to_regclass({}) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            literal(&qualified)
        ))]).await? {
            Outcome::Done(rows) => rows.first().map(Rows::texts).transpose()?.unwrap_or_default(),
            Outcome::Failed { error, .. } => return Ok(Err(Failure::Target(error))),
        };
        let order: Vec<String> = columns
            .iter()
            .filter_map(|c| c.first().cloned().flatten())
            .collect();
        let types: HashMap<String, String> = columns
            .into_iter()
            .filter_map(|c| {
                let mut c = c.into_iter();
                Some((c.next()??, c.next()??))
            })
            .collect();

        // The query for the rows, and the columns it writes. A consumer table's update also
        // reads the old payload, to send only what changed.
        let key: Vec<String> = match &table.layout {
            Layout::Mirror { key, .. } => key.clone(),
            Layout::ConsumerTable { .. } => consumer_table::KEY.map(str::to_owned).to_vec(),
        };
        let mut read_key = key.clone();
        if matches!(table.layout, Layout::ConsumerTable { .. }) && w.verb == Verb::Update {
            read_key.push("payload".into());
        }
        let built = match w.verb {
            Verb::Update => statement::update_rows(&w.statement, &read_key, &types)
                .map(|(sql, cols)| (Some(sql), cols, Vec::new())),
            Verb::Delete => statement::delete_rows(&w.statement, &key)
                .map(|sql| (Some(sql), Vec::new(), Vec::new())),
            Verb::Insert => statement::insert_rows(&w.statement, &order, &types)
                .map(|r| (r.sql, r.columns, r.defaults)),
        };
        let (rows_sql, written_columns, defaults) = match built {
            Ok(built) => built,
            Err(why) => {
                return refuse(Report::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!("{qualified}: {why}"),
                ));
            }
        };
        let read_only = match &table.layout {
            Layout::Mirror {
                sync, collection, ..
            } => sync
                .writer
                .as_ref()
                .map(|writer| writer.read_only_columns(collection, w.verb.word()))
                .unwrap_or_default(),
            Layout::ConsumerTable { .. } => consumer_table::read_only(w.verb),
        };
        if let Some(column) = written_columns.iter().find(|c| read_only.contains(c)) {
            return refuse(
                Report::error(
                    sqlstate::GENERATED_ALWAYS,
                    format!(
                        "column {} of {qualified} cannot be written: the upstream sets it",
                        quote_ident(column)
                    ),
                )
                .hint(match table.layout {
                    Layout::Mirror { .. } => "leave the column out of the statement",
                    Layout::ConsumerTable { .. } => {
                        "write the record in payload (and its sync_id and collection_id on insert)"
                    }
                }),
            );
        }
        if w.verb == Verb::Update
            && let Some(column) = written_columns.iter().find(|c| key.contains(c))
        {
            return refuse(
                Report::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "changing key column {} of {qualified} is not supported",
                        quote_ident(column)
                    ),
                )
                .hint("delete the row and insert a new one"),
            );
        }

        // As the client: its privileges, then its rows (under fixed output settings).
        let privilege = match w.verb {
            Verb::Delete => format!(
                "SELECT 'delete' WHERE NOT pg_catalog.has_table_privilege(pg_catalog.to_regclass({}), 'DELETE')",
                literal(&qualified)
            ),
            verb if written_columns.is_empty() => format!(
                "SELECT '{}' WHERE NOT pg_catalog.has_table_privilege(pg_catalog.to_regclass({}), '{}')",
                verb.word(),
                literal(&qualified),
                verb.word().to_uppercase()
            ),
            verb => {
                let values: Vec<String> = written_columns
                    .iter()
                    .map(|c| format!("({})", literal(c)))
                    .collect();
                format!(
                    "SELECT c FROM (VALUES {}) v(c) WHERE NOT pg_catalog.has_column_privilege(pg_catalog.to_regclass({}), c, '{}')",
                    values.join(", "),
                    literal(&qualified),
                    verb.word().to_uppercase()
                )
            }
        };
        let mut queries = Vec::new();
        if in_transaction {
            queries.push(Query::text("SAVEPOINT _sluice_proxy"));
        }
        queries.push(Query::text(
            "SELECT pg_catalog.set_config('datestyle', 'ISO, MDY', true), pg_catalog.set_config('intervalstyle', 'postgres', true), pg_catalog.set_config('timezone', 'UTC', true), pg_catalog.set_config('extra_float_digits', '3', true), pg_catalog.set_config('bytea_output', 'hex', true)",
        ));
        let privilege_at = queries.len();
        queries.push(Query::text(privilege));
        let rows_at = queries.len();
        if let Some(sql) = &rows_sql {
            queries.push(Query {
                sql: sql.clone(),
                params: params.clone(),
                result_formats: Vec::new(),
            });
        }
        if in_transaction {
            queries.push(Query::text("ROLLBACK TO SAVEPOINT _sluice_proxy"));
            queries.push(Query::text("RELEASE SAVEPOINT _sluice_proxy"));
        }
        let results = match self.exchange(&queries).await? {
            Outcome::Done(results) => results,
            Outcome::Failed { error, .. } => return Ok(Err(Failure::Target(error))),
        };
        if let Some(denied) = results[privilege_at]
            .texts()?
            .first()
            .and_then(|r| r.first().cloned().flatten())
        {
            let what = if matches!(denied.as_str(), "insert" | "update" | "delete") {
                format!("permission denied to {denied} {qualified}")
            } else {
                format!(
                    "permission denied to {} column {} of {qualified}",
                    w.verb.word(),
                    quote_ident(&denied)
                )
            };
            return refuse(Report::error(sqlstate::INSUFFICIENT_PRIVILEGE, what));
        }
        let rows: Vec<Vec<Option<String>>> = match &rows_sql {
            Some(_) => results[rows_at].texts()?,
            None => vec![Vec::new()],
        };
        let syncs: Vec<&SyncWriter> = match &table.layout {
            Layout::Mirror { sync, .. } => vec![sync],
            Layout::ConsumerTable { syncs } => syncs.iter().collect(),
        };
        let limit = write_back.max_rows_per_statement.unwrap_or_else(|| {
            syncs
                .iter()
                .filter_map(|s| s.writer.as_ref().ok())
                .map(|w| w.max_rows_per_statement())
                .min()
                .unwrap_or(1_000)
        });
        if rows.len() as u64 > limit {
            return refuse(
                Report::error(sqlstate::PROGRAM_LIMIT_EXCEEDED, format!("this {} touches {} rows of {qualified}; one statement may write at most {limit} upstream", w.verb.word().to_uppercase(), rows.len()))
                    .hint("write fewer rows per statement, or raise max_rows_per_statement under [proxy]"),
            );
        }

        // The rows a DELETE … RETURNING returns are read before they go.
        let mut returning = None;
        if w.verb == Verb::Delete
            && let Ok(Some(sql)) = statement::delete_returning(&w.statement)
        {
            match self
                .exchange(&[Query {
                    sql,
                    params: params.clone(),
                    result_formats: result_formats.to_vec(),
                }])
                .await?
            {
                Outcome::Done(mut r) => returning = r.pop(),
                Outcome::Failed { error, .. } => return Ok(Err(Failure::Target(error))),
            }
        }

        // The changes, each with the sync and collection it goes to.
        let changes = match &table.layout {
            Layout::Mirror {
                sync, collection, ..
            } => {
                let column = |name: &String, value: &Option<String>| Column {
                    text: value.clone(),
                    sql_type: types.get(name).cloned().unwrap_or_default(),
                };
                let mut changes = Vec::with_capacity(rows.len());
                for (i, row) in rows.iter().enumerate() {
                    let change = match w.verb {
                        Verb::Insert => UpstreamChange::Insert {
                            values: written_columns
                                .iter()
                                .zip(row)
                                .enumerate()
                                .filter(|(c, _)| {
                                    !defaults
                                        .get(i)
                                        .and_then(|d| d.get(*c))
                                        .copied()
                                        .unwrap_or(false)
                                })
                                .map(|(_, (name, value))| (name.clone(), column(name, value)))
                                .collect(),
                        },
                        verb => {
                            let values: Option<Vec<&str>> =
                                row[..key.len()].iter().map(|v| v.as_deref()).collect();
                            let Some(values) = values else {
                                return refuse(Report::error(
                                    sqlstate::FEATURE_NOT_SUPPORTED,
                                    format!(
                                        "a row of {qualified} has a NULL key, so it has no upstream record"
                                    ),
                                ));
                            };
                            let id = UpstreamId::from_key(&values);
                            if verb == Verb::Delete {
                                UpstreamChange::Delete { id }
                            } else {
                                UpstreamChange::Update {
                                    id,
                                    values: written_columns
                                        .iter()
                                        .zip(&row[key.len()..])
                                        .map(|(name, value)| (name.clone(), column(name, value)))
                                        .collect(),
                                }
                            }
                        }
                    };
                    changes.push(((*sync).clone(), collection.clone(), change));
                }
                changes
            }
            Layout::ConsumerTable { syncs } => {
                match consumer_table::changes(w.verb, syncs, &written_columns, &defaults, &rows) {
                    Ok(changes) => changes,
                    Err(why) => {
                        return refuse(Report::error(
                            sqlstate::FEATURE_NOT_SUPPORTED,
                            format!("{qualified}: {why}"),
                        ));
                    }
                }
            }
        };

        // Upstream, in order: each run of rows for one sync and collection in one call.
        let mut written = Written::default();
        let mut applied = 0;
        let mut applied_keys: Vec<Vec<String>> = Vec::new();
        let mut refused = None;
        let mut start = 0;
        while start < changes.len() && refused.is_none() {
            let (sync, collection, _) = &changes[start];
            let end = changes[start..]
                .iter()
                .position(|(s, c, _)| s.sync_id != sync.sync_id || c != collection)
                .map_or(changes.len(), |n| start + n);
            let group: Vec<UpstreamChange> = changes[start..end]
                .iter()
                .map(|(_, _, c)| c.clone())
                .collect();
            let outcome = match &sync.writer {
                Ok(writer) => writer.apply(collection, &group).await,
                Err(why) => WriteOutcome {
                    written: Written::default(),
                    applied: 0,
                    refused: Some(WriteRefused::new(RefusalKind::NotConfigured, why.clone())),
                },
            };
            for id in &outcome.written.ids {
                applied_keys.push(match &table.layout {
                    Layout::Mirror { .. } => id.key_values(key.len()).unwrap_or_default(),
                    Layout::ConsumerTable { .. } => {
                        vec![sync.sync_id.to_string(), collection.0.clone(), id.0.clone()]
                    }
                });
            }
            applied += outcome.applied;
            written.records.extend(outcome.written.records);
            written.arriving.extend(outcome.written.arriving);
            written.ids.extend(outcome.written.ids);
            if let Some(why) = outcome.refused {
                refused = Some((why, collection.clone()));
            }
            start = end;
        }
        if in_transaction && applied > 0 {
            self.send_notice(&Report {
                severity: "NOTICE",
                ..Report::error(sqlstate::SUCCESSFUL_COMPLETION, format!("{applied} row(s) of {qualified} were applied upstream at once; a ROLLBACK will not undo them"))
            })
            .await?;
        }
        tracing::info!(
            table = %qualified,
            verb = w.verb.word(),
            user = self.user,
            applied,
            refused = refused.is_some(),
            "proxy: write applied upstream"
        );

        // Then locally.
        let warning = self
            .show_locally(table, &written)
            .await
            .err()
            .map(|why| Report {
                severity: "WARNING",
                ..Report::error(
                    sqlstate::WARNING,
                    format!("applied upstream, but not yet in {qualified}: {why}"),
                )
            });
        if let Some((refused, collection)) = refused {
            let code = match refused.kind {
                RefusalKind::Rejected => match refused.code.as_deref() {
                    Some(code)
                        if code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric()) =>
                    {
                        sqlstate::from_upstream(code)
                    }
                    _ => sqlstate::INVALID_PARAMETER_VALUE,
                },
                RefusalKind::ReadOnlyColumn => sqlstate::GENERATED_ALWAYS,
                RefusalKind::Unavailable => sqlstate::CONNECTION_FAILURE,
                RefusalKind::NotConfigured => sqlstate::FEATURE_NOT_SUPPORTED,
            };
            let mut message = format!(
                "Error {} {}: {}",
                w.verb.ing(),
                noun(&collection),
                refused.message
            );
            if changes.len() > 1 {
                message.push_str(&format!(
                    " ({applied} of {} rows were applied upstream before this one, and locally too)",
                    changes.len()
                ));
            }
            let mut report = Report::error(code, message);
            if let Some(code) = &refused.code {
                report = report.detail(format!("upstream error code: {code}"));
            }
            if let Some(warning) = warning {
                self.send_notice(&warning).await?;
            }
            return refuse(report);
        }

        // RETURNING, as the client asked for it.
        if w.verb != Verb::Delete
            && statement::has_returning(&w.statement)
            && let Ok(Some(sql)) =
                statement::returning_by_key(&w.statement, &w.relation, &key, &applied_keys)
        {
            let formats = if simple {
                Vec::new()
            } else {
                result_formats.to_vec()
            };
            match self
                .exchange(&[Query {
                    sql,
                    params: params.clone(),
                    result_formats: formats,
                }])
                .await?
            {
                Outcome::Done(mut r) => returning = r.pop(),
                Outcome::Failed { error, .. } => return Ok(Err(Failure::Target(error))),
            }
        }
        Ok(Ok(Reply {
            returning,
            tag: w.verb.tag(applied),
            warning,
        }))
    }

    async fn send_notice(&mut self, report: &Report) -> Result<(), WireError> {
        let mut out = BytesMut::new();
        report.encode_notice(&mut out);
        self.client.write_all(&out).await?;
        Ok(())
    }

    /// Sends a write's answer: rows, tag (and `ReadyForQuery` in the simple protocol), or the
    /// error. After an error inside an explicit transaction the transaction is failed, as an
    /// error there always fails it.
    pub(crate) async fn answer(
        &mut self,
        result: Result<Reply, Failure>,
        simple: bool,
    ) -> Result<(), WireError> {
        let mut out = BytesMut::new();
        match result {
            Ok(reply) => {
                if let Some(warning) = &reply.warning {
                    warning.encode_notice(&mut out);
                }
                if let Some(rows) = reply.returning {
                    if simple && let Some(description) = &rows.description {
                        out.extend_from_slice(&description.raw);
                    }
                    for row in &rows.rows {
                        out.extend_from_slice(&row.raw);
                    }
                }
                let mut tag = BytesMut::new();
                tag.put_slice(reply.tag.as_bytes());
                tag.put_u8(0);
                wire::encode_raw(b'C', &tag, &mut out);
            }
            Err(failure) => {
                if self.status == b'T' {
                    // Fail the client's transaction, as the statement would have.
                    let _ = self.exchange(&[Query::text("SELECT 1/0")]).await?;
                }
                match failure {
                    Failure::Report(report) => report.encode_error(&mut out),
                    Failure::Target(error) => out.extend_from_slice(&error.raw),
                }
                if !simple {
                    self.skipping_to_sync = true;
                }
            }
        }
        if simple {
            wire::encode_raw(b'Z', &[self.status], &mut out);
        }
        self.client.write_all(&out).await?;
        Ok(())
    }
}

//! What the source reads from tables beside the change stream: backfills (whole tables, at
//! start, when a table joins the publication or gains a column with a default) and re-reads of
//! single rows whose unchanged TOAST value no earlier version holds.

use std::sync::Arc;

use sluice_core::{Error, ErrorClass, Provider};
use sqlx::PgConnection;

use super::streaming::KeyRereads;
use super::{Aborting, PostgresSource, connect};
use crate::tables::{self, Backfill, Table};
use crate::values::TypeMap;

impl PostgresSource {
    /// Starts reading every table of `tables` the stored backfill state has not finished. The
    /// change stream logs what it sees while this runs, for the watermarks.
    pub(super) fn spawn_backfill(
        &self,
        types: Arc<TypeMap>,
        tables: Vec<Table>,
    ) -> Aborting<Result<(), Error>> {
        // Logged from before the first page is read: a change that page cannot see may
        // arrive before the page does.
        let logging = WatermarkUse::new(self);
        let backfilling = Backfilling::new(self);
        let this = self.clone();
        Aborting(tokio::spawn(async move {
            let _backfilling = backfilling;
            let mut conns = vec![connect(&this.inner.settings).await?];
            for _ in 1..this.inner.options.backfill_readers.max(1) {
                match connect(&this.inner.settings).await {
                    Ok(conn) => conns.push(conn),
                    Err(e) => {
                        tracing::warn!(sync = %this.inner.name, readers = conns.len(), error = %e, "backfill: fewer parallel readers than configured (a connection failed)");
                        break;
                    }
                }
            }
            let _logging = logging;
            this.backfill(&types).run(&mut conns, &tables).await
        }))
    }

    /// Reads the queued rows again (their unchanged TOAST values were nowhere in the stream)
    /// and appends them; the slot is held before their changes until this has finished.
    pub(super) fn spawn_reread(
        &self,
        types: Arc<TypeMap>,
        queued: KeyRereads,
    ) -> Aborting<Result<usize, Error>> {
        let this = self.clone();
        Aborting(tokio::spawn(async move {
            let _logging = queued.logging;
            let mut conn = connect(&this.inner.settings).await?;
            let backfill = this.backfill(&types);
            let mut appended = 0;
            for (table, keys) in queued.queue.values() {
                let keys: Vec<Vec<String>> = keys.iter().cloned().collect();
                match backfill.reread_keys(&mut conn, table, &keys).await {
                    Ok(n) => appended += n,
                    Err(e) if e.class() == ErrorClass::FixConfiguration => {
                        // The table cannot be read at all: it is read whole once it can be,
                        // which covers these rows (and stamps them later than their changes).
                        let collection = table.collection();
                        tracing::warn!(sync = %this.inner.name, collection, error = %e, "source: cannot read rows again");
                        this.inner
                            .rereads
                            .request(&this.inner.stream, &collection)
                            .await?;
                        backfill.set_unreadable(&collection, Some(e));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(appended)
        }))
    }

    pub(super) fn backfill<'a>(&'a self, types: &'a TypeMap) -> Backfill<'a> {
        let inner = &self.inner;
        Backfill {
            sync_id: inner.sync_id,
            stream: &inner.stream,
            types,
            page: inner.options.backfill_page,
            owner: format!("{}/backfill", inner.sync_id.0),
            progress: &inner.progress,
            watermarks: &inner.watermarks,
            rereads: &inner.rereads,
            role: &inner.settings.user,
            unreadable: &inner.unreadable,
        }
    }

    /// Tables the backfill could not read: what is wrong (one line) and the fix, per table.
    pub(super) fn unreadable(&self) -> Vec<(String, Option<String>)> {
        self.inner
            .unreadable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|e| {
                let problem = e.problem();
                let fix = match e.class() {
                    ErrorClass::GiveUp => Some(
                        "correct the rows upstream (the message says what the server refused), then restart sluice (or change the sync in the config): the table is read again".to_owned(),
                    ),
                    _ => e.fix().map(str::to_owned),
                };
                (problem, fix)
            })
            .collect()
    }

    /// Whether some table waits for a fix (the next backfill tries it again; tables whose
    /// data was refused are not asked for again).
    pub(super) fn has_unreadable(&self) -> bool {
        self.inner
            .unreadable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|e| e.class() == ErrorClass::FixConfiguration)
    }

    /// Asks for `now`'s table to be read again when it gained columns that hold values no
    /// change carried (see [`Table::columns_with_values_no_change_carried`]).
    pub(super) async fn reread_if_columns_need_it(
        &self,
        before: &Table,
        now: &Table,
    ) -> Result<(), Error> {
        let added = now.columns_with_values_no_change_carried(before);
        if !added.is_empty() {
            tracing::info!(
                sync = %self.inner.name,
                collection = %now.collection(),
                columns = ?added,
                "source: columns added with a default; reading the table again for their values"
            );
            self.inner
                .rereads
                .request(&self.inner.stream, &now.collection())
                .await?;
        }
        Ok(())
    }

    /// Compares the known tables' columns with the catalog (one query), and handles a table
    /// whose columns changed with no change sent since: its shape is stored, and it is read
    /// again when a new column holds values.
    pub(super) async fn find_added_columns(
        &self,
        conn: &mut PgConnection,
        tables: &mut [Table],
    ) -> Result<(), Error> {
        let oids: Vec<i64> = tables.iter().map(|t| i64::from(t.oid)).collect();
        let counts = tables::column_counts(conn, &oids).await?;
        for known in tables.iter_mut() {
            if counts
                .get(&known.oid)
                .copied()
                .unwrap_or(known.columns.len())
                == known.columns.len()
            {
                continue;
            }
            let Some(now) =
                tables::describe(conn, Some(known.oid), &known.schema, &known.name).await?
            else {
                continue;
            };
            if !now.key.is_empty() {
                self.describe_collection(conn, &now).await?;
                self.reread_if_columns_need_it(known, &now).await?;
            }
            *known = now;
        }
        Ok(())
    }
}

/// Watermark logging kept on for one read (a backfill, a re-read); off again when dropped,
/// so an aborted task cannot leave it on.
pub(super) struct WatermarkUse(PostgresSource);

impl WatermarkUse {
    pub(super) fn new(source: &PostgresSource) -> Self {
        source.inner.watermarks.acquire();
        Self(source.clone())
    }
}

impl Drop for WatermarkUse {
    fn drop(&mut self) {
        self.0.inner.watermarks.release();
    }
}

/// Tells the stream this sync is backfilling while it lives (see
/// `RecordStream::set_backfilling`); dropped with the backfill task, however it ends.
pub(super) struct Backfilling(PostgresSource);

impl Backfilling {
    pub(super) fn new(source: &PostgresSource) -> Self {
        let inner = &source.inner;
        inner
            .stream
            .set_backfilling(inner.sync_id, Provider::Postgres, true);
        Self(source.clone())
    }
}

impl Drop for Backfilling {
    fn drop(&mut self) {
        let inner = &self.0.inner;
        inner
            .stream
            .set_backfilling(inner.sync_id, Provider::Postgres, false);
    }
}

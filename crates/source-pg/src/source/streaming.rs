//! One streaming session's state: pgoutput messages become records (keys, versions, unchanged
//! TOAST values filled), appended in batches, with the slot confirmed only past what the stream
//! holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use sluice_core::{
    Change, CollectionId, Error, Payload, Provider, Record, RecordKey, TextBatch, Version,
};
use time::OffsetDateTime;

use super::PostgresSource;
use super::decode::{Decoded, decode};
use super::reads::WatermarkUse;
use crate::pgoutput::{Message, Relation, Tuple};
use crate::tables::{PayloadFields, Table};
use crate::values::TypeMap;
use crate::wire::{Lsn, StatusWriter};

/// Rows whose change left a TOAST value out that no earlier version in the stream holds:
/// instead of a row that never existed, they are read again consistently (see
/// `Backfill::reread_keys`), and the slot is not confirmed past their changes until then.
#[derive(Default)]
pub(super) struct KeyRereads {
    /// By table OID: the table and the key texts to read.
    pub(super) queue: HashMap<u32, (Table, std::collections::BTreeSet<Vec<String>>)>,
    /// The slot may be confirmed up to here and no further while these wait.
    pub(super) hold: Option<Lsn>,
    /// Changes are logged for the watermark from the first queued change on.
    pub(super) logging: Option<WatermarkUse>,
}

pub(super) struct Txn {
    pub(super) final_lsn: Lsn,
    pub(super) commit_time: OffsetDateTime,
    pub(super) xid: u32,
    pub(super) index: u64,
    /// The end of the last transaction before this one: confirming up to here replays it.
    pub(super) before: Lsn,
}

/// Bytes of payload text that make an append whatever the records' count (see
/// [`Streaming::pending_full`]).
pub(super) const PENDING_BYTES: usize = 8 << 20;

/// A relation as the session knows it.
pub(super) struct Known {
    pub(super) relation: Relation,
    /// The table it is, as described when its relation message came (`None`: dropped since,
    /// and not known before).
    pub(super) table: Option<Arc<Table>>,
    /// How its rows' payloads are written, made once from its columns' types.
    pub(super) fields: PayloadFields,
}

/// The state of one streaming session.
pub(super) struct Streaming<'a> {
    pub(super) source: &'a PostgresSource,
    pub(super) relations: HashMap<u32, Known>,
    pub(super) tables: HashMap<u32, Table>,
    pub(super) pending: TextBatch,
    pub(super) pending_since: Option<Instant>,
    pub(super) txn: Option<Txn>,
    /// The end of the last transaction whose changes are all pending or appended.
    pub(super) committed: Option<Lsn>,
    /// The slot position confirmed to the server.
    pub(super) confirmed: Lsn,
    /// The WAL position of a heartbeat not yet seen come back.
    pub(super) heartbeat_at: Option<Lsn>,
    /// Rows to read again, not yet started.
    pub(super) rereads: KeyRereads,
    /// The slot hold of the re-read that is running.
    pub(super) reread_running: Option<Lsn>,
    /// How long the last append took.
    pub(super) last_append: std::time::Duration,
}

impl Streaming<'_> {
    pub(super) fn relation(&mut self, rel: Relation, table: Option<Table>, types: &TypeMap) {
        let table = table.or_else(|| self.tables.get(&rel.id).cloned());
        if let Some(t) = &table {
            self.tables.insert(rel.id, t.clone());
        }
        let fields = PayloadFields::new(
            types,
            rel.columns.iter().map(|c| (c.name.as_str(), c.type_oid)),
        );
        self.relations.insert(
            rel.id,
            Known {
                relation: rel,
                table: table.map(Arc::new),
                fields,
            },
        );
    }

    /// Appends what is pending, then confirms the last complete transaction to the server.
    pub(super) async fn flush(&mut self, writer: &mut StatusWriter) -> Result<(), Error> {
        self.flush_records().await?;
        let held = [self.rereads.hold, self.reread_running]
            .into_iter()
            .flatten()
            .min();
        if let Some(c) = self.committed.map(|c| held.map_or(c, |h| c.min(h)))
            && c > self.confirmed
        {
            writer.send_status(c).await?;
            self.confirmed = c;
            self.source.status(|s| s.confirmed = c);
        }
        Ok(())
    }

    /// Whether a transaction just committed is appended now rather than with the next ones:
    /// when nothing more is queued behind it, or when what is pending has waited as long as
    /// an append takes (under a steady flow of commits the queue is never empty, and waiting
    /// longer would only add latency: group commit, paced by the stream itself).
    fn append_now(&self, queue_empty: bool) -> bool {
        queue_empty
            || self
                .pending_since
                .is_some_and(|since| since.elapsed() >= self.last_append)
    }

    /// Whether what is pending makes a whole append: `batch_max` records, or
    /// [`PENDING_BYTES`] of payloads (a transaction of wide rows is appended in pieces of
    /// megabytes, not of `batch_max` rows).
    fn pending_full(&self) -> bool {
        self.pending.len() >= self.source.inner.options.batch_max
            || self.pending.bytes() >= PENDING_BYTES
    }

    /// Queues `record` (a tombstone, or an upsert with its payload map).
    pub(super) fn push(&mut self, record: Record) {
        self.queueing(&record.key);
        self.pending.push(record);
    }

    /// Queues an upsert `record` whose payload is the JSON text `payload`.
    fn push_text(&mut self, record: Record, payload: &str) {
        self.queueing(&record.key);
        self.pending.push_text(record, |out| out.push_str(payload));
    }

    /// A change to `key` is about to be queued.
    fn queueing(&mut self, key: &RecordKey) {
        if let Some(txn) = &self.txn {
            self.source
                .inner
                .watermarks
                .record(txn.xid, &key.collection_id.0, &key.upstream_id.0);
        }
        if self.pending.is_empty() {
            self.pending_since = Some(Instant::now());
        }
    }

    /// Handles one message; `queue_empty` says whether nothing more has arrived behind it.
    pub(super) async fn handle(
        &mut self,
        message: Message,
        writer: &mut StatusWriter,
        queue_empty: bool,
    ) -> Result<(), Error> {
        match message {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                self.txn = Some(Txn {
                    final_lsn,
                    commit_time,
                    xid,
                    index: 0,
                    before: self.committed.unwrap_or(self.confirmed),
                });
            }
            Message::Logical { lsn, .. } => {
                self.source.inner.watermarks.passed(lsn);
            }
            Message::Commit { end_lsn } => {
                self.txn = None;
                self.source.inner.watermarks.passed(end_lsn);
                self.committed = Some(end_lsn);
                self.source
                    .status(|s| s.last_activity = Some(OffsetDateTime::now_utc()));
                if self.pending_full() || self.append_now(queue_empty) {
                    self.flush(writer).await?;
                }
            }
            Message::Insert { relation, new } => {
                self.change(relation, None, Some(new)).await?;
            }
            Message::Update { relation, old, new } => {
                self.change(relation, old, Some(new)).await?;
            }
            Message::Delete { relation, old } => {
                self.change(relation, Some(old), None).await?;
            }
            Message::Truncate { relations } => {
                // Everything before the truncate goes first, so the tombstones follow it.
                self.flush_records().await?;
                for id in relations {
                    let Some(known) = self.relations.get(&id) else {
                        continue;
                    };
                    let collection = CollectionId(known.relation.collection.clone());
                    let (version, at) = self.next_version()?;
                    if let Some(txn) = &self.txn {
                        self.source
                            .inner
                            .watermarks
                            .record(txn.xid, &collection.0, "*");
                    }
                    let n = self
                        .source
                        .inner
                        .stream
                        .tombstone_collection(self.source.inner.sync_id, &collection, version, at)
                        .await?;
                    tracing::info!(collection = %collection, tombstones = n, "source: truncate");
                }
            }
            Message::Relation(_) | Message::Ignored => {}
        }
        if self.pending_full() {
            // A large transaction: append its changes so far; the slot is confirmed only at
            // its commit, so a crash replays it whole and the stream skips what it holds.
            self.flush_records().await?;
        }
        Ok(())
    }

    pub(super) async fn flush_records(&mut self) -> Result<(), Error> {
        if !self.pending.is_empty() {
            let next = self.pending.like();
            let records = std::mem::replace(&mut self.pending, next);
            let n = records.len() as u64;
            let started = Instant::now();
            self.source.inner.stream.append_texts(records, None).await?;
            self.last_append = started.elapsed();
            self.source
                .inner
                .streamed
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        self.pending_since = None;
        Ok(())
    }

    pub(super) fn next_version(&mut self) -> Result<(Version, OffsetDateTime), Error> {
        let txn = self
            .txn
            .as_mut()
            .ok_or_else(|| Error::invalid("pgoutput: a change outside a transaction"))?;
        txn.index += 1;
        Ok((Version::new(txn.final_lsn.0, txn.index), txn.commit_time))
    }

    pub(super) async fn change(
        &mut self,
        relation: u32,
        old: Option<Tuple>,
        new: Option<Tuple>,
    ) -> Result<(), Error> {
        let Some(known) = self.relations.get(&relation) else {
            return Err(Error::invalid(format!(
                "pgoutput: a change for relation {relation} before its description"
            )));
        };
        let table = known.table.clone();
        let key = table.as_ref().map(|t| t.key.as_slice()).unwrap_or_default();
        let decoded = decode(
            self.source.inner.sync_id,
            &known.relation,
            &known.fields,
            key,
            old.as_ref(),
            new.as_ref(),
        )?;
        let (key, key_text, payload, unchanged, moved_from) = match decoded {
            Decoded::Skipped(notice) => {
                self.source.notice(notice);
                return Ok(());
            }
            Decoded::Delete(key) => {
                let (version, at) = self.next_version()?;
                self.push(Record {
                    key,
                    provider: Provider::Postgres,
                    version,
                    upstream_updated_at: at,
                    change: Change::Delete,
                });
                return Ok(());
            }
            Decoded::Upsert {
                key,
                key_text,
                payload,
                unchanged,
                moved_from,
            } => (key, key_text, payload, unchanged, moved_from),
        };
        let (version, at) = self.next_version()?;
        let record = |key, change| Record {
            key,
            provider: Provider::Postgres,
            version,
            upstream_updated_at: at,
            change,
        };
        // With every value sent, the payload text goes to the stream as it is; an unchanged
        // TOAST value is filled in on the payload's map.
        let filled = if unchanged.is_empty() {
            None
        } else {
            let mut map: Payload = serde_json::from_str(&payload).map_err(|e| {
                Error::invalid(format!(
                    "pgoutput: a change to {} as JSON: {e}",
                    key.collection_id
                ))
            })?;
            let unchanged: Vec<&str> = unchanged.iter().map(String::as_str).collect();
            let from = moved_from.as_ref().unwrap_or(&key);
            let complete = self.fill_unchanged(from, &unchanged, &mut map).await?;
            Some(complete.then_some(map))
        };
        if let Some(old) = moved_from {
            self.push(record(old, Change::Delete));
        }
        match filled {
            None => self.push_text(
                record(
                    key,
                    Change::Upsert {
                        payload: Payload::new(),
                    },
                ),
                &payload,
            ),
            Some(Some(payload)) => self.push(record(key, Change::Upsert { payload })),
            Some(None) => {
                if let Some(table) = &table {
                    self.reread(table, key_text, &key);
                }
            }
        }
        Ok(())
    }

    /// An unchanged TOAST value is not resent: take it from the previous version of the
    /// record at `from` (the old key when the key changed), pending or in the stream. Returns
    /// false when some value is in neither: the row must then be read again, never written
    /// without it (and never with a value read later, which may belong to another version).
    pub(super) async fn fill_unchanged(
        &self,
        from: &RecordKey,
        unchanged: &[&str],
        payload: &mut Payload,
    ) -> Result<bool, Error> {
        let pending = self.pending.records().iter().rposition(|r| &r.key == from);
        let (stored, parsed);
        let previous = match pending {
            Some(i) => {
                parsed = self.pending.payload(i).transpose()?;
                parsed.as_ref()
            }
            None => {
                stored = self.source.inner.stream.get(from).await?;
                stored.as_ref().and_then(|e| e.record.change.payload())
            }
        };
        let Some(previous) = previous else {
            return Ok(false);
        };
        for name in unchanged {
            match previous.get(*name) {
                Some(v) => {
                    payload.insert((*name).to_owned(), v.clone());
                }
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Queues the row at `key` to be read again (see [`KeyRereads`]).
    pub(super) fn reread(&mut self, table: &Table, key_text: Vec<String>, key: &RecordKey) {
        let Some(txn) = &self.txn else {
            return;
        };
        let rereads = &mut self.rereads;
        rereads.hold = Some(rereads.hold.map_or(txn.before, |h| h.min(txn.before)));
        if rereads.logging.is_none() {
            rereads.logging = Some(WatermarkUse::new(self.source));
        }
        // A later change to the row that its re-read cannot see wins over that re-read.
        self.source
            .inner
            .watermarks
            .record(txn.xid, &key.collection_id.0, &key.upstream_id.0);
        tracing::debug!(collection = %key.collection_id.0, id = %key.upstream_id.0, "source: an unchanged TOAST value is not in the stream; reading the row again");
        rereads
            .queue
            .entry(table.oid)
            .or_insert_with(|| (table.clone(), Default::default()))
            .1
            .insert(key_text);
    }
}

//! Reading: from the in-memory tail when it covers the position, else from the file's
//! segments (`walk.rs`), with payloads parsed or as stored text.

use std::collections::HashSet;

use super::*;

/// Entries a read from the file is sized for at most before it reads them (a larger read's
/// list grows as it goes; reads end at [`READ_BYTES`] of payloads anyway).
const ENTRIES_SIZED: usize = 16_384;

impl EmbeddedStream {
    /// A read, with payloads in `form`: from the tail when it covers the position, else from
    /// the file.
    pub(super) async fn read_as(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        form: Form,
    ) -> Result<StreamRead> {
        let (entries, head) = match self.read_tail(filter, after, limit, form)? {
            Some(read) => read,
            None => blocking(|| self.read_file(filter, after, limit, form))?,
        };
        let through = match entries.last() {
            Some(last) if entries.len() >= limit => last.seq,
            _ => head.max(after),
        };
        Ok(StreamRead { entries, through })
    }

    /// The entries from the tail and the head they go to, when the tail covers the position.
    fn read_tail(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        form: Form,
    ) -> Result<Option<(Vec<StreamEntry>, Seq)>> {
        let mut tail = self.tail();
        let head = Seq(self.head_in_file()? as u64);
        let entries = tail.read(filter, after, limit, head, form);
        tail.note_read(after, head, entries.is_some());
        if entries.is_some() {
            self.tail_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(entries.map(|e| (e, head)))
    }

    /// The entries from the file and the head they go to; when their payloads reach
    /// [`READ_BYTES`] before `limit`, the read stops there and goes to its last entry: records
    /// of kilobytes are read a few megabytes at a time, so a consumer's batches (the one it
    /// writes and the one it reads ahead) stay megabytes whatever the records (`limit` records
    /// of a few hundred bytes are well under it).
    fn read_file(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        form: Form,
    ) -> Result<(Vec<StreamEntry>, Seq)> {
        self.with_reader(|conn| {
            let tx = conn.transaction().or_storage("beginning a read")?;
            // Head first, in the same snapshot: nothing appended after it can be missed.
            let head = read_head(&tx)?;
            let mut names = Names::new(&self.collections, &tx);
            let wanted = Self::wanted(&tx, &mut names, filter)?;
            // Sized for every seq up to the head, so that a consumer's batch is not moved
            // again as the list grows (5,000 records of ~200 bytes each, when it was sized for
            // 4,096), up to [`ENTRIES_SIZED`].
            let up_to_head = (head as u64).saturating_sub(after.0) as usize;
            let mut entries = Vec::with_capacity(limit.min(up_to_head).min(ENTRIES_SIZED));
            let (mut bytes, mut through) = (0, head as u64);
            walk::walk(
                &tx,
                after,
                |collection| wanted.contains(&collection),
                |packed, slot| {
                    let (entry, size) = packed.entry(slot, form, &mut names)?;
                    entries.push(entry);
                    bytes += size;
                    if bytes >= READ_BYTES {
                        // The read looked this far: the next one goes on from here.
                        through = slot.seq;
                        return Ok(ControlFlow::Break(()));
                    }
                    Ok(if entries.len() >= limit {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    })
                },
            )?;
            drop(names);
            tx.commit().or_storage("ending a read")?;
            Ok((entries, Seq(through)))
        })
    }

    /// The ids of the collections whose records pass `filter`, as the file holds them.
    pub(super) fn wanted(
        conn: &Connection,
        names: &mut Names<'_>,
        filter: &RecordFilter,
    ) -> Result<HashSet<i64>> {
        let ids: Vec<i64> = conn
            .prepare_cached("select id from collections")
            .and_then(|mut s| {
                s.query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .or_storage("reading collections")?;
        let mut wanted = HashSet::with_capacity(ids.len());
        for id in ids {
            let collection = names.name(id)?;
            if filter.matches_collection(
                collection.provider,
                collection.sync_id,
                &collection.collection_id,
            ) {
                wanted.insert(id);
            }
        }
        Ok(wanted)
    }

    /// The head as the file says now (another process may have moved it).
    pub(super) fn head_in_file(&self) -> Result<i64> {
        self.with_reader(|conn| read_head(conn))
    }
}

pub(super) fn nanos(t: OffsetDateTime) -> i64 {
    t.unix_timestamp_nanos()
        .clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

/// How a read hands payloads over: parsed, or as the stored JSON text
/// ([`RecordStream::read_text`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Form {
    Parsed,
    Text,
}

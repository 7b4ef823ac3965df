//! Reading: from the in-memory tail when it covers the position, else from the file, with
//! payloads parsed or as stored text; rows decoded by position.

use super::*;

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
        let sql = format!(
            "select {COLUMNS} from records where seq > ?{} order by seq limit ?",
            filter_sql(filter)
        );
        self.with_reader(|conn| {
            let tx = conn.transaction().or_storage("beginning a read")?;
            // Head first, in the same snapshot: nothing appended after it can be missed.
            let head = read_head(&tx)?;
            let mut statement =
                positioned(&tx, &sql, after, filter, Some(limit as u64)).or_storage("reading")?;
            let mut rows = statement.raw_query();
            let mut segments = Segments::new(&tx);
            let mut names = Names::new(&self.collections, &tx);
            let mut entries = Vec::with_capacity(limit.min(4096));
            let (mut bytes, mut through) = (0, head as u64);
            while let Some(row) = rows.next().or_storage("reading")? {
                let (entry, size) = decode(row, form, &mut segments, &mut names)?;
                bytes += size;
                if bytes >= READ_BYTES {
                    // The read looked this far: the next one goes on from here.
                    through = entry.seq.0;
                    entries.push(entry);
                    break;
                }
                entries.push(entry);
            }
            drop((segments, names));
            drop(rows);
            drop(statement);
            tx.commit().or_storage("ending a read")?;
            Ok((entries, Seq(through)))
        })
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

/// One row of a `select {COLUMNS}`, by position (no name lookups), with its collection from
/// `names` and its payload from `segments`, and its payload's bytes as stored.
pub(super) fn decode(
    row: &rusqlite::Row<'_>,
    form: Form,
    segments: &mut Segments<'_>,
    names: &mut Names<'_>,
) -> Result<(StreamEntry, usize)> {
    let bad = |what: &str| Error::invalid(format!("records stream: corrupt row ({what})"));
    let int = |at: usize, what: &str| row.get::<_, i64>(at).map_err(|_| bad(what));
    let text = |at: usize, what: &str| {
        row.get_ref(at)
            .ok()
            .and_then(|v| v.as_str().ok())
            .ok_or_else(|| bad(what))
    };
    let mut payload_text = None;
    let mut times = Times::OWN;
    let mut size = 0;
    let change = if int(6, "deleted")? != 0 {
        Change::Delete
    } else {
        let (text, shared) = segments.payload(int(7, "segment")?, int(8, "slot")?)?;
        times = shared;
        size = text.as_str().len();
        if form == Form::Text {
            payload_text = Some(text);
            Change::Upsert {
                payload: Default::default(),
            }
        } else {
            let payload = serde_json::from_str(text.as_str()).map_err(|_| bad("payload"))?;
            Change::Upsert { payload }
        }
    };
    let updated_ns = times.updated_at(int(5, "upstream_updated_at")?);
    let collection = names.name(int(1, "collection")?)?;
    let entry = StreamEntry {
        seq: Seq(int(0, "seq")? as u64),
        record: Record {
            key: RecordKey {
                sync_id: collection.sync_id,
                collection_id: collection.collection_id.clone(),
                upstream_id: UpstreamId(text(2, "upstream_id")?.to_owned()),
            },
            provider: collection.provider,
            version: Version::new(
                int(3, "version_major")? as u64,
                int(4, "version_minor")? as u64,
            ),
            upstream_updated_at: OffsetDateTime::from_unix_timestamp_nanos(updated_ns as i128)
                .map_err(|_| bad("upstream_updated_at"))?,
            change,
        },
        payload_text,
    };
    Ok((entry, size))
}

/// The `and …` clause for a filter, with its parameters appended by [`bind_filter`]: the
/// collection ids it matches, found once per statement. The unary `+` keeps SQLite from
/// answering by the key index (every record of a sync, then sorted): reads walk the table by
/// seq from the reader's position, which stops at the limit.
pub(super) fn filter_sql(filter: &RecordFilter) -> &'static str {
    match filter {
        RecordFilter::Provider(_) => {
            " and +collection in (select id from collections where provider = ?)"
        }
        RecordFilter::Sync {
            collections: None, ..
        } => " and +collection in (select id from collections where sync_id = ?)",
        RecordFilter::Sync {
            collections: Some(_),
            ..
        } => {
            " and +collection in (select id from collections where sync_id = ? \
               and collection_id in (select value from json_each(?)))"
        }
    }
}

/// `sql` (`… seq > ?{filter_sql} … [limit ?]`) prepared with its position, filter and limit
/// bound.
pub(super) fn positioned<'c>(
    conn: &'c Connection,
    sql: &str,
    after: Seq,
    filter: &RecordFilter,
    limit: Option<u64>,
) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    let mut statement = conn.prepare_cached(sql)?;
    statement.raw_bind_parameter(1, after.0 as i64)?;
    let next = bind_filter(&mut statement, 2, filter)?;
    if let Some(limit) = limit {
        statement.raw_bind_parameter(next, limit as i64)?;
    }
    Ok(statement)
}

/// Binds a filter's parameters (see [`filter_sql`]) from parameter `at` on; returns the next
/// parameter's index.
pub(super) fn bind_filter(
    statement: &mut rusqlite::Statement<'_>,
    at: usize,
    filter: &RecordFilter,
) -> rusqlite::Result<usize> {
    match filter {
        RecordFilter::Provider(p) => {
            statement.raw_bind_parameter(at, p.as_str())?;
            Ok(at + 1)
        }
        RecordFilter::Sync {
            sync_id,
            collections,
        } => {
            statement.raw_bind_parameter(at, sync_id.0.as_bytes().as_slice())?;
            match collections {
                None => Ok(at + 1),
                Some(c) => {
                    let list = serde_json::to_string(c).unwrap_or_else(|_| "[]".into());
                    statement.raw_bind_parameter(at + 1, list)?;
                    Ok(at + 2)
                }
            }
        }
    }
}

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
        let (entries, head) = match self.read_tail(filter, after, limit, form).await? {
            Some(read) => read,
            None => self.read_file(filter, after, limit, form).await?,
        };
        let through = match entries.last() {
            Some(last) if entries.len() >= limit => last.seq,
            _ => head.max(after),
        };
        Ok(StreamRead { entries, through })
    }

    /// The entries from the tail and the head they go to, when the tail covers the position.
    pub(super) async fn read_tail(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        form: Form,
    ) -> Result<Option<(Vec<StreamEntry>, Seq)>> {
        let tail = self.tail.lock().await;
        let head = Seq(self.head_in_file().await? as u64);
        let entries = tail.read(filter, after, limit, head, form);
        if entries.is_some() {
            self.tail_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(entries.map(|e| (e, head)))
    }

    /// The entries from the file and the head they go to.
    pub(super) async fn read_file(
        &self,
        filter: &RecordFilter,
        after: Seq,
        limit: usize,
        form: Form,
    ) -> Result<(Vec<StreamEntry>, Seq)> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| storage("beginning a read", e))?;
        // Head first, in the same snapshot: nothing appended after it can be missed.
        let head: i64 = sqlx::query_scalar("select value from meta where key = 'head'")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| storage("reading the head", e))?;
        let sql = format!(
            "select {COLUMNS} from records where seq > ?{} order by seq limit ?",
            filter_sql(filter)
        );
        let query = bind_filter(sqlx::query(AssertSqlSafe(sql)).bind(after.0 as i64), filter)
            .bind(limit as i64);
        let rows = query
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| storage("reading", e))?;
        tx.commit().await.map_err(|e| storage("ending a read", e))?;
        let entries = rows
            .iter()
            .map(|row| decode(row, form))
            .collect::<Result<Vec<_>>>()?;
        Ok((entries, Seq(head as u64)))
    }

    /// The head as the file says now (another process may have moved it).
    pub(super) async fn head_in_file(&self) -> Result<i64> {
        sqlx::query_scalar("select value from meta where key = 'head'")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| storage("reading the head", e))
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

/// One row of a `select {COLUMNS}`, by position (no name lookups, no copies of the
/// provider and sync id).
pub(super) fn decode(row: &SqliteRow, form: Form) -> Result<StreamEntry> {
    let bad = |what: &str| Error::invalid(format!("records stream: corrupt row ({what})"));
    let sync_id = SyncId(Uuid::from_slice(row.get::<&[u8], _>(2)).map_err(|_| bad("sync_id"))?);
    let mut payload_text = None;
    let change = if row.get::<bool, _>(8) {
        Change::Delete
    } else if form == Form::Text {
        payload_text = Some(PayloadText::whole(row.get(9)));
        Change::Upsert {
            payload: Default::default(),
        }
    } else {
        let payload = serde_json::from_str(row.get::<&str, _>(9)).map_err(|_| bad("payload"))?;
        Change::Upsert { payload }
    };
    let updated_ns: i64 = row.get(7);
    Ok(StreamEntry {
        seq: Seq(row.get::<i64, _>(0) as u64),
        record: Record {
            key: RecordKey {
                sync_id,
                collection_id: CollectionId(row.get(3)),
                upstream_id: UpstreamId(row.get(4)),
            },
            provider: Provider::from_str(row.get::<&str, _>(1))?,
            version: Version::new(row.get::<i64, _>(5) as u64, row.get::<i64, _>(6) as u64),
            upstream_updated_at: OffsetDateTime::from_unix_timestamp_nanos(updated_ns as i128)
                .map_err(|_| bad("upstream_updated_at"))?,
            change,
        },
        payload_text,
    })
}

/// The `and …` clause for a filter, with its parameters appended by [`bind_filter`]. The unary
/// `+` keeps SQLite from answering by the key index (every record of a sync, then sorted):
/// reads walk the table by seq from the reader's position, which stops at the limit.
pub(super) fn filter_sql(filter: &RecordFilter) -> &'static str {
    match filter {
        RecordFilter::Provider(_) => " and +provider = ?",
        RecordFilter::Sync {
            collections: None, ..
        } => " and +sync_id = ?",
        RecordFilter::Sync {
            collections: Some(_),
            ..
        } => " and +sync_id = ? and +collection_id in (select value from json_each(?))",
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

pub(super) fn bind_filter<'q>(query: Query<'q>, filter: &RecordFilter) -> Query<'q> {
    match filter {
        RecordFilter::Provider(p) => query.bind(p.as_str()),
        RecordFilter::Sync {
            sync_id,
            collections,
        } => {
            let query = query.bind(sync_id.0.as_bytes().to_vec());
            match collections {
                None => query,
                Some(c) => query.bind(serde_json::to_string(c).unwrap_or_else(|_| "[]".into())),
            }
        }
    }
}

//! Writing: the one transaction an append is (claimed seqs, multi-row upserts with the version
//! guard, the resume state, the head), and the tail kept exact with what was written.

use super::*;

impl EmbeddedStream {
    /// One append: every chunk's records, then `state`, in one transaction.
    pub(super) async fn write_records(
        &self,
        chunks: impl Iterator<Item = Vec<Record>> + Send,
        state: Option<&SourceState>,
    ) -> Result<AppendOutcome> {
        let (_writer, mut tx, head) = self.begin_write("an append").await?;
        let appended_at = nanos(OffsetDateTime::now_utc());
        let mut next = head;
        let (mut appended, mut total) = (0u64, 0usize);
        let mut landed = Some(Vec::new());
        for mut records in chunks {
            for record in &records {
                check_version(record)?;
            }
            let texts = serialize_payloads(&records)?;
            let n = insert(&mut tx, &records, &texts, &mut next, appended_at).await?;
            appended += n;
            total += records.len();
            match &mut landed {
                Some(landed) if n as usize == records.len() => {
                    for record in &mut records {
                        // The tail keeps the text; the parsed payload goes now.
                        if let Change::Upsert { payload } = &mut record.change {
                            *payload = Default::default();
                        }
                    }
                    landed.extend(records.into_iter().map(as_stored).zip(texts));
                }
                // A record skipped as stale is not in the file, and which one was skipped is
                // not known here: the tail then starts over.
                _ => landed = None,
            }
        }
        if let Some(state) = state {
            sqlx::query(
                "insert into source_state (owner, value) values (?, ?) \
                 on conflict (owner) do update set value = excluded.value",
            )
            .bind(&state.owner)
            .bind(state.value.to_string())
            .execute(&mut *tx)
            .await
            .map_err(|e| storage("storing source state", e))?;
        }
        let head = self
            .finish_write(tx, head, next, "an append", landed)
            .await?;
        Ok(AppendOutcome {
            appended: appended as usize,
            skipped_stale: total - appended as usize,
            head,
        })
    }

    /// Starts a write: the writer lock, a transaction, and the head inside it.
    pub(super) async fn begin_write(
        &self,
        what: &str,
    ) -> Result<(
        tokio::sync::MutexGuard<'_, ()>,
        sqlx::Transaction<'static, sqlx::Sqlite>,
        i64,
    )> {
        let writer = self.writer.lock().await;
        let mut tx = self
            .writes
            .begin()
            .await
            .map_err(|e| storage(&format!("beginning {what}"), e))?;
        let head: i64 = sqlx::query_scalar("select value from meta where key = 'head'")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| storage("reading the head", e))?;
        Ok((writer, tx, head))
    }

    /// Ends a write that began at `from`: moves the head to `next`, commits, updates the
    /// tail and wakes readers. `landed` holds the entries of seqs `from + 1 ..= next` (with their
    /// payload's JSON text) when every one of them is in the file as given; `None` empties
    /// the tail instead.
    pub(super) async fn finish_write(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Sqlite>,
        from: i64,
        next: i64,
        what: &str,
        landed: Option<Vec<(Record, Option<PayloadText>)>>,
    ) -> Result<Seq> {
        sqlx::query("update meta set value = ? where key = 'head'")
            .bind(next)
            .execute(&mut *tx)
            .await
            .map_err(|e| storage("moving the head", e))?;
        let mut tail = self.tail.lock().await;
        tx.commit()
            .await
            .map_err(|e| storage(&format!("committing {what}"), e))?;
        let head = Seq(next as u64);
        match landed {
            Some(entries) if tail.end() == Seq(from as u64) => tail.extend(entries),
            _ => tail.reset(head),
        }
        drop(tail);
        self.head.send_replace(head);
        Ok(head)
    }
}

/// The multi-row upsert for `rows` records. The version guard: a conflicting key is replaced
/// only by a strictly newer version, and the replacement moves to the end of the stream with a
/// new seq.
pub(super) fn insert_sql(rows: usize) -> String {
    let mut sql = String::with_capacity(600 + rows * 26);
    sql.push_str(
        "insert into records (seq, provider, sync_id, collection_id, upstream_id, version_major, \
         version_minor, upstream_updated_at_ns, deleted, payload, appended_at_ns) values ",
    );
    for i in 0..rows {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?,?,?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?,?,?,?,?,?,?)"
        });
    }
    sql.push_str(
        " on conflict (sync_id, collection_id, upstream_id) do update set \
           seq = excluded.seq, provider = excluded.provider, version_major = excluded.version_major, \
           version_minor = excluded.version_minor, upstream_updated_at_ns = excluded.upstream_updated_at_ns, \
           deleted = excluded.deleted, payload = excluded.payload, appended_at_ns = excluded.appended_at_ns \
         where excluded.version_major > records.version_major \
            or (excluded.version_major = records.version_major and excluded.version_minor > records.version_minor)",
    );
    sql
}

/// Every payload of an append as JSON text, all in one buffer (one allocation, not one per
/// record); `None` for a tombstone.
pub(super) fn serialize_payloads(records: &[Record]) -> Result<Vec<Option<PayloadText>>> {
    let mut buffer = Vec::with_capacity(records.len() * 256);
    let ranges: Vec<Option<Range<usize>>> = records
        .iter()
        .map(|r| {
            r.change.payload().map(|p| {
                let start = buffer.len();
                if serde_json::to_writer(&mut buffer, p).is_err() {
                    buffer.truncate(start);
                    buffer.extend_from_slice(b"{}");
                }
                start..buffer.len()
            })
        })
        .collect();
    // serde_json writes UTF-8 only, so neither error can happen.
    let not_utf8 = || Error::invalid("records stream: a payload serialised to invalid UTF-8");
    let buffer = Arc::new(String::from_utf8(buffer).map_err(|_| not_utf8())?);
    ranges
        .into_iter()
        .map(|r| {
            r.map(|r| PayloadText::new(buffer.clone(), r).ok_or_else(not_utf8))
                .transpose()
        })
        .collect()
}

/// Inserts `records` (with their payloads' `texts`) at the seqs after `next`, under the version
/// guard, advancing `next`; returns how many landed (the others were stale).
pub(super) async fn insert(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    records: &[Record],
    texts: &[Option<PayloadText>],
    next: &mut i64,
    appended_at: i64,
) -> Result<u64> {
    let mut appended = 0;
    let (mut records, mut texts) = (records, texts);
    while !records.is_empty() {
        let rows = statement_rows(records.len());
        let (chunk, rest) = records.split_at(rows);
        let (chunk_texts, rest_texts) = texts.split_at(rows);
        (records, texts) = (rest, rest_texts);
        let mut query = sqlx::query(AssertSqlSafe(insert_sql(rows)));
        // Everything bound is borrowed from `records` and `texts`: no per-record copies.
        for (record, text) in chunk.iter().zip(chunk_texts) {
            *next += 1;
            query = query
                .bind(*next)
                .bind(record.provider.as_str())
                .bind(record.key.sync_id.0.as_bytes().as_slice())
                .bind(record.key.collection_id.0.as_str())
                .bind(record.key.upstream_id.0.as_str())
                .bind(record.version.major as i64)
                .bind(record.version.minor as i64)
                .bind(nanos(record.upstream_updated_at))
                .bind(record.is_tombstone())
                .bind(text.as_ref().map(PayloadText::as_str))
                .bind(appended_at);
        }
        appended += query
            .execute(&mut **tx)
            .await
            .map_err(|e| storage("appending", e))?
            .rows_affected();
    }
    Ok(appended)
}

/// How many of `left` records the next insert statement takes: one of a few sizes, so every
/// statement is prepared once and then found in the connection's statement cache (an append
/// of any other size would prepare a statement of that size, which costs more than the
/// insert itself for the small appends a source makes when caught up).
pub(super) fn statement_rows(left: usize) -> usize {
    STATEMENT_ROWS
        .into_iter()
        .find(|&rows| rows <= left)
        .unwrap_or(1)
}

/// The record as a read from the file returns it: its time at nanosecond precision in UTC.
pub(super) fn as_stored(mut record: Record) -> Record {
    record.upstream_updated_at =
        OffsetDateTime::from_unix_timestamp_nanos(nanos(record.upstream_updated_at) as i128)
            .unwrap_or(record.upstream_updated_at);
    record
}

pub(super) fn check_version(record: &Record) -> Result<()> {
    let max = i64::MAX as u64;
    if record.version.major > max || record.version.minor > max {
        return Err(Error::invalid(format!(
            "record {}/{}: version {} is out of range (each part must be below 2^63)",
            record.key.collection_id, record.key.upstream_id, record.version
        )));
    }
    Ok(())
}

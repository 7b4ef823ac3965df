//! Records whose payloads a source wrote as JSON text, for an append that stores that text
//! as it is ([`crate::RecordStream::append_texts`]).

use std::ops::Range;
use std::sync::Arc;

use crate::{Change, Error, Payload, PayloadText, Record, RecordKey, Result};

/// A batch of records whose upserts carry their payload as JSON text written into one
/// buffer, rather than as a [`Payload`] map: a source that reads rows as text (PostgreSQL's)
/// writes each row's JSON straight into the buffer, with no map, no value per field and no
/// allocation per row, and the stream stores that text as it is.
///
/// Each upsert's text is a JSON object; an upsert record's own `payload` map stays empty.
#[derive(Default)]
pub struct TextBatch {
    records: Vec<Record>,
    buffer: String,
    ranges: Vec<Option<Range<usize>>>,
}

impl TextBatch {
    /// An empty batch with room for about `records` records of `bytes` of text in all.
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        Self {
            records: Vec::with_capacity(records),
            buffer: String::with_capacity(bytes),
            ranges: Vec::with_capacity(records),
        }
    }

    /// `records` with every upsert's map written out as its text, all in one buffer (one
    /// allocation, not one per record).
    pub fn from_records(mut records: Vec<Record>) -> Result<Self> {
        let mut buffer = Vec::with_capacity(records.len() * 256);
        let ranges = records
            .iter_mut()
            .map(|r| match &mut r.change {
                Change::Upsert { payload } => {
                    let start = buffer.len();
                    // A map of JSON values always serialises (its keys are strings).
                    if serde_json::to_writer(&mut buffer, payload).is_err() {
                        buffer.truncate(start);
                        buffer.extend_from_slice(b"{}");
                    }
                    *payload = Payload::new();
                    Some(start..buffer.len())
                }
                Change::Delete => None,
            })
            .collect();
        // serde_json writes UTF-8 only, so this cannot fail.
        let buffer = String::from_utf8(buffer)
            .map_err(|_| Error::invalid("a record payload serialised to invalid UTF-8"))?;
        Ok(Self {
            records,
            buffer,
            ranges,
        })
    }

    /// Adds `record` as it is: a tombstone, or an upsert whose map is written out as its text.
    pub fn push(&mut self, mut record: Record) {
        let range = match &mut record.change {
            Change::Upsert { payload } => {
                let start = self.buffer.len();
                // A map of JSON values always serialises (its keys are strings).
                let text = serde_json::to_string(payload).unwrap_or_else(|_| "{}".into());
                self.buffer.push_str(&text);
                *payload = Payload::new();
                Some(start..self.buffer.len())
            }
            Change::Delete => None,
        };
        self.records.push(record);
        self.ranges.push(range);
    }

    /// Adds an upsert `record` (its `payload` map empty) whose payload `write` appends to the
    /// buffer it is given, as one JSON object.
    pub fn push_text(&mut self, record: Record, write: impl FnOnce(&mut String)) {
        let start = self.buffer.len();
        write(&mut self.buffer);
        self.records.push(record);
        self.ranges.push(Some(start..self.buffer.len()));
    }

    /// How many records the batch holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Bytes of payload text the batch holds.
    pub fn bytes(&self) -> usize {
        self.buffer.len()
    }

    /// An empty batch with room for as many records as this one holds and an eighth more
    /// text: for the next batch of a source whose batches are alike, which then grows no
    /// buffer (growing one copies all of its text, into memory never touched before).
    pub fn like(&self) -> Self {
        Self::with_capacity(
            self.records.len(),
            self.buffer.len() + self.buffer.len() / 8,
        )
    }

    /// True when the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records, in order (upserts with empty maps).
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The payload text of record `i`; `None` for a tombstone.
    pub fn text(&self, i: usize) -> Option<&str> {
        let range = self.ranges.get(i)?.clone()?;
        self.buffer.get(range)
    }

    /// The payload of record `i` as a map, parsed from its text; `None` for a tombstone.
    pub fn payload(&self, i: usize) -> Option<Result<Payload>> {
        let text = self.text(i)?;
        Some(parse(&self.records[i].key, text))
    }

    /// The records and their texts, the texts sharing one buffer.
    pub fn into_parts(mut self) -> (Vec<Record>, Vec<Option<PayloadText>>) {
        // The text outlives the batch (in the stream's tail, which counts its length): room
        // made for a bigger batch ([`Self::like`]) is given back.
        if self.buffer.capacity() > 2 * self.buffer.len() + 4096 {
            self.buffer.shrink_to_fit();
        }
        let buffer = Arc::new(self.buffer);
        let texts = self
            .ranges
            .into_iter()
            .map(|range| range.and_then(|r| PayloadText::new(buffer.clone(), r)))
            .collect();
        (self.records, texts)
    }

    /// The records with their payloads parsed back into maps (for a stream that stores maps).
    pub fn into_records(self) -> Result<Vec<Record>> {
        let (mut records, texts) = self.into_parts();
        for (record, text) in records.iter_mut().zip(texts) {
            if let (Change::Upsert { payload }, Some(text)) = (&mut record.change, text) {
                *payload = parse(&record.key, text.as_str())?;
            }
        }
        Ok(records)
    }
}

fn parse(key: &RecordKey, text: &str) -> Result<Payload> {
    serde_json::from_str(text).map_err(|e| {
        Error::invalid(format!(
            "record {}/{}: its payload text is not a JSON object: {e}",
            key.collection_id, key.upstream_id
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Provider, SyncId, Version};
    use serde_json::json;

    fn record(id: &str, change: Change) -> Record {
        Record {
            key: RecordKey::new(SyncId(uuid::Uuid::nil()), "public.t", id),
            provider: Provider::Postgres,
            version: Version::new(1, 0),
            upstream_updated_at: time::OffsetDateTime::UNIX_EPOCH,
            change,
        }
    }

    #[test]
    fn a_batch_like_another_has_room_for_it_and_gives_back_what_it_did_not_use() {
        let mut big = TextBatch::default();
        for i in 0..100 {
            big.push(record(
                &i.to_string(),
                Change::upsert(json!({"n": i})).unwrap(),
            ));
        }
        let next = big.like();
        assert!(next.records.capacity() >= 100 && next.ranges.capacity() >= 100);
        // And an eighth more text: a next batch a little larger grows no buffer.
        assert!(
            next.buffer.capacity() >= big.buffer.len() + big.buffer.len() / 8,
            "{} for {}",
            next.buffer.capacity(),
            big.buffer.len()
        );

        let mut roomy = TextBatch::with_capacity(1, 1 << 20);
        roomy.push_text(record("1", Change::upsert(json!({})).unwrap()), |b| {
            b.push_str(r#"{"a":1}"#)
        });
        let (_, texts) = roomy.into_parts();
        let text = texts[0].as_ref().unwrap();
        assert_eq!(text.as_str(), r#"{"a":1}"#);
        assert!(text.buffer_capacity() < 4096, "{}", text.buffer_capacity());
    }

    #[test]
    fn texts_maps_and_tombstones_come_back_in_order() {
        let mut batch = TextBatch::default();
        batch.push_text(record("1", Change::upsert(json!({})).unwrap()), |b| {
            b.push_str(r#"{"a":1}"#)
        });
        batch.push(record("2", Change::Delete));
        batch.push(record("3", Change::upsert(json!({"b": "x"})).unwrap()));
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.text(0), Some(r#"{"a":1}"#));
        assert_eq!(batch.text(1), None);
        assert_eq!(batch.text(2), Some(r#"{"b":"x"}"#));
        assert_eq!(
            batch.payload(2).unwrap().unwrap(),
            json!({"b": "x"}).as_object().cloned().unwrap()
        );
        let records = batch.into_records().unwrap();
        assert_eq!(records[0].change, Change::upsert(json!({"a": 1})).unwrap());
        assert_eq!(records[1].change, Change::Delete);
        assert_eq!(
            records[2].change,
            Change::upsert(json!({"b": "x"})).unwrap()
        );
    }

    #[test]
    fn records_with_maps_become_texts_in_one_buffer() {
        let records = vec![
            record(
                "1",
                Change::upsert(json!({"b": 2.50, "a": "é\u{0}"})).unwrap(),
            ),
            record("2", Change::Delete),
        ];
        let batch = TextBatch::from_records(records.clone()).unwrap();
        assert_eq!(batch.text(0), Some(r#"{"a":"é\u0000","b":2.5}"#));
        assert_eq!(batch.text(1), None);
        assert_eq!(
            batch.records()[0].change,
            Change::upsert(json!({})).unwrap()
        );
        assert_eq!(batch.into_records().unwrap(), records);
    }

    #[test]
    fn a_text_that_is_not_an_object_is_an_error_naming_the_record() {
        let mut batch = TextBatch::default();
        batch.push_text(record("7", Change::upsert(json!({})).unwrap()), |b| {
            b.push_str("[1]")
        });
        let error = batch.into_records().unwrap_err().to_string();
        assert!(error.contains("public.t/7"), "{error}");
    }
}

//! Decoding pgoutput protocol version 1 messages (PostgreSQL docs, "Logical Replication
//! Message Formats"). Values arrive in text form: the types' output functions, the same text a
//! backfill reads, so both paths share one conversion ([`crate::values`]).

use sluice_core::Error;
use time::OffsetDateTime;

use crate::wire::{Lsn, PG_EPOCH_OFFSET_MICROS, Reader};

/// One column of a relation as pgoutput describes it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Column {
    pub name: String,
    pub type_oid: u32,
}

/// A table as the publication sends it (the partition root with `publish_via_partition_root`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `schema.name`, the id of the collection its rows become (made once, not per change).
    pub collection: String,
    pub columns: Vec<Column>,
}

impl Relation {
    pub(crate) fn new(id: u32, schema: String, name: String, columns: Vec<Column>) -> Self {
        Self {
            id,
            collection: format!("{schema}.{name}"),
            schema,
            name,
            columns,
        }
    }
}

/// One column value of a tuple.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Value<'a> {
    Null,
    /// A TOASTed value that did not change; pgoutput does not resend it.
    Unchanged,
    Text(&'a str),
}

/// A row as pgoutput sends it: every column's value in the relation's column order. The
/// values' text is held in one buffer, so a change costs two allocations, not one per column.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Tuple {
    text: String,
    parts: Vec<Part>,
}

/// Where one column's value is: a text value is `text[start..end]`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    Null,
    Unchanged,
    Text { start: usize, end: usize },
}

impl Tuple {
    /// Column `i`'s value, if the tuple has that many columns.
    pub(crate) fn get(&self, i: usize) -> Option<Value<'_>> {
        self.parts.get(i).map(|&part| self.value(part))
    }

    /// The values in column order.
    pub(crate) fn values(&self) -> impl Iterator<Item = Value<'_>> {
        self.parts.iter().map(|&part| self.value(part))
    }

    fn value(&self, part: Part) -> Value<'_> {
        match part {
            Part::Null => Value::Null,
            Part::Unchanged => Value::Unchanged,
            Part::Text { start, end } => Value::Text(&self.text[start..end]),
        }
    }

    fn push(&mut self, value: Value<'_>) {
        self.parts.push(match value {
            Value::Null => Part::Null,
            Value::Unchanged => Part::Unchanged,
            Value::Text(t) => {
                let start = self.text.len();
                self.text.push_str(t);
                Part::Text {
                    start,
                    end: self.text.len(),
                }
            }
        });
    }
}

impl<'a> FromIterator<Value<'a>> for Tuple {
    fn from_iter<I: IntoIterator<Item = Value<'a>>>(values: I) -> Self {
        let mut tuple = Tuple::default();
        for value in values {
            tuple.push(value);
        }
        tuple
    }
}

#[derive(Debug, PartialEq)]
pub(crate) enum Message {
    Begin {
        final_lsn: Lsn,
        commit_time: OffsetDateTime,
        xid: u32,
    },
    /// A logical decoding message (`pg_logical_emit_message`); sluice's backfill watermarks.
    Logical {
        lsn: Lsn,
        prefix: String,
    },
    Commit {
        end_lsn: Lsn,
    },
    Relation(Relation),
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<Tuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: Tuple,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Origin, Type and logical decoding messages: nothing to do.
    Ignored,
}

pub(crate) fn pg_time(micros: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(
        (micros as i128 + PG_EPOCH_OFFSET_MICROS as i128) * 1000,
    )
    .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

pub(crate) fn decode(payload: &[u8]) -> Result<Message, Error> {
    let mut r = Reader::new(payload);
    Ok(match r.u8()? {
        b'B' => {
            let final_lsn = Lsn(r.i64()? as u64);
            let commit_time = pg_time(r.i64()?);
            let xid = r.i32()? as u32;
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            }
        }
        b'C' => {
            let _flags = r.u8()?;
            let _commit_lsn = r.i64()?;
            let end_lsn = Lsn(r.i64()? as u64);
            Message::Commit { end_lsn }
        }
        b'R' => {
            let id = r.i32()? as u32;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let _identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let _flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.i32()? as u32;
                let _typmod = r.i32()?;
                columns.push(Column { name, type_oid });
            }
            Message::Relation(Relation::new(id, schema, name, columns))
        }
        b'I' => {
            let relation = r.i32()? as u32;
            expect(r.u8()?, b'N')?;
            Message::Insert {
                relation,
                new: tuple(&mut r)?,
            }
        }
        b'U' => {
            let relation = r.i32()? as u32;
            let mut old = None;
            let mut tag = r.u8()?;
            if tag == b'K' || tag == b'O' {
                old = Some(tuple(&mut r)?);
                tag = r.u8()?;
            }
            expect(tag, b'N')?;
            Message::Update {
                relation,
                old,
                new: tuple(&mut r)?,
            }
        }
        b'D' => {
            let relation = r.i32()? as u32;
            let tag = r.u8()?;
            if tag != b'K' && tag != b'O' {
                return Err(Error::invalid(format!(
                    "pgoutput: delete without an old key (tag {:?})",
                    tag as char
                )));
            }
            Message::Delete {
                relation,
                old: tuple(&mut r)?,
            }
        }
        b'T' => {
            let n = r.i32()?;
            let _options = r.u8()?;
            let mut relations = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                relations.push(r.i32()? as u32);
            }
            Message::Truncate { relations }
        }
        b'M' => {
            let _transactional = r.u8()?;
            let lsn = Lsn(r.i64()? as u64);
            let prefix = r.cstr()?;
            Message::Logical { lsn, prefix }
        }
        b'O' | b'Y' => Message::Ignored,
        other => {
            return Err(Error::invalid(format!(
                "pgoutput: unknown message {:?}",
                other as char
            )));
        }
    })
}

fn expect(tag: u8, want: u8) -> Result<(), Error> {
    if tag == want {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "pgoutput: expected tuple tag {:?}, got {:?}",
            want as char, tag as char
        )))
    }
}

/// One column of a tuple as sent, its text not yet checked.
enum Sent<'a> {
    Null,
    Unchanged,
    Text(&'a [u8]),
}

/// Reads one column of a tuple.
fn column<'a>(r: &mut Reader<'a>) -> Result<Sent<'a>, Error> {
    Ok(match r.u8()? {
        b'n' => Sent::Null,
        b'u' => Sent::Unchanged,
        b't' => {
            let len = r.i32()?;
            Sent::Text(r.bytes(len.max(0) as usize)?)
        }
        other => {
            return Err(Error::invalid(format!(
                "pgoutput: unsupported value kind {:?}",
                other as char
            )));
        }
    })
}

/// Reads a tuple's columns, into text allocated once at its size (the columns' lengths read
/// ahead first, without copying).
fn tuple(r: &mut Reader<'_>) -> Result<Tuple, Error> {
    let n = r.i16()?;
    let mut ahead = r.clone();
    let text_len = (0..n)
        .map_while(|_| column(&mut ahead).ok())
        .map(|c| match c {
            Sent::Text(bytes) => bytes.len(),
            Sent::Null | Sent::Unchanged => 0,
        })
        .sum();
    let mut tuple = Tuple {
        text: String::with_capacity(text_len),
        parts: Vec::with_capacity(n.max(0) as usize),
    };
    for _ in 0..n {
        tuple.push(match column(r)? {
            Sent::Null => Value::Null,
            Sent::Unchanged => Value::Unchanged,
            Sent::Text(bytes) => Value::Text(
                std::str::from_utf8(bytes)
                    .map_err(|_| Error::invalid("pgoutput: a text value is not UTF-8"))?,
            ),
        });
    }
    Ok(tuple)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change message's start: its kind, relation, the tuple's tag and column count.
    fn change(kind: u8, relation: i32, tag: u8, columns: i16) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&relation.to_be_bytes());
        m.push(tag);
        m.extend_from_slice(&columns.to_be_bytes());
        m
    }

    fn text(buf: &mut Vec<u8>, s: &str) {
        buf.push(b't');
        buf.extend_from_slice(&(s.len() as i32).to_be_bytes());
        buf.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn decodes_begin_relation_update_with_unchanged_toast_and_truncate() {
        let mut b = vec![b'B'];
        b.extend_from_slice(&0x0000_0001_0000_0010i64.to_be_bytes());
        b.extend_from_slice(&0i64.to_be_bytes());
        b.extend_from_slice(&7i32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: Lsn(0x1_0000_0010),
                commit_time: time::macros::datetime!(2000-01-01 0:00 UTC),
                xid: 7,
            }
        );

        let mut r = vec![b'R'];
        r.extend_from_slice(&16384i32.to_be_bytes());
        r.extend_from_slice(b"my schema\0we\"ird\0d");
        r.extend_from_slice(&2i16.to_be_bytes());
        for (name, oid) in [("id", 23i32), ("body", 25)] {
            r.push(1);
            r.extend_from_slice(name.as_bytes());
            r.push(0);
            r.extend_from_slice(&oid.to_be_bytes());
            r.extend_from_slice(&(-1i32).to_be_bytes());
        }
        let Message::Relation(rel) = decode(&r).unwrap() else {
            panic!("a relation")
        };
        assert_eq!(
            (
                rel.schema.as_str(),
                rel.name.as_str(),
                rel.collection.as_str()
            ),
            ("my schema", "we\"ird", "my schema.we\"ird")
        );
        assert_eq!(rel.columns[1].type_oid, 25);

        let mut u = change(b'U', 16384, b'N', 3);
        text(&mut u, "42");
        u.push(b'u');
        u.push(b'n');
        assert_eq!(
            decode(&u).unwrap(),
            Message::Update {
                relation: 16384,
                old: None,
                new: [Value::Text("42"), Value::Unchanged, Value::Null]
                    .into_iter()
                    .collect(),
            }
        );

        let mut t = vec![b'T'];
        t.extend_from_slice(&2i32.to_be_bytes());
        t.push(0);
        t.extend_from_slice(&1i32.to_be_bytes());
        t.extend_from_slice(&2i32.to_be_bytes());
        assert_eq!(
            decode(&t).unwrap(),
            Message::Truncate {
                relations: vec![1, 2]
            }
        );
    }

    #[test]
    fn truncated_or_unknown_messages_are_errors_not_panics() {
        assert!(decode(b"").is_err());
        assert!(decode(b"I\0\0").is_err());
        assert!(decode(b"Z").is_err());
        let mut u = change(b'I', 1, b'N', 1);
        u.push(b't');
        u.extend_from_slice(&100i32.to_be_bytes());
        u.extend_from_slice(b"short");
        assert!(decode(&u).is_err());
    }

    #[test]
    fn a_tuples_values_keep_their_text_exactly_and_bad_utf8_is_refused() {
        let values = ["", "é€😀", "line\nbreak", "a\\b", "x".repeat(70_000).leak()];
        let mut m = change(b'U', 7, b'K', 1);
        text(&mut m, "old");
        m.push(b'N');
        m.extend_from_slice(&(values.len() as i16 + 2).to_be_bytes());
        for v in values {
            text(&mut m, v);
        }
        m.push(b'n');
        m.push(b'u');
        let Message::Update { old, new, .. } = decode(&m).unwrap() else {
            panic!("an update")
        };
        let old = old.unwrap();
        assert_eq!(old.values().collect::<Vec<_>>(), [Value::Text("old")]);
        // Each tuple's text is allocated once, at its size (the old key's not at the message's).
        assert_eq!((old.text.len(), old.text.capacity()), (3, 3));
        assert_eq!(new.text.capacity(), new.text.len());
        let mut want: Vec<Value> = values.iter().map(|v| Value::Text(v)).collect();
        want.extend([Value::Null, Value::Unchanged]);
        assert_eq!(new.values().collect::<Vec<_>>(), want);
        assert_eq!(new.get(1), Some(Value::Text("é€😀")));
        assert_eq!(new.get(values.len() + 2), None);

        let mut bad = change(b'I', 7, b'N', 1);
        bad.push(b't');
        bad.extend_from_slice(&2i32.to_be_bytes());
        bad.extend_from_slice(&[0xc3, 0x28]);
        assert!(decode(&bad).is_err_and(|e| e.to_string().contains("not UTF-8")));
    }
}

//! Queries the proxy runs itself on a client's session (so they run as the client's role):
//! the extended protocol with statement and portal names of its own, one `Sync` at the end.
//! Notices and notifications that arrive meanwhile go on to the client.

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::login::read_message;
use crate::session::Session;
use crate::wire::{self, Message, Reader, WireError};

/// A query's parameters: types, formats and values, as the client's `Parse` and `Bind` gave
/// them, or the proxy's own (text).
#[derive(Clone, Debug, Default)]
pub(crate) struct Params {
    pub types: Vec<u32>,
    pub formats: Vec<i16>,
    pub values: Vec<Option<Vec<u8>>>,
}

/// One query of an exchange.
#[derive(Clone, Debug)]
pub(crate) struct Query {
    pub sql: String,
    pub params: Params,
    /// Result formats (empty: all text).
    pub result_formats: Vec<i16>,
}

impl Query {
    /// A query without parameters whose results come as text.
    pub(crate) fn text(sql: impl Into<String>) -> Self {
        Self {
            sql: sql.into(),
            params: Params::default(),
            result_formats: Vec::new(),
        }
    }
}

/// What one query returned.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    /// Its `RowDescription`, if it returns rows.
    pub description: Option<Message>,
    /// Its `DataRow`s.
    pub rows: Vec<Message>,
}

impl Rows {
    /// Every row's values as text (for queries run with text results).
    pub(crate) fn texts(&self) -> Result<Vec<Vec<Option<String>>>, WireError> {
        self.rows
            .iter()
            .map(|row| {
                let mut r = Reader::new(row.body());
                let n = r.i16()?;
                (0..n)
                    .map(|_| {
                        r.value()?
                            .map(|v| {
                                String::from_utf8(v.to_vec()).map_err(|_| {
                                    WireError::Malformed("a text value is not UTF-8".into())
                                })
                            })
                            .transpose()
                    })
                    .collect()
            })
            .collect()
    }
}

/// How an exchange ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Every query ran.
    Done(Vec<Rows>),
    /// A query failed with the target's `error` (the rest did not run).
    Failed { error: Message },
}

fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

impl Session {
    /// Runs `queries` on the target, in one implicit transaction (or inside the client's open
    /// one), and returns their rows. The target must owe the client nothing
    /// ([`Session::settle`]).
    pub(crate) async fn exchange(&mut self, queries: &[Query]) -> Result<Outcome, WireError> {
        self.exchanges += 1;
        let mut out = BytesMut::new();
        let mut body = BytesMut::new();
        let name = |i: usize| format!("_sluice_proxy_{i}");
        for i in 0..queries.len() {
            for kind in [b'S', b'P'] {
                body.clear();
                body.put_u8(kind);
                cstr(&mut body, &name(i));
                wire::encode_raw(b'C', &body, &mut out);
            }
        }
        for (i, q) in queries.iter().enumerate() {
            body.clear();
            cstr(&mut body, &name(i));
            cstr(&mut body, &q.sql);
            body.put_i16(q.params.types.len() as i16);
            for t in &q.params.types {
                body.put_u32(*t);
            }
            wire::encode_raw(b'P', &body, &mut out);
            body.clear();
            cstr(&mut body, &name(i));
            cstr(&mut body, &name(i));
            body.put_i16(q.params.formats.len() as i16);
            for f in &q.params.formats {
                body.put_i16(*f);
            }
            body.put_i16(q.params.values.len() as i16);
            for v in &q.params.values {
                match v {
                    None => body.put_i32(-1),
                    Some(v) => {
                        body.put_i32(v.len() as i32);
                        body.put_slice(v);
                    }
                }
            }
            body.put_i16(q.result_formats.len() as i16);
            for f in &q.result_formats {
                body.put_i16(*f);
            }
            wire::encode_raw(b'B', &body, &mut out);
            body.clear();
            body.put_u8(b'P');
            cstr(&mut body, &name(i));
            wire::encode_raw(b'D', &body, &mut out);
            body.clear();
            cstr(&mut body, &name(i));
            body.put_i32(0);
            wire::encode_raw(b'E', &body, &mut out);
        }
        wire::encode_raw(b'S', &[], &mut out);
        self.target.write_all(&out).await?;

        let mut results = Vec::new();
        let mut current = Rows::default();
        let mut failed: Option<Message> = None;
        loop {
            let message =
                read_message(&mut self.target, &mut self.from_target, wire::MESSAGE_LIMIT).await?;
            match message.kind {
                b'N' | b'A' | b'S' => self.client.write_all(&message.raw).await?,
                b'T' => current.description = Some(message),
                b'D' => current.rows.push(message),
                b'C' | b'I' => results.push(std::mem::take(&mut current)),
                b'E' if failed.is_none() => failed = Some(message),
                b'Z' => {
                    self.status = message.body().first().copied().unwrap_or(b'I');
                    break;
                }
                b'G' | b'H' | b'W' => {
                    return Err(WireError::Malformed(
                        "a query of the proxy's own started a COPY".into(),
                    ));
                }
                _ => {}
            }
        }
        Ok(match failed {
            Some(error) => Outcome::Failed { error },
            None => Outcome::Done(results),
        })
    }
}

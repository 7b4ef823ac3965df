//! Recognising writes to synced tables in the message flow: the cheap look at every statement
//! ([`Session::may_take`]), prepared statements and portals that may write one, and the close
//! look that resolves a statement's table in the client's session. What a write then does is
//! in [`crate::apply`].
//!
//! In the extended protocol the client's `Parse`, `Bind` and `Describe` go to the target as
//! usual (so descriptions and parameter types are the target's own); only `Execute` of such
//! a portal is taken.
use bytes::{BufMut, BytesMut};
use sluice_core::sql::quote_ident;
use sluice_pg::sqlstate;
use tokio::io::AsyncWriteExt;

use crate::apply::{Failure, Resolved};
use crate::internal::{Outcome, Params, Query, Rows};
use crate::session::Session;
use crate::statement::{self, Form, literal};
use crate::wire::{self, Message, Reader, Report, WireError};

/// A prepared statement whose text names a synced table.
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    sql: String,
    types: Vec<u32>,
}

/// A portal bound to a [`Prepared`] statement.
#[derive(Clone, Debug)]
pub(crate) struct Bound {
    statement: String,
    prepared: Prepared,
    params: Params,
    result_formats: Vec<i16>,
    /// The `Bind` itself, to bind the portal again if a query of the proxy's own ended the
    /// transaction it lived in.
    raw: Vec<u8>,
}

/// What looking closely at a statement found.
enum Resolution {
    /// It writes no synced table: forward it.
    Forward,
    /// It does: apply it.
    Write(Resolved),
    /// It does, in a way the proxy refuses.
    Refuse(Report),
}

impl Session {
    /// Whether `message` may be one the proxy takes (a cheap look: the statement's text names
    /// a synced table, or the portal is bound to such a statement). Keeps track of prepared
    /// statements and portals either way.
    pub(crate) fn may_take(&mut self, message: &Message) -> Result<bool, WireError> {
        if self.tables.is_empty() || self.shared.write_back.is_none() {
            return Ok(false);
        }
        let mut body = Reader::new(message.body());
        match message.kind {
            b'Q' => Ok(self.names_synced(body.cstr()?)),
            b'P' => {
                let name = body.cstr()?.to_owned();
                let sql = body.cstr()?;
                if self.names_synced(sql) {
                    let sql = sql.to_owned();
                    let n = body.i16()?;
                    let types = (0..n.max(0))
                        .map(|_| body.i32().map(|t| t as u32))
                        .collect::<Result<_, _>>()?;
                    self.statements.insert(name, Prepared { sql, types });
                } else {
                    self.statements.remove(&name);
                }
                Ok(false)
            }
            b'B' => {
                let portal = body.cstr()?.to_owned();
                let statement = body.cstr()?.to_owned();
                match self.statements.get(&statement) {
                    Some(prepared) => {
                        let prepared = prepared.clone();
                        let (params, result_formats) = bind_params(&mut body, &prepared)?;
                        self.portals.insert(
                            portal,
                            Bound {
                                statement,
                                prepared,
                                params,
                                result_formats,
                                raw: message.raw.to_vec(),
                            },
                        );
                    }
                    None => {
                        self.portals.remove(&portal);
                    }
                }
                Ok(false)
            }
            b'C' => {
                let kind = body.take(1)?[0];
                let name = body.cstr()?;
                if kind == b'S' {
                    self.statements.remove(name);
                } else {
                    self.portals.remove(name);
                }
                Ok(false)
            }
            b'E' => Ok(self.portals.contains_key(body.cstr()?)),
            _ => Ok(false),
        }
    }

    fn names_synced(&self, sql: &str) -> bool {
        let lower = sql.to_lowercase();
        self.tables
            .iter()
            .any(|t| lower.contains(&t.table.to_lowercase()))
    }

    /// Takes `message` if it writes a synced table; `false`: forward it after all.
    pub(crate) async fn take(&mut self, message: &Message) -> Result<bool, WireError> {
        let mut body = Reader::new(message.body());
        match message.kind {
            b'Q' => {
                let sql = body.cstr()?.to_owned();
                if !self.settle().await? {
                    return Ok(false);
                }
                let resolved = match self.resolve(&sql).await? {
                    Resolution::Forward => return Ok(false),
                    Resolution::Refuse(report) => Err(Failure::Report(report)),
                    Resolution::Write(resolved) => {
                        self.apply(&resolved, &Params::default(), &[], true).await?
                    }
                };
                self.answer(resolved, true).await?;
                Ok(true)
            }
            b'E' => {
                let portal = body.cstr()?;
                let Some(bound) = self.portals.get(portal).cloned() else {
                    return Ok(false);
                };
                if !self.settle().await? {
                    // The target skips everything up to the client's Sync after an error, and
                    // so does the proxy.
                    self.skipping_to_sync = true;
                    return Ok(true);
                }
                let status = self.status;
                let exchanges = self.exchanges;
                let resolved = match self.resolve(&bound.prepared.sql).await? {
                    Resolution::Forward => {
                        // A query of the proxy's own ended the transaction, and the portal
                        // with it: bind it again for the client's Execute.
                        if self.exchanges != exchanges && status == b'I' {
                            self.rebind(&bound).await?;
                        }
                        return Ok(false);
                    }
                    Resolution::Refuse(report) => Err(Failure::Report(report)),
                    Resolution::Write(resolved) => {
                        let params = self.typed(&bound).await?;
                        self.apply(&resolved, &params, &bound.result_formats, false)
                            .await?
                    }
                };
                self.answer(resolved, false).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The portal's parameters with every type known: where the client left one to the
    /// server (0), the target's own description of the statement says it.
    async fn typed(&mut self, bound: &Bound) -> Result<Params, WireError> {
        let mut params = bound.params.clone();
        let n = params.values.len();
        if bound.prepared.types.len() >= n && bound.prepared.types.iter().take(n).all(|t| *t != 0) {
            params.types = bound.prepared.types[..n].to_vec();
            return Ok(params);
        }
        let mut out = BytesMut::new();
        let mut body = BytesMut::new();
        body.put_u8(b'S');
        body.put_slice(bound.statement.as_bytes());
        body.put_u8(0);
        wire::encode_raw(b'D', &body, &mut out);
        // Flush, not Sync: the client's portal lives until its own Sync.
        wire::encode_raw(b'H', &[], &mut out);
        self.target.write_all(&out).await?;
        loop {
            let message = crate::login::read_message(
                &mut self.target,
                &mut self.from_target,
                wire::MESSAGE_LIMIT,
            )
            .await?;
            match message.kind {
                b't' => {
                    let mut r = Reader::new(message.body());
                    let count = r.i16()?;
                    params.types = (0..count.max(0))
                        .map(|_| r.i32().map(|t| t as u32))
                        .collect::<Result<_, _>>()?;
                }
                b'T' | b'n' => break,
                b'E' => {
                    return Err(WireError::Malformed(
                        "the target could not describe a statement it prepared".into(),
                    ));
                }
                b'N' | b'A' | b'S' => self.client.write_all(&message.raw).await?,
                _ => {}
            }
        }
        Ok(params)
    }

    /// Binds the client's portal again (its `BindComplete` is not the client's to see).
    async fn rebind(&mut self, bound: &Bound) -> Result<(), WireError> {
        let mut out = BytesMut::from(&bound.raw[..]);
        wire::encode_raw(b'H', &[], &mut out);
        self.target.write_all(&out).await?;
        loop {
            let message = crate::login::read_message(
                &mut self.target,
                &mut self.from_target,
                wire::MESSAGE_LIMIT,
            )
            .await?;
            match message.kind {
                b'2' => return Ok(()),
                b'E' => {
                    // As if the client's own Bind had failed: it hears why, and the target
                    // skips to its Sync.
                    self.client.write_all(&message.raw).await?;
                    self.skipping_to_sync = true;
                    return Ok(());
                }
                _ => self.client.write_all(&message.raw).await?,
            }
        }
    }

    /// Finds whether `sql` writes a synced table, resolving an unqualified name the way the
    /// client's session would.
    async fn resolve(&mut self, sql: &str) -> Result<Resolution, WireError> {
        let tables = self.tables.clone();
        let Some(writes) = statement::writes(sql, |name| tables.iter().any(|t| t.table == name))
        else {
            return Ok(Resolution::Forward);
        };
        for write in writes {
            let schema = match &write.relation.schema {
                Some(schema) => Some(schema.clone()),
                None => {
                    let query = Query::text(format!(
                        "SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = pg_catalog.to_regclass({})",
                        literal(&write.relation.regclass())
                    ));
                    match self.exchange(&[query]).await? {
                        Outcome::Done(rows) => rows
                            .first()
                            .map(Rows::texts)
                            .transpose()?
                            .and_then(|r| r.into_iter().next())
                            .and_then(|r| r.into_iter().next().flatten()),
                        Outcome::Failed { .. } => None,
                    }
                }
            };
            let Some(schema) = schema else { continue };
            let Some(table) = tables
                .iter()
                .find(|t| t.schema == schema && t.table == write.relation.name)
            else {
                continue;
            };
            return Ok(match write.form {
                Form::Unsupported(why) => Resolution::Refuse(Report::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "{}.{} is synced by sluice: {why}",
                        quote_ident(&table.schema),
                        quote_ident(&table.table)
                    ),
                )),
                Form::Plain(verb, statement) => Resolution::Write(Resolved {
                    table: table.clone(),
                    relation: write.relation,
                    verb,
                    statement,
                }),
            });
        }
        Ok(Resolution::Forward)
    }
}

/// A `Bind`'s parameter formats and values and its result formats (after the two names).
fn bind_params(
    body: &mut Reader<'_>,
    prepared: &Prepared,
) -> Result<(Params, Vec<i16>), WireError> {
    let n = body.i16()?.max(0);
    let formats = (0..n).map(|_| body.i16()).collect::<Result<Vec<_>, _>>()?;
    let n = body.i16()?.max(0);
    let values = (0..n)
        .map(|_| body.value().map(|v| v.map(<[u8]>::to_vec)))
        .collect::<Result<Vec<_>, _>>()?;
    let n = body.i16()?.max(0);
    let result_formats = (0..n).map(|_| body.i16()).collect::<Result<Vec<_>, _>>()?;
    Ok((
        Params {
            types: prepared.types.clone(),
            formats,
            values,
        },
        result_formats,
    ))
}

//! The replication connection: PostgreSQL's frontend/backend protocol, as much of it as a
//! `replication=database` session needs (TLS by the same `sslmode` rules as every other
//! connection, SCRAM-SHA-256 or password authentication, simple queries, and CopyBoth
//! streaming with standby status updates).
//!
//! sqlx has no replication support, and the crates.io replication clients either bring a
//! second TLS stack and date library or only the transport; this module is small and uses
//! ring for SCRAM. TLS is `sluice_pg::tls`: the same sslmode rules as every connection.

use std::time::Duration;

use secrecy::ExposeSecret;
use sluice_core::Error;
use sluice_pg::ConnectionSettings;
use sluice_pg::tls::Io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

mod reader;
mod scram;
use reader::READ_ROOM;
pub(crate) use reader::ReplicationReader;
use scram::Scram;

/// A log sequence number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl std::str::FromStr for Lsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::invalid(format!("not an LSN: {s:?}"));
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

/// One backend message: its type byte and body.
pub(crate) struct Message {
    pub kind: u8,
    pub body: Vec<u8>,
}

/// What the server sent while streaming. A message's data is lent from the reader's buffer,
/// which the next message reuses: no allocation per change.
pub(crate) enum Replication<'a> {
    /// WAL data: one pgoutput message.
    Data { payload: &'a [u8] },
    /// A keepalive: the server has sent everything up to `end`; `reply` asks for a status now.
    Keepalive { end: Lsn, reply: bool },
}

/// A session opened with `replication=database`.
pub(crate) struct ReplicationConnection {
    io: BufStream<Box<dyn Io>>,
}

fn lost(what: &str, e: std::io::Error) -> Error {
    Error::unavailable(format!("replication connection: {what}"), e)
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub(crate) const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

impl ReplicationConnection {
    /// Connects and authenticates as `settings` says, in replication mode.
    pub async fn connect(settings: &ConnectionSettings) -> Result<Self, Error> {
        let endpoint = settings.endpoint();
        let tcp = tokio::time::timeout(
            settings.connect_timeout,
            TcpStream::connect((settings.host.as_str(), settings.port)),
        )
        .await
        .map_err(|_| {
            Error::unavailable(
                format!("replication connection to {endpoint}: timed out"),
                "connect timeout",
            )
        })?
        .map_err(|e| lost(&format!("connecting to {endpoint}"), e))?;
        tcp.set_nodelay(true).ok();
        let io = sluice_pg::tls::negotiate_tls(tcp, settings).await?;
        let mut conn = Self {
            io: BufStream::with_capacity(READ_ROOM, 64 * 1024, io),
        };
        conn.startup(settings).await?;
        Ok(conn)
    }

    async fn startup(&mut self, settings: &ConnectionSettings) -> Result<(), Error> {
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for (k, v) in [
            ("user", settings.user.as_str()),
            ("database", settings.database.as_str()),
            ("replication", "database"),
            ("application_name", settings.application_name.as_str()),
            ("client_encoding", "UTF8"),
            // The text forms values are decoded from (the backfill session sets the same).
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
            ("bytea_output", "hex"),
        ] {
            cstr(&mut body, k);
            cstr(&mut body, v);
        }
        body.push(0);
        // The startup message is the one message without a type byte.
        let mut frame = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        write_frame(&mut self.io, &frame).await?;
        self.authenticate(settings).await?;
        loop {
            let m = self.read().await?;
            match m.kind {
                b'Z' => return Ok(()),
                b'S' | b'K' | b'N' => {}
                b'E' => return Err(server_error(&m.body, settings)),
                other => return Err(unexpected(other, "starting up")),
            }
        }
    }

    async fn authenticate(&mut self, settings: &ConnectionSettings) -> Result<(), Error> {
        let password = || {
            settings.password.as_ref().ok_or_else(|| {
                Error::configuration(
                    format!(
                        "{} asks for a password for {} and none is configured",
                        settings.endpoint(),
                        settings.user
                    ),
                    "set the source connection's password (from the environment or a file)",
                )
            })
        };
        let mut scram: Option<Scram> = None;
        loop {
            let m = self.read().await?;
            match m.kind {
                b'E' => return Err(server_error(&m.body, settings)),
                b'R' => {}
                other => return Err(unexpected(other, "authenticating")),
            }
            let mut r = Reader::new(&m.body);
            match r.i32()? {
                0 => return Ok(()),
                3 => {
                    let mut body = password()?.expose_secret().as_bytes().to_vec();
                    body.push(0);
                    self.send(b'p', &body).await?;
                }
                10 => {
                    let mechanisms = r.rest();
                    if !mechanisms.split(|b| *b == 0).any(|m| m == b"SCRAM-SHA-256") {
                        return Err(Error::configuration(
                            format!(
                                "{} offers no SASL mechanism sluice supports",
                                settings.endpoint()
                            ),
                            "use scram-sha-256 authentication for the replication user",
                        ));
                    }
                    let s = Scram::new(password()?.expose_secret());
                    let first = s.client_first();
                    let mut body = Vec::new();
                    cstr(&mut body, "SCRAM-SHA-256");
                    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
                    body.extend_from_slice(first.as_bytes());
                    self.send(b'p', &body).await?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| unexpected(b'R', "SCRAM"))?;
                    let last = s.client_final(r.rest())?;
                    self.send(b'p', last.as_bytes()).await?;
                }
                12 => {
                    let s = scram.as_ref().ok_or_else(|| unexpected(b'R', "SCRAM"))?;
                    s.verify_server(r.rest())?;
                }
                5 => {
                    return Err(Error::configuration(
                        format!(
                            "{} uses md5 password authentication, which sluice's replication connection does not support",
                            settings.endpoint()
                        ),
                        "switch the replication user to scram-sha-256: set password_encryption = 'scram-sha-256', reset the user's password, and use scram-sha-256 in pg_hba.conf",
                    ));
                }
                other => {
                    return Err(Error::configuration(
                        format!(
                            "{} asks for authentication method {other}, which sluice does not support",
                            settings.endpoint()
                        ),
                        "use scram-sha-256 or password authentication for the replication user",
                    ));
                }
            }
        }
    }

    /// Starts streaming `slot` from `from` (0/0: from the slot's confirmed position).
    pub async fn start_replication(
        &mut self,
        slot: &str,
        publication: &str,
        from: Lsn,
        messages: bool,
    ) -> Result<(), Error> {
        let publication = sluice_core::sql::quote_ident(publication);
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {from} (proto_version '1', publication_names {}{})",
            sluice_core::sql::quote_ident(slot),
            sluice_core::sql::quote_literal(&publication),
            if messages { ", messages 'true'" } else { "" },
        );
        let mut body = Vec::new();
        cstr(&mut body, &sql);
        self.send(b'Q', &body).await?;
        loop {
            let m = self.read().await?;
            match m.kind {
                b'W' => return Ok(()),
                b'E' => return Err(query_error(&m.body)),
                b'N' | b'S' => {}
                other => return Err(unexpected(other, "starting replication")),
            }
        }
    }

    /// Splits the streaming connection: messages are read on one side while status updates
    /// are written on the other (a read must never be cancelled half-way).
    pub fn split(self) -> (ReplicationReader, StatusWriter) {
        let (read, write) = tokio::io::split(self.io);
        (ReplicationReader::new(read), StatusWriter { io: write })
    }

    async fn send(&mut self, kind: u8, body: &[u8]) -> Result<(), Error> {
        write_frame(&mut self.io, &frame(kind, body)).await
    }

    async fn read(&mut self) -> Result<Message, Error> {
        read_message(&mut self.io).await
    }
}

/// A frontend message: its type byte, its length, its body.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(body.len() + 5);
    frame.push(kind);
    frame.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

async fn write_frame(io: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> Result<(), Error> {
    io.write_all(frame).await.map_err(|e| lost("writing", e))?;
    io.flush().await.map_err(|e| lost("writing", e))
}

async fn read_message(io: &mut (impl AsyncRead + Unpin)) -> Result<Message, Error> {
    let kind = io
        .read_u8()
        .await
        .map_err(|e| lost("the server closed the connection", e))?;
    let len = io.read_i32().await.map_err(|e| lost("reading", e))?;
    let mut body = vec![0; body_len(len)?];
    io.read_exact(&mut body)
        .await
        .map_err(|e| lost("reading", e))?;
    Ok(Message { kind, body })
}

/// The body's length of a message whose length field (itself included) is `len`.
fn body_len(len: i32) -> Result<usize, Error> {
    if !(4..=1 << 30).contains(&len) {
        return Err(Error::invalid(format!(
            "replication connection: bad message length {len}"
        )));
    }
    Ok(len as usize - 4)
}

/// The writing side: standby status updates.
pub(crate) struct StatusWriter {
    io: tokio::io::WriteHalf<BufStream<Box<dyn Io>>>,
}

impl StatusWriter {
    /// Tells the server everything up to `flushed` is durable on sluice's side, so the slot may
    /// release WAL before it.
    pub async fn send_status(&mut self, flushed: Lsn) -> Result<(), Error> {
        self.status(flushed, false).await
    }

    /// [`send_status`](Self::send_status), asking the server to answer at once with a keepalive
    /// that carries how far it has sent.
    pub async fn request_keepalive(&mut self, flushed: Lsn) -> Result<(), Error> {
        self.status(flushed, true).await
    }

    async fn status(&mut self, flushed: Lsn, reply: bool) -> Result<(), Error> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
        let mut body = vec![b'r'];
        for lsn in [flushed, flushed, flushed] {
            body.extend_from_slice(&lsn.0.to_be_bytes());
        }
        body.extend_from_slice(&((now as i64) - PG_EPOCH_OFFSET_MICROS).to_be_bytes());
        body.push(u8::from(reply));
        write_frame(&mut self.io, &frame(b'd', &body)).await
    }
}

fn cstr(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
}

/// Fields of an ErrorResponse: (severity, SQLSTATE, message, detail, hint).
fn error_fields(body: &[u8]) -> (String, String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut hint = String::new();
    for field in body.split(|b| *b == 0) {
        if let Some((&t, rest)) = field.split_first() {
            let v = String::from_utf8_lossy(rest).into_owned();
            match t {
                b'C' => code = v,
                b'M' => message = v,
                b'H' => hint = v,
                _ => {}
            }
        }
    }
    (code, message, hint)
}

fn query_error(body: &[u8]) -> Error {
    let (code, message, hint) = error_fields(body);
    let text = if hint.is_empty() {
        format!("source: {message} (SQLSTATE {code})")
    } else {
        format!("source: {message} (SQLSTATE {code}; {hint})")
    };
    use sluice_pg::Condition::{InUse, InsufficientPrivilege, UndefinedObject};
    match sluice_pg::condition(&code, None, &message) {
        // The slot or publication is missing, the slot is read by another process, or the
        // role may not use it.
        UndefinedObject | InUse | InsufficientPrivilege => Error::configuration(
            text,
            "run `sluice source check` for the fix (publication, slot and privileges)",
        ),
        _ => Error::unavailable(text, "replication"),
    }
}

fn server_error(body: &[u8], settings: &ConnectionSettings) -> Error {
    let (code, message, _) = error_fields(body);
    match sluice_pg::condition(&code, None, &message) {
        sluice_pg::Condition::Authentication => Error::configuration(
            format!(
                "{} refused the replication login of {}: {message}",
                settings.endpoint(),
                settings.user
            ),
            format!(
                "check the password, and that pg_hba.conf allows a replication connection for {} (a \"replication\" database line is not needed for logical replication; the database line must match {})",
                settings.user, settings.database
            ),
        ),
        sluice_pg::Condition::InsufficientPrivilege => Error::configuration(
            format!("{}: {message}", settings.endpoint()),
            format!(
                "alter user {} with replication;",
                sluice_core::sql::quote_ident(&settings.user)
            ),
        ),
        _ => Error::unavailable(
            format!("{}: {message} (SQLSTATE {code})", settings.endpoint()),
            "startup",
        ),
    }
}

fn unexpected(kind: u8, when: &str) -> Error {
    Error::invalid(format!(
        "replication connection: unexpected message {:?} while {when}",
        kind as char
    ))
}

/// A cursor over a message body; every read checks the length.
#[derive(Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn short() -> Error {
        Error::invalid("replication message ended early")
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Self::short());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.bytes(1)?[0])
    }

    pub fn i16(&mut self) -> Result<i16, Error> {
        Ok(i16::from_be_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }

    pub fn i32(&mut self) -> Result<i32, Error> {
        Ok(i32::from_be_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn i64(&mut self) -> Result<i64, Error> {
        Ok(i64::from_be_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn cstr(&mut self) -> Result<String, Error> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(Self::short)?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// How long to wait for the server before deciding the replication connection is dead:
/// the server sends keepalives at least every `wal_sender_timeout / 2` (30 s by default).
pub(crate) const SILENCE_LIMIT: Duration = Duration::from_secs(90);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_print_and_parse_like_postgres() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("nope".parse::<Lsn>().is_err());
    }
}

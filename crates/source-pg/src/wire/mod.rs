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

mod scram;
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
        (
            ReplicationReader {
                io: read,
                buf: Vec::new(),
                at: 0,
            },
            StatusWriter { io: write },
        )
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

/// How much the reader asks the socket for at once: every message already sent, up to this
/// (the connection's own read buffer is as large, so reads bypass it).
const READ_ROOM: usize = 256 * 1024;

/// The reading side of a streaming replication connection. Each read takes as much as the
/// socket holds into one buffer, and messages are then taken from it in place: one read
/// brings many changes, and [`Self::has_message`] tells whether the next one is already
/// here (so a caller can gather what arrived together and hand it on at once).
pub(crate) struct ReplicationReader {
    io: tokio::io::ReadHalf<BufStream<Box<dyn Io>>>,
    /// Bytes read; `buf[at..]` is not taken yet.
    buf: Vec<u8>,
    at: usize,
}

impl ReplicationReader {
    /// The next replication message; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Result<Option<Replication<'_>>, Error> {
        // XLogData's header: its type byte, the start and end of its WAL and the server's time.
        const DATA_HEADER: usize = 1 + 8 + 8 + 8;
        let data = loop {
            let (kind, size) = self.frame().await?;
            let body = self.at + 5..self.at + size;
            self.at += size;
            let body_bytes = &self.buf[body.clone()];
            match kind {
                b'd' => {
                    let mut r = Reader::new(body_bytes);
                    match r.u8()? {
                        b'w' if body_bytes.len() >= DATA_HEADER => break body,
                        b'w' => {
                            return Err(Error::invalid(
                                "replication connection: a WAL data message cut short",
                            ));
                        }
                        b'k' => {
                            let end = Lsn(r.i64()? as u64);
                            let _time = r.i64()?;
                            let reply = r.u8()? == 1;
                            return Ok(Some(Replication::Keepalive { end, reply }));
                        }
                        _ => {}
                    }
                }
                b'c' | b'C' | b'Z' => return Ok(None),
                b'E' => return Err(query_error(body_bytes)),
                _ => {}
            }
        };
        Ok(Some(Replication::Data {
            payload: &self.buf[data.start + DATA_HEADER..data.end],
        }))
    }

    /// Whether the next message is already read whole (or is already known to be malformed):
    /// [`Self::next`] then answers without waiting for the socket, unless that message is
    /// one it passes over.
    pub fn has_message(&self) -> bool {
        !matches!(self.framed(), Ok(None))
    }

    /// The type byte and whole size of the message at `at`, when all of it is buffered.
    fn framed(&self) -> Result<Option<(u8, usize)>, Error> {
        let rest = &self.buf[self.at..];
        let Some(header) = rest.get(..5) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
        let size = 5 + body_len(len)?;
        Ok((rest.len() >= size).then_some((header[0], size)))
    }

    /// Reads until the message at `at` is whole; returns its type byte and size.
    async fn frame(&mut self) -> Result<(u8, usize), Error> {
        loop {
            if let Some(frame) = self.framed()? {
                return Ok(frame);
            }
            // What is left of the buffer moves to its front; the room after it is at least
            // the rest of this message.
            self.buf.drain(..self.at);
            self.at = 0;
            let needed = match self.buf.get(1..5) {
                Some(len) => 5 + body_len(i32::from_be_bytes(len.try_into().expect("4 bytes")))?,
                None => 5,
            };
            if self.buf.capacity() > 4 * READ_ROOM && needed <= READ_ROOM {
                // A large message's room is not kept for the small ones after it.
                self.buf.shrink_to(READ_ROOM);
            }
            // Room for the whole of the connection's buffer: a read then goes straight
            // from the socket into this buffer.
            self.buf.reserve((needed - self.buf.len()).max(READ_ROOM));
            let read = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| lost("reading", e))?;
            if read == 0 {
                let what = if self.buf.is_empty() {
                    "the server closed the connection"
                } else {
                    "the server closed the connection in the middle of a message"
                };
                return Err(lost(what, std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
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
    use sluice_core::Xorshift;
    use tokio::io::DuplexStream;

    /// A reader over one end of an in-memory pipe, as `split` makes it.
    fn reader(io: DuplexStream) -> ReplicationReader {
        let io: Box<dyn Io> = Box::new(io);
        ReplicationConnection {
            io: BufStream::with_capacity(READ_ROOM, 64 * 1024, io),
        }
        .split()
        .0
    }

    /// A CopyData message holding XLogData whose pgoutput message is `payload`.
    fn wal(payload: &[u8]) -> Vec<u8> {
        let mut body = vec![b'w'];
        body.extend_from_slice(&[0; 24]);
        body.extend_from_slice(payload);
        frame(b'd', &body)
    }

    fn keepalive(end: u64, reply: bool) -> Vec<u8> {
        let mut body = vec![b'k'];
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&0i64.to_be_bytes());
        body.push(reply as u8);
        frame(b'd', &body)
    }

    /// What `next` gave, owned: a payload, or a keepalive's end.
    async fn take(r: &mut ReplicationReader) -> Result<Option<Result<Vec<u8>, u64>>, Error> {
        Ok(r.next().await?.map(|m| match m {
            Replication::Data { payload } => Ok(payload.to_vec()),
            Replication::Keepalive { end, .. } => Err(end.0),
        }))
    }

    #[tokio::test]
    async fn messages_that_arrived_together_are_taken_without_waiting_for_the_socket() {
        let (mut server, client) = tokio::io::duplex(1 << 20);
        let mut r = reader(client);
        let mut sent = Vec::new();
        for i in 0..300u32 {
            sent.extend(wal(format!("change {i}").as_bytes()));
        }
        sent.extend(keepalive(77, false));
        server.write_all(&sent).await.unwrap();

        assert!(!r.has_message(), "nothing is read before the first wait");
        assert_eq!(take(&mut r).await.unwrap(), Some(Ok(b"change 0".to_vec())));
        for i in 1..300 {
            // All of it came in the first read: each next message is already here.
            assert!(r.has_message(), "message {i}");
            let got = take(&mut r).await.unwrap();
            assert_eq!(got, Some(Ok(format!("change {i}").into_bytes())));
        }
        assert!(r.has_message());
        assert_eq!(take(&mut r).await.unwrap(), Some(Err(77)));
        assert!(!r.has_message(), "nothing more was sent");

        server.write_all(&frame(b'c', &[])).await.unwrap();
        assert_eq!(
            take(&mut r).await.unwrap(),
            None,
            "CopyDone ends the stream"
        );
    }

    #[tokio::test]
    async fn messages_cut_anywhere_and_one_larger_than_a_read_arrive_whole_and_in_order() {
        let (mut server, client) = tokio::io::duplex(64 * 1024);
        let mut r = reader(client);
        let mut rng = Xorshift::new(0x5eed);
        let mut expected: Vec<Result<Vec<u8>, u64>> = Vec::new();
        let mut sent = Vec::new();
        for i in 0..2000u64 {
            let payload: Vec<u8> = match i {
                // Larger than a read (and than four of them): the buffer grows for it.
                700 => (0..5 * READ_ROOM).map(|b| b as u8).collect(),
                _ if i % 97 == 0 => {
                    sent.extend(keepalive(i, i % 2 == 0));
                    expected.push(Err(i));
                    continue;
                }
                _ => (0..rng.below(600)).map(|_| rng.next_u64() as u8).collect(),
            };
            sent.extend(wal(&payload));
            expected.push(Ok(payload));
        }
        // Written in pieces of 1 to 8 bytes or up to 20,000, so that reads end inside
        // message headers and bodies alike.
        let writer = tokio::spawn(async move {
            let mut rest = sent.as_slice();
            while !rest.is_empty() {
                let n = match rng.below(2) {
                    0 => 1 + rng.below(8),
                    _ => 1 + rng.below(20_000),
                } as usize;
                let (piece, after) = rest.split_at(n.min(rest.len()));
                server.write_all(piece).await.unwrap();
                rest = after;
                tokio::task::yield_now().await;
            }
            server
        });
        for (i, want) in expected.iter().enumerate() {
            let got = take(&mut r).await.unwrap().expect("a message");
            assert!(&got == want, "message {i} differs");
            if i == 720 {
                // The large message's room is given back once small ones follow.
                assert!(r.buf.capacity() <= 2 * READ_ROOM, "{}", r.buf.capacity());
            }
        }
        assert!(!r.has_message());
        drop(writer.await.unwrap());
        let closed = take(&mut r).await.unwrap_err().to_string();
        assert!(
            closed.contains("the server closed the connection"),
            "{closed}"
        );
    }

    #[tokio::test]
    async fn a_connection_closed_inside_a_message_or_a_bad_length_is_an_error() {
        let (mut server, client) = tokio::io::duplex(1024);
        let mut r = reader(client);
        let whole = wal(b"cut short");
        server.write_all(&whole[..whole.len() - 3]).await.unwrap();
        drop(server);
        let e = take(&mut r).await.unwrap_err().to_string();
        assert!(e.contains("in the middle of a message"), "{e}");

        let (mut server, client) = tokio::io::duplex(1024);
        let mut r = reader(client);
        server.write_all(&[b'd', 0, 0, 0, 2]).await.unwrap();
        take(&mut r).await.unwrap_err();
        assert!(r.has_message(), "a bad length is known without waiting");
        let e = take(&mut r).await.unwrap_err().to_string();
        assert!(e.contains("bad message length 2"), "{e}");
    }

    #[test]
    fn lsns_print_and_parse_like_postgres() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("nope".parse::<Lsn>().is_err());
    }
}

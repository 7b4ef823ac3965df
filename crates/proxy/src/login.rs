//! A client's way in: TLS when configured, cancel requests passed to the target, and the
//! login relayed to the target so that the target itself checks the client's password.
//!
//! The proxy holds no password and no verifier. It relays SCRAM-SHA-256 between the client and
//! the target (never `-PLUS`: channel binding ties the exchange to one TLS connection, and
//! there are two), and refuses every other method: a target that lets a role in without a
//! password (`trust`) would let anyone who reaches the proxy in, and `md5` or a cleartext
//! password would have to be handled by the proxy. The target's own error (a wrong password)
//! goes back to the client unchanged.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use pgwire::messages::startup::Authentication;
use sluice_pg::sqlstate;
use sluice_pg::tls::Io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Shared;
use crate::wire::{
    self, CANCEL_REQUEST, GSSENC_REQUEST, Message, Reader, Report, SSL_REQUEST, WireError,
};

const SCRAM: &str = "SCRAM-SHA-256";

/// A logged-in client and its own connection to the target.
pub(crate) struct LoggedIn {
    pub client: Box<dyn Io>,
    pub target: Box<dyn Io>,
    /// Bytes the target sent after `AuthenticationOk` (parameters, key data, ready), read
    /// with the last login message and not yet forwarded.
    pub target_buffered: BytesMut,
    /// The client's role, as it logged in.
    pub user: String,
    /// The database it logged in to.
    pub database: String,
}

/// Reads one startup-phase packet.
async fn read_packet(
    io: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
) -> Result<Message, WireError> {
    loop {
        if let Some(packet) = wire::split_packet(buf)? {
            return Ok(packet);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Reads one typed message of at most `limit` bytes.
pub(crate) async fn read_message(
    io: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
    limit: usize,
) -> Result<Message, WireError> {
    loop {
        if let Some(message) = wire::split_message(buf, limit)? {
            return Ok(message);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Sends `report` as a FATAL error and gives up on the client.
async fn refuse(
    client: &mut (impl AsyncWriteExt + Unpin),
    report: Report,
) -> Result<Option<LoggedIn>, WireError> {
    let mut out = BytesMut::new();
    report.encode_error(&mut out);
    client.write_all(&out).await?;
    client.flush().await?;
    Ok(None)
}

fn code(packet: &Message) -> u32 {
    let b = packet.body();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Takes a new client connection through TLS and login. `None`: the connection is done (a
/// cancel request forwarded, or a refusal sent).
pub(crate) async fn login(
    shared: &Arc<Shared>,
    mut tcp: TcpStream,
) -> Result<Option<LoggedIn>, WireError> {
    let mut buf = BytesMut::with_capacity(512);
    let mut packet = read_packet(&mut tcp, &mut buf).await?;
    if code(&packet) == GSSENC_REQUEST {
        tcp.write_all(b"N").await?;
        packet = read_packet(&mut tcp, &mut buf).await?;
    }
    let mut client: Box<dyn Io> = if code(&packet) == SSL_REQUEST {
        match &shared.tls {
            Some(acceptor) => {
                if !buf.is_empty() {
                    // Bytes sent before the handshake would be read as if encrypted.
                    return Err(WireError::Malformed(
                        "data sent before the TLS handshake".into(),
                    ));
                }
                tcp.write_all(b"S").await?;
                let tls = acceptor.accept(tcp).await?;
                let mut client: Box<dyn Io> = Box::new(tls);
                packet = read_packet(&mut client, &mut buf).await?;
                client
            }
            None => {
                tcp.write_all(b"N").await?;
                packet = read_packet(&mut tcp, &mut buf).await?;
                Box::new(tcp)
            }
        }
    } else {
        if shared.tls.is_some() && code(&packet) != CANCEL_REQUEST {
            return refuse(
                &mut tcp,
                Report::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    "this proxy accepts only TLS connections",
                )
                .hint("connect with sslmode=require (or verify-full with the proxy's certificate)"),
            )
            .await;
        }
        Box::new(tcp)
    };
    match code(&packet) {
        CANCEL_REQUEST => {
            forward_cancel(shared, &packet).await;
            return Ok(None);
        }
        v if v >> 16 == 3 => {}
        SSL_REQUEST | GSSENC_REQUEST => {
            return Err(WireError::Malformed("a second encryption request".into()));
        }
        v => {
            return refuse(
                &mut client,
                Report::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("unsupported frontend protocol {}.{}", v >> 16, v & 0xffff),
                ),
            )
            .await;
        }
    }
    let parameters = startup_parameters(&packet)?;
    let user = parameters
        .iter()
        .find(|(k, _)| *k == "user")
        .map(|(_, v)| (*v).to_owned());
    let Some(user) = user else {
        return refuse(
            &mut client,
            Report::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                "no user name in the startup packet",
            ),
        )
        .await;
    };
    let database = parameters
        .iter()
        .find(|(k, _)| *k == "database")
        .map_or_else(|| user.clone(), |(_, v)| (*v).to_owned());
    if parameters
        .iter()
        .any(|(k, v)| *k == "replication" && !matches!(*v, "false" | "off" | "no" | "0"))
    {
        return refuse(
            &mut client,
            Report::fatal(
                sqlstate::FEATURE_NOT_SUPPORTED,
                "the proxy does not carry replication connections",
            )
            .hint("connect to the target itself for replication"),
        )
        .await;
    }
    let (mut target, encrypted) = match shared.connect_target().await {
        Ok(connected) => connected,
        Err(e) => {
            return refuse(
                &mut client,
                Report::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    format!("the proxy cannot reach the target: {}", e.problem()),
                )
                .hint(
                    e.fix()
                        .unwrap_or("check the target's connection settings")
                        .to_owned(),
                ),
            )
            .await;
        }
    };
    target.write_all(&packet.raw).await?;
    let mut from_target = BytesMut::with_capacity(1024);
    let mut from_client = buf;
    let mut scram = false;
    loop {
        let message = read_message(&mut target, &mut from_target, wire::STARTUP_LIMIT).await?;
        match message.kind {
            b'R' => {
                let mut body = Reader::new(message.body());
                match body.i32()? {
                    0 if scram => {
                        client.write_all(&message.raw).await?;
                        break;
                    }
                    0 => {
                        tracing::warn!(
                            user,
                            "proxy: the target let a role in without a password; refused"
                        );
                        return refuse(
                            &mut client,
                            Report::fatal(
                                sqlstate::INVALID_AUTHORIZATION,
                                format!("the target lets role {user:?} in without a password (trust), so the proxy cannot check who you are"),
                            )
                            .hint("give the role a password and use scram-sha-256 for it in the target's pg_hba.conf"),
                        )
                        .await;
                    }
                    10 => {
                        let mut offered = Vec::new();
                        while let Ok(m) = body.cstr() {
                            if m.is_empty() {
                                break;
                            }
                            offered.push(m);
                        }
                        if !offered.contains(&SCRAM) {
                            return refuse(
                                &mut client,
                                unsupported(&user, &format!("SASL {offered:?}")),
                            )
                            .await;
                        }
                        let mut out = BytesMut::new();
                        wire::encode(&Authentication::SASL(vec![SCRAM.to_owned()]), &mut out);
                        client.write_all(&out).await?;
                        let answer =
                            read_message(&mut client, &mut from_client, wire::STARTUP_LIMIT)
                                .await?;
                        let mut initial = Reader::new(answer.body());
                        if answer.kind != b'p' || initial.cstr()? != SCRAM {
                            return refuse(
                                &mut client,
                                Report::fatal(
                                    sqlstate::PROTOCOL_VIOLATION,
                                    "expected a SCRAM-SHA-256 initial response",
                                ),
                            )
                            .await;
                        }
                        if encrypted && initial.value()?.is_some_and(|d| d.starts_with(b"y")) {
                            return refuse(
                                &mut client,
                                Report::fatal(
                                    sqlstate::INVALID_AUTHORIZATION,
                                    "your client offers SCRAM channel binding, which cannot pass through the proxy to a TLS target",
                                )
                                .hint("connect with channel_binding=disable (the proxy's own TLS still protects the connection)"),
                            )
                            .await;
                        }
                        target.write_all(&answer.raw).await?;
                        scram = true;
                    }
                    11 => {
                        client.write_all(&message.raw).await?;
                        let answer =
                            read_message(&mut client, &mut from_client, wire::STARTUP_LIMIT)
                                .await?;
                        if answer.kind != b'p' {
                            return Err(WireError::Malformed("expected a SASL response".into()));
                        }
                        target.write_all(&answer.raw).await?;
                    }
                    12 => client.write_all(&message.raw).await?,
                    3 => {
                        return refuse(&mut client, unsupported(&user, "a cleartext password"))
                            .await;
                    }
                    5 => return refuse(&mut client, unsupported(&user, "an md5 password")).await,
                    other => {
                        return refuse(
                            &mut client,
                            unsupported(&user, &format!("authentication method {other}")),
                        )
                        .await;
                    }
                }
            }
            b'E' | b'v' | b'N' => {
                client.write_all(&message.raw).await?;
                if message.kind == b'E' {
                    return Ok(None);
                }
            }
            other => {
                return Err(WireError::Malformed(format!(
                    "the target sent message {:?} during login",
                    other as char
                )));
            }
        }
    }
    if !from_client.is_empty() {
        return Err(WireError::Malformed(
            "data sent before the login finished".into(),
        ));
    }
    Ok(Some(LoggedIn {
        client,
        target,
        target_buffered: from_target,
        user,
        database,
    }))
}

fn unsupported(user: &str, method: &str) -> Report {
    Report::fatal(
        sqlstate::INVALID_AUTHORIZATION,
        format!("the target asks role {user:?} for {method}; the proxy relays only SCRAM-SHA-256 logins"),
    )
    .hint(format!(
        "on the target: SET password_encryption = 'scram-sha-256'; ALTER ROLE {user} PASSWORD '…'; and use scram-sha-256 for it in pg_hba.conf"
    ))
}

/// The startup packet's `(name, value)` pairs.
fn startup_parameters(packet: &Message) -> Result<Vec<(&str, &str)>, WireError> {
    let mut body = Reader::new(&packet.body()[4..]);
    let mut parameters = Vec::new();
    loop {
        let name = body.cstr()?;
        if name.is_empty() {
            return Ok(parameters);
        }
        parameters.push((name, body.cstr()?));
    }
}

/// Passes a cancel request on to the target, which checks its key; the client gets no answer
/// either way (as from PostgreSQL itself).
async fn forward_cancel(shared: &Arc<Shared>, packet: &Message) {
    match shared.connect_target().await {
        Ok((mut target, _)) => {
            let mut out = BytesMut::with_capacity(packet.raw.len());
            out.put_slice(&packet.raw);
            if let Err(e) = target.write_all(&out).await {
                tracing::debug!(error = %e, "proxy: forwarding a cancel request failed");
            }
            let _ = target.read(&mut [0u8; 1]).await;
        }
        Err(e) => tracing::warn!(error = %e, "proxy: cannot forward a cancel request"),
    }
}

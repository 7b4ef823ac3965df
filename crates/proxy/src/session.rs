//! A logged-in client's session: messages relayed both ways, one at a time in order, with
//! statements that write synced tables taken out of the stream and applied upstream first
//! ([`crate::write`]).
//!
//! The relay frames messages in both directions. From the client it needs whole messages to
//! look at statements; from the target it counts `ReadyForQuery`, so that it knows when the
//! target is idle (nothing the client sent is still being answered) and the transaction state
//! the target reports (`I`dle, in a `T`ransaction, `E`rror).

use std::sync::Arc;

use bytes::BytesMut;
use sluice_pg::sqlstate;
use sluice_pg::tls::Io;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Shared;
use crate::login::{LoggedIn, read_message};
use crate::wire::{self, Message, Report, WireError};

/// One client's relay.
pub(crate) struct Session {
    pub(crate) shared: Arc<Shared>,
    pub(crate) client: Box<dyn Io>,
    pub(crate) target: Box<dyn Io>,
    /// Read from the client, not yet handled.
    from_client: BytesMut,
    /// Read from the target, not yet forwarded.
    pub(crate) from_target: BytesMut,
    /// `ReadyForQuery` messages the target still owes (one per `Query`, `Sync`, function call).
    pending: usize,
    /// The transaction state of the last `ReadyForQuery`.
    pub(crate) status: u8,
    /// The client's role.
    pub(crate) user: String,
    /// The client's database.
    pub(crate) database: String,
    /// After an error in the extended protocol, messages up to the next `Sync` are skipped
    /// (as the server itself does).
    pub(crate) skipping_to_sync: bool,
}

enum Event {
    Client(std::io::Result<usize>),
    Target(std::io::Result<usize>),
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, logged_in: LoggedIn) -> Self {
        Self {
            shared,
            client: logged_in.client,
            target: logged_in.target,
            from_client: BytesMut::with_capacity(8 << 10),
            from_target: logged_in.target_buffered,
            // The target finishes its login with one ReadyForQuery.
            pending: 1,
            status: b'I',
            user: logged_in.user,
            database: logged_in.database,
            skipping_to_sync: false,
        }
    }

    /// Relays until either side closes.
    pub(crate) async fn relay(mut self) -> Result<(), WireError> {
        self.forward_from_target().await?;
        loop {
            let event = tokio::select! {
                n = self.client.read_buf(&mut self.from_client) => Event::Client(n),
                n = self.target.read_buf(&mut self.from_target) => Event::Target(n),
            };
            match event {
                Event::Client(n) => {
                    if n? == 0 {
                        return Ok(());
                    }
                    if !self.handle_client().await? {
                        return Ok(());
                    }
                }
                Event::Target(n) => {
                    if n? == 0 {
                        let mut out = BytesMut::new();
                        Report::fatal(
                            sqlstate::CONNECTION_FAILURE,
                            "the target closed the connection",
                        )
                        .encode_error(&mut out);
                        let _ = self.client.write_all(&out).await;
                        return Ok(());
                    }
                    self.forward_from_target().await?;
                }
            }
        }
    }

    /// Handles every whole message the client has sent; `false` once it said goodbye.
    async fn handle_client(&mut self) -> Result<bool, WireError> {
        let mut to_target = BytesMut::new();
        loop {
            let message = match wire::split_message(&mut self.from_client, wire::MESSAGE_LIMIT) {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    let mut out = BytesMut::new();
                    Report::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!("invalid message: {e}"),
                    )
                    .encode_error(&mut out);
                    self.target.write_all(&to_target).await?;
                    let _ = self.client.write_all(&out).await;
                    return Err(e);
                }
            };
            match message.kind {
                b'X' => {
                    to_target.extend_from_slice(&message.raw);
                    self.target.write_all(&to_target).await?;
                    return Ok(false);
                }
                b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'H' | b'S' => {
                    if self.takes(&message) {
                        self.target.write_all(&to_target).await?;
                        to_target.clear();
                        self.handle(message).await?;
                        continue;
                    }
                    if matches!(message.kind, b'Q' | b'S') {
                        self.pending += 1;
                        self.skipping_to_sync = false;
                    }
                    to_target.extend_from_slice(&message.raw);
                }
                b'F' => {
                    self.pending += 1;
                    to_target.extend_from_slice(&message.raw);
                }
                _ => to_target.extend_from_slice(&message.raw),
            }
        }
        if !to_target.is_empty() {
            self.target.write_all(&to_target).await?;
        }
        Ok(true)
    }

    /// Forwards every whole message the target has sent, noting each `ReadyForQuery`.
    pub(crate) async fn forward_from_target(&mut self) -> Result<(), WireError> {
        let mut to_client = BytesMut::new();
        while let Some(message) = wire::split_message(&mut self.from_target, wire::MESSAGE_LIMIT)? {
            self.note(&message);
            if to_client.is_empty() {
                to_client = message.raw;
            } else {
                to_client.extend_from_slice(&message.raw);
            }
        }
        if !to_client.is_empty() {
            self.client.write_all(&to_client).await?;
        }
        Ok(())
    }

    fn note(&mut self, message: &Message) {
        if message.kind == b'Z' {
            self.pending = self.pending.saturating_sub(1);
            self.status = message.body().first().copied().unwrap_or(b'I');
        }
    }

    /// Forwards what the target sends until it owes nothing, so the proxy may use the
    /// connection itself.
    pub(crate) async fn settle(&mut self) -> Result<(), WireError> {
        while self.pending > 0 {
            let message =
                read_message(&mut self.target, &mut self.from_target, wire::MESSAGE_LIMIT).await?;
            self.note(&message);
            self.client.write_all(&message.raw).await?;
        }
        Ok(())
    }
}

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
    /// After the proxy answered an extended-protocol message with an error, the client's
    /// messages up to its next `Sync` are dropped (as the server itself would skip them).
    pub(crate) skipping_to_sync: bool,
    /// Responses the target still owes for extended-protocol messages forwarded since the
    /// last `Sync` (one per `Parse`, `Bind`, `Close`, `Execute`, portal `Describe`; two per
    /// statement `Describe`).
    owed: usize,
    /// The target reported an error in the extended protocol and skips messages until `Sync`.
    target_skipping: bool,
    /// The synced tables as of this batch of client messages.
    pub(crate) tables: Arc<Vec<crate::catalog::SyncedTable>>,
    /// Prepared statements that may write a synced table, by name.
    pub(crate) statements: std::collections::HashMap<String, crate::write::Prepared>,
    /// Portals bound to those, by name.
    pub(crate) portals: std::collections::HashMap<String, crate::write::Bound>,
    /// Exchanges the proxy has run on the target (each ends with its own `Sync`).
    pub(crate) exchanges: u64,
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
            skipping_to_sync: false,
            owed: 0,
            target_skipping: false,
            tables: Default::default(),
            statements: Default::default(),
            portals: Default::default(),
            exchanges: 0,
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
        self.tables = self.shared.tables().await;
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
            if self.skipping_to_sync && message.kind != b'S' {
                continue;
            }
            if self.may_take(&message)? {
                if !to_target.is_empty() {
                    self.target.write_all(&to_target).await?;
                    to_target.clear();
                }
                if self.take(&message).await? {
                    continue;
                }
            }
            match message.kind {
                b'X' => {
                    to_target.extend_from_slice(&message.raw);
                    self.target.write_all(&to_target).await?;
                    return Ok(false);
                }
                b'Q' | b'F' => self.pending += 1,
                b'S' => {
                    self.pending += 1;
                    self.skipping_to_sync = false;
                }
                b'P' | b'B' | b'C' | b'E' => self.owed += 1,
                b'D' => {
                    self.owed += if message.body().first() == Some(&b'S') {
                        2
                    } else {
                        1
                    }
                }
                _ => {}
            }
            to_target.extend_from_slice(&message.raw);
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
        match message.kind {
            b'Z' => {
                self.pending = self.pending.saturating_sub(1);
                self.status = message.body().first().copied().unwrap_or(b'I');
                self.owed = 0;
                self.target_skipping = false;
            }
            b'E' if self.owed > 0 => {
                self.owed = 0;
                self.target_skipping = true;
            }
            b'1' | b'2' | b'3' | b't' | b'T' | b'n' | b'C' | b'I' | b's' => {
                self.owed = self.owed.saturating_sub(1);
            }
            _ => {}
        }
    }

    /// Forwards what the target sends until it owes the client nothing, so the proxy may use
    /// the connection itself. `false` when the target is skipping messages after an error
    /// (then the proxy must not run anything before the client's `Sync`).
    pub(crate) async fn settle(&mut self) -> Result<bool, WireError> {
        if self.owed > 0 {
            let mut flush = BytesMut::new();
            wire::encode_raw(b'H', &[], &mut flush);
            self.target.write_all(&flush).await?;
        }
        while self.owed > 0 || self.pending > 0 {
            let message =
                read_message(&mut self.target, &mut self.from_target, wire::MESSAGE_LIMIT).await?;
            if matches!(message.kind, b'G' | b'H' | b'W') {
                return Err(WireError::Malformed(
                    "a COPY started in the same pipeline as a write to a synced table; send a Sync between them".into(),
                ));
            }
            self.note(&message);
            self.client.write_all(&message.raw).await?;
        }
        Ok(!self.target_skipping)
    }
}

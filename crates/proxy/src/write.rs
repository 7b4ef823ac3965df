//! Statements that write synced tables (interim: none are recognised yet).

use crate::session::Session;
use crate::wire::{Message, WireError};

impl Session {
    /// Whether the proxy handles `message` itself instead of forwarding it.
    pub(crate) fn takes(&self, _message: &Message) -> bool {
        false
    }

    /// Handles a message [`takes`](Session::takes) chose.
    pub(crate) async fn handle(&mut self, message: Message) -> Result<(), WireError> {
        let _ = message;
        Ok(())
    }
}

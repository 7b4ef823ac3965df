//! Where a consumer's status transitions go: the log always, and any other [`AlertSink`]
//! attached (`sluice serve` alerts people from health reports instead: `sluice-alerts`).

use async_trait::async_trait;
use sluice_core::{Error, Status, Transition};

/// Receives every status transition of the entities it is attached to.
#[async_trait]
pub trait AlertSink: Send + Sync {
    /// Delivers one transition. Failures are logged by the caller, never retried forever.
    async fn send(&self, transition: &Transition) -> Result<(), Error>;
}

/// Logs transitions with `tracing`: a warning when things get worse, info when they recover.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogSink;

#[async_trait]
impl AlertSink for LogSink {
    async fn send(&self, t: &Transition) -> Result<(), Error> {
        if t.to > t.from && t.to != Status::Healthy {
            tracing::warn!(entity = %t.entity, from = %t.from, to = %t.to, reason = %t.reason, "status changed");
        } else {
            tracing::info!(entity = %t.entity, from = %t.from, to = %t.to, "status changed");
        }
        Ok(())
    }
}

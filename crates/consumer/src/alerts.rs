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

/// Logs transitions with `tracing`: a warning when things get worse in a way someone may need
/// to act on, info otherwise (see [`needs_attention`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct LogSink;

#[async_trait]
impl AlertSink for LogSink {
    async fn send(&self, t: &Transition) -> Result<(), Error> {
        if needs_attention(t.from, t.to) {
            tracing::warn!(entity = %t.entity, from = %t.from, to = %t.to, reason = %t.reason, "status changed");
        } else {
            tracing::info!(entity = %t.entity, from = %t.from, to = %t.to, reason = %t.reason, "status changed");
        }
        Ok(())
    }
}

/// Whether going `from` → `to` is worth a warning: worse, and to `warning`, `paused` or
/// `error`. Going to `initializing` (starting, or a backfill begun) is expected work, and
/// getting better is good news: both are info.
fn needs_attention(from: Status, to: Status) -> bool {
    to > from && to > Status::Initializing
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    #[test]
    fn a_backfill_beginning_is_not_a_warning_and_trouble_is() {
        assert!(!needs_attention(Healthy, Initializing));
        for to in [Warning, Paused, Error] {
            assert!(needs_attention(Healthy, to), "healthy → {to}");
            assert!(needs_attention(Initializing, to), "initializing → {to}");
        }
        assert!(needs_attention(Warning, Error));
        for (from, to) in [(Error, Healthy), (Error, Warning), (Warning, Initializing)] {
            assert!(!needs_attention(from, to), "{from} → {to}");
        }
    }
}

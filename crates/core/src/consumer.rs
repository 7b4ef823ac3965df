//! The consumer contract.

use std::fmt;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{Health, RecordFilter, Result};

/// A consumer's stable name, as configured; it keys checkpoints in targets and cursors in
/// the stream, so renaming a consumer starts it over from a backfill.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct ConsumerId(pub String);

impl From<&str> for ConsumerId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl fmt::Display for ConsumerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Forwards the records passing one filter from the stream into one target layout.
///
/// Contract: a consumer reads `seq > checkpoint`, applies in batches through
/// [`crate::Target::apply`] (checkpoint in the same transaction), and acknowledges the new
/// checkpoint to the stream only after the target committed it. Pausing stops new batches
/// after the in-flight one finishes or is abandoned; nothing is lost either way, because the
/// checkpoint never moves past what the target holds.
#[async_trait]
pub trait Consumer: Health {
    /// The consumer's name.
    fn id(&self) -> &ConsumerId;

    /// Which records it forwards.
    fn filter(&self) -> &RecordFilter;

    /// Stops forwarding until [`resume`](Consumer::resume); `reason` shows in health.
    async fn pause(&self, reason: String) -> Result<()>;

    /// Continues from the stored checkpoint.
    async fn resume(&self) -> Result<()>;

    /// Moves the checkpoint back to the start, so the target is backfilled again.
    async fn restart_backfill(&self) -> Result<()>;
}

//! The consumer's handle: what `sluice serve`, the API and tests hold to observe a running
//! consumer (cursor, stats, health) and control it (pause, resume, restart the backfill).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use sluice_core::{Consumer, ConsumerId, Error, Health, HealthReport, RecordFilter, Seq, Status};
use time::OffsetDateTime;

use crate::histogram::HistogramSnapshot;
use crate::runtime::{Control, Shared};

/// How long a pause request waits for the consumer to take it in (a batch being written
/// finishes first).
const PAUSE_TAKES_EFFECT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a consumer has done since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ConsumerStats {
    /// Records written to the target.
    pub applied: u64,
    /// Batches written.
    pub batches: u64,
    /// Time spent applying batches, in total.
    pub batch_seconds: f64,
    /// How long each batch took to write.
    pub batch_duration: HistogramSnapshot,
    /// From each change upstream (its `upstream_updated_at`) to its commit in the target.
    pub change_to_target: HistogramSnapshot,
}

/// Controls and observes a running consumer (implements [`Consumer`] and [`Health`]).
#[derive(Clone)]
pub struct ConsumerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl ConsumerHandle {
    /// The last checkpoint applied (and acknowledged) by the running loop.
    pub fn cursor(&self) -> Seq {
        Seq(self.shared.cursor.load(Ordering::Acquire))
    }

    /// Counters since the runtime started, for metrics.
    pub fn stats(&self) -> ConsumerStats {
        ConsumerStats {
            applied: self.shared.applied.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            batch_seconds: self.shared.batch_micros.load(Ordering::Relaxed) as f64 / 1e6,
            batch_duration: self.shared.batch_seconds.snapshot(),
            change_to_target: self.shared.latency.snapshot(),
        }
    }

    /// The consumer's id.
    pub fn id(&self) -> &ConsumerId {
        &self.shared.id
    }

    /// When the consumer last wrote a batch.
    pub fn last_write(&self) -> Option<OffsetDateTime> {
        *self
            .shared
            .last_write
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The last error, if any batch failed.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[async_trait]
impl Health for ConsumerHandle {
    async fn health(&self) -> HealthReport {
        self.shared.lag_check().await;
        self.shared
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report()
    }
}

#[async_trait]
impl Consumer for ConsumerHandle {
    fn id(&self) -> &ConsumerId {
        &self.shared.id
    }

    fn filter(&self) -> &RecordFilter {
        &self.shared.filter
    }

    /// Asks the consumer to pause and waits, up to [`PAUSE_TAKES_EFFECT`], until it has (after
    /// the batch it may be writing): its health says paused when this returns, so a status
    /// read right after the request shows it.
    async fn pause(&self, reason: String) -> Result<(), Error> {
        let reason = format!("by user: {reason}");
        self.shared
            .control
            .send_replace(Control::Pause(reason.clone()));
        let paused = format!("paused {reason}");
        let deadline = tokio::time::Instant::now() + PAUSE_TAKES_EFFECT;
        while tokio::time::Instant::now() < deadline {
            let report = self
                .shared
                .health
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .report();
            if report
                .checks
                .iter()
                .any(|c| c.name == "state" && c.status == Status::Paused && c.message == paused)
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn resume(&self) -> Result<(), Error> {
        self.shared.control.send_replace(Control::Run);
        Ok(())
    }

    async fn restart_backfill(&self) -> Result<(), Error> {
        self.shared.restart.store(true, Ordering::Release);
        // Wake the loop if it is waiting for records.
        self.shared.control.send_modify(|_| {});
        Ok(())
    }
}

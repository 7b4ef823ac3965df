//! The consumer runtime.
//!
//! `sluice-consumer` owns the loop that forwards records from a `RecordStream` into a
//! `Target`: read `seq > checkpoint` through the consumer's filter, batch by size and by time,
//! apply with the checkpoint in the same transaction, acknowledge to the stream, and wait for
//! new appends (woken by the stream, not by a polling sleep). Backfill (reading from the
//! start) and real time are the same loop. When the target is unreachable the
//! consumer pauses itself, retries with capped exponential backoff and jitter, and catches up
//! when the target is back; a user can pause and resume it too. It reports lag, the last
//! successful write and the last error as health, and sends status transitions to alert sinks
//! (the log always; `sluice serve` alerts people from health reports through `sluice-alerts`).
//!
//! It must not issue SQL or know a layout: everything target-specific goes through the
//! `Target` trait, and retries follow the error's class here, in one place.
//!
//! ```no_run
//! # async fn example(stream: std::sync::Arc<dyn sluice_core::RecordStream>, target: std::sync::Arc<dyn sluice_core::Target>) {
//! use sluice_consumer::ConsumerRuntime;
//! use sluice_core::{BatchConfig, ConsumerId, LagThresholds, Provider, RecordFilter};
//!
//! let runtime = ConsumerRuntime::new(
//!     ConsumerId::from("orders"),
//!     RecordFilter::Provider(Provider::Postgres),
//!     stream,
//!     target,
//!     BatchConfig::default(),
//!     LagThresholds::default(),
//! );
//! let handle = runtime.handle(); // pause, resume, restart the backfill, health
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let task = tokio::spawn(runtime.run(stopped));
//! // … later:
//! stop.send_replace(true);
//! task.await.unwrap();
//! # let _ = handle; }
//! ```

mod alerts;
mod handle;
mod histogram;
mod lag;
mod runtime;

pub use alerts::{AlertSink, LogSink};
pub use handle::{ConsumerHandle, ConsumerStats};
pub use histogram::{BOUNDS as HISTOGRAM_BOUNDS, HistogramSnapshot};
pub use runtime::ConsumerRuntime;
pub use sluice_core::Consumer;

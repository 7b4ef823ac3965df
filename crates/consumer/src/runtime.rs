//! The consumer loop: read, batch, apply, acknowledge; retries by error class; lag and health.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::{
    Backoff, Batch, BatchConfig, ConsumerId, EntityKind, EntityRef, Error, ErrorClass, HealthState,
    LagThresholds, READ_BYTES, RecordFilter, RecordStream, Seq, Status, StreamEntry, StreamRead,
    Target, Transition, payload_bytes,
};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::alerts::{AlertSink, LogSink};
use crate::handle::ConsumerHandle;
use crate::histogram::Histogram;

/// What the user asked the consumer to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Run,
    /// Paused, and why (`by user: …`, or the record that cannot be written).
    Pause(String),
}

/// State shared between the running loop and its handles.
pub(crate) struct Shared {
    pub(crate) id: ConsumerId,
    pub(crate) filter: RecordFilter,
    pub(crate) stream: Arc<dyn RecordStream>,
    /// The target takes payloads as stored JSON text ([`Target::takes_payload_text`]).
    pub(crate) payload_text: bool,
    pub(crate) target_name: String,
    pub(crate) lag: LagThresholds,
    pub(crate) control: watch::Sender<Control>,
    pub(crate) restart: AtomicBool,
    pub(crate) cursor: AtomicU64,
    pub(crate) applied: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) batch_micros: AtomicU64,
    /// How long writing a batch took.
    pub(crate) batch_seconds: Histogram,
    /// From a change upstream (`upstream_updated_at`) to its commit in the target.
    pub(crate) latency: Histogram,
    /// When the consumer last reached the head: 1 + the backfills begun before the read that
    /// found it (`RecordStream::backfills_begun`); 0 until it has (see `lag.rs`).
    pub(crate) reached_head_at: AtomicU64,
    pub(crate) last_write: Mutex<Option<OffsetDateTime>>,
    pub(crate) last_error: Mutex<Option<String>>,
    pub(crate) health: Mutex<HealthState>,
    pub(crate) sinks: Mutex<Vec<Arc<dyn AlertSink>>>,
}

impl Shared {
    /// The entries after `after` passing the filter, in the form the target takes.
    pub(crate) async fn read(&self, after: Seq, limit: usize) -> Result<StreamRead, Error> {
        if self.payload_text {
            self.stream.read_text(&self.filter, after, limit).await
        } else {
            self.stream.read(&self.filter, after, limit).await
        }
    }

    /// Records a check result and sends the transition, if any, to every sink.
    pub(crate) fn observe(
        &self,
        check: &str,
        status: Status,
        message: impl Into<String>,
        fix: Option<String>,
    ) {
        let transition = self
            .health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(check, status, message, fix, OffsetDateTime::now_utc());
        if let Some(t) = transition {
            self.alert(t);
        }
    }

    pub(crate) fn alert(&self, t: Transition) {
        let sinks: Vec<Arc<dyn AlertSink>> =
            self.sinks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for sink in sinks {
            let t = t.clone();
            // Delivery never blocks the loop.
            tokio::spawn(async move {
                if let Err(e) = sink.send(&t).await {
                    tracing::warn!(entity = %t.entity, error = %e, "could not deliver an alert");
                }
            });
        }
    }

    pub(crate) fn failed(&self, error: &Error) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        match error.class() {
            // An unreachable target pauses the consumer until it is back.
            ErrorClass::Retry => self.observe(
                "target",
                Status::Paused,
                format!(
                    "paused: target {:?} is unavailable ({error}); retrying",
                    self.target_name
                ),
                None,
            ),
            _ => self.observe(
                "target",
                Status::Error,
                error.problem(),
                error.fix().map(str::to_owned),
            ),
        }
    }
}

/// Runs one consumer: create it, keep a [`ConsumerHandle`], then `run` it on a task.
pub struct ConsumerRuntime {
    shared: Arc<Shared>,
    target: Arc<dyn Target>,
    batch: BatchConfig,
    backoff: Backoff,
    /// The next read, started while the previous batch was being applied.
    prefetch: Option<Prefetch>,
    last_lag_check: Option<tokio::time::Instant>,
    last_ack: Option<tokio::time::Instant>,
    /// A batch was applied since the stream cursor was last acknowledged.
    unacknowledged: bool,
}

/// A read of `seq > after` running on its own task.
struct Prefetch {
    after: Seq,
    /// Backfills begun when the read started.
    begun: u64,
    read: tokio::task::JoinHandle<Result<StreamRead, Error>>,
}

/// While batches keep coming, the stream cursor is acknowledged at most this often (and when
/// the consumer finds nothing more to read).
const ACK_EVERY: Duration = Duration::from_secs(1);

/// The loop measures lag at most this often (health requests always measure).
const LAG_CHECK_EVERY: Duration = Duration::from_secs(1);

impl ConsumerRuntime {
    /// A consumer forwarding `filter`'s records from `stream` into `target`.
    pub fn new(
        id: ConsumerId,
        filter: RecordFilter,
        stream: Arc<dyn RecordStream>,
        target: Arc<dyn Target>,
        batch: BatchConfig,
        lag: LagThresholds,
    ) -> Self {
        let entity = EntityRef {
            kind: EntityKind::Consumer,
            name: id.0.clone(),
        };
        let shared = Arc::new(Shared {
            target_name: target.name().to_owned(),
            payload_text: target.takes_payload_text(),
            id,
            filter,
            stream,
            lag,
            control: watch::channel(Control::Run).0,
            restart: AtomicBool::new(false),
            cursor: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            batch_micros: AtomicU64::new(0),
            batch_seconds: Histogram::default(),
            latency: Histogram::default(),
            reached_head_at: AtomicU64::new(0),
            last_write: Mutex::new(None),
            last_error: Mutex::new(None),
            health: Mutex::new(HealthState::new(entity)),
            sinks: Mutex::new(vec![Arc::new(LogSink)]),
        });
        Self {
            shared,
            target,
            batch,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            prefetch: None,
            last_lag_check: None,
            last_ack: None,
            unacknowledged: false,
        }
    }

    /// Retries start at `base` and never wait longer than `max` (default 200 ms and 30 s).
    pub fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(base, max);
        self
    }

    /// Also sends status transitions to `sink` (the log always receives them).
    pub fn with_alert_sink(self, sink: Arc<dyn AlertSink>) -> Self {
        self.shared
            .sinks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sink);
        self
    }

    /// A handle to pause, resume and observe the consumer.
    pub fn handle(&self) -> ConsumerHandle {
        ConsumerHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs until `shutdown` turns true. An in-flight batch is finished (or fails and is
    /// retried on the next start); the checkpoint always matches what the target holds.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let shared = self.shared.clone();
        let mut control = shared.control.subscribe();
        shared.observe(
            "target",
            Status::Initializing,
            format!("connecting to target {:?}", shared.target_name),
            None,
        );
        let mut cursor = loop {
            match self.start().await {
                Ok(cursor) => {
                    // Reachable, with its checkpoint read: a consumer with nothing to write yet
                    // is healthy, not initializing.
                    shared.observe(
                        "target",
                        Status::Healthy,
                        format!(
                            "connected to target {:?}, resuming after position {}",
                            shared.target_name, cursor.0
                        ),
                        None,
                    );
                    break cursor;
                }
                Err(e) => {
                    shared.failed(&e);
                    if self.pause_for_retry(&mut shutdown, e.class()).await {
                        return;
                    }
                }
            }
        };
        loop {
            if *shutdown.borrow() {
                return;
            }
            let wanted = control.borrow_and_update().clone();
            if let Control::Pause(reason) = wanted {
                shared.observe(
                    "state",
                    Status::Paused,
                    format!("paused {reason}"),
                    Some("resume it".into()),
                );
                tokio::select! {
                    _ = control.changed() => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            shared.observe("state", Status::Healthy, "running", None);
            if shared.restart.swap(false, Ordering::AcqRel) {
                match self.target.reset_checkpoint(&shared.id).await {
                    Ok(()) => {
                        cursor = Seq::START;
                        shared.cursor.store(0, Ordering::Release);
                        shared.reached_head_at.store(0, Ordering::Release);
                    }
                    Err(e) => {
                        shared.restart.store(true, Ordering::Release);
                        shared.failed(&e);
                        if self.pause_for_retry(&mut shutdown, e.class()).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            match self.step(cursor, &mut shutdown, &mut control).await {
                Ok(next) => {
                    cursor = next;
                    self.backoff.reset();
                }
                Err(e) => {
                    shared.failed(&e);
                    if self.pause_for_retry(&mut shutdown, e.class()).await {
                        return;
                    }
                }
            }
        }
    }

    /// Reads the checkpoint from the target and registers with the stream.
    async fn start(&self) -> Result<Seq, Error> {
        let cursor = self.target.checkpoint(&self.shared.id).await?;
        self.shared
            .stream
            .acknowledge(&self.shared.id, &self.shared.filter, cursor)
            .await?;
        self.shared.cursor.store(cursor.0, Ordering::Release);
        Ok(cursor)
    }

    /// One turn of the loop: apply the next batch, or wait for new records. Returns the new
    /// cursor.
    async fn step(
        &mut self,
        cursor: Seq,
        shutdown: &mut watch::Receiver<bool>,
        control: &mut watch::Receiver<Control>,
    ) -> Result<Seq, Error> {
        let shared = self.shared.clone();
        let max = self.batch.max_records.max(1);
        // Backfills begun before the read (see `lag.rs`).
        let (read, begun) = match self.prefetch.take() {
            Some(prefetch) if prefetch.after == cursor => (
                prefetch
                    .read
                    .await
                    .map_err(|e| Error::invalid(format!("the read-ahead task failed: {e}")))??,
                prefetch.begun,
            ),
            _ => {
                let begun = shared.backfills_begun();
                (shared.read(cursor, max).await?, begun)
            }
        };
        let (mut entries, mut through) = (read.entries, read.through);
        if entries.is_empty() {
            if through > cursor || self.unacknowledged {
                // Nothing more for this consumer: skip ahead, and acknowledge what was applied.
                shared
                    .stream
                    .acknowledge(&shared.id, &shared.filter, through)
                    .await?;
                shared.cursor.store(through.0, Ordering::Release);
                self.last_ack = Some(tokio::time::Instant::now());
                self.unacknowledged = false;
            }
            shared.reached_head(begun);
            self.maybe_check_lag(true).await;
            tokio::select! {
                _ = shared.stream.wait_past(through) => {}
                _ = control.changed() => {}
                _ = shutdown.changed() => {}
            }
            return Ok(through);
        }
        // Full: `max` records, or the bytes at which the stream ends a read (records of
        // kilobytes make fewer to a batch). Not full, and caught up with a source that appends
        // as it commits: apply at once (what arrives meanwhile makes the next batch); while a
        // backlog is building (a source backfilling), wait up to max_wait for a fuller batch.
        let mut bytes = payload_bytes(&entries);
        let full =
            |entries: &[StreamEntry], bytes: usize| entries.len() >= max || bytes >= READ_BYTES;
        let short = !full(&entries, bytes);
        let waits = short && shared.stream.backfilling(&shared.filter);
        // The batch ends at the head when its read came back short and it did not wait for more
        // (records may have come after its last read).
        let at_head = short && !waits;
        if waits {
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(self.batch.max_wait_ms);
            while !full(&entries, bytes) {
                tokio::select! {
                    _ = shared.stream.wait_past(through) => {}
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = shutdown.changed() => break,
                }
                let more = shared.read(through, max - entries.len()).await?;
                bytes += payload_bytes(&more.entries);
                entries.extend(more.entries);
                through = more.through;
            }
        }
        let count = entries.len();
        // A full batch means more is likely waiting: read it while this one is applied. (Safe
        // under compaction: a record updated meanwhile reappears later in the stream, newer.)
        if full(&entries, bytes) {
            let shared = shared.clone();
            self.prefetch = Some(Prefetch {
                after: through,
                begun: shared.backfills_begun(),
                read: tokio::spawn(async move { shared.read(through, max).await }),
            });
        }
        let started = std::time::Instant::now();
        let batch = Batch { entries, through };
        if let Err(e) = self.target.apply(&shared.id, &batch).await {
            if let Some(prefetch) = self.prefetch.take() {
                prefetch.read.abort();
            }
            if e.class() == ErrorClass::GiveUp {
                return self.give_up(cursor, batch.entries, e).await;
            }
            return Err(e);
        }
        // The stream's cursor only holds tombstones back, so it may lag the target's checkpoint:
        // acknowledging (a durable write, beside the sources' appends) once a second, and when
        // the next read finds nothing, is enough.
        let now = tokio::time::Instant::now();
        if self.last_ack.is_none_or(|last| now - last >= ACK_EVERY) {
            shared
                .stream
                .acknowledge(&shared.id, &shared.filter, through)
                .await?;
            self.last_ack = Some(now);
            self.unacknowledged = false;
        } else {
            self.unacknowledged = true;
        }
        shared.cursor.store(through.0, Ordering::Release);
        shared.applied.fetch_add(count as u64, Ordering::Relaxed);
        shared.batches.fetch_add(1, Ordering::Relaxed);
        let took = started.elapsed();
        shared
            .batch_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        shared.batch_seconds.observe(took.as_secs_f64());
        let written = OffsetDateTime::now_utc();
        // In nanoseconds since 1970 (exact, and a multiplication each, where subtracting the
        // times themselves compared their dates and offsets: 135 instructions a record).
        let written_ns = written.unix_timestamp_nanos();
        shared
            .latency
            .observe_all(batch.entries.iter().map(|entry| {
                (written_ns - entry.record.upstream_updated_at.unix_timestamp_nanos()) as f64 / 1e9
            }));
        *shared.last_write.lock().unwrap_or_else(|p| p.into_inner()) = Some(written);
        shared.observe(
            "target",
            Status::Healthy,
            format!("wrote {count} record(s) to target {:?}", shared.target_name),
            None,
        );
        if at_head {
            shared.reached_head(begun);
        }
        self.maybe_check_lag(false).await;
        Ok(through)
    }

    /// A batch the target refuses for good (`GiveUp`: the data itself, not the target, is the
    /// problem). It is never resent in a loop: halving it finds the record the target refuses,
    /// the records before it are written (with the checkpoint), and the consumer pauses just
    /// before it, naming its key and why. After a fix upstream or on the target, `resume`
    /// retries from that record.
    async fn give_up(
        &mut self,
        cursor: Seq,
        mut entries: Vec<StreamEntry>,
        mut error: Error,
    ) -> Result<Seq, Error> {
        let shared = self.shared.clone();
        let mut done = cursor;
        // `entries` always holds a record the target refuses.
        while entries.len() > 1 {
            let rest = entries.split_off(entries.len() / 2);
            let through = entries.last().map_or(done, |e| e.seq);
            let half = Batch { entries, through };
            match self.target.apply(&shared.id, &half).await {
                Ok(()) => {
                    done = through;
                    shared.cursor.store(done.0, Ordering::Release);
                    shared
                        .applied
                        .fetch_add(half.entries.len() as u64, Ordering::Relaxed);
                    entries = rest;
                }
                Err(e) if e.class() == ErrorClass::GiveUp => {
                    entries = half.entries;
                    error = e;
                }
                Err(e) => return Err(e),
            }
        }
        shared
            .stream
            .acknowledge(&shared.id, &shared.filter, done)
            .await?;
        let Some(refused) = entries.first() else {
            return Ok(done);
        };
        let key = &refused.record.key;
        let reason = format!(
            "because target {:?} refuses record {} / {} / {} (stream position {}): {}",
            shared.target_name,
            key.sync_id,
            key.collection_id,
            key.upstream_id,
            refused.seq.0,
            error.problem()
        );
        tracing::error!(consumer = %shared.id, "paused {reason}");
        shared.observe(
            "target",
            Status::Error,
            format!("paused {reason}"),
            Some("correct the record upstream (or what the target refuses about it), then resume the consumer; the records before it are written".into()),
        );
        shared.control.send_replace(Control::Pause(reason));
        Ok(done)
    }

    /// Measures lag now if `force`d or if the last measurement is older than
    /// [`LAG_CHECK_EVERY`] (counting pending records is not free during a backfill).
    async fn maybe_check_lag(&mut self, force: bool) {
        let now = tokio::time::Instant::now();
        if force
            || self
                .last_lag_check
                .is_none_or(|last| now - last >= LAG_CHECK_EVERY)
        {
            self.last_lag_check = Some(now);
            self.shared.lag_check().await;
        }
    }

    /// Waits out the next backoff delay for an error of `class` (slower when it needs a fix);
    /// true when shutting down.
    async fn pause_for_retry(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        class: ErrorClass,
    ) -> bool {
        let delay = self.backoff.next_delay_after(class);
        tokio::select! {
            _ = tokio::time::sleep(delay) => *shutdown.borrow(),
            _ = shutdown.changed() => true,
        }
    }
}

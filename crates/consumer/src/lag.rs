//! A consumer's lag, told apart from its backfills: the records of a backfill are initial state
//! (`initializing`), however many, until the consumer has reached the head after it; only
//! then is a backlog lag (`warning` and `error` past the thresholds).

use std::sync::atomic::Ordering;

use sluice_core::{Seq, Status};
use time::OffsetDateTime;

use crate::runtime::Shared;

impl Shared {
    /// Backfills begun so far by the sources this consumer reads: taken before a read, and
    /// given to [`reached_head`](Shared::reached_head) if that read found the head.
    pub(crate) fn backfills_begun(&self) -> u64 {
        self.stream.backfills_begun(&self.filter)
    }

    /// The consumer has applied everything the stream held for it when it read, with `begun`
    /// backfills begun before that read. Its backfill ends here, unless a source it reads is
    /// still backfilling: more of that initial state is on its way, and a backlog of it is not
    /// lag.
    pub(crate) fn reached_head(&self, begun: u64) {
        if !self.stream.backfilling(&self.filter) {
            // The largest count wins: a health request may have seen a newer one first.
            self.reached_head_at.fetch_max(begun + 1, Ordering::AcqRel);
        }
    }

    /// Caught up, with `begun` backfills begun: no backfill running, and none begun since the
    /// consumer last reached the head (it may have found the stream empty before its source
    /// started, a table may be read again, or a whole backfill may have gone by while it was
    /// paused or writing). Until then its backlog is initial state, not lag.
    fn caught_up(&self, begun: u64) -> bool {
        self.reached_head_at.load(Ordering::Acquire) > begun
            && !self.stream.backfilling(&self.filter)
    }

    pub(crate) async fn lag_check(&self) {
        let begun = self.backfills_begun();
        let cursor = Seq(self.cursor.load(Ordering::Acquire));
        if !self.caught_up(begun) {
            // A backfill is `initializing` whatever the count: estimate it from the head
            // instead of counting every pending record.
            let Ok(head) = self.stream.head().await else {
                return;
            };
            let left = head.0.saturating_sub(cursor.0);
            if left == 0 {
                // At the head already (the source's backfill may have ended since).
                self.reached_head(begun);
            }
            if !self.caught_up(begun) {
                self.observe(
                    "lag",
                    Status::Initializing,
                    format!("backfilling: at most {left} record(s) to go"),
                    None,
                );
                return;
            }
        }
        let cap = self.lag.error_records.max(self.lag.warn_records) + 1;
        let lag = match self.stream.lag(&self.filter, cursor, cap).await {
            Ok(lag) => lag,
            Err(e) => {
                self.observe(
                    "lag",
                    Status::Warning,
                    format!("cannot measure lag: {e}"),
                    None,
                );
                return;
            }
        };
        let seconds = lag
            .oldest_appended_at
            .map(|t| (OffsetDateTime::now_utc() - t).whole_seconds().max(0) as u64)
            .unwrap_or(0);
        let message = format!("{} record(s), {seconds} s behind the stream", lag.records);
        let status = if lag.records >= self.lag.error_records || seconds >= self.lag.error_seconds {
            Status::Error
        } else if lag.records >= self.lag.warn_records || seconds >= self.lag.warn_seconds {
            Status::Warning
        } else {
            Status::Healthy
        };
        let fix = (status >= Status::Warning).then(|| {
            format!("check target {:?}'s health and write speed; a consumer that falls behind catches up once the target keeps pace", self.target_name)
        });
        self.observe("lag", status, message, fix);
    }
}

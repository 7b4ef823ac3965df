//! Reconciling backfill reads with the change stream (DBLog-style watermarks).

use sluice_core::Error;

use crate::wire::Lsn;

/// A snapshot as `txid_current_snapshot()` prints it (`xmin:xmax:xip,…`), reduced to the 32-bit
/// transaction ids pgoutput sends.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Snapshot {
    xmin: u32,
    xmax: u32,
    in_progress: std::collections::HashSet<u32>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = || Error::invalid(format!("unexpected snapshot {text:?}"));
        let mut parts = text.split(':');
        let xid = |s: Option<&str>| -> Result<u32, Error> {
            Ok(s.ok_or_else(bad)?.parse::<u64>().map_err(|_| bad())? as u32)
        };
        let xmin = xid(parts.next())?;
        let xmax = xid(parts.next())?;
        let in_progress = match parts.next() {
            Some("") | None => Default::default(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse::<u64>().map(|x| x as u32).map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            xmin,
            xmax,
            in_progress,
        })
    }

    /// True when `xid`'s changes were not visible to this snapshot (it was running, or
    /// started after). Comparisons are modulo 2^32, as PostgreSQL's.
    pub fn hides(&self, xid: u32) -> bool {
        self.in_progress.contains(&xid) || (xid.wrapping_sub(self.xmax) as i32) >= 0
    }

    /// True when `xid` is older than every transaction this snapshot could not see.
    fn before_horizon(&self, xid: u32) -> bool {
        (xid.wrapping_sub(self.xmin) as i32) < 0
    }
}

/// What the change stream has processed, shared with the backfill, so that each page can be
/// reconciled with changes that raced it (a DBLog-style watermark):
///
/// 1. a page is read in one snapshot (`txid_current_snapshot()` gives what it could not see);
/// 2. a logical message is written (`pg_logical_emit_message`), and the backfill waits until
///    the change stream has processed up to it;
/// 3. page rows whose key was changed by a transaction the snapshot could not see are dropped
///    (the stream already holds the newer state); the rest are stamped at the message's LSN, so
///    every change committed later wins, and every change the page includes loses.
///
/// This holds even for a transaction whose commit record precedes the page but which was not
/// yet visible to its snapshot, which an LSN read before the snapshot cannot account for.
///
/// pgoutput delivers the message itself from PostgreSQL 14 on. Before that the stream passes
/// it through the (empty) commit of the message's transaction, and through the keepalive the
/// server sends at once when asked (`wanted`), whichever comes first: the same guarantee on
/// every version.
#[derive(Default)]
pub(crate) struct Watermarks {
    state: std::sync::Mutex<WatermarkState>,
    moved: tokio::sync::Notify,
    /// A read waits for the stream: ask the server for a keepalive carrying its position.
    wanted: tokio::sync::Notify,
}

#[derive(Default)]
struct WatermarkState {
    through: Lsn,
    /// Reads (a backfill, re-reads of single rows) that need changes logged.
    users: usize,
    /// (xid, collection, upstream id or `*` for a truncate)
    changes: Vec<(u32, String, String)>,
    /// Snapshots of reads still to be reconciled (parallel readers take theirs at different
    /// times): a change is forgotten only once every one of them can see it. `None`: a read
    /// whose snapshot is being taken, which keeps every change (see [`Watermarks::hold`]).
    held: Vec<(u64, Option<Snapshot>)>,
    next_hold: u64,
}

/// A read's snapshot, held until the read is reconciled ([`Watermarks::raced`]) or dropped.
pub(crate) struct Held<'w> {
    watermarks: &'w Watermarks,
    id: u64,
}

impl Held<'_> {
    /// The read's snapshot, once the server has given it.
    pub fn taken(&mut self, snapshot: Snapshot) {
        let mut state = self.watermarks.state();
        if let Some((_, held)) = state.held.iter_mut().find(|(id, _)| *id == self.id) {
            *held = Some(snapshot);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.watermarks
            .state()
            .held
            .retain(|(id, _)| *id != self.id);
    }
}

impl Watermarks {
    fn state(&self) -> std::sync::MutexGuard<'_, WatermarkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A read starts that needs changes logged from now on (before its snapshot is taken).
    pub fn acquire(&self) {
        self.state().users += 1;
    }

    /// A read that [`acquire`](Self::acquire)d is over; the log is cleared after the last.
    pub fn release(&self) {
        let mut state = self.state();
        state.users = state.users.saturating_sub(1);
        if state.users == 0 {
            state.changes.clear();
        }
    }

    /// The change stream saw `xid` change `id` (`*`: the whole collection) of `collection`.
    pub fn record(&self, xid: u32, collection: &str, id: &str) {
        let mut state = self.state();
        if state.users > 0 {
            state
                .changes
                .push((xid, collection.to_owned(), id.to_owned()));
        }
    }

    /// The change stream has processed everything up to `lsn`.
    pub fn passed(&self, lsn: Lsn) {
        let mut state = self.state();
        if lsn > state.through {
            state.through = lsn;
            drop(state);
            self.moved.notify_waiters();
        }
    }

    /// Resolves when a read waits for the stream to move (see [`Watermarks::wait_past`]).
    pub async fn wanted(&self) {
        self.wanted.notified().await;
    }

    /// Waits until the change stream has processed `lsn`.
    pub async fn wait_past(&self, lsn: Lsn, limit: std::time::Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let moved = self.moved.notified();
            if self.state().through >= lsn {
                return Ok(());
            }
            // Ask again now and then: a keepalive may have been on its way before the mark.
            self.wanted.notify_one();
            let again =
                (tokio::time::Instant::now() + std::time::Duration::from_millis(100)).min(deadline);
            if tokio::time::timeout_at(again, moved).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Err(Error::unavailable(
                    format!(
                        "source: the change stream did not reach the backfill watermark {lsn} in {}s",
                        limit.as_secs()
                    ),
                    "watermark",
                ));
            }
        }
    }

    /// Holds a read from before its snapshot is taken ([`Held::taken`]) until it is
    /// reconciled with [`raced`](Self::raced): the changes it may not see are kept for it
    /// meanwhile. Were it held only once its snapshot is known, another read reconciled in
    /// between (a parallel reader) could forget a change this snapshot cannot see, and a row
    /// that change had deleted or updated would come back with the page.
    pub fn hold(&self) -> Held<'_> {
        let mut state = self.state();
        state.next_hold += 1;
        let id = state.next_hold;
        state.held.push((id, None));
        Held {
            watermarks: self,
            id,
        }
    }

    /// Ids of `collection` changed by transactions the held snapshot could not see (`*` when
    /// one of them truncated it); forgets changes every held snapshot can see.
    pub fn raced(&self, held: Held<'_>, collection: &str) -> std::collections::HashSet<String> {
        let mut state = self.state();
        let WatermarkState {
            changes, held: all, ..
        } = &mut *state;
        changes.retain(|(xid, _, _)| {
            !all.iter()
                .all(|(_, s)| s.as_ref().is_some_and(|s| s.before_horizon(*xid)))
        });
        // A read without its snapshot (never the case) counts every change as raced.
        let own = all.iter().find(|(id, _)| *id == held.id);
        let own = own.and_then(|(_, s)| s.as_ref());
        let hides = |xid: u32| own.is_none_or(|s| s.hides(xid));
        let raced = changes
            .iter()
            .filter(|(xid, c, _)| c == collection && hides(*xid))
            .map(|(_, _, id)| id.clone())
            .collect();
        drop(state);
        raced
    }
}

#[cfg(test)]
mod watermark_tests {
    use super::*;

    #[test]
    fn snapshots_hide_running_and_later_transactions_modulo_2_32() {
        let s = Snapshot::parse("100:110:102,105").unwrap();
        assert!(!s.hides(99) && !s.hides(101) && !s.hides(109));
        assert!(s.hides(102) && s.hides(105) && s.hides(110) && s.hides(4_000));
        // 64-bit ids from txid_current_snapshot() are compared by their low 32 bits.
        let wrapped = Snapshot::parse("4294967290:4294967306:").unwrap();
        assert!(!wrapped.hides(4_294_967_295));
        assert!(wrapped.hides(10));
        assert!(wrapped.before_horizon(4_294_967_280));
    }

    #[test]
    fn raced_keys_are_those_of_hidden_transactions() {
        let w = Watermarks::default();
        w.acquire();
        w.record(101, "public.t", "1"); // visible to the snapshot below
        w.record(105, "public.t", "2"); // running when it was taken
        w.record(120, "public.t", "3"); // started after
        w.record(120, "public.other", "4");
        let s = Snapshot::parse("100:110:105").unwrap();
        let raced = w.raced(held(&w, s.clone()), "public.t");
        assert_eq!(raced, ["2".to_owned(), "3".to_owned()].into());
        w.release();
        assert!(w.raced(held(&w, s), "public.t").is_empty());
    }

    /// Parallel readers reconcile in any order: a reader whose snapshot is newer does not
    /// forget a change that an older snapshot, still held, could not see.
    #[test]
    fn a_newer_snapshot_keeps_the_changes_an_older_held_one_needs() {
        let w = Watermarks::default();
        w.acquire();
        w.record(105, "public.t", "2");
        let older = held(&w, Snapshot::parse("100:110:105").unwrap());
        let newer = held(&w, Snapshot::parse("120:130:").unwrap());
        assert!(w.raced(newer, "public.t").is_empty());
        assert_eq!(w.raced(older, "public.t"), ["2".to_owned()].into());
        // With no snapshot held any more, the next read's horizon forgets it.
        assert!(
            w.raced(held(&w, Snapshot::parse("120:130:").unwrap()), "public.t")
                .is_empty()
        );
        assert!(w.state().changes.is_empty());
    }

    /// A read is held from before the server gives its snapshot: a reader reconciling
    /// meanwhile, with a newer snapshot, does not forget a change the pending one cannot see.
    #[test]
    fn a_read_whose_snapshot_is_being_taken_keeps_every_change() {
        let w = Watermarks::default();
        w.acquire();
        let mut pending = w.hold();
        // Transaction 105 commits after the pending read's snapshot was taken, and before a
        // newer reader's.
        w.record(105, "public.t", "2");
        assert!(
            w.raced(held(&w, Snapshot::parse("120:130:").unwrap()), "public.t")
                .is_empty()
        );
        pending.taken(Snapshot::parse("100:110:105").unwrap());
        assert_eq!(w.raced(pending, "public.t"), ["2".to_owned()].into());
    }

    fn held(w: &Watermarks, snapshot: Snapshot) -> Held<'_> {
        let mut held = w.hold();
        held.taken(snapshot);
        held
    }
}

//! Which syncs are backfilling, and how many backfills each has begun (see
//! `RecordStream::set_backfilling`). Held in memory: a source says it again when it starts.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use sluice_core::{Provider, RecordFilter, SyncId};

#[derive(Default)]
pub(super) struct Backfills(Mutex<HashMap<SyncId, Backfill>>);

/// One sync's backfills.
struct Backfill {
    provider: Provider,
    running: bool,
    /// Backfills begun since the stream was opened.
    begun: u64,
}

impl Backfills {
    /// A backfill of `sync_id` began (counted once however often it is said) or ended.
    pub(super) fn set(&self, sync_id: SyncId, provider: Provider, running: bool) {
        let mut syncs = self.syncs();
        let sync = syncs.entry(sync_id).or_insert(Backfill {
            provider,
            running: false,
            begun: 0,
        });
        if running && !sync.running {
            sync.begun += 1;
        }
        sync.provider = provider;
        sync.running = running;
    }

    /// True while a sync whose records pass `filter` is backfilling.
    pub(super) fn running(&self, filter: &RecordFilter) -> bool {
        self.syncs()
            .iter()
            .any(|(id, b)| b.running && filter.covers(b.provider, *id))
    }

    /// Backfills begun by the syncs whose records pass `filter`.
    pub(super) fn begun(&self, filter: &RecordFilter) -> u64 {
        self.syncs()
            .iter()
            .filter(|(id, b)| filter.covers(b.provider, **id))
            .map(|(_, b)| b.begun)
            .sum()
    }

    fn syncs(&self) -> MutexGuard<'_, HashMap<SyncId, Backfill>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backfill is counted once however often a source says it runs, each sync on its own,
    /// and only for the filters that cover it.
    #[test]
    fn backfills_are_counted_once_each_per_covered_sync() {
        let (a, b) = (SyncId::new_random(), SyncId::new_random());
        let only_a = RecordFilter::Sync {
            sync_id: a,
            collections: None,
        };
        let postgres = RecordFilter::Provider(Provider::Postgres);
        let backfills = Backfills::default();
        assert!(!backfills.running(&postgres));
        assert_eq!(backfills.begun(&postgres), 0);
        backfills.set(a, Provider::Postgres, true);
        backfills.set(a, Provider::Postgres, true);
        assert!(backfills.running(&only_a));
        assert_eq!(backfills.begun(&only_a), 1);
        backfills.set(a, Provider::Postgres, false);
        assert!(!backfills.running(&only_a));
        assert_eq!(backfills.begun(&only_a), 1);
        backfills.set(a, Provider::Postgres, true);
        backfills.set(b, Provider::Http, true);
        assert_eq!(backfills.begun(&only_a), 2);
        assert_eq!(backfills.begun(&postgres), 2);
        assert_eq!(backfills.begun(&RecordFilter::Provider(Provider::Http)), 1);
        backfills.set(a, Provider::Postgres, false);
        assert!(!backfills.running(&postgres));
        assert!(backfills.running(&RecordFilter::Provider(Provider::Http)));
    }
}

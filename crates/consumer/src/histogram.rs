//! Latency histograms for metrics: fixed buckets, lock-free counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the buckets, in seconds (the last bucket is everything above).
pub const BOUNDS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Observations counted into [`BOUNDS`].
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    counts: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

/// A histogram's counts at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket of [`BOUNDS`] (not cumulative); the last one is above them.
    pub buckets: [u64; BOUNDS.len() + 1],
    /// The sum of the observations, in seconds.
    pub sum_seconds: f64,
}

impl HistogramSnapshot {
    /// How many observations there are.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// The bucket an observation of `seconds` falls in (negative counts as 0), and its whole
/// microseconds.
fn place(seconds: f64) -> (usize, u64) {
    let seconds = seconds.max(0.0);
    let bucket = BOUNDS
        .iter()
        .position(|b| seconds <= *b)
        .unwrap_or(BOUNDS.len());
    (bucket, (seconds * 1e6) as u64)
}

impl Histogram {
    /// Counts one observation of `seconds` (negative counts as 0).
    pub fn observe(&self, seconds: f64) {
        self.observe_n(seconds, 1);
    }

    /// Counts `n` observations of `seconds` each.
    pub fn observe_n(&self, seconds: f64, n: u64) {
        let (bucket, micros) = place(seconds);
        self.counts[bucket].fetch_add(n, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros * n, Ordering::Relaxed);
    }

    /// Counts every observation of `all`, as [`Histogram::observe`] one by one would, with
    /// one atomic addition per bucket rather than two per observation: a batch's latencies,
    /// one per record, were 1.0% of sluice's CPU in the initial load (`perf`) when each was
    /// added on its own.
    pub fn observe_all(&self, all: impl IntoIterator<Item = f64>) {
        let mut counts = [0u64; BOUNDS.len() + 1];
        let mut sum = 0u64;
        for seconds in all {
            let (bucket, micros) = place(seconds);
            counts[bucket] += 1;
            sum = sum.wrapping_add(micros);
        }
        for (count, n) in self.counts.iter().zip(counts) {
            if n > 0 {
                count.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.sum_micros.fetch_add(sum, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = [0; BOUNDS.len() + 1];
        for (out, count) in buckets.iter_mut().zip(&self.counts) {
            *out = count.load(Ordering::Relaxed);
        }
        HistogramSnapshot {
            buckets,
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_add_up() {
        let h = Histogram::default();
        h.observe(0.001);
        h.observe(0.3);
        h.observe_n(100.0, 2);
        let s = h.snapshot();
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[6], 1, "0.3 s is in the 0.5 s bucket");
        assert_eq!(s.buckets[BOUNDS.len()], 2);
        assert_eq!(s.count(), 4);
        assert!((s.sum_seconds - 200.301).abs() < 1e-6);
    }

    /// Observations counted together land where they land one by one, and add up the same,
    /// on the bounds, between them, below zero and above the last.
    #[test]
    fn observations_counted_together_count_as_one_by_one() {
        let mut all: Vec<f64> = vec![-1.0, 0.0, 30.0, 30.000001, 1e9, f64::NAN];
        all.extend(BOUNDS);
        all.extend(BOUNDS.map(|b| b * 1.5));
        all.extend((0..500).map(|i| f64::from(i) * 0.0137));
        let (one_by_one, together) = (Histogram::default(), Histogram::default());
        for seconds in &all {
            one_by_one.observe(*seconds);
        }
        together.observe_all(all.iter().copied());
        together.observe_all([]);
        assert_eq!(together.snapshot(), one_by_one.snapshot());
        assert_eq!(together.snapshot().count(), all.len() as u64);
    }
}

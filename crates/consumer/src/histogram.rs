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

impl Histogram {
    /// Counts one observation of `seconds` (negative counts as 0).
    pub fn observe(&self, seconds: f64) {
        self.observe_n(seconds, 1);
    }

    /// Counts `n` observations of `seconds` each.
    pub fn observe_n(&self, seconds: f64, n: u64) {
        let seconds = seconds.max(0.0);
        let bucket = BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BOUNDS.len());
        self.counts[bucket].fetch_add(n, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64 * n, Ordering::Relaxed);
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
}

//! Capped exponential backoff with jitter: the one retry policy.

use std::time::Duration;

use crate::ErrorClass;

/// The least a retry waits after an error that asks a person to fix something
/// ([`ErrorClass::FixConfiguration`]): retrying faster cannot help, and only fills the logs
/// (and the server's).
pub const FIX_CONFIGURATION_FLOOR: Duration = Duration::from_secs(5);

/// Delays between retries: `base · 2^attempt`, capped at `max`, with "full jitter"
/// (a uniformly random delay between half the step and the step) so that many consumers
/// retrying the same target do not reconnect in lockstep.
///
/// `Backoff` only computes delays; the caller sleeps (or waits on a notification) itself.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    /// Jitter: enough randomness for spreading retries, no dependency.
    random: crate::Xorshift,
}

impl Backoff {
    /// A policy starting at `base` and never waiting longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Self {
            base,
            max,
            attempt: 0,
            random: crate::Xorshift::new(seed | 1),
        }
    }

    /// The delay before the next attempt; each call counts one failed attempt.
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let spread = (step - half).as_nanos() as u64;
        let jitter = if spread == 0 {
            0
        } else {
            self.random.below(spread + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// The delay before retrying after an error of `class`: [`next_delay`](Backoff::next_delay),
    /// but never under [`FIX_CONFIGURATION_FLOOR`] (or the cap, if lower) when the error needs
    /// a fix. `GiveUp` errors are not retried by callers; if asked, the cap.
    pub fn next_delay_after(&mut self, class: ErrorClass) -> Duration {
        let delay = self.next_delay();
        match class {
            ErrorClass::Retry => delay,
            ErrorClass::FixConfiguration => delay.max(FIX_CONFIGURATION_FLOOR.min(self.max)),
            ErrorClass::GiveUp => self.max,
        }
    }

    /// Forget past failures (call after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many failed attempts have been counted since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_within_jitter_and_stay_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut backoff = Backoff::new(base, max);
        for attempt in 0..30u32 {
            let step = base.saturating_mul(1u32 << attempt.min(20)).min(max);
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "attempt {attempt}: {delay:?} vs {step:?}"
            );
        }
        assert_eq!(backoff.attempts(), 30);
        backoff.reset();
        assert!(backoff.next_delay() <= base);
    }

    #[test]
    fn an_error_that_needs_a_fix_backs_off_slowly_and_a_retry_does_not() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        assert!(backoff.next_delay_after(ErrorClass::Retry) <= Duration::from_millis(100));
        backoff.reset();
        assert!(backoff.next_delay_after(ErrorClass::FixConfiguration) >= FIX_CONFIGURATION_FLOOR);
        // A cap below the floor wins (tests and tight loops choose it on purpose).
        let mut tight = Backoff::new(Duration::from_millis(1), Duration::from_millis(20));
        assert!(tight.next_delay_after(ErrorClass::FixConfiguration) <= Duration::from_millis(20));
    }
}

//! The request limiter: at most `n` requests in any window, shared by every request made
//! with one credential, and paused as a whole when the API answers `429`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Allows at most `per_window` requests in any sliding window of `window`, and none while a
/// `Retry-After` pause lasts. Counts the time callers spent waiting.
#[derive(Debug)]
pub struct Limiter {
    per_window: usize,
    window: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sent: VecDeque<Instant>,
    paused_until: Option<Instant>,
    waited: Duration,
}

/// Send times are taken before the request leaves, and the server counts arrivals; this
/// margin keeps jitter between the two from making a window look over the limit upstream.
const MARGIN: f64 = 1.02;

impl Limiter {
    /// A limiter allowing `per_second` requests per second (fractions allowed: 0.5 is one
    /// request in any two seconds).
    pub fn new(per_second: f64) -> Self {
        let per_second = if per_second.is_finite() && per_second > 0.0 {
            per_second
        } else {
            1.0
        };
        let per_window = per_second.floor().max(1.0);
        Self {
            per_window: per_window as usize,
            window: Duration::from_secs_f64(per_window / per_second * MARGIN),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Waits until one more request is allowed, and counts it as sent.
    pub async fn acquire(&self) {
        loop {
            let now = Instant::now();
            let wake = {
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                while inner
                    .sent
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    inner.sent.pop_front();
                }
                match inner.paused_until {
                    Some(until) if until > now => until,
                    _ if inner.sent.len() < self.per_window => {
                        inner.sent.push_back(now);
                        return;
                    }
                    _ => inner.sent.front().map_or(now, |t| *t + self.window),
                }
            };
            tokio::time::sleep_until(wake).await;
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.waited += Instant::now().duration_since(now);
        }
    }

    /// Holds every request back for `delay` (the API said `429`, `Retry-After: delay`).
    pub fn pause(&self, delay: Duration) {
        let until = Instant::now() + delay;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.paused_until.is_none_or(|t| t < until) {
            inner.paused_until = Some(until);
        }
    }

    /// Time callers have spent waiting for the limit or a pause, in total.
    pub fn waited(&self) -> Duration {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).waited
    }

    /// The configured rate, for messages.
    pub fn describe(&self) -> String {
        let per_second = self.per_window as f64 / (self.window.as_secs_f64() / MARGIN);
        format!("{per_second} requests/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn no_window_ever_holds_more_than_the_limit() {
        let limiter = Limiter::new(5.0);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..23 {
            limiter.acquire().await;
            times.push(Instant::now().duration_since(start).as_secs_f64());
        }
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..].iter().filter(|u| **u - t < 1.0).count();
            assert!(
                in_window <= 5,
                "{in_window} requests within 1 s of {t}: {times:?}"
            );
        }
        // 23 requests at 5/s: the first 5 at once, then 5 per (margined) second.
        assert!(times[22] >= 4.0 && times[22] < 4.5, "{times:?}");
        assert!(limiter.waited() >= Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request_back() {
        let limiter = Limiter::new(100.0);
        let start = Instant::now();
        limiter.pause(Duration::from_secs(3));
        limiter.acquire().await;
        assert!(Instant::now().duration_since(start) >= Duration::from_secs(3));
    }
}

//! Progress for long foreground work: a bar with rate and ETA on a terminal, plain lines
//! (at most every two seconds) otherwise, so logs and CI output stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use sluice_core::text::{duration, rate, thousands};

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    total: u64,
    started: Instant,
    last_line: Option<Instant>,
}

impl Progress {
    pub fn new(what: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {done}/{total} rows  {rate}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .with_key(
                    "done",
                    |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = w.write_str(&thousands(s.pos()));
                    },
                )
                .with_key(
                    "total",
                    |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = w.write_str(&thousands(s.len().unwrap_or(0)));
                    },
                )
                .with_key(
                    "rate",
                    |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = w.write_str(&rate(s.per_sec(), "rows"));
                    },
                )
                .progress_chars("=> "),
            );
            bar.set_message(what.to_owned());
            bar
        });
        Self {
            bar,
            what: what.to_owned(),
            total,
            started: Instant::now(),
            last_line: None,
        }
    }

    pub fn set(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        let now = Instant::now();
        if self
            .last_line
            .is_some_and(|t| now - t < Duration::from_secs(2))
            && done < self.total
        {
            return;
        }
        self.last_line = Some(now);
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let per_second = done as f64 / elapsed;
        let eta = if per_second > 0.0 && done < self.total {
            duration(Duration::from_secs_f64(
                (self.total - done) as f64 / per_second,
            ))
        } else {
            "-".into()
        };
        eprintln!(
            "{}: {}/{} rows ({}, ETA {eta})",
            self.what,
            thousands(done),
            thousands(self.total),
            rate(per_second, "rows")
        );
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}

//! Progress for long foreground work: a bar with rate and ETA on a terminal, plain lines
//! (at most every two seconds) otherwise, so logs and CI output stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

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
                    "{msg} [{bar:30}] {pos}/{len} rows  {per_sec}  ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
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
        let rate = done as f64 / elapsed;
        let eta = if rate > 0.0 && done < self.total {
            format!("{:.0}s", (self.total - done) as f64 / rate)
        } else {
            "-".into()
        };
        eprintln!(
            "{}: {done}/{} rows ({rate:.0}/s, ETA {eta})",
            self.what, self.total
        );
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}

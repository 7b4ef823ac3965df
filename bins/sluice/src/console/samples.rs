//! What the console's charts show: each consumer's lag (records and seconds), each
//! PostgreSQL source's slot lag and each API source's rate-limit waits, sampled every
//! [`EVERY`] and kept in memory for the last hour.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use maud::{Markup, html};
use time::OffsetDateTime;

use crate::server::{Server, consumer_lag};

/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(10);
/// How long samples are kept.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// One series: an entity's metric over time.
pub type Series = VecDeque<(OffsetDateTime, f64)>;

/// Every series, by (entity name, metric).
#[derive(Default)]
pub struct Samples {
    series: BTreeMap<(String, &'static str), Series>,
    last: Option<OffsetDateTime>,
}

impl Samples {
    fn push(&mut self, entity: &str, metric: &'static str, at: OffsetDateTime, value: f64) {
        let series = self.series.entry((entity.to_owned(), metric)).or_default();
        series.push_back((at, value));
        while series.front().is_some_and(|(t, _)| at - *t > WINDOW) {
            series.pop_front();
        }
    }

    /// One series (empty when never sampled).
    pub fn get(&self, entity: &str, metric: &'static str) -> Vec<(OffsetDateTime, f64)> {
        self.series
            .get(&(entity.to_owned(), metric))
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Takes a sample of everything that runs, unless one was taken less than [`EVERY`] ago.
pub async fn sample(server: &Server) {
    let now = OffsetDateTime::now_utc();
    {
        let samples = server.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.last.is_some_and(|t| now - t < EVERY) {
            return;
        }
    }
    let mut taken: Vec<(String, &'static str, f64)> = Vec::new();
    {
        let entities = server.entities.read().await;
        for (name, entry) in &entities.consumers {
            let (records, seconds) = consumer_lag(&server.stream, entry).await;
            taken.push((name.clone(), "lag_records", records as f64));
            taken.push((name.clone(), "lag_seconds", seconds));
        }
        for (name, entry) in &entities.syncs {
            let progress = entry.source.progress();
            if let Some(bytes) = progress
                .details
                .get("slot_retained_wal_bytes")
                .and_then(|v| v.as_f64())
            {
                taken.push((name.clone(), "slot_bytes", bytes));
            }
            if let Some(wait) = progress
                .details
                .get("rate_limit_wait_seconds")
                .and_then(|v| v.as_f64())
            {
                taken.push((name.clone(), "rate_limit_wait_seconds", wait));
            }
        }
    }
    let mut samples = server.samples.lock().unwrap_or_else(|e| e.into_inner());
    samples.last = Some(now);
    for (entity, metric, value) in taken {
        samples.push(&entity, metric, now, value);
    }
}

/// A line chart of one series over the last hour, as inline SVG (no script).
pub fn chart(title: &str, unit: &str, points: &[(OffsetDateTime, f64)]) -> Markup {
    const W: f64 = 560.0;
    const H: f64 = 110.0;
    let now = OffsetDateTime::now_utc();
    let max = points.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let window = WINDOW.as_secs_f64();
    let coords: Vec<String> = points
        .iter()
        .map(|(t, v)| {
            let age = (now - *t).as_seconds_f64().clamp(0.0, window);
            let x = W * (1.0 - age / window);
            let y = H - H * (v / top);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let latest = points.last().map(|(_, v)| *v);
    let label = match latest {
        Some(v) => format!(
            "{title}: now {} {unit}, highest {} {unit} in the last hour",
            number(v),
            number(max)
        ),
        None => format!(
            "{title}: no samples yet (one is taken every {} s)",
            EVERY.as_secs()
        ),
    };
    html! {
        figure.chart {
            figcaption { (label) }
            svg role="img" aria-label=(label) viewBox={"0 0 " (W) " " (H + 14.0)} width="100%" preserveAspectRatio="none" {
                line x1="0" y1=(H) x2=(W) y2=(H) class="axis" {}
                @if coords.len() == 1 {
                    @let (x, y) = coords[0].split_once(',').unwrap_or(("0", "0"));
                    circle cx=(x) cy=(y) r="3" class="point" {}
                } @else if !coords.is_empty() {
                    polyline points=(coords.join(" ")) class="line" {}
                }
                text x="0" y=(H + 12.0) class="tick" { "1 h ago" }
                text x=(W - 24.0) y=(H + 12.0) class="tick" { "now" }
            }
        }
    }
}

/// A number for a person: whole numbers without decimals, others with one.
pub fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.1}")
    }
}

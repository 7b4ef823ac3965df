//! The cross-version suite: a compact selection of the test suite run with sources and
//! targets on every supported PostgreSQL major version, and the version table it prints.
//!
//! Each part is an existing test binary (or some of its tests) whose clusters declare what
//! they are for (`Cluster::options().source()` / `.target()`); the part runs with
//! `SLUICE_PG_SOURCE_VERSION` and `SLUICE_PG_TARGET_VERSION` set for the pair. The versions
//! come from `crates/localpg/src/versions.rs`, the one place they are pinned.

use std::collections::BTreeSet;
use std::time::Instant;

use crate::{Result, cargo};

/// The supported major versions (as pinned in `sluice_localpg::RELEASES`).
pub const MAJORS: [u32; 7] = [12, 13, 14, 15, 16, 17, 18];

/// Which clusters of a part follow the pair.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Uses {
    Source,
    Target,
    Both,
}

/// One part of the suite: `cargo test -p <package> --test <test> -- <filters>`.
struct Part {
    what: &'static str,
    package: &'static str,
    test: &'static str,
    filters: &'static [&'static str],
    uses: Uses,
}

const SUITE: &[Part] = &[
    Part {
        what: "source prerequisites, publication and slot creation",
        package: "sluice-source-pg",
        test: "prerequisites",
        filters: &[],
        uses: Uses::Source,
    },
    Part {
        what: "backfill racing changes, every type, TOAST, TRUNCATE",
        package: "sluice-source-pg",
        test: "replication",
        filters: &[
            "a_backfill_racing_with_updates_ends_equal_to_the_source",
            "a_change_committed_but_not_yet_visible_during_a_page_still_wins",
            "backfill_and_stream_map_every_type_identically_and_as_documented",
            "unchanged_toast_values_are_filled_truncate_tombstones_and_new_columns_appear",
            "an_unchanged_toast_value_survives_key_changes",
            "a_table_added_to_the_publication_is_backfilled_without_a_restart",
        ],
        uses: Uses::Source,
    },
    Part {
        what: "standby sources (16+), promotion, failover slots (17+)",
        package: "sluice-source-pg",
        test: "standby",
        filters: &[],
        uses: Uses::Source,
    },
    Part {
        what: "provisioning: least privilege, the read role, ownership",
        package: "sluice-provisioning",
        test: "setup",
        filters: &[],
        uses: Uses::Target,
    },
    Part {
        what: "the consumer table",
        package: "sluice-target-pg",
        test: "consumer_table",
        filters: &[],
        uses: Uses::Target,
    },
    Part {
        what: "the schema mirror through several connections, its checkpoints' migration",
        package: "sluice-target-pg",
        test: "mirror_partitions",
        filters: &[],
        uses: Uses::Target,
    },
    Part {
        what: "schema mirror end to end: partitions, added and retyped columns",
        package: "sluice-tests",
        test: "mirror",
        filters: &[],
        uses: Uses::Both,
    },
    Part {
        what: "every type bit-equal end to end, consumer table",
        package: "sluice-tests",
        test: "exact",
        filters: &[],
        uses: Uses::Both,
    },
];

/// The pairs CI runs: every version to itself, the oldest to the newest and back.
pub fn default_pairs() -> Vec<(u32, u32)> {
    let mut pairs: Vec<(u32, u32)> = MAJORS.iter().map(|&v| (v, v)).collect();
    pairs.push((MAJORS[0], MAJORS[MAJORS.len() - 1]));
    pairs.push((MAJORS[MAJORS.len() - 1], MAJORS[0]));
    pairs
}

/// Parses `12:18,18:12` (source:target, comma-separated).
pub fn parse_pairs(text: &str) -> Result<Vec<(u32, u32)>> {
    text.split(',')
        .map(|pair| {
            let (source, target) = pair
                .split_once(':')
                .ok_or_else(|| format!("{pair:?}: expected source:target, e.g. 12:18"))?;
            let major = |v: &str| -> Result<u32> {
                let v: u32 = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{pair:?}: {v:?} is not a major version"))?;
                if MAJORS.contains(&v) {
                    Ok(v)
                } else {
                    Err(format!("{v} is not supported; choose from {MAJORS:?}"))
                }
            };
            Ok((major(source)?, major(target)?))
        })
        .collect()
}

/// One pair's outcome, for the table.
pub struct Row {
    source: u32,
    target: u32,
    seconds: f64,
    failed: Vec<&'static str>,
    flaky: Vec<&'static str>,
    ran: usize,
}

/// Runs the suite for every pair; returns the table rows (failures included). `covered` is
/// the version the whole test suite has just run on (in CI): its pair to itself is not run
/// again.
pub fn run(pairs: &[(u32, u32)], covered: Option<u32>) -> Result<Vec<Row>> {
    // Build once; each run below only executes.
    let mut build = cargo();
    build.args(["test", "--no-run", "--quiet"]);
    for package in SUITE.iter().map(|p| p.package).collect::<BTreeSet<_>>() {
        build.args(["-p", package]);
    }
    crate::run_step("building the cross-version suite", &mut build)?;
    let mut done: BTreeSet<(usize, Option<u32>, Option<u32>)> = BTreeSet::new();
    let mut rows = Vec::new();
    for &(source, target) in pairs {
        let started = Instant::now();
        let mut row = Row {
            source,
            target,
            seconds: 0.0,
            failed: Vec::new(),
            flaky: Vec::new(),
            ran: 0,
        };
        if covered == Some(source) && source == target {
            for (i, part) in SUITE.iter().enumerate() {
                done.insert((
                    i,
                    (part.uses != Uses::Target).then_some(source),
                    (part.uses != Uses::Source).then_some(target),
                ));
            }
            rows.push(row);
            continue;
        }
        for (i, part) in SUITE.iter().enumerate() {
            let key = (
                i,
                (part.uses != Uses::Target).then_some(source),
                (part.uses != Uses::Source).then_some(target),
            );
            // A source-only part already run on this source version (with another target)
            // would test the same thing again.
            if !done.insert(key) {
                continue;
            }
            row.ran += 1;
            let mut cmd = cargo();
            cmd.args([
                "test",
                "--quiet",
                "-p",
                part.package,
                "--test",
                part.test,
                "--",
            ])
            .args(part.filters)
            .env("SLUICE_PG_SOURCE_VERSION", source.to_string())
            .env("SLUICE_PG_TARGET_VERSION", target.to_string())
            .env_remove("SLUICE_PG_VERSION");
            let name = format!("{source} → {target}: {} ({})", part.what, part.test);
            // One retry, as the main suite's nextest profile allows; a pass on the retry is
            // shown in the table as flaky, not hidden.
            if crate::run_step(&name, &mut cmd).is_err() {
                if crate::run_step(&format!("{name}, again"), &mut cmd).is_ok() {
                    row.flaky.push(part.test);
                } else {
                    row.failed.push(part.test);
                }
            }
        }
        row.seconds = started.elapsed().as_secs_f64();
        rows.push(row);
    }
    Ok(rows)
}

/// The version table printed at the end of CI.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "cross-version suite (source → target):\n  pair       result   parts    time\n",
    );
    for row in rows {
        if row.ran == 0 && row.source == row.target {
            out.push_str(&format!(
                "  {:>2} → {:<2}    passed   the whole test suite above ran on {}\n",
                row.source, row.target, row.source
            ));
            continue;
        }
        out.push_str(&format!(
            "  {:>2} → {:<2}    {:<7}  {:>2} run  {:>5.0}s{}\n",
            row.source,
            row.target,
            if row.failed.is_empty() {
                "passed"
            } else {
                "FAILED"
            },
            row.ran,
            row.seconds,
            match (row.failed.is_empty(), row.flaky.is_empty()) {
                (true, true) => String::new(),
                (false, _) => format!("  (failed: {})", row.failed.join(", ")),
                (true, false) => format!("  (passed on a retry: {})", row.flaky.join(", ")),
            }
        ));
    }
    out.push_str(
        "  (parts a pair shares with an earlier one are not run twice: a source-only part runs once per source version)\n",
    );
    out
}

/// True when every pair passed.
pub fn passed(rows: &[Row]) -> bool {
    rows.iter().all(|r| r.failed.is_empty())
}

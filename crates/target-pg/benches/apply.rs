//! `cargo xtask bench target`: consumer-table apply rate beside raw `COPY` of the same rows
//! into the same table shape, measured in the same run on the same server.
//!
//! 200,000 records with ~1 KB JSON payloads, in batches, one transaction per batch for both
//! sides: (a) all new, (b) half new and half updates, (c) 20% deletes and 80% updates, and
//! (a) again with two connections. Set `SLUICE_BENCH_RECORDS` / `SLUICE_BENCH_BATCH` to change
//! the size.

mod support;

use sluice_core::StreamEntry;
use support::{Bench, env_usize, record, report, report_server, server_header};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let n = env_usize("SLUICE_BENCH_RECORDS", 200_000);
    let batch = env_usize("SLUICE_BENCH_BATCH", 5_000);
    let bench = Bench::start(batch).await;

    let all_new: Vec<StreamEntry> = (0..n).map(|i| record(i as u64 + 1, i, 0, false)).collect();
    let avg = all_new
        .iter()
        .map(|e| {
            serde_json::to_string(e.record.change.payload().unwrap())
                .unwrap()
                .len()
        })
        .sum::<usize>()
        / n;
    println!(
        "consumer-table apply benchmark: {n} records, ~{avg} B JSON payloads, batches of {batch}, PostgreSQL {}",
        bench.pg.binaries().version()
    );
    println!(
        "baseline: raw COPY (binary format) of the same rows into a table of the same shape, same batches, same server, same run"
    );
    println!(
        "(after an untimed warm-up of both; case (a) is the best of two alternating runs per side)\n"
    );
    println!(
        "{:<44} {:>12} {:>12} {:>7} {:>7}",
        "case", "sluice rows/s", "COPY rows/s", "ratio", "goal"
    );

    // Warm-up (untimed): the server's first bulk load pays for WAL segment creation and cold
    // caches, which would flatter whichever side runs second.
    bench.raw_copy(&all_new).await;
    let table = bench.fresh_table("warmup").await;
    bench.sluice(&table, &all_new, 1).await;

    // (a) all new: best of two alternating runs per side.
    // sluice's server CPU is that of its faster run.
    let mut copy_a: f64 = 0.0;
    let (mut sluice_a, mut sluice_a_cpu) = (0.0, 0.0);
    for _ in 0..2 {
        copy_a = copy_a.max(bench.raw_copy(&all_new).await);
        let table = bench.fresh_table("a").await;
        let (rate, cpu) = bench
            .with_server_cpu(bench.sluice(&table, &all_new, 1))
            .await;
        if rate > sluice_a {
            (sluice_a, sluice_a_cpu) = (rate, cpu);
        }
    }
    report("(a) all new, 1 connection", sluice_a, copy_a, Some(0.85));

    // (b) half updates of existing rows, half new
    let table = bench.fresh_table("b").await;
    let preload: Vec<StreamEntry> = (0..n / 2)
        .map(|i| record(i as u64 + 1, i, 0, false))
        .collect();
    bench.sluice(&table, &preload, 1).await;
    let base = n as u64;
    let mixed: Vec<StreamEntry> = (0..n)
        .map(|j| {
            // Alternate: an update of an existing record, then a new record.
            let i = if j.is_multiple_of(2) {
                j / 2
            } else {
                n / 2 + j / 2
            };
            record(base + j as u64 + 1, i, 1, false)
        })
        .collect();
    let copy_b = bench.raw_copy(&mixed).await;
    let (sluice_b, sluice_b_cpu) = bench.with_server_cpu(bench.sluice(&table, &mixed, 1)).await;
    report(
        "(b) 50% new, 50% updates, 1 connection",
        sluice_b,
        copy_b,
        None,
    );

    // (c) 20% deletes, 80% updates
    let table = bench.fresh_table("c").await;
    bench.sluice(&table, &all_new, 1).await;
    let churn: Vec<StreamEntry> = (0..n)
        .map(|i| record(base * 3 + i as u64 + 1, i, 2, i.is_multiple_of(5)))
        .collect();
    let copy_c_rows: Vec<StreamEntry> = (0..n)
        .map(|i| record(base * 3 + i as u64 + 1, i, 2, false))
        .collect();
    let copy_c = bench.raw_copy(&copy_c_rows).await;
    let (sluice_c, sluice_c_cpu) = bench.with_server_cpu(bench.sluice(&table, &churn, 1)).await;
    report(
        "(c) 20% deletes, 80% updates, 1 connection",
        sluice_c,
        copy_c,
        None,
    );

    // (a) with two connections, against single-connection COPY
    let mut sluice_a2: f64 = 0.0;
    for _ in 0..2 {
        let table = bench.fresh_table("a2").await;
        sluice_a2 = sluice_a2.max(bench.sluice(&table, &all_new, 2).await);
    }
    report("(a) all new, 2 connections", sluice_a2, copy_a, Some(1.3));

    server_header();
    report_server("(a) all new, 1 connection", n, sluice_a_cpu, copy_a);
    report_server(
        "(b) 50% new, 50% updates, 1 connection",
        n,
        sluice_b_cpu,
        copy_b,
    );
    report_server(
        "(c) 20% deletes, 80% updates, 1 connection",
        n,
        sluice_c_cpu,
        copy_c,
    );
}

//! `cargo xtask bench consumer`: records stream → consumer table, end to end, beside two
//! baselines measured in the same run on the same server: the target's own apply of the same
//! batches (the consumer's goal is ≥ 0.8× of it) and raw `COPY` of the same rows.
//!
//! 200,000 records with ~1 KB payloads, already in the stream; the consumer backfills them into
//! an empty table. Set `SLUICE_BENCH_RECORDS` / `SLUICE_BENCH_BATCH` to change the size.

#[path = "../../target-pg/benches/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_consumer::ConsumerRuntime;
use sluice_core::{
    BatchConfig, ConsumerId, LagThresholds, Provider, RecordFilter, RecordStream, StreamEntry,
};
use sluice_stream::EmbeddedStream;
use sluice_target_pg::{ConsumerTable, ConsumerTableTarget};
use support::{Bench, env_usize, record, report};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn consume(
    bench: &Bench,
    stream: &Arc<EmbeddedStream>,
    table: &ConsumerTable,
    round: usize,
) -> f64 {
    let target = Arc::new(ConsumerTableTarget::new(
        "bench",
        bench.settings(),
        table.clone(),
        1,
    ));
    let runtime = ConsumerRuntime::new(
        ConsumerId(format!("bench-{round}")),
        RecordFilter::Provider(Provider::Http),
        stream.clone(),
        target,
        BatchConfig {
            max_records: bench.batch,
            max_wait_ms: 50,
        },
        LagThresholds::default(),
    );
    let handle = runtime.handle();
    let head = stream.head().await.unwrap();
    let n = stream
        .lag(
            &RecordFilter::Provider(Provider::Http),
            sluice_core::Seq::START,
            u64::MAX >> 1,
        )
        .await
        .unwrap()
        .records;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(runtime.run(stopped));
    while handle.cursor() < head {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.send_replace(true);
    task.await.unwrap();
    rate
}

async fn run() {
    let n = env_usize("SLUICE_BENCH_RECORDS", 200_000);
    let batch = env_usize("SLUICE_BENCH_BATCH", 5_000);
    let bench = Bench::start(batch).await;
    let entries: Vec<StreamEntry> = (0..n).map(|i| record(i as u64 + 1, i, 0, false)).collect();
    let dir = tempfile::tempdir().unwrap();
    let stream = Arc::new(EmbeddedStream::open(dir.path()).await.unwrap());
    for chunk in entries.chunks(5000) {
        stream
            .append(chunk.iter().map(|e| e.record.clone()).collect())
            .await
            .unwrap();
    }
    println!(
        "consumer benchmark: {n} records (~1 KB payloads) in the stream, backfilled into an empty consumer table, batches of {batch}, PostgreSQL {}",
        bench.pg.binaries().version()
    );
    println!(
        "baselines, same run and server: the target's apply of the same batches, and raw COPY of the same rows"
    );
    println!("(after an untimed warm-up; each figure is the best of two alternating runs)\n");

    bench.raw_copy(&entries).await;
    let table = bench.fresh_table("warmup").await;
    bench.sluice(&table, &entries, 1).await;

    let (mut copy, mut apply, mut consumer): (f64, f64, f64) = (0.0, 0.0, 0.0);
    for round in 0..2 {
        copy = copy.max(bench.raw_copy(&entries).await);
        let table = bench.fresh_table("apply").await;
        apply = apply.max(bench.sluice(&table, &entries, 1).await);
        let table = bench.fresh_table("consumer").await;
        consumer = consumer.max(consume(&bench, &stream, &table, round).await);
    }
    println!(
        "{:<44} {:>12} {:>12} {:>7} {:>7}",
        "case", "rows/s", "baseline", "ratio", "goal"
    );
    report(
        "stream → target vs the target's apply",
        consumer,
        apply,
        Some(0.8),
    );
    report("stream → target vs raw COPY", consumer, copy, None);
}

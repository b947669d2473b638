//! RedisStore decisions against a bare Redis round trip on the same server, in the same
//! run: latency of one decision (claim that replays, claim of a new key) vs `GET`/`SET`
//! and a one-command `EVALSHA`, and throughput with 64 concurrent callers on one store.
//!
//! `cargo bench -p keyward-benches --bench redis -- --warm-up-time 1 --measurement-time 3`
//! (needs `redis-server` on PATH; the bench starts its own on a free port).

#[path = "redis_common.rs"]
mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;

use common::Setup;

const CONCURRENCY: usize = 64;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = rt.block_on(Setup::start());

    let mut latency = c.benchmark_group("redis_latency");
    latency.bench_function("bare_get", |b| b.to_async(&rt).iter(|| s.get()));
    latency.bench_function("bare_set", |b| b.to_async(&rt).iter(|| s.set()));
    latency.bench_function("bare_evalsha_hget", |b| {
        b.to_async(&rt).iter(|| s.evalsha_hget())
    });
    latency.bench_function("claim_replay", |b| {
        b.to_async(&rt).iter(|| s.claim_replay())
    });
    latency.bench_function("claim_new_key", |b| {
        b.to_async(&rt).iter(|| s.claim_new_key())
    });
    latency.finish();

    let mut throughput = c.benchmark_group("redis_throughput_64");
    throughput.throughput(Throughput::Elements(CONCURRENCY as u64));
    throughput.bench_function("bare_get", |b| {
        b.to_async(&rt)
            .iter(|| join_all((0..CONCURRENCY).map(|_| s.get())))
    });
    throughput.bench_function("bare_evalsha_hget", |b| {
        b.to_async(&rt)
            .iter(|| join_all((0..CONCURRENCY).map(|_| s.evalsha_hget())))
    });
    throughput.bench_function("claim_replay", |b| {
        b.to_async(&rt)
            .iter(|| join_all((0..CONCURRENCY).map(|_| s.claim_replay())))
    });
    throughput.bench_function("claim_new_key", |b| {
        b.to_async(&rt)
            .iter(|| join_all((0..CONCURRENCY).map(|_| s.claim_new_key())))
    });
    throughput.finish();
    rt.block_on(print_server_time(&s));
}

/// Redis's own time per command (`INFO commandstats`): separates server CPU from the round
/// trip.
async fn print_server_time(s: &Setup) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut s.bare.clone())
        .await
        .expect("info");
    for line in info.lines() {
        if [
            "cmdstat_get:",
            "cmdstat_set:",
            "cmdstat_evalsha:",
            "cmdstat_hmget:",
        ]
        .iter()
        .any(|p| line.starts_with(p))
        {
            println!("server: {line}");
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

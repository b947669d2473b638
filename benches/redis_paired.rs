//! Paired rounds for a noisy machine: every round runs each variant back to back (a bare
//! `GET`, a bare one-command `EVALSHA`, the idempotency claim that replays, the claim of a
//! new key; alone and with 64 concurrent callers), so load drifting over the run hits all
//! variants alike. Reports the median per variant and its ratio to the bare `GET`.
//!
//! `cargo bench -p keyward-benches --bench redis_paired` (needs `redis-server` on PATH).

#[path = "redis_common.rs"]
mod common;

use std::time::Instant;

use common::Setup;

const ROUNDS: usize = 21;
const SEQUENTIAL: usize = 1000;
const BATCHES: usize = 40;
const CONCURRENCY: usize = 64;

#[derive(Clone, Copy, Debug)]
enum Variant {
    Get,
    EvalshaHget,
    ClaimReplay,
    ClaimNewKey,
}

const VARIANTS: [Variant; 4] = [
    Variant::Get,
    Variant::EvalshaHget,
    Variant::ClaimReplay,
    Variant::ClaimNewKey,
];

async fn one(s: &Setup, variant: Variant) {
    match variant {
        Variant::Get => s.get().await,
        Variant::EvalshaHget => s.evalsha_hget().await,
        Variant::ClaimReplay => s.claim_replay().await,
        Variant::ClaimNewKey => s.claim_new_key().await,
    }
}

/// Microseconds per decision, one caller.
async fn sequential(s: &Setup, variant: Variant) -> f64 {
    let started = Instant::now();
    for _ in 0..SEQUENTIAL {
        one(s, variant).await;
    }
    started.elapsed().as_secs_f64() * 1e6 / SEQUENTIAL as f64
}

/// Decisions per second with 64 concurrent callers.
async fn concurrent(s: &Setup, variant: Variant) -> f64 {
    let started = Instant::now();
    for _ in 0..BATCHES {
        futures::future::join_all((0..CONCURRENCY).map(|_| one(s, variant))).await;
    }
    (BATCHES * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bench = Setup::start().await;
        let mut latency = vec![Vec::new(); VARIANTS.len()];
        let mut throughput = vec![Vec::new(); VARIANTS.len()];
        if let Ok(only) = std::env::var("KEYWARD_BENCH_ONLY") {
            // Profiling aid: hammer one variant (by its index) with 64 callers.
            let variant = VARIANTS[only.parse::<usize>().unwrap_or(2) % VARIANTS.len()];
            for _ in 0..ROUNDS * 5 {
                concurrent(&bench, variant).await;
            }
            return;
        }
        for _ in 0..ROUNDS {
            for (i, variant) in VARIANTS.iter().enumerate() {
                latency[i].push(sequential(&bench, *variant).await);
                throughput[i].push(concurrent(&bench, *variant).await);
            }
        }
        let latency: Vec<f64> = latency.into_iter().map(median).collect();
        let throughput: Vec<f64> = throughput.into_iter().map(median).collect();
        println!("| variant | latency (µs, median of {ROUNDS}) | vs GET | throughput, 64 callers (/s) | vs GET |");
        println!("|---|---|---|---|---|");
        for (i, variant) in VARIANTS.iter().enumerate() {
            println!(
                "| {variant:?} | {:.1} | {:.2}x | {:.0} | {:.2}x |",
                latency[i],
                latency[i] / latency[0],
                throughput[i],
                throughput[i] / throughput[0]
            );
        }
    });
}

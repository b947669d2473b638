//! Paired rounds for a noisy machine: every round runs each variant back to back (a bare
//! `GET`, a bare one-command `EVALSHA`, the idempotency claim that replays, the claim of a
//! new key; alone and with 64 concurrent callers), so load drifting over the run hits all
//! variants alike. Reports the median per variant and its ratio to the bare `GET`, and
//! what Redis itself spent per decision during the 64-caller runs: its CPU time (`INFO
//! cpu`), the time per `EVALSHA` (`INFO commandstats`) and the commands a script ran.
//!
//! `cargo bench -p keyward-benches --bench redis_paired` (needs `redis-server` on PATH).
//!
//! `KEYWARD_BENCH_SET=client` adds client-side probes (a `GET` with a `tokio::time::timeout`
//! per call, a `GET` on a connection without redis-rs's response timeout);
//! `KEYWARD_BENCH_SET=prototypes` measures the claim designs of `redis_prototypes.rs`
//! (not in the store) beside `GET` and the store's claim. `KEYWARD_BENCH_ROUNDS=n` sets
//! the rounds (default 21).

#[path = "redis_common.rs"]
mod common;
#[path = "redis_prototypes.rs"]
mod prototypes;

use std::time::Instant;

use common::{ServerStats, Setup};
use prototypes::{Proto, Protos};

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
    GetWithTimeout,
    GetUntimed,
    Replay(Proto),
    NewKey(Proto),
}

const VARIANTS: [Variant; 4] = [
    Variant::Get,
    Variant::EvalshaHget,
    Variant::ClaimReplay,
    Variant::ClaimNewKey,
];

/// The variants of `KEYWARD_BENCH_SET` (the first is the baseline, `GET`).
fn variants() -> Vec<Variant> {
    let protos = [
        Proto::CurrentScript,
        Proto::Fcall,
        Proto::HashNoCounter,
        Proto::StringWithCounter,
        Proto::StringNoCounter,
        Proto::SetNxGet,
    ];
    match std::env::var("KEYWARD_BENCH_SET").as_deref() {
        Ok("client") => vec![
            Variant::Get,
            Variant::GetWithTimeout,
            Variant::GetUntimed,
            Variant::ClaimReplay,
            Variant::ClaimNewKey,
        ],
        Ok("prototypes") => {
            let mut all = vec![Variant::Get, Variant::ClaimReplay, Variant::ClaimNewKey];
            all.extend(protos.iter().map(|p| Variant::Replay(*p)));
            all.extend(protos.iter().map(|p| Variant::NewKey(*p)));
            all
        }
        _ => VARIANTS.to_vec(),
    }
}

async fn one(s: &Setup, p: &Protos, variant: Variant) {
    match variant {
        Variant::Get => s.get().await,
        Variant::EvalshaHget => s.evalsha_hget().await,
        Variant::ClaimReplay => s.claim_replay().await,
        Variant::ClaimNewKey => s.claim_new_key().await,
        Variant::GetWithTimeout => s.get_with_timeout().await,
        Variant::GetUntimed => s.get_untimed().await,
        Variant::Replay(proto) => p.claim(proto, true).await,
        Variant::NewKey(proto) => p.claim(proto, false).await,
    }
}

/// Microseconds per decision, one caller.
async fn sequential(s: &Setup, p: &Protos, variant: Variant) -> f64 {
    let started = Instant::now();
    for _ in 0..SEQUENTIAL {
        one(s, p, variant).await;
    }
    started.elapsed().as_secs_f64() * 1e6 / SEQUENTIAL as f64
}

/// Decisions per second with 64 concurrent callers.
async fn concurrent(s: &Setup, p: &Protos, variant: Variant) -> f64 {
    let started = Instant::now();
    for _ in 0..BATCHES {
        futures::future::join_all((0..CONCURRENCY).map(|_| one(s, p, variant))).await;
    }
    (BATCHES * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
}

/// CPU time of this process (the callers, the store and the runtime) in seconds, summed
/// over its threads (`/proc/self/task/*/schedstat`, nanoseconds).
fn own_cpu() -> f64 {
    let mut ns = 0u64;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

/// Redis's side of one 64-caller run: CPU µs per decision, µs per `EVALSHA` (Redis's own
/// measure of running the script, none for `GET`) and the commands per decision.
struct ServerSide {
    cpu_us: f64,
    evalsha_us: Option<f64>,
    commands: Vec<(String, f64, f64)>,
}

fn server_side(before: &ServerStats, after: &ServerStats) -> ServerSide {
    let decisions = (BATCHES * CONCURRENCY) as f64;
    let (calls, usec) = match after.since(before, "evalsha") {
        (0, _) => after.since(before, "fcall"),
        script => script,
    };
    ServerSide {
        cpu_us: (after.cpu - before.cpu) * 1e6 / decisions,
        evalsha_us: (calls > 0).then(|| usec as f64 / calls as f64),
        commands: after
            .commands_since(before)
            .into_iter()
            .map(|(name, calls)| {
                let (_, usec) = after.since(before, &name);
                (name, calls as f64 / decisions, usec as f64 / calls as f64)
            })
            .collect(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Median and range of `values`.
fn spread(values: &[f64]) -> (f64, f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (median(values.to_vec()), min, max)
}

/// Per round, `values[round] / baseline[round]`: the ratio within one round.
fn paired(values: &[f64], baseline: &[f64]) -> Vec<f64> {
    values.iter().zip(baseline).map(|(v, b)| v / b).collect()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bench = Setup::start().await;
        let protos = Protos::start(bench.bare.clone()).await;
        let variants = variants();
        if let Ok(only) = std::env::var("KEYWARD_BENCH_ONLY") {
            // Profiling aid: hammer one variant (by its index) with 64 callers.
            let variant = variants[only.parse::<usize>().unwrap_or(2) % variants.len()];
            let times = std::env::var("KEYWARD_BENCH_TIMES")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(ROUNDS * 5);
            for _ in 0..times {
                concurrent(&bench, &protos, variant).await;
            }
            return;
        }
        let rounds = std::env::var("KEYWARD_BENCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(ROUNDS);
        let mut latency = vec![Vec::new(); variants.len()];
        let mut throughput = vec![Vec::new(); variants.len()];
        let mut cpu = vec![Vec::new(); variants.len()];
        let mut client = vec![Vec::new(); variants.len()];
        let mut evalsha = vec![Vec::new(); variants.len()];
        let mut commands = vec![Vec::new(); variants.len()];
        for _ in 0..rounds {
            for (i, variant) in variants.iter().enumerate() {
                latency[i].push(sequential(&bench, &protos, *variant).await);
                let before = bench.server_stats().await;
                let own = own_cpu();
                throughput[i].push(concurrent(&bench, &protos, *variant).await);
                client[i].push((own_cpu() - own) * 1e6 / (BATCHES * CONCURRENCY) as f64);
                let side = server_side(&before, &bench.server_stats().await);
                cpu[i].push(side.cpu_us);
                evalsha[i].extend(side.evalsha_us);
                commands[i] = side.commands;
            }
        }
        println!(
            "| variant | latency (µs, median of {rounds}) | vs GET (median, range over rounds) \
             | throughput, 64 callers (/s) | vs GET (median, range over rounds) |"
        );
        println!("|---|---|---|---|---|");
        for (i, variant) in variants.iter().enumerate() {
            let (l, _, _) = spread(&latency[i]);
            let (lr, lr_min, lr_max) = spread(&paired(&latency[i], &latency[0]));
            let (t, _, _) = spread(&throughput[i]);
            let (tr, tr_min, tr_max) = spread(&paired(&throughput[i], &throughput[0]));
            println!(
                "| {variant:?} | {l:.1} | {lr:.2}x ({lr_min:.2}–{lr_max:.2}) \
                 | {t:.0} | {tr:.2}x ({tr_min:.2}–{tr_max:.2}) |"
            );
        }
        println!();
        println!(
            "| variant (Redis's side, 64 callers) | Redis CPU µs per decision (median, range) \
             | vs GET | µs per EVALSHA (commandstats) | commands per decision \
             | client CPU µs per decision (median) |"
        );
        println!("|---|---|---|---|---|---|");
        let cpu_get = spread(&cpu[0]).0;
        for (i, variant) in variants.iter().enumerate() {
            let (c, c_min, c_max) = spread(&cpu[i]);
            let script = if evalsha[i].is_empty() {
                "–".to_owned()
            } else {
                format!("{:.2}", spread(&evalsha[i]).0)
            };
            let inner: Vec<String> = commands[i]
                .iter()
                .map(|(name, per, us)| format!("{name} {per:.2} ({us:.2} µs)"))
                .collect();
            println!(
                "| {variant:?} | {c:.2} ({c_min:.2}–{c_max:.2}) | {:.2}x | {script} | {} | {:.1} |",
                c / cpu_get,
                inner.join(", "),
                spread(&client[i]).0
            );
        }
    });
}

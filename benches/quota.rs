//! Quota decisions: the memory `QuotaStore` against governor's keyed rate limiter on the
//! same 10k-key round-robin pattern, and the whole `QuotaLayer` against a bare service.
//!
//! ```text
//! CARGO_BUILD_JOBS=1 cargo bench -p keyward-benches --bench quota -- --warm-up-time 1 --measurement-time 3
//! ```

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keyward::MemoryStore;
use keyward_core::gcra::Quota;
use keyward_core::store::QuotaStore;
use keyward_core::{Key, Scope, ScopedKey};

const KEYS: usize = 10_000;
const LIMIT: u32 = 1_000_000;

fn scoped_keys() -> Vec<ScopedKey> {
    (0..KEYS)
        .map(|i| {
            ScopedKey::new(
                "quota",
                "bench",
                Scope::Unscoped,
                Key::from(format!("api-key-{i:08}")),
            )
        })
        .collect()
}

fn decisions(c: &mut Criterion) {
    let keys = scoped_keys();
    let names: Vec<Arc<str>> = keys.iter().map(ScopedKey::shared_storage_key).collect();
    let mut group = c.benchmark_group("quota_decision_10k_keys");

    let store = MemoryStore::new();
    let quota = Quota::per_second(LIMIT).expect("valid quota");
    let mut i = 0;
    group.bench_function("keyward_memory_store", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let decision = store.check(&keys[i], &quota, 1).into_inner();
            black_box(decision.is_ok_and(|d| d.is_allowed()))
        })
    });

    let limiter = governor::RateLimiter::keyed(governor::Quota::per_second(
        NonZeroU32::new(LIMIT).expect("non-zero"),
    ));
    let mut i = 0;
    group.bench_function("governor_keyed_check_key", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(limiter.check_key(&names[i]).is_ok())
        })
    });

    // The same limiter on std's clock (what tokio's Instant reads), to separate the
    // clock from the table.
    let limiter = governor::RateLimiter::dashmap_with_clock(
        governor::Quota::per_second(NonZeroU32::new(LIMIT).expect("non-zero")),
        governor::clock::MonotonicClock,
    );
    let mut i = 0;
    group.bench_function("governor_keyed_check_key_std_clock", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(limiter.check_key(&names[i]).is_ok())
        })
    });

    // What moka alone costs for the same read-modify-write (not even atomic: get, then
    // insert), for the choice documented in `memory/quota.rs`.
    let cache: moka::sync::Cache<Arc<str>, u64> = moka::sync::Cache::builder()
        .max_capacity(1 << 20)
        .time_to_idle(Duration::from_secs(60))
        .build();
    let mut i = 0;
    group.bench_function("moka_sync_get_then_insert", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let tat = cache.get(&names[i]).unwrap_or(0);
            let step = quota.decide(tat, 1, 1);
            if let Some(new_tat) = step.new_tat {
                cache.insert(names[i].clone(), new_tat);
            }
            black_box(step.decision.is_allowed())
        })
    });
    group.finish();
}

/// The parts of a memory decision, to see where its time goes.
fn parts(c: &mut Criterion) {
    let keys = scoped_keys();
    let mut group = c.benchmark_group("quota_decision_parts");
    group.bench_function("tokio_instant_now", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    let hasher = std::hash::RandomState::new();
    let mut i = 0;
    group.bench_function("siphash_storage_key", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(std::hash::BuildHasher::hash_one(
                &hasher,
                keys[i].storage_key(),
            ))
        })
    });
    let quota = Quota::per_second(LIMIT).expect("valid quota");
    let mut i = 0u64;
    group.bench_function("gcra_decide", |b| {
        b.iter(|| {
            i += 1;
            black_box(quota.decide(black_box(i * 7), black_box(i * 5), 1))
        })
    });
    group.finish();
}

criterion_group!(benches, decisions, parts);
criterion_main!(benches);

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
    let raw: Vec<Key> = (0..KEYS)
        .map(|i| Key::from(format!("api-key-{i:08}")))
        .collect();
    let mut i = 0;
    group.bench_function("scoped_key_new_with_sha256_hash", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(ScopedKey::new(
                "quota",
                "bench",
                Scope::Unscoped,
                raw[i].clone(),
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

/// Polls a future that must be ready at once (both services answer synchronously).
fn now_or_never<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

/// The whole layer (key extraction, scoped key with its SHA-256 hash, span, decision,
/// two headers) against the bare service it wraps.
fn layer(c: &mut Criterion) {
    use bytes::Bytes;
    use http::{HeaderName, HeaderValue, Request, Response};
    use http_body_util::Full;
    use keyward::{KeySpec, QuotaLayer};
    use tower::{Layer, Service, service_fn};

    let header = HeaderName::from_static("x-api-key");
    let values: Vec<HeaderValue> = (0..KEYS)
        .map(|i| HeaderValue::try_from(format!("api-key-{i:08}")).expect("valid header"))
        .collect();
    let request = |i: usize| {
        let mut req = Request::new(Full::<Bytes>::default());
        req.headers_mut().insert(header.clone(), values[i].clone());
        req
    };
    let bare = service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let quota = Quota::per_second(LIMIT).expect("valid quota");
    let mut limited = QuotaLayer::new(MemoryStore::new(), quota)
        .route("bench")
        .key(KeySpec::Header(header.clone()))
        .layer(bare);
    let mut bare = bare;

    let mut group = c.benchmark_group("quota_layer_10k_keys");
    let mut i = 0;
    group.bench_function("bare_service_fn", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let res = now_or_never(bare.call(request(i))).and_then(Result::ok);
            black_box(res.map(|r| r.status()))
        })
    });
    let mut i = 0;
    group.bench_function("quota_layer_over_service_fn", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let res = now_or_never(limited.call(request(i))).and_then(Result::ok);
            black_box(res.map(|r| r.status()))
        })
    });
    // Priced by the response (issue 16): a read-only peek before the call, the
    // upstream's `x-tokens-used` read from the answer, the charge when the body is
    // dropped (here: right after the status is read).
    let tokens = service_fn(|_req: Request<Full<Bytes>>| async {
        let mut res = Response::new(Full::new(Bytes::from_static(b"ok")));
        res.headers_mut()
            .insert("x-tokens-used", HeaderValue::from_static("3"));
        Ok::<_, std::convert::Infallible>(res)
    });
    let mut priced = QuotaLayer::new(MemoryStore::new(), quota)
        .route("bench")
        .key(KeySpec::Header(header.clone()))
        .charge_after(keyward::quota::ResponseCost::header("x-tokens-used"))
        .layer(tokens);
    let mut i = 0;
    group.bench_function("priced_quota_layer_over_service_fn", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let res = now_or_never(priced.call(request(i))).and_then(Result::ok);
            black_box(res.map(|r| r.status()))
        })
    });
    // The bare service of the priced bench: it also sets the header.
    let mut tokens_bare = tokens;
    let mut i = 0;
    group.bench_function("bare_service_fn_with_cost_header", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let res = now_or_never(tokens_bare.call(request(i))).and_then(Result::ok);
            black_box(res.map(|r| r.status()))
        })
    });
    // Two stacked quota layers (per second and per day on the same key): the cost of
    // a second policy, headers merged.
    let per_day = Quota::new(LIMIT, Duration::from_secs(86_400)).expect("valid quota");
    let mut stacked = QuotaLayer::new(MemoryStore::new(), quota)
        .route("bench")
        .policy_name("per-second")
        .key(KeySpec::Header(header.clone()))
        .layer(
            QuotaLayer::new(MemoryStore::new(), per_day)
                .route("bench")
                .policy_name("per-day")
                .key(KeySpec::Header(header.clone()))
                .layer(bare),
        );
    let mut i = 0;
    group.bench_function("two_quota_layers_over_service_fn", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let res = now_or_never(stacked.call(request(i))).and_then(Result::ok);
            black_box(res.map(|r| r.status()))
        })
    });
    group.finish();
}

criterion_group!(benches, decisions, parts, layer);
criterion_main!(benches);

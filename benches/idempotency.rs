//! IdempotencyLayer overhead: bare `service_fn` vs the layer on first execution vs the
//! layer on replay, over 10k distinct keys, in one run.
//!
//! `cargo bench -p keyward-benches --bench idempotency`

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use keyward::{IdempotencyLayer, MemoryStore};
use tower::{Service, ServiceBuilder, ServiceExt};

const KEYS: u64 = 10_000;

async fn handler(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"id\":\"ch_1\",\"status\":\"succeeded\"}",
        )))
        .expect("valid response"))
}

fn request(key: u64) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header("idempotency-key", format!("key-{key}"))
        .header("authorization", "Bearer sk_test_123")
        .body(Full::new(Bytes::from_static(
            b"{\"amount\":1000,\"currency\":\"eur\"}",
        )))
        .expect("valid request")
}

async fn drive<S, B>(svc: &mut S, req: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("call");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    std::hint::black_box(body);
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("idempotency");

    let bare = tower::service_fn(handler);
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter_batched(
            || request(1),
            |req| {
                let mut svc = bare;
                async move { drive(&mut svc, req).await }
            },
            BatchSize::SmallInput,
        )
    });

    let store = MemoryStore::new();
    let layered = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store.clone()).route("payments"))
        .service_fn(handler);
    let fresh = AtomicU64::new(KEYS);
    group.bench_function("first_execution", |b| {
        b.to_async(&rt).iter_batched(
            || request(fresh.fetch_add(1, Ordering::Relaxed)),
            |req| {
                let mut svc = layered.clone();
                async move { drive(&mut svc, req).await }
            },
            BatchSize::SmallInput,
        )
    });

    let replay_store = MemoryStore::new();
    let replaying = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(replay_store).route("payments"))
        .service_fn(handler);
    rt.block_on(async {
        for key in 0..KEYS {
            drive(&mut replaying.clone(), request(key)).await;
        }
    });
    let next = AtomicU64::new(0);
    group.bench_function("replay", |b| {
        b.to_async(&rt).iter_batched(
            || request(next.fetch_add(1, Ordering::Relaxed) % KEYS),
            |req| {
                let mut svc = replaying.clone();
                async move { drive(&mut svc, req).await }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

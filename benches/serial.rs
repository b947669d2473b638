//! PerKeySerialLayer: uncontended acquire + release on the memory store, and the whole
//! layer against the same service without it, in one run.
//!
//! Futures are polled once with a no-op waker: uncontended, every one of them is ready
//! at the first poll, so this measures the CPU cost of the layer without an executor.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::Full;
use keyward::{MemoryStore, PerKeySerialLayer};
use keyward_core::store::{AcquireOutcome, SerialLimits, SerialStore};
use keyward_core::{Key, KeySpec, Scope, ScopedKey};
use tower::{Layer, Service, service_fn};

fn ready<F: Future>(future: F) -> F::Output {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(future).poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("uncontended futures are ready at once"),
    }
}

fn store_level(c: &mut Criterion) {
    let mut group = c.benchmark_group("serial/store");
    let store = MemoryStore::new();
    let key = ScopedKey::new("serial", "bench", Scope::Unscoped, Key::from("account-42"));
    let limits = SerialLimits {
        max_wait: Duration::from_secs(5),
        max_queue: 64,
        permits: 1,
    };
    group.bench_function("memory_acquire_release", |b| {
        b.iter(|| {
            let AcquireOutcome::Acquired(permit) =
                ready(store.acquire(black_box(&key), limits)).unwrap()
            else {
                panic!("uncontended")
            };
            store.release_detached(permit);
        })
    });
    // Contended: a second request queues, the holder releases, the key is handed over.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _runtime = runtime.enter();
    group.bench_function("memory_queue_handoff_release", |b| {
        let mut cx = Context::from_waker(Waker::noop());
        b.iter(|| {
            let AcquireOutcome::Acquired(first) = ready(store.acquire(&key, limits)).unwrap()
            else {
                panic!("uncontended")
            };
            let mut second = pin!(store.acquire(&key, limits));
            assert!(second.as_mut().poll(&mut cx).is_pending());
            store.release_detached(first);
            let Poll::Ready(Ok(AcquireOutcome::Acquired(second))) = second.poll(&mut cx) else {
                panic!("handed over")
            };
            store.release_detached(second);
        })
    });
    // The floor under any table of held keys: insert and remove under a mutex.
    let map: Mutex<HashMap<Arc<str>, u64>> = Mutex::new(HashMap::new());
    let shared = key.shared_storage_key();
    group.bench_function("baseline_mutex_map_insert_remove", |b| {
        b.iter(|| {
            map.lock().unwrap().insert(black_box(shared.clone()), 1);
            black_box(map.lock().unwrap().remove(black_box(&*shared)));
        })
    });
    group.finish();
}

fn request() -> Request<Full<Bytes>> {
    Request::post("/accounts/42/transfers")
        .header("x-account", "42")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn handler(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

fn layer_level(c: &mut Criterion) {
    let mut group = c.benchmark_group("serial/layer");
    let mut bare = service_fn(handler);
    group.bench_function("bare_service_fn", |b| {
        b.iter(|| {
            ready(std::future::poll_fn(|cx| bare.poll_ready(cx))).unwrap();
            black_box(ready(bare.call(request())).unwrap());
        })
    });
    let mut layered = PerKeySerialLayer::new(MemoryStore::new())
        .route("bench")
        .key(KeySpec::parse("header:x-account").unwrap())
        .layer(service_fn(handler));
    group.bench_function("per_key_serial", |b| {
        b.iter(|| {
            ready(std::future::poll_fn(|cx| layered.poll_ready(cx))).unwrap();
            // Dropping the response (and so its body) releases the key.
            black_box(ready(layered.call(request())).unwrap());
        })
    });
    group.finish();
}

criterion_group!(benches, store_level, layer_level);
criterion_main!(benches);

//! SingleFlightLayer overhead: the leader path (no followers) against a bare
//! `service_fn` in the same run, and a burst of N identical requests coalesced into one
//! inner call against N bare calls.
//!
//! `cargo bench -p keyward-benches --bench single_flight -- --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use keyward::{MemoryStore, SingleFlightLayer};
use keyward_core::store::{FlightRole, Landing, SingleFlightStore, StoreError};
use keyward_core::{FencingToken, KeyExtractor, KeySpec, Scope, ScopedKey};
use tokio::sync::Notify;
use tower::{Layer, Service, ServiceExt, service_fn};

const BODY: &str = "{\"items\":[1,2,3],\"next\":null}";

fn request() -> Request<()> {
    Request::get("/items?page=2&size=50").body(()).unwrap()
}

fn bare() -> impl Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            BODY.as_bytes(),
        ))))
    })
}

/// Answers only once `release` is notified: the burst's leader waits there while the
/// followers join.
fn gated(
    release: Arc<Notify>,
) -> impl Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |_req: Request<()>| {
        let release = release.clone();
        async move {
            release.notified().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                BODY.as_bytes(),
            ))))
        }
    })
}

/// Polls every request of a burst in each pass (all of them join before anything
/// answers), notifies `release` after the first pass, and reads every body.
async fn burst<F, B>(futures: Vec<F>, release: Option<&Notify>) -> usize
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut responses: Vec<Option<Response<B>>> = futures.iter().map(|_| None).collect();
    let mut first_pass = true;
    poll_fn(|cx| {
        let mut pending = false;
        for (future, slot) in futures.iter_mut().zip(responses.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(response) => *slot = Some(response.unwrap()),
                    Poll::Pending => pending = true,
                }
            }
        }
        if let (true, Some(release)) = (std::mem::take(&mut first_pass), release) {
            release.notify_one();
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    let mut bytes = 0;
    for response in responses.into_iter().flatten() {
        bytes += response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .len();
    }
    bytes
}

/// A store that always grants the lead and forgets publications: isolates the cost of
/// in-process coalescing from the store's own decision.
#[derive(Clone)]
struct NoopStore;

impl SingleFlightStore for NoopStore {
    async fn lead(&self, _: &ScopedKey, _: Duration) -> Result<FlightRole, StoreError> {
        Ok(FlightRole::Leader(FencingToken(1)))
    }
    async fn publish(&self, _: &ScopedKey, _: FencingToken, _: Landing) -> Result<(), StoreError> {
        Ok(())
    }
    fn abandon_detached(&self, _: ScopedKey, _: FencingToken) {}
    async fn wait(&self, _: &ScopedKey, _: Duration) -> Result<Option<Landing>, StoreError> {
        Ok(None)
    }
}

fn leader_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare_svc = bare();
    let layered = SingleFlightLayer::new(MemoryStore::new()).layer(bare());
    let mut group = c.benchmark_group("single_flight/leader");
    group.bench_function("bare_service_fn", |b| {
        b.to_async(&rt).iter(|| async {
            let response = bare_svc.clone().oneshot(request()).await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        })
    });
    // What every keyed layer pays before coordinating: extracting and scoping the key.
    group.bench_function("bare_plus_key_extraction", |b| {
        b.to_async(&rt).iter(|| async {
            let req = request();
            let key = KeySpec::MethodUri.extract(&req).unwrap().unwrap();
            let key = ScopedKey::new("flight", "default", Scope::Anonymous, key);
            let response = bare_svc.clone().oneshot(req).await.unwrap();
            (
                key,
                response.into_body().collect().await.unwrap().to_bytes(),
            )
        })
    });
    group.bench_function("single_flight_leader", |b| {
        b.to_async(&rt).iter(|| async {
            let response = layered.clone().oneshot(request()).await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        })
    });
    let noop_store = SingleFlightLayer::new(NoopStore).layer(bare());
    group.bench_function("single_flight_leader_noop_store", |b| {
        b.to_async(&rt).iter(|| async {
            let response = noop_store.clone().oneshot(request()).await.unwrap();
            response.into_body().collect().await.unwrap().to_bytes()
        })
    });
    group.finish();
}

fn bursts(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("single_flight/burst");
    for n in [10usize, 100, 1000] {
        group.throughput(criterion::Throughput::Elements(n as u64));
        let bare_svc = bare();
        group.bench_with_input(BenchmarkId::new("bare_calls", n), &n, |b, &n| {
            b.to_async(&rt).iter(|| {
                let futures = (0..n)
                    .map(|_| bare_svc.clone().oneshot(request()))
                    .collect();
                burst(futures, None)
            })
        });
        let release = Arc::new(Notify::new());
        let layered = SingleFlightLayer::new(MemoryStore::new()).layer(gated(release.clone()));
        group.bench_with_input(BenchmarkId::new("coalesced", n), &n, |b, &n| {
            b.to_async(&rt).iter(|| {
                let futures = (0..n).map(|_| layered.clone().oneshot(request())).collect();
                let release = release.clone();
                async move { burst(futures, Some(&release)).await }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, leader_path, bursts);
criterion_main!(benches);

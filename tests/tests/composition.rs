//! All four layers in one stack, in the sidecar's order (quota -> idempotency -> serial ->
//! single_flight -> service) and in the reverse order, on one MemoryStore.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keyward::core::gcra::Quota;
use keyward::idempotency::OnInFlight;
use keyward::{
    IdempotencyLayer, KeySpec, MemoryStore, PerKeySerialLayer, QuotaLayer, SingleFlightLayer,
};
use keyward_tests::{TestBody, seen};
use tower::util::BoxCloneSyncService;
use tower::{Layer, ServiceExt};

type Svc = BoxCloneSyncService<Request<TestBody>, Response<Full<Bytes>>, Infallible>;

#[derive(Clone, Default)]
struct Handler {
    calls: Arc<AtomicUsize>,
    inside: Arc<AtomicUsize>,
    max_inside: Arc<AtomicUsize>,
}

impl Handler {
    fn service(&self) -> Svc {
        let this = self.clone();
        BoxCloneSyncService::new(tower::service_fn(move |req: Request<TestBody>| {
            let this = this.clone();
            async move {
                let n = this.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let now = this.inside.fetch_add(1, Ordering::SeqCst) + 1;
                this.max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                this.inside.fetch_sub(1, Ordering::SeqCst);
                let body = format!("{} {} call={n}", req.method(), req.uri().path());
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            }
        }))
    }
}

/// Boxes a layered service with its body collected into `Full`, so that stacks of any
/// order have one type.
fn boxed<S, B>(svc: S) -> Svc
where
    S: tower::Service<Request<TestBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    BoxCloneSyncService::new(svc.and_then(|res: Response<B>| async move {
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Ok(Response::from_parts(parts, Full::new(bytes)))
    }))
}

fn quota(store: &MemoryStore) -> QuotaLayer<MemoryStore> {
    QuotaLayer::new(store.clone(), Quota::per_minute(1000).unwrap())
        .route("r")
        .key(KeySpec::parse("header:x-tenant").unwrap())
}
fn idempotency(store: &MemoryStore) -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(store.clone())
        .route("r")
        .on_in_flight(OnInFlight::Wait(Duration::from_secs(5)))
}
fn serial(store: &MemoryStore) -> PerKeySerialLayer<MemoryStore> {
    PerKeySerialLayer::new(store.clone())
        .route("r")
        .key(KeySpec::parse("header:x-account").unwrap())
}
fn flight(store: &MemoryStore) -> SingleFlightLayer<MemoryStore> {
    SingleFlightLayer::new(store.clone()).route("r")
}

fn sidecar_order(store: &MemoryStore, handler: &Handler) -> Svc {
    let svc = boxed(flight(store).layer(handler.service()));
    let svc = boxed(serial(store).layer(svc));
    let svc = boxed(idempotency(store).layer(svc));
    boxed(quota(store).layer(svc))
}

fn reverse_order(store: &MemoryStore, handler: &Handler) -> Svc {
    let svc = boxed(quota(store).layer(handler.service()));
    let svc = boxed(idempotency(store).layer(svc));
    let svc = boxed(serial(store).layer(svc));
    boxed(flight(store).layer(svc))
}

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<TestBody> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("x-tenant", "t1");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from_static(b"body")))
        .unwrap()
}

async fn all_layers_keep_their_promises(build: fn(&MemoryStore, &Handler) -> Svc) {
    let store = MemoryStore::new();
    let handler = Handler::default();
    let svc = build(&store, &handler);

    // Idempotency: 20 concurrent retries of one POST run once and all get its response.
    let posts: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(
                svc.clone()
                    .oneshot(req("POST", "/pay", &[("idempotency-key", "k1")])),
            )
        })
        .collect();
    let mut bodies = Vec::new();
    for post in posts {
        let res = seen(post.await.unwrap().unwrap()).await;
        assert_eq!(res.status, StatusCode::OK);
        bodies.push(res.body);
    }
    assert!(bodies.iter().all(|b| b == &bodies[0]));
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);

    // Single flight: 20 concurrent identical GETs reach the handler once.
    let gets: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.clone().oneshot(req("GET", "/items", &[]))))
        .collect();
    for get in gets {
        assert_eq!(get.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(handler.calls.load(Ordering::SeqCst), 2);

    // Serial: distinct POSTs on one account never overlap.
    handler.max_inside.store(0, Ordering::SeqCst);
    let writes: Vec<_> = (0..10)
        .map(|i| {
            let key = format!("w{i}");
            tokio::spawn(svc.clone().oneshot(req(
                "POST",
                "/accounts/1",
                &[("idempotency-key", &key), ("x-account", "1")],
            )))
        })
        .collect();
    for write in writes {
        assert_eq!(write.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(handler.max_inside.load(Ordering::SeqCst), 1);
    assert_eq!(handler.calls.load(Ordering::SeqCst), 12);
    assert_eq!(store.serial_keys_in_use(), 0);
}

#[tokio::test(start_paused = true)] // the handler sleeps; paused time runs it only once every task is parked
async fn sidecar_order_quota_idempotency_serial_single_flight() {
    all_layers_keep_their_promises(sidecar_order).await;
}

#[tokio::test(start_paused = true)] // the handler sleeps; paused time runs it only once every task is parked
async fn reverse_order_single_flight_serial_idempotency_quota() {
    all_layers_keep_their_promises(reverse_order).await;
}

#[tokio::test]
async fn quota_outermost_limits_replays_too() {
    let store = MemoryStore::new();
    let handler = Handler::default();
    let limited = QuotaLayer::new(store.clone(), Quota::per_minute(2).unwrap())
        .route("r")
        .key(KeySpec::parse("header:x-tenant").unwrap());
    let svc = boxed(limited.layer(boxed(idempotency(&store).layer(handler.service()))));
    let statuses: Vec<StatusCode> = futures::future::join_all((0..3).map(|_| {
        let svc = svc.clone();
        async move {
            svc.oneshot(req("POST", "/pay", &[("idempotency-key", "k")]))
                .await
                .unwrap()
                .status()
        }
    }))
    .await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
            .count(),
        1
    );
    assert_eq!(handler.calls.load(Ordering::SeqCst), 1);
}

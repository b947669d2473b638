//! PerKeySerialLayer, black box: mutual exclusion, FIFO, fencing tokens, release on body
//! end / drop / error / panic / cancellation, limits, store failures.
#![allow(clippy::unwrap_used)]

mod serial_support;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::poll;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keyward::serial::PermitBody;
use keyward::{MemoryStore, PerKeySerialLayer};
use keyward_core::problem::types;
use keyward_core::store::{OnStoreError, SerialStore};
use keyward_core::{FencingToken, KeySpec, KeywardBody};
use serial_support::DownStore;
use tokio::sync::{Barrier, Semaphore};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};

type Req = Request<Full<Bytes>>;
type Res<St = MemoryStore> = Response<KeywardBody<PermitBody<Full<Bytes>, St>>>;

fn req(key: &str) -> Req {
    Request::get("/")
        .header("x-key", key)
        .body(Full::default())
        .unwrap()
}

fn with_header(mut req: Req, name: &'static str, value: &str) -> Req {
    req.headers_mut().insert(name, value.parse().unwrap());
    req
}

fn layer<St>(store: St) -> PerKeySerialLayer<St> {
    PerKeySerialLayer::new(store)
        .route("test")
        .key(KeySpec::parse("header:x-key").unwrap())
}

/// Answers with the fencing token it was given as the body.
fn echo_token(req: Req) -> impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> {
    let token = req.extensions().get::<FencingToken>().map(|t| t.get());
    let header = req.headers().get("keyward-fencing-token").cloned();
    async move {
        assert_eq!(
            header.map(|h| h.to_str().unwrap().parse::<u64>().unwrap()),
            token,
            "header and extension carry the same token"
        );
        let body = token.map(|t| t.to_string()).unwrap_or_default();
        Ok(Response::new(Full::new(Bytes::from(body))))
    }
}

async fn problem_type<St: SerialStore>(res: Res<St>) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    json["type"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_requests_over_five_keys_never_overlap_and_run_in_arrival_order() {
    const KEYS: usize = 5;
    const REQUESTS: usize = 200;
    let store = MemoryStore::new();
    let inside: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let max_inside: Arc<Vec<AtomicUsize>> =
        Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    // Per key: (sequence number, token) in the order the handler ran them.
    type ServedLog = Arc<Mutex<Vec<Vec<(usize, u64)>>>>;
    let served: ServedLog = Arc::new(Mutex::new(vec![vec![]; KEYS]));
    let gates_in = Arc::new(Barrier::new(KEYS + 1));
    let gates_open = Arc::new(Semaphore::new(0));

    let handler = {
        let (inside, max_inside, served) = (inside.clone(), max_inside.clone(), served.clone());
        let (gates_in, gates_open) = (gates_in.clone(), gates_open.clone());
        service_fn(move |req: Req| {
            let (inside, max_inside, served) = (inside.clone(), max_inside.clone(), served.clone());
            let (gates_in, gates_open) = (gates_in.clone(), gates_open.clone());
            async move {
                let key: usize = req.headers()["x-key"].to_str().unwrap()[1..]
                    .parse()
                    .unwrap();
                let seq: usize = req.headers()["x-seq"].to_str().unwrap().parse().unwrap();
                let token = req.extensions().get::<FencingToken>().unwrap().get();
                let now = inside[key].fetch_add(1, Ordering::SeqCst) + 1;
                max_inside[key].fetch_max(now, Ordering::SeqCst);
                if req.headers().contains_key("x-gate") {
                    gates_in.wait().await;
                    gates_open.acquire().await.unwrap().forget();
                }
                // Give any overlapping request time to show up.
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                served.lock().unwrap()[key].push((seq, token));
                inside[key].fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let svc = layer(store.clone()).max_queue(64).layer(handler);
    let request =
        |key: usize, seq: usize| with_header(req(&format!("k{key}")), "x-seq", &seq.to_string());

    // Every key is first held by a gate request, so that all others queue behind it.
    let mut tasks = Vec::new();
    for key in 0..KEYS {
        let gate = with_header(request(key, usize::MAX), "x-gate", "1");
        let call = svc.clone().oneshot(gate);
        tasks.push(tokio::spawn(async move {
            let res: Res = call.await.unwrap();
            res.into_body().collect().await.unwrap();
        }));
    }
    gates_in.wait().await;

    // Queue the rest in a known order: each future is polled once (which enqueues it)
    // before the next one is created.
    for seq in 0..REQUESTS {
        let mut call = Box::pin(svc.clone().oneshot(request(seq % KEYS, seq)));
        assert!(poll!(&mut call).is_pending(), "request {seq} must queue");
        tasks.push(tokio::spawn(async move {
            let res: Res = call.await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.into_body().collect().await.unwrap();
        }));
    }
    gates_open.add_permits(KEYS);
    for task in tasks {
        task.await.unwrap();
    }

    let served = served.lock().unwrap();
    for key in 0..KEYS {
        assert_eq!(
            max_inside[key].load(Ordering::SeqCst),
            1,
            "key {key} overlapped"
        );
        let order: Vec<usize> = served[key].iter().map(|(seq, _)| *seq).collect();
        let mut expected = vec![usize::MAX];
        expected.extend((0..REQUESTS).filter(|seq| seq % KEYS == key));
        assert_eq!(order, expected, "key {key} not served in arrival order");
        assert!(
            served[key].windows(2).all(|w| w[0].1 < w[1].1),
            "key {key}: tokens not strictly increasing"
        );
    }
    assert_eq!(
        store.serial_keys_in_use(),
        0,
        "per-key table empty after traffic"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unread_body_keeps_the_key_and_dropping_it_releases() {
    let store = MemoryStore::new();
    let svc = layer(store.clone()).layer(service_fn(echo_token));
    let first: Res = svc.clone().oneshot(req("a")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);

    let mut second = Box::pin(svc.clone().oneshot(req("a")));
    assert!(poll!(&mut second).is_pending());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(
        poll!(&mut second).is_pending(),
        "the next request waits while the body is unread"
    );

    drop(first);
    let second = second.await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    drop(second);
    assert_eq!(store.serial_keys_in_use(), 0);
}

/// Issue 13: a client that never reads its response held the key for as long as its
/// connection lived. With `max_hold` the key goes to the next request after that long,
/// with a higher fencing token; the stale holder's late release changes nothing.
#[tokio::test(start_paused = true)]
async fn max_hold_takes_the_key_from_a_holder_that_never_finishes() {
    let store = MemoryStore::new();
    let svc = layer(store.clone())
        .max_hold(Duration::from_secs(1))
        .layer(service_fn(echo_token));
    let stuck: Res = svc.clone().oneshot(req("a")).await.unwrap();
    let start = Instant::now();
    let next: Res = svc.clone().oneshot(req("a")).await.unwrap();
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(1),
        "let in at max_hold"
    );
    assert_eq!(next.status(), StatusCode::OK);
    let stale: u64 = body_text(stuck).await.parse().unwrap();
    let third = Box::pin(svc.clone().oneshot(req("a")));
    // The stale holder's body is over (and released): the key is still `next`'s.
    let mut third = third;
    assert!(
        poll!(&mut third).is_pending(),
        "the new holder keeps the key"
    );
    let token: u64 = body_text(next).await.parse().unwrap();
    assert!(token > stale, "the next holder's token is higher");
    assert_eq!(third.await.unwrap().status(), StatusCode::OK);
    assert_eq!(store.serial_keys_in_use(), 0);
}

async fn body_text(res: Res) -> String {
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn reading_the_body_to_its_end_releases_before_the_body_is_dropped() {
    let store = MemoryStore::new();
    let svc = layer(store.clone()).layer(service_fn(echo_token));
    let first: Res = svc.clone().oneshot(req("a")).await.unwrap();
    let mut body = first.into_body();
    assert!(matches!(&body, KeywardBody::Inner { body } if body.holds_key()));
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    assert!(matches!(&body, KeywardBody::Inner { body } if !body.holds_key()));
    let second = svc.clone().oneshot(req("a")).await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    drop((body, second));
    assert_eq!(store.serial_keys_in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_the_queue() {
    let store = MemoryStore::new();
    let svc = layer(store.clone())
        .max_queue(2)
        .layer(service_fn(echo_token));
    let holder: Res = svc.clone().oneshot(req("a")).await.unwrap();
    let mut cancelled = Box::pin(svc.clone().oneshot(req("a")));
    let mut next = Box::pin(svc.clone().oneshot(req("a")));
    assert!(poll!(&mut cancelled).is_pending());
    assert!(poll!(&mut next).is_pending());
    drop(cancelled);

    // Its queue slot is free again...
    let mut after = Box::pin(svc.clone().oneshot(req("a")));
    assert!(poll!(&mut after).is_pending(), "queued, not refused");
    // ...and it does not hold up the requests behind it.
    drop(holder);
    let next = next.await.unwrap();
    assert_eq!(next.status(), StatusCode::OK);
    drop(next);
    let after = after.await.unwrap();
    assert_eq!(after.status(), StatusCode::OK);
    drop(after);
    assert_eq!(store.serial_keys_in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn max_wait_gives_503_with_retry_after() {
    let store = MemoryStore::new();
    let svc = layer(store.clone())
        .max_wait(Duration::from_millis(1500))
        .layer(service_fn(echo_token));
    let holder: Res = svc.clone().oneshot(req("a")).await.unwrap();
    let start = Instant::now();
    let res = svc.clone().oneshot(req("a")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "2");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert_eq!(problem_type(res).await, types::SERIAL_TIMEOUT);
    drop(holder);
    assert_eq!(store.serial_keys_in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn max_queue_gives_503_at_once_with_retry_after() {
    let store = MemoryStore::new();
    let svc = layer(store.clone())
        .max_queue(1)
        .layer(service_fn(echo_token));
    let holder: Res = svc.clone().oneshot(req("a")).await.unwrap();
    let mut waiting = Box::pin(svc.clone().oneshot(req("a")));
    assert!(poll!(&mut waiting).is_pending());
    let start = Instant::now();
    let res = svc.clone().oneshot(req("a")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "5");
    assert_eq!(problem_type(res).await, types::SERIAL_QUEUE_FULL);
    drop(holder);
    assert_eq!(waiting.await.unwrap().status(), StatusCode::OK);
    assert_eq!(store.serial_keys_in_use(), 0);
}

#[tokio::test]
async fn different_keys_run_in_parallel() {
    let store = MemoryStore::new();
    let both_inside = Arc::new(Barrier::new(2));
    let svc = layer(store.clone()).layer(service_fn(move |_req: Req| {
        let both_inside = both_inside.clone();
        async move {
            // Only returns once the other key's request is inside too.
            both_inside.wait().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }
    }));
    let both = async { tokio::join!(svc.clone().oneshot(req("a")), svc.clone().oneshot(req("b"))) };
    let (a, b) = tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("requests for different keys must not wait for each other");
    assert_eq!(a.unwrap().status(), StatusCode::OK);
    assert_eq!(b.unwrap().status(), StatusCode::OK);
    assert_eq!(store.serial_keys_in_use(), 0);
}

/// A service that fails on `x-fail`, panics on `x-panic`, never answers on `x-hang`.
async fn misbehaving(req: Req) -> Result<Response<Full<Bytes>>, BoxError> {
    if req.headers().contains_key("x-fail") {
        return Err("upstream failed".into());
    }
    if req.headers().contains_key("x-panic") {
        panic!("handler panicked");
    }
    if req.headers().contains_key("x-hang") {
        std::future::pending::<()>().await;
    }
    Ok(Response::new(Full::new(Bytes::new())))
}

#[tokio::test(start_paused = true)]
async fn an_inner_error_releases_the_key() {
    let store = MemoryStore::new();
    let svc = layer(store.clone()).layer(service_fn(misbehaving));
    let err = svc
        .clone()
        .oneshot(with_header(req("a"), "x-fail", "1"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "upstream failed");
    assert_eq!(store.serial_keys_in_use(), 0);
    let mut next = Box::pin(svc.clone().oneshot(req("a")));
    assert!(matches!(poll!(&mut next), std::task::Poll::Ready(Ok(_))));
}

#[tokio::test(start_paused = true)]
async fn a_handler_panic_releases_the_key() {
    let store = MemoryStore::new();
    let svc = layer(store.clone()).layer(service_fn(misbehaving));
    let panicked = tokio::spawn(svc.clone().oneshot(with_header(req("a"), "x-panic", "1")));
    assert!(panicked.await.unwrap_err().is_panic());
    assert_eq!(store.serial_keys_in_use(), 0);
    let mut next = Box::pin(svc.clone().oneshot(req("a")));
    assert!(matches!(poll!(&mut next), std::task::Poll::Ready(Ok(_))));
}

#[tokio::test(start_paused = true)]
async fn a_response_future_dropped_inside_the_handler_releases_the_key() {
    let store = MemoryStore::new();
    let svc = layer(store.clone()).layer(service_fn(misbehaving));
    let mut hanging = Box::pin(svc.clone().oneshot(with_header(req("a"), "x-hang", "1")));
    assert!(poll!(&mut hanging).is_pending());
    let mut next = Box::pin(svc.clone().oneshot(req("a")));
    assert!(
        poll!(&mut next).is_pending(),
        "the hanging request holds the key"
    );
    drop(hanging);
    assert_eq!(next.await.unwrap().status(), StatusCode::OK);
    assert_eq!(store.serial_keys_in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn tokens_rise_across_idle_cleanup_and_spoofed_headers_are_replaced() {
    let store = MemoryStore::new();
    let svc = layer(store.clone()).layer(service_fn(echo_token));
    let mut last = 0;
    for _ in 0..3 {
        let spoofed = with_header(req("a"), "keyward-fencing-token", "999999999");
        let res = svc.clone().oneshot(spoofed).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let token: u64 = std::str::from_utf8(&body).unwrap().parse().unwrap();
        assert!(token > last && token < 999_999_999);
        last = token;
        assert_eq!(store.serial_keys_in_use(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn keyless_requests_pass_uncoordinated_and_bad_keys_are_400() {
    let store = MemoryStore::new();
    let svc = layer(store.clone()).layer(service_fn(echo_token));
    let _holder: Res = svc.clone().oneshot(req("a")).await.unwrap();

    let keyless = Request::get("/")
        .header("keyward-fencing-token", "7")
        .body(Full::default())
        .unwrap();
    let res = svc.clone().oneshot(keyless).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty(), "no token for an uncoordinated request");

    let twice = Request::get("/")
        .header("x-key", "a")
        .header("x-key", "b")
        .body(Full::default())
        .unwrap();
    let res = svc.clone().oneshot(twice).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(problem_type(res).await, types::KEY_INVALID);
}

#[tokio::test]
async fn store_errors_fail_closed_by_default_or_open_when_asked() {
    let closed = layer(DownStore).layer(service_fn(echo_token));
    let res = closed.oneshot(req("a")).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(problem_type(res).await, types::STORE_UNAVAILABLE);

    let mut open = layer(DownStore)
        .on_store_error(OnStoreError::Open)
        .layer(service_fn(echo_token));
    let spoofed = with_header(req("a"), "keyward-fencing-token", "5");
    let res = open.ready().await.unwrap().call(spoofed).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(
        body.is_empty(),
        "uncoordinated: no token, spoofed header removed"
    );
}

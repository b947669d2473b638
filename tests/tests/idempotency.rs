//! IdempotencyLayer: the contract's "must show" list, run on every store backend.
//!
//! Each test body is a generic `async fn` over [`Backend`]; the `suite!` macro at the end
//! instantiates all of them for the memory store (timed tests on paused time), for Redis
//! (a real `redis-server` per test, timed tests in real time with short units) and for a
//! three-node Redis Cluster per test.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use keyward::core::store::{ClaimOutcome, Completion, IdempotencyStore, StoredResponse};
use keyward::core::{Key, Scope, ScopedKey};
use keyward::idempotency::{IdempotencyLayer, OnInFlight};
use keyward_tests::{
    Backend, Memory, Redis, RedisClusterBackend, Seen, TestBody, Upstream, post, seen,
};
use tower::util::BoxCloneSyncService;
use tower::{Service, ServiceBuilder, ServiceExt};

type Svc = BoxCloneSyncService<
    http::Request<TestBody>,
    http::Response<keyward::KeywardBody<TestBody>>,
    std::convert::Infallible,
>;

fn service<St: IdempotencyStore>(layer: IdempotencyLayer<St>, upstream: &Upstream) -> Svc {
    let upstream = upstream.clone();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |req| upstream.clone().handle(req)),
    )
}

async fn send(svc: &Svc, req: http::Request<TestBody>) -> Seen {
    seen(svc.clone().oneshot(req).await.unwrap()).await
}

fn layer<St: IdempotencyStore>(store: &St) -> IdempotencyLayer<St> {
    IdempotencyLayer::new(store.clone()).route("payments")
}

/// Three services on three store instances (three processes sharing one Redis; clones of
/// one memory store), all calling one upstream.
fn three_instances<B: Backend>(
    b: &B,
    layer: impl Fn(B::Store) -> IdempotencyLayer<B::Store>,
    upstream: &Upstream,
) -> Vec<Svc> {
    (0..3)
        .map(|_| service(layer(b.instance()), upstream))
        .collect()
}

/// Sends 50 duplicates spread over `instances`.
fn fifty_duplicates(instances: &[Svc]) -> Vec<tokio::task::JoinHandle<Seen>> {
    (0..50)
        .map(|i| {
            let svc = instances[i % instances.len()].clone();
            tokio::spawn(
                async move { send(&svc, post("/pay", Some("k"), Some("alice"), "10")).await },
            )
        })
        .collect()
}

async fn fifty_concurrent_duplicates_with_reject_run_once<B: Backend>(b: B) {
    let upstream = Upstream::held(StatusCode::CREATED);
    let instances = three_instances(&b, |store| layer(&store), &upstream);
    let tasks = fifty_duplicates(&instances);
    upstream.entered(1).await;
    // Every duplicate is answered while the first is still held in the handler; then the
    // first is let through.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tasks.iter().filter(|t| t.is_finished()).count() < 49 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "duplicates not answered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    upstream.open();
    let mut created = 0;
    let mut conflicts = 0;
    for task in tasks {
        let res = task.await.unwrap();
        match res.status {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => {
                assert_eq!(res.retry_after.as_deref(), Some("1"));
                conflicts += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(upstream.calls(), 1);
    assert_eq!(created, 1);
    assert_eq!(conflicts, 49);
    for svc in &instances {
        let replay = send(svc, post("/pay", Some("k"), Some("alice"), "10")).await;
        assert!(replay.replayed);
    }
    assert_eq!(upstream.calls(), 1);
}

async fn fifty_concurrent_duplicates_with_wait_all_get_the_same_response<B: Backend>(b: B) {
    let upstream = Upstream::held(StatusCode::CREATED);
    let wait = Duration::from_secs(10);
    let instances = three_instances(
        &b,
        |store| layer(&store).on_in_flight(OnInFlight::Wait(wait)),
        &upstream,
    );
    let started = tokio::time::Instant::now();
    let tasks = fifty_duplicates(&instances);
    upstream.entered(1).await;
    upstream.open();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    assert_eq!(upstream.calls(), 1);
    assert!(results.iter().all(|r| r.status == StatusCode::CREATED));
    assert!(results.iter().all(|r| r.body == results[0].body));
    assert_eq!(results.iter().filter(|r| r.replayed).count(), 49);
    // Woken when the first completed, not by the lease (30 s) or the wait bound.
    assert!(started.elapsed() < wait / 2);
}

async fn wait_is_bounded_then_409<B: Backend>(b: B) {
    let upstream = Upstream::held(StatusCode::CREATED);
    let wait = b.unit() * 2;
    let layer = layer(&b.store()).on_in_flight(OnInFlight::Wait(wait));
    let svc = service(layer, &upstream);
    let first = {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, post("/pay", Some("k"), None, "1")).await })
    };
    upstream.entered(1).await;
    let started = tokio::time::Instant::now();
    let second = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    let waited = started.elapsed();
    assert!(
        waited >= wait && waited <= wait + b.slack(),
        "waited {waited:?} for a wait of {wait:?}"
    );
    upstream.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}

async fn different_body_is_422_and_different_principal_executes_separately<B: Backend>(b: B) {
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&b.store()), &upstream);
    let first = send(&svc, post("/pay", Some("k"), Some("alice"), "10")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other_body = send(&svc, post("/pay", Some("k"), Some("alice"), "99")).await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(other_body.body.contains("idempotency-key-reused"));
    let other_path = send(&svc, post("/refund", Some("k"), Some("alice"), "10")).await;
    assert_eq!(other_path.status, StatusCode::UNPROCESSABLE_ENTITY);
    let bob = send(&svc, post("/pay", Some("k"), Some("bob"), "10")).await;
    assert_eq!(bob.status, StatusCode::CREATED);
    assert!(!bob.replayed, "bob must not see alice's response");
    assert_ne!(bob.body, first.body);
    assert_eq!(upstream.calls(), 2);
}

async fn missing_invalid_and_overlong_keys_are_400<B: Backend>(b: B) {
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&b.store()).required(true), &upstream);
    let missing = send(&svc, post("/pay", None, None, "1")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(missing.body.contains("idempotency-key-missing"));
    let long = "k".repeat(256);
    for bad in ["", "a b", "\"unterminated", "a,b", long.as_str()] {
        let res = send(&svc, post("/pay", Some(bad), None, "1")).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert!(res.body.contains("idempotency-key-invalid"), "{bad:?}");
        assert!(
            !res.body.contains(bad) || bad.is_empty(),
            "raw key echoed: {bad:?}"
        );
    }
    let sf = send(&svc, post("/pay", Some("\"abc\""), None, "1")).await;
    assert_eq!(sf.status, StatusCode::CREATED);
    let token = send(&svc, post("/pay", Some("abc"), None, "1")).await;
    assert!(
        token.replayed,
        "sf-string \"abc\" and token abc are the same key"
    );
    assert_eq!(upstream.calls(), 1);
}

async fn missing_key_passes_through_when_not_required<B: Backend>(b: B) {
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&b.store()), &upstream);
    send(&svc, post("/pay", None, None, "1")).await;
    send(&svc, post("/pay", None, None, "1")).await;
    assert_eq!(upstream.calls(), 2);
}

async fn oversized_body_is_413_and_nothing_is_claimed<B: Backend>(b: B) {
    let upstream = Upstream::new(StatusCode::CREATED);
    let store = b.store();
    let svc = service(layer(&store).max_body(1024 * 1024), &upstream);
    let big = "x".repeat(2 * 1024 * 1024);
    let res = send(&svc, post("/pay", Some("k"), None, &big)).await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(upstream.calls(), 0);
    // Nothing claimed: the same key with a normal body executes.
    let ok = send(&svc, post("/pay", Some("k"), None, "small")).await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert!(!ok.replayed);
}

async fn server_error_releases_the_key<B: Backend>(b: B) {
    let failing = Upstream::new(StatusCode::INTERNAL_SERVER_ERROR);
    let store = b.store();
    let svc = service(layer(&store), &failing);
    assert_eq!(
        send(&svc, post("/pay", Some("k"), None, "1")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(
        send(&svc, post("/pay", Some("k"), None, "1")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(failing.calls(), 2, "the retry executes again");
    let healthy = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&store), &healthy);
    assert_eq!(
        send(&svc, post("/pay", Some("k"), None, "1")).await.status,
        StatusCode::CREATED
    );
    assert!(
        send(&svc, post("/pay", Some("k"), None, "1"))
            .await
            .replayed
    );
}

async fn handler_panic_releases_the_key<B: Backend>(b: B) {
    let store = b.store();
    let panicking = ServiceBuilder::new().layer(layer(&store)).service_fn(
        |_req: http::Request<TestBody>| async move {
            if true {
                panic!("handler bug");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(TestBody::default()))
        },
    );
    let result = tokio::spawn(panicking.oneshot(post("/pay", Some("k"), None, "1"))).await;
    assert!(result.unwrap_err().is_panic());
    // The release runs detached (on Redis: a spawned round trip), so the retry may see the
    // key still held for a moment: it waits for the release, woken by the store.
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(
        layer(&store).on_in_flight(OnInFlight::Wait(Duration::from_secs(5))),
        &upstream,
    );
    let retry = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(upstream.calls(), 1);
}

async fn dropped_client_future_releases_the_key<B: Backend>(b: B) {
    let store = b.store();
    let stuck = Upstream::held(StatusCode::CREATED);
    let svc = service(layer(&store), &stuck);
    let task = {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, post("/pay", Some("k"), None, "1")).await })
    };
    stuck.entered(1).await;
    assert_eq!(
        send(&svc, post("/pay", Some("k"), None, "1")).await.status,
        StatusCode::CONFLICT
    );
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(
        layer(&store).on_in_flight(OnInFlight::Wait(Duration::from_secs(5))),
        &upstream,
    );
    assert_eq!(
        send(&svc, post("/pay", Some("k"), None, "1")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(upstream.calls(), 1);
}

async fn completed_responses_expire_after_ttl<B: Backend>(b: B) {
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&b.store()).ttl(b.unit() * 10), &upstream);
    send(&svc, post("/pay", Some("k"), None, "1")).await;
    tokio::time::sleep(b.unit() * 9).await;
    assert!(
        send(&svc, post("/pay", Some("k"), None, "1"))
            .await
            .replayed
    );
    tokio::time::sleep(b.unit() + b.slack()).await;
    let after = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert!(!after.replayed);
    assert_eq!(upstream.calls(), 2);
}

async fn a_dead_holders_lease_expires_and_its_late_completion_is_fenced<B: Backend>(b: B) {
    let store = b.store();
    let lease = b.unit() * 5;
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&store).lease(lease), &upstream);
    // Another process claimed the key (for some request) and died without releasing.
    let key = ScopedKey::new("idem", "payments", Scope::Anonymous, Key::from("k"));
    let ClaimOutcome::Claimed(dead) = store
        .claim(&key, &keyward::core::store::Fingerprint([0; 32]), lease)
        .await
        .unwrap()
    else {
        panic!("released key must be claimable");
    };
    // While the dead claim's lease lives, the key is taken (by another request: 422).
    assert_eq!(
        send(&svc, post("/pay", Some("k"), None, "1")).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    tokio::time::sleep(lease + Duration::from_millis(1) + b.slack()).await;
    let fresh = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(
        fresh.status,
        StatusCode::CREATED,
        "expired lease is taken over"
    );
    let token = fencing_token(&fresh);
    assert!(
        token > dead.get(),
        "the successor's fencing token is higher"
    );
    let late = StoredResponse {
        status: StatusCode::OK,
        headers: Default::default(),
        body: "stale".into(),
        trailers: None,
    };
    let outcome = store
        .complete(
            &key,
            dead,
            &keyward::core::store::Fingerprint([0; 32]),
            late,
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Completion::Fenced);
    assert_eq!(
        send(&svc, post("/pay", Some("k"), None, "1")).await.body,
        fresh.body
    );
}

async fn a_live_slow_handler_keeps_its_lease<B: Backend>(b: B) {
    let store = b.store();
    let lease = b.unit() * 3;
    let handler_time = b.unit() * 10;
    let slow = ServiceBuilder::new()
        .layer(layer(&store).lease(lease))
        .service_fn(move |_req: http::Request<TestBody>| async move {
            tokio::time::sleep(handler_time).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(TestBody::from("done")))
        });
    let first = tokio::spawn(slow.oneshot(post("/pay", Some("k"), None, "1")));
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&store).lease(lease), &upstream);
    for _ in 0..3 {
        tokio::time::sleep(lease).await;
        assert_eq!(
            send(&svc, post("/pay", Some("k"), None, "1")).await.status,
            StatusCode::CONFLICT
        );
    }
    let first = seen(first.await.unwrap().unwrap()).await;
    assert_eq!(first.body, "done");
    assert_eq!(
        send(&svc, post("/pay", Some("k"), None, "1")).await.body,
        "done"
    );
    assert_eq!(upstream.calls(), 0);
}

async fn replay_never_contains_set_cookie_or_date<B: Backend>(b: B) {
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&b.store()), &upstream);
    let mut first = svc
        .clone()
        .oneshot(post("/pay", Some("k"), None, "1"))
        .await
        .unwrap();
    assert!(first.headers().contains_key("set-cookie"));
    assert!(first.headers().contains_key("date"));
    let _ = first.headers_mut();
    let replay = svc
        .clone()
        .oneshot(post("/pay", Some("k"), None, "1"))
        .await
        .unwrap();
    assert!(!replay.headers().contains_key("set-cookie"));
    assert!(!replay.headers().contains_key("date"));
    assert_eq!(replay.headers()["x-call"], "1");
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
}

async fn oversized_responses_pass_through_and_release<B: Backend>(b: B) {
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&b.store()).max_response(8), &upstream);
    let first = send(
        &svc,
        post("/pay", Some("k"), None, "a body longer than eight bytes"),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(
        first.body.contains("call=1"),
        "passed through whole: {}",
        first.body
    );
    let second = send(
        &svc,
        post("/pay", Some("k"), None, "a body longer than eight bytes"),
    )
    .await;
    assert!(!second.replayed);
    assert_eq!(upstream.calls(), 2);
}

async fn fencing_token_reaches_the_handler<B: Backend>(b: B) {
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&b.store()), &upstream);
    let a = send(&svc, post("/pay", Some("a"), None, "1")).await;
    let b = send(&svc, post("/pay", Some("b"), None, "1")).await;
    assert!(fencing_token(&a) > 0);
    assert!(fencing_token(&b) > fencing_token(&a));
}

async fn works_as_an_axum_layer<B: Backend>(b: B) {
    use axum::routing::post as axum_post;
    let app = axum::Router::new()
        .route(
            "/payments",
            axum_post(|body: String| async move { (StatusCode::CREATED, format!("paid {body}")) }),
        )
        .layer(
            IdempotencyLayer::new(b.store())
                .route("payments")
                .required(true),
        );
    let req = || {
        http::Request::post("/payments")
            .header("idempotency-key", "abc")
            .body(axum::body::Body::from("5"))
            .unwrap()
    };
    let mut app = app.into_service();
    let first = seen(app.ready().await.unwrap().call(req()).await.unwrap()).await;
    let second = seen(app.ready().await.unwrap().call(req()).await.unwrap()).await;
    assert_eq!(first.body, "paid 5");
    assert!(second.replayed);
    assert_eq!(second.body, "paid 5");
}

async fn a_late_completion_that_nobody_overtook_is_stored<B: Backend>(b: B) {
    let store = b.store();
    let lease = b.unit() * 2;
    let key = ScopedKey::new("idem", "payments", Scope::Anonymous, Key::from("late"));
    let fingerprint = keyward::core::store::Fingerprint([1; 32]);
    let ClaimOutcome::Claimed(token) = store.claim(&key, &fingerprint, lease).await.unwrap() else {
        panic!("fresh key must be claimable");
    };
    // The holder stalls past its lease (renewals failing), but nobody claims meanwhile:
    // there is no successor to protect, so its response is kept.
    tokio::time::sleep(lease + Duration::from_millis(1) + b.slack()).await;
    let late = StoredResponse {
        status: StatusCode::OK,
        headers: Default::default(),
        body: "late".into(),
        trailers: None,
    };
    let outcome = store
        .complete(&key, token, &fingerprint, late, b.unit() * 10)
        .await
        .unwrap();
    assert_eq!(outcome, Completion::Stored);
    assert!(matches!(
        store.claim(&key, &fingerprint, lease).await.unwrap(),
        ClaimOutcome::Completed(res) if res.body == "late"
    ));
}

/// A gRPC-shaped response: `application/grpc`, a message, then `grpc-status` in the
/// trailers (with a custom trailer that must survive storage too).
type GrpcBody = http_body_util::StreamBody<
    futures::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<bytes::Bytes>, Infallible>>>,
>;
type GrpcSvc = BoxCloneSyncService<
    http::Request<TestBody>,
    http::Response<keyward::KeywardBody<GrpcBody>>,
    Infallible,
>;

/// A gRPC handler answering with the `grpc-status` the request names in `x-code`; counts
/// its calls.
fn grpc_service<St: IdempotencyStore>(
    layer: IdempotencyLayer<St>,
    calls: Arc<AtomicUsize>,
) -> GrpcSvc {
    BoxCloneSyncService::new(ServiceBuilder::new().layer(layer).service_fn(
        move |req: http::Request<TestBody>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let code = req.headers()["x-code"].clone();
            async move {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", code);
                trailers.insert("x-call", n.into());
                trailers.insert("set-cookie", "session=s3cret".parse().unwrap());
                let frames = vec![
                    Ok(http_body::Frame::data(bytes::Bytes::from(format!(
                        "msg {n}"
                    )))),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
                Ok(http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(body)
                    .unwrap())
            }
        },
    ))
}

fn grpc_call(key: Option<&str>, code: &str, body: &str) -> http::Request<TestBody> {
    let mut req = post("/orders.v1.Orders/CreateOrder", key, None, body);
    let headers = req.headers_mut();
    headers.insert("content-type", "application/grpc".parse().unwrap());
    headers.insert("x-code", code.parse().unwrap());
    req
}

/// Body, trailers and whether it was replayed.
async fn grpc_send(svc: &GrpcSvc, req: http::Request<TestBody>) -> (String, http::HeaderMap, bool) {
    use http_body_util::BodyExt;
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "gRPC answers HTTP 200");
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let collected = res.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    (body, trailers, replayed)
}

async fn grpc_trailers_are_stored_and_replayed<B: Backend>(b: B) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = grpc_service(layer(&b.store()), calls.clone());
    let first = grpc_send(&svc, grpc_call(Some("k"), "0", "order")).await;
    assert_eq!(first.0, "msg 1");
    assert_eq!(first.1["grpc-status"], "0");
    assert!(!first.2);
    assert_eq!(first.1["set-cookie"], "session=s3cret");
    let replay = grpc_send(&svc, grpc_call(Some("k"), "0", "order")).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(replay.0, first.0);
    assert_eq!(replay.1["grpc-status"], "0");
    assert_eq!(replay.1["x-call"], "1");
    assert!(
        replay.1.get("set-cookie").is_none(),
        "never-stored headers are not stored from trailers either"
    );
    assert!(replay.2, "replays carry idempotent-replayed");
}

async fn grpc_transient_status_releases_and_deterministic_error_is_stored<B: Backend>(b: B) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = grpc_service(layer(&b.store()), calls.clone());
    // UNAVAILABLE: the key is released, the retry executes again.
    for expected in 1..=2 {
        let (_, trailers, replayed) = grpc_send(&svc, grpc_call(Some("a"), "14", "x")).await;
        assert_eq!(trailers["grpc-status"], "14");
        assert!(!replayed);
        assert_eq!(calls.load(Ordering::SeqCst), expected);
    }
    // INVALID_ARGUMENT is the handler's deterministic answer: stored and replayed.
    let first = grpc_send(&svc, grpc_call(Some("b"), "3", "x")).await;
    let replay = grpc_send(&svc, grpc_call(Some("b"), "3", "x")).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(replay.1["grpc-status"], "3");
    assert_eq!(replay.0, first.0);
    assert!(replay.2);
}

async fn grpc_rejections_are_grpc_statuses<B: Backend>(b: B) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = grpc_service(layer(&b.store()).required(true), calls.clone());
    let status_of = |res: &http::Response<_>| {
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        res.headers()["grpc-status"].to_str().unwrap().to_owned()
    };
    let missing = svc
        .clone()
        .oneshot(grpc_call(None, "0", "x"))
        .await
        .unwrap();
    assert_eq!(status_of(&missing), "3", "INVALID_ARGUMENT");
    grpc_send(&svc, grpc_call(Some("k"), "0", "x")).await;
    let reused = svc
        .clone()
        .oneshot(grpc_call(Some("k"), "0", "y"))
        .await
        .unwrap();
    assert_eq!(status_of(&reused), "9", "FAILED_PRECONDITION");
    let message = reused.headers()["grpc-message"].to_str().unwrap();
    assert!(message.contains("different request"), "{message}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

async fn inspect_reports_absent_in_flight_and_completed<B: Backend>(b: B) {
    use keyward::core::store::RecordState;
    let upstream = Upstream::held(StatusCode::CREATED);
    let layer = layer(&b.store());
    let svc = service(layer.clone(), &upstream);
    let lookup = |key: Option<&str>, principal| post("/", key, Some(principal), "");
    let state = |found: Option<(ScopedKey, RecordState)>| found.unwrap().1;

    let before = layer.inspect(&lookup(Some("k"), "alice")).await.unwrap();
    assert_eq!(state(before), RecordState::Absent);
    let first = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, post("/pay", Some("k"), Some("alice"), "10")).await }
    });
    upstream.entered(1).await;
    let RecordState::InFlight {
        lease_left,
        fingerprint: held_fingerprint,
        ..
    } = state(layer.inspect(&lookup(Some("k"), "alice")).await.unwrap())
    else {
        panic!("the running request holds the key")
    };
    assert!(lease_left > Duration::ZERO && lease_left <= Duration::from_secs(30));
    upstream.open();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let RecordState::Completed {
        status,
        fingerprint,
        expires_in,
    } = state(
        layer
            .inspect(&lookup(Some("\"k\""), "alice"))
            .await
            .unwrap(),
    )
    else {
        panic!("the response is stored")
    };
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(fingerprint, held_fingerprint);
    assert!(
        expires_in > Duration::from_secs(23 * 3600) && expires_in <= Duration::from_secs(24 * 3600)
    );
    // Scoped by principal, like the layer: Bob's look-up of Alice's key finds nothing.
    let bob = layer.inspect(&lookup(Some("k"), "bob")).await.unwrap();
    assert_eq!(state(bob), RecordState::Absent);
    assert!(
        layer
            .inspect(&lookup(None, "alice"))
            .await
            .unwrap()
            .is_none()
    );
    let invalid = layer
        .inspect(&lookup(Some("a b"), "alice"))
        .await
        .unwrap_err();
    assert!(!invalid.to_string().contains("a b"), "{invalid}");
    assert_eq!(upstream.calls(), 1);
}

async fn forget_frees_a_stuck_claim_fenced_and_deletes_a_record<B: Backend>(b: B) {
    use keyward::core::store::RecordState;
    let upstream = Upstream::held(StatusCode::CREATED);
    let layer = layer(&b.store());
    let svc = service(layer.clone(), &upstream);
    let pay = || post("/pay", Some("k"), Some("alice"), "10");
    let lookup = |principal| post("/", Some("k"), Some(principal), "");
    let stuck = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, pay()).await }
    });
    upstream.entered(1).await;
    // Scoped like the layer: Bob's forget of Alice's key touches nothing.
    let (_, bobs) = layer.forget(&lookup("bob")).await.unwrap().unwrap();
    assert_eq!(bobs, RecordState::Absent);
    let (_, was) = layer.forget(&lookup("alice")).await.unwrap().unwrap();
    let RecordState::InFlight {
        holder: stuck_token,
        ..
    } = was
    else {
        panic!("the stuck request held the key: {was:?}")
    };
    // The retry executes again, while the stuck holder still runs.
    let retry = tokio::spawn({
        let svc = svc.clone();
        async move { send(&svc, pay()).await }
    });
    upstream.entered(1).await;
    upstream.open();
    let (stuck, retry) = (stuck.await.unwrap(), retry.await.unwrap());
    assert_eq!(
        (stuck.status, retry.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert!(fencing_token(&retry) > stuck_token.get());
    assert!(stuck.body.contains("call=1") && retry.body.contains("call=2"));
    // The stuck holder came back and could not complete: the retry's response is stored.
    let replay = send(&svc, pay()).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, retry.body);
    // A completed record is deleted: the next retry runs again.
    let (_, was) = layer.forget(&lookup("alice")).await.unwrap().unwrap();
    assert!(
        matches!(
            was,
            RecordState::Completed {
                status: StatusCode::CREATED,
                ..
            }
        ),
        "{was:?}"
    );
    let again = send(&svc, pay()).await;
    assert!(
        !again.replayed && again.body.contains("call=3"),
        "{}",
        again.body
    );
    assert_eq!(upstream.calls(), 3);
    let (_, nothing) = layer.forget(&lookup("carol")).await.unwrap().unwrap();
    assert_eq!(nothing, RecordState::Absent);
}

/// Instantiates every test above for one backend. `paused` applies to the timed tests.
macro_rules! suite {
    ($name:ident, $backend:expr, paused = $paused:tt) => {
        mod $name {
            use super::*;

            suite!(@tests $backend, start_paused = false;
                fifty_concurrent_duplicates_with_reject_run_once,
                fifty_concurrent_duplicates_with_wait_all_get_the_same_response,
                different_body_is_422_and_different_principal_executes_separately,
                missing_invalid_and_overlong_keys_are_400,
                missing_key_passes_through_when_not_required,
                oversized_body_is_413_and_nothing_is_claimed,
                server_error_releases_the_key,
                handler_panic_releases_the_key,
                dropped_client_future_releases_the_key,
                replay_never_contains_set_cookie_or_date,
                oversized_responses_pass_through_and_release,
                fencing_token_reaches_the_handler,
                works_as_an_axum_layer,
                grpc_trailers_are_stored_and_replayed,
                grpc_transient_status_releases_and_deterministic_error_is_stored,
                grpc_rejections_are_grpc_statuses,
                inspect_reports_absent_in_flight_and_completed,
                forget_frees_a_stuck_claim_fenced_and_deletes_a_record,
            );
            suite!(@tests $backend, start_paused = $paused;
                wait_is_bounded_then_409,
                completed_responses_expire_after_ttl,
                a_dead_holders_lease_expires_and_its_late_completion_is_fenced,
                a_live_slow_handler_keeps_its_lease,
                a_late_completion_that_nobody_overtook_is_stored,
            );
        }
    };
    (@tests $backend:expr, start_paused = $paused:tt; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = $paused)]
            async fn $test() {
                super::$test($backend).await
            }
        )*
    };
}

suite!(memory, Memory::default(), paused = true);
suite!(redis, Redis::start(), paused = false);
suite!(redis_cluster, RedisClusterBackend::start(), paused = false);

/// The fencing token the test upstream saw, from its `token=N` body field.
fn fencing_token(seen: &Seen) -> u64 {
    let field = seen.body.split("token=").nth(1).unwrap();
    field.split(' ').next().unwrap().parse().unwrap()
}

/// A store whose next `fail` completions fail, like a Redis that is restarting.
#[derive(Clone)]
struct FlakyCompletion {
    inner: keyward::MemoryStore,
    fail: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FlakyCompletion {
    /// A memory store whose next `n` completions fail, and the counter of those left.
    fn failing(n: usize) -> (Self, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(n));
        let store = FlakyCompletion {
            inner: keyward::MemoryStore::new(),
            fail: fail.clone(),
        };
        (store, fail)
    }
}

impl IdempotencyStore for FlakyCompletion {
    async fn claim(
        &self,
        key: &ScopedKey,
        fingerprint: &keyward::core::store::Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, keyward::core::store::StoreError> {
        self.inner.claim(key, fingerprint, lease).await
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        token: keyward::core::FencingToken,
        fingerprint: &keyward::core::store::Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<Completion, keyward::core::store::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .fail
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(keyward::core::store::StoreError::Unavailable(
                "restarting".into(),
            ));
        }
        self.inner
            .complete(key, token, fingerprint, response, ttl)
            .await
    }

    async fn release(
        &self,
        key: &ScopedKey,
        token: keyward::core::FencingToken,
    ) -> Result<(), keyward::core::store::StoreError> {
        self.inner.release(key, token).await
    }

    fn release_detached(&self, key: ScopedKey, token: keyward::core::FencingToken) {
        self.inner.release_detached(key, token);
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: keyward::core::FencingToken,
        lease: Duration,
    ) -> Result<bool, keyward::core::store::StoreError> {
        self.inner.renew(key, token, lease).await
    }

    async fn wait_settled(
        &self,
        key: &ScopedKey,
        holder: keyward::core::FencingToken,
        max: Duration,
    ) -> Result<(), keyward::core::store::StoreError> {
        self.inner.wait_settled(key, holder, max).await
    }
}

/// Found by the chaos group (crates/keyward-sidecar/tests/chaos): a Redis restart while a
/// response was being stored used to release the key at once, so the client got its 2xx
/// and the next retry of the key ran the request a second time. A short store outage at
/// completion is now retried (for up to the lease) and the record lands.
#[tokio::test(start_paused = true)]
async fn a_store_error_while_completing_is_retried_and_the_record_lands() {
    let (store, fail) = FlakyCompletion::failing(3);
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&store).lease(Duration::from_secs(2)), &upstream);
    let first = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(fail.load(std::sync::atomic::Ordering::SeqCst), 0);
    let retry = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert!(retry.replayed, "the record was stored after the outage");
    assert_eq!(upstream.calls(), 1, "the retry did not run again");
}

/// ...but not forever: an outage longer than `record_retry` releases the key (the answer
/// still reaches the client; a retry then runs again, as documented).
#[tokio::test(start_paused = true)]
async fn a_store_outage_longer_than_the_lease_releases_the_key() {
    let (store, _) = FlakyCompletion::failing(1_000);
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(
        layer(&store)
            .lease(Duration::from_secs(2))
            .record_retry(Duration::from_secs(2)),
        &upstream,
    );
    let started = tokio::time::Instant::now();
    let first = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1_500) && waited <= Duration::from_secs(2),
        "gave up after {waited:?}"
    );
    store.fail.store(0, std::sync::atomic::Ordering::SeqCst);
    let retry = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(!retry.replayed);
    assert_eq!(upstream.calls(), 2);
}

/// Once the handler has answered, the answer is stored even if the client leaves while
/// the response body is still being read (hyper drops the request future): the retry
/// replays it, and the handler ran once.
#[tokio::test(start_paused = true)]
async fn a_client_gone_while_the_response_is_read_does_not_release_the_key() {
    use futures::Stream;
    use http_body::Frame;
    use std::pin::Pin;

    type Chunks = Pin<Box<dyn Stream<Item = Result<Frame<bytes::Bytes>, Infallible>> + Send>>;
    let calls = Arc::new(AtomicUsize::new(0));
    let body_gate = Arc::new(tokio::sync::Notify::new());
    let store = keyward::MemoryStore::new();
    let svc = ServiceBuilder::new().layer(layer(&store)).service_fn({
        let (calls, body_gate) = (calls.clone(), body_gate.clone());
        move |_req: http::Request<TestBody>| {
            let (calls, body_gate) = (calls.clone(), body_gate.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let chunks: Chunks = Box::pin(futures::stream::once(async move {
                    body_gate.notified().await;
                    Ok(Frame::data(bytes::Bytes::from_static(b"paid")))
                }));
                let body = http_body_util::StreamBody::new(chunks);
                Ok::<_, Infallible>(http::Response::builder().status(201).body(body).unwrap())
            }
        }
    });
    let mut first = Box::pin(svc.clone().oneshot(post("/pay", Some("k"), None, "1")));
    for _ in 0..100 {
        assert!(futures::poll!(first.as_mut()).is_pending());
        if calls.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler answered");
    // The client goes away while the layer reads the body, which then arrives.
    drop(first);
    body_gate.notify_one();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retry = svc
        .clone()
        .oneshot(post("/pay", Some("k"), None, "1"))
        .await;
    let retry = seen(retry.unwrap()).await;
    assert!(
        retry.replayed,
        "the answer was stored although its client left"
    );
    assert_eq!(retry.body, "paid");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the retry did not run again"
    );
}

/// The same while the store is failing to take the record: the completion retries go on
/// after the client left, and the record lands.
#[tokio::test(start_paused = true)]
async fn a_client_gone_during_completion_retries_does_not_release_the_key() {
    let (store, fail) = FlakyCompletion::failing(3);
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&store).lease(Duration::from_secs(2)), &upstream);
    let mut first = Box::pin(send(&svc, post("/pay", Some("k"), None, "1")));
    for _ in 0..100 {
        assert!(futures::poll!(first.as_mut()).is_pending());
        if fail.load(Ordering::SeqCst) < 3 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(fail.load(Ordering::SeqCst) < 3, "a completion failed");
    drop(first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fail.load(Ordering::SeqCst), 0, "the retries went on");
    let retry = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert!(retry.replayed, "the record landed after the client left");
    assert_eq!(upstream.calls(), 1);
}

/// Issue 18: a failover can refuse writes for longer than a short lease. While the record
/// is retried (`record_retry`), the claim is renewed: a duplicate gets 409 instead of
/// running the request a second time, and replays once the record lands.
#[tokio::test(start_paused = true)]
async fn while_the_record_is_retried_past_the_lease_the_claim_is_kept() {
    let (store, fail) = FlakyCompletion::failing(usize::MAX);
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(
        layer(&store)
            .lease(Duration::from_millis(300))
            .record_retry(Duration::from_secs(3)),
        &upstream,
    );
    let first = {
        let svc = svc.clone();
        tokio::spawn(async move { send(&svc, post("/pay", Some("k"), None, "1")).await })
    };
    // Three leases later, the first request still tries to store its record.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let duplicate = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT, "{}", duplicate.body);
    assert_eq!(upstream.calls(), 1, "the duplicate did not run");

    fail.store(0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let retry = send(&svc, post("/pay", Some("k"), None, "1")).await;
    assert!(retry.replayed, "the record landed after the outage");
    assert_eq!(upstream.calls(), 1);
}

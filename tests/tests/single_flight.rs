//! Black-box tests of `SingleFlightLayer` on the memory store.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use keyward::{LeaderFailure, MemoryStore, SingleFlightLayer};
use keyward_core::problem::types;
use keyward_core::store::{FlightRole, Landing, OnStoreError, SingleFlightStore, StoreError};
use keyward_core::{FencingToken, Key, KeySpec, KeywardBody, Scope, ScopedKey};
use keyward_tests::spawn_joined;
use tokio::sync::{Barrier, Notify};
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt, service_fn};

type Body = BoxBody<Bytes, Infallible>;
type Upstreamed = BoxCloneService<Request<()>, Response<Body>, &'static str>;

fn full(bytes: &'static str) -> Body {
    Full::new(Bytes::from(bytes)).boxed()
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

async fn body_of(response: Response<KeywardBody<Body>>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

fn coalesced(response: &Response<KeywardBody<Body>>) -> bool {
    response
        .headers()
        .get("keyward-coalesced")
        .is_some_and(|v| v == "true")
}

async fn problem_type(response: Response<KeywardBody<Body>>) -> String {
    let json: serde_json::Value = serde_json::from_slice(&body_of(response).await).unwrap();
    json["type"].as_str().unwrap().to_owned()
}

/// Counts every time the drop guard inside a handler future is dropped before it
/// finished: the inner call was cancelled.
struct CancelGuard {
    cancelled: Arc<AtomicBool>,
    finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.cancelled.store(true, Ordering::SeqCst);
        }
    }
}

/// An upstream whose calls wait for `release` and whose n-th call (1-based) behaves as
/// `script(n)` says.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    release: Arc<Notify>,
    cancelled: Arc<AtomicBool>,
}

impl Upstream {
    fn new() -> Self {
        Upstream {
            calls: Arc::new(AtomicUsize::new(0)),
            release: Arc::new(Notify::new()),
            cancelled: Arc::new(AtomicBool::new(false)),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Every call waits for one `release.notify_one()` and then answers `respond(n)`
    /// for the n-th call (1-based).
    fn gated<F>(&self, respond: F) -> Upstreamed
    where
        F: Fn(usize) -> Result<Response<Body>, &'static str> + Clone + Send + Sync + 'static,
    {
        let upstream = self.clone();
        BoxCloneService::new(service_fn(move |_req: Request<()>| {
            let upstream = upstream.clone();
            let respond = respond.clone();
            async move {
                let n = upstream.calls.fetch_add(1, Ordering::SeqCst) + 1;
                let mut guard = CancelGuard {
                    cancelled: upstream.cancelled.clone(),
                    finished: false,
                };
                upstream.release.notified().await;
                guard.finished = true;
                respond(n)
            }
        }))
    }
}

fn ok(body: &'static str) -> Result<Response<Body>, &'static str> {
    Ok(Response::new(full(body)))
}

fn no_leftover_lead(store: &MemoryStore, route: &str, uri_key: &str) -> impl Future<Output = bool> {
    let store = store.clone();
    // The key as the layer spells it for a request without `Host`, `Accept`,
    // `Accept-Encoding` or `Range`: each part length-prefixed, each vary header counted.
    let spelled = format!("{}:{uri_key}0:0;0;0;", uri_key.len());
    let key = ScopedKey::new("flight", route, Scope::Anonymous, Key::from(spelled));
    async move {
        let role = store.lead(&key, Duration::from_secs(1)).await.unwrap();
        let free = matches!(role, FlightRole::Leader(_));
        if let FlightRole::Leader(token) = role {
            store.publish(&key, token, Landing::Failed).await.unwrap();
        }
        free
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_identical_gets_make_one_inner_call() {
    const N: usize = 1000;
    let upstream = Upstream::new();
    let store = MemoryStore::new();
    let svc = SingleFlightLayer::new(store.clone())
        .route("catalog")
        .layer(upstream.gated(|_| {
            let mut res = Response::new(full("the catalog"));
            res.headers_mut().insert("x-upstream", "1".parse().unwrap());
            Ok(res)
        }));

    let mut handles = Vec::with_capacity(N);
    for _ in 0..N {
        handles.push(spawn_joined(svc.clone().oneshot(get("/catalog?b=2&a=1"))).await);
    }
    assert_eq!(upstream.calls(), 1, "followers must not reach the upstream");
    assert_eq!(svc.flights_in_progress(), 1);
    upstream.release.notify_one();

    let mut followers = 0;
    for handle in handles {
        let response = handle.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-upstream"], "1");
        followers += usize::from(coalesced(&response));
        assert_eq!(body_of(response).await, "the catalog");
    }
    assert_eq!(followers, N - 1);
    assert_eq!(upstream.calls(), 1);
    assert_eq!(svc.flights_in_progress(), 0);
    assert!(no_leftover_lead(&store, "catalog", "GET /catalog?a=1&b=2").await);
    assert!(!upstream.cancelled.load(Ordering::SeqCst));
}

#[tokio::test]
async fn leader_dropped_the_inner_call_continues_for_followers() {
    let upstream = Upstream::new();
    let svc = SingleFlightLayer::new(MemoryStore::new()).layer(upstream.gated(|_| ok("fresh")));

    let leader = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    let follower = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    assert!(
        !upstream.cancelled.load(Ordering::SeqCst),
        "a follower still waits: the inner call must go on"
    );

    upstream.release.notify_one();
    let response = follower.await.unwrap().unwrap();
    assert!(coalesced(&response));
    assert_eq!(body_of(response).await, "fresh");
    assert_eq!(upstream.calls(), 1);
    assert!(!upstream.cancelled.load(Ordering::SeqCst));
    assert_eq!(svc.flights_in_progress(), 0);
}

#[tokio::test]
async fn last_waiter_leaving_cancels_the_inner_call() {
    let upstream = Upstream::new();
    let store = MemoryStore::new();
    let svc = SingleFlightLayer::new(store.clone()).layer(upstream.gated(|_| ok("never")));

    let leader = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    let follower_a = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    let follower_b = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    for (i, request) in [leader, follower_a].into_iter().enumerate() {
        request.abort();
        let _ = request.await;
        assert!(
            !upstream.cancelled.load(Ordering::SeqCst),
            "cancelled while waiter {i} was gone but others remained"
        );
    }
    follower_b.abort();
    let _ = follower_b.await;
    assert!(upstream.cancelled.load(Ordering::SeqCst));
    assert_eq!(upstream.calls(), 1);
    assert_eq!(svc.flights_in_progress(), 0);
    // The cancelled flight abandoned its lead in the store.
    assert!(no_leftover_lead(&store, "default", "GET /x").await);

    // The next request starts afresh.
    let next = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    upstream.release.notify_one();
    let response = next.await.unwrap().unwrap();
    assert!(!coalesced(&response));
    assert_eq!(upstream.calls(), 2);
}

fn failing_first(n: usize) -> Result<Response<Body>, &'static str> {
    if n == 1 {
        Err("upstream broke")
    } else {
        ok("second try")
    }
}

#[tokio::test]
async fn leader_error_elects_a_new_leader_among_followers() {
    let upstream = Upstream::new();
    let svc = SingleFlightLayer::new(MemoryStore::new())
        .on_leader_failure(LeaderFailure::Elect)
        .layer(upstream.gated(failing_first));

    let leader = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    let a = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    let b = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    upstream.release.notify_one();
    assert_eq!(leader.await.unwrap().unwrap_err(), "upstream broke");
    // One follower now leads call 2 (waiting for release), the other follows it.
    while upstream.calls() < 2 {
        tokio::task::yield_now().await;
    }
    upstream.release.notify_one();
    let (a, b) = (a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    assert_eq!(upstream.calls(), 2);
    assert_eq!(usize::from(coalesced(&a)) + usize::from(coalesced(&b)), 1);
    assert_eq!(body_of(a).await, "second try");
    assert_eq!(body_of(b).await, "second try");
    assert_eq!(svc.flights_in_progress(), 0);
}

#[tokio::test]
async fn leader_error_with_bad_gateway_policy_answers_followers_502() {
    let upstream = Upstream::new();
    let svc = SingleFlightLayer::new(MemoryStore::new())
        .on_leader_failure(LeaderFailure::BadGateway)
        .layer(upstream.gated(failing_first));

    let leader = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    let follower = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    upstream.release.notify_one();
    assert_eq!(leader.await.unwrap().unwrap_err(), "upstream broke");
    let response = follower.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(problem_type(response).await, types::COALESCED_LEADER_FAILED);
    assert_eq!(upstream.calls(), 1);
    assert_eq!(svc.flights_in_progress(), 0);
}

#[tokio::test]
async fn leader_panic_reaches_the_leader_and_followers_follow_the_policy() {
    for policy in [LeaderFailure::BadGateway, LeaderFailure::Elect] {
        let upstream = Upstream::new();
        let svc = SingleFlightLayer::new(MemoryStore::new())
            .on_leader_failure(policy)
            .layer(upstream.gated(|n| {
                if n == 1 {
                    panic!("handler bug");
                }
                ok("recovered")
            }));
        let leader = spawn_joined(svc.clone().oneshot(get("/x"))).await;
        let follower = spawn_joined(svc.clone().oneshot(get("/x"))).await;
        upstream.release.notify_one();
        assert!(leader.await.unwrap_err().is_panic());
        if policy == LeaderFailure::Elect {
            while upstream.calls() < 2 {
                tokio::task::yield_now().await;
            }
            upstream.release.notify_one();
        }
        let response = follower.await.unwrap().unwrap();
        match policy {
            LeaderFailure::BadGateway => {
                assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
                assert_eq!(problem_type(response).await, types::COALESCED_LEADER_FAILED);
            }
            LeaderFailure::Elect => {
                assert!(!coalesced(&response), "the elected follower made the call");
                assert_eq!(body_of(response).await, "recovered");
            }
        }
        assert_eq!(svc.flights_in_progress(), 0);
    }
}

/// An upstream whose calls all wait at a barrier of `parties`: it only answers if that
/// many calls are inside at once.
fn barrier_upstream(parties: usize, calls: Arc<AtomicUsize>) -> Upstreamed {
    let barrier = Arc::new(Barrier::new(parties));
    BoxCloneService::new(service_fn(move |_req: Request<()>| {
        let (barrier, calls) = (barrier.clone(), calls.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            barrier.wait().await;
            ok("together")
        }
    }))
}

#[tokio::test]
async fn different_keys_principals_and_post_run_in_parallel() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = SingleFlightLayer::new(MemoryStore::new()).layer(barrier_upstream(2, calls.clone()));
    let pairs = [
        (get("/a"), get("/b")),
        (
            Request::get("/same")
                .header("authorization", "Bearer alice")
                .body(())
                .unwrap(),
            Request::get("/same")
                .header("authorization", "Bearer bob")
                .body(())
                .unwrap(),
        ),
        (
            Request::post("/orders").body(()).unwrap(),
            Request::post("/orders").body(()).unwrap(),
        ),
    ];
    for (a, b) in pairs {
        let both = async { tokio::join!(svc.clone().oneshot(a), svc.clone().oneshot(b)) };
        // Serialising or coalescing these would deadlock the barrier.
        let (a, b) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("requests with different keys, principals or methods must run in parallel");
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(!coalesced(&a) && !coalesced(&b));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(svc.flights_in_progress(), 0);
}

#[tokio::test]
async fn configured_methods_and_unscoped_routes_coalesce() {
    let upstream = Upstream::new();
    let svc = SingleFlightLayer::new(MemoryStore::new())
        .methods([http::Method::POST])
        .unscoped()
        .layer(upstream.gated(|_| ok("shared")));
    let post = |who: &str| {
        Request::post("/search")
            .header("authorization", who)
            .body(())
            .unwrap()
    };
    let leader = spawn_joined(svc.clone().oneshot(post("alice"))).await;
    let follower = spawn_joined(svc.clone().oneshot(post("bob"))).await;
    upstream.release.notify_one();
    assert!(!coalesced(&leader.await.unwrap().unwrap()));
    assert!(coalesced(&follower.await.unwrap().unwrap()));
    assert_eq!(upstream.calls(), 1);

    // GET is no longer configured: passes through.
    let get = spawn_joined(svc.clone().oneshot(get("/search"))).await;
    upstream.release.notify_one();
    assert!(!coalesced(&get.await.unwrap().unwrap()));
    assert_eq!(upstream.calls(), 2);
}

fn chunked(chunks: &'static [&'static str]) -> Body {
    let frames = chunks
        .iter()
        .map(|chunk| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(*chunk))));
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

#[tokio::test]
async fn over_max_body_the_leader_streams_and_followers_call_themselves() {
    for (name, body) in [
        ("exact size", None),
        ("chunked", Some(&["0123", "4567", "89"][..])),
    ] {
        let upstream = Upstream::new();
        let svc = SingleFlightLayer::new(MemoryStore::new())
            .max_body(5)
            .layer(upstream.gated(move |_| {
                Ok(Response::new(match body {
                    None => full("0123456789"),
                    Some(chunks) => chunked(chunks),
                }))
            }));
        let leader = spawn_joined(svc.clone().oneshot(get("/big"))).await;
        let a = spawn_joined(svc.clone().oneshot(get("/big"))).await;
        let b = spawn_joined(svc.clone().oneshot(get("/big"))).await;
        upstream.release.notify_one();
        let leader = leader.await.unwrap().unwrap();
        assert!(!coalesced(&leader), "{name}");
        assert_eq!(body_of(leader).await, "0123456789", "{name}");
        // Each follower makes its own call.
        while upstream.calls() < 3 {
            tokio::task::yield_now().await;
        }
        upstream.release.notify_one();
        upstream.release.notify_one();
        for follower in [a, b] {
            let follower = follower.await.unwrap().unwrap();
            assert!(!coalesced(&follower), "{name}");
            assert_eq!(body_of(follower).await, "0123456789", "{name}");
        }
        assert_eq!(upstream.calls(), 3, "{name}");
        assert_eq!(svc.flights_in_progress(), 0, "{name}");
    }
}

#[tokio::test]
async fn followers_copy_status_headers_chunks_and_trailers_but_not_cookies() {
    let upstream = Upstream::new();
    let svc = SingleFlightLayer::new(MemoryStore::new()).layer(upstream.gated(|_| {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames = vec![
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from("part1,"))),
            Ok(http_body::Frame::data(Bytes::from("part2"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let mut response = Response::new(StreamBody::new(futures::stream::iter(frames)).boxed());
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
            .headers_mut()
            .insert("set-cookie", "session=leader".parse().unwrap());
        response
            .headers_mut()
            .insert("cache-control", "max-age=5".parse().unwrap());
        Ok(response)
    }));
    let leader = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    let follower = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    upstream.release.notify_one();
    let leader = leader.await.unwrap().unwrap();
    let follower = follower.await.unwrap().unwrap();
    assert_eq!(leader.headers()["set-cookie"], "session=leader");
    assert!(follower.headers().get("set-cookie").is_none());
    for response in [leader, follower] {
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.headers()["cache-control"], "max-age=5");
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "part1,part2");
    }
}

#[tokio::test]
async fn layers_sharing_a_store_coalesce_like_instances_sharing_redis() {
    let upstream = Upstream::new();
    let store = MemoryStore::new();
    let layer = SingleFlightLayer::new(store.clone()).route("feed");
    // Two `layer` calls: two independent in-process tables, like two processes.
    let instance_a = layer.layer(upstream.gated(|_| ok("feed v1")));
    let instance_b = layer.layer(upstream.gated(|_| ok("feed v1")));
    let leader = spawn_joined(instance_a.clone().oneshot(get("/feed"))).await;
    let remote = spawn_joined(instance_b.clone().oneshot(get("/feed"))).await;
    let local = spawn_joined(instance_b.clone().oneshot(get("/feed"))).await;
    upstream.release.notify_one();
    assert!(!coalesced(&leader.await.unwrap().unwrap()));
    for follower in [remote, local] {
        let follower = follower.await.unwrap().unwrap();
        assert!(coalesced(&follower));
        assert_eq!(body_of(follower).await, "feed v1");
    }
    assert_eq!(upstream.calls(), 1);
    assert_eq!(
        instance_a.flights_in_progress() + instance_b.flights_in_progress(),
        0
    );
    assert!(no_leftover_lead(&store, "feed", "GET /feed").await);
}

#[tokio::test]
async fn remote_leader_failure_follows_the_policy() {
    for policy in [LeaderFailure::BadGateway, LeaderFailure::Elect] {
        let upstream = Upstream::new();
        let layer = SingleFlightLayer::new(MemoryStore::new()).on_leader_failure(policy);
        let instance_a = layer.layer(upstream.gated(failing_first));
        let instance_b = layer.layer(upstream.gated(failing_first));
        let leader = spawn_joined(instance_a.clone().oneshot(get("/x"))).await;
        let remote = spawn_joined(instance_b.clone().oneshot(get("/x"))).await;
        upstream.release.notify_one();
        assert!(leader.await.unwrap().is_err());
        if policy == LeaderFailure::Elect {
            while upstream.calls() < 2 {
                tokio::task::yield_now().await;
            }
            upstream.release.notify_one();
        }
        let response = remote.await.unwrap().unwrap();
        match policy {
            LeaderFailure::BadGateway => assert_eq!(response.status(), StatusCode::BAD_GATEWAY),
            LeaderFailure::Elect => assert_eq!(body_of(response).await, "second try"),
        }
    }
}

#[tokio::test]
async fn unusable_keys_are_400_and_keyless_requests_pass_through() {
    let upstream = Upstream::new();
    let svc = SingleFlightLayer::new(MemoryStore::new())
        .key(KeySpec::parse("header:x-report").unwrap())
        .layer(upstream.gated(|_| ok("direct")));
    let twice = Request::get("/r")
        .header("x-report", "a")
        .header("x-report", "b")
        .body(())
        .unwrap();
    let response = svc.clone().oneshot(twice).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let text = String::from_utf8(body_of(response).await.to_vec()).unwrap();
    assert!(text.contains(types::KEY_INVALID) && text.contains("header:x-report"));

    let a = spawn_joined(svc.clone().oneshot(get("/r"))).await;
    let b = spawn_joined(svc.clone().oneshot(get("/r"))).await;
    assert_eq!(upstream.calls(), 2, "keyless requests are not coalesced");
    upstream.release.notify_one();
    upstream.release.notify_one();
    assert!(!coalesced(&a.await.unwrap().unwrap()));
    assert!(!coalesced(&b.await.unwrap().unwrap()));
}

/// A store that is down.
#[derive(Clone)]
struct DownStore;

impl SingleFlightStore for DownStore {
    async fn lead(&self, _: &ScopedKey, _: Duration) -> Result<FlightRole, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    async fn publish(&self, _: &ScopedKey, _: FencingToken, _: Landing) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
    fn abandon_detached(&self, _: ScopedKey, _: FencingToken) {}
    async fn wait(&self, _: &ScopedKey, _: Duration) -> Result<Option<Landing>, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }
}

#[tokio::test]
async fn store_errors_fail_closed_or_coalesce_in_process_only() {
    let upstream = Upstream::new();
    let closed = SingleFlightLayer::new(DownStore).layer(upstream.gated(|_| ok("unused")));
    let leader = spawn_joined(closed.clone().oneshot(get("/x"))).await;
    let follower = spawn_joined(closed.clone().oneshot(get("/x"))).await;
    for response in [
        leader.await.unwrap().unwrap(),
        follower.await.unwrap().unwrap(),
    ] {
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(problem_type(response).await, types::STORE_UNAVAILABLE);
    }
    assert_eq!(upstream.calls(), 0);

    let open = SingleFlightLayer::new(DownStore)
        .on_store_error(OnStoreError::Open)
        .layer(upstream.gated(|_| ok("uncoordinated")));
    let leader = spawn_joined(open.clone().oneshot(get("/x"))).await;
    let follower = spawn_joined(open.clone().oneshot(get("/x"))).await;
    upstream.release.notify_one();
    assert_eq!(
        body_of(leader.await.unwrap().unwrap()).await,
        "uncoordinated"
    );
    let follower = follower.await.unwrap().unwrap();
    assert!(coalesced(&follower));
    assert_eq!(upstream.calls(), 1);
    assert_eq!(open.flights_in_progress(), 0);
}

#[tokio::test]
async fn remote_oversize_response_sends_followers_to_their_own_call() {
    let upstream = Upstream::new();
    let layer = SingleFlightLayer::new(MemoryStore::new()).max_body(3);
    let instance_a = layer.layer(upstream.gated(|_| ok("too large")));
    let instance_b = layer.layer(upstream.gated(|_| ok("too large")));
    let leader = spawn_joined(instance_a.clone().oneshot(get("/x"))).await;
    let remote = spawn_joined(instance_b.clone().oneshot(get("/x"))).await;
    upstream.release.notify_one();
    assert_eq!(body_of(leader.await.unwrap().unwrap()).await, "too large");
    while upstream.calls() < 2 {
        tokio::task::yield_now().await;
    }
    upstream.release.notify_one();
    let response = remote.await.unwrap().unwrap();
    assert!(!coalesced(&response));
    assert_eq!(body_of(response).await, "too large");
    assert_eq!(upstream.calls(), 2);
}

/// Any interleaving on a multi-threaded runtime: requests joining, some cancelled at
/// random points, the upstream answering whenever. Every request that is not cancelled
/// gets the body, and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cancellations_on_many_threads_leave_no_flight_behind() {
    let upstream = Upstream::new();
    let svc = SingleFlightLayer::new(MemoryStore::new()).layer(upstream.gated(|_| ok("body")));
    for round in 0..200usize {
        let mut handles = Vec::new();
        for i in 0..16usize {
            handles.push(tokio::spawn(svc.clone().oneshot(get("/x"))));
            if (round + i) % 5 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // Cancel a round-dependent subset, the first request (a likely leader) included
        // every other round.
        for (i, handle) in handles.iter().enumerate() {
            if (i * 7 + round) % 3 == 0 {
                handle.abort();
            }
        }
        // Answer every call that reached (or will reach) the upstream.
        let release = upstream.release.clone();
        let releaser = tokio::spawn(async move {
            loop {
                release.notify_one();
                tokio::task::yield_now().await;
            }
        });
        for handle in handles {
            match handle.await {
                Ok(response) => assert_eq!(body_of(response.unwrap()).await, "body"),
                Err(error) => assert!(error.is_cancelled()),
            }
        }
        releaser.abort();
        let _ = releaser.await;
        assert_eq!(svc.flights_in_progress(), 0, "round {round}");
    }
}

async fn until_calls(upstream: &Upstream, n: usize) {
    for _ in 0..1000 {
        if upstream.calls() >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the upstream saw {} calls, not {n}", upstream.calls());
}

fn get_with(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut request = Request::get(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

/// Found in review (issue 13): two concurrent GETs for the same path on different
/// hosts got one upstream call and the same body. The authority and the headers that
/// select a representation are part of the key.
#[tokio::test]
async fn other_hosts_or_representations_never_share_a_response() {
    let upstream = Upstream::new();
    let bodies = [
        "host a gzip",
        "host b gzip",
        "host a br",
        "host a gzip range",
    ];
    let svc = SingleFlightLayer::new(MemoryStore::new())
        .layer(upstream.gated(move |n| ok(bodies[n - 1])));
    let requests = [
        [
            ("host", "a.example"),
            ("accept-encoding", "gzip"),
            ("x", ""),
        ],
        [
            ("host", "b.example"),
            ("accept-encoding", "gzip"),
            ("x", ""),
        ],
        [("host", "a.example"), ("accept-encoding", "br"), ("x", "")],
        [
            ("host", "a.example"),
            ("accept-encoding", "gzip"),
            ("range", "bytes=0-1"),
        ],
        // The same as the first: it follows it (`Host` compared without case).
        [
            ("host", "A.example"),
            ("accept-encoding", "gzip"),
            ("x", ""),
        ],
    ];
    let mut tasks = Vec::new();
    for (i, headers) in requests.iter().enumerate() {
        tasks.push(spawn_joined(svc.clone().oneshot(get_with("/catalog/x", headers))).await);
        until_calls(&upstream, (i + 1).min(4)).await;
    }
    upstream.release.notify_waiters();
    let mut seen = Vec::new();
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        let was_coalesced = coalesced(&response);
        seen.push((body_of(response).await, was_coalesced));
    }
    assert_eq!(upstream.calls(), 4);
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(seen[i], (Bytes::from(*body), false), "request {i}");
    }
    assert_eq!(seen[4], (Bytes::from("host a gzip"), true));
}

/// A response that says it is not for others (`Cache-Control: private` or `no-store`,
/// `Vary` on a header outside the key) is not copied: each follower makes its own call.
#[tokio::test]
async fn private_responses_are_not_copied_to_followers() {
    for (name, value) in [
        ("cache-control", "private, max-age=60"),
        ("cache-control", "no-store"),
        ("vary", "Origin"),
        ("vary", "*"),
    ] {
        let upstream = Upstream::new();
        let svc = SingleFlightLayer::new(MemoryStore::new()).layer(upstream.gated(move |n| {
            let mut response = Response::new(full(["first", "second"][n - 1]));
            response.headers_mut().insert(name, value.parse().unwrap());
            Ok(response)
        }));
        let leader = spawn_joined(svc.clone().oneshot(get("/me"))).await;
        let follower = spawn_joined(svc.clone().oneshot(get("/me"))).await;
        until_calls(&upstream, 1).await;
        upstream.release.notify_one();
        until_calls(&upstream, 2).await;
        upstream.release.notify_one();
        let leader = leader.await.unwrap().unwrap();
        let follower = follower.await.unwrap().unwrap();
        assert!(!coalesced(&follower), "{name}: {value}");
        assert_eq!(body_of(leader).await, "first");
        assert_eq!(body_of(follower).await, "second", "{name}: {value}");
        assert_eq!(upstream.calls(), 2);
    }
}

/// A follower that takes over the work of a leader that left gets that response, but
/// never the leader's cookies or credentials (issue 13).
#[tokio::test]
async fn a_follower_driving_a_departed_leaders_work_never_gets_its_cookies() {
    let upstream = Upstream::new();
    let svc = SingleFlightLayer::new(MemoryStore::new()).layer(upstream.gated(|_| {
        let mut response = Response::new(full("fresh"));
        let headers = response.headers_mut();
        headers.insert("set-cookie", "session=leader".parse().unwrap());
        headers.insert("authorization", "Bearer leader".parse().unwrap());
        headers.insert("cache-control", "max-age=5".parse().unwrap());
        Ok(response)
    }));
    let leader = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    let follower = spawn_joined(svc.clone().oneshot(get("/x"))).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    upstream.release.notify_one();
    let response = follower.await.unwrap().unwrap();
    assert!(coalesced(&response));
    assert!(response.headers().get("set-cookie").is_none());
    assert!(response.headers().get("authorization").is_none());
    assert_eq!(response.headers()["cache-control"], "max-age=5");
    assert_eq!(body_of(response).await, "fresh");
    assert_eq!(upstream.calls(), 1);
}

//! `SingleFlightStore` on Redis: a stampede over three instances reaches the upstream once;
//! landings, abandons, expired leads and bounds through the store trait (the same
//! contract as the memory store's unit tests); one round trip per step.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keyward::core::store::{FlightRole, Landing, SingleFlightStore, StoredResponse};
use keyward::core::{FencingToken, Key, Scope, ScopedKey};
use keyward::{RedisStore, SingleFlightLayer};
use keyward_tests::redis_kit::{CommandStats, RedisServer, command_delta};
use keyward_tests::{Backend, Redis, assert_one_script, spawn_joined};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

fn key(raw: &str) -> ScopedKey {
    ScopedKey::new("flight", "r", Scope::Unscoped, Key::from(raw))
}

fn landing(body: &'static str) -> Landing {
    Landing::Response(Arc::new(StoredResponse {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body: Bytes::from(body),
        trailers: None,
    }))
}

const LEASE: Duration = Duration::from_secs(8);

async fn leader<St: SingleFlightStore>(store: &St, k: &str, lease: Duration) -> FencingToken {
    match store.lead(&key(k), lease).await.unwrap() {
        FlightRole::Leader(token) => token,
        FlightRole::Follower => panic!("expected to lead {k}"),
    }
}

/// How many `EVALSHA`s Redis ran since `before`.
async fn evalshas_since(stats: &mut CommandStats, before: &[(String, u64)]) -> u64 {
    command_delta(before, &stats.snapshot().await)
        .iter()
        .find(|(name, _)| name == "evalsha")
        .map_or(0, |(_, calls)| *calls)
}

/// Waits (bounded) until Redis has run `n` scripts since `before`.
async fn until_scripts(stats: &mut CommandStats, before: &[(String, u64)], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while evalshas_since(stats, before).await < n {
        assert!(Instant::now() < deadline, "Redis never ran {n} scripts");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_stampede_across_three_instances_reaches_the_upstream_once() {
    const REQUESTS: usize = 30;
    let redis = Redis::start();
    let stores: Vec<RedisStore> = (0..3)
        .map(|_| Redis::store_on(&redis.server, "keyward:"))
        .collect();
    for store in &stores {
        store.ping().await.unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let upstream = {
        let (calls, gate) = (calls.clone(), gate.clone());
        service_fn(move |_req: Request<()>| {
            let (calls, gate) = (calls.clone(), gate.clone());
            async move {
                let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                gate.acquire().await.unwrap().forget();
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("call {n}")))))
            }
        })
    };
    let services: Vec<_> = stores
        .iter()
        .map(|store| {
            SingleFlightLayer::new(store.clone())
                .route("feed")
                .lease(LEASE)
                .layer(upstream.clone())
        })
        .collect();
    let mut stats = CommandStats::connect(&redis.server).await;
    let before = stats.snapshot().await;
    let mut tasks = Vec::new();
    for i in 0..REQUESTS {
        let svc = services[i % services.len()].clone();
        tasks.push(
            spawn_joined(async move {
                let res = svc
                    .oneshot(Request::get("/feed").body(()).unwrap())
                    .await
                    .unwrap();
                let coalesced = res.headers().contains_key("keyward-coalesced");
                let status = res.status();
                let body = res.into_body().collect().await.unwrap().to_bytes();
                (status, coalesced, body)
            })
            .await,
        );
    }
    // One lead per instance (one wins) and one watch per follower instance: every
    // instance has joined the one flight. Only then may the upstream answer.
    until_scripts(&mut stats, &before, 5).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    gate.add_permits(REQUESTS);
    let mut coalesced = 0;
    for task in tasks {
        let (status, was_coalesced, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "call 1");
        coalesced += usize::from(was_coalesced);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the upstream ran once");
    assert_eq!(coalesced, REQUESTS - 1);
    for store in &stores {
        assert_eq!(store.watched_records(), 0);
    }
    // The flight is over: the next request leads a new one.
    let token = leader(&stores[0], "GET /feed", LEASE).await;
    assert!(token.get() > 0);
}

/// Spawns a follower's wait on `store` and returns once Redis has run its watch script.
async fn waiting(
    redis: &Redis,
    store: &RedisStore,
    k: &'static str,
    max: Duration,
) -> JoinHandle<(Option<Landing>, Instant)> {
    let mut stats = CommandStats::connect(&redis.server).await;
    let before = stats.snapshot().await;
    let handle = tokio::spawn({
        let store = store.clone();
        async move {
            let landing = store.wait(&key(k), max).await.unwrap();
            (landing, Instant::now())
        }
    });
    until_scripts(&mut stats, &before, 1).await;
    handle
}

#[tokio::test]
async fn followers_on_other_instances_receive_the_landing_and_late_ones_lead_again() {
    let redis = Redis::start();
    let (a, b, c) = (redis.instance(), redis.instance(), redis.instance());
    a.ping().await.unwrap();
    b.ping().await.unwrap();
    let token = leader(&a, "k", LEASE).await;
    assert_eq!(
        b.lead(&key("k"), LEASE).await.unwrap(),
        FlightRole::Follower
    );
    // Another key is independent.
    leader(&c, "other", LEASE).await;
    let first = waiting(&redis, &b, "k", LEASE).await;
    let second = waiting(&redis, &c, "k", LEASE).await;
    let published_at = Instant::now();
    a.publish(&key("k"), token, landing("ok")).await.unwrap();
    for follower in [first, second] {
        let (got, at) = follower.await.unwrap();
        assert_eq!(got, Some(landing("ok")));
        assert!(
            at - published_at < Duration::from_secs(1),
            "woken by pub/sub"
        );
    }
    // Landed: no flight any more; the next request leads with a higher token.
    assert_eq!(b.wait(&key("k"), LEASE).await.unwrap(), None);
    let next = leader(&b, "k", LEASE).await;
    assert!(next > token);
    b.publish(&key("k"), next, Landing::TooLarge).await.unwrap();
}

#[tokio::test]
async fn an_abandoned_flight_lands_as_failed_at_once() {
    let redis = Redis::start();
    let (a, b) = (redis.instance(), redis.instance());
    let token = leader(&a, "k", LEASE).await;
    let follower = waiting(&redis, &b, "k", LEASE).await;
    let abandoned_at = Instant::now();
    a.abandon_detached(key("k"), token);
    let (got, at) = follower.await.unwrap();
    assert_eq!(got, Some(Landing::Failed));
    assert!(at - abandoned_at < Duration::from_secs(1), "not the lease");
    leader(&b, "k", LEASE).await;
}

#[tokio::test]
async fn an_expired_lead_fails_its_followers_and_its_late_publish_is_fenced() {
    let redis = Redis::start();
    let (a, b) = (redis.instance(), redis.instance());
    let lease = Duration::from_millis(300);
    let old = leader(&a, "k", lease).await;
    let started = Instant::now();
    let follower = waiting(&redis, &b, "k", LEASE).await;
    let (got, at) = follower.await.unwrap();
    assert_eq!(got, Some(Landing::Failed));
    let waited = at - started;
    assert!(
        waited >= lease - Duration::from_millis(50) && waited < lease + Duration::from_millis(300),
        "{waited:?}"
    );
    let new = leader(&b, "k", LEASE).await;
    assert!(new > old);
    a.publish(&key("k"), old, landing("stale")).await.unwrap();
    assert_eq!(
        a.lead(&key("k"), LEASE).await.unwrap(),
        FlightRole::Follower
    );
    b.publish(&key("k"), new, landing("fresh")).await.unwrap();
}

#[tokio::test]
async fn wait_is_bounded_by_max() {
    let redis = Redis::start();
    let (a, b) = (redis.instance(), redis.instance());
    let _token = leader(&a, "k", LEASE).await;
    let started = Instant::now();
    let max = Duration::from_millis(300);
    assert_eq!(b.wait(&key("k"), max).await.unwrap(), Some(Landing::Failed));
    let waited = started.elapsed();
    assert!(
        waited >= max && waited < max + Duration::from_millis(300),
        "{waited:?}"
    );
}

#[tokio::test]
async fn lead_and_publish_are_one_evalsha_each() {
    let server = RedisServer::start();
    let store = Redis::store_on(&server, "keyward:");
    store.ping().await.unwrap();
    let mut stats = CommandStats::connect(&server).await;
    let before = stats.snapshot().await;
    let token = leader(&store, "k", LEASE).await;
    let delta = command_delta(&before, &stats.snapshot().await);
    assert_one_script(
        &delta,
        &[
            "hget", "exists", "time", "set", "incr", "pttl", "pexpire", "hset",
        ],
    );
    let before = stats.snapshot().await;
    store.publish(&key("k"), token, landing("x")).await.unwrap();
    let delta = command_delta(&before, &stats.snapshot().await);
    assert_one_script(&delta, &["hmget", "del"]);
}

#[tokio::test]
async fn every_flight_script_runs_on_a_cluster() {
    let cluster = keyward_tests::RedisClusterBackend::start();
    let (a, b) = (cluster.instance(), cluster.instance());
    let token = leader(&a, "k", LEASE).await;
    assert_eq!(
        b.lead(&key("k"), LEASE).await.unwrap(),
        FlightRole::Follower
    );
    // Watch, then landed after the bound: the flight is still in progress.
    let max = Duration::from_millis(100);
    assert_eq!(b.wait(&key("k"), max).await.unwrap(), Some(Landing::Failed));
    a.publish(&key("k"), token, landing("ok")).await.unwrap();
    assert_eq!(b.wait(&key("k"), max).await.unwrap(), None);
    let next = leader(&b, "k", LEASE).await;
    assert!(next > token);
    b.abandon_detached(key("k"), next);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(
        a.lead(&key("k"), LEASE).await.unwrap(),
        FlightRole::Leader(_)
    ) {
        assert!(Instant::now() < deadline, "the abandon never landed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

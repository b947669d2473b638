//! `SerialStore` on every backend: mutual exclusion across instances, FIFO with rising
//! tokens, limits, cancelled waiters (memory on paused time, Redis and Redis Cluster in
//! real time); then what only Redis has to show: heartbeats keep a live holder's key, a
//! crashed holder's lease expires and the next waiter proceeds with a higher token, one
//! round trip per step, a dead Redis is a store error within the timeout. With several
//! permits per key (`permits`): at most that many holders across instances, FIFO beyond,
//! and a crashed holder's permit back at its lease's end.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keyward::core::store::{AcquireOutcome, SerialLimits, SerialPermit, SerialStore};
use keyward::core::{FencingToken, Key, Scope, ScopedKey};
use keyward::{KeySpec, PerKeySerialLayer, RedisStore};
use keyward_tests::redis_kit::{CommandStats, RedisServer, command_delta};
use keyward_tests::{Backend, Redis, assert_one_script, fails_within, store_with_timeout};
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

fn key(raw: &str) -> ScopedKey {
    ScopedKey::new("serial", "r", Scope::Unscoped, Key::from(raw))
}

const LONG: SerialLimits = SerialLimits {
    max_wait: Duration::from_secs(8),
    max_queue: 64,
    permits: 1,
};

async fn acquired<St: SerialStore>(store: &St, k: &str) -> SerialPermit {
    match store.acquire(&key(k), LONG).await.unwrap() {
        AcquireOutcome::Acquired(permit) => permit,
        other => panic!("expected a permit, got {other:?}"),
    }
}

/// Whether fewer than `n` requests wait for `k` (a zero-wait probe that never queues:
/// `QueueFull` at `n` waiters, else `Timeout`; a free key would be taken, so only probe
/// a held key).
async fn fewer_waiting_than<St: SerialStore>(store: &St, k: &str, n: usize) -> bool {
    let probe = SerialLimits {
        max_wait: Duration::ZERO,
        max_queue: n,
        permits: 1,
    };
    match store.acquire(&key(k), probe).await.unwrap() {
        AcquireOutcome::Timeout => true,
        AcquireOutcome::QueueFull => false,
        AcquireOutcome::Acquired(permit) => panic!("probed a free key: {permit:?}"),
    }
}

/// Waits (bounded) until exactly `n` requests wait for `k`.
async fn until_waiting<St: SerialStore>(store: &St, k: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let exactly_n =
            fewer_waiting_than(store, k, n + 1).await && !fewer_waiting_than(store, k, n).await;
        if exactly_n {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} waiting for {k}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn requests_over_instances_never_overlap<B: Backend>(b: B) {
    const KEYS: usize = 2;
    const REQUESTS: usize = 24;
    let inside: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let overlaps = Arc::new(AtomicUsize::new(0));
    let served: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![vec![]; KEYS]));
    let handler = {
        let (inside, overlaps, served) = (inside.clone(), overlaps.clone(), served.clone());
        service_fn(move |req: Request<Full<Bytes>>| {
            let (inside, overlaps, served) = (inside.clone(), overlaps.clone(), served.clone());
            async move {
                let k: usize = req.headers()["x-key"].to_str().unwrap()[1..]
                    .parse()
                    .unwrap();
                let token = req.extensions().get::<FencingToken>().unwrap().get();
                if inside[k].fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                // Long enough for an overlapping request on another instance to arrive.
                tokio::time::sleep(Duration::from_millis(3)).await;
                served.lock().unwrap()[k].push(token);
                inside[k].fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let services: Vec<_> = (0..3)
        .map(|_| {
            PerKeySerialLayer::new(b.instance())
                .route("r")
                .key(KeySpec::parse("header:x-key").unwrap())
                .max_wait(Duration::from_secs(8))
                .max_queue(64)
                .layer(handler.clone())
        })
        .collect();
    let start = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let svc = services[i % services.len()].clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let req = Request::get("/")
                    .header("x-key", format!("k{}", i % KEYS))
                    .body(Full::default())
                    .unwrap();
                let res = svc.oneshot(req).await.unwrap();
                let status = res.status();
                res.into_body().collect().await.unwrap();
                status
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders at once");
    for (k, tokens) in served.lock().unwrap().iter().enumerate() {
        assert_eq!(tokens.len(), REQUESTS / KEYS);
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "key {k}: tokens not increasing in serving order: {tokens:?}"
        );
    }
}

async fn waiters_get_the_key_in_arrival_order_with_rising_tokens<B: Backend>(b: B) {
    let instances: Vec<B::Store> = (0..3).map(|_| b.instance()).collect();
    let holder = acquired(&instances[0], "a").await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let store = instances[i % instances.len()].clone();
        let order = order.clone();
        tasks.push(tokio::spawn(async move {
            let permit = acquired(&store, "a").await;
            order.lock().unwrap().push((i, permit.token()));
            store.release(permit).await.unwrap();
        }));
        // The next one is created only once this one is queued.
        until_waiting(&instances[0], "a", i + 1).await;
    }
    let first = holder.token();
    instances[0].release(holder).await.unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    let order = order.lock().unwrap().clone();
    let arrivals: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(arrivals, [0, 1, 2, 3, 4]);
    let mut previous = first;
    for (_, token) in order.iter() {
        assert!(*token > previous, "{order:?}");
        previous = *token;
    }
    // The key is free again.
    let again = acquired(&instances[1], "a").await;
    assert!(again.token() > previous);
    instances[1].release(again).await.unwrap();
}

async fn max_wait_and_max_queue_give_their_outcomes<B: Backend>(b: B) {
    let (one, two) = (b.instance(), b.instance());
    let holder = acquired(&one, "a").await;
    let limits = SerialLimits {
        max_wait: b.unit() * 2,
        max_queue: 1,
        permits: 1,
    };
    let started = Instant::now();
    assert_eq!(
        two.acquire(&key("a"), limits).await.unwrap(),
        AcquireOutcome::Timeout
    );
    let waited = started.elapsed();
    assert!(
        waited >= b.unit() * 2 && waited <= b.unit() * 2 + b.slack(),
        "{waited:?}"
    );
    // The timed-out waiter left: one may queue again, a second is refused at once.
    let queued = tokio::spawn({
        let two = two.clone();
        async move { two.acquire(&key("a"), LONG).await.unwrap() }
    });
    until_waiting(&one, "a", 1).await;
    let started = Instant::now();
    assert_eq!(
        one.acquire(&key("a"), limits).await.unwrap(),
        AcquireOutcome::QueueFull
    );
    assert!(started.elapsed() <= b.slack());
    one.release(holder).await.unwrap();
    let AcquireOutcome::Acquired(next) = queued.await.unwrap() else {
        panic!("the queued waiter gets the key")
    };
    two.release(next).await.unwrap();
}

async fn a_cancelled_waiter_leaves_the_queue<B: Backend>(b: B) {
    let (one, two) = (b.instance(), b.instance());
    let holder = acquired(&one, "a").await;
    let cancelled = tokio::spawn({
        let two = two.clone();
        async move { two.acquire(&key("a"), LONG).await }
    });
    until_waiting(&one, "a", 1).await;
    let next = tokio::spawn({
        let one = one.clone();
        async move { acquired(&one, "a").await }
    });
    until_waiting(&one, "a", 2).await;
    cancelled.abort();
    assert!(cancelled.await.unwrap_err().is_cancelled());
    until_waiting(&one, "a", 1).await;
    // The cancelled waiter does not hold up the one behind it.
    one.release(holder).await.unwrap();
    let next = next.await.unwrap();
    one.release(next).await.unwrap();
}

const THREE: SerialLimits = SerialLimits { permits: 3, ..LONG };

async fn acquired_of<St: SerialStore>(store: &St, k: &str, limits: SerialLimits) -> SerialPermit {
    match store.acquire(&key(k), limits).await.unwrap() {
        AcquireOutcome::Acquired(permit) => permit,
        other => panic!("expected a permit, got {other:?}"),
    }
}

/// At most `permits` requests per key inside the service at once, across instances, and
/// every one served.
async fn permits_bound_requests_per_key_over_instances<B: Backend>(b: B) {
    const PERMITS: u32 = 3;
    const REQUESTS: usize = 18;
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tokens: Arc<Mutex<Vec<u64>>> = Arc::default();
    let handler = {
        let (inside, most, tokens) = (inside.clone(), most.clone(), tokens.clone());
        service_fn(move |req: Request<Full<Bytes>>| {
            let (inside, most, tokens) = (inside.clone(), most.clone(), tokens.clone());
            async move {
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokens
                    .lock()
                    .unwrap()
                    .push(req.extensions().get::<FencingToken>().unwrap().get());
                // Long enough for the others to pile up behind the permits.
                tokio::time::sleep(Duration::from_millis(20)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        })
    };
    let services: Vec<_> = (0..3)
        .map(|_| {
            PerKeySerialLayer::new(b.instance())
                .route("r")
                .key(KeySpec::parse("header:x-key").unwrap())
                .permits(PERMITS)
                .max_wait(Duration::from_secs(8))
                .layer(handler.clone())
        })
        .collect();
    let start = Arc::new(tokio::sync::Barrier::new(REQUESTS));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let svc = services[i % services.len()].clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let req = Request::get("/")
                    .header("x-key", "k")
                    .body(Full::default())
                    .unwrap();
                let res = svc.oneshot(req).await.unwrap();
                let status = res.status();
                res.into_body().collect().await.unwrap();
                status
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let most = most.load(Ordering::SeqCst);
    assert_eq!(most, PERMITS as usize, "most requests inside at once");
    let mut tokens = tokens.lock().unwrap().clone();
    let issued = tokens.len();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), issued, "every holder has its own token");
    assert_eq!(issued, REQUESTS);
}

async fn permits_queue_in_arrival_order_and_hand_over_on_release<B: Backend>(b: B) {
    let (one, two) = (b.instance(), b.instance());
    let held = [
        acquired_of(&one, "a", THREE).await,
        acquired_of(&two, "a", THREE).await,
        acquired_of(&one, "a", THREE).await,
    ];
    assert!(held.windows(2).all(|w| w[0].token() < w[1].token()));
    assert!(held.iter().all(|p| p.permits() == 3));
    // Full: the next two wait, in order.
    let fourth = keyward_tests::spawn_joined({
        let two = two.clone();
        async move { acquired_of(&two, "a", THREE).await }
    })
    .await;
    let probe = SerialLimits {
        max_wait: Duration::ZERO,
        max_queue: 1,
        permits: 3,
    };
    for _ in 0..200 {
        if one.acquire(&key("a"), probe).await.unwrap() == AcquireOutcome::QueueFull {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fifth = keyward_tests::spawn_joined({
        let one = one.clone();
        async move { acquired_of(&one, "a", THREE).await }
    })
    .await;
    let [first, second, third] = held;
    one.release(second).await.unwrap();
    let fourth = fourth.await.unwrap();
    assert!(fourth.token() > third.token());
    assert!(!fifth.is_finished(), "fifth is not next");
    // A stale release frees nothing.
    two.release(SerialPermit::of_many(key("a"), third.token(), 3))
        .await
        .unwrap();
    let fifth = fifth.await.unwrap();
    assert!(fifth.token() > fourth.token());
    for permit in [first, fourth, fifth] {
        one.release(permit).await.unwrap();
    }
    // All free again: three at once.
    let again: Vec<_> = [
        acquired_of(&two, "a", THREE).await,
        acquired_of(&two, "a", THREE).await,
        acquired_of(&two, "a", THREE).await,
    ]
    .into();
    for permit in again {
        two.release(permit).await.unwrap();
    }
}

keyward_tests::backend_suite!(
    requests_over_instances_never_overlap,
    waiters_get_the_key_in_arrival_order_with_rising_tokens,
    max_wait_and_max_queue_give_their_outcomes,
    a_cancelled_waiter_leaves_the_queue,
    permits_bound_requests_per_key_over_instances,
    permits_queue_in_arrival_order_and_hand_over_on_release,
);

// --- Redis only ---------------------------------------------------------------------------

fn store_with_lease(server: &RedisServer, lease: Duration) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(Duration::from_millis(250))
        .serial_lease(lease)
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_live_holder_keeps_its_key_and_a_crashed_ones_passes_on_with_a_higher_token() {
    let server = RedisServer::start();
    let lease = Duration::from_millis(300);
    let crashing = store_with_lease(&server, lease);
    let survivor = store_with_lease(&server, lease);
    let held = acquired(&crashing, "a").await;
    assert_eq!(crashing.serial_heartbeats(), 1);
    let waiter = tokio::spawn({
        let survivor = survivor.clone();
        async move {
            let permit = acquired(&survivor, "a").await;
            (permit, Instant::now())
        }
    });
    // Three leases long: the heartbeat keeps the key.
    tokio::time::sleep(lease * 3).await;
    assert!(!waiter.is_finished(), "a live holder lost its key");
    // The holder's process dies: no release, no more heartbeats.
    let crashed_at = Instant::now();
    drop(crashing);
    let (next, at) = waiter.await.unwrap();
    let took = at - crashed_at;
    assert!(
        took <= lease + Duration::from_millis(200),
        "the key passed on after {took:?}"
    );
    assert!(next.token() > held.token(), "{next:?} after {held:?}");
    // The dead holder's late release is fenced: the survivor still holds the key.
    survivor.release(held).await.unwrap();
    assert!(!fewer_waiting_than(&survivor, "a", 0).await);
    survivor.release(next).await.unwrap();
    assert_eq!(survivor.serial_heartbeats(), 0);
}

#[tokio::test]
async fn a_crashed_holders_permit_comes_back_at_its_lease_end() {
    let server = RedisServer::start();
    let lease = Duration::from_millis(300);
    let crashing = store_with_lease(&server, lease);
    let survivor = store_with_lease(&server, lease);
    let two = SerialLimits { permits: 2, ..LONG };
    let dead = acquired_of(&crashing, "a", two).await;
    let live = acquired_of(&survivor, "a", two).await;
    let waiter = tokio::spawn({
        let survivor = survivor.clone();
        async move {
            let permit = acquired_of(&survivor, "a", two).await;
            (permit, Instant::now())
        }
    });
    // Three leases long: heartbeats keep both permits.
    tokio::time::sleep(lease * 3).await;
    assert!(!waiter.is_finished(), "a live holder lost its permit");
    let crashed_at = Instant::now();
    drop(crashing);
    let (next, at) = waiter.await.unwrap();
    let took = at - crashed_at;
    assert!(
        took <= lease + Duration::from_millis(200),
        "the permit came back after {took:?}"
    );
    assert!(next.token() > live.token(), "{next:?} after {live:?}");
    // The dead holder's late release is fenced: both permits stay held.
    survivor.release(dead).await.unwrap();
    let probe = SerialLimits {
        max_wait: Duration::ZERO,
        max_queue: 0,
        permits: 2,
    };
    assert_eq!(
        survivor.acquire(&key("a"), probe).await.unwrap(),
        AcquireOutcome::QueueFull
    );
    survivor.release(live).await.unwrap();
    survivor.release(next).await.unwrap();
    assert_eq!(survivor.serial_heartbeats(), 0);
}

#[tokio::test]
async fn every_permits_step_is_one_evalsha() {
    let redis = Redis::start();
    let store = redis.store();
    store.ping().await.unwrap();
    let mut stats = CommandStats::connect(&redis.server).await;
    let scripted = [
        "time",
        "zremrangebyscore",
        "zcard",
        "zrange",
        "incr",
        "set",
        "pttl",
        "pexpire",
        "zadd",
        "zscore",
        "zrem",
        "hget",
        "hdel",
        "hset",
        "publish",
    ];
    let before = stats.snapshot().await;
    let permit = acquired_of(&store, "k", THREE).await;
    assert_one_script(&command_delta(&before, &stats.snapshot().await), &scripted);
    let before = stats.snapshot().await;
    store.release(permit).await.unwrap();
    assert_one_script(&command_delta(&before, &stats.snapshot().await), &scripted);
}

#[tokio::test]
async fn release_wakes_a_waiter_on_another_instance_without_waiting_for_the_lease() {
    let server = RedisServer::start();
    let lease = Duration::from_secs(5);
    let (one, two) = (
        store_with_lease(&server, lease),
        store_with_lease(&server, lease),
    );
    let holder = acquired(&one, "a").await;
    let waiter = tokio::spawn({
        let two = two.clone();
        async move {
            let permit = acquired(&two, "a").await;
            (permit, Instant::now())
        }
    });
    until_waiting(&one, "a", 1).await;
    let released_at = Instant::now();
    one.release(holder).await.unwrap();
    let (permit, at) = waiter.await.unwrap();
    assert!(
        at - released_at < Duration::from_millis(500),
        "woken after {:?}",
        at - released_at
    );
    two.release(permit).await.unwrap();
    assert_eq!(two.watched_records(), 0);
}

#[tokio::test]
async fn uncontended_acquire_and_release_are_one_evalsha_each() {
    let redis = Redis::start();
    let store = redis.store();
    store.ping().await.unwrap();
    let mut stats = CommandStats::connect(&redis.server).await;
    let one_evalsha = |delta: Vec<(String, u64)>| {
        let from_scripts = [
            "hget", "hmget", "hset", "del", "pttl", "pexpire", "exists", "time", "set", "incr",
            "zrange", "zrem", "hdel", "zcard", "zadd", "zscore", "publish",
        ];
        assert_one_script(&delta, &from_scripts);
    };
    let before = stats.snapshot().await;
    let permit = acquired(&store, "k").await;
    one_evalsha(command_delta(&before, &stats.snapshot().await));
    let before = stats.snapshot().await;
    store.release(permit).await.unwrap();
    one_evalsha(command_delta(&before, &stats.snapshot().await));
}

#[tokio::test]
async fn redis_down_is_a_store_error_within_the_timeout() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(50);
    let store = store_with_timeout(&server, timeout);
    let permit = acquired(&store, "k").await;
    store.release(permit).await.unwrap();
    server.kill_9();
    let k = key("k");
    fails_within(timeout, || store.acquire(&k, LONG)).await;
}

#[tokio::test]
async fn a_waiter_cancelled_as_the_key_reaches_it_passes_the_key_on() {
    let redis = Redis::start();
    let (one, two) = (redis.instance(), redis.instance());
    let holder = acquired(&one, "a").await;
    let racing = tokio::spawn({
        let two = two.clone();
        async move { two.acquire(&key("a"), LONG).await.unwrap() }
    });
    until_waiting(&one, "a", 1).await;
    let next = tokio::spawn({
        let one = one.clone();
        async move { acquired(&one, "a").await }
    });
    until_waiting(&one, "a", 2).await;
    // The hand-over to `racing` and its cancellation cross.
    one.release(holder).await.unwrap();
    racing.abort();
    match racing.await {
        // It saw the key before the abort: its holder releases it.
        Ok(AcquireOutcome::Acquired(permit)) => two.release(permit).await.unwrap(),
        Ok(other) => panic!("unexpected {other:?}"),
        // Cancelled: it left, passing the key on.
        Err(error) => assert!(error.is_cancelled()),
    }
    let next = tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("the key passed on, not stuck until a lease")
        .unwrap();
    one.release(next).await.unwrap();
    assert_eq!(one.serial_heartbeats() + two.serial_heartbeats(), 0);
}

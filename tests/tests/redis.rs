//! RedisStore beyond the shared idempotency suite: several instances (processes) on one
//! Redis, one round trip per decision, Redis failures and recovery, fencing across
//! instances, the pub/sub hub, and what Redis gets to see.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use http::StatusCode;
use keyward::core::store::{
    ClaimOutcome, Completion, Fingerprint, IdempotencyStore, StoredResponse,
};
use keyward::core::{FencingToken, Key, Scope, ScopedKey};
use keyward::idempotency::{IdempotencyLayer, OnInFlight};
use keyward::{OnStoreError, RedisStore};
use keyward_tests::redis_kit::{CommandStats, RedisServer, command_delta};
use keyward_tests::{Backend, Redis, Seen, TestBody, Upstream, post, seen};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneSyncService<
    http::Request<TestBody>,
    http::Response<keyward::KeywardBody<TestBody>>,
    std::convert::Infallible,
>;

fn service(layer: IdempotencyLayer<RedisStore>, upstream: &Upstream) -> Svc {
    let upstream = upstream.clone();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(layer)
            .service_fn(move |req| upstream.clone().handle(req)),
    )
}

fn layer(store: &RedisStore) -> IdempotencyLayer<RedisStore> {
    IdempotencyLayer::new(store.clone()).route("payments")
}

async fn send(svc: &Svc, req: http::Request<TestBody>) -> Seen {
    seen(svc.clone().oneshot(req).await.unwrap()).await
}

fn key(raw: &str) -> ScopedKey {
    ScopedKey::new("idem", "payments", Scope::Unscoped, Key::from(raw))
}

fn fp(body: &str) -> Fingerprint {
    Fingerprint::builder().part(body.as_bytes()).finish()
}

fn response(body: &'static str) -> StoredResponse {
    StoredResponse {
        status: StatusCode::OK,
        headers: Default::default(),
        body: body.into(),
        trailers: None,
    }
}

const LONG: Duration = Duration::from_secs(10);

async fn claimed(store: &RedisStore, k: &str, lease: Duration) -> FencingToken {
    match store.claim(&key(k), &fp("x"), lease).await.unwrap() {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("expected a claim, got {other:?}"),
    }
}

#[tokio::test]
async fn every_decision_is_one_evalsha() {
    let redis = Redis::start();
    let store = redis.store();
    store.ping().await.unwrap();
    wait_subscribed(&redis.server, &[&store]).await;
    let mut stats = CommandStats::connect(&redis.server).await;
    // Redis counts the commands a script runs too; what a client sent is the EVALSHA.
    let one_evalsha = |delta: Vec<(String, u64)>| {
        let from_scripts = [
            "hmget", "hset", "del", "pttl", "pexpire", "exists", "time", "set", "get", "incr",
            "publish",
        ];
        assert_eq!(
            delta.iter().find(|(name, _)| name == "evalsha"),
            Some(&("evalsha".to_owned(), 1)),
            "{delta:?}"
        );
        for (name, _) in &delta {
            assert!(
                name == "evalsha" || from_scripts.contains(&name.as_str()),
                "a second round trip: {name} in {delta:?}"
            );
        }
    };

    let before = stats.snapshot().await;
    let token = claimed(&store, "k", LONG).await;
    one_evalsha(command_delta(&before, &stats.snapshot().await));

    let before = stats.snapshot().await;
    assert!(store.renew(&key("k"), token, LONG).await.unwrap());
    one_evalsha(command_delta(&before, &stats.snapshot().await));

    let before = stats.snapshot().await;
    let done = store
        .complete(&key("k"), token, &fp("x"), response("ok"), LONG)
        .await
        .unwrap();
    assert_eq!(done, Completion::Stored);
    one_evalsha(command_delta(&before, &stats.snapshot().await));

    let before = stats.snapshot().await;
    let replay = store.claim(&key("k"), &fp("x"), LONG).await.unwrap();
    assert!(matches!(replay, ClaimOutcome::Completed(res) if res.body == "ok"));
    one_evalsha(command_delta(&before, &stats.snapshot().await));

    // After Redis lost its script cache, the script is loaded again by itself.
    let mut conn = redis.server.connection().await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let replay = store.claim(&key("k"), &fp("x"), LONG).await.unwrap();
    assert!(matches!(replay, ClaimOutcome::Completed(_)));
}

/// A store with `timeout` on `server`, and two services on it: `OnStoreError::Closed` and
/// `Open`, sharing one upstream.
async fn closed_and_open(server: &RedisServer, timeout: Duration) -> (Upstream, Svc, Svc) {
    let store = RedisStore::builder()
        .url(server.url())
        .timeout(timeout)
        .build()
        .unwrap();
    store.ping().await.unwrap();
    let upstream = Upstream::new(StatusCode::CREATED);
    let closed = service(layer(&store), &upstream);
    let open = service(layer(&store).on_store_error(OnStoreError::Open), &upstream);
    (upstream, closed, open)
}

/// Once Redis is back, the same service coordinates `k` again within 5 s: it executes
/// once and its retry is a replay.
async fn coordinated_again(closed: &Svc, k: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        let res = send(closed, post("/pay", Some(k), None, "1")).await;
        if res.status != StatusCode::SERVICE_UNAVAILABLE {
            break res;
        }
        assert!(Instant::now() < deadline, "store not usable within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(first.status, StatusCode::CREATED);
    let replay = send(closed, post("/pay", Some(k), None, "1")).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, first.body);
}

#[tokio::test]
async fn redis_down_closed_answers_503_within_the_timeout_and_open_passes_through() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(50);
    let (upstream, closed, open) = closed_and_open(&server, timeout).await;
    assert_eq!(
        send(&closed, post("/pay", Some("before"), None, "1"))
            .await
            .status,
        StatusCode::CREATED
    );

    server.kill_9();
    for attempt in 0..5 {
        let started = Instant::now();
        let res = send(&closed, post("/pay", Some("k"), None, "1")).await;
        let took = started.elapsed();
        assert_eq!(
            res.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}"
        );
        assert!(res.body.contains("store-unavailable"), "{}", res.body);
        assert!(
            took < timeout + Duration::from_millis(100),
            "attempt {attempt} took {took:?}"
        );
    }
    assert_eq!(upstream.calls(), 1, "closed: nothing ran uncoordinated");
    for _ in 0..2 {
        let res = send(&open, post("/pay", Some("k"), None, "1")).await;
        assert_eq!(res.status, StatusCode::CREATED);
        assert!(!res.replayed);
    }
    assert_eq!(upstream.calls(), 3, "open: passed through, uncoordinated");

    // Redis returns (empty): the same store coordinates again, without a rebuild.
    server.start_again();
    coordinated_again(&closed, "after").await;
}

#[tokio::test]
async fn an_expired_holder_is_fenced_and_its_successor_has_a_higher_token() {
    let redis = Redis::start();
    let (a, b, c) = (redis.instance(), redis.instance(), redis.instance());
    let lease = Duration::from_millis(200);
    let old = claimed(&a, "k", lease).await;
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let new = claimed(&b, "k", LONG).await;
    assert!(new > old, "{new} > {old}");
    assert!(!a.renew(&key("k"), old, LONG).await.unwrap());
    let late = a
        .complete(&key("k"), old, &fp("x"), response("stale"), LONG)
        .await
        .unwrap();
    assert_eq!(late, Completion::Fenced);
    a.release(&key("k"), old).await.unwrap();
    assert!(matches!(
        c.claim(&key("k"), &fp("x"), LONG).await.unwrap(),
        ClaimOutcome::InFlight { holder, .. } if holder == new
    ));
    let done = b
        .complete(&key("k"), new, &fp("x"), response("fresh"), LONG)
        .await
        .unwrap();
    assert_eq!(done, Completion::Stored);
    assert!(matches!(
        c.claim(&key("k"), &fp("x"), LONG).await.unwrap(),
        ClaimOutcome::Completed(res) if res.body == "fresh"
    ));
}

#[tokio::test]
async fn tokens_keep_increasing_after_the_counter_expired() {
    let redis = Redis::start();
    let store = redis.store();
    let first = claimed(&store, "k", LONG).await;
    store.release(&key("k"), first).await.unwrap();
    let mut conn = redis.server.connection().await;
    let counters: Vec<String> = redis::cmd("KEYS")
        .arg("keyward:idem:payments:*:n")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counters.len(), 1);
    let () = redis::cmd("DEL")
        .arg(&counters)
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    let second = claimed(&store, "k", LONG).await;
    assert!(second > first, "{second} > {first}");
}

/// Holds `k` on `holder`, waits on `waiter`, releases after the waiter is asleep and
/// returns how long the wait took; the lease and the bound are long, so only the pub/sub
/// message can end it early.
async fn wait_woken_by_release(holder: &RedisStore, waiter: &RedisStore, k: &str) -> Duration {
    let token = claimed(holder, k, LONG).await;
    let wait = {
        let waiter = waiter.clone();
        let k = k.to_owned();
        tokio::spawn(async move {
            let started = Instant::now();
            waiter.wait_settled(&key(&k), token, LONG).await.unwrap();
            started.elapsed()
        })
    };
    // Let the waiter register and check the record (a loopback round trip).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(waiter.watched_records(), 1);
    holder.release(&key(k), token).await.unwrap();
    let waited = wait.await.unwrap();
    assert_eq!(waiter.watched_records(), 0);
    waited
}

/// Waits until `stores` all hold a live subscription (a hub wakes its waiters once when it
/// (re)subscribes, which would end a wait early).
async fn wait_subscribed(server: &RedisServer, stores: &[&RedisStore]) {
    let mut conn = server.connection().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, subscribers): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("{}settled", stores[0].prefix()))
            .query_async(&mut conn)
            .await
            .map(|mut v: Vec<(String, u64)>| v.remove(0))
            .unwrap();
        if subscribers == stores.len() as u64 && stores.iter().all(|s| s.is_subscribed()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "hub did not subscribe within 5 s: {subscribers} subscribers, {:?}",
            stores.iter().map(|s| s.is_subscribed()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_wakes_waiters_and_resubscribes_after_losing_its_connection() {
    let mut redis = Redis::start();
    // Exactly two stores (two hubs) on this server.
    let (holder, waiter) = (redis.store(), redis.instance());
    wait_subscribed(&redis.server, &[&holder, &waiter]).await;
    let waited = wait_woken_by_release(&holder, &waiter, "a").await;
    assert!(waited < Duration::from_secs(1), "woken after {waited:?}");

    // The server drops the subscriber connection.
    let mut conn = redis.server.connection().await;
    let _killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    wait_subscribed(&redis.server, &[&holder, &waiter]).await;
    let waited = wait_woken_by_release(&holder, &waiter, "b").await;
    assert!(waited < Duration::from_secs(1), "woken after {waited:?}");

    // Redis itself restarts.
    redis.server.restart();
    wait_subscribed(&redis.server, &[&holder, &waiter]).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while holder.ping().await.is_err() || waiter.ping().await.is_err() {
        assert!(Instant::now() < deadline, "store did not reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = wait_woken_by_release(&holder, &waiter, "c").await;
    assert!(waited < Duration::from_secs(1), "woken after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_detached_outside_any_runtime_still_releases() {
    let redis = Redis::start();
    let (holder, other) = (redis.instance(), redis.instance());
    let token = claimed(&holder, "k", LONG).await;
    let detached = holder.clone();
    std::thread::spawn(move || detached.release_detached(key("k"), token))
        .join()
        .unwrap();
    other.wait_settled(&key("k"), token, LONG).await.unwrap();
    assert!(matches!(
        other.claim(&key("k"), &fp("x"), LONG).await.unwrap(),
        ClaimOutcome::Claimed(next) if next > token
    ));
}

#[tokio::test]
async fn raw_keys_and_principals_never_reach_redis() {
    let redis = Redis::start();
    let upstream = Upstream::new(StatusCode::CREATED);
    let svc = service(layer(&redis.store()), &upstream);
    let res = send(
        &svc,
        post(
            "/pay",
            Some("order-secret-42"),
            Some("Bearer tok-alice"),
            "1",
        ),
    )
    .await;
    assert_eq!(res.status, StatusCode::CREATED);
    let mut conn = redis.server.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "record and fencing counter: {keys:?}");
    for name in &keys {
        assert!(name.starts_with("keyward:idem:payments:{"), "{name}");
        assert!(!name.contains("order-secret-42") && !name.contains("tok-alice"));
    }
    let record = keys.iter().find(|k| !k.ends_with(":n")).unwrap();
    let fields: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(record)
        .query_async(&mut conn)
        .await
        .unwrap();
    for (_, value) in &fields {
        let text = String::from_utf8_lossy(value);
        assert!(!text.contains("order-secret-42") && !text.contains("tok-alice"));
    }
}

#[tokio::test]
async fn two_prefixes_on_one_redis_do_not_see_each_other() {
    let redis = Redis::start();
    let a = Redis::store_on(&redis.server, "app-a:");
    let b = Redis::store_on(&redis.server, "app-b:");
    let token = claimed(&a, "k", LONG).await;
    assert!(matches!(
        b.claim(&key("k"), &fp("other"), LONG).await.unwrap(),
        ClaimOutcome::Claimed(_)
    ));
    assert!(matches!(
        a.claim(&key("k"), &fp("x"), LONG).await.unwrap(),
        ClaimOutcome::InFlight { holder, .. } if holder == token
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_instances_coordinate_and_a_keys_records_share_one_slot() {
    let backend = keyward_tests::RedisClusterBackend::start();
    let stores: Vec<RedisStore> = (0..3).map(|_| backend.instance()).collect();
    let upstream = Upstream::held(StatusCode::CREATED);
    let instances: Vec<Svc> = stores
        .iter()
        .map(|store| service(layer(store).on_in_flight(OnInFlight::Wait(LONG)), &upstream))
        .collect();
    // Keys spread over every node; duplicates of each go through all three instances.
    let keys: Vec<String> = (0..8).map(|i| format!("order-{i}")).collect();
    let tasks: Vec<_> = (0..48)
        .map(|i| {
            let svc = instances[i % 3].clone();
            let k = keys[i % keys.len()].clone();
            tokio::spawn(async move { send(&svc, post("/pay", Some(&k), None, "1")).await })
        })
        .collect();
    upstream.entered(keys.len() as u32).await;
    upstream.open();
    for task in tasks {
        assert_eq!(task.await.unwrap().status, StatusCode::CREATED);
    }
    assert_eq!(upstream.calls(), keys.len(), "each key executed once");

    // Every record of a key lives in one slot, and the keys used several nodes.
    let mut slots = std::collections::HashSet::new();
    let mut owners = std::collections::HashSet::new();
    for node in backend.cluster.nodes() {
        let mut conn = node.connection().await;
        let names: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", backend.store().prefix()))
            .query_async(&mut conn)
            .await
            .unwrap();
        for name in names {
            let slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap();
            let record = name.strip_suffix(":n").unwrap_or(&name).to_owned();
            let record_slot: i64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(&record)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(slot, record_slot, "{name}");
            slots.insert(slot);
            owners.insert(node.port());
        }
    }
    assert_eq!(slots.len(), keys.len());
    assert!(owners.len() > 1, "keys spread over the nodes");
}

#[tokio::test]
async fn auth_in_the_url_is_used_and_a_wrong_password_is_a_store_error() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = |password: &str| format!("redis://:{password}@127.0.0.1:{}", server.port());
    let store = RedisStore::builder().url(url("s3cret")).build().unwrap();
    store.ping().await.unwrap();
    let token = claimed(&store, "k", LONG).await;
    assert!(token.get() > 0);
    let wrong = RedisStore::builder()
        .url(url("wrong"))
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let error = wrong.claim(&key("k"), &fp("x"), LONG).await.unwrap_err();
    assert!(
        !error.to_string().contains("wrong"),
        "password echoed: {error}"
    );
    // Debug output of the store and builder never shows the URL either.
    let debug = format!("{:?} {:?}", store, RedisStore::builder().url(url("s3cret")));
    assert!(!debug.contains("s3cret"), "{debug}");
}

#[tokio::test]
async fn rediss_urls_talk_tls() {
    let server = RedisServer::start_tls();
    // Self-signed test certificate: `#insecure` skips verification (tests only).
    let url = format!("rediss://127.0.0.1:{}/#insecure", server.port());
    let store = RedisStore::builder()
        .url(url)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    store.ping().await.unwrap();
    let token = claimed(&store, "k", LONG).await;
    assert!(matches!(
        store.claim(&key("k"), &fp("x"), LONG).await.unwrap(),
        ClaimOutcome::InFlight { holder, .. } if holder == token
    ));
    // The hub subscribes over TLS as well: a waiter is woken by the release.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !store.is_subscribed() {
        assert!(Instant::now() < deadline, "hub did not subscribe over TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = wait_woken_by_release(&store, &store.clone(), "tls").await;
    assert!(waited < Duration::from_secs(1), "woken after {waited:?}");
}

#[tokio::test]
async fn a_frozen_redis_times_out_into_503_and_is_used_again_when_it_thaws() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(50);
    let (upstream, closed, open) = closed_and_open(&server, timeout).await;

    server.pause();
    let started = Instant::now();
    let res = send(&closed, post("/pay", Some("k"), None, "1")).await;
    let took = started.elapsed();
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        took >= timeout && took < timeout + Duration::from_millis(100),
        "took {took:?}"
    );
    assert_eq!(upstream.calls(), 0);
    let res = send(&open, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(res.status, StatusCode::CREATED);
    assert_eq!(upstream.calls(), 1, "open: passed through");

    server.resume();
    coordinated_again(&closed, "thawed").await;
    // The claims that timed out ran when Redis thawed, and were undone right after: the
    // key is free, not stuck in flight for a lease.
    let retry = send(&closed, post("/pay", Some("k"), None, "1")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    assert!(!retry.replayed);
}

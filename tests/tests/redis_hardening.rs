//! RedisStore under the failures issue 13 names: fencing counters that come back older
//! than a token already issued, a single-flight lead whose reply was lost, and the
//! eviction policy check.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use keyward::RedisStore;
use keyward::core::store::{
    AcquireOutcome, ClaimOutcome, FlightRole, IdempotencyStore, SerialLimits, SerialStore,
    SingleFlightStore, StoreError,
};
use keyward::core::{FencingToken, Key, Scope, ScopedKey};
use keyward_tests::redis_kit::RedisServer;
use keyward_tests::{Backend, Redis};
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(10);

fn key(layer: &str, raw: &str) -> ScopedKey {
    ScopedKey::new(layer, "r", Scope::Unscoped, Key::from(raw))
}

/// Sets every fencing counter of `pattern` back to `value`: what Redis holds after an
/// AOF `everysec` crash or a failover to a replica that had not copied the last INCRs.
async fn set_counters_back(server: &RedisServer, pattern: &str, value: u64) {
    let mut conn = server.connection().await;
    let counters: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counters.len(), 1, "{pattern}: {counters:?}");
    let () = redis::cmd("SET")
        .arg(&counters[0])
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
}

async fn claim(store: &RedisStore, raw: &str) -> FencingToken {
    let fp = keyward::core::store::Fingerprint::builder()
        .part(b"x")
        .finish();
    match store.claim(&key("idem", raw), &fp, LONG).await.unwrap() {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("expected a claim, got {other:?}"),
    }
}

#[tokio::test]
async fn an_idempotency_token_is_higher_than_every_earlier_one_after_the_counter_went_back() {
    let redis = Redis::start();
    let store = redis.store();
    let first = claim(&store, "k").await;
    IdempotencyStore::release(&store, &key("idem", "k"), first)
        .await
        .unwrap();
    // Older than the token issued: INCR alone would hand out `first` again.
    set_counters_back(&redis.server, "keyward:idem:r:*:n", first.get() - 1).await;
    let second = claim(&store, "k").await;
    assert!(second > first, "{second:?} > {first:?}");
}

#[tokio::test]
async fn a_serial_token_is_higher_than_every_earlier_one_after_the_counter_went_back() {
    let redis = Redis::start();
    let store = redis.store();
    let limits = SerialLimits {
        max_wait: Duration::from_secs(1),
        max_queue: 8,
        permits: 1,
    };
    let AcquireOutcome::Acquired(first) = store.acquire(&key("serial", "k"), limits).await.unwrap()
    else {
        panic!("free key not acquired");
    };
    let first_token = first.token();
    SerialStore::release(&store, first).await.unwrap();
    set_counters_back(&redis.server, "keyward:serial:r:*:n", 1).await;
    let AcquireOutcome::Acquired(second) =
        store.acquire(&key("serial", "k"), limits).await.unwrap()
    else {
        panic!("free key not acquired");
    };
    assert!(
        second.token() > first_token,
        "{:?} > {first_token:?}",
        second.token()
    );
    SerialStore::release(&store, second).await.unwrap();
}

#[tokio::test]
async fn a_flight_token_is_higher_than_every_earlier_one_after_the_counter_went_back() {
    let redis = Redis::start();
    let store = redis.store();
    let FlightRole::Leader(first) = store.lead(&key("flight", "k"), LONG).await.unwrap() else {
        panic!("no leader");
    };
    store
        .publish(
            &key("flight", "k"),
            first,
            keyward::core::store::Landing::Failed,
        )
        .await
        .unwrap();
    set_counters_back(&redis.server, "keyward:flight:r:*:n", first.get() - 1).await;
    let FlightRole::Leader(second) = store.lead(&key("flight", "k"), LONG).await.unwrap() else {
        panic!("no leader");
    };
    assert!(second > first, "{second:?} > {first:?}");
}

#[tokio::test]
async fn a_lead_that_timed_out_but_ran_leaves_no_flight_behind() {
    let server = RedisServer::start();
    let store = keyward_tests::store_with_timeout(&server, Duration::from_millis(100));
    let other = keyward_tests::store_with_timeout(&server, Duration::from_millis(500));
    store.ping().await.unwrap();
    other.ping().await.unwrap();

    // The lead reaches a frozen Redis: the caller times out, Redis runs it on waking.
    server.pause();
    let led = store.lead(&key("flight", "k"), LONG).await;
    assert!(matches!(led, Err(StoreError::Timeout(_))), "{led:?}");
    server.resume();

    // Undone right behind it: another instance leads at once, instead of following a
    // flight nobody flies for the whole 10 s lease.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match other.lead(&key("flight", "k"), LONG).await.unwrap() {
            FlightRole::Leader(_) => break,
            FlightRole::Follower => {
                assert!(
                    Instant::now() < deadline,
                    "the timed-out lead still holds the flight"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn the_eviction_policy_is_read_from_redis() {
    let safe = RedisServer::start();
    let store = keyward_tests::store_with_timeout(&safe, Duration::from_millis(500));
    assert_eq!(store.maxmemory_policies().await.unwrap(), ["noeviction"]);

    let evicting = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let store = keyward_tests::store_with_timeout(&evicting, Duration::from_millis(500));
    assert_eq!(store.maxmemory_policies().await.unwrap(), ["allkeys-lru"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_eviction_policy_of_a_cluster_covers_its_nodes() {
    let backend = keyward_tests::RedisClusterBackend::start();
    assert_eq!(
        backend.store().maxmemory_policies().await.unwrap(),
        ["noeviction"]
    );
}

/// A failover to a replica that had not copied a claim (nor its counter increment) leaves
/// the holder without a record. Nobody claimed since (every later claim gets a higher
/// token), so its completion is stored instead of fenced, and retries replay it.
#[tokio::test]
async fn a_completion_whose_claim_was_lost_in_a_failover_is_stored() {
    let redis = Redis::start();
    let store = redis.store();
    let fp = keyward::core::store::Fingerprint::builder()
        .part(b"x")
        .finish();
    let token = claim(&store, "k").await;
    // What the promoted replica holds: no claim, the counter of before it.
    let mut conn = redis.server.connection().await;
    let records: Vec<String> = redis::cmd("KEYS")
        .arg("keyward:idem:r:*}")
        .query_async(&mut conn)
        .await
        .unwrap();
    let () = redis::cmd("DEL")
        .arg(&records)
        .query_async(&mut conn)
        .await
        .unwrap();
    set_counters_back(&redis.server, "keyward:idem:r:*:n", token.get() - 1).await;

    let response = keyward::core::store::StoredResponse {
        status: http::StatusCode::CREATED,
        headers: Default::default(),
        body: "done".into(),
        trailers: None,
    };
    let stored = store
        .complete(&key("idem", "k"), token, &fp, response, LONG)
        .await
        .unwrap();
    assert_eq!(stored, keyward::core::store::Completion::Stored);
    assert!(matches!(
        store.claim(&key("idem", "k"), &fp, LONG).await.unwrap(),
        ClaimOutcome::Completed(res) if res.body == "done"
    ));
}

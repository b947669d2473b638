//! The idempotency scripts of issue 14 (fewer commands per claim) against the ones they
//! replace, on one Redis: during a rolling upgrade old and new instances share records and
//! fencing counters, so each must read what the other wrote, a key held or completed by
//! one is never claimed again by the other, and tokens keep growing across both. The old
//! scripts are kept verbatim in `tests/fixtures/redis_scripts_v1/`. Also the fencing
//! counter's two paths of `fencing_set.lua` and its lifetime.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use http::StatusCode;
use keyward::RedisStore;
use keyward::core::store::{
    ClaimOutcome, Completion, Fingerprint, IdempotencyStore, StoredResponse,
};
use keyward::core::{FencingToken, Key, Scope, ScopedKey};
use keyward_tests::redis_kit::RedisServer;
use keyward_tests::{Backend, Redis};
use redis::{Script, Value};

const LEASE: Duration = Duration::from_secs(10);
/// `COUNTER_LIFETIME` of `idempotency.rs`, in ms.
const COUNTER_LIFETIME_MS: i64 = 24 * 60 * 60 * 1000;

static OLD_CLAIM: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(concat!(
        "#!lua\n",
        include_str!("../fixtures/redis_scripts_v1/fencing.lua"),
        include_str!("../fixtures/redis_scripts_v1/idempotency/claim.lua")
    ))
});
static OLD_COMPLETE: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(concat!(
        "#!lua\n",
        include_str!("../fixtures/redis_scripts_v1/idempotency/complete.lua")
    ))
});

fn key(raw: &str) -> ScopedKey {
    ScopedKey::new("idem", "r", Scope::Unscoped, Key::from(raw))
}

fn fp(body: &str) -> Fingerprint {
    Fingerprint::builder().part(body.as_bytes()).finish()
}

fn response(body: &'static str) -> StoredResponse {
    StoredResponse {
        status: StatusCode::CREATED,
        headers: Default::default(),
        body: body.into(),
        trailers: None,
    }
}

async fn claimed(store: &RedisStore, raw: &str) -> FencingToken {
    match store.claim(&key(raw), &fp("x"), LEASE).await.unwrap() {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("expected a claim, got {other:?}"),
    }
}

/// The record and counter names of `raw`, found through a claim (released again) of the
/// new store: names are the same for both versions.
async fn names(redis: &Redis, raw: &str) -> (String, String) {
    let store = redis.store();
    let token = claimed(&store, raw).await;
    store.release(&key(raw), token).await.unwrap();
    let mut conn = redis.server.connection().await;
    let counters: Vec<String> = redis::cmd("KEYS")
        .arg("keyward:idem:r:*:n")
        .query_async(&mut conn)
        .await
        .unwrap();
    // One counter per key claimed so far: the newest is ours.
    let counter = newest(&redis.server, counters).await;
    let record = counter.strip_suffix(":n").unwrap().to_owned();
    (record, counter)
}

/// The counter holding the highest token.
async fn newest(server: &RedisServer, counters: Vec<String>) -> String {
    let mut conn = server.connection().await;
    let mut best = (0u64, String::new());
    for counter in counters {
        let n: u64 = redis::cmd("GET")
            .arg(&counter)
            .query_async(&mut conn)
            .await
            .unwrap();
        if n > best.0 {
            best = (n, counter);
        }
    }
    best.1
}

/// The old claim script on `record`: its raw reply.
async fn old_claim(server: &RedisServer, (record, counter): &(String, String)) -> Vec<Value> {
    let mut conn = server.connection().await;
    let reply: Value = OLD_CLAIM
        .key(record)
        .key(counter)
        .arg(&fp("x").0[..])
        .arg(LEASE.as_millis().to_string())
        .arg(COUNTER_LIFETIME_MS.to_string())
        .arg(&[7u8; 16][..])
        .invoke_async(&mut conn)
        .await
        .unwrap();
    match reply {
        Value::Array(items) => items,
        other => panic!("old claim reply {other:?}"),
    }
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        Value::BulkString(text) => std::str::from_utf8(text).unwrap().parse().unwrap(),
        other => panic!("not an integer: {other:?}"),
    }
}

#[tokio::test]
async fn a_key_held_or_completed_by_one_version_is_not_claimed_by_the_other() {
    let redis = Redis::start();
    let store = redis.store();

    // New claims, the old script looks: in flight, with the new holder's token.
    let a = names(&redis, "a").await;
    let token = claimed(&store, "a").await;
    let seen = old_claim(&redis.server, &a).await;
    assert_eq!(int(&seen[0]), 1, "in flight: {seen:?}");
    assert_eq!(int(&seen[1]), token.get() as i64);

    // The new store completes; the old script replays the same bytes.
    let done = store
        .complete(&key("a"), token, &fp("x"), response("from new"), LEASE)
        .await
        .unwrap();
    assert_eq!(done, Completion::Stored);
    let seen = old_claim(&redis.server, &a).await;
    assert_eq!(int(&seen[0]), 2, "completed: {seen:?}");
    let stored = match &seen[1] {
        Value::BulkString(bytes) => bytes.clone(),
        other => panic!("{other:?}"),
    };
    assert!(stored.ends_with(b"from new"));

    // The old script claims; the new store sees it in flight, with that token.
    let b = names(&redis, "b").await;
    let seen = old_claim(&redis.server, &b).await;
    assert_eq!(int(&seen[0]), 0, "claimed by the old script: {seen:?}");
    let old_token = int(&seen[1]);
    match store.claim(&key("b"), &fp("x"), LEASE).await.unwrap() {
        ClaimOutcome::InFlight { holder, .. } => assert_eq!(holder.get() as i64, old_token),
        other => panic!("expected in flight, got {other:?}"),
    }

    // The old script completes it (with a response in the shared binary form); the new
    // store replays it.
    let mut conn = redis.server.connection().await;
    let stored_by_old: i64 = OLD_COMPLETE
        .key(&b.0)
        .key(&b.1)
        .arg(old_token.to_string())
        .arg(&fp("x").0[..])
        .arg(&stored[..])
        .arg(LEASE.as_millis().to_string())
        .arg("keyward:settled")
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored_by_old, 1);
    match store.claim(&key("b"), &fp("x"), LEASE).await.unwrap() {
        ClaimOutcome::Completed(res) => assert_eq!(res.body, "from new"),
        other => panic!("expected a replay, got {other:?}"),
    }
    // And a different request under that key is refused by both.
    assert!(matches!(
        store.claim(&key("b"), &fp("other"), LEASE).await.unwrap(),
        ClaimOutcome::Mismatch
    ));
}

#[tokio::test]
async fn tokens_keep_growing_across_both_versions() {
    let redis = Redis::start();
    let store = redis.store();
    let k = names(&redis, "k").await;
    let mut last = 0i64;
    for round in 0..3 {
        let seen = old_claim(&redis.server, &k).await;
        assert_eq!(int(&seen[0]), 0, "round {round}: {seen:?}");
        let old = int(&seen[1]);
        assert!(old > last, "old {old} > {last}");
        let mut conn = redis.server.connection().await;
        let () = redis::cmd("DEL")
            .arg(&k.0)
            .query_async(&mut conn)
            .await
            .unwrap();
        let new = claimed(&store, "k").await;
        assert!(new.get() as i64 > old, "new {new} > old {old}");
        store.release(&key("k"), new).await.unwrap();
        last = new.get() as i64;
    }
}

#[tokio::test]
async fn a_counter_ahead_of_the_clock_is_incremented_like_incr() {
    let redis = Redis::start();
    let store = redis.store();
    let (_, counter) = names(&redis, "k").await;
    // Far ahead of Redis's clock in microseconds (a day): the floor does not apply, the
    // token is the counter plus one, as INCR gives.
    let mut conn = redis.server.connection().await;
    let now: u64 = redis::cmd("GET")
        .arg(&counter)
        .query_async(&mut conn)
        .await
        .unwrap();
    let ahead = now + 86_400_000_000;
    let () = redis::cmd("SET")
        .arg(&counter)
        .arg(ahead)
        .query_async(&mut conn)
        .await
        .unwrap();
    let first = claimed(&store, "k").await;
    assert_eq!(first.get(), ahead + 1);
    store.release(&key("k"), first).await.unwrap();
    let second = claimed(&store, "k").await;
    assert_eq!(second.get(), ahead + 2);
    let stored: u64 = redis::cmd("GET")
        .arg(&counter)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, ahead + 2, "the counter holds the last token");

    // A counter that is not a number counts as lost: the floor, not an error forever.
    store.release(&key("k"), second).await.unwrap();
    let () = redis::cmd("SET")
        .arg(&counter)
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .unwrap();
    let third = claimed(&store, "k").await;
    assert!(third.get() > now, "{third} from the clock");
}

#[tokio::test]
async fn the_counter_lives_a_day_past_a_claim_and_as_long_as_a_completed_record() {
    let redis = Redis::start();
    let store = redis.store();
    let (record, counter) = names(&redis, "k").await;
    let mut conn = redis.server.connection().await;
    let reader = conn.clone();
    let pttl = |name: String| {
        let mut conn = reader.clone();
        async move {
            let ms: i64 = redis::cmd("PTTL")
                .arg(&name)
                .query_async(&mut conn)
                .await
                .unwrap();
            ms
        }
    };
    let token = claimed(&store, "k").await;
    let after_claim = pttl(counter.clone()).await;
    assert!(
        after_claim > COUNTER_LIFETIME_MS - 5_000 && after_claim <= COUNTER_LIFETIME_MS,
        "{after_claim}"
    );
    // A completed record kept two days: the counter is lengthened to match it...
    let two_days = Duration::from_secs(2 * 24 * 60 * 60);
    let done = store
        .complete(&key("k"), token, &fp("x"), response("ok"), two_days)
        .await
        .unwrap();
    assert_eq!(done, Completion::Stored);
    let record_left = pttl(record.clone()).await;
    let counter_left = pttl(counter.clone()).await;
    assert!(
        counter_left >= record_left - 1_000,
        "{counter_left} ≥ {record_left}"
    );
    assert!(counter_left > COUNTER_LIFETIME_MS, "{counter_left}");
    // ...and never shortened by a later renewal of a (new) holder.
    let () = redis::cmd("DEL")
        .arg(&record)
        .query_async(&mut conn)
        .await
        .unwrap();
    let holder = claimed(&store, "k").await;
    assert!(store.renew(&key("k"), holder, LEASE).await.unwrap());
    let () = redis::cmd("PEXPIRE")
        .arg(&counter)
        .arg(3 * COUNTER_LIFETIME_MS)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(store.renew(&key("k"), holder, LEASE).await.unwrap());
    assert!(pttl(counter).await > 2 * COUNTER_LIFETIME_MS);
}

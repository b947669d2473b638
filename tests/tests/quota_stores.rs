//! `QuotaStore` on every backend: the GCRA behaviour through the store trait (memory on
//! paused time, Redis and Redis Cluster in real time with short periods), then what only
//! Redis has to show: one round trip per decision, exactly `Quota::decide`'s answers,
//! idle keys expiring, a dead Redis answering a store error within the timeout.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keyward::core::gcra::{Quota, QuotaDecision};
use keyward::core::store::QuotaStore;
use keyward::core::{Key, Scope, ScopedKey};
use keyward::quota::ResponseCost;
use keyward::{KeySpec, QuotaLayer};
use keyward_tests::redis_kit::{CommandStats, RedisServer, command_delta};
use keyward_tests::{Backend, Redis, assert_one_script, fails_within, store_with_timeout};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

fn key(raw: &str) -> ScopedKey {
    ScopedKey::new("quota", "r", Scope::Unscoped, Key::from(raw))
}

async fn check<St: QuotaStore>(store: &St, k: &str, quota: &Quota, cost: u32) -> QuotaDecision {
    store.check(&key(k), quota, cost).await.unwrap()
}

/// `actual` is `expected`, or on real time up to `slack` less (time passed meanwhile).
fn about(actual: Duration, expected: Duration, slack: Duration) {
    assert!(
        actual <= expected && actual + slack >= expected,
        "{actual:?} is not within {slack:?} below {expected:?}"
    );
}

async fn burst_then_one_per_interval<B: Backend>(b: B) {
    let store = b.store();
    let unit = b.unit();
    // 5 per 5 units: one unit of time per request, 5 at once.
    let quota = Quota::new(5, unit * 5).unwrap();
    for k in 0..5u32 {
        let decision = check(&store, "a", &quota, 1).await;
        assert!(decision.is_allowed(), "request {k}");
        assert_eq!(decision.remaining, 4 - k);
        about(decision.reset_after, unit * (k + 1), b.slack());
    }
    let refused = check(&store, "a", &quota, 1).await;
    assert!(!refused.is_allowed());
    assert_eq!(refused.remaining, 0);
    let retry = refused.retry_after().unwrap();
    about(retry, unit, b.slack());
    about(refused.reset_after, unit * 5, b.slack());
    // Another key has its own bucket.
    assert_eq!(check(&store, "b", &quota, 1).await.remaining, 4);

    // Exactly when Retry-After says, exactly one more; then refused again.
    tokio::time::sleep(retry).await;
    let again = check(&store, "a", &quota, 1).await;
    assert!(again.is_allowed());
    assert_eq!(again.remaining, 0);
    assert!(!check(&store, "a", &quota, 1).await.is_allowed());
}

async fn costs_take_several_units_and_refusals_take_nothing<B: Backend>(b: B) {
    let store = b.store();
    let quota = Quota::new(10, b.unit() * 10).unwrap();
    assert_eq!(check(&store, "a", &quota, 4).await.remaining, 6);
    let refused = check(&store, "a", &quota, 7).await;
    assert!(!refused.is_allowed());
    assert_eq!(refused.remaining, 6, "the refusal took nothing");
    about(refused.retry_after().unwrap(), b.unit(), b.slack());
    // Zero cost reports without taking.
    let report = check(&store, "a", &quota, 0).await;
    assert!(report.is_allowed());
    assert_eq!(report.remaining, 6);
    let last = check(&store, "a", &quota, 6).await;
    assert!(last.is_allowed());
    assert_eq!(last.remaining, 0);
    // More than the burst: never allowed, no retry time.
    let never = check(&store, "fresh", &quota, 11).await;
    assert!(!never.is_allowed());
    assert_eq!(never.retry_after(), None);
    assert_eq!(never.remaining, 10);
}

async fn instances_share_one_quota<B: Backend>(b: B) {
    // A long period: nothing is earned back while the test runs, so exactly the burst is
    // allowed across all instances.
    let quota = Quota::new(20, Duration::from_secs(3600)).unwrap();
    let instances: Vec<B::Store> = (0..3).map(|_| b.instance()).collect();
    let start = Arc::new(tokio::sync::Barrier::new(instances.len()));
    let tasks: Vec<_> = instances
        .into_iter()
        .map(|store| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut allowed = 0;
                for _ in 0..15 {
                    allowed += usize::from(check(&store, "shared", &quota, 1).await.is_allowed());
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    assert_eq!(allowed, 20);
}

async fn quota_layer_over_two_instances<B: Backend>(b: B) {
    let quota = Quota::new(3, Duration::from_secs(3600)).unwrap();
    let inner = tower::service_fn(|_req: http::Request<String>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
    });
    let layer = |store: B::Store| {
        QuotaLayer::new(store, quota)
            .route("api")
            .key(KeySpec::parse("header:x-api-key").unwrap())
    };
    let one = layer(b.instance()).layer(inner);
    let two = layer(b.instance()).layer(inner);
    let req = || {
        http::Request::get("/")
            .header("x-api-key", "k")
            .body(String::new())
            .unwrap()
    };
    let mut statuses = Vec::new();
    for i in 0..5 {
        let svc = if i % 2 == 0 { one.clone() } else { two.clone() };
        let res = svc.oneshot(req()).await.unwrap();
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
}

async fn peeks_take_nothing_and_charges_go_into_debt<B: Backend>(b: B) {
    let store = b.store();
    let unit = b.unit();
    // 10 per 10 units: one back per unit.
    let quota = Quota::new(10, unit * 10).unwrap();
    for _ in 0..3 {
        let peeked = store.peek(&key("a"), &quota, 1).await.unwrap();
        assert!(peeked.is_allowed());
        assert_eq!(peeked.remaining, 9, "a peek takes nothing");
    }
    let charged = store.charge(&key("a"), &quota, 4).await.unwrap();
    assert_eq!(charged.remaining, 6);
    let charged = store.charge(&key("a"), &quota, 21).await.unwrap();
    assert_eq!(charged.remaining, 0);
    about(charged.reset_after, unit * 25, b.slack());
    // 15 units in debt: one unit is back after 16.
    let waiting = store.peek(&key("a"), &quota, 1).await.unwrap();
    assert!(!waiting.is_allowed());
    let retry = waiting.retry_after().unwrap();
    about(retry, unit * 16, b.slack());
    // A check refuses too, and takes nothing.
    assert!(!check(&store, "a", &quota, 1).await.is_allowed());
    tokio::time::sleep(retry).await;
    assert!(store.peek(&key("a"), &quota, 1).await.unwrap().is_allowed());
    assert!(check(&store, "a", &quota, 1).await.is_allowed());
    assert!(!check(&store, "a", &quota, 1).await.is_allowed());
}

/// Waits (bounded: 2 s) until `key` has at most `units` left: a charge made by a response
/// body lands in the background on Redis.
async fn until_left<St: QuotaStore>(store: &St, k: &str, quota: &Quota, units: u32) {
    for _ in 0..200 {
        if store.peek(&key(k), quota, 0).await.unwrap().remaining <= units {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{k} still has more than {units} left after 2 s");
}

async fn priced_layer_over_two_instances<B: Backend>(b: B) {
    // A long period: nothing is earned back while the test runs.
    let quota = Quota::new(100, Duration::from_secs(3600)).unwrap();
    let inner = tower::service_fn(|req: http::Request<String>| async move {
        let mut res = http::Response::new(String::from("ok"));
        res.headers_mut()
            .insert("x-tokens-used", req.headers()["x-tokens"].clone());
        Ok::<_, std::convert::Infallible>(res)
    });
    let layer = |store: B::Store| {
        QuotaLayer::new(store, quota)
            .route("r")
            .key(KeySpec::parse("header:x-api-key").unwrap())
            .charge_after(ResponseCost::header("x-tokens-used"))
    };
    let one = layer(b.instance()).layer(inner);
    let two = layer(b.instance()).layer(inner);
    let req = |tokens: u32| {
        http::Request::get("/")
            .header("x-api-key", "k")
            .header("x-tokens", tokens.to_string())
            .body(String::new())
            .unwrap()
    };
    use http_body_util::BodyExt;
    let res = one.clone().oneshot(req(70)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    until_left(&b.store(), "k", &quota, 30).await;
    // The other instance sees the charge; 50 more puts the key 20 in debt.
    let res = two.clone().oneshot(req(50)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap();
    for _ in 0..200 {
        if !b
            .store()
            .peek(&key("k"), &quota, 0)
            .await
            .unwrap()
            .is_allowed()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = one.clone().oneshot(req(1)).await.unwrap();
    assert_eq!(refused.status(), 429);
    // 21 units of 36 s each: 756 s.
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((755..=756).contains(&retry), "{retry}");
}

async fn peek_reports_what_is_left_and_takes_nothing<B: Backend>(b: B) {
    let quota = Quota::new(3, Duration::from_secs(3600)).unwrap();
    let big = Quota::new(100, Duration::from_secs(3600)).unwrap();
    let inner = tower::service_fn(|_req: http::Request<String>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
    });
    let layer = QuotaLayer::new(b.store(), quota)
        .route("api")
        .key(KeySpec::parse("header:x-api-key").unwrap())
        .override_key("big", big);
    let svc = layer.clone().layer(inner);
    let req = |k: &str| {
        http::Request::get("/")
            .header("x-api-key", k)
            .body(String::new())
            .unwrap()
    };
    let fresh = layer.peek(&req("k")).await.unwrap().unwrap();
    assert_eq!(fresh.decision.remaining, 3);
    assert_eq!(fresh.decision.reset_after, Duration::ZERO, "a full bucket");
    svc.clone().oneshot(req("k")).await.unwrap();
    for _ in 0..3 {
        let peek = layer.peek(&req("k")).await.unwrap().unwrap();
        assert_eq!(peek.decision.remaining, 2, "peeking takes nothing");
        assert!(peek.decision.reset_after > Duration::from_secs(1100));
    }
    let peek = layer.peek(&req("k")).await.unwrap().unwrap();
    assert_eq!((peek.key.layer(), peek.key.route()), ("quota", "api"));
    let statuses: Vec<u16> = {
        let mut out = Vec::new();
        for _ in 0..3 {
            out.push(
                svc.clone()
                    .oneshot(req("k"))
                    .await
                    .unwrap()
                    .status()
                    .as_u16(),
            );
        }
        out
    };
    assert_eq!(statuses, [200, 200, 429], "the peeks took nothing");
    let exhausted = layer.peek(&req("k")).await.unwrap().unwrap();
    assert_eq!(exhausted.decision.remaining, 0);
    let overridden = layer.peek(&req("big")).await.unwrap().unwrap();
    assert_eq!(
        (overridden.quota.limit(), overridden.decision.remaining),
        (100, 100)
    );
    let none = http::Request::get("/").body(String::new()).unwrap();
    assert!(layer.peek(&none).await.unwrap().is_none());
}

keyward_tests::backend_suite!(
    peek_reports_what_is_left_and_takes_nothing,
    burst_then_one_per_interval,
    costs_take_several_units_and_refusals_take_nothing,
    instances_share_one_quota,
    quota_layer_over_two_instances,
    peeks_take_nothing_and_charges_go_into_debt,
    priced_layer_over_two_instances,
);

// --- Redis only ---------------------------------------------------------------------------

#[tokio::test]
async fn every_quota_decision_is_one_evalsha() {
    let redis = Redis::start();
    let store = redis.store();
    store.ping().await.unwrap();
    let mut stats = CommandStats::connect(&redis.server).await;
    let quota = Quota::new(2, Duration::from_secs(60)).unwrap();
    for expected in [true, true, false] {
        let before = stats.snapshot().await;
        assert_eq!(check(&store, "k", &quota, 1).await.is_allowed(), expected);
        let delta = command_delta(&before, &stats.snapshot().await);
        assert_one_script(&delta, &["time", "get", "set"]);
    }
}

#[tokio::test]
async fn a_peek_and_a_charge_are_one_evalsha_each_and_a_peek_writes_nothing() {
    let redis = Redis::start();
    let store = redis.store();
    store.ping().await.unwrap();
    let mut stats = CommandStats::connect(&redis.server).await;
    let quota = Quota::new(2, Duration::from_secs(60)).unwrap();
    let before = stats.snapshot().await;
    assert!(store.peek(&key("k"), &quota, 1).await.unwrap().is_allowed());
    let delta = command_delta(&before, &stats.snapshot().await);
    assert_one_script(&delta, &["time", "get"]);
    for _ in 0..2 {
        let before = stats.snapshot().await;
        store.charge(&key("k"), &quota, 3).await.unwrap();
        let delta = command_delta(&before, &stats.snapshot().await);
        assert_one_script(&delta, &["time", "get", "set"]);
    }
}

#[tokio::test]
async fn the_charge_script_charges_exactly_like_quota_charge() {
    let redis = Redis::start();
    let store = redis.store();
    let quotas = [
        Quota::new(3, Duration::from_secs(1)).unwrap(),
        Quota::new(7, Duration::from_millis(700))
            .unwrap()
            .with_burst(2)
            .unwrap(),
        Quota::new(1, Duration::from_secs(100 * 365 * 86_400)).unwrap(),
    ];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut model: HashMap<(usize, u64), u64> = HashMap::new();
    let mut now: u64 = 1_764_000_000_987_654_321;
    for step in 0..400 {
        now += match rng.below(3) {
            0 => 0,
            1 => rng.below(1_000_000),
            _ => rng.below(5_000_000_000),
        };
        let q = rng.below(quotas.len() as u64) as usize;
        let k = rng.below(3);
        let quota = &quotas[q];
        let tat = model.get(&(q, k)).copied().unwrap_or(0);
        let name = key(&format!("c{q}-k{k}"));
        // Charges (into debt, up to the cap) mixed with checks that read the debt.
        if rng.below(3) == 0 {
            let cost = rng.below(4) as u32;
            let expected = quota.decide(tat, now, cost);
            if let Some(new_tat) = expected.new_tat {
                model.insert((q, k), new_tat);
            }
            let got = store
                .quota_check_at(&name, quota, cost, Duration::from_nanos(now))
                .await
                .unwrap();
            assert_eq!(got, expected.decision, "step {step}: check");
        } else {
            let cost = match rng.below(4) {
                0 => u32::MAX,
                _ => rng.below(20) as u32,
            };
            let expected = quota.charge(tat, now, cost);
            model.insert((q, k), expected.new_tat.unwrap());
            let got = store
                .quota_charge_at(&name, quota, cost, Duration::from_nanos(now))
                .await
                .unwrap();
            assert_eq!(got, expected.decision, "step {step}: charge {cost}");
        }
    }
}

/// xorshift64*: a fixed, reproducible sequence without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test]
async fn the_script_decides_exactly_like_quota_decide_at_nanosecond_precision() {
    let redis = Redis::start();
    let store = redis.store();
    let year = Duration::from_secs(365 * 86_400);
    // Tolerances from nanoseconds to a century (far beyond 2^53 ns), intervals that do
    // not divide evenly, costs around the burst.
    let quotas = [
        Quota::new(3, Duration::from_secs(1)).unwrap(),
        Quota::new(7, Duration::from_millis(700))
            .unwrap()
            .with_burst(2)
            .unwrap(),
        Quota::new(u32::MAX, Duration::from_nanos(3)).unwrap(),
        Quota::new(3, year).unwrap().with_burst(300).unwrap(),
        Quota::new(1000, Duration::from_nanos(999_999_999_999))
            .unwrap()
            .with_burst(5)
            .unwrap(),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut model: HashMap<(usize, u64), u64> = HashMap::new();
    // Today, in nanoseconds since the epoch: far above 2^53.
    let mut now: u64 = 1_764_000_000_123_456_789;
    for step in 0..600 {
        now += match rng.below(4) {
            0 => 0,
            1 => rng.below(1_000),
            2 => rng.below(2_000_000_000),
            _ => rng.below(year.as_nanos() as u64 / 12),
        };
        let q = rng.below(quotas.len() as u64) as usize;
        let k = rng.below(3);
        let quota = &quotas[q];
        let cost = match rng.below(5) {
            0 => 0,
            1 => quota.burst(),
            2 => quota.burst().saturating_add(1),
            _ => rng.below(4) as u32,
        };
        let tat = model.get(&(q, k)).copied().unwrap_or(0);
        let expected = quota.decide(tat, now, cost);
        if let Some(new_tat) = expected.new_tat {
            model.insert((q, k), new_tat);
        }
        let got = store
            .quota_check_at(
                &key(&format!("q{q}-k{k}")),
                quota,
                cost,
                Duration::from_nanos(now),
            )
            .await
            .unwrap();
        assert_eq!(got, expected.decision, "step {step}: quota {q}, key {k}");
    }
}

#[tokio::test]
async fn idle_keys_vanish_when_their_tat_passes() {
    let redis = Redis::start();
    let store = redis.store();
    let mut conn = redis.server.connection().await;
    let quota = Quota::new(2, Duration::from_millis(200)).unwrap();
    check(&store, "idle", &quota, 2).await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("keyward:quota:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].starts_with("keyward:quota:r:{"), "{keys:?}");
    let ttl: i64 = ::redis::cmd("PTTL")
        .arg(&keys[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=200).contains(&ttl), "{ttl}");
    // Zero cost and refusals write nothing.
    check(&store, "never-written", &quota, 0).await;
    check(&store, "never-written", &quota, 3).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let left: Vec<String> = ::redis::cmd("KEYS")
        .arg("keyward:quota:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    // And the bucket is full again.
    assert_eq!(check(&store, "idle", &quota, 1).await.remaining, 1);
}

#[tokio::test]
async fn redis_down_is_a_store_error_within_the_timeout() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(50);
    let store = store_with_timeout(&server, timeout);
    let quota = Quota::new(1, Duration::from_secs(60)).unwrap();
    assert!(check(&store, "k", &quota, 1).await.is_allowed());
    server.kill_9();
    fails_within(timeout, || store.check(&key("k"), &quota, 1)).await;
    // Redis is back (empty): decisions resume without a rebuild.
    server.start_again();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(decision) = store.check(&key("k"), &quota, 1).await {
            assert!(decision.is_allowed());
            break;
        }
        assert!(Instant::now() < deadline, "no recovery within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

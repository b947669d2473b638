//! Black-box tests of `QuotaLayer` on the memory store.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keyward::core::gcra::{Quota, QuotaDecision};
use keyward::core::problem::types;
use keyward::core::store::{QuotaStore, StoreError};
use keyward::core::{Key, Scope, ScopedKey};
use keyward::{KeySpec, MemoryStore, OnStoreError, QuotaLayer};
use tower::{Layer, Service, ServiceExt, service_fn};

type Body = Full<Bytes>;

fn quota(limit: u32, per_secs: u64) -> Quota {
    Quota::new(limit, Duration::from_secs(per_secs)).unwrap()
}

fn api_key() -> KeySpec {
    KeySpec::parse("header:x-api-key").unwrap()
}

/// An inner service that counts its calls.
fn counting(
    calls: Arc<AtomicUsize>,
) -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send> + Clone
{
    service_fn(move |_req: Request<Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok")))) }
    })
}

fn req(key: &str) -> Request<Body> {
    Request::get("/")
        .header("x-api-key", key)
        .body(Body::default())
        .unwrap()
}

fn header<'a, B>(res: &'a Response<B>, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

async fn problem_type<B: http_body::Body>(res: Response<B>) -> String
where
    B::Error: std::fmt::Debug,
{
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    json["type"].as_str().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn burst_then_one_per_interval_with_exact_headers() {
    let calls = Arc::new(AtomicUsize::new(0));
    // 5 per 10 s: one unit every 2 s, 5 at once.
    let layer = QuotaLayer::new(MemoryStore::new(), quota(5, 10))
        .route("api")
        .key(api_key());
    let mut svc = layer.layer(counting(calls.clone()));

    for (remaining, reset) in [(4, 2), (3, 4), (2, 6), (1, 8), (0, 10)] {
        let res = svc.ready().await.unwrap().call(req("k1")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "ratelimit-policy"), Some(r#""api";q=5;w=10"#));
        let expected = format!(r#""api";r={remaining};t={reset}"#);
        assert_eq!(header(&res, "ratelimit"), Some(expected.as_str()));
        assert_eq!(res.headers().get_all("ratelimit").iter().count(), 1);
        assert_eq!(header(&res, "retry-after"), None);
    }

    let res = svc.ready().await.unwrap().call(req("k1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("2"));
    assert_eq!(header(&res, "ratelimit-policy"), Some(r#""api";q=5;w=10"#));
    assert_eq!(header(&res, "ratelimit"), Some(r#""api";r=0;t=10"#));
    assert_eq!(problem_type(res).await, types::QUOTA_EXCEEDED);

    // Another key has its own bucket.
    let res = svc.ready().await.unwrap().call(req("k2")).await.unwrap();
    assert_eq!(header(&res, "ratelimit"), Some(r#""api";r=4;t=2"#));

    tokio::time::advance(Duration::from_millis(1500)).await;
    let res = svc.ready().await.unwrap().call(req("k1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // 0.5 s left, rounded up.
    assert_eq!(header(&res, "retry-after"), Some("1"));
    assert_eq!(header(&res, "ratelimit"), Some(r#""api";r=0;t=9"#));

    tokio::time::advance(Duration::from_millis(500)).await;
    let res = svc.ready().await.unwrap().call(req("k1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "ratelimit"), Some(r#""api";r=0;t=10"#));
    let res = svc.ready().await.unwrap().call(req("k1")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);

    // A steady client at the rate is always served: one per 2 s.
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(2)).await;
        let res = svc.ready().await.unwrap().call(req("k1")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5 + 1 + 1 + 10);
}

#[tokio::test(start_paused = true)]
async fn policy_name_and_sub_second_windows() {
    let quota = Quota::new(2, Duration::from_millis(500)).unwrap();
    let layer = QuotaLayer::new(MemoryStore::new(), quota)
        .route("r")
        .policy_name("per-key")
        .key(api_key());
    let mut svc = layer.layer(counting(Arc::default()));
    let res = svc.ready().await.unwrap().call(req("k")).await.unwrap();
    // w is whole seconds, at least 1; t rounds 250 ms up.
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""per-key";q=2;w=1"#)
    );
    assert_eq!(header(&res, "ratelimit"), Some(r#""per-key";r=1;t=1"#));
}

#[tokio::test(start_paused = true)]
async fn stacked_policies_keep_separate_state_and_list_both() {
    let store = MemoryStore::new();
    let per_second = QuotaLayer::new(store.clone(), quota(2, 1))
        .route("api")
        .policy_name("burst")
        .key(api_key());
    let per_day = QuotaLayer::new(store.clone(), quota(3, 86_400))
        .route("api")
        .policy_name("daily")
        .key(api_key());
    let svc = per_day.layer(per_second.layer(counting(Arc::default())));

    let res = svc.clone().oneshot(req("k")).await.unwrap();
    let policies: Vec<_> = res.headers().get_all("ratelimit-policy").iter().collect();
    assert_eq!(policies, [r#""burst";q=2;w=1"#, r#""daily";q=3;w=86400"#]);
    // One RateLimit: the policy closest to its limit (1 left per second, 2 per day).
    let limits: Vec<_> = res.headers().get_all("ratelimit").iter().collect();
    assert_eq!(limits, [r#""burst";r=1;t=1"#]);

    svc.clone().oneshot(req("k")).await.unwrap();
    // The daily quota admits the third request; the per-second one refuses it.
    let res = svc.clone().oneshot(req("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    tokio::time::advance(Duration::from_secs(1)).await;
    // The daily quota counted the refused request too (it sits outside): now it is out.
    let res = svc.clone().oneshot(req("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let limits: Vec<_> = res.headers().get_all("ratelimit").iter().collect();
    assert_eq!(limits, [r#""daily";r=0;t=86399"#]);
}

#[tokio::test(start_paused = true)]
async fn costs_take_several_units() {
    let layer = QuotaLayer::new(MemoryStore::new(), quota(10, 10))
        .route("bulk")
        .key(api_key())
        .cost(|req: &Request<Body>| {
            req.headers()
                .get("x-items")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(1)
        });
    let mut svc = layer.layer(counting(Arc::default()));
    let with_cost = |cost: u32| {
        let mut r = req("k");
        r.headers_mut().insert("x-items", cost.into());
        r
    };

    let res = svc.ready().await.unwrap().call(with_cost(4)).await.unwrap();
    assert_eq!(header(&res, "ratelimit"), Some(r#""bulk";r=6;t=4"#));
    let res = svc.ready().await.unwrap().call(with_cost(7)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    // The refused request took nothing.
    assert_eq!(header(&res, "ratelimit"), Some(r#""bulk";r=6;t=4"#));
    let res = svc.ready().await.unwrap().call(with_cost(6)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "ratelimit"), Some(r#""bulk";r=0;t=10"#));

    // More than the burst: never allowed, so no Retry-After, and a problem type of its
    // own that says no wait helps (issue 13: it used to read as an ordinary 429).
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(with_cost(11))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), None);
    assert_eq!(problem_type(res).await, types::QUOTA_COST_OVER_BURST);
}

#[tokio::test(start_paused = true)]
async fn overrides_by_table_and_function() {
    let layer = QuotaLayer::new(MemoryStore::new(), quota(1, 60))
        .route("api")
        .key(api_key())
        .override_key("vip", quota(3, 60))
        .overrides(|key: &Key| key.as_str().starts_with("team-").then(|| quota(2, 30)));
    let svc = layer.layer(counting(Arc::default()));

    let run = |key: &'static str, n: usize| {
        let svc = svc.clone();
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                let res = svc.clone().oneshot(req(key)).await.unwrap();
                let policy = header(&res, "ratelimit-policy").unwrap().to_owned();
                out.push((res.status().as_u16(), policy));
            }
            out
        }
    };
    let plain = run("plain", 2).await;
    assert_eq!(plain[0], (200, r#""api";q=1;w=60"#.to_owned()));
    assert_eq!(plain[1].0, 429);
    let vip = run("vip", 4).await;
    let statuses: Vec<u16> = vip.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 200, 429]);
    assert_eq!(vip[0].1, r#""api";q=3;w=60"#);
    let team = run("team-a", 3).await;
    let statuses: Vec<u16> = team.iter().map(|(s, _)| *s).collect();
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(team[0].1, r#""api";q=2;w=30"#);
}

#[tokio::test(start_paused = true)]
async fn shadow_mode_lets_rejections_through_with_headers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (outcomes, _guard) = capture_outcomes();
    let layer = QuotaLayer::new(MemoryStore::new(), quota(1, 60))
        .route("s")
        .key(api_key())
        .shadow(true);
    let mut svc = layer.layer(counting(calls.clone()));
    for _ in 0..3 {
        let res = svc.ready().await.unwrap().call(req("k")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "ratelimit"), Some(r#""s";r=0;t=60"#));
        assert_eq!(header(&res, "retry-after"), None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(
        *outcomes.lock().unwrap(),
        ["allowed", "shadow_limited", "shadow_limited"]
    );
}

#[tokio::test(start_paused = true)]
async fn spans_carry_outcome_and_key_hash_never_the_key() {
    let (outcomes, _guard) = capture_outcomes();
    let layer = QuotaLayer::new(MemoryStore::new(), quota(1, 60))
        .route("t")
        .key(api_key());
    let logging = service_fn(|_req: Request<Body>| async {
        tracing::info!("inner service runs");
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
    });
    let mut svc = layer.layer(logging);
    for _ in 0..2 {
        svc.ready()
            .await
            .unwrap()
            .call(req("secret-key"))
            .await
            .unwrap();
    }
    assert_eq!(*outcomes.lock().unwrap(), ["allowed", "limited"]);
    let fields = FIELDS.with(|f| f.borrow().clone());
    let hash = Key::from("secret-key").hash().to_string();
    assert!(
        fields
            .iter()
            .any(|f| f == &format!("keyward.key_hash={hash}")),
        "{fields:?}"
    );
    assert!(fields.iter().any(|f| f == "keyward.route=t"), "{fields:?}");
    // The inner service ran inside the decision's span.
    assert!(
        fields.iter().any(|f| f == "event INFO in keyward.quota"),
        "{fields:?}"
    );
    assert!(
        fields.iter().all(|f| !f.contains("secret-key")),
        "{fields:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn missing_key_passes_through_uncounted() {
    let calls = Arc::new(AtomicUsize::new(0));
    let store = MemoryStore::new();
    let layer = QuotaLayer::new(store.clone(), quota(1, 60)).key(api_key());
    let mut svc = layer.layer(counting(calls.clone()));
    for _ in 0..3 {
        let res = svc
            .ready()
            .await
            .unwrap()
            .call(Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(header(&res, "ratelimit"), None);
        assert_eq!(header(&res, "ratelimit-policy"), None);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(store.quota_entry_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn invalid_key_is_400_without_the_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = QuotaLayer::new(MemoryStore::new(), quota(1, 60)).key(api_key());
    let mut svc = layer.layer(counting(calls.clone()));
    let twice = Request::get("/")
        .header("x-api-key", "hunter2")
        .header("x-api-key", "hunter3")
        .body(Body::default())
        .unwrap();
    let res = svc.ready().await.unwrap().call(twice).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["type"], types::KEY_INVALID);
    let detail = json["detail"].as_str().unwrap();
    assert!(detail.contains("header:x-api-key"), "{detail}");
    assert!(!detail.contains("hunter"), "{detail}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn scoped_quotas_are_per_principal() {
    let layer = QuotaLayer::new(MemoryStore::new(), quota(1, 60))
        .key(api_key())
        .scope(KeySpec::parse("header:authorization").unwrap());
    let svc = layer.layer(counting(Arc::default()));
    let as_user = |user: &str| {
        let mut r = req("shared");
        r.headers_mut()
            .insert("authorization", user.parse().unwrap());
        r
    };
    let a = svc.clone().oneshot(as_user("alice")).await.unwrap();
    let b = svc.clone().oneshot(as_user("bob")).await.unwrap();
    let a2 = svc.clone().oneshot(as_user("alice")).await.unwrap();
    assert_eq!(a.status(), StatusCode::OK);
    assert_eq!(b.status(), StatusCode::OK);
    assert_eq!(a2.status(), StatusCode::TOO_MANY_REQUESTS);
}

/// A store that always fails.
#[derive(Clone)]
struct FailingStore;

impl QuotaStore for FailingStore {
    type CheckFuture = std::future::Ready<Result<QuotaDecision, StoreError>>;

    fn check(&self, _key: &ScopedKey, _quota: &Quota, _cost: u32) -> Self::CheckFuture {
        std::future::ready(Err(StoreError::Unavailable("connection refused".into())))
    }

    fn peek(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        self.check(key, quota, cost)
    }

    fn charge(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        self.check(key, quota, cost)
    }

    fn charge_detached(&self, _key: ScopedKey, _quota: Quota, _cost: u32) {
        panic!("a request the store failed to admit is never charged");
    }
}

#[tokio::test]
async fn store_errors_follow_the_policy() {
    let calls = Arc::new(AtomicUsize::new(0));
    let (outcomes, _guard) = capture_outcomes();

    let closed = QuotaLayer::new(FailingStore, quota(1, 1)).key(api_key());
    let res = closed
        .layer(counting(calls.clone()))
        .oneshot(req("k"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    assert_eq!(problem_type(res).await, types::STORE_UNAVAILABLE);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let open = QuotaLayer::new(FailingStore, quota(1, 1))
        .key(api_key())
        .on_store_error(OnStoreError::Open);
    let res = open
        .layer(counting(calls.clone()))
        .oneshot(req("k"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "ratelimit"), None);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(*outcomes.lock().unwrap(), ["store_error", "store_error"]);
    // Both failures were logged inside the decision's span.
    let fields = FIELDS.with(|f| f.borrow().clone());
    let warnings = fields
        .iter()
        .filter(|f| *f == "event WARN in keyward.quota");
    assert_eq!(warnings.count(), 2, "{fields:?}");
}

#[tokio::test(start_paused = true)]
async fn full_table_is_a_store_error() {
    // Room for one key per shard: later keys landing in an occupied shard are refused.
    let store = MemoryStore::builder().max_quota_keys(1).build();
    let layer = QuotaLayer::new(store.clone(), quota(1, 60)).key(api_key());
    let svc = layer.layer(counting(Arc::default()));
    let mut unavailable = 0;
    for i in 0..200 {
        let res = svc.clone().oneshot(req(&format!("k{i}"))).await.unwrap();
        unavailable += usize::from(res.status() == StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(store.quota_entry_count() <= 64);
    assert_eq!(unavailable, 200 - store.quota_entry_count());
}

#[tokio::test(start_paused = true)]
async fn idle_keys_are_evicted_back_to_baseline() {
    let store = MemoryStore::new();
    let quota = quota(10, 1);
    let key = |i: usize| ScopedKey::new("quota", "r", Scope::Unscoped, Key::from(format!("k{i}")));
    let baseline = store.quota_entry_count();
    assert_eq!(baseline, 0);
    for i in 0..100_000 {
        assert!(store.check(&key(i), &quota, 1).await.unwrap().is_allowed());
    }
    assert_eq!(store.quota_entry_count(), 100_000);

    // Still active: nothing may be dropped.
    assert_eq!(store.evict_idle_quotas(), 0);
    tokio::time::advance(Duration::from_secs(2)).await;

    // Traffic on other keys sweeps each shard it touches (cost 0 stores nothing).
    for i in 100_000..102_000 {
        store.check(&key(i), &quota, 0).await.unwrap();
    }
    assert_eq!(store.quota_entry_count(), baseline);
    assert_eq!(store.evict_idle_quotas(), 0);
}

#[tokio::test(start_paused = true)]
async fn explicit_eviction_drops_only_idle_keys() {
    let store = MemoryStore::new();
    let key = |i: usize| ScopedKey::new("quota", "r", Scope::Unscoped, Key::from(format!("k{i}")));
    for i in 0..1000 {
        store.check(&key(i), &quota(1, 1), 1).await.unwrap();
    }
    store.check(&key(5000), &quota(1, 60), 1).await.unwrap();
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.evict_idle_quotas(), 1000);
    assert_eq!(store.quota_entry_count(), 1);
    // The active key kept its state.
    assert!(
        !store
            .check(&key(5000), &quota(1, 60), 1)
            .await
            .unwrap()
            .is_allowed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_on_one_key_never_exceed_the_burst() {
    // A long period: no unit is earned back while the test runs.
    let layer = QuotaLayer::new(MemoryStore::new(), quota(50, 3600)).key(api_key());
    let svc = layer.layer(counting(Arc::default()));
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (svc, start) = (svc.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let mut allowed = 0;
                for _ in 0..100 {
                    let res = svc.clone().oneshot(req("hot")).await.unwrap();
                    allowed += usize::from(res.status() == StatusCode::OK);
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += task.await.unwrap();
    }
    assert_eq!(allowed, 50);
}

#[tokio::test(start_paused = true)]
async fn works_inside_an_axum_router() {
    use axum::Router;
    use axum::routing::get;

    let layer = QuotaLayer::new(MemoryStore::new(), quota(2, 60))
        .route("hello")
        .key(api_key());
    let app: Router = Router::new()
        .route("/hello", get(|| async { "hi" }))
        .layer(layer);
    let request = || {
        Request::get("/hello")
            .header("x-api-key", "k")
            .body(axum::body::Body::empty())
            .unwrap()
    };
    let res = app.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "ratelimit"), Some(r#""hello";r=1;t=30"#));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hi");
    app.clone().oneshot(request()).await.unwrap();
    let res = app.clone().oneshot(request()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("30"));
    assert_eq!(header(&res, "ratelimit"), Some(r#""hello";r=0;t=60"#));
}

#[test]
fn layer_is_clone_and_debug_without_bounds() {
    struct NotClone;
    let layer = QuotaLayer::new(MemoryStore::new(), quota(1, 1)).route("dbg");
    let copy = layer.clone();
    let text = format!("{copy:?}");
    assert!(text.contains("dbg"), "{text}");
    // The struct itself puts no bounds on the key type.
    let _unbounded: Option<QuotaLayer<MemoryStore, NotClone>> = None;
}

// --- span capture -----------------------------------------------------------------------

thread_local! {
    static FIELDS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Records every `keyward.outcome` of `keyward.quota` spans on this thread (the tests run
/// on a current-thread runtime).
fn capture_outcomes() -> (Arc<Mutex<Vec<String>>>, tracing::subscriber::DefaultGuard) {
    use tracing_subscriber::layer::SubscriberExt;
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(Capture(outcomes.clone()));
    (outcomes, tracing::subscriber::set_default(subscriber))
}

struct Capture(Arc<Mutex<Vec<String>>>);

struct Visitor<'a>(&'a Mutex<Vec<String>>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{}={:?}", field.name(), value);
        FIELDS.with(|f| f.borrow_mut().push(text.replace('"', "")));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        FIELDS.with(|f| f.borrow_mut().push(format!("{}={value}", field.name())));
        if field.name() == "keyward.outcome" {
            self.0.lock().unwrap().push(value.to_owned());
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for Capture
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _id: &tracing::span::Id,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if attrs.metadata().name() == "keyward.quota" {
            attrs.record(&mut Visitor(&self.0));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = ctx.event_span(event) {
            let text = format!("event {} in {}", event.metadata().level(), span.name());
            FIELDS.with(|f| f.borrow_mut().push(text));
        }
    }

    fn on_record(
        &self,
        _id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        values.record(&mut Visitor(&self.0));
    }
}

// --- model check -------------------------------------------------------------------------

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// The memory store, sweeps and all, decides exactly like the pure GCRA step on a
    /// map that never forgets: dropping idle keys never changes a decision.
    #[test]
    fn memory_store_matches_the_pure_model(
        steps in proptest::collection::vec((0usize..6, 0u64..3_000, 0u32..4, proptest::bool::ANY), 1..150)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let store = MemoryStore::new();
            let quotas = [quota(3, 1), Quota::new(5, Duration::from_millis(700)).unwrap().with_burst(2).unwrap()];
            let mut model = std::collections::HashMap::new();
            let mut elapsed = 0u64;
            for (key, advance_ms, cost, other_quota) in steps {
                tokio::time::advance(Duration::from_millis(advance_ms)).await;
                elapsed += advance_ms * 1_000_000;
                let q = &quotas[usize::from(other_quota)];
                let scoped = ScopedKey::new("quota", "m", Scope::Unscoped, Key::from(format!("k{key}")));
                let got = store.check(&scoped, q, cost).await.unwrap();
                // The store's clock starts at 1 ns (0 means "no record").
                let step = q.decide(*model.get(&key).unwrap_or(&0), elapsed + 1, cost);
                if let Some(tat) = step.new_tat {
                    model.insert(key, tat);
                }
                assert_eq!(got, step.decision);
            }
        });
    }
}

/// Issue 13: a scoped route that receives no principal put every anonymous caller in one
/// shared scope, silently. That stays the default (and documented); `scope_missing =
/// reject` refuses such requests with 400 instead.
#[tokio::test(start_paused = true)]
async fn a_scoped_route_can_refuse_requests_without_a_principal() {
    let calls = Arc::new(AtomicUsize::new(0));
    let scoped = |layer: QuotaLayer<MemoryStore, KeySpec>| {
        layer
            .key(api_key())
            .scope(KeySpec::parse("header:authorization").unwrap())
    };
    let anonymous =
        scoped(QuotaLayer::new(MemoryStore::new(), quota(1, 60))).layer(counting(calls.clone()));
    let strict = scoped(QuotaLayer::new(MemoryStore::new(), quota(1, 60)))
        .scope_missing(keyward::ScopeMissing::Reject)
        .layer(counting(calls.clone()));

    // By default anonymous callers share one scope: the second one is over the quota.
    assert_eq!(
        anonymous.clone().oneshot(req("k")).await.unwrap().status(),
        StatusCode::OK
    );
    let res = anonymous.clone().oneshot(req("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);

    let res = strict.clone().oneshot(req("k")).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(problem_type(res).await, types::KEY_INVALID);
    let mut authenticated = req("k");
    authenticated
        .headers_mut()
        .insert("authorization", "Bearer alice".parse().unwrap());
    assert_eq!(
        strict
            .clone()
            .oneshot(authenticated)
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "refused requests never reach the service"
    );
}

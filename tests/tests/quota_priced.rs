//! `QuotaLayer` priced by its responses (`charge_after`), counting only chosen outcomes,
//! and several quotas on one route, on the memory store (paused time). The same over
//! Redis and Redis Cluster: `quota_stores.rs`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use keyward::core::gcra::Quota;
use keyward::core::problem::types;
use keyward::core::store::QuotaStore;
use keyward::core::{Key, Scope, ScopedKey};
use keyward::quota::{ResponseCost, StatusSet};
use keyward::{KeySpec, KeywardBody, MemoryStore, QuotaLayer};
use tower::{Layer, ServiceExt, service_fn};

type Body = Full<Bytes>;

fn api_key() -> KeySpec {
    KeySpec::parse("header:x-api-key").unwrap()
}

/// `x-api-key: k`, and `x-tokens` / `x-status` telling the upstream what to answer.
fn req(tokens: u32, status: u16) -> Request<Body> {
    Request::get("/")
        .header("x-api-key", "k")
        .header("x-tokens", tokens.to_string())
        .header("x-status", status.to_string())
        .body(Body::default())
        .unwrap()
}

/// Answers the status in `x-status` with `x-tokens-used` = the request's `x-tokens`,
/// counting its calls.
fn upstream(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone {
    service_fn(move |req: Request<Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let status: u16 = req.headers()["x-status"].to_str().unwrap().parse().unwrap();
        let mut res = Response::new(Full::new(Bytes::from("answer")));
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        res.headers_mut()
            .insert("x-tokens-used", req.headers()["x-tokens"].clone());
        async move { Ok::<_, Infallible>(res) }
    })
}

fn header<'a, B>(res: &'a Response<B>, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

/// The units left for key `k` on route `route`.
async fn left(store: &MemoryStore, route: &str, quota: &Quota) -> u32 {
    let key = ScopedKey::new("quota", route, Scope::Unscoped, Key::from("k"));
    store.check(&key, quota, 0).await.unwrap().remaining
}

#[tokio::test(start_paused = true)]
async fn a_response_header_prices_the_request_and_debt_makes_the_next_one_wait() {
    let store = MemoryStore::new();
    let calls = Arc::new(AtomicUsize::new(0));
    // 100 tokens per 100 s: one token back per second.
    let quota = Quota::new(100, Duration::from_secs(100)).unwrap();
    let layer = QuotaLayer::new(store.clone(), quota)
        .route("llm")
        .key(api_key())
        .charge_after(ResponseCost::header("x-tokens-used"));
    let svc = layer.layer(upstream(calls.clone()));

    let res = svc.clone().oneshot(req(60, 200)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // The admission's view: one unit needed, nothing taken yet.
    assert_eq!(header(&res, "ratelimit"), Some(r#""llm";r=99;t=1"#));
    assert_eq!(
        left(&store, "llm", &quota).await,
        100,
        "not charged before the body ends"
    );
    res.into_body().collect().await.unwrap();
    assert_eq!(left(&store, "llm", &quota).await, 40);

    // 90 more: admitted (40 left), and then 50 in debt.
    let res = svc.clone().oneshot(req(90, 200)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    assert_eq!(left(&store, "llm", &quota).await, 0);

    // In debt: 429 until the debt is paid and one unit is back, 51 s.
    let res = svc.clone().oneshot(req(1, 200)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("51"));
    assert_eq!(header(&res, "ratelimit"), Some(r#""llm";r=0;t=150"#));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], types::QUOTA_EXCEEDED);

    tokio::time::advance(Duration::from_secs(50)).await;
    let res = svc.clone().oneshot(req(1, 200)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    tokio::time::advance(Duration::from_secs(1)).await;
    let res = svc.clone().oneshot(req(1, 200)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn a_trailer_replaces_the_header_and_dropped_or_failed_bodies_still_charge() {
    let store = MemoryStore::new();
    let quota = Quota::new(100, Duration::from_secs(100)).unwrap();
    let streaming = service_fn(|req: Request<Body>| async move {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-tokens-used", req.headers()["x-tokens"].clone());
        let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = vec![
            Ok(http_body::Frame::data(Bytes::from("tok tok"))),
            Ok(http_body::Frame::trailers(trailers)),
        ];
        let mut res = Response::new(StreamBody::new(futures::stream::iter(frames)));
        // Streamed answers often promise a count up front and correct it at the end.
        res.headers_mut()
            .insert("x-tokens-used", "1".parse().unwrap());
        Ok::<_, Infallible>(res)
    });
    let svc = QuotaLayer::new(store.clone(), quota)
        .route("stream")
        .key(api_key())
        .charge_after(ResponseCost::header("x-tokens-used"))
        .layer(streaming);

    let res = svc.clone().oneshot(req(30, 200)).await.unwrap();
    let body = res.into_body();
    assert!(matches!(&body, KeywardBody::Inner { body } if body.charge_pending()));
    let collected = body.collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["x-tokens-used"], "30");
    assert_eq!(left(&store, "stream", &quota).await, 70);

    // Dropped unread: the header's count is charged.
    let res = svc.clone().oneshot(req(30, 200)).await.unwrap();
    drop(res);
    assert_eq!(left(&store, "stream", &quota).await, 69);

    // A missing header charges `missing`, here nothing; a header that is not a whole
    // number too.
    let plain = service_fn(|_req: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("no count"))))
    });
    let svc = QuotaLayer::new(store.clone(), quota)
        .route("stream")
        .key(api_key())
        .charge_after(ResponseCost::header("x-tokens-used").missing(5))
        .layer(plain);
    svc.oneshot(req(0, 200))
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    assert_eq!(left(&store, "stream", &quota).await, 64);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_charge_nothing() {
    let store = MemoryStore::new();
    let quota = Quota::new(1, Duration::from_secs(100)).unwrap();
    let failing = service_fn(|_req: Request<Body>| async {
        Err::<Response<Body>, _>(std::io::Error::other("upstream unreachable"))
    });
    let svc = QuotaLayer::new(store.clone(), quota)
        .route("err")
        .key(api_key())
        .charge_after(ResponseCost::per_response(1))
        .layer(failing);
    for _ in 0..3 {
        assert!(svc.clone().oneshot(req(1, 200)).await.is_err());
    }
    assert_eq!(left(&store, "err", &quota).await, 1);
}

#[tokio::test(start_paused = true)]
async fn only_failed_logins_count_and_then_every_attempt_waits() {
    let store = MemoryStore::new();
    let calls = Arc::new(AtomicUsize::new(0));
    // 3 failures per 10 minutes.
    let quota = Quota::new(3, Duration::from_secs(600)).unwrap();
    let svc = QuotaLayer::new(store.clone(), quota)
        .route("login")
        .key(api_key())
        .charge_after(ResponseCost::per_response(1).only(StatusSet::parse("401,403").unwrap()))
        .layer(upstream(calls.clone()));
    let attempt = |status: u16| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(req(0, status)).await.unwrap();
            let (parts, body) = res.into_parts();
            body.collect().await.unwrap();
            parts
        }
    };
    // Successful logins never count.
    for _ in 0..10 {
        assert_eq!(attempt(200).await.status, StatusCode::OK);
    }
    assert_eq!(left(&store, "login", &quota).await, 3);
    assert_eq!(attempt(401).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(attempt(403).await.status, StatusCode::FORBIDDEN);
    assert_eq!(attempt(401).await.status, StatusCode::UNAUTHORIZED);
    // Three failures: now even the right password waits, 200 s (one failure's worth).
    let refused = attempt(200).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers["retry-after"], "200");
    assert_eq!(calls.load(Ordering::SeqCst), 13);
    tokio::time::advance(Duration::from_secs(200)).await;
    assert_eq!(attempt(200).await.status, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn only_2xx_count_for_paid_calls() {
    let store = MemoryStore::new();
    let quota = Quota::new(2, Duration::from_secs(3600)).unwrap();
    let svc = QuotaLayer::new(store.clone(), quota)
        .route("paid")
        .key(api_key())
        .charge_after(ResponseCost::per_response(1).only(StatusSet::parse("2xx").unwrap()))
        .layer(upstream(Arc::default()));
    let statuses = [500, 201, 404, 200, 200];
    let mut got = Vec::new();
    for status in statuses {
        let res = svc.clone().oneshot(req(0, status)).await.unwrap();
        got.push(res.status().as_u16());
        res.into_body().collect().await.unwrap();
    }
    assert_eq!(got, [500, 201, 404, 200, 429]);
}

#[tokio::test(start_paused = true)]
async fn several_quotas_list_every_policy_and_report_the_closest() {
    let store = MemoryStore::new();
    let per_second = QuotaLayer::new(store.clone(), Quota::per_second(5).unwrap())
        .route("api")
        .policy_name("per-second")
        .key(api_key());
    let per_day = QuotaLayer::new(
        store.clone(),
        Quota::new(8, Duration::from_secs(86_400)).unwrap(),
    )
    .route("api")
    .policy_name("per-day")
    .key(api_key());
    // Per IP, whatever the API key: a second key on the same route.
    let per_ip = QuotaLayer::new(store.clone(), Quota::per_minute(100).unwrap())
        .route("api")
        .policy_name("per-ip")
        .key(KeySpec::parse("header:x-client-ip").unwrap());
    let svc = per_ip.layer(per_day.layer(per_second.layer(upstream(Arc::default()))));
    let call = || {
        let mut req = req(0, 200);
        req.headers_mut()
            .insert("x-client-ip", "192.0.2.7".parse().unwrap());
        svc.clone().oneshot(req)
    };

    let res = call().await.unwrap();
    let policies: Vec<_> = res.headers().get_all("ratelimit-policy").iter().collect();
    assert_eq!(
        policies,
        [
            r#""per-second";q=5;w=1"#,
            r#""per-day";q=8;w=86400"#,
            r#""per-ip";q=100;w=60"#
        ]
    );
    // One RateLimit: the policy with the fewest units left (per-second: 4).
    let limits: Vec<_> = res.headers().get_all("ratelimit").iter().collect();
    assert_eq!(limits, [r#""per-second";r=4;t=1"#]);
    for _ in 0..3 {
        call().await.unwrap();
    }
    // Per second 1 left, per day 4: still per-second.
    let res = call().await.unwrap();
    assert_eq!(header(&res, "ratelimit"), Some(r#""per-second";r=0;t=1"#));
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..2 {
        call().await.unwrap();
    }
    // Per second 2 left, per day none: the day is closer now (its bucket is full again
    // a day after the start, one second ago).
    let res = call().await.unwrap();
    assert_eq!(header(&res, "ratelimit"), Some(r#""per-day";r=0;t=86399"#));
    let refused = call().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        header(&refused, "ratelimit")
            .unwrap()
            .starts_with(r#""per-day";r=0;"#)
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_ratelimit_list_is_kept() {
    let upstream_limited = service_fn(|_req: Request<Body>| async {
        let mut res = Response::new(Full::new(Bytes::new()));
        let headers = res.headers_mut();
        headers.append(
            "ratelimit",
            r#""upstream";r=1;t=1, "other";r=0;t=9"#.parse().unwrap(),
        );
        Ok::<_, Infallible>(res)
    });
    let svc = QuotaLayer::new(MemoryStore::new(), Quota::per_second(5).unwrap())
        .route("api")
        .key(api_key())
        .layer(upstream_limited);
    let res = svc.oneshot(req(0, 200)).await.unwrap();
    let limits: Vec<_> = res.headers().get_all("ratelimit").iter().collect();
    assert_eq!(
        limits,
        [r#""upstream";r=1;t=1, "other";r=0;t=9"#, r#""api";r=4;t=1"#]
    );
}

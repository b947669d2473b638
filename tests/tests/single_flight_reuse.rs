//! `SingleFlightLayer::reuse_for` on every store: requests arriving shortly after a
//! flight landed get its response (marked coalesced, with `Age`), across instances
//! sharing the store, but never across principals, hosts or representations, never a
//! private, no-store, foreign-`Vary`, 5xx or no-cache response, and never after
//! `reuse_for`. On Redis a reuse is one script.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keyward::core::store::SingleFlightStore;
use keyward::{KeywardBody, SingleFlightLayer};
use keyward_tests::redis_kit::{CommandStats, command_delta};
use keyward_tests::{Backend, Memory, Redis, RedisClusterBackend, assert_one_script};
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt, service_fn};

type Svc = BoxCloneService<Request<()>, Response<KeywardBody<Full<Bytes>>>, Infallible>;

/// An origin that counts its calls and answers by path: `/private`, `/no-store`,
/// `/no-cache`, `/vary-cookie` and `/fail` with what their names say, anything else 200.
fn origin(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<()>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |req: Request<()>| {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let path = req.uri().path().to_owned();
        async move {
            let mut res = Response::builder().status(200);
            res = match path.as_str() {
                "/private" => res.header("cache-control", "private"),
                "/no-store" => res.header("cache-control", "no-store"),
                "/no-cache" => res.header("cache-control", "no-cache"),
                "/vary-cookie" => res.header("vary", "Cookie"),
                "/fail" => res.status(StatusCode::SERVICE_UNAVAILABLE),
                _ => res.header("cache-control", "public, max-age=60"),
            };
            Ok(res
                .body(Full::new(Bytes::from(format!("{path} call {n}"))))
                .unwrap())
        }
    })
}

fn layer<St: SingleFlightStore>(store: St, reuse_for: Duration, calls: &Arc<AtomicUsize>) -> Svc {
    let svc = SingleFlightLayer::new(store)
        .route("prices")
        .reuse_for(reuse_for)
        .layer(origin(calls.clone()));
    BoxCloneService::new(svc)
}

fn get(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut req = Request::get(uri).header("host", "shop.example");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(()).unwrap()
}

struct Got {
    body: Bytes,
    coalesced: bool,
    age: Option<u64>,
}

async fn call(svc: &Svc, req: Request<()>) -> Got {
    let res = svc.clone().oneshot(req).await.unwrap();
    let coalesced = res
        .headers()
        .get("keyward-coalesced")
        .is_some_and(|v| v == "true");
    let age = res
        .headers()
        .get("age")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Got {
        body,
        coalesced,
        age,
    }
}

async fn reuses_within_reuse_for_and_across_instances<B: Backend>(backend: B) {
    let unit = backend.unit();
    let calls = Arc::new(AtomicUsize::new(0));
    let here = layer(backend.store(), unit * 5, &calls);
    // Another process on the same store.
    let there = layer(backend.instance(), unit * 5, &calls);
    let first = call(&here, get("/prices/eur", &[])).await;
    assert!(!first.coalesced && first.age.is_none());
    let soon = call(&here, get("/prices/eur", &[])).await;
    assert!(soon.coalesced, "reused in-process");
    assert_eq!(soon.body, first.body);
    let elsewhere = call(&there, get("/prices/eur", &[])).await;
    assert!(elsewhere.coalesced, "reused by another instance");
    assert_eq!(elsewhere.body, first.body);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(unit * 2).await;
    let older = call(&there, get("/prices/eur", &[])).await;
    assert!(older.coalesced);
    // Whole seconds since the landing: 2 on the paused clock, 0 at Redis's 100 ms units.
    let expected = (unit * 2).as_secs();
    assert!(
        older.age.unwrap() >= expected && older.age.unwrap() <= expected + 1,
        "{:?}",
        older.age
    );
    tokio::time::sleep(unit * 3 + backend.slack()).await;
    let after = call(&here, get("/prices/eur", &[])).await;
    assert!(!after.coalesced, "reuse_for is over: a new call");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

async fn never_across_principals_hosts_or_representations<B: Backend>(backend: B) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer(backend.store(), backend.unit() * 10, &calls);
    let alice = [("authorization", "Bearer alice")];
    call(&svc, get("/report", &alice)).await;
    assert!(call(&svc, get("/report", &alice)).await.coalesced);
    let others: [&[(&str, &str)]; 4] = [
        &[("authorization", "Bearer bob")],
        &[],
        &[("authorization", "Bearer alice"), ("accept", "text/csv")],
        &[
            ("authorization", "Bearer alice"),
            ("accept-encoding", "gzip"),
        ],
    ];
    for (i, headers) in others.iter().enumerate() {
        let got = call(&svc, get("/report", headers)).await;
        assert!(!got.coalesced, "{headers:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 2 + i);
    }
    let other_host = Request::get("/report")
        .header("host", "other.example")
        .header("authorization", "Bearer alice")
        .body(())
        .unwrap();
    assert!(!call(&svc, other_host).await.coalesced);
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

async fn unshareable_failed_and_no_cache_responses_are_not_reused<B: Backend>(backend: B) {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer(backend.store(), backend.unit() * 10, &calls);
    for (i, path) in [
        "/private",
        "/no-store",
        "/no-cache",
        "/vary-cookie",
        "/fail",
    ]
    .into_iter()
    .enumerate()
    {
        call(&svc, get(path, &[])).await;
        let again = call(&svc, get(path, &[])).await;
        assert!(!again.coalesced, "{path} was reused");
        assert_eq!(calls.load(Ordering::SeqCst), 2 * (i + 1), "{path}");
    }
}

macro_rules! on_every_store {
    ($($name:ident),+ $(,)?) => {
        mod memory {
            use super::*;
            $(#[tokio::test(start_paused = true)]
            async fn $name() { super::$name(Memory::default()).await }) +
        }
        mod redis {
            use super::*;
            $(#[tokio::test]
            async fn $name() { super::$name(Redis::start()).await }) +
        }
        mod redis_cluster {
            use super::*;
            $(#[tokio::test]
            async fn $name() { super::$name(RedisClusterBackend::start()).await }) +
        }
    };
}

on_every_store!(
    reuses_within_reuse_for_and_across_instances,
    never_across_principals_hosts_or_representations,
    unshareable_failed_and_no_cache_responses_are_not_reused,
);

/// One round trip per decision: a reuse hit is the lead script, reading the kept
/// response, and nothing else; the landing that keeps it is the publish script alone.
#[tokio::test]
async fn on_redis_a_reuse_is_one_script() {
    let redis = Redis::start();
    let store = Redis::store_on(&redis.server, "keyward:");
    store.ping().await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = layer(store, Duration::from_secs(5), &calls);
    let mut stats = CommandStats::connect(&redis.server).await;
    call(&svc, get("/prices/eur", &[])).await;
    let before = stats.snapshot().await;
    let reused = call(&svc, get("/prices/eur", &[])).await;
    assert!(reused.coalesced);
    let delta = command_delta(&before, &stats.snapshot().await);
    assert_one_script(&delta, &["get", "pttl"]);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

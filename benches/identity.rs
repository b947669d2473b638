//! The per-request paths of issue 16 against today's layers, in one run:
//!
//! - idempotency replays with the body fingerprinted as bytes (today) or as canonical
//!   JSON (RFC 8785), with and without an excluded member;
//! - a Standard Webhooks receiver: bare, the body read into a `BufferedBody`, and the
//!   signature verified;
//! - single flight: a leader (today: every sequential request makes its call) and a
//!   `reuse_for` hit (the landed response served from the store).
//!
//! `cargo bench -p keyward-benches --bench identity -- --warm-up-time 1 --measurement-time 3`

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use keyward::core::json::{JsonIdentity, JsonPointer};
use keyward::webhook::{StandardWebhooks, WebhookSecret};
use keyward::{BufferedBodyLayer, IdempotencyLayer, MemoryStore, SingleFlightLayer};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

const KEYS: u64 = 10_000;

/// A payment as a client SDK sends it: 12 members, nested, with a client timestamp.
const PAYMENT: &str = r#"{"amount":1000,"currency":"eur","customer":{"id":"cus_42","email":"alice@example.com"},"metadata":{"order":"o-1001","channel":"web"},"description":"Order 1001","capture":true,"sent_at":"2026-12-01T21:00:00Z"}"#;

async fn handler(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .status(201)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"id\":\"ch_1\",\"status\":\"succeeded\"}",
        )))
        .expect("valid response"))
}

fn payment(key: u64) -> Request<Full<Bytes>> {
    Request::post("/payments")
        .header("idempotency-key", format!("key-{key}"))
        .header("authorization", "Bearer sk_test_123")
        .body(Full::new(Bytes::from_static(PAYMENT.as_bytes())))
        .expect("valid request")
}

async fn drive<S, B>(svc: &mut S, req: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc
        .ready()
        .await
        .expect("ready")
        .call(req)
        .await
        .expect("call");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    std::hint::black_box(body);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn fingerprints(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("identity/idempotency_replay");
    let bare = tower::service_fn(handler);
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter_batched(
            || payment(1),
            |req| {
                let mut svc = bare;
                async move { drive(&mut svc, req).await }
            },
            BatchSize::SmallInput,
        )
    });
    let identities = [
        ("bytes", None),
        ("canonical_json", Some(JsonIdentity::canonical())),
        (
            "canonical_json_exclude",
            Some(
                JsonIdentity::canonical().exclude(JsonPointer::parse("/sent_at").expect("pointer")),
            ),
        ),
    ];
    for (name, identity) in identities {
        let mut layer = IdempotencyLayer::new(MemoryStore::new()).route("payments");
        if let Some(identity) = identity {
            layer = layer.fingerprint_json(identity);
        }
        let replaying = ServiceBuilder::new().layer(layer).service_fn(handler);
        rt.block_on(async {
            for key in 0..KEYS {
                drive(&mut replaying.clone(), payment(key)).await;
            }
        });
        let next = AtomicU64::new(0);
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_batched(
                || payment(next.fetch_add(1, Ordering::Relaxed) % KEYS),
                |req| {
                    let mut svc = replaying.clone();
                    async move { drive(&mut svc, req).await }
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn webhooks(c: &mut Criterion) {
    let rt = runtime();
    let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
    let delivery = || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        Request::post("/hooks")
            .header("webhook-id", "msg_1")
            .header("webhook-timestamp", now.to_string())
            .header(
                "webhook-signature",
                secret.sign("msg_1", now, PAYMENT.as_bytes()),
            )
            .body(Full::new(Bytes::from_static(PAYMENT.as_bytes())))
            .expect("valid request")
    };
    let mut group = c.benchmark_group("identity/webhook");
    let bare = tower::service_fn(handler);
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter_batched(
            delivery,
            |req| {
                let mut svc = bare;
                async move { drive(&mut svc, req).await }
            },
            BatchSize::SmallInput,
        )
    });
    let buffered = BufferedBodyLayer::new(64 * 1024).layer(tower::service_fn(handler));
    group.bench_function("buffered_body", |b| {
        b.to_async(&rt).iter_batched(
            delivery,
            |req| {
                let mut svc = buffered.clone();
                async move { drive(&mut svc, req).await }
            },
            BatchSize::SmallInput,
        )
    });
    let verified = StandardWebhooks::new([secret.clone()])
        .layer(64 * 1024)
        .layer(tower::service_fn(handler));
    group.bench_function("standard_webhooks_verified", |b| {
        b.to_async(&rt).iter_batched(
            delivery,
            |req| {
                let mut svc = verified.clone();
                async move { drive(&mut svc, req).await }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

async fn report(_req: Request<()>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(
        b"{\"report\":\"daily\",\"rows\":[1,2,3]}",
    ))))
}

fn get() -> Request<()> {
    Request::get("/reports/daily?region=eu")
        .header("authorization", "Bearer sk_test_123")
        .body(())
        .expect("valid request")
}

fn reuse(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("identity/single_flight");
    let bare = tower::service_fn(report);
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| async {
            let response = bare.oneshot(get()).await.expect("call");
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        })
    });
    let leader = SingleFlightLayer::new(MemoryStore::new()).layer(tower::service_fn(report));
    group.bench_function("leader", |b| {
        b.to_async(&rt).iter(|| async {
            let response = leader.clone().oneshot(get()).await.expect("call");
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        })
    });
    let reusing = SingleFlightLayer::new(MemoryStore::new())
        .reuse_for(Duration::from_secs(3600))
        .layer(tower::service_fn(report));
    rt.block_on(async { drive_get(&reusing).await });
    group.bench_function("reuse_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let response = reusing.clone().oneshot(get()).await.expect("call");
            assert!(response.headers().contains_key("age"));
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        })
    });
    group.finish();
}

async fn drive_get<S, B>(svc: &S)
where
    S: Service<Request<()>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(get()).await.expect("call");
    std::hint::black_box(res.into_body().collect().await.expect("body").to_bytes());
}

criterion_group!(benches, fingerprints, webhooks, reuse);
criterion_main!(benches);

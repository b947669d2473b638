//! Request identity by meaning, on every store: Standard Webhooks verification before
//! the dedupe on `webhook-id` (a forged delivery claims nothing, across instances), keys
//! from the JSON body, and canonical-JSON fingerprints.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keyward::core::json::{JsonIdentity, JsonPointer};
use keyward::core::store::IdempotencyStore;
use keyward::webhook::{StandardWebhooks, WebhookSecret};
use keyward::{BufferedBodyLayer, IdempotencyLayer, KeySpec, KeywardBody};
use keyward_tests::{Backend, Memory, Redis, RedisClusterBackend};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneService<
    Request<Full<Bytes>>,
    Response<KeywardBody<KeywardBody<Full<Bytes>>>>,
    Infallible,
>;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// An upstream that counts what it applies and echoes the body it got.
async fn apply(
    calls: Arc<AtomicUsize>,
    req: Request<Full<Bytes>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut echo = format!("applied {n}: ").into_bytes();
    echo.extend_from_slice(&body);
    Ok(Response::builder()
        .status(201)
        .body(Full::new(Bytes::from(echo)))
        .unwrap())
}

fn applied(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req| apply(calls.clone(), req))
}

fn receiver<St: IdempotencyStore>(store: St, calls: &Arc<AtomicUsize>) -> Svc {
    let verify = StandardWebhooks::new([WebhookSecret::parse(SECRET).unwrap()]);
    let dedupe = IdempotencyLayer::new(store)
        .route("hooks")
        .unscoped()
        .required(true)
        .key(KeySpec::parse("header:webhook-id").unwrap());
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(verify.layer(64 * 1024))
            .layer(dedupe)
            .service(applied(calls.clone())),
    )
}

fn now() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.unwrap().as_secs() as i64
}

fn delivery(id: &str, body: &'static str, signature: Option<String>) -> Request<Full<Bytes>> {
    let ts = now();
    let secret = WebhookSecret::parse(SECRET).unwrap();
    let signature = signature.unwrap_or_else(|| secret.sign(id, ts, body.as_bytes()));
    Request::post("/hooks")
        .header("webhook-id", id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn answer(svc: &Svc, req: Request<Full<Bytes>>) -> (StatusCode, bool, Bytes) {
    let res = svc.clone().oneshot(req).await.unwrap();
    let replayed = res.headers().get("idempotent-replayed").is_some();
    let status = res.status();
    (
        status,
        replayed,
        res.into_body().collect().await.unwrap().to_bytes(),
    )
}

async fn a_forged_delivery_claims_no_real_id<B: Backend>(backend: B) {
    let calls = Arc::new(AtomicUsize::new(0));
    // The forgery reaches one instance, the real delivery another.
    let (here, there) = (
        receiver(backend.store(), &calls),
        receiver(backend.instance(), &calls),
    );
    let body = r#"{"type":"invoice.paid"}"#;
    let stranger = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
    let forged = stranger.sign("evt_1", now(), body.as_bytes());
    let (status, _, _) = answer(&here, delivery("evt_1", body, Some(forged))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    let (status, replayed, echoed) = answer(&there, delivery("evt_1", body, None)).await;
    assert_eq!(
        (status, replayed),
        (StatusCode::CREATED, false),
        "the real one is no duplicate"
    );
    assert_eq!(echoed, format!("applied 1: {body}"));
    // Its redelivery, signed anew, on the first instance: replayed, applied once.
    let (status, replayed, again) = answer(&here, delivery("evt_1", body, None)).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(again, echoed);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

async fn keys_from_the_body_dedupe_deliveries<B: Backend>(backend: B) {
    let calls = Arc::new(AtomicUsize::new(0));
    let by_event = |store: B::Store| -> Svc {
        BoxCloneService::new(
            ServiceBuilder::new()
                .layer(BufferedBodyLayer::new(64 * 1024))
                .layer(
                    IdempotencyLayer::new(store)
                        .route("events")
                        .unscoped()
                        .key(KeySpec::parse("json:/data/id").unwrap())
                        .fingerprint_json(
                            JsonIdentity::canonical()
                                .exclude(JsonPointer::parse("/sent_at").unwrap()),
                        ),
                )
                .service(applied(calls.clone())),
        )
    };
    let (here, there) = (by_event(backend.store()), by_event(backend.instance()));
    let post = |body: &'static str| {
        Request::post("/events")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let (status, replayed, first) = answer(
        &here,
        post(r#"{"data":{"id":"evt_7","amount":10},"sent_at":1}"#),
    )
    .await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    // Re-serialized by the sender's retry, on another instance: the same event.
    let (_, replayed, again) = answer(
        &there,
        post("{\"sent_at\":2, \"data\":{\"amount\":1E1,\"id\":\"evt_7\"}}"),
    )
    .await;
    assert!(replayed);
    assert_eq!(again, first);
    // The same id with another meaning: 422.
    let (status, _, _) = answer(&there, post(r#"{"data":{"id":"evt_7","amount":11}}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

macro_rules! on_every_store {
    ($($name:ident),+ $(,)?) => {
        mod memory {
            use super::*;
            $(#[tokio::test]
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
    a_forged_delivery_claims_no_real_id,
    keys_from_the_body_dedupe_deliveries
);

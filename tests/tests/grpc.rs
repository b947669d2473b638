//! Every layer answers a gRPC request's rejection as a gRPC status (a trailers-only
//! response), and a plain HTTP request's as a problem document. The idempotency cases
//! run on every store in `idempotency.rs`; the tonic end-to-end tests live in
//! `examples/grpc-orders/tests`.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::poll;
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keyward::core::gcra::Quota;
use keyward::core::problem::types;
use keyward::{KeySpec, MemoryStore, PerKeySerialLayer, QuotaLayer, SingleFlightLayer};
use tower::{Layer, ServiceExt, service_fn};

type Req = Request<Full<Bytes>>;

fn request(grpc: bool, key: &str) -> Req {
    let mut builder = Request::post("/orders.v1.Orders/UpdateOrder").header("x-key", key);
    if grpc {
        builder = builder.header("content-type", "application/grpc");
    }
    builder.body(Full::new(Bytes::from_static(b"msg"))).unwrap()
}

async fn ok(_req: Req) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

fn key() -> KeySpec {
    KeySpec::Header(HeaderName::from_static("x-key"))
}

/// Asserts a trailers-only gRPC rejection and returns its `grpc-status`.
async fn grpc_status<B>(res: Response<B>, problem: &str) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = res.into_parts();
    assert_eq!(parts.status, StatusCode::OK, "gRPC rejections are HTTP 200");
    assert_eq!(parts.headers["content-type"], "application/grpc");
    assert_eq!(parts.headers["keyward-problem-type"], problem);
    assert!(parts.headers.contains_key("grpc-message"));
    let collected = body.collect().await.unwrap();
    assert!(
        collected.trailers().is_none(),
        "trailers-only: no trailers frame"
    );
    assert!(collected.to_bytes().is_empty(), "trailers-only: no message");
    parts.headers["grpc-status"].to_str().unwrap().to_owned()
}

#[tokio::test(start_paused = true)]
async fn an_exceeded_quota_is_resource_exhausted_with_retry_metadata() {
    let quota = Quota::new(1, Duration::from_secs(60)).unwrap();
    let svc = QuotaLayer::new(MemoryStore::new(), quota)
        .key(key())
        .layer(service_fn(ok));
    assert_eq!(
        svc.clone()
            .oneshot(request(true, "a"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let res = svc.clone().oneshot(request(true, "a")).await.unwrap();
    assert_eq!(res.headers()["retry-after"], "60");
    assert!(res.headers().contains_key("ratelimit"));
    assert!(res.headers().contains_key("ratelimit-policy"));
    assert_eq!(grpc_status(res, types::QUOTA_EXCEEDED).await, "8");
    // The same rejection over plain HTTP is still a problem document.
    let http = svc.clone().oneshot(request(false, "a")).await.unwrap();
    assert_eq!(http.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(http.headers()["content-type"], "application/problem+json");
}

#[tokio::test(start_paused = true)]
async fn serial_queue_full_and_timeout_are_unavailable() {
    let svc = PerKeySerialLayer::new(MemoryStore::new())
        .key(key())
        .max_queue(1)
        .max_wait(Duration::from_secs(2))
        .layer(service_fn(ok));
    // The response body holds the key until it is dropped.
    let holder = svc.clone().oneshot(request(true, "a")).await.unwrap();
    let mut waiting = Box::pin(svc.clone().oneshot(request(true, "a")));
    assert!(poll!(&mut waiting).is_pending());
    let full = svc.clone().oneshot(request(true, "a")).await.unwrap();
    assert_eq!(full.headers()["retry-after"], "2");
    assert_eq!(grpc_status(full, types::SERIAL_QUEUE_FULL).await, "14");
    let timed_out = waiting.await.unwrap();
    assert_eq!(grpc_status(timed_out, types::SERIAL_TIMEOUT).await, "14");
    drop(holder);
}

#[tokio::test]
async fn an_unusable_single_flight_key_is_invalid_argument() {
    // `path:` without a route template cannot produce a key.
    let svc = SingleFlightLayer::new(MemoryStore::new())
        .methods([Method::POST])
        .key("path:id".parse::<KeySpec>().unwrap())
        .layer(service_fn(ok));
    let res = svc.oneshot(request(true, "a")).await.unwrap();
    assert_eq!(grpc_status(res, types::KEY_INVALID).await, "3");
}

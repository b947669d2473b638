//! Idempotent retries: `IdempotencyLayer`.
//!
//! Implements `draft-ietf-httpapi-idempotency-key-header` with Stripe's semantics:
//!
//! - The key comes from `Idempotency-Key` (an RFC 8941 sf-string `"abc"` or a bare
//!   token; 1..=255 visible ASCII characters), scoped by the principal (`Authorization`
//!   by default) and the route, so two callers never see each other's responses.
//!   Missing on a required route, or malformed: **400**.
//! - The request body is read up to `max_body` (default 1 MiB; larger: **413** before
//!   anything is claimed) and fingerprinted with the method, path and query. The same
//!   key with another fingerprint: **422**.
//! - The first request claims the key with a lease (default 30 s, renewed every third of
//!   it while the handler runs) and a fencing token, inserted into the request's
//!   extensions as [`FencingToken`](keyward_core::FencingToken) (a `PerKeySerialLayer`
//!   inside this layer replaces it with its own lock's token, the one a fenced resource
//!   should check). A duplicate while it
//!   runs: **409** with `Retry-After`, or with [`OnInFlight::Wait`] it waits (woken by the
//!   store, not by polling) and gets the stored response.
//! - A completed response (status, safe headers, body, trailers) is stored for `ttl`
//!   (default 24 h) and replayed with `Idempotent-Replayed: true`. `Set-Cookie`,
//!   `Authorization`, `Date` and hop-by-hop headers are never stored.
//! - 5xx, 408, 425, 429, bodies over `max_response`, panics and cancelled requests release
//!   the key so the client can retry (outcome `released`); an error from the inner
//!   service (no response at all, e.g. an upstream transport error) releases it as
//!   `ambiguous`.
//! - Rejections are `application/problem+json` with the stable types in
//!   [`keyward_core::problem::types`].
//! - gRPC (`content-type: application/grpc…`): the key comes from the
//!   `idempotency-key` metadata (the same header); rejections are gRPC statuses
//!   (`INVALID_ARGUMENT`, `FAILED_PRECONDITION` for a reused key, `ABORTED` while in
//!   flight; the table is in [`keyward_core::grpc`]). Since gRPC answers HTTP 200, the
//!   `grpc-status` decides what is stored: `OK` and deterministic errors are stored with
//!   their trailers and replayed; transient codes (`UNAVAILABLE`, `INTERNAL`, `UNKNOWN`,
//!   `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `ABORTED`, `CANCELLED`, `DATA_LOSS`)
//!   release the key. Use it on unary methods only: the request is read whole first.
//!   The layer hands the buffered request on, so the request body type must convert
//!   from `Bytes`: tonic's `Routes` (an axum router) gives a per-method layer such a body;
//!   as a tonic server layer, convert first with
//!   `.map_request(|req: http::Request<tonic::body::Body>| req.map(axum::body::Body::new))`
//!   (`examples/grpc-orders` does both).
//!
//! Every decision is one `keyward.idempotency` span with `keyward.route`,
//! `keyward.key_hash`, `keyward.outcome`, `keyward.wait_seconds` and
//! `keyward.fencing_token`.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use keyward::{IdempotencyLayer, MemoryStore};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let charges = Arc::new(AtomicUsize::new(0));
//! let counter = charges.clone();
//! let service = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(MemoryStore::new()).route("payments").required(true))
//!     .service_fn(move |_req: Request<Full<Bytes>>| {
//!         let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!         async move {
//!             Ok::<_, std::convert::Infallible>(
//!                 Response::builder().status(201).body(Full::new(Bytes::from(format!("charge {n}")))).unwrap(),
//!             )
//!         }
//!     });
//!
//! let pay = || Request::post("/payments").header("idempotency-key", "k-1").body(Full::new(Bytes::from("10 EUR"))).unwrap();
//! let first = service.clone().oneshot(pay()).await.unwrap();
//! let retry = service.clone().oneshot(pay()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), "charge 1");
//! assert_eq!(charges.load(Ordering::SeqCst), 1);
//! # }
//! ```

mod attempt;
mod claim;
mod layer;
mod request;
mod response;
mod service;

pub use crate::pipeline::{Boxed as Coordinated, ResponseFuture};
pub use layer::{
    IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, IdempotencyLayer, InspectError, OnInFlight, ReplayHeaders,
};
pub use service::IdempotencyService;

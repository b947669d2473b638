//! Request coalescing: concurrent identical requests share one inner call.
//!
//! [`SingleFlightLayer`] keys every GET and HEAD request (by default by method, path and
//! sorted query, scoped by the `Authorization` header so that two principals never share
//! a response). The authority (`Host`) and the request headers that select a
//! representation ([`SingleFlightLayer::vary`], default `Accept`, `Accept-Encoding`,
//! `Range`) are part of every key, whatever the extractor. While a request with a key is
//! in flight, later requests with the same key do not reach the inner service: they wait
//! and receive a copy of the leader's response (status, headers, body and trailers) with
//! the header `Keyward-Coalesced: true`. A copy never carries the headers no response
//! shares (`Set-Cookie`, `Authorization`, `Proxy-Authenticate`, `Date`, hop-by-hop).
//! A response that is not for others (`Cache-Control: private` or `no-store`, `Vary: *`
//! or `Vary` on a header outside the key) is not copied: followers make their own call.
//! Response extensions are not copied (they need not be `Clone`). Once the flight ends,
//! the next request starts a new one: this is coalescing, not caching, unless
//! [`SingleFlightLayer::reuse_for`] keeps the response a moment longer (micro-caching:
//! requests arriving within it get the landed response with an `Age` header).
//!
//! - **Leader cancelled.** The shared work is polled by whoever waits for it, not by a
//!   spawned task: if the leader's client goes away, a follower takes over polling and
//!   the inner call continues. It is dropped (cancelled) only when the last waiter
//!   leaves. The work runs in the leader's `keyward.single_flight` span.
//! - **Leader failed** (inner error, panic, body error): the leader gets its own error
//!   (a panic resumes in the leader's task); followers elect a new leader among
//!   themselves ([`LeaderFailure::Elect`], default) or answer 502
//!   `coalesced-leader-failed` ([`LeaderFailure::BadGateway`]). A panic while a follower
//!   drives counts as a failure for everyone.
//! - **Large responses.** Bodies are buffered up to `max_body` (default 8 MiB). A larger
//!   response streams through to the request that drove the flight (the leader), and
//!   each follower then makes its own inner call, uncoalesced.
//! - **Other instances.** Only the one request per process that drives a flight talks to
//!   the store ([`SingleFlightStore`](keyward_core::store::SingleFlightStore)): it leads
//!   the key there, or waits for the remote leader's landing and shares it with its local
//!   followers. Followers in-process never cost a store round trip; a flight costs two
//!   (lead, publish). Two layers sharing one `MemoryStore` coalesce with each other the
//!   same way. If the store fails, [`OnStoreError::Closed`](keyward_core::store::OnStoreError)
//!   answers 503 to the flight, `Open` coalesces in-process only.
//! - **Coalescing is not exactly-once.** A request arriving just as a flight lands may
//!   start the next flight; use `IdempotencyLayer` where running twice matters.
//! - **Memory.** The table of flights holds an entry only while its flight is in
//!   progress ([`SingleFlightService::flights_in_progress`]).
//!
//! Requests with a method that is not configured, or without a key, pass through. A key
//! that cannot be used is answered 400 `key-invalid`. The inner service's body must be
//! `Unpin` (hyper's, axum's and tonic's bodies are).
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use keyward::{MemoryStore, SingleFlightLayer};
//! use tokio::sync::Notify;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let gate = Arc::new(Notify::new());
//! let handler = service_fn({
//!     let (calls, gate) = (calls.clone(), gate.clone());
//!     move |_req: http::Request<()>| {
//!         let (calls, gate) = (calls.clone(), gate.clone());
//!         async move {
//!             calls.fetch_add(1, Ordering::SeqCst);
//!             gate.notified().await; // answer once both requests are in
//!             Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("report"))))
//!         }
//!     }
//! });
//! let svc = SingleFlightLayer::new(MemoryStore::new())
//!     .route("reports")
//!     .layer(handler);
//!
//! let get = || http::Request::get("/reports/7").body(()).unwrap();
//! let (leader, follower, ()) = tokio::join!(
//!     svc.clone().oneshot(get()),
//!     svc.clone().oneshot(get()),
//!     async { gate.notify_one() },
//! );
//! let (leader, follower) = (leader.unwrap(), follower.unwrap());
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//! assert!(leader.headers().get("keyward-coalesced").is_none());
//! assert_eq!(follower.headers()["keyward-coalesced"], "true");
//! assert_eq!(follower.into_body().collect().await.unwrap().to_bytes(), "report");
//! assert_eq!(svc.flights_in_progress(), 0);
//! # }
//! ```

mod flight;
mod layer;
mod service;
mod work;

pub use crate::pipeline::{Boxed as Coordinated, ResponseFuture};
#[allow(deprecated)]
pub use layer::DEFAULT_LEASE;
pub use layer::{DEFAULT_MAX_BODY, DEFAULT_VARY, LeaderFailure, SingleFlightLayer};
#[allow(deprecated)]
pub use service::SingleFlight;
pub use service::SingleFlightService;

/// Header on a follower's copy of the leader's response: `Keyward-Coalesced: true`.
pub const COALESCED: http::HeaderName = http::HeaderName::from_static("keyward-coalesced");

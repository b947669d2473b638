//! `QuotaLayer`: per-key rate limits (GCRA) with the IETF RateLimit headers.
//!
//! Each request's key (default `peer_ip`; usually `header:X-Api-Key` or a tenant id) gets
//! a [`Quota`](keyward_core::gcra::Quota): `limit` units per `per`, bursts of up to
//! `burst` (default `limit`). The decision is taken in `call`, one store round trip,
//! never by parking in `poll_ready`:
//!
//! - **allowed**: the inner service runs; the response carries
//!   `RateLimit-Policy: "NAME";q=LIMIT;w=WINDOW_SECONDS` and
//!   `RateLimit: "NAME";r=REMAINING;t=SECONDS_TO_RESET` (NAME = the policy name, by
//!   default the route name; `t` = seconds until the key's bucket is full again,
//!   rounded up, as keyward has always sent it; draft -10 and later describe `t` as an
//!   "effective window", which for GCRA would be the time to the next unit instead).
//! - **limited**: 429 `application/problem+json`, type
//!   [`QUOTA_EXCEEDED`](keyward_core::problem::types::QUOTA_EXCEEDED), the same two
//!   headers and `Retry-After` (whole seconds, rounded up, at least 1). A request whose
//!   cost exceeds the burst can never pass: it gets 429
//!   [`QUOTA_COST_OVER_BURST`](keyward_core::problem::types::QUOTA_COST_OVER_BURST)
//!   without `Retry-After`.
//! - **shadow** ([`QuotaLayer::shadow`]): would-be rejections go through, outcome
//!   `shadow_limited`, headers still added.
//! - no key: passed through, not counted, no headers; an unusable key: 400
//!   [`KEY_INVALID`](keyward_core::problem::types::KEY_INVALID).
//! - store failure: [`OnStoreError::Closed`](crate::OnStoreError) answers 503,
//!   `Open` lets the request through without headers; both log a warning.
//!
//! Per-key quotas: [`QuotaLayer::override_key`] (a table) and [`QuotaLayer::overrides`]
//! (a function); costs: [`QuotaLayer::cost`]. Quotas are not scoped by principal by
//! default (see [`QuotaLayer::scope`]). Every decision is a `keyward.quota` span with
//! `keyward.route`, `keyward.key_hash` and `keyward.outcome`
//! (`allowed|limited|shadow_limited|store_error`).
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use keyward::{KeySpec, MemoryStore, QuotaLayer};
//! use keyward::core::gcra::Quota;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let quota = Quota::new(2, Duration::from_secs(10)).unwrap();
//! let layer = QuotaLayer::new(MemoryStore::new(), quota)
//!     .route("search")
//!     .key(KeySpec::parse("header:x-api-key").unwrap());
//! let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
//! }));
//! let request = || Request::get("/").header("x-api-key", "k1").body(Full::default()).unwrap();
//!
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.headers()["ratelimit-policy"], r#""search";q=2;w=10"#);
//! assert_eq!(res.headers()["ratelimit"], r#""search";r=1;t=5"#);
//!
//! svc.clone().oneshot(request()).await.unwrap();
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["retry-after"], "5");
//! assert_eq!(res.headers()["ratelimit"], r#""search";r=0;t=10"#);
//! # }
//! ```

mod future;
mod layer;
mod service;

pub use crate::pipeline::ResponseFuture;
pub use future::Coordinated;
pub use layer::{Cost, QuotaLayer, QuotaPeek, UnitCost};
pub use service::QuotaService;

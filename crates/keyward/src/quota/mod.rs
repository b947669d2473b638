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
//! **Priced by the response** ([`QuotaLayer::charge_after`] with a [`ResponseCost`]):
//! when a request's cost is known only after the call (an upstream's `x-tokens-used`
//! header or trailer), or only some outcomes count (401/403 on a login route, 2xx for
//! paid calls). Admission before the call needs [`QuotaLayer::cost`] units left
//! (default one) and takes nothing; the response's units are charged when its body ends,
//! whether or not they fit, so a key may go into debt and then waits: 429 with the
//! `Retry-After` at which the debt is paid back.
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use bytes::Bytes;
//! use keyward::quota::ResponseCost;
//! use keyward::{KeySpec, MemoryStore, QuotaLayer};
//! use keyward::core::gcra::Quota;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! // 1000 tokens per minute; the upstream says what each answer cost.
//! let quota = Quota::new(1000, Duration::from_secs(60)).unwrap();
//! let layer = QuotaLayer::new(MemoryStore::new(), quota)
//!     .route("chat")
//!     .key(KeySpec::parse("header:x-api-key").unwrap())
//!     .charge_after(ResponseCost::header("x-tokens-used"));
//! let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
//!     let res = Response::builder().header("x-tokens-used", "1500").body(Full::new(Bytes::from("...")));
//!     Ok::<_, std::convert::Infallible>(res.unwrap())
//! }));
//! let request = || Request::post("/").header("x-api-key", "k1").body(Full::default()).unwrap();
//!
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! res.into_body().collect().await.unwrap(); // the charge lands: 500 tokens in debt
//!
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! // 501 tokens at 60 ms each until one token is free again.
//! assert_eq!(res.headers()["retry-after"], "31");
//! # }
//! ```
//!
//! **Several quotas on one route** (per second and per day; per API key and per IP):
//! stack quota layers, each with its own [`QuotaLayer::policy_name`] (and key, if it
//! differs). Every response lists each policy in `RateLimit-Policy` (innermost first)
//! and carries one `RateLimit`, of the policy closest to its limit: fewest units left,
//! on a tie the longest to reset. Layers decide one after the other, outermost first: a
//! request refused by an inner quota has already taken a unit of the outer ones, so put
//! short windows outside.
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use keyward::{KeySpec, MemoryStore, QuotaLayer};
//! use keyward::core::gcra::Quota;
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let key = KeySpec::parse("header:x-api-key").unwrap();
//! let per_second = QuotaLayer::new(store.clone(), Quota::per_second(10).unwrap())
//!     .route("search").policy_name("per-second").key(key.clone());
//! let per_day = QuotaLayer::new(store.clone(), Quota::new(12, Duration::from_secs(86_400)).unwrap())
//!     .route("search").policy_name("per-day").key(key);
//! let svc = per_second.layer(per_day.layer(service_fn(|_req: Request<Full<Bytes>>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
//! })));
//! let request = || Request::get("/").header("x-api-key", "k1").body(Full::default()).unwrap();
//!
//! for _ in 0..4 {
//!     svc.clone().oneshot(request()).await.unwrap();
//! }
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! let policies: Vec<_> = res.headers().get_all("ratelimit-policy").iter().collect();
//! assert_eq!(policies, [r#""per-day";q=12;w=86400"#, r#""per-second";q=10;w=1"#]);
//! // 5 of 10 left per second, 7 of 12 per day: the second is closer to its limit.
//! assert_eq!(res.headers()["ratelimit"], r#""per-second";r=5;t=1"#);
//! for _ in 0..5 {
//!     svc.clone().oneshot(request()).await.unwrap();
//! }
//! tokio::time::advance(Duration::from_secs(1)).await;
//! let res = svc.clone().oneshot(request()).await.unwrap();
//! // The day has 1 left, the second 9 again: now the day is closer.
//! assert!(res.headers()["ratelimit"].to_str().unwrap().starts_with(r#""per-day";r=1;"#));
//! # }
//! ```
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

mod body;
mod charge;
mod future;
mod layer;
mod service;

pub use crate::pipeline::ResponseFuture;
pub use body::ChargeBody;
pub use charge::{ResponseCost, StatusSet, StatusSetError};
pub use future::Coordinated;
pub use layer::{Cost, QuotaLayer, QuotaPeek, UnitCost};
pub use service::QuotaService;

//! `PerKeySerialLayer`: at most one request per key inside the service at a time, in
//! arrival order.
//!
//! Every request yields a key (by default `method_uri`; usually a resource id such as
//! `path:id` or a header). A request whose key is free goes straight in; one whose key is
//! busy queues behind it and is let in when the request ahead of it is completely done:
//! its response body read to the end (or failed), or dropped. Requests are let in in the
//! order they arrived.
//!
//! - Each request let in carries a [`FencingToken`](keyward_core::FencingToken),
//!   strictly increasing per key, as a request extension and as the
//!   `Keyward-Fencing-Token` header, so that the resource behind the service can refuse a
//!   write from a holder that has been superseded. A client-sent header of that name is
//!   replaced, or removed when the request is not coordinated.
//! - A request that waits longer than `max_wait` (default 5 s) gets 503
//!   `serial-wait-timeout`; one that finds `max_queue` requests (default 64) already
//!   waiting gets 503 `serial-queue-full` at once. Both carry `Retry-After` of `max_wait`
//!   (the time the key was just seen to be busy for).
//! - A request cancelled while waiting leaves the queue; an inner call that fails or
//!   panics, or a response future dropped midway, releases the key.
//! - Requests without a key pass through uncoordinated; an unusable key is 400
//!   `key-invalid`.
//! - Keys are not scoped by principal: the point is mutual exclusion on a resource, which
//!   must hold whoever calls.
//! - A failing store gives 503 `store-unavailable` (`OnStoreError::Closed`, default) or
//!   lets the request through uncoordinated (`Open`).
//!
//! Each decision is a `keyward.serial` span with `keyward.route`, `keyward.key_hash`,
//! `keyward.outcome` (`acquired|timeout|queue_full|store_error`),
//! `keyward.wait_seconds` and `keyward.fencing_token`; the inner call runs inside it.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use keyward::{MemoryStore, PerKeySerialLayer};
//! use keyward_core::{FencingToken, KeySpec};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! let layer = PerKeySerialLayer::new(MemoryStore::new())
//!     .route("accounts")
//!     .key("header:x-account".parse::<KeySpec>().unwrap())
//!     .max_wait(Duration::from_millis(50))
//!     .max_queue(8);
//! let svc = layer.layer(service_fn(|req: Request<Full<Bytes>>| async move {
//!     let token = req.extensions().get::<FencingToken>().unwrap().get();
//!     assert_eq!(req.headers()["keyward-fencing-token"], token.to_string().as_str());
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(token.to_string()))))
//! }));
//! let request = || Request::get("/").header("x-account", "42").body(Full::default()).unwrap();
//!
//! // The first response holds the key until its body is read or dropped...
//! let first = svc.clone().oneshot(request()).await.unwrap();
//! let waited = svc.clone().oneshot(request()).await.unwrap();
//! assert_eq!(waited.status(), StatusCode::SERVICE_UNAVAILABLE);
//! assert!(waited.headers().contains_key("retry-after"));
//!
//! // ...and the next holder gets a higher fencing token.
//! let first_token: u64 = String::from_utf8(first.into_body().collect().await.unwrap().to_bytes().to_vec())
//!     .unwrap().parse().unwrap();
//! let second = svc.clone().oneshot(request()).await.unwrap();
//! let second_token: u64 = String::from_utf8(second.into_body().collect().await.unwrap().to_bytes().to_vec())
//!     .unwrap().parse().unwrap();
//! assert!(second_token > first_token);
//! # });
//! ```

mod body;
mod future;
mod hold;
mod layer;
mod service;

pub use crate::pipeline::ResponseFuture;
pub use body::PermitBody;
pub use future::Coordinated;
pub use layer::PerKeySerialLayer;
#[allow(deprecated)]
pub use service::PerKeySerial;
pub use service::PerKeySerialService;

use http::HeaderName;
use http::Request;

/// The header carrying the holder's fencing token to the inner service.
pub const FENCING_TOKEN_HEADER: HeaderName = HeaderName::from_static("keyward-fencing-token");

/// Uncoordinated requests must not carry a token a client made up.
fn remove_fencing_header<B>(req: &mut Request<B>) {
    req.headers_mut().remove(FENCING_TOKEN_HEADER);
}

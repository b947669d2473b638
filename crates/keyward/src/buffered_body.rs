//! Reading the request body before the keyed layers: [`BufferedBodyLayer`].
//!
//! Keys from the body (`json:/POINTER` [`KeySpec`](keyward_core::KeySpec)s, for
//! providers that put the event id in the payload) need the body before the key is
//! taken, but a key extractor only sees the request. This layer reads the body whole, up
//! to `max_body` (larger: **413** `request-body-too-large` before any inner layer runs;
//! a failing stream: **400** `request-body-unreadable`), puts it in the request's
//! extensions as [`BufferedBody`] and hands the inner service a request with the very
//! same bytes as its body. Layers inside it that read the body again (idempotency
//! fingerprints) take it from the extension.
//!
//! A [`BodyCheck`] can look at the body before it goes on and answer with a problem
//! instead: [`StandardWebhooks`](crate::webhook::StandardWebhooks) verifies a webhook's
//! signature this way, before any idempotency layer inside it dedupes on its id.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use keyward::{BufferedBodyLayer, IdempotencyLayer, KeySpec, MemoryStore};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let applied = Arc::new(AtomicUsize::new(0));
//! let counter = applied.clone();
//! let service = ServiceBuilder::new()
//!     .layer(BufferedBodyLayer::new(64 * 1024))
//!     .layer(IdempotencyLayer::new(MemoryStore::new()).route("events").unscoped()
//!         .key(KeySpec::parse("json:/event/id").unwrap()).required(true))
//!     .service_fn(move |req: http::Request<Full<Bytes>>| {
//!         let counter = counter.clone();
//!         async move {
//!             // The service still gets the whole body.
//!             let body = req.into_body().collect().await.unwrap().to_bytes();
//!             counter.fetch_add(1, Ordering::SeqCst);
//!             Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
//!         }
//!     });
//! let deliver = || {
//!     let body = r#"{"event":{"id":"evt_1","type":"paid"}}"#;
//!     service.clone().oneshot(http::Request::post("/events").body(Full::new(Bytes::from(body))).unwrap())
//! };
//! let first = deliver().await.unwrap();
//! let again = deliver().await.unwrap();
//! assert_eq!(again.headers()["idempotent-replayed"], "true");
//! assert_eq!(again.into_body().collect().await.unwrap().to_bytes(), r#"{"event":{"id":"evt_1","type":"paid"}}"#);
//! assert_eq!(applied.load(Ordering::SeqCst), 1);
//! # drop(first);
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use keyward_core::grpc::Protocol;
use keyward_core::{BufferedBody, KeywardBody, Problem};
use tower_layer::Layer;
use tower_service::Service;

use crate::pipeline::{Boxed, ResponseFuture, read_body};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A look at a whole request body before the request goes on: `Err` answers the request
/// with that problem instead.
pub trait BodyCheck {
    /// Checks the request's head and body.
    fn check(&self, parts: &Parts, body: &Bytes) -> Result<(), Problem>;
}

/// The check of a plain [`BufferedBodyLayer`]: every body goes on.
#[derive(Clone, Copy, Debug, Default)]
pub struct AnyBody;

impl BodyCheck for AnyBody {
    fn check(&self, _parts: &Parts, _body: &Bytes) -> Result<(), Problem> {
        Ok(())
    }
}

/// Reads the request body (up to `max_body`) into a [`BufferedBody`] extension, checks
/// it with `C`, and passes the request on with the same bytes: see the [module
/// docs](crate::buffered_body).
pub struct BufferedBodyLayer<C = AnyBody> {
    max_body: usize,
    check: Arc<C>,
}

impl BufferedBodyLayer {
    /// Reads bodies up to `max_body` bytes; larger ones get 413.
    pub fn new(max_body: usize) -> Self {
        BufferedBodyLayer {
            max_body,
            check: Arc::new(AnyBody),
        }
    }
}

impl<C> BufferedBodyLayer<C> {
    /// Checks every body with `check` before the request goes on.
    pub fn check<C2>(self, check: C2) -> BufferedBodyLayer<C2> {
        BufferedBodyLayer {
            max_body: self.max_body,
            check: Arc::new(check),
        }
    }
}

impl<C> Clone for BufferedBodyLayer<C> {
    fn clone(&self) -> Self {
        BufferedBodyLayer {
            max_body: self.max_body,
            check: self.check.clone(),
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for BufferedBodyLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferedBodyLayer")
            .field("max_body", &self.max_body)
            .field("check", &self.check)
            .finish()
    }
}

impl<S, C> Layer<S> for BufferedBodyLayer<C> {
    type Service = BufferedBodyService<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        BufferedBodyService {
            inner,
            max_body: self.max_body,
            check: self.check.clone(),
        }
    }
}

/// The service made by [`BufferedBodyLayer`].
pub struct BufferedBodyService<S, C = AnyBody> {
    inner: S,
    max_body: usize,
    check: Arc<C>,
}

impl<S: Clone, C> Clone for BufferedBodyService<S, C> {
    fn clone(&self) -> Self {
        BufferedBodyService {
            inner: self.inner.clone(),
            max_body: self.max_body,
            check: self.check.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for BufferedBodyService<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferedBodyService")
            .field("inner", &self.inner)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl<S, C, B, ResB> Service<Request<B>> for BufferedBodyService<S, C>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    C: BodyCheck + Send + Sync + 'static,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
{
    type Response = Response<KeywardBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Boxed<ResB, S::Error>, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready service takes the request; the clone left behind waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (max_body, check) = (self.max_body, self.check.clone());
        ResponseFuture::coordinated(Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let protocol = Protocol::of(&parts.headers);
            let body = match read_body(&parts, body, max_body).await {
                Ok(body) => body,
                Err(rejection) => {
                    let problem = rejection.problem(max_body, "request bodies");
                    return Ok(problem.into_keyward_response(protocol));
                }
            };
            if let Err(problem) = check.check(&parts, &body) {
                return Ok(problem.into_keyward_response(protocol));
            }
            parts.extensions.insert(BufferedBody(body.clone()));
            let res = inner.call(Request::from_parts(parts, B::from(body))).await;
            res.map(|res| res.map(KeywardBody::inner))
        }))
    }
}

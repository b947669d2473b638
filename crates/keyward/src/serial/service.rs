use std::fmt;
use std::mem;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
use keyward_core::grpc::Protocol;
use keyward_core::store::SerialStore;
use keyward_core::telemetry::SPAN_SERIAL;
use keyward_core::{KeyExtractor, KeySpec, KeywardBody, Problem, Scope, ScopedKey};
use tower_service::Service;
use tracing::field::Empty;

use super::body::PermitBody;
use super::future::ResponseFuture;
use super::layer::Config;
use super::remove_fencing_header;

/// The service built by [`PerKeySerialLayer`](super::PerKeySerialLayer).
pub struct PerKeySerial<S, St, K = KeySpec> {
    inner: S,
    store: St,
    key: Arc<K>,
    config: Config,
}

impl<S, St, K> PerKeySerial<S, St, K> {
    pub(crate) fn new(inner: S, store: St, key: Arc<K>, config: Config) -> Self {
        PerKeySerial {
            inner,
            store,
            key,
            config,
        }
    }
}

impl<S, St, K, ReqBody, ResBody> Service<Request<ReqBody>> for PerKeySerial<S, St, K>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    St: SerialStore,
    K: KeyExtractor<ReqBody>,
    ResBody: Body,
{
    type Response = Response<KeywardBody<PermitBody<ResBody, St>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, St, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let key = match self.key.extract(&req) {
            Ok(Some(key)) => key,
            Ok(None) => {
                remove_fencing_header(&mut req);
                return ResponseFuture::uncoordinated(self.inner.call(req));
            }
            Err(err) => {
                tracing::debug!(route = %self.config.route, error = %err, "serial key invalid");
                let protocol = Protocol::of(req.headers());
                return ResponseFuture::rejected(Problem::key_invalid(&err), protocol);
            }
        };
        let key = ScopedKey::new("serial", &self.config.route, Scope::Unscoped, key);
        let span = tracing::info_span!(
            SPAN_SERIAL,
            keyward.route = %self.config.route,
            keyward.key_hash = %key.key_hash(),
            keyward.outcome = Empty,
            keyward.wait_seconds = Empty,
            keyward.fencing_token = Empty,
        );
        // The inner call happens once the key is ours: take the service that was driven to
        // readiness and leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = mem::replace(&mut self.inner, clone);
        ResponseFuture::acquiring(inner, req, self.store.clone(), key, &self.config, span)
    }
}

impl<S: Clone, St: Clone, K> Clone for PerKeySerial<S, St, K> {
    fn clone(&self) -> Self {
        PerKeySerial {
            inner: self.inner.clone(),
            store: self.store.clone(),
            key: self.key.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, St, K> fmt::Debug for PerKeySerial<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerKeySerial")
            .field("inner", &self.inner)
            .field("route", &self.config.route)
            .field("max_wait", &self.config.limits.max_wait)
            .field("max_queue", &self.config.limits.max_queue)
            .finish_non_exhaustive()
    }
}

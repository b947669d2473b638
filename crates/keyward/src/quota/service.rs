use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use keyward_core::grpc::Protocol;
use keyward_core::store::QuotaStore;
use keyward_core::telemetry::FIELD_KEY_HASH;
use keyward_core::{KeyExtractor, Problem, Scope, ScopedKey};
use tower_service::Service;

use super::future::{Decide, ResponseFuture};
use super::layer::{Config, Cost};

/// Short layer name in stored keys: `quota:{route}[/{policy}]:{scope}:{key}`.
const LAYER: &str = "quota";

/// Enforces per-key quotas; built by [`QuotaLayer`](super::QuotaLayer).
pub struct QuotaService<S, St, K, C> {
    pub(crate) inner: S,
    pub(crate) store: St,
    pub(crate) config: Arc<Config<K, C>>,
}

impl<S: Clone, St: Clone, K, C> Clone for QuotaService<S, St, K, C> {
    fn clone(&self) -> Self {
        QuotaService {
            inner: self.inner.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug, St, K, C> fmt::Debug for QuotaService<S, St, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaService")
            .field("inner", &self.inner)
            .field("route", &self.config.settings.route)
            .finish_non_exhaustive()
    }
}

impl<S, St, K, C, B, ResB> Service<Request<B>> for QuotaService<S, St, K, C>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    St: QuotaStore,
    K: KeyExtractor<B>,
    C: Cost<B>,
    ResB: http_body::Body,
{
    type Response = Response<keyward_core::KeywardBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<St::CheckFuture, S, Request<B>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The clone may not be ready; the instance poll_ready was called on is.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let config = &*self.config;
        let settings = &config.settings;
        let protocol = Protocol::of(req.headers());

        let (key, scope) = match config.key.extract(&req).and_then(|key| {
            key.map(|key| {
                Scope::of_request(settings.scope.as_ref(), &req).map(|scope| (key, scope))
            })
            .transpose()
        }) {
            Ok(Some(found)) => found,
            // No key: the request is not counted against any quota.
            Ok(None) => return ResponseFuture::pass_through(inner.call(req)),
            Err(error) => {
                return ResponseFuture::ready(
                    Problem::key_invalid(&error).into_response_for(protocol),
                );
            }
        };

        let span = tracing::info_span!(
            "keyward.quota",
            keyward.route = %settings.route,
            keyward.key_hash = tracing::field::Empty,
            keyward.outcome = tracing::field::Empty,
        );
        let policy = settings.policy_for(&key);
        let cost = config.cost.cost(&req);
        let key = ScopedKey::new(LAYER, &settings.storage_route, scope, key);
        if !span.is_disabled() {
            span.record(FIELD_KEY_HASH, key.key_hash().as_str());
        }
        let started = std::time::Instant::now();
        let check = {
            let _entered = span.enter();
            self.store.check(&key, &policy.quota, cost)
        };
        ResponseFuture::checking(
            check,
            inner,
            req,
            Decide {
                name: settings.name().clone(),
                quota: policy.quota,
                policy: policy.header,
                cost,
                shadow: settings.shadow,
                on_store_error: settings.on_store_error,
                metrics: settings.metrics.clone(),
                started,
                protocol,
                span,
            },
        )
    }
}

/// A problem response in the layer's body type.
pub(crate) fn into_body<ResB: http_body::Body>(
    res: Response<Bytes>,
) -> Response<keyward_core::KeywardBody<ResB>> {
    res.map(keyward_core::KeywardBody::full)
}

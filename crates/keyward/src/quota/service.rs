use std::fmt;
use std::task::{Context, Poll};

use http::{Request, Response};
use keyward_core::store::QuotaStore;
use keyward_core::telemetry::STORE_OP_CHECK;
use keyward_core::{KeyExtractor, KeywardBody};
use tower_service::Service;

use super::body::ChargeBody;
use super::future::{ChargeTo, Coordinated, Decide};
use super::layer::{Cost, QuotaSettings};
use crate::pipeline::{Keyed, KeyedService, ResponseFuture};

/// Enforces per-key quotas; built by [`QuotaLayer`](super::QuotaLayer).
pub struct QuotaService<S, St, K, C> {
    pub(crate) core: KeyedService<S, St, K, QuotaSettings<C>>,
}

impl<S: Clone, St: Clone, K, C> Clone for QuotaService<S, St, K, C> {
    fn clone(&self) -> Self {
        QuotaService {
            core: self.core.clone(),
        }
    }
}

impl<S: fmt::Debug, St, K, C> fmt::Debug for QuotaService<S, St, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaService")
            .field("inner", &self.core.inner)
            .field("route", &self.core.config.common.route)
            .finish_non_exhaustive()
    }
}

impl<S, St, K, C, B, ResB> Service<Request<B>> for QuotaService<S, St, K, C>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    St: QuotaStore,
    K: KeyExtractor<B>,
    C: Cost<B> + Clone,
    ResB: http_body::Body,
{
    type Response = Response<KeywardBody<ChargeBody<ResB, St>>>;
    type Error = S::Error;
    type Future = ResponseFuture<
        S::Future,
        Coordinated<St::CheckFuture, S, Request<B>, St>,
        ChargeBody<ResB, St>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.core.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Keyed {
            inner,
            req,
            key,
            raw,
            trace,
            protocol,
        } = match self.core.prepare(req).keyed() {
            Ok(keyed) => keyed,
            // No key: the request is not counted against any quota.
            Err(answered_or_passed) => return answered_or_passed,
        };
        let config = &*self.core.config;
        let own = &config.own;
        let policy = own.policy_for(&raw);
        let cost = own.cost.cost(&req);
        let metrics = config.common.metrics.clone();
        let timer = metrics.store_call(STORE_OP_CHECK);
        let store = &self.core.store;
        let check = {
            let _entered = trace.span.enter();
            match own.charge_after {
                None => store.check(&key, &policy.quota, cost),
                Some(_) => store.peek(&key, &policy.quota, cost),
            }
        };
        let charge = own.charge_after.as_ref().map(|cost| {
            Box::new(ChargeTo {
                cost: cost.clone(),
                store: store.clone(),
                key,
            })
        });
        let decide = Decide {
            name: own.name.clone(),
            quota: policy.quota,
            policy: policy.header,
            cost,
            shadow: own.shadow,
            on_store_error: config.common.on_store_error,
            metrics,
            timer: Some(timer),
            protocol,
            trace,
            charge,
        };
        ResponseFuture::coordinated(Coordinated::new(check, inner, req, decide))
    }
}

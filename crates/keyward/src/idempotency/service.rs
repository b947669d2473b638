use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use keyward_core::problem::types;
use keyward_core::store::IdempotencyStore;
use keyward_core::telemetry::IdempotencyOutcome;
use keyward_core::{KeyExtractor, KeywardBody, Problem};
use tower_service::Service;
use tracing::Instrument;

use crate::DecisionReporter;
use crate::pipeline::Trace;

use super::attempt::Attempt;
use super::layer::IdempotencySettings;
use crate::pipeline::{Boxed, Keyed, KeyedService, Prepared, ResponseFuture};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Makes retried requests idempotent; built by
/// [`IdempotencyLayer`](super::IdempotencyLayer).
pub struct IdempotencyService<S, St, K> {
    pub(crate) core: KeyedService<S, St, K, IdempotencySettings>,
}

impl<S: Clone, St: Clone, K> Clone for IdempotencyService<S, St, K> {
    fn clone(&self) -> Self {
        IdempotencyService {
            core: self.core.clone(),
        }
    }
}

impl<S: fmt::Debug, St, K> fmt::Debug for IdempotencyService<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("inner", &self.core.inner)
            .field("route", &self.core.config.common.route)
            .finish_non_exhaustive()
    }
}

impl<S, St, K, B, ResB> Service<Request<B>> for IdempotencyService<S, St, K>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    St: IdempotencyStore,
    K: KeyExtractor<B> + Send + Sync + 'static,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + Unpin + 'static,
    ResB::Error: Send,
{
    type Response = Response<KeywardBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Boxed<ResB, S::Error>, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.core.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Keyed {
            inner,
            req,
            key,
            trace,
            protocol,
            ..
        } = match self.core.prepare(req) {
            Prepared::Keyed(keyed) => keyed,
            Prepared::NoKey { mut inner, req } => {
                let config = &self.core.config;
                let reporter = req.extensions().get::<DecisionReporter>();
                let trace = config.trace(config.span(), reporter, None);
                self.record(&trace, IdempotencyOutcome::MissingKey);
                if !config.own.required {
                    let _entered = trace.span.enter();
                    return ResponseFuture::pass_through(inner.call(req));
                }
                let problem = Problem::new(
                    StatusCode::BAD_REQUEST,
                    types::IDEMPOTENCY_KEY_MISSING,
                    "Idempotency-Key required",
                )
                .detail(format!(
                    "this route requires a key from {}",
                    config.key_name
                ));
                let protocol = keyward_core::grpc::Protocol::of(req.headers());
                return ResponseFuture::answered(problem.into_keyward_response(protocol));
            }
            Prepared::Invalid {
                error,
                protocol,
                reporter,
            } => {
                let config = &self.core.config;
                let trace = config.trace(config.span(), reporter.as_ref(), None);
                self.record(&trace, IdempotencyOutcome::InvalidKey);
                let problem = Problem::new(
                    StatusCode::BAD_REQUEST,
                    types::IDEMPOTENCY_KEY_INVALID,
                    "Invalid Idempotency-Key",
                )
                .detail(error.to_string());
                return ResponseFuture::answered(problem.into_keyward_response(protocol));
            }
        };
        let attempt = Attempt {
            store: self.core.store.clone(),
            config: self.core.config.clone(),
            key,
            trace: trace.clone(),
            protocol,
        };
        ResponseFuture::coordinated(Box::pin(attempt.run(inner, req).instrument(trace.span)))
    }
}

impl<S, St, K> IdempotencyService<S, St, K> {
    fn record(&self, trace: &Trace, outcome: IdempotencyOutcome) {
        self.core
            .config
            .common
            .metrics
            .decided(trace, outcome.as_str());
    }
}

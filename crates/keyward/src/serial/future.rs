use crate::pipeline::Trace;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use keyward_core::grpc::Protocol;
use keyward_core::problem::types;
use keyward_core::store::{
    AcquireOutcome, OnStoreError, SerialLimits, SerialPermit, SerialStore, StoreError,
};
use keyward_core::telemetry::{FIELD_FENCING_TOKEN, STORE_OP_ACQUIRE, SerialOutcome};
use keyward_core::{FencingToken, KeywardBody, Problem};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::body::{PermitBody, PermitGuard};
use super::hold::HoldLimit;
use super::layer::SerialSettings;
use super::{FENCING_TOKEN_HEADER, remove_fencing_header};
use crate::pipeline::{Config, Keyed};
use crate::telemetry::{LayerMetrics, WaitingNow};

type AcquireFuture = Pin<Box<dyn Future<Output = Result<AcquireOutcome, StoreError>> + Send>>;

pin_project! {
    /// The coordinated part of [`PerKeySerialService`](super::PerKeySerialService)'s
    /// response future: waits for the key's turn, then runs the inner service and moves
    /// the key into the response body.
    pub struct Coordinated<S, St, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        St: SerialStore,
    {
        #[pin]
        state: State<S, St, ReqBody>,
        trace: Trace,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, St, ReqBody>
    where
        S: Service<Request<ReqBody>>,
        St: SerialStore,
    {
        Rejected {
            response: Option<Response<Bytes>>,
        },
        Acquiring {
            acquire: AcquireFuture,
            waiting: Option<Waiting<S, St, ReqBody>>,
        },
        Calling {
            #[pin]
            future: S::Future,
            guard: Option<PermitGuard<St>>,
        },
    }
}

/// What a request waiting for its turn keeps until then.
struct Waiting<S, St, ReqBody> {
    inner: S,
    req: Request<ReqBody>,
    store: St,
    limits: SerialLimits,
    max_hold: Option<HoldLimit>,
    on_store_error: OnStoreError,
    metrics: LayerMetrics,
    /// When the first poll found the key busy; `None` while it never had to wait, which
    /// spares the uncontended path two clock reads.
    queued_at: Option<Instant>,
    /// Counts this request in the queue depth while it waits (dropped with `Waiting`).
    queued: Option<WaitingNow>,
}

impl<S, St, ReqBody> Coordinated<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: SerialStore,
{
    pub(crate) fn new<K>(
        keyed: Keyed<S, ReqBody>,
        store: St,
        config: &Config<K, SerialSettings>,
    ) -> Self {
        let Keyed {
            inner,
            req,
            key,
            trace,
            ..
        } = keyed;
        let limits = config.own.limits;
        let acquiring_store = store.clone();
        let acquire: AcquireFuture =
            Box::pin(async move { acquiring_store.acquire(&key, limits).await });
        let waiting = Waiting {
            inner,
            req,
            store,
            limits,
            max_hold: config.own.max_hold.clone(),
            on_store_error: config.common.on_store_error,
            metrics: config.common.metrics.clone(),
            queued_at: None,
            queued: None,
        };
        Coordinated {
            state: State::Acquiring {
                acquire,
                waiting: Some(waiting),
            },
            trace,
        }
    }
}

impl<S, St, ReqBody, ResBody> Future for Coordinated<S, St, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    St: SerialStore,
    ResBody: Body,
{
    type Output = Result<Response<KeywardBody<PermitBody<ResBody, St>>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.trace.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { response } => {
                    // `None` only if polled again after completion, which futures need not
                    // answer.
                    return match response.take() {
                        Some(response) => Poll::Ready(Ok(response.map(KeywardBody::full))),
                        None => Poll::Pending,
                    };
                }
                StateProj::Acquiring { acquire, waiting } => {
                    let Poll::Ready(outcome) = acquire.as_mut().poll(cx) else {
                        if let Some(waiting) = waiting.as_mut() {
                            if waiting.queued_at.is_none() {
                                waiting.queued_at = Some(Instant::now());
                                waiting.queued = Some(waiting.metrics.waiting());
                            }
                        }
                        return Poll::Pending;
                    };
                    let Some(waiting) = waiting.take() else {
                        return Poll::Pending;
                    };
                    let next = decide(waiting, outcome, this.trace);
                    this.state.set(next);
                }
                StateProj::Calling { future, guard } => {
                    let result = ready!(future.poll(cx));
                    // On error the guard is dropped here, releasing the key.
                    let guard = guard.take();
                    return Poll::Ready(result.map(|response| {
                        response.map(|body| KeywardBody::inner(PermitBody::new(body, guard)))
                    }));
                }
            }
        }
    }
}

/// Turns the store's answer into the next state: the inner call (holding the key, or
/// uncoordinated when the store failed open) or a rejection.
fn decide<S, St, ReqBody>(
    waiting: Waiting<S, St, ReqBody>,
    outcome: Result<AcquireOutcome, StoreError>,
    trace: &Trace,
) -> State<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: SerialStore,
{
    let Waiting {
        mut inner,
        mut req,
        store,
        limits,
        max_hold,
        on_store_error,
        metrics,
        queued_at,
        queued,
    } = waiting;
    drop(queued);
    let waited = queued_at.map_or(Duration::ZERO, |at| at.elapsed());
    metrics.waited(&trace.span, waited.as_secs_f64());
    if let Err(error) = &outcome {
        metrics.store_failed(STORE_OP_ACQUIRE, error);
        if on_store_error == OnStoreError::Open {
            metrics.failed_open();
        }
    }
    let (outcome, rejection, permit) = classify(outcome, limits, on_store_error);
    metrics.decided(trace, outcome.as_str());
    if let Some(permit) = &permit {
        trace.span.record(FIELD_FENCING_TOKEN, permit.token().get());
        forward_token(&mut req, permit.token());
    } else {
        remove_fencing_header(&mut req);
    }
    match rejection {
        Some(problem) => State::Rejected {
            response: Some(problem.into_response_for(Protocol::of(req.headers()))),
        },
        None => {
            // Should `call` panic, unwinding drops the guard and so releases the key.
            let guard = permit.map(|permit| PermitGuard::new(store, permit, max_hold));
            State::Calling {
                future: inner.call(req),
                guard,
            }
        }
    }
}

/// The store's answer as a span outcome, plus either a rejection or the permit to run
/// with (none when the store failed open).
fn classify(
    outcome: Result<AcquireOutcome, StoreError>,
    limits: SerialLimits,
    on_store_error: OnStoreError,
) -> (SerialOutcome, Option<Problem>, Option<SerialPermit>) {
    match outcome {
        Ok(AcquireOutcome::Acquired(permit)) => (SerialOutcome::Acquired, None, Some(permit)),
        Ok(AcquireOutcome::Timeout) => {
            let detail = format!(
                "waited {:?} for earlier requests with the same key",
                limits.max_wait
            );
            let title = "Timed out waiting for the key";
            let problem = busy(types::SERIAL_TIMEOUT, title, detail, limits);
            (SerialOutcome::Timeout, Some(problem), None)
        }
        Ok(AcquireOutcome::QueueFull) => {
            let detail = format!(
                "{} requests with the same key are already waiting",
                limits.max_queue
            );
            let title = "Too many requests waiting for the key";
            let problem = busy(types::SERIAL_QUEUE_FULL, title, detail, limits);
            (SerialOutcome::QueueFull, Some(problem), None)
        }
        Err(err) => {
            tracing::warn!(error = %err, policy = ?on_store_error, "serial store failed");
            match on_store_error {
                OnStoreError::Closed => (
                    SerialOutcome::StoreError,
                    Some(Problem::store_unavailable()),
                    None,
                ),
                OnStoreError::Open => (SerialOutcome::StoreError, None, None),
            }
        }
    }
}

/// A 503 for a request that did not get its key's turn. `Retry-After` is `max_wait`: the
/// key was just seen busy for that long, so an earlier retry would likely meet the same
/// queue.
fn busy(
    type_uri: &'static str,
    title: &'static str,
    detail: String,
    limits: SerialLimits,
) -> Problem {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, type_uri, title)
        .detail(detail)
        .retry_after(limits.max_wait)
}

fn forward_token<B>(req: &mut Request<B>, token: FencingToken) {
    req.headers_mut()
        .insert(FENCING_TOKEN_HEADER, HeaderValue::from(token.get()));
    req.extensions_mut().insert(token);
}

impl<S, St, ReqBody> fmt::Debug for Coordinated<S, St, ReqBody>
where
    S: Service<Request<ReqBody>>,
    St: SerialStore,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Rejected { .. } => "rejected",
            State::Acquiring { .. } => "acquiring",
            State::Calling { .. } => "calling",
        };
        f.debug_struct("serial::Coordinated")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

use crate::pipeline::Trace;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::Entry;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use keyward_core::ScopedKey;
use keyward_core::gcra::{Quota, QuotaDecision};
use keyward_core::grpc::Protocol;
use keyward_core::problem::types;
use keyward_core::ratelimit::{
    RATELIMIT, RATELIMIT_POLICY, format_ratelimit, parse_item, to_header_value,
};
use keyward_core::store::{OnStoreError, QuotaStore, StoreError};
use keyward_core::telemetry::QuotaOutcome;
use keyward_core::{KeywardBody, Problem};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{ChargeBody, PendingCharge};
use super::charge::ResponseCost;
use crate::telemetry::{LayerMetrics, StoreCall};

/// Where a quota priced by its responses charges them.
pub(crate) struct ChargeTo<St> {
    pub(crate) cost: ResponseCost,
    pub(crate) store: St,
    pub(crate) key: ScopedKey,
}

/// What the future needs to turn the store's answer into a response.
pub(crate) struct Decide<St> {
    pub(crate) name: Arc<str>,
    pub(crate) quota: Quota,
    pub(crate) policy: HeaderValue,
    pub(crate) cost: u32,
    pub(crate) shadow: bool,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) metrics: LayerMetrics,
    /// The store call, timed until it answers.
    pub(crate) timer: Option<StoreCall>,
    pub(crate) protocol: Protocol,
    pub(crate) trace: Trace,
    /// `Some` on a quota priced by its responses: the decision was a peek, the charge
    /// comes with the response. Boxed: the plain path's future stays as small as it was.
    pub(crate) charge: Option<Box<ChargeTo<St>>>,
}

/// The RateLimit headers of one decision, and its numbers to compare with another
/// quota layer's.
pub(crate) struct RateHeaders {
    policy: HeaderValue,
    rate: HeaderValue,
    remaining: u32,
    reset: u64,
}

impl RateHeaders {
    /// Adds these headers to a response: the policy to the list of every policy that
    /// applied, and `RateLimit` only if this quota is closer to its limit (fewer units
    /// left; on a tie, longer to reset) than the one an inner quota layer reported. A
    /// `RateLimit` that is not one item keyward wrote (an upstream's list) is kept and
    /// this one appended.
    fn add_to(self, headers: &mut HeaderMap) {
        headers.append(RATELIMIT_POLICY, self.policy);
        match headers.entry(RATELIMIT) {
            Entry::Vacant(vacant) => {
                vacant.insert(self.rate);
            }
            Entry::Occupied(mut occupied) => {
                let inner = occupied
                    .iter()
                    .nth(1)
                    .is_none()
                    .then(|| occupied.get().to_str().ok().and_then(parse_item))
                    .flatten()
                    .and_then(|item| Some((item.param("r")?, item.param("t")?)));
                match inner {
                    Some((r, t)) => {
                        let ours = (u64::from(self.remaining), std::cmp::Reverse(self.reset));
                        if ours < (r, std::cmp::Reverse(t)) {
                            occupied.insert(self.rate);
                        }
                    }
                    None => occupied.append(self.rate),
                }
            }
        }
    }
}

pin_project! {
    /// The coordinated part of [`QuotaService`](super::QuotaService)'s response future:
    /// waits for the store's decision, then answers 429 or calls the inner service and
    /// adds the RateLimit headers. No allocation of its own (one for a priced quota).
    pub struct Coordinated<CF, S, Req, St>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<CF, S, Req>,
        decide: Decide<St>,
        headers: Option<RateHeaders>,
        // Whether the store answered: a failed-open request is not charged.
        decided: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<CF, S, Req>
    where
        S: Service<Req>,
    {
        // Waiting for the store's decision; the ready inner service and the request wait
        // with it.
        Checking { #[pin] check: CF, pending: Option<(S, Req)> },
        // The inner service runs.
        Calling { #[pin] future: S::Future },
        // Rejected by the decision (or polled after completion: `None`).
        Answered { response: Option<Response<Bytes>> },
    }
}

impl<CF, S: Service<Req>, Req, St> Coordinated<CF, S, Req, St> {
    pub(crate) fn new(check: CF, inner: S, req: Req, decide: Decide<St>) -> Self {
        Coordinated {
            state: State::Checking {
                check,
                pending: Some((inner, req)),
            },
            decide,
            headers: None,
            decided: false,
        }
    }
}

/// What the decision means for this request.
enum Next {
    Call(Option<RateHeaders>),
    Answer(Response<Bytes>),
}

impl<St> Decide<St> {
    fn record(&self, outcome: QuotaOutcome) {
        self.metrics.decided(&self.trace, outcome.as_str());
    }

    fn decided(&self, decision: &QuotaDecision) -> Next {
        let reset = reset_seconds(decision);
        let rate = to_header_value(format_ratelimit(&self.name, decision.remaining, reset));
        let headers = RateHeaders {
            policy: self.policy.clone(),
            rate,
            remaining: decision.remaining,
            reset,
        };
        if decision.is_allowed() {
            self.record(QuotaOutcome::Allowed);
            return Next::Call(Some(headers));
        }
        if self.shadow {
            self.record(QuotaOutcome::ShadowLimited);
            return Next::Call(Some(headers));
        }
        self.record(QuotaOutcome::Limited);
        let RateHeaders { policy, rate, .. } = headers;
        let problem = match decision.retry_after() {
            Some(after) => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                types::QUOTA_EXCEEDED,
                "Quota exceeded",
            )
            .detail(format!(
                "the quota of {} per {}s for this key is used up",
                self.quota.limit(),
                self.quota.window_seconds()
            ))
            .retry_after(after),
            // No wait helps: the request alone is larger than a full bucket.
            None => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                types::QUOTA_COST_OVER_BURST,
                "Request costs more than the quota allows at once",
            )
            .detail(format!(
                "this request costs {} units, more than the {} this quota allows at once; \
                 it can never pass, so do not retry it unchanged",
                self.cost,
                self.quota.burst()
            )),
        }
        .header(RATELIMIT_POLICY, policy)
        .header(RATELIMIT, rate);
        Next::Answer(problem.into_response_for(self.protocol))
    }

    fn failed(&self, error: &StoreError) -> Next {
        self.record(QuotaOutcome::StoreError);
        tracing::warn!(%error, "quota store failed");
        match self.on_store_error {
            OnStoreError::Open => {
                self.metrics.failed_open();
                Next::Call(None)
            }
            OnStoreError::Closed => Next::Answer(
                Problem::store_unavailable()
                    .detail("the quota store did not answer")
                    .into_response_for(self.protocol),
            ),
        }
    }
}

/// `t` of the RateLimit header: seconds until the bucket is full again, rounded up.
fn reset_seconds(decision: &QuotaDecision) -> u64 {
    let reset = decision.reset_after;
    reset.as_secs() + u64::from(reset.subsec_nanos() > 0)
}

impl<CF, S, Req, ResB, St> Future for Coordinated<CF, S, Req, St>
where
    CF: Future<Output = Result<QuotaDecision, StoreError>>,
    S: Service<Req, Response = Response<ResB>>,
    ResB: http_body::Body,
    St: QuotaStore,
{
    type Output = Result<Response<KeywardBody<ChargeBody<ResB, St>>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The store call, the decision's log lines and the inner call all run inside the
        // decision's span.
        let decide = &mut *this.decide;
        let _entered = decide.trace.span.enter();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Answered { response } => {
                    return match response.take() {
                        Some(response) => Poll::Ready(Ok(response.map(KeywardBody::full))),
                        None => Poll::Pending,
                    };
                }
                StateProj::Calling { future } => {
                    let mut res = ready!(future.poll(cx))?;
                    if let Some(headers) = this.headers.take() {
                        headers.add_to(res.headers_mut());
                    }
                    let pending = match &decide.charge {
                        Some(charge) if *this.decided => pending_charge(charge, decide.quota, &res),
                        _ => None,
                    };
                    return Poll::Ready(Ok(
                        res.map(|body| KeywardBody::inner(ChargeBody::new(body, pending)))
                    ));
                }
                StateProj::Checking { check, pending } => {
                    let result = ready!(check.poll(cx));
                    if let Some(timer) = decide.timer.take() {
                        decide.metrics.store_call_done(timer, result.as_ref().err());
                    }
                    *this.decided = result.is_ok();
                    let next = match &result {
                        Ok(decision) => decide.decided(decision),
                        Err(error) => decide.failed(error),
                    };
                    match (next, pending.take()) {
                        (Next::Call(headers), Some((mut inner, req))) => {
                            *this.headers = headers;
                            State::Calling {
                                future: inner.call(req),
                            }
                        }
                        (Next::Answer(response), _) => State::Answered {
                            response: Some(response),
                        },
                        // Polled again after the request was handed on: cannot happen.
                        (Next::Call(_), None) => State::Answered { response: None },
                    }
                }
            };
            this.state.set(next);
        }
    }
}

/// The charge a response of a priced quota takes, if its status counts.
fn pending_charge<St: QuotaStore, B>(
    charge: &ChargeTo<St>,
    quota: Quota,
    res: &Response<B>,
) -> Option<PendingCharge<St>> {
    let units = charge.cost.of_head(res.status(), res.headers())?;
    Some(PendingCharge {
        store: charge.store.clone(),
        key: charge.key.clone(),
        quota,
        units,
        trailer: charge.cost.trailer().cloned(),
    })
}

impl<CF, S: Service<Req>, Req, St> fmt::Debug for Coordinated<CF, S, Req, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("quota::Coordinated").finish_non_exhaustive()
    }
}

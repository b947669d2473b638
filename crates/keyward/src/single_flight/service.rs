use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use http_body::Body;
use keyward_core::grpc::Protocol;
use keyward_core::problem::{Problem, types};
use keyward_core::store::{SingleFlightStore, StoredResponse};
use keyward_core::telemetry::SingleFlightOutcome;
use keyward_core::{KeyExtractor, KeySpec, KeywardBody, ScopedKey};
use tokio::time::Instant;
use tower_service::Service;
use tracing::{Instrument, Span};

use crate::pipeline::Trace;

use super::COALESCED;
use super::flight::{FlightTable, Joined, Outcome, Own, Shared, Work};
use super::layer::{LeaderFailure, SingleFlightSettings};
use super::work::{OwnResult, WorkSettings, flight_work};
use crate::pipeline::{
    Boxed, Config, Keyed, KeyedService, ResponseFuture, render_stored, shareable_headers,
};
use crate::telemetry::LayerMetrics;

/// Elections a follower sits through before it gives up with 502.
const MAX_ELECTIONS: usize = 8;

/// The service made by [`SingleFlightLayer`](super::SingleFlightLayer). Clones share one
/// table of flights.
pub struct SingleFlightService<S, St, K = KeySpec> {
    pub(crate) core: KeyedService<S, St, K, SingleFlightSettings>,
    pub(crate) table: Arc<FlightTable>,
    /// The request headers every key holds (see [`keyed_on`]), worked out once.
    pub(crate) keyed_on: Arc<[http::HeaderName]>,
}

/// The old name of [`SingleFlightService`].
#[deprecated(note = "renamed to `SingleFlightService`, like the other layers' services")]
pub type SingleFlight<S, St, K = KeySpec> = SingleFlightService<S, St, K>;

impl<S, St, K> SingleFlightService<S, St, K> {
    /// Flights in progress in this process (entries of the coalescing table). Zero once
    /// all requests are answered or gone: the table never outgrows in-flight work.
    pub fn flights_in_progress(&self) -> usize {
        self.table.len()
    }
}

impl<S: Clone, St: Clone, K> Clone for SingleFlightService<S, St, K> {
    fn clone(&self) -> Self {
        SingleFlightService {
            core: self.core.clone(),
            table: self.table.clone(),
            keyed_on: self.keyed_on.clone(),
        }
    }
}

impl<S: fmt::Debug, St, K> fmt::Debug for SingleFlightService<S, St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFlightService")
            .field("inner", &self.core.inner)
            .field("route", &self.core.config.common.route)
            .field("flights_in_progress", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl<S, St, K, B, RB> Service<Request<B>> for SingleFlightService<S, St, K>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Send + 'static,
    St: SingleFlightStore,
    K: KeyExtractor<B> + Send + Sync + 'static,
{
    type Response = Response<KeywardBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, Boxed<RB, S::Error>, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.core.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if !self.core.config.own.methods.contains(req.method()) {
            return ResponseFuture::pass_through(self.core.take_ready().call(req));
        }
        let Keyed {
            inner,
            req,
            key,
            trace,
            protocol,
            ..
        } = match self.core.prepare(req).keyed() {
            Ok(keyed) => keyed,
            Err(answered_or_passed) => return answered_or_passed,
        };
        let flight = Flight {
            config: self.core.config.clone(),
            store: self.core.store.clone(),
            table: self.table.clone(),
            keyed_on: self.keyed_on.clone(),
            protocol,
            span: trace.span.clone(),
            trace,
        };
        let span = flight.span.clone();
        let future = flight.coalesce(inner, req, key);
        ResponseFuture::coordinated(Box::pin(future.instrument(span)))
    }
}

/// The request headers a flight's key holds: the `vary` list, the authority, and the
/// header the scope is taken from.
pub(crate) fn keyed_on<K>(config: &Config<K, SingleFlightSettings>) -> Arc<[http::HeaderName]> {
    let mut keyed_on = config.own.vary.clone();
    keyed_on.push(http::header::HOST);
    if let Some(KeySpec::Header(scope)) = &config.common.scope {
        keyed_on.push(scope.clone());
    }
    keyed_on.into()
}

/// Where one request's decision is recorded: the layer's metrics and the request's
/// trace.
struct Recorder<'a> {
    metrics: &'a LayerMetrics,
    trace: &'a Trace,
}

impl Recorder<'_> {
    /// Records `outcome` on the decision span and the report, and counts it.
    fn record(&self, outcome: SingleFlightOutcome) {
        self.metrics.decided(self.trace, outcome.as_str());
    }
}

fn leader_failed<RB: Body>(
    recorder: &Recorder<'_>,
    protocol: Protocol,
) -> Response<KeywardBody<RB>> {
    recorder.record(SingleFlightOutcome::LeaderFailed);
    Problem::new(
        StatusCode::BAD_GATEWAY,
        types::COALESCED_LEADER_FAILED,
        "Coalesced request failed",
    )
    .detail("the identical request this one was coalesced with failed")
    .into_keyward_response(protocol)
}

fn store_unavailable<RB: Body>(
    recorder: &Recorder<'_>,
    protocol: Protocol,
) -> Response<KeywardBody<RB>> {
    recorder.record(SingleFlightOutcome::StoreError);
    Problem::store_unavailable().into_keyward_response(protocol)
}

fn mark_coalesced<RB>(response: &mut Response<RB>) {
    response
        .headers_mut()
        .insert(COALESCED, HeaderValue::from_static("true"));
}

/// A follower's copy of the leader's response.
fn copy<RB: Body>(stored: &StoredResponse) -> Response<KeywardBody<RB>> {
    render_stored(stored, COALESCED)
}

/// What one coalesced request needs besides itself.
struct Flight<St, K> {
    config: Arc<Config<K, SingleFlightSettings>>,
    store: St,
    table: Arc<FlightTable>,
    keyed_on: Arc<[http::HeaderName]>,
    /// How rejections are rendered for this request.
    protocol: Protocol,
    /// The request's decision span (the future runs in it) and report.
    span: Span,
    trace: Trace,
}

impl<St: SingleFlightStore, K> Flight<St, K> {
    /// One request's way through single flight: lead or follow, and on leader failure
    /// follow the policy.
    async fn coalesce<S, B, RB>(
        self,
        mut svc: S,
        req: Request<B>,
        key: ScopedKey,
    ) -> Result<Response<KeywardBody<RB>>, S::Error>
    where
        S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Send + 'static,
        B: Send + 'static,
        RB: Body<Data = Bytes> + Unpin + Send + 'static,
        RB::Error: Send + 'static,
    {
        let Flight {
            config,
            store,
            table,
            keyed_on,
            protocol,
            span,
            trace,
        } = self;
        let metrics = &config.common.metrics;
        let recorder = Recorder {
            metrics,
            trace: &trace,
        };
        let own = &config.own;
        let mut started = None;
        let mut ready = true;
        for _ in 0..MAX_ELECTIONS {
            if !ready {
                // Readiness first: a leader must hold its work before its first await, or
                // followers joining meanwhile would wait on a flight nobody drives.
                poll_fn(|cx| svc.poll_ready(cx)).await?;
            }
            match table.join(key.shared_storage_key()) {
                Joined::Leader(seat) => {
                    let settings = WorkSettings {
                        store: store.clone(),
                        key,
                        lease: own.lease,
                        reuse_for: own.reuse_for,
                        max_body: own.max_body,
                        keyed_on,
                        on_leader_failure: own.on_leader_failure,
                        on_store_error: config.common.on_store_error,
                        metrics: metrics.clone(),
                    };
                    seat.start(Work::new(flight_work(settings, svc, req), span));
                    return leader_response(&recorder, seat.run().await, protocol);
                }
                Joined::Follower(seat) => {
                    // Give the readiness reserved for this request back while it waits: it
                    // may never call the inner service.
                    svc = svc.clone();
                    ready = false;
                    // Measured even with the span disabled: the wait histogram needs it.
                    started.get_or_insert_with(Instant::now);
                    let waiting = metrics.waiting();
                    let outcome = seat.run().await;
                    drop(waiting);
                    #[cfg(feature = "opentelemetry")]
                    if let Some(leader) = seat.leader_span() {
                        crate::telemetry::link_to_leader(&leader);
                    }
                    drop(seat);
                    if let Some(started) = started {
                        let waited = started.elapsed().as_secs_f64();
                        metrics.waited(&trace.span, waited);
                    }
                    let policy = own.on_leader_failure;
                    match follower_next::<RB, S::Error>(&recorder, outcome, policy, protocol) {
                        Next::Respond(response) => return Ok(response),
                        Next::Elect => continue,
                        Next::CallInner => {
                            tracing::debug!("single flight: response over max_body, calling inner");
                            poll_fn(|cx| svc.poll_ready(cx)).await?;
                            recorder.record(SingleFlightOutcome::Leader);
                            // Boxed: every follower's future would otherwise reserve room
                            // for an inner future it almost never runs.
                            let response = Box::pin(svc.call(req)).await?;
                            return Ok(response.map(KeywardBody::inner));
                        }
                    }
                }
            }
        }
        Ok(leader_failed(&recorder, protocol))
    }
}

/// The leader's answer: its own response or error (it drove the work), or a copy of a
/// remote leader's response.
fn leader_response<RB: Body + 'static, E: 'static>(
    recorder: &Recorder<'_>,
    outcome: Outcome,
    protocol: Protocol,
) -> Result<Response<KeywardBody<RB>>, E> {
    let response = match (outcome.own, outcome.shared) {
        (Own::Typed(own), _) => match own.downcast::<OwnResult<RB, E>>() {
            Ok(own) => *own,
            // Cannot happen: the work's result has the service's types.
            Err(_) => return Ok(leader_failed(recorder, protocol)),
        },
        (Own::Panic(payload), _) => std::panic::resume_unwind(payload),
        // The flight followed a leader on another instance.
        (Own::None, Shared::Response(stored)) => {
            recorder.record(SingleFlightOutcome::Follower);
            return Ok(copy(&stored));
        }
        (Own::None, Shared::StoreUnavailable) => {
            return Ok(store_unavailable(recorder, protocol));
        }
        (Own::None, Shared::Failed | Shared::TooLarge | Shared::Private) => {
            return Ok(leader_failed(recorder, protocol));
        }
    };
    let outcome = if outcome.store_error {
        SingleFlightOutcome::StoreError
    } else {
        SingleFlightOutcome::Leader
    };
    recorder.record(outcome);
    response
}

/// What a follower does once its flight ended.
// Built once per follower and matched at once: boxing the response would only add an
// allocation.
#[allow(clippy::large_enum_variant)]
enum Next<RB: Body> {
    Respond(Response<KeywardBody<RB>>),
    /// The response was too large to share: make an own inner call.
    CallInner,
    /// The leader failed: join (or lead) the next flight.
    Elect,
}

fn follower_next<RB: Body + 'static, E: 'static>(
    recorder: &Recorder<'_>,
    outcome: Outcome,
    policy: LeaderFailure,
    protocol: Protocol,
) -> Next<RB> {
    if let Own::Typed(own) = outcome.own {
        // This follower drove the leader's work to its end after the leader left: the
        // (possibly streaming) response is its own, unless it was not for others; and
        // like any copy it never carries the leader's cookies or credentials.
        if let Ok(own) = own.downcast::<OwnResult<RB, E>>() {
            if let (Ok(mut response), false) = (*own, matches!(outcome.shared, Shared::Private)) {
                recorder.record(SingleFlightOutcome::Follower);
                let headers = shareable_headers(response.headers(), |_| true);
                *response.headers_mut() = headers;
                mark_coalesced(&mut response);
                return Next::Respond(response);
            }
        }
    }
    match outcome.shared {
        Shared::Response(stored) => {
            recorder.record(SingleFlightOutcome::Follower);
            Next::Respond(copy(&stored))
        }
        Shared::TooLarge | Shared::Private => Next::CallInner,
        Shared::StoreUnavailable => Next::Respond(store_unavailable(recorder, protocol)),
        Shared::Failed if policy == LeaderFailure::BadGateway => {
            Next::Respond(leader_failed(recorder, protocol))
        }
        Shared::Failed => Next::Elect,
    }
}

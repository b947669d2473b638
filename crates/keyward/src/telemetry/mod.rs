//! The layers' metrics, through the OpenTelemetry API: `keyward_decisions_total`,
//! `keyward_wait_seconds` and `keyward_store_seconds` (names and attributes in
//! [`keyward_core::telemetry`]).
//!
//! Instruments are created once per layer, when it is built, from
//! `opentelemetry::global::meter("keyward")` or the meter given to the layer's `.meter()`
//! knob. Without an installed meter provider they are no-ops: a request then pays for a
//! few reference-count updates and, where store latency is measured, two clock reads.
//!
//! With the `bound-instruments` feature every point is recorded through a handle bound
//! to its attributes ([`bound`]): looked up once, not hashed on every request.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use keyward_core::store::StoreError;
use keyward_core::telemetry::{
    ATTR_ERROR, ATTR_LAYER, ATTR_OP, ATTR_ROUTE, FIELD_WAIT_SECONDS, METRIC_DECISIONS,
    METRIC_FAIL_OPEN, METRIC_STORE_ERRORS, METRIC_STORE_SECONDS, METRIC_WAIT_SECONDS,
    METRIC_WAITING,
};
mod bound;
mod report;

use bound::Bound;

pub use report::{DecisionReporter, DecisionSink, ReportedDecision};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use tracing::Span;

use crate::pipeline::Trace;

/// The instrumentation scope of every keyward instrument.
pub(crate) const METER_NAME: &str = "keyward";

/// Bucket bounds of both histograms, in seconds: store round trips are around a
/// millisecond, waits for another request up to the route's limits (seconds).
const SECONDS_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// One layer's instruments with its `layer` and `route` attributes, built once per
/// layer. Cloning is one reference-count increment.
#[derive(Clone)]
pub(crate) struct LayerMetrics(Arc<Instruments>);

struct Instruments {
    decisions: Counter<u64>,
    waits: Histogram<f64>,
    store: Histogram<f64>,
    store_errors: Counter<u64>,
    fail_open: Counter<u64>,
    waiting: UpDownCounter<i64>,
    /// `[layer, route]`, built once so that recording allocates nothing.
    labels: [KeyValue; 2],
    /// The same, for decision reports.
    layer: &'static str,
    route: Arc<str>,
    /// The instruments bound to `labels` (and an outcome, or an operation).
    bound: Bound,
}

impl LayerMetrics {
    /// Instruments from `meter`, or from the global meter provider's `keyward` meter.
    pub(crate) fn new(layer: &'static str, route: &Arc<str>, meter: Option<&Meter>) -> Self {
        let global;
        let meter = match meter {
            Some(meter) => meter,
            None => {
                global = opentelemetry::global::meter(METER_NAME);
                &global
            }
        };
        let decisions = meter
            .u64_counter(METRIC_DECISIONS)
            .with_description("Decisions by layer, route and outcome.")
            .build();
        let waits = meter
            .f64_histogram(METRIC_WAIT_SECONDS)
            .with_unit("s")
            .with_description("Time requests waited for a key (lock, in-flight duplicate, leader).")
            .with_boundaries(SECONDS_BUCKETS.to_vec())
            .build();
        let store = meter
            .f64_histogram(METRIC_STORE_SECONDS)
            .with_unit("s")
            .with_description("Latency of the store calls that decide, by operation.")
            .with_boundaries(SECONDS_BUCKETS.to_vec())
            .build();
        let store_errors = meter
            .u64_counter(METRIC_STORE_ERRORS)
            .with_description("Store calls that failed, by operation and error.")
            .build();
        let fail_open = meter
            .u64_counter(METRIC_FAIL_OPEN)
            .with_description(
                "Requests let through uncoordinated after a store failure (on_error = open).",
            )
            .build();
        let waiting = meter
            .i64_up_down_counter(METRIC_WAITING)
            .with_description(
                "Requests waiting right now: serial queue depth, single-flight followers.",
            )
            .build();
        let labels = [
            KeyValue::new(ATTR_LAYER, layer),
            KeyValue::new(ATTR_ROUTE, route.clone()),
        ];
        LayerMetrics(Arc::new(Instruments {
            bound: Bound::new(),
            decisions,
            waits,
            store,
            store_errors,
            fail_open,
            waiting,
            labels,
            layer,
            route: route.clone(),
        }))
    }

    /// The same instruments for another route name (a builder call, not per request).
    pub(crate) fn for_route(&self, route: &Arc<str>) -> Self {
        let [layer, _] = &self.0.labels;
        let labels = [layer.clone(), KeyValue::new(ATTR_ROUTE, route.clone())];
        LayerMetrics(Arc::new(Instruments {
            bound: Bound::new(),
            decisions: self.0.decisions.clone(),
            waits: self.0.waits.clone(),
            store: self.0.store.clone(),
            store_errors: self.0.store_errors.clone(),
            fail_open: self.0.fail_open.clone(),
            waiting: self.0.waiting.clone(),
            labels,
            layer: self.0.layer,
            route: route.clone(),
        }))
    }

    /// Records a decision: the span's `keyward.outcome`, the request's report (if it
    /// asked for one) and one count.
    pub(crate) fn decided(&self, trace: &Trace, outcome: &'static str) {
        trace.decided(self.0.layer, &self.0.route, outcome);
        self.0
            .bound
            .decision(&self.0.decisions, &self.0.labels, outcome);
    }

    /// Records a wait for the key: the span's `keyward.wait_seconds` and the histogram.
    pub(crate) fn waited(&self, span: &Span, seconds: f64) {
        span.record(FIELD_WAIT_SECONDS, seconds);
        self.0.bound.wait(&self.0.waits, &self.0.labels, seconds);
    }

    /// Starts timing one store call `op`; [`LayerMetrics::store_call_done`] records it.
    pub(crate) fn store_call(&self, op: &'static str) -> StoreCall {
        StoreCall {
            op,
            started: Instant::now(),
        }
    }

    /// Records a store call started with [`LayerMetrics::store_call`], and its error.
    pub(crate) fn store_call_done(&self, call: StoreCall, error: Option<&StoreError>) {
        let seconds = call.started.elapsed().as_secs_f64();
        self.0.bound.store_call(&self.0.store, call.op, seconds);
        if let Some(error) = error {
            self.store_failed(call.op, error);
        }
    }

    /// Counts a failed store call `op`.
    pub(crate) fn store_failed(&self, op: &'static str, error: &StoreError) {
        let kind = match error {
            StoreError::Timeout(_) => "timeout",
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Corrupt(_) => "corrupt",
        };
        self.0.store_errors.add(
            1,
            &[KeyValue::new(ATTR_OP, op), KeyValue::new(ATTR_ERROR, kind)],
        );
    }

    /// Counts one request as waiting (`keyward_waiting`) until the guard is dropped,
    /// however the wait ends (its turn, a timeout, the client leaving).
    pub(crate) fn waiting(&self) -> WaitingNow {
        self.0.bound.waiting(&self.0.waiting, &self.0.labels, 1);
        WaitingNow(self.clone())
    }

    /// Counts a request let through uncoordinated after a store failure.
    pub(crate) fn failed_open(&self) {
        self.0.bound.fail_open(&self.0.fail_open, &self.0.labels);
    }

    /// Awaits the store call `op` and records its latency and error.
    pub(crate) async fn timed<T, F>(&self, op: &'static str, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let timer = self.store_call(op);
        let output = call.await;
        self.store_call_done(timer, output.as_ref().err());
        output
    }
}

/// One request counted in `keyward_waiting` while this lives.
pub(crate) struct WaitingNow(LayerMetrics);

impl Drop for WaitingNow {
    fn drop(&mut self) {
        let instruments = &(self.0).0;
        instruments
            .bound
            .waiting(&instruments.waiting, &instruments.labels, -1);
    }
}

impl fmt::Debug for WaitingNow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WaitingNow")
    }
}

/// A store call being timed. Store latency is wall-clock time (`std::time::Instant`),
/// kept here so that the layers' own logic uses tokio's clock only.
#[derive(Debug)]
pub(crate) struct StoreCall {
    op: &'static str,
    started: Instant,
}

impl fmt::Debug for LayerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerMetrics")
            .field("labels", &self.0.labels)
            .finish_non_exhaustive()
    }
}

/// Links the current (follower's) span to the `leader`'s span, whose work answered it,
/// and records the leader's trace id: in a trace viewer a follower shows who did the
/// work. Nothing happens unless both spans are OpenTelemetry spans.
#[cfg(feature = "opentelemetry")]
pub(crate) fn link_to_leader(leader: &Span) {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    let context = leader.context();
    let leader_context = context.span().span_context().clone();
    if !leader_context.is_valid() {
        return;
    }
    let current = Span::current();
    current.record(
        keyward_core::telemetry::FIELD_LEADER_TRACE_ID,
        leader_context.trace_id().to_string().as_str(),
    );
    current.add_link(leader_context);
}

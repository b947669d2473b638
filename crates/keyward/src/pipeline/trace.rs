//! Where a layer's decision about one request goes: its decision span (for `tracing`
//! subscribers and OpenTelemetry) and, when the request carries one, its
//! [`DecisionReporter`] (for callers that want every decision without spans). The
//! layer's name and route come from its [`LayerMetrics`](crate::telemetry::LayerMetrics),
//! which records every decision.

use keyward_core::KeyHash;
use keyward_core::telemetry::FIELD_OUTCOME;
use tracing::Span;

use crate::telemetry::{DecisionReporter, ReportedDecision};

/// One request's decision span, plus its reporter if it has one.
#[derive(Clone, Debug)]
pub(crate) struct Trace {
    pub(crate) span: Span,
    reporter: Option<DecisionReporter>,
    /// The key's telemetry hash, computed when the span or the reporter records it.
    key_hash: Option<KeyHash>,
}

impl Trace {
    pub(crate) fn new(
        span: Span,
        reporter: Option<&DecisionReporter>,
        key_hash: Option<KeyHash>,
    ) -> Self {
        Trace {
            span,
            reporter: reporter.cloned(),
            key_hash,
        }
    }

    /// Records `outcome` on the span and reports it as layer `layer` of `route`.
    pub(crate) fn decided(&self, layer: &'static str, route: &str, outcome: &'static str) {
        self.span.record(FIELD_OUTCOME, outcome);
        if let Some(reporter) = &self.reporter {
            reporter.report(ReportedDecision {
                layer,
                route,
                outcome,
                key_hash: self.key_hash,
            });
        }
    }
}

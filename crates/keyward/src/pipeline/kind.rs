//! A layer's identity: the one constant its storage prefix, span name and metric label
//! come from.

use keyward_core::telemetry::{
    LAYER_IDEMPOTENCY, LAYER_QUOTA, LAYER_SERIAL, LAYER_SINGLE_FLIGHT, SPAN_IDEMPOTENCY,
    SPAN_QUOTA, SPAN_SERIAL, SPAN_SINGLE_FLIGHT,
};
use tracing::Span;
use tracing::field::Empty;

/// Which layer a key, a span or a metric belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LayerKind {
    Idempotency,
    Quota,
    Serial,
    SingleFlight,
}

impl LayerKind {
    /// The first part of the layer's storage keys, `{prefix}:{route}:{scope}:{key}`.
    ///
    /// Kept as it was when the layers shipped (`idem`, `flight`), although two of them
    /// differ from the metric labels: instances of two versions sharing one Redis during a
    /// rolling upgrade must name every key alike, or a retry landing on the other version
    /// would not find the first request's claim and would run a second time.
    pub(crate) const fn storage_prefix(self) -> &'static str {
        match self {
            LayerKind::Idempotency => "idem",
            LayerKind::Quota => "quota",
            LayerKind::Serial => "serial",
            LayerKind::SingleFlight => "flight",
        }
    }

    /// The `layer` attribute of its metrics.
    pub(crate) const fn metric_label(self) -> &'static str {
        match self {
            LayerKind::Idempotency => LAYER_IDEMPOTENCY,
            LayerKind::Quota => LAYER_QUOTA,
            LayerKind::Serial => LAYER_SERIAL,
            LayerKind::SingleFlight => LAYER_SINGLE_FLIGHT,
        }
    }

    /// The name of its decision span.
    pub(crate) const fn span_name(self) -> &'static str {
        match self {
            LayerKind::Idempotency => SPAN_IDEMPOTENCY,
            LayerKind::Quota => SPAN_QUOTA,
            LayerKind::Serial => SPAN_SERIAL,
            LayerKind::SingleFlight => SPAN_SINGLE_FLIGHT,
        }
    }

    /// Opens a decision span for `route`. Every layer's span has the same fields; a
    /// field the layer never records stays empty and is not shown.
    pub(crate) fn span(self, route: &str) -> Span {
        // `tracing` needs the span name as a constant at each call site: one per layer.
        macro_rules! decision_span {
            ($name:expr) => {
                tracing::info_span!(
                    $name,
                    keyward.route = %route,
                    keyward.key_hash = Empty,
                    keyward.outcome = Empty,
                    keyward.wait_seconds = Empty,
                    keyward.fencing_token = Empty,
                    keyward.leader_trace_id = Empty,
                )
            };
        }
        match self {
            LayerKind::Idempotency => decision_span!(LayerKind::Idempotency.span_name()),
            LayerKind::Quota => decision_span!(LayerKind::Quota.span_name()),
            LayerKind::Serial => decision_span!(LayerKind::Serial.span_name()),
            LayerKind::SingleFlight => decision_span!(LayerKind::SingleFlight.span_name()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_names_and_labels_agree() {
        for kind in [
            LayerKind::Idempotency,
            LayerKind::Quota,
            LayerKind::Serial,
            LayerKind::SingleFlight,
        ] {
            assert_eq!(
                kind.span_name(),
                format!("keyward.{}", kind.metric_label()),
                "{kind:?}"
            );
        }
    }
}

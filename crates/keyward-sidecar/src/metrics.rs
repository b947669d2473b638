//! Metrics from the layers' decision spans, served as Prometheus text at the admin
//! `/metrics`: `keyward_decisions_total{layer,route,outcome}` and
//! `keyward_wait_seconds{layer,route}`.
//!
//! A `tracing` layer reads each `keyward.{idempotency,quota,serial,single_flight}` span's
//! fields when it closes, so the library layers need no metrics dependency of their own.
//! The same layer collects each request's outcomes for the access log, and feeds the
//! hot-key sketches ([`crate::hotkeys`]) with each decision's `keyward.key_hash`.
//!
//! Hot keys count one hit per request, route and key hash: a request passing through
//! several layers of its route (quota, idempotency, ...) that see the same key counts
//! once, not once per layer; layers keyed on different things (an API key for quota,
//! an idempotency key) each count their own key. Decisions outside a request span (none
//! in the sidecar) count once per decision.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::hotkeys::HotKeys;

/// Name of the per-request span the sidecar opens; decisions below it are collected for
/// its access-log line.
pub const REQUEST_SPAN: &str = "keyward.request";

const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, value: f64) {
        for (bucket, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if value <= *bucket {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += value;
    }
}

#[derive(Default)]
struct Registry {
    decisions: BTreeMap<(String, String, String), u64>,
    waits: BTreeMap<(String, String), Histogram>,
}

/// The sidecar's metrics.
#[derive(Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    hot_keys: HotKeys,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hot-key sketches fed by the decision spans.
    pub fn hot_keys(&self) -> &HotKeys {
        &self.hot_keys
    }

    /// Counts one decision.
    pub fn record(&self, layer: &str, route: &str, outcome: &str, wait_seconds: Option<f64>) {
        let mut registry = self.lock();
        *registry
            .decisions
            .entry((layer.to_owned(), route.to_owned(), outcome.to_owned()))
            .or_default() += 1;
        if let Some(wait) = wait_seconds {
            registry
                .waits
                .entry((layer.to_owned(), route.to_owned()))
                .or_default()
                .observe(wait);
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let registry = self.lock();
        let mut out = String::new();
        out.push_str("# HELP keyward_decisions_total Decisions by layer, route and outcome.\n");
        out.push_str("# TYPE keyward_decisions_total counter\n");
        for ((layer, route, outcome), count) in &registry.decisions {
            let _ = writeln!(
                out,
                "keyward_decisions_total{{layer=\"{}\",route=\"{}\",outcome=\"{}\"}} {count}",
                escape(layer),
                escape(route),
                escape(outcome)
            );
        }
        out.push_str("# HELP keyward_wait_seconds Time requests waited for a key (lock, in-flight duplicate, leader).\n");
        out.push_str("# TYPE keyward_wait_seconds histogram\n");
        for ((layer, route), histogram) in &registry.waits {
            let labels = format!("layer=\"{}\",route=\"{}\"", escape(layer), escape(route));
            for (bucket, count) in BUCKETS.iter().zip(histogram.counts.iter()) {
                let _ = writeln!(
                    out,
                    "keyward_wait_seconds_bucket{{{labels},le=\"{bucket}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "keyward_wait_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(
                out,
                "keyward_wait_seconds_sum{{{labels}}} {}",
                histogram.sum
            );
            let _ = writeln!(
                out,
                "keyward_wait_seconds_count{{{labels}}} {}",
                histogram.count
            );
        }
        out
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The fields of one decision span.
#[derive(Default)]
struct Decision {
    route: Option<String>,
    key_hash: Option<String>,
    outcome: Option<String>,
    wait_seconds: Option<f64>,
}

impl Visit for Decision {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "keyward.route" => self.route = Some(value.to_owned()),
            "keyward.outcome" => self.outcome = Some(value.to_owned()),
            "keyward.key_hash" => self.key_hash = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "keyward.wait_seconds" {
            self.wait_seconds = Some(value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%route` arrives as a Display-formatted debug value.
        self.record_str(field, &format!("{value:?}"));
    }
}

/// Outcomes of the decisions made for one request, for its access-log line.
#[derive(Default, Clone)]
pub struct RequestOutcomes(pub Vec<(&'static str, String)>);

/// The (route, key hash) pairs already counted as hot-key hits for one request.
#[derive(Default)]
struct HotKeysSeen(Vec<(String, String)>);

/// The `tracing` layer feeding [`Metrics`].
pub struct MetricsLayer {
    metrics: Metrics,
}

impl MetricsLayer {
    pub fn new(metrics: Metrics) -> Self {
        MetricsLayer { metrics }
    }
}

fn layer_of(span_name: &str) -> Option<&'static str> {
    match span_name {
        "keyward.idempotency" => Some("idempotency"),
        "keyward.quota" => Some("quota"),
        "keyward.serial" => Some("serial"),
        "keyward.single_flight" => Some("single_flight"),
        _ => None,
    }
}

impl<S> Layer<S> for MetricsLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if span.name() == REQUEST_SPAN {
            let mut extensions = span.extensions_mut();
            extensions.insert(RequestOutcomes::default());
            extensions.insert(HotKeysSeen::default());
        } else if layer_of(span.name()).is_some() {
            let mut decision = Decision::default();
            attrs.record(&mut decision);
            span.extensions_mut().insert(decision);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if let Some(decision) = span.extensions_mut().get_mut::<Decision>() {
            values.record(decision);
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let Some(layer) = layer_of(span.name()) else {
            return;
        };
        let Some(decision) = span.extensions_mut().remove::<Decision>() else {
            return;
        };
        let route = decision.route.unwrap_or_default();
        let request = span.scope().skip(1).find(|s| s.name() == REQUEST_SPAN);
        if let Some(key_hash) = decision.key_hash {
            let first_in_request = match &request {
                Some(request) => match request.extensions_mut().get_mut::<HotKeysSeen>() {
                    Some(seen) => {
                        let pair = (route.clone(), key_hash.clone());
                        let first = !seen.0.contains(&pair);
                        if first {
                            seen.0.push(pair);
                        }
                        first
                    }
                    None => true,
                },
                None => true,
            };
            if first_in_request {
                self.metrics.hot_keys.observe(&route, &key_hash);
            }
        }
        let Some(outcome) = decision.outcome else {
            return;
        };
        self.metrics
            .record(layer, &route, &outcome, decision.wait_seconds);
        if let Some(request) = request {
            if let Some(outcomes) = request.extensions_mut().get_mut::<RequestOutcomes>() {
                outcomes.0.push((layer, outcome));
            }
        }
    }
}

/// The outcomes collected so far under the request span `span`, as `layer=outcome ...`.
pub fn outcomes_of(span: &tracing::Span) -> String {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = registry.span(id)?;
        let outcomes = span.extensions().get::<RequestOutcomes>()?.clone();
        Some(
            outcomes
                .0
                .iter()
                .map(|(layer, outcome)| format!("{layer}={outcome}"))
                .collect::<Vec<_>>()
                .join(" "),
        )
    })
    .flatten()
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.record("idempotency", "payments", "replayed", None);
        metrics.record("idempotency", "payments", "replayed", None);
        metrics.record("serial", "acct", "acquired", Some(0.002));
        let text = metrics.render();
        assert!(text.contains("keyward_decisions_total{layer=\"idempotency\",route=\"payments\",outcome=\"replayed\"} 2"));
        assert!(text.contains(
            "keyward_wait_seconds_bucket{layer=\"serial\",route=\"acct\",le=\"0.0025\"} 1"
        ));
        assert!(text.contains(
            "keyward_wait_seconds_bucket{layer=\"serial\",route=\"acct\",le=\"0.001\"} 0"
        ));
        assert!(text.contains("keyward_wait_seconds_count{layer=\"serial\",route=\"acct\"} 1"));
    }
}

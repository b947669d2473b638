//! The admin `/metrics` and what the sidecar reads from the layers' decision spans.
//!
//! The counters and histograms (`keyward_decisions_total{layer,route,outcome}`,
//! `keyward_wait_seconds{layer,route}`, `keyward_store_seconds{op}`) are recorded by the
//! layers through the OpenTelemetry API into the sidecar's meter provider; `/metrics`
//! collects its [`PullReader`] on each scrape, and the OTLP exporter (if configured)
//! reads the same instruments: one source of truth.
//!
//! A `tracing` layer still reads each `keyward.{idempotency,quota,serial,single_flight}`
//! span when it closes, for what only spans know per request: the outcomes for the
//! access log, and the key hashes for the hot-key sketches ([`crate::hotkeys`]).
//!
//! Hot keys count one hit per request, route and key hash: a request passing through
//! several layers of its route (quota, idempotency, ...) that see the same key counts
//! once, not once per layer; layers keyed on different things (an API key for quota,
//! an idempotency key) each count their own key. Decisions outside a request span (none
//! in the sidecar) count once per decision.

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::hotkeys::HotKeys;
use crate::prometheus::PullReader;

/// Name of the per-request span the sidecar opens; decisions below it are collected for
/// its access-log line.
pub const REQUEST_SPAN: &str = "keyward.request";

/// The sidecar's metrics: the meter provider's pull reader and the hot-key sketches.
#[derive(Clone, Default)]
pub struct Metrics {
    reader: PullReader,
    hot_keys: HotKeys,
}

impl Metrics {
    /// The reader to install in the meter provider.
    pub fn reader(&self) -> &PullReader {
        &self.reader
    }

    /// The hot-key sketches fed by the decision spans.
    pub fn hot_keys(&self) -> &HotKeys {
        &self.hot_keys
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        self.reader.render()
    }
}

/// The fields of one decision span.
#[derive(Default)]
struct Decision {
    route: Option<String>,
    key_hash: Option<String>,
    outcome: Option<String>,
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

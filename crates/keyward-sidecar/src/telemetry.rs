//! OpenTelemetry in the sidecar: one meter provider feeding both the admin `/metrics`
//! ([`crate::prometheus::PullReader`]) and, when `[telemetry] otlp_endpoint` is set, an
//! OTLP/gRPC exporter for metrics and traces. Resource: `service.name` from
//! `[telemetry] service_name`.
//!
//! Export runs on the SDK's own threads (batch span processor, periodic metric reader)
//! and talks to the collector over a lazily connected tonic channel: a collector that is
//! down or slow costs dropped telemetry and a warning, never a request. Spans wait in a
//! bounded queue (the SDK's default 2048, dropped beyond). The standard
//! `OTEL_BSP_SCHEDULE_DELAY` and `OTEL_METRIC_EXPORT_INTERVAL` variables set how often
//! they are sent (defaults 5 s and 60 s).
//!
//! W3C trace context: [`extract_parent`] reads the caller's `traceparent` and
//! [`inject_current`] writes the current span's into the upstream request.
//!
//! With OTLP export on, the meter's histograms also keep exemplars: the trace and span
//! of a sampled request per bucket, served to scrapes that ask for OpenMetrics
//! ([`crate::exemplars`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{ExporterBuildError, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TelemetryConfig;
use crate::exemplars::Exemplars;
use crate::metrics::Metrics;

/// Whether spans are exported (OTLP configured): only then is there a trace context to
/// read from callers or write to the upstream.
static EXPORTING_TRACES: AtomicBool = AtomicBool::new(false);

/// Whether the log shows info-level spans (`KEYWARD_LOG` at info or finer): then every
/// request has its span, sampled or not.
static LOG_SHOWS_SPANS: AtomicBool = AtomicBool::new(false);

/// The instrumentation scope of the sidecar's meter and tracer.
const SCOPE: &str = "keyward";

/// How long one OTLP export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The sidecar's meter and (with OTLP) tracer providers.
pub struct Telemetry {
    meter_provider: SdkMeterProvider,
    tracer_provider: Option<SdkTracerProvider>,
    /// Where the histograms keep exemplars: only with OTLP export, which alone gives
    /// requests trace ids.
    exemplars: Option<Exemplars>,
}

impl Telemetry {
    /// Builds the providers; must be called inside the tokio runtime, on which the OTLP
    /// channel runs.
    pub fn start(config: &TelemetryConfig, metrics: &Metrics) -> Result<Self, ExporterBuildError> {
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(metrics.reader().clone());
        let mut tracer_provider = None;
        let mut exemplars = None;
        if let Some(endpoint) = &config.otlp_endpoint {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.as_str())
                .with_timeout(EXPORT_TIMEOUT)
                .build()?;
            meters = meters.with_reader(PeriodicReader::builder(exporter).build());
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.as_str())
                .with_timeout(EXPORT_TIMEOUT)
                .build()?;
            tracer_provider = Some(
                SdkTracerProvider::builder()
                    .with_resource(resource)
                    .with_batch_exporter(exporter)
                    .build(),
            );
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            EXPORTING_TRACES.store(true, Ordering::Relaxed);
            exemplars = Some(metrics.exemplars().clone());
        }
        Ok(Telemetry {
            meter_provider: meters.build(),
            tracer_provider,
            exemplars,
        })
    }

    /// The meter every layer records into. With OTLP export on, its histograms also keep
    /// the exemplars of sampled requests ([`crate::exemplars`]); without, it is the
    /// SDK's meter as it is.
    pub fn meter(&self) -> Meter {
        let meter = self.meter_provider.meter(SCOPE);
        match &self.exemplars {
            Some(exemplars) => exemplars.meter(meter),
            None => meter,
        }
    }

    /// The tracer for `tracing-opentelemetry`, when spans are exported.
    pub fn tracer(&self) -> Option<Tracer> {
        self.tracer_provider
            .as_ref()
            .map(|provider| provider.tracer(SCOPE))
    }

    /// Sends what is still buffered and stops the exporters, waiting at most `timeout`:
    /// an unreachable collector must not hold up the exit.
    pub async fn shutdown(self, timeout: Duration) {
        let Telemetry {
            meter_provider,
            tracer_provider,
            exemplars: _,
        } = self;
        // The SDK's shutdown blocks its caller until the export threads are done.
        let flush = tokio::task::spawn_blocking(move || {
            if let Some(tracer_provider) = tracer_provider {
                if let Err(error) = tracer_provider.shutdown_with_timeout(timeout) {
                    tracing::warn!(%error, "trace export did not finish");
                }
            }
            if let Err(error) = meter_provider.shutdown_with_timeout(timeout) {
                tracing::debug!(%error, "metric export did not finish");
            }
        });
        // Twice the SDK's own bound: both providers may use theirs in turn.
        if tokio::time::timeout(timeout * 2, flush).await.is_err() {
            tracing::warn!("telemetry flush timed out");
        }
    }
}

/// Whether spans are exported (OTLP configured): only then do requests have trace ids,
/// and histograms exemplars.
pub fn exporting_traces() -> bool {
    EXPORTING_TRACES.load(Ordering::Relaxed)
}

/// Says whether the log filter shows info-level spans (set once, when logging starts).
pub fn set_log_shows_spans(shows: bool) {
    LOG_SHOWS_SPANS.store(shows, Ordering::Relaxed);
}

/// Whether a request span is worth having: the log shows it, or its trace is sampled
/// for export. An unsampled request then costs one span start (the sampler's decision),
/// not a span per decision: the layers' spans are only made inside a request span (see
/// `main::init_logging`).
pub fn wanted(span: &tracing::Span) -> bool {
    use opentelemetry::trace::TraceContextExt as _;
    LOG_SHOWS_SPANS.load(Ordering::Relaxed)
        || (EXPORTING_TRACES.load(Ordering::Relaxed)
            && span.context().span().span_context().is_sampled())
}

/// The caller's trace context from `traceparent`/`tracestate`, as the parent of `span`
/// (nothing happens unless OTLP export is on).
pub fn extract_parent(headers: &HeaderMap, span: &tracing::Span) {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    // A request without `traceparent` starts a new trace: nothing to link.
    if opentelemetry::trace::TraceContextExt::has_active_span(&parent) {
        let _ = span.set_parent(parent);
    }
}

/// Writes the current span's trace context into `headers` (`traceparent`, replacing
/// the caller's), so the upstream's spans join the trace under the sidecar's.
pub fn inject_current(headers: &mut HeaderMap) {
    if !EXPORTING_TRACES.load(Ordering::Relaxed) {
        return;
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(headers));
    });
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) else {
            return;
        };
        self.0.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::propagation::TextMapPropagator as _;

    use super::*;

    #[test]
    fn trace_context_round_trips_through_headers() {
        let propagator = TraceContextPropagator::new();
        let mut headers = HeaderMap::new();
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert(
            "traceparent",
            traceparent.parse().unwrap_or_else(|_| unreachable!()),
        );
        let context = propagator.extract(&HeaderExtractor(&headers));
        let mut out = HeaderMap::new();
        propagator.inject_context(&context, &mut HeaderInjector(&mut out));
        assert_eq!(
            out.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(traceparent)
        );
    }
}

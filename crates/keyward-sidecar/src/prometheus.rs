//! Prometheus text (exposition format 0.0.4) and OpenMetrics text (1.0.0, with the
//! exemplars of [`crate::exemplars`]) from the OpenTelemetry SDK: a pull reader the
//! admin `/metrics` collects on each scrape, and a small renderer. A scrape gets
//! OpenMetrics when its `Accept` header asks for it ([`Format::negotiate`]), Prometheus
//! text otherwise.
//!
//! Written here rather than taken from `opentelemetry-prometheus`, which is unmaintained
//! and tied to the `prometheus` crate. Metric names are the instruments' names as they
//! are (the contract's `keyward_decisions_total`, ...): no unit suffixes, no scope
//! labels. Labels come in the contract's order (`layer`, `route`, `outcome`, `op`), then
//! any others sorted.

use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{
    AggregatedMetrics, HistogramDataPoint, Metric, MetricData, ResourceMetrics, Sum,
};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};

use crate::exemplars::{Exemplar, Exemplars, HistogramExemplars, Snapshot};

/// A [`ManualReader`] shared between the meter provider and the admin endpoint.
#[derive(Clone, Debug, Default)]
pub struct PullReader(Arc<ManualReader>);

impl MetricReader for PullReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }

    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

impl PullReader {
    /// Collects every instrument now and renders Prometheus text; empty if the provider
    /// is gone.
    pub fn render(&self) -> String {
        self.collect_now().map(|m| render(&m)).unwrap_or_default()
    }

    /// Collects every instrument now and renders OpenMetrics text with the exemplars
    /// kept in `exemplars`; only `# EOF` if the provider is gone.
    pub fn render_openmetrics(&self, exemplars: &Exemplars) -> String {
        let collected = self.collect_now().unwrap_or_default();
        render_openmetrics(&collected, &exemplars.snapshot())
    }

    fn collect_now(&self) -> Option<ResourceMetrics> {
        let mut collected = ResourceMetrics::default();
        if let Err(error) = self.0.collect(&mut collected) {
            tracing::debug!(%error, "metrics collection failed");
            return None;
        }
        Some(collected)
    }
}

/// The exposition formats `/metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text, exposition format 0.0.4 (what a scrape gets by default).
    Prometheus,
    /// OpenMetrics 1.0.0 text, with exemplars.
    OpenMetrics,
}

impl Format {
    /// What a scrape with this `Accept` header gets: OpenMetrics when it asks for
    /// `application/openmetrics-text` (with a non-zero `q`, and not below its `q` for
    /// `text/plain`, as Prometheus does with exemplar storage on or off), else
    /// Prometheus text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Label keys in the order the contract writes them.
const LABEL_ORDER: [&str; 4] = ["layer", "route", "outcome", "op"];

/// Renders every counter and histogram of `metrics` as Prometheus text.
pub fn render(metrics: &ResourceMetrics) -> String {
    let mut out = String::new();
    for scope in metrics.scope_metrics() {
        for metric in scope.metrics() {
            render_metric(&mut out, metric, None);
        }
    }
    out
}

/// Renders every counter and histogram of `metrics` as OpenMetrics text: counters'
/// families named without `_total` (their samples with it), `# UNIT` for seconds and
/// bytes, the histograms' buckets with their exemplars from `exemplars`, and `# EOF`.
pub fn render_openmetrics(metrics: &ResourceMetrics, exemplars: &Snapshot) -> String {
    let mut out = String::new();
    for scope in metrics.scope_metrics() {
        for metric in scope.metrics() {
            render_metric(&mut out, metric, Some(exemplars));
        }
    }
    out.push_str("# EOF\n");
    out
}

/// One metric; `openmetrics` is the exemplars when the format is OpenMetrics.
fn render_metric(out: &mut String, metric: &Metric, openmetrics: Option<&Snapshot>) {
    match metric.data() {
        AggregatedMetrics::U64(MetricData::Sum(sum)) => render_sum(out, metric, sum, openmetrics),
        AggregatedMetrics::I64(MetricData::Sum(sum)) => render_sum(out, metric, sum, openmetrics),
        AggregatedMetrics::F64(MetricData::Sum(sum)) => render_sum(out, metric, sum, openmetrics),
        AggregatedMetrics::F64(MetricData::Histogram(histogram)) => {
            let name = header(out, metric, "histogram", openmetrics.is_some());
            let exemplars = openmetrics.and_then(|e| e.histogram(metric.name()));
            for point in histogram.data_points() {
                histogram_point(out, &name, point, exemplars);
            }
        }
        // keyward records no gauges, integer histograms or exponential histograms.
        _ => {}
    }
}

fn render_sum<T: std::fmt::Display + Copy>(
    out: &mut String,
    metric: &Metric,
    sum: &Sum<T>,
    openmetrics: Option<&Snapshot>,
) {
    let kind = if sum.is_monotonic() {
        "counter"
    } else {
        "gauge"
    };
    let name = header(out, metric, kind, openmetrics.is_some());
    for point in sum.data_points() {
        let labels = labels(point.attributes(), None);
        let _ = writeln!(out, "{name}{labels} {}", point.value());
    }
}

/// The Prometheus name of an OpenTelemetry instrument, after the OpenTelemetry-to-
/// Prometheus rules: characters outside `[a-zA-Z0-9_:]` become `_`, the unit is
/// appended (`s` as `_seconds`, `By` as `_bytes`) and counters end in `_total`, each
/// only when the name does not end so already (`keyward_wait_seconds` stays as it is).
pub fn prometheus_name(name: &str, unit: &str, kind: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let suffix = match unit {
        "s" => "_seconds",
        "By" => "_bytes",
        _ => "",
    };
    if !suffix.is_empty() && !out.ends_with(suffix) {
        out.push_str(suffix);
    }
    if kind == "counter" && !out.ends_with("_total") {
        out.push_str("_total");
    }
    out
}

/// Writes the metadata lines; answers the name the samples use. Prometheus text: `#
/// HELP` and `# TYPE` of the samples' name. OpenMetrics: `# TYPE`, `# UNIT` (seconds,
/// bytes) and `# HELP` of the family, whose name for a counter has no `_total` (its
/// samples do).
fn header(out: &mut String, metric: &Metric, kind: &str, openmetrics: bool) -> String {
    let name = prometheus_name(metric.name(), metric.unit(), kind);
    if openmetrics {
        let family = match kind {
            "counter" => name.strip_suffix("_total").unwrap_or(&name),
            _ => &name,
        };
        let _ = writeln!(out, "# TYPE {family} {kind}");
        let unit = match metric.unit() {
            "s" => "seconds",
            "By" => "bytes",
            _ => "",
        };
        if !unit.is_empty() && family.strip_suffix(unit).is_some_and(|f| f.ends_with('_')) {
            let _ = writeln!(out, "# UNIT {family} {unit}");
        }
        if !metric.description().is_empty() {
            let _ = writeln!(out, "# HELP {family} {}", escape(metric.description()));
        }
        return name;
    }
    if !metric.description().is_empty() {
        let _ = writeln!(
            out,
            "# HELP {name} {}",
            metric
                .description()
                .replace('\\', "\\\\")
                .replace('\n', "\\n")
        );
    }
    let _ = writeln!(out, "# TYPE {name} {kind}");
    name
}

/// One series of a histogram; with `exemplars` (OpenMetrics), each bucket line is
/// followed by the bucket's exemplar, if it has one.
fn histogram_point(
    out: &mut String,
    name: &str,
    point: &HistogramDataPoint<f64>,
    exemplars: Option<&HistogramExemplars>,
) {
    let labels_plain = labels(point.attributes(), None);
    // Kept with the same bounds the SDK counts with (no view changed them).
    let series = exemplars
        .filter(|e| e.bounds.iter().copied().eq(point.bounds()))
        .and_then(|e| e.series.get(&labels_plain));
    let exemplar = |i: usize| series.and_then(|s| s.get(i).copied().flatten());
    let mut cumulative = 0;
    let mut counts = point.bucket_counts();
    let mut bucket = 0;
    for bound in point.bounds() {
        cumulative += counts.next().unwrap_or(0);
        let labels = labels(point.attributes(), Some(&bound.to_string()));
        let _ = write!(out, "{name}_bucket{labels} {cumulative}");
        write_exemplar(out, exemplar(bucket));
        out.push('\n');
        bucket += 1;
    }
    let labels_inf = labels(point.attributes(), Some("+Inf"));
    let _ = write!(out, "{name}_bucket{labels_inf} {}", point.count());
    write_exemplar(out, exemplar(bucket));
    out.push('\n');
    let _ = writeln!(out, "{name}_sum{labels_plain} {}", point.sum());
    let _ = writeln!(out, "{name}_count{labels_plain} {}", point.count());
}

/// ` # {trace_id="…",span_id="…"} VALUE TIMESTAMP` (OpenMetrics exemplar syntax).
fn write_exemplar(out: &mut String, exemplar: Option<Exemplar>) {
    let Some(exemplar) = exemplar else {
        return;
    };
    let at = exemplar
        .time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let _ = write!(
        out,
        " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {}.{:03}",
        exemplar.trace_id,
        exemplar.span_id,
        exemplar.value,
        at.as_secs(),
        at.subsec_millis()
    );
}

/// `{k="v",...}` in the contract's order, plus `le` for histogram buckets.
pub fn labels<'a>(attributes: impl Iterator<Item = &'a KeyValue>, le: Option<&str>) -> String {
    let mut pairs: Vec<(&str, String)> = attributes
        .map(|kv| (kv.key.as_str(), label_value(&kv.value)))
        .collect();
    pairs.sort_by_key(|(key, _)| {
        let rank = LABEL_ORDER
            .iter()
            .position(|k| k == key)
            .unwrap_or(LABEL_ORDER.len());
        (rank, *key)
    });
    if let Some(le) = le {
        pairs.push(("le", le.to_owned()));
    }
    if pairs.is_empty() {
        return String::new();
    }
    let mut out = String::from("{");
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}=\"{}\"", sanitize(key), escape(value));
    }
    out.push('}');
    out
}

fn label_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.as_str().to_owned(),
        other => other.to_string(),
    }
}

/// Prometheus label names are `[a-zA-Z_][a-zA-Z0-9_]*`.
fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    use super::*;

    /// A provider with one instrument of each kind the sidecar renders.
    fn sample_provider() -> (PullReader, SdkMeterProvider) {
        let reader = PullReader::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter("keyward");
        meter
            .u64_counter("keyward_decisions_total")
            .with_description("Decisions by \"layer\",\nroute and outcome.")
            .build()
            .add(
                3,
                &[KeyValue::new("route", "a"), KeyValue::new("layer", "quota")],
            );
        meter
            .u64_counter("keyward.upstream.failures")
            .build()
            .add(1, &[KeyValue::new("error.type", "timeout")]);
        meter
            .i64_up_down_counter("keyward_waiting")
            .build()
            .add(2, &[KeyValue::new("layer", "serial")]);
        meter
            .i64_observable_up_down_counter("keyward.memory.bytes")
            .with_unit("By")
            .with_description("Bytes.")
            .with_callback(|observer| observer.observe(7, &[KeyValue::new("table", "t")]))
            .build();
        let latency = meter
            .f64_histogram("http.server.request.duration")
            .with_unit("s")
            .with_description("Duration.")
            .with_boundaries(vec![0.1, 1.0])
            .build();
        latency.record(0.05, &[KeyValue::new("http.route", "r")]);
        latency.record(2.5, &[KeyValue::new("http.route", "r")]);
        (reader, provider)
    }

    /// The Prometheus text of [`sample_provider`], byte for byte as the renderer wrote it
    /// before OpenMetrics (and exemplars) were added: a scrape that does not ask for
    /// OpenMetrics gets exactly this.
    const SAMPLE_PROMETHEUS: &str = concat!(
        "# HELP keyward_decisions_total Decisions by \"layer\",\\nroute and outcome.\n",
        "# TYPE keyward_decisions_total counter\n",
        "keyward_decisions_total{layer=\"quota\",route=\"a\"} 3\n",
        "# TYPE keyward_upstream_failures_total counter\n",
        "keyward_upstream_failures_total{error_type=\"timeout\"} 1\n",
        "# TYPE keyward_waiting gauge\n",
        "keyward_waiting{layer=\"serial\"} 2\n",
        "# HELP keyward_memory_bytes Bytes.\n",
        "# TYPE keyward_memory_bytes gauge\n",
        "keyward_memory_bytes{table=\"t\"} 7\n",
        "# HELP http_server_request_duration_seconds Duration.\n",
        "# TYPE http_server_request_duration_seconds histogram\n",
        "http_server_request_duration_seconds_bucket{http_route=\"r\",le=\"0.1\"} 1\n",
        "http_server_request_duration_seconds_bucket{http_route=\"r\",le=\"1\"} 1\n",
        "http_server_request_duration_seconds_bucket{http_route=\"r\",le=\"+Inf\"} 2\n",
        "http_server_request_duration_seconds_sum{http_route=\"r\"} 2.55\n",
        "http_server_request_duration_seconds_count{http_route=\"r\"} 2\n",
    );

    #[test]
    fn prometheus_text_stays_byte_for_byte() {
        let (reader, _provider) = sample_provider();
        let text = reader.render();
        assert_eq!(text, SAMPLE_PROMETHEUS, "\n{text}");
    }

    #[test]
    fn openmetrics_names_families_declares_units_and_ends_with_eof() {
        let (reader, _provider) = sample_provider();
        let text = reader.render_openmetrics(&Exemplars::default());
        for line in [
            "# TYPE keyward_decisions counter",
            "# HELP keyward_decisions Decisions by \\\"layer\\\",\\nroute and outcome.",
            "keyward_decisions_total{layer=\"quota\",route=\"a\"} 3",
            "# TYPE keyward_upstream_failures counter",
            "keyward_upstream_failures_total{error_type=\"timeout\"} 1",
            "# TYPE keyward_waiting gauge",
            "# TYPE keyward_memory_bytes gauge",
            "# UNIT keyward_memory_bytes bytes",
            "# TYPE http_server_request_duration_seconds histogram",
            "# UNIT http_server_request_duration_seconds seconds",
            "http_server_request_duration_seconds_bucket{http_route=\"r\",le=\"0.1\"} 1",
            "http_server_request_duration_seconds_bucket{http_route=\"r\",le=\"+Inf\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!text.contains(" # {"), "no exemplars were kept: {text}");
        assert!(text.ends_with("\n# EOF\n"), "{text}");
    }

    #[test]
    fn openmetrics_buckets_carry_their_exemplars() {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        };
        let reader = PullReader::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let exemplars = Exemplars::default();
        let meter = exemplars.meter(provider.meter("keyward"));
        let latency = meter
            .f64_histogram("http.server.request.duration")
            .with_unit("s")
            .with_boundaries(vec![0.1, 1.0])
            .build();
        let route = [KeyValue::new("http.route", "r")];
        latency.record(0.05, &route);
        let sampled = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        {
            let _attached = sampled.attach();
            latency.record(0.25, &route);
        }

        let text = reader.render_openmetrics(&exemplars);
        let bucket = |le: &str| {
            let prefix = format!(
                "http_server_request_duration_seconds_bucket{{http_route=\"r\",le=\"{le}\"}} "
            );
            text.lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("{prefix} not in\n{text}"))
                .to_owned()
        };
        assert!(
            bucket("0.1").ends_with("} 1"),
            "unsampled: no exemplar\n{text}"
        );
        let line = bucket("1");
        let (count, exemplar) = line.split_once(" # ").unwrap();
        assert!(count.ends_with(" 2"), "{line}");
        let (labels, rest) = exemplar.split_once("} ").unwrap();
        assert_eq!(
            labels,
            "{trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\",span_id=\"00f067aa0ba902b7\""
        );
        let (value, timestamp) = rest.split_once(' ').unwrap();
        assert_eq!(value, "0.25");
        let timestamp: f64 = timestamp.parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((now - timestamp).abs() < 60.0, "{timestamp} vs {now}");
        assert!(bucket("+Inf").ends_with("} 2"), "{text}");
        // Prometheus text never carries exemplars.
        assert!(!reader.render().contains(" # {"));
    }

    #[test]
    fn a_scrape_gets_openmetrics_only_when_it_asks_for_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        for (accept, format) in [
            (None, Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain"), Format::Prometheus),
            (Some("text/plain;version=0.0.4"), Format::Prometheus),
            (Some(prometheus), Format::OpenMetrics),
            (Some("application/openmetrics-text"), Format::OpenMetrics),
            (
                Some("Application/OpenMetrics-Text; version=1.0.0"),
                Format::OpenMetrics,
            ),
            (Some("application/openmetrics-text;q=0"), Format::Prometheus),
            (
                Some("text/plain, application/openmetrics-text;q=0.5"),
                Format::Prometheus,
            ),
            (
                Some("application/openmetrics-text, text/plain;q=0.5"),
                Format::OpenMetrics,
            ),
        ] {
            assert_eq!(Format::negotiate(accept), format, "{accept:?}");
        }
        assert_eq!(
            Format::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            Format::Prometheus.content_type(),
            "text/plain; version=0.0.4"
        );
    }

    #[test]
    fn renders_counters_and_histograms_in_contract_label_order() {
        let reader = PullReader::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter("keyward");
        let decisions = meter
            .u64_counter("keyward_decisions_total")
            .with_description("Decisions.")
            .build();
        let labels = [
            KeyValue::new("outcome", "replayed"),
            KeyValue::new("route", "pay\"ments"),
            KeyValue::new("layer", "idempotency"),
        ];
        decisions.add(1, &labels);
        decisions.add(1, &labels);
        let waits = meter
            .f64_histogram("keyward_wait_seconds")
            .with_boundaries(vec![0.001, 0.0025])
            .build();
        let labels = [
            KeyValue::new("route", "acct"),
            KeyValue::new("layer", "serial"),
        ];
        waits.record(0.002, &labels);

        let text = reader.render();
        assert!(
            text.contains("# TYPE keyward_decisions_total counter"),
            "{text}"
        );
        assert!(text.contains("keyward_decisions_total{layer=\"idempotency\",route=\"pay\\\"ments\",outcome=\"replayed\"} 2"), "{text}");
        assert!(
            text.contains("# TYPE keyward_wait_seconds histogram"),
            "{text}"
        );
        assert!(text.contains(
            "keyward_wait_seconds_bucket{layer=\"serial\",route=\"acct\",le=\"0.001\"} 0"
        ));
        assert!(text.contains(
            "keyward_wait_seconds_bucket{layer=\"serial\",route=\"acct\",le=\"0.0025\"} 1"
        ));
        assert!(text.contains(
            "keyward_wait_seconds_bucket{layer=\"serial\",route=\"acct\",le=\"+Inf\"} 1"
        ));
        assert!(text.contains("keyward_wait_seconds_sum{layer=\"serial\",route=\"acct\"} 0.002"));
        assert!(text.contains("keyward_wait_seconds_count{layer=\"serial\",route=\"acct\"} 1"));
    }
}

//! Prometheus text (exposition format 0.0.4) from the OpenTelemetry SDK: a pull reader
//! the admin `/metrics` collects on each scrape, and a small renderer.
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
        let mut collected = ResourceMetrics::default();
        if let Err(error) = self.0.collect(&mut collected) {
            tracing::debug!(%error, "metrics collection failed");
            return String::new();
        }
        render(&collected)
    }
}

/// Label keys in the order the contract writes them.
const LABEL_ORDER: [&str; 4] = ["layer", "route", "outcome", "op"];

/// Renders every counter and histogram of `metrics`.
pub fn render(metrics: &ResourceMetrics) -> String {
    let mut out = String::new();
    for scope in metrics.scope_metrics() {
        for metric in scope.metrics() {
            render_metric(&mut out, metric);
        }
    }
    out
}

fn render_metric(out: &mut String, metric: &Metric) {
    match metric.data() {
        AggregatedMetrics::U64(MetricData::Sum(sum)) => render_sum(out, metric, sum),
        AggregatedMetrics::I64(MetricData::Sum(sum)) => render_sum(out, metric, sum),
        AggregatedMetrics::F64(MetricData::Sum(sum)) => render_sum(out, metric, sum),
        AggregatedMetrics::F64(MetricData::Histogram(histogram)) => {
            let name = header(out, metric, "histogram");
            for point in histogram.data_points() {
                histogram_point(out, &name, point);
            }
        }
        // keyward records no gauges, integer histograms or exponential histograms.
        _ => {}
    }
}

fn render_sum<T: std::fmt::Display + Copy>(out: &mut String, metric: &Metric, sum: &Sum<T>) {
    let kind = if sum.is_monotonic() {
        "counter"
    } else {
        "gauge"
    };
    let name = header(out, metric, kind);
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

/// Writes the `# HELP` and `# TYPE` lines; answers the name the samples use.
fn header(out: &mut String, metric: &Metric, kind: &str) -> String {
    let name = prometheus_name(metric.name(), metric.unit(), kind);
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

fn histogram_point(out: &mut String, name: &str, point: &HistogramDataPoint<f64>) {
    let mut cumulative = 0;
    let mut counts = point.bucket_counts();
    for bound in point.bounds() {
        cumulative += counts.next().unwrap_or(0);
        let labels = labels(point.attributes(), Some(&bound.to_string()));
        let _ = writeln!(out, "{name}_bucket{labels} {cumulative}");
    }
    let labels_inf = labels(point.attributes(), Some("+Inf"));
    let _ = writeln!(out, "{name}_bucket{labels_inf} {}", point.count());
    let labels = labels(point.attributes(), None);
    let _ = writeln!(out, "{name}_sum{labels} {}", point.sum());
    let _ = writeln!(out, "{name}_count{labels} {}", point.count());
}

/// `{k="v",...}` in the contract's order, plus `le` for histogram buckets.
fn labels<'a>(attributes: impl Iterator<Item = &'a KeyValue>, le: Option<&str>) -> String {
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

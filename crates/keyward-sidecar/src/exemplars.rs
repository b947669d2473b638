//! OpenMetrics exemplars for the sidecar's histograms: the trace of a sampled request
//! that landed in each bucket, so a slow bucket on a panel opens a trace that shows why.
//!
//! The OpenTelemetry SDK (0.33) collects no exemplars for histograms (its data points'
//! `exemplars` are always empty), so the sidecar keeps them itself: with OTLP export on,
//! [`Exemplars::meter`] wraps the SDK's meter, and every `f64` histogram it makes
//! (`http.server.request.duration`, `http.client.request.duration`, the layers'
//! `keyward_wait_seconds` and `keyward_store_seconds`) records into the SDK as before
//! and, when the measurement is made inside a sampled trace (the OpenTelemetry context
//! that `tracing-opentelemetry` makes current while a sampled request's span is
//! entered), also keeps that trace and span id with the value and the time, as the
//! latest exemplar of the measurement's bucket in its series.
//!
//! Without OTLP export there is no trace id and no wrapper: the request path pays
//! nothing. With it, an unsampled measurement costs one thread-local read (the current
//! context has no sampled span) and allocates nothing; a sampled one a hash of its
//! attributes, a read lock and a lock of its series (a new series allocates once).
//!
//! Memory is bounded: one exemplar (48 bytes) per bucket per series, and at most
//! [`MAX_SERIES`] series per histogram (the SDK's own default cardinality limit);
//! measurements of further series keep no exemplar.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use opentelemetry::metrics::{
    AsyncInstrumentBuilder, BoundHistogram, BoundSyncInstrument, Counter, Gauge, Histogram,
    HistogramBuilder, InstrumentBuilder, InstrumentProvider, Meter, ObservableCounter,
    ObservableGauge, ObservableUpDownCounter, SyncInstrument, UpDownCounter,
};
use opentelemetry::trace::{SpanId, TraceContextExt as _, TraceId};
use opentelemetry::{Context, KeyValue, Value};

/// Series per histogram that keep exemplars; the OpenTelemetry SDK's default
/// cardinality limit, beyond which it folds series into one overflow series anyway.
pub const MAX_SERIES: usize = 2000;

/// The SDK's bucket bounds for a histogram built without any.
const SDK_DEFAULT_BOUNDS: [f64; 15] = [
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0, 7500.0,
    10000.0,
];

/// One measurement of a sampled request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exemplar {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub value: f64,
    pub time: SystemTime,
}

/// The exemplars of every histogram of the meters [`Exemplars::meter`] made, by
/// instrument name. Cloning shares them.
#[derive(Clone, Default)]
pub struct Exemplars(Arc<Mutex<HashMap<String, Arc<Table>>>>);

impl std::fmt::Debug for Exemplars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exemplars").finish_non_exhaustive()
    }
}

impl Exemplars {
    /// A meter that makes its instruments with `meter`, its `f64` histograms keeping
    /// exemplars here.
    pub fn meter(&self, meter: Meter) -> Meter {
        Meter::new(Arc::new(Instruments {
            inner: meter,
            exemplars: self.clone(),
        }))
    }

    /// The table of histogram `name` (one per name: a reload that builds its routes'
    /// instruments again finds the same table).
    fn table(&self, name: &str, bounds: &[f64]) -> Arc<Table> {
        let mut tables = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tables
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Table {
                    bounds: bounds.into(),
                    hasher: std::collections::hash_map::RandomState::new(),
                    series: RwLock::new(HashMap::new()),
                })
            })
            .clone()
    }

    /// What is kept now, for one scrape.
    pub fn snapshot(&self) -> Snapshot {
        let tables: Vec<(String, Arc<Table>)> = {
            let tables = self.0.lock().unwrap_or_else(|p| p.into_inner());
            tables
                .iter()
                .map(|(name, table)| (name.clone(), table.clone()))
                .collect()
        };
        Snapshot(
            tables
                .into_iter()
                .map(|(name, table)| (name, table.snapshot()))
                .collect(),
        )
    }
}

/// The exemplars of every histogram at one moment, looked up by instrument name and by
/// a series' labels as [`crate::prometheus`] writes them (without `le`).
#[derive(Debug, Default)]
pub struct Snapshot(HashMap<String, HistogramExemplars>);

impl Snapshot {
    pub fn histogram(&self, name: &str) -> Option<&HistogramExemplars> {
        self.0.get(name)
    }
}

/// One histogram's exemplars: the bounds its buckets were indexed with, and per series
/// one optional exemplar per bucket (the last for `+Inf`).
#[derive(Debug)]
pub struct HistogramExemplars {
    pub bounds: Box<[f64]>,
    pub series: HashMap<String, Vec<Option<Exemplar>>>,
}

struct Table {
    bounds: Box<[f64]>,
    hasher: std::collections::hash_map::RandomState,
    /// Series by the hash of their attributes (as the measurements give them).
    series: RwLock<HashMap<u64, Vec<Arc<Series>>>>,
}

struct Series {
    attributes: Vec<KeyValue>,
    /// The labels as rendered, to find the series of a collected data point.
    labels: String,
    buckets: Mutex<Box<[Option<Exemplar>]>>,
}

impl Table {
    fn offer(&self, value: f64, attributes: &[KeyValue], trace_id: TraceId, span_id: SpanId) {
        if !value.is_finite() {
            return;
        }
        // As the SDK counts it: a value on a bound belongs to the bucket it closes.
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        let exemplar = Exemplar {
            trace_id,
            span_id,
            value,
            time: SystemTime::now(),
        };
        let hash = self.hash(attributes);
        let found = {
            let series = self.series.read().unwrap_or_else(|p| p.into_inner());
            find(&series, hash, attributes)
        };
        let series = match found {
            Some(series) => series,
            None => {
                let mut all = self.series.write().unwrap_or_else(|p| p.into_inner());
                match find(&all, hash, attributes) {
                    Some(series) => series,
                    None => {
                        if all.values().map(Vec::len).sum::<usize>() >= MAX_SERIES {
                            return;
                        }
                        let series = Arc::new(Series {
                            attributes: attributes.to_vec(),
                            labels: crate::prometheus::labels(attributes.iter(), None),
                            buckets: Mutex::new(vec![None; self.bounds.len() + 1].into()),
                        });
                        all.entry(hash).or_default().push(series.clone());
                        series
                    }
                }
            }
        };
        let mut buckets = series.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = buckets.get_mut(bucket) {
            *slot = Some(exemplar);
        }
    }

    fn hash(&self, attributes: &[KeyValue]) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        for kv in attributes {
            kv.key.hash(&mut hasher);
            match &kv.value {
                Value::Bool(b) => b.hash(&mut hasher),
                Value::I64(n) => n.hash(&mut hasher),
                Value::F64(x) => x.to_bits().hash(&mut hasher),
                Value::String(s) => s.hash(&mut hasher),
                // Arrays (never recorded here) share a hash; equality tells them apart.
                _ => 0u8.hash(&mut hasher),
            }
        }
        hasher.finish()
    }

    fn snapshot(&self) -> HistogramExemplars {
        let all = self.series.read().unwrap_or_else(|p| p.into_inner());
        let mut series: HashMap<String, Vec<Option<Exemplar>>> = HashMap::new();
        for one in all.values().flatten() {
            let buckets = one.buckets.lock().unwrap_or_else(|p| p.into_inner());
            match series.get_mut(&one.labels) {
                // The same attributes given in another order: the latest of each bucket.
                Some(kept) => {
                    for (kept, new) in kept.iter_mut().zip(buckets.iter()) {
                        if let Some(new) = new {
                            if kept.is_none_or(|kept| kept.time < new.time) {
                                *kept = Some(*new);
                            }
                        }
                    }
                }
                None => {
                    series.insert(one.labels.clone(), buckets.to_vec());
                }
            }
        }
        HistogramExemplars {
            bounds: self.bounds.clone(),
            series,
        }
    }
}

fn find(
    series: &HashMap<u64, Vec<Arc<Series>>>,
    hash: u64,
    attributes: &[KeyValue],
) -> Option<Arc<Series>> {
    series
        .get(&hash)?
        .iter()
        .find(|series| series.attributes == attributes)
        .cloned()
}

/// The trace and span of the current OpenTelemetry context, if its span is sampled.
fn sampled_span() -> Option<(TraceId, SpanId)> {
    Context::map_current(|cx| {
        let span = cx.span();
        let context = span.span_context();
        (context.is_valid() && context.is_sampled())
            .then(|| (context.trace_id(), context.span_id()))
    })
}

/// An `f64` histogram of the SDK that also keeps exemplars.
struct Recording {
    histogram: Histogram<f64>,
    table: Arc<Table>,
}

impl SyncInstrument<f64> for Recording {
    fn measure(&self, value: f64, attributes: &[KeyValue]) {
        self.histogram.record(value, attributes);
        if let Some((trace_id, span_id)) = sampled_span() {
            self.table.offer(value, attributes, trace_id, span_id);
        }
    }

    // Without this the API's default binds a no-op: every point recorded through a
    // bound handle (the proxy's request histograms) would be dropped.
    fn bind(&self, attributes: &[KeyValue]) -> Box<dyn BoundSyncInstrument<f64> + Send + Sync> {
        Box::new(BoundRecording {
            histogram: self.histogram.bind(attributes),
            table: self.table.clone(),
            attributes: attributes.to_vec(),
        })
    }
}

/// A [`Recording`] bound to one attribute set.
struct BoundRecording {
    histogram: BoundHistogram<f64>,
    table: Arc<Table>,
    attributes: Vec<KeyValue>,
}

impl BoundSyncInstrument<f64> for BoundRecording {
    fn measure(&self, value: f64) {
        self.histogram.record(value);
        if let Some((trace_id, span_id)) = sampled_span() {
            self.table.offer(value, &self.attributes, trace_id, span_id);
        }
    }
}

/// The instrument provider of [`Exemplars::meter`]: the inner meter's instruments, with
/// its `f64` histograms wrapped.
struct Instruments {
    inner: Meter,
    exemplars: Exemplars,
}

/// The inner meter's builder for a synchronous instrument, described as `$builder` is.
macro_rules! forward_sync {
    ($method:ident, $instrument:ty) => {
        fn $method(&self, builder: InstrumentBuilder<'_, $instrument>) -> $instrument {
            let InstrumentBuilder {
                name,
                description,
                unit,
                ..
            } = builder;
            describe(self.inner.$method(name), description, unit).build()
        }
    };
}

/// The same for an asynchronous instrument, with its callbacks.
macro_rules! forward_async {
    ($method:ident, $instrument:ty, $measurement:ty) => {
        fn $method(
            &self,
            builder: AsyncInstrumentBuilder<'_, $instrument, $measurement>,
        ) -> $instrument {
            let AsyncInstrumentBuilder {
                name,
                description,
                unit,
                callbacks,
                ..
            } = builder;
            let mut inner = self.inner.$method(name);
            if let Some(description) = description {
                inner = inner.with_description(description);
            }
            if let Some(unit) = unit {
                inner = inner.with_unit(unit);
            }
            for callback in callbacks {
                inner = inner.with_callback(callback);
            }
            inner.build()
        }
    };
}

fn describe<'a, T>(
    mut builder: InstrumentBuilder<'a, T>,
    description: Option<Cow<'static, str>>,
    unit: Option<Cow<'static, str>>,
) -> InstrumentBuilder<'a, T> {
    if let Some(description) = description {
        builder = builder.with_description(description);
    }
    if let Some(unit) = unit {
        builder = builder.with_unit(unit);
    }
    builder
}

impl InstrumentProvider for Instruments {
    forward_sync!(u64_counter, Counter<u64>);
    forward_sync!(f64_counter, Counter<f64>);
    forward_sync!(i64_up_down_counter, UpDownCounter<i64>);
    forward_sync!(f64_up_down_counter, UpDownCounter<f64>);
    forward_sync!(u64_gauge, Gauge<u64>);
    forward_sync!(f64_gauge, Gauge<f64>);
    forward_sync!(i64_gauge, Gauge<i64>);
    forward_async!(u64_observable_counter, ObservableCounter<u64>, u64);
    forward_async!(f64_observable_counter, ObservableCounter<f64>, f64);
    forward_async!(
        i64_observable_up_down_counter,
        ObservableUpDownCounter<i64>,
        i64
    );
    forward_async!(
        f64_observable_up_down_counter,
        ObservableUpDownCounter<f64>,
        f64
    );
    forward_async!(u64_observable_gauge, ObservableGauge<u64>, u64);
    forward_async!(i64_observable_gauge, ObservableGauge<i64>, i64);
    forward_async!(f64_observable_gauge, ObservableGauge<f64>, f64);

    fn f64_histogram(&self, builder: HistogramBuilder<'_, Histogram<f64>>) -> Histogram<f64> {
        let HistogramBuilder {
            name,
            description,
            unit,
            boundaries,
            ..
        } = builder;
        let table = self
            .exemplars
            .table(&name, boundaries.as_deref().unwrap_or(&SDK_DEFAULT_BOUNDS));
        let mut inner = self.inner.f64_histogram(name);
        if let Some(description) = description {
            inner = inner.with_description(description);
        }
        if let Some(unit) = unit {
            inner = inner.with_unit(unit);
        }
        if let Some(boundaries) = boundaries {
            inner = inner.with_boundaries(boundaries);
        }
        Histogram::new(Arc::new(Recording {
            histogram: inner.build(),
            table,
        }))
    }

    fn u64_histogram(&self, builder: HistogramBuilder<'_, Histogram<u64>>) -> Histogram<u64> {
        let HistogramBuilder {
            name,
            description,
            unit,
            boundaries,
            ..
        } = builder;
        let mut inner = self.inner.u64_histogram(name);
        if let Some(description) = description {
            inner = inner.with_description(description);
        }
        if let Some(unit) = unit {
            inner = inner.with_unit(unit);
        }
        if let Some(boundaries) = boundaries {
            inner = inner.with_boundaries(boundaries);
        }
        inner.build()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    use super::*;
    use crate::prometheus::PullReader;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn context(flags: TraceFlags) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex(TRACE).unwrap(),
            SpanId::from_hex(SPAN).unwrap(),
            flags,
            true,
            TraceState::default(),
        ))
    }

    fn histogram() -> (Exemplars, Histogram<f64>, PullReader, SdkMeterProvider) {
        let reader = PullReader::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let exemplars = Exemplars::default();
        let meter = exemplars.meter(provider.meter("keyward"));
        let histogram = meter
            .f64_histogram("keyward_wait_seconds")
            .with_unit("s")
            .with_boundaries(vec![0.1, 1.0])
            .build();
        (exemplars, histogram, reader, provider)
    }

    fn kept(exemplars: &Exemplars, labels: &str) -> Vec<Option<Exemplar>> {
        exemplars
            .snapshot()
            .histogram("keyward_wait_seconds")
            .and_then(|h| h.series.get(labels).cloned())
            .unwrap_or_default()
    }

    #[test]
    fn a_measurement_outside_a_sampled_trace_keeps_no_exemplar_but_is_counted() {
        let (exemplars, histogram, reader, _provider) = histogram();
        let labels = [KeyValue::new("layer", "serial")];
        histogram.record(0.5, &labels);
        {
            let _unsampled = context(TraceFlags::default()).attach();
            histogram.record(0.5, &labels);
        }
        assert!(kept(&exemplars, "{layer=\"serial\"}").is_empty());
        let text = reader.render();
        assert!(
            text.contains("keyward_wait_seconds_count{layer=\"serial\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn a_sampled_measurement_is_the_exemplar_of_its_bucket_until_the_next() {
        let (exemplars, histogram, _reader, _provider) = histogram();
        {
            let _sampled = context(TraceFlags::SAMPLED).attach();
            // The attributes in either order are one series.
            histogram.record(
                0.5,
                &[
                    KeyValue::new("route", "a"),
                    KeyValue::new("layer", "serial"),
                ],
            );
            histogram.record(
                1.0,
                &[
                    KeyValue::new("layer", "serial"),
                    KeyValue::new("route", "a"),
                ],
            );
        }
        let buckets = kept(&exemplars, "{layer=\"serial\",route=\"a\"}");
        assert_eq!(buckets.len(), 3, "two bounds, and +Inf");
        assert!(buckets[0].is_none());
        let latest = buckets[1].unwrap();
        assert_eq!(latest.value, 1.0, "a value on a bound closes its bucket");
        assert_eq!(latest.trace_id.to_string(), TRACE);
        assert_eq!(latest.span_id.to_string(), SPAN);
        assert!(buckets[2].is_none());
    }

    #[test]
    fn series_beyond_the_limit_keep_no_exemplars() {
        let (exemplars, histogram, _reader, _provider) = histogram();
        let _sampled = context(TraceFlags::SAMPLED).attach();
        for n in 0..MAX_SERIES + 10 {
            histogram.record(0.01, &[KeyValue::new("route", n.to_string())]);
        }
        let snapshot = exemplars.snapshot();
        let series = &snapshot.histogram("keyward_wait_seconds").unwrap().series;
        assert_eq!(series.len(), MAX_SERIES);
    }
}

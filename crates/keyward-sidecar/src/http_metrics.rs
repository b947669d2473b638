//! The proxy's own metrics, after the OpenTelemetry HTTP semantic conventions:
//!
//! | instrument | kind | attributes |
//! |---|---|---|
//! | `http.server.request.duration` | histogram, s | `http.request.method`, `http.response.status_code`, `http.route` (the route name, `-` for no route) |
//! | `http.client.request.duration` | histogram, s | the same, for the call to the upstream (status `0`: no response) |
//! | `keyward.upstream.failures` | counter | `http.route`, `error.type`: `connect_refused`, `connect`, `timeout`, `reset`, `other` |
//! | `keyward.memory.entries`, `keyward.memory.bytes` | gauges | `table` (memory store only, from `MemoryStore::table_sizes`) |
//!
//! Rendered by [`crate::prometheus`] with the OpenTelemetry-to-Prometheus name rules
//! (`http_server_request_duration_seconds`, `keyward_upstream_failures_total`, ...).
//!
//! The hot path pays for what it records and nothing more: every route's attribute is
//! built once ([`RouteHttp`], an `Arc`'d string), and each worker thread keeps the
//! histograms bound to the (method, status) pairs it has seen on a route
//! ([`BoundHistogram`]: the SDK's attribute look-up, hashing three attributes per point,
//! is done once per pair instead of per request).
//! With OTLP export on, both histograms also keep the exemplar of a sampled request per
//! bucket ([`crate::exemplars`], whose bound histograms keep them too);
//! `http.server.request.duration` is then recorded inside the request's span, so that
//! its exemplar names it.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use opentelemetry::metrics::{BoundHistogram, Counter, Histogram, Meter};
use opentelemetry::{KeyValue, StringValue, Value};
use thread_local::ThreadLocal;

use crate::proxy::ProxyError;

/// Bucket bounds of the request histograms, in seconds (the OpenTelemetry HTTP
/// semantic conventions' advice, plus 30 s for the default request timeout).
const BOUNDS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0,
];

struct Instruments {
    server: Histogram<f64>,
    client: Histogram<f64>,
    failures: Counter<u64>,
}

/// The instruments, bound to one route name. One `Arc`: a request clones it (with its
/// route's stack) and each clone is an atomic update of a count every core shares.
#[derive(Clone)]
pub struct RouteHttp(Arc<RouteInstruments>);

struct RouteInstruments {
    instruments: Arc<Instruments>,
    route: KeyValue,
    server: BoundPairs,
    client: BoundPairs,
}

/// Most (method, status) pairs a thread binds per route and histogram; points of further
/// pairs are recorded unbound (same series, the SDK's look-up per point).
const MAX_BOUND_PAIRS: usize = 32;

/// One histogram of one route, bound per (method, status), per thread.
#[derive(Default)]
struct BoundPairs {
    threads: ThreadLocal<RefCell<Vec<BoundPair>>>,
}

struct BoundPair {
    method: &'static str,
    status: i64,
    histogram: BoundHistogram<f64>,
}

impl BoundPairs {
    fn record(
        &self,
        histogram: &Histogram<f64>,
        route: &KeyValue,
        method: &'static str,
        status: i64,
        value: f64,
    ) {
        let mut pairs = self.threads.get_or_default().borrow_mut();
        if let Some(pair) = pairs
            .iter()
            .find(|pair| pair.status == status && pair.method == method)
        {
            pair.histogram.record(value);
            return;
        }
        let attributes = [
            route.clone(),
            KeyValue::new("http.request.method", method),
            KeyValue::new("http.response.status_code", status),
        ];
        if pairs.len() >= MAX_BOUND_PAIRS {
            histogram.record(value, &attributes);
            return;
        }
        let bound = histogram.bind(&attributes);
        bound.record(value);
        pairs.push(BoundPair {
            method,
            status,
            histogram: bound,
        });
    }
}

/// Makes the per-route recorders of one meter.
#[derive(Clone)]
pub struct HttpMetrics {
    instruments: Arc<Instruments>,
}

impl HttpMetrics {
    pub fn new(meter: &Meter) -> Self {
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(BOUNDS.to_vec())
                .build()
        };
        HttpMetrics {
            instruments: Arc::new(Instruments {
                server: histogram(
                    "http.server.request.duration",
                    "Duration of requests the sidecar served, from headers in to response headers out.",
                ),
                client: histogram(
                    "http.client.request.duration",
                    "Duration of the sidecar's calls to its upstream, until its response headers.",
                ),
                failures: meter
                    .u64_counter("keyward.upstream.failures")
                    .with_description("Upstream calls that got no response, by error.type.")
                    .build(),
            }),
        }
    }

    /// The recorder of `route` (`-`: requests no route matches).
    pub fn route(&self, route: &str) -> RouteHttp {
        let name: Arc<str> = Arc::from(route);
        RouteHttp(Arc::new(RouteInstruments {
            instruments: self.instruments.clone(),
            route: KeyValue::new("http.route", Value::String(StringValue::from(name))),
            server: BoundPairs::default(),
            client: BoundPairs::default(),
        }))
    }
}

impl RouteHttp {
    /// One request served.
    pub fn served(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        self.0.server.record(
            &self.0.instruments.server,
            &self.0.route,
            method_name(method),
            i64::from(status.as_u16()),
            elapsed.as_secs_f64(),
        );
    }

    /// One call to the upstream: its status, or why there was none.
    pub fn upstream_called(
        &self,
        method: &Method,
        outcome: Result<StatusCode, &ProxyError>,
        elapsed: Duration,
    ) {
        let status = match outcome {
            Ok(status) => i64::from(status.as_u16()),
            Err(error) => {
                self.0.instruments.failures.add(
                    1,
                    &[
                        self.0.route.clone(),
                        KeyValue::new("error.type", failure_kind(error)),
                    ],
                );
                0
            }
        };
        self.0.client.record(
            &self.0.instruments.client,
            &self.0.route,
            method_name(method),
            status,
            elapsed.as_secs_f64(),
        );
    }
}

/// The method as the conventions name it: the known ones as they are, others `_OTHER`
/// (a client cannot mint new label values).
fn method_name(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "_OTHER",
    }
}

/// Why an upstream call got no response: refused, another connect failure, the
/// request timeout, a connection reset (while sending or reading), or anything else.
pub fn failure_kind(error: &ProxyError) -> &'static str {
    let io_kind = || {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(error) = source {
            if let Some(io) = error.downcast_ref::<std::io::Error>() {
                return Some(io.kind());
            }
            source = error.source();
        }
        None
    };
    match error {
        ProxyError::Timeout(_) => "timeout",
        ProxyError::Unreachable(inner) if is_connect(inner.as_ref()) => match io_kind() {
            Some(std::io::ErrorKind::ConnectionRefused) => "connect_refused",
            _ => "connect",
        },
        ProxyError::Unreachable(_) | ProxyError::Body(_) => match io_kind() {
            Some(
                std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof,
            ) => "reset",
            // hyper reports a connection closed before the response without an io error.
            _ if error.to_string().contains("closed") => "reset",
            _ => "other",
        },
        ProxyError::BadRequest(_) => "other",
    }
}

/// Whether the upstream call failed before a connection was made.
fn is_connect(error: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    error.downcast_ref::<crate::pool::ConnectFailed>().is_some()
        || error
            .downcast_ref::<hyper_util::client::legacy::Error>()
            .is_some_and(|error| error.is_connect())
}

/// Registers the memory store's table sizes as gauges (`keyward.memory.entries`,
/// `keyward.memory.bytes`, by `table`), read at each collection.
pub fn observe_memory_tables(meter: &Meter, store: &keyward::MemoryStore) {
    let tables = |store: &keyward::MemoryStore| {
        let sizes = store.table_sizes();
        [
            ("idempotency_records", sizes.idempotency_records),
            ("idempotency_claims", sizes.idempotency_claims),
            ("quota_keys", sizes.quota_keys),
            ("serial_keys", sizes.serial_keys),
            ("single_flight_leads", sizes.single_flight_leads),
        ]
    };
    let entries = store.clone();
    meter
        .i64_observable_up_down_counter("keyward.memory.entries")
        .with_description("Entries held by each memory-store table.")
        .with_callback(move |observer| {
            for (table, size) in tables(&entries) {
                let n = i64::try_from(size.entries).unwrap_or(i64::MAX);
                observer.observe(n, &[KeyValue::new("table", table)]);
            }
        })
        .build();
    let bytes = store.clone();
    meter
        .i64_observable_up_down_counter("keyward.memory.bytes")
        .with_unit("By")
        .with_description("Accounted bytes held by each memory-store table.")
        .with_callback(move |observer| {
            for (table, size) in tables(&bytes) {
                let n = i64::try_from(size.bytes).unwrap_or(i64::MAX);
                observer.observe(n, &[KeyValue::new("table", table)]);
            }
        })
        .build();
}

/// The upstream with its calls timed: `http.client.request.duration` and
/// `keyward.upstream.failures` for one route.
#[derive(Clone)]
pub struct TimedUpstream {
    upstream: crate::proxy::Upstream,
    http: RouteHttp,
}

impl TimedUpstream {
    pub fn new(upstream: crate::proxy::Upstream, http: RouteHttp) -> Self {
        TimedUpstream { upstream, http }
    }
}

type UpstreamFuture =
    <crate::proxy::Upstream as tower::Service<http::Request<axum::body::Body>>>::Future;

impl tower::Service<http::Request<axum::body::Body>> for TimedUpstream {
    type Response = http::Response<axum::body::Body>;
    type Error = ProxyError;
    type Future = TimedFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.upstream.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<axum::body::Body>) -> Self::Future {
        let method = req.method().clone();
        TimedFuture {
            started: std::time::Instant::now(),
            inner: self.upstream.call(req),
            http: self.http.clone(),
            method,
        }
    }
}

/// [`TimedUpstream`]'s future: the upstream's own (boxed, so `Unpin`), timed.
pub struct TimedFuture {
    inner: UpstreamFuture,
    http: RouteHttp,
    method: Method,
    started: std::time::Instant,
}

impl std::future::Future for TimedFuture {
    type Output = Result<http::Response<axum::body::Body>, ProxyError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        let out = std::task::ready!(this.inner.as_mut().poll(cx));
        let outcome = out.as_ref().map(http::Response::status);
        this.http
            .upstream_called(&this.method, outcome, this.started.elapsed());
        std::task::Poll::Ready(out)
    }
}

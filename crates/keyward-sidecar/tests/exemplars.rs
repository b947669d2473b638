//! OpenMetrics exemplars end to end: a sampled request's trace id appears as the
//! exemplar of its bucket in its series (server and upstream latency, the serial wait)
//! when the scrape asks for OpenMetrics, the output parses with the reference
//! OpenMetrics parser (`prometheus_client`), an unsampled request (or a sidecar that
//! exports no traces) leaves none, and a real Prometheus with exemplar storage returns
//! the trace id from `/api/v1/query_exemplars`.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::Value;
use support::openmetrics::{ACCEPT_OPENMETRICS, parse_openmetrics};
use support::prometheus::Prometheus;
use support::{HttpClient, Reply, Sidecar, Upstream, client, send};

/// An OTLP/gRPC collector that keeps the spans (and acknowledges metrics).
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        _request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    async fn start() -> (Collector, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = Collector::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(async move { server.await.unwrap() });
        (collector, addr)
    }

    /// Waits (bounded: 15 s) for the span `span_id` of trace `trace_id`.
    async fn span(&self, trace_id: &str, span_id: &str) -> Span {
        for _ in 0..300 {
            let found = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .find(|s| hex(&s.trace_id) == trace_id && hex(&s.span_id) == span_id)
                .cloned();
            if let Some(span) = found {
                return span;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the collector got no span {span_id} in trace {trace_id}");
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const ROUTES: &str = r#"
[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]

[[routes]]
name = "accounts"
methods = ["POST"]
path = "/accounts/{id}"

[routes.serial]
key = "path:id"
max_wait = "10s"
"#;

/// A sidecar exporting traces to `otlp` (every 100 ms), or none. Its log level shows
/// spans (the default), so every request has its span, sampled or not.
async fn sidecar(upstream: SocketAddr, otlp: Option<SocketAddr>) -> Sidecar {
    let telemetry = otlp.map_or_else(String::new, |otlp| {
        format!("[telemetry]\notlp_endpoint = \"http://{otlp}\"\n")
    });
    Sidecar::start_configured(upstream, "", &format!("{telemetry}{ROUTES}"), |command| {
        command
            .env("KEYWARD_LOG", "info")
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("OTEL_METRIC_EXPORT_INTERVAL", "60000");
    })
    .await
}

/// A `traceparent` of trace `n` (a trace id of its own), sampled or not.
fn traceparent(n: u8, sampled: bool) -> (String, String) {
    let trace_id = format!("{n:02x}5ca1ab1e00c0ffee0ddba1155ca1ab");
    let flags = if sampled { "01" } else { "00" };
    (format!("00-{trace_id}-00f067aa0ba902b7-{flags}"), trace_id)
}

async fn scrape(http: &HttpClient, sidecar: &Sidecar, accept: Option<&str>) -> Reply {
    let url = format!("http://{}/metrics", sidecar.admin);
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let reply = send(http, "GET", &url, &headers, "").await;
    assert_eq!(reply.status, 200);
    reply
}

/// The samples of `name` whose labels include every one of `labels`.
fn samples<'a>(parsed: &'a [Value], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Value> {
    parsed
        .iter()
        .filter(|s| s["name"] == name)
        .filter(|s| labels.iter().all(|(k, v)| s["labels"][k] == *v))
        .collect()
}

/// The exemplars on the buckets of one histogram series, checked to lie in their own
/// bucket: `(le, trace_id, span_id, value)`.
fn exemplars(
    parsed: &[Value],
    histogram: &str,
    labels: &[(&str, &str)],
) -> Vec<(f64, String, String, f64)> {
    let buckets = samples(parsed, &format!("{histogram}_bucket"), labels);
    assert!(!buckets.is_empty(), "no {histogram} series {labels:?}");
    let mut lower = f64::NEG_INFINITY;
    let mut found = Vec::new();
    for bucket in buckets {
        let le: f64 = bucket["labels"]["le"].as_str().unwrap().parse().unwrap();
        if let Some(exemplar) = bucket["exemplar"].as_object() {
            let value = exemplar["value"].as_f64().unwrap();
            assert!(
                lower < value && value <= le,
                "exemplar {value} on the bucket le={le} (above {lower})"
            );
            assert!(exemplar["timestamp"].is_number(), "{exemplar:?}");
            found.push((
                le,
                exemplar["labels"]["trace_id"].as_str().unwrap().to_owned(),
                exemplar["labels"]["span_id"].as_str().unwrap().to_owned(),
                value,
            ));
        }
        lower = le;
    }
    found
}

async fn pay(http: &HttpClient, sidecar: &Sidecar, traceparent: &str, key: &str) {
    let headers = [("traceparent", traceparent), ("idempotency-key", key)];
    let reply = send(http, "POST", &sidecar.url("/payments/1"), &headers, "{}").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_request_leaves_no_exemplar() {
    let (_collector, otlp) = Collector::start().await;
    let upstream = Upstream::start().await;
    let http = client();

    // Traces exported, but the caller's trace is not sampled (parent-based sampling).
    let exporting = sidecar(upstream.addr, Some(otlp)).await;
    pay(&http, &exporting, &traceparent(1, false).0, "k-1").await;
    // No traces exported: a sampled caller has no trace id here.
    let silent = sidecar(upstream.addr, None).await;
    pay(&http, &silent, &traceparent(2, true).0, "k-2").await;

    for sidecar in [&exporting, &silent] {
        let reply = scrape(&http, sidecar, Some(ACCEPT_OPENMETRICS)).await;
        assert_eq!(
            reply.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        let parsed = parse_openmetrics(&reply.body);
        let count = samples(
            &parsed,
            "http_server_request_duration_seconds_count",
            &[("http_route", "payments")],
        );
        assert_eq!(count.len(), 1, "the request was counted");
        assert_eq!(count[0]["value"], 1.0);
        let with_exemplar: Vec<_> = parsed.iter().filter(|s| !s["exemplar"].is_null()).collect();
        assert!(with_exemplar.is_empty(), "{with_exemplar:#?}");
        assert!(!reply.body.contains(" # {"), "{}", reply.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_requests_trace_is_the_exemplar_of_its_bucket_in_its_series() {
    let (collector, otlp) = Collector::start().await;
    let upstream = Upstream::start().await;
    let sidecar = sidecar(upstream.addr, Some(otlp)).await;
    let http = client();

    // A payment that takes at least 120 ms at the upstream, in trace 3.
    let (parent, paid_trace) = traceparent(3, true);
    let paid = send(
        &http,
        "POST",
        &sidecar.url("/payments/1?delay_ms=120"),
        &[("traceparent", &parent), ("idempotency-key", "k-3")],
        "{}",
    )
    .await;
    assert_eq!(paid.status, 200, "{}", paid.body);

    // Two writes to one account: trace 4 holds the serial key (held at the upstream)
    // while trace 5 waits for its turn.
    let gate = upstream.gate("turn");
    let write = |n: u8| {
        let (http, url) = (http.clone(), sidecar.url("/accounts/7?hold=turn"));
        let (parent, trace_id) = traceparent(n, true);
        let task = tokio::spawn(async move {
            send(&http, "POST", &url, &[("traceparent", &parent)], "{}").await
        });
        (task, trace_id)
    };
    let (first, _) = write(4);
    gate.arrived(1).await;
    let (second, waiter_trace) = write(5);
    // Bounded: until the second is queued behind the first.
    let queued = "keyward_waiting{layer=\"serial\",route=\"accounts\"} 1";
    let mut seen_queued = false;
    for _ in 0..500 {
        if scrape(&http, &sidecar, None)
            .await
            .body
            .lines()
            .any(|l| l == queued)
        {
            seen_queued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen_queued, "the second write never queued");
    gate.release();
    for task in [first, second] {
        assert_eq!(task.await.unwrap().status, 200);
    }

    let reply = scrape(&http, &sidecar, Some(ACCEPT_OPENMETRICS)).await;
    let parsed = parse_openmetrics(&reply.body);
    let unit = |family: &str| {
        parsed
            .iter()
            .find(|s| s["family"] == family)
            .map(|s| s["unit"].clone())
    };
    assert_eq!(
        unit("http_server_request_duration_seconds"),
        Some(Value::from("seconds"))
    );

    // The payment's latency, at the sidecar and at the upstream: one exemplar each,
    // trace 3's, on the bucket its value falls in.
    let series = [
        ("http_request_method", "POST"),
        ("http_response_status_code", "200"),
        ("http_route", "payments"),
    ];
    for histogram in [
        "http_server_request_duration_seconds",
        "http_client_request_duration_seconds",
    ] {
        let found = exemplars(&parsed, histogram, &series);
        assert_eq!(found.len(), 1, "{histogram}: {found:?}");
        let (le, trace_id, span_id, value) = &found[0];
        assert_eq!(trace_id, &paid_trace, "{histogram}");
        assert!(
            *value >= 0.12 && *le >= 0.25,
            "{histogram}: {value} on le={le}"
        );
        let span = collector.span(trace_id, span_id).await;
        assert!(span.name.starts_with("keyward."), "{span:?}");
    }

    // The wait for the account's turn: trace 5's, on its bucket, naming its serial span.
    let found = exemplars(
        &parsed,
        "keyward_wait_seconds",
        &[("layer", "serial"), ("route", "accounts")],
    );
    let waited = found
        .iter()
        .find(|(_, trace_id, _, _)| *trace_id == waiter_trace)
        .unwrap_or_else(|| panic!("no exemplar of the waiting write: {found:?}"));
    assert!(waited.3 > 0.0, "{waited:?}");
    let span = collector.span(&waited.1, &waited.2).await;
    assert_eq!(span.name, "keyward.serial", "{span:?}");

    // Prometheus text, as a scrape without Accept gets it: the same series, no exemplars.
    let plain = scrape(&http, &sidecar, None).await;
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    assert!(!plain.body.contains(" # {") && !plain.body.contains("# EOF"));
    assert!(plain.body.contains(
        "http_server_request_duration_seconds_count{http_request_method=\"POST\",http_response_status_code=\"200\",http_route=\"payments\"} 1"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_with_exemplar_storage_returns_the_trace_id() {
    let (_collector, otlp) = Collector::start().await;
    let upstream = Upstream::start().await;
    let sidecar = sidecar(upstream.addr, Some(otlp)).await;
    let http = client();
    let prometheus =
        Prometheus::start(&http, sidecar.admin, &["--enable-feature=exemplar-storage"]).await;

    let (parent, trace_id) = traceparent(6, true);
    let paid = send(
        &http,
        "POST",
        &sidecar.url("/payments/1"),
        &[("traceparent", &parent), ("idempotency-key", "k-6")],
        "{}",
    )
    .await;
    assert_eq!(paid.status, 200, "{}", paid.body);

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let window = format!("&start={}&end={}", now - 600, now + 600);
    let query = "http_server_request_duration_seconds_bucket{http_route=\"payments\"}";
    // Bounded: Prometheus scrapes every second.
    let mut last = Value::Null;
    for _ in 0..100 {
        let data = prometheus
            .api(&http, "/api/v1/query_exemplars", query, &window)
            .await;
        let hit = data.as_array().into_iter().flatten().find_map(|series| {
            series["exemplars"]
                .as_array()?
                .iter()
                .find(|e| e["labels"]["trace_id"] == trace_id.as_str())
                .map(|e| (series["seriesLabels"].clone(), e.clone()))
        });
        if let Some((labels, exemplar)) = hit {
            assert_eq!(labels["http_route"], "payments", "{labels}");
            assert_eq!(labels["job"], "keyward", "{labels}");
            assert_eq!(
                exemplar["labels"]["span_id"].as_str().map(str::len),
                Some(16)
            );
            let value: f64 = exemplar["value"].as_str().unwrap().parse().unwrap();
            let le: f64 = labels["le"].as_str().unwrap().parse().unwrap();
            assert!(value > 0.0 && value <= le, "{exemplar} on {labels}");
            return;
        }
        last = data;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("query_exemplars never returned trace {trace_id}: {last}");
}

//! OTLP export end to end: the built `keyward` sends its spans and metrics to an
//! in-process OTLP/gRPC receiver; a collector that is down never affects requests.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs::File;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
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
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::Span;
use support::{Sidecar, Upstream, client, free_port, send, send_concurrently};

/// An idempotency key that must never leave the sidecar in telemetry or logs.
const RAW_KEY: &str = "raw-idem-key-e2e-5d1c0b";

/// Everything the receiver got.
#[derive(Clone, Default)]
struct Received {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Received {
    /// An OTLP/gRPC receiver on a free loopback port.
    async fn start() -> (Received, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Received::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .add_service(MetricsServiceServer::new(received.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(async move { server.await.unwrap() });
        (received, addr)
    }

    fn spans(&self) -> Vec<Span> {
        let traces = self.traces.lock().unwrap();
        traces
            .iter()
            .flat_map(|req| &req.resource_spans)
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| ss.spans.clone())
            .collect()
    }

    /// The largest value of counter `name` at a point with attribute `key = value`.
    fn counter(&self, name: &str, key: &str, value: &str) -> Option<i64> {
        let metrics = self.metrics.lock().unwrap();
        metrics
            .iter()
            .flat_map(|req| &req.resource_metrics)
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .filter(|m| m.name == name)
            .filter_map(|m| match &m.data {
                Some(metric::Data::Sum(sum)) => Some(sum.data_points.clone()),
                _ => None,
            })
            .flatten()
            .filter(|point| string_attr(&point.attributes, key).as_deref() == Some(value))
            .filter_map(|point| match point.value {
                Some(number_data_point::Value::AsInt(n)) => Some(n),
                _ => None,
            })
            .max()
    }

    /// The `service.name` of every resource that sent anything.
    fn service_names(&self) -> Vec<String> {
        let traces = self.traces.lock().unwrap();
        let metrics = self.metrics.lock().unwrap();
        let from_traces = traces
            .iter()
            .flat_map(|req| &req.resource_spans)
            .filter_map(|rs| rs.resource.as_ref());
        let from_metrics = metrics
            .iter()
            .flat_map(|req| &req.resource_metrics)
            .filter_map(|rm| rm.resource.as_ref());
        from_traces
            .chain(from_metrics)
            .filter_map(|r| string_attr(&r.attributes, "service.name"))
            .collect()
    }

    /// Everything received, as text, to look for leaks.
    fn dump(&self) -> String {
        format!(
            "{:?}\n{:?}",
            self.traces.lock().unwrap(),
            self.metrics.lock().unwrap()
        )
    }
}

fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(any_value::Value::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
}

/// Polls `done` every 50 ms for up to 15 s.
async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..300 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn routes(otlp: SocketAddr) -> String {
    format!(
        r#"
[telemetry]
service_name = "keyward-e2e"
otlp_endpoint = "http://{otlp}"

[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{{id}}"

[routes.idempotency]
required = true

[[routes]]
name = "catalog"
path = "/catalog/{{*rest}}"

[routes.single_flight]
key = "method_uri"
scope = "none"
"#
    )
}

/// Starts the sidecar exporting to `otlp` often, its log lines written to a file.
async fn sidecar(upstream: SocketAddr, otlp: SocketAddr, log: &std::path::Path) -> Sidecar {
    sidecar_exporting_every(upstream, otlp, log, "100", "200").await
}

/// Starts the sidecar with these span and metric export intervals (ms).
async fn sidecar_exporting_every(
    upstream: SocketAddr,
    otlp: SocketAddr,
    log: &std::path::Path,
    spans_ms: &'static str,
    metrics_ms: &'static str,
) -> Sidecar {
    let out = File::create(log).unwrap();
    Sidecar::start_configured(upstream, "", &routes(otlp), move |command| {
        command
            .env("KEYWARD_LOG", "info")
            .env("OTEL_BSP_SCHEDULE_DELAY", spans_ms)
            .env("OTEL_METRIC_EXPORT_INTERVAL", metrics_ms)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out.try_clone().unwrap()));
    })
    .await
}

fn log_path(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("keyward-otlp-{tag}-{}.log", std::process::id()))
}

#[tokio::test]
async fn a_replay_arrives_as_span_and_counter_and_the_raw_key_nowhere() {
    let (received, otlp) = Received::start().await;
    let upstream = Upstream::start().await;
    let log = log_path("replay");
    let sidecar = sidecar(upstream.addr, otlp, &log).await;
    let http = client();
    let url = sidecar.url("/payments/1");
    let key = [("idempotency-key", RAW_KEY)];

    let first = send(&http, "POST", &url, &key, "{}").await;
    let replay = send(&http, "POST", &url, &key, "{}").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(upstream.hits(), 1);

    let replayed_span = |spans: &[Span]| {
        spans.iter().any(|s| {
            s.name == "keyward.idempotency"
                && string_attr(&s.attributes, "keyward.outcome").as_deref() == Some("replayed")
                && string_attr(&s.attributes, "keyward.route").as_deref() == Some("payments")
                && string_attr(&s.attributes, "keyward.key_hash").is_some_and(|h| h.len() == 16)
        })
    };
    assert!(
        eventually(|| replayed_span(&received.spans())).await,
        "no replayed keyward.idempotency span in {:#?}",
        received.spans()
    );
    let spans = received.spans();
    let executed = spans
        .iter()
        .find(|s| {
            s.name == "keyward.idempotency"
                && string_attr(&s.attributes, "keyward.outcome").as_deref() == Some("executed")
        })
        .unwrap();
    // An integer (tracing-opentelemetry sends a u64 field as its decimal string).
    let token = executed
        .attributes
        .iter()
        .find(|kv| kv.key == "keyward.fencing_token")
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .and_then(|value| match value {
            any_value::Value::IntValue(token) => Some(*token),
            any_value::Value::StringValue(token) => token.parse().ok(),
            _ => None,
        });
    assert!(token.is_some_and(|t| t > 0), "{executed:#?}");
    assert!(
        eventually(|| {
            received.counter("keyward_decisions_total", "outcome", "replayed") >= Some(1)
        })
        .await,
        "keyward_decisions_total{{outcome=replayed}} did not arrive: {:?}",
        received.metrics.lock().unwrap()
    );
    assert!(
        received.service_names().iter().all(|n| n == "keyward-e2e"),
        "{:?}",
        received.service_names()
    );

    // Graceful exit flushes what is buffered; then nothing anywhere holds the raw key.
    assert!(sidecar.terminate().await.success());
    let logs = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(logs.contains("request"), "no access log lines: {logs}");
    assert!(!logs.contains(RAW_KEY), "raw key in the logs:\n{logs}");
    let dump = received.dump();
    assert!(!dump.contains(RAW_KEY), "raw key in telemetry:\n{dump}");
}

#[tokio::test]
async fn a_graceful_exit_sends_what_is_still_buffered() {
    let (received, otlp) = Received::start().await;
    let upstream = Upstream::start().await;
    let log = log_path("flush");
    // Intervals far beyond the test: only the exit flush can deliver.
    let sidecar = sidecar_exporting_every(upstream.addr, otlp, &log, "600000", "600000").await;
    let reply = send(
        &client(),
        "POST",
        &sidecar.url("/payments/3"),
        &[("idempotency-key", "k-flush")],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(received.spans().is_empty());

    assert!(sidecar.terminate().await.success());
    let _ = std::fs::remove_file(&log);
    assert!(
        received
            .spans()
            .iter()
            .any(|s| s.name == "keyward.idempotency"),
        "{:#?}",
        received.spans()
    );
    assert_eq!(
        received.counter("keyward_decisions_total", "outcome", "executed"),
        Some(1)
    );
}

#[tokio::test]
async fn the_callers_trace_continues_through_the_sidecar_to_the_upstream() {
    let (received, otlp) = Received::start().await;
    let upstream = Upstream::start().await;
    let log = log_path("traceparent");
    let sidecar = sidecar(upstream.addr, otlp, &log).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");

    let reply = send(
        &client(),
        "POST",
        &sidecar.url("/payments/7"),
        &[
            ("idempotency-key", "k-trace"),
            ("traceparent", &traceparent),
        ],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);

    let seen = upstream.seen.headers.lock().unwrap().clone();
    let forwarded = seen[0]
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap()
        .to_owned();
    let parts: Vec<&str> = forwarded.split('-').collect();
    assert_eq!(parts.len(), 4, "{forwarded}");
    assert_eq!(parts[1], trace_id, "the upstream is in the caller's trace");
    assert_ne!(
        parts[2], caller_span,
        "under the sidecar's span: {forwarded}"
    );

    // The sidecar's request span is the caller's child, and the upstream's parent is one
    // of the sidecar's spans.
    let in_trace = |spans: &[Span]| -> Vec<Span> {
        spans
            .iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    };
    assert!(
        eventually(|| in_trace(&received.spans()).len() >= 2).await,
        "{:#?}",
        received.spans()
    );
    let spans = in_trace(&received.spans());
    let request = spans.iter().find(|s| s.name == "keyward.request").unwrap();
    assert_eq!(hex(&request.parent_span_id), caller_span);
    assert!(spans.iter().any(|s| hex(&s.span_id) == parts[2]));
    drop(sidecar);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn single_flight_followers_link_to_the_leaders_span() {
    let (received, otlp) = Received::start().await;
    let upstream = Upstream::start().await;
    let log = log_path("flight");
    let sidecar = sidecar(upstream.addr, otlp, &log).await;

    let replies = send_concurrently(
        &client(),
        4,
        "GET",
        &sidecar.url("/catalog/a?delay_ms=300"),
        &[],
        "",
    )
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let followers = replies
        .iter()
        .filter(|r| r.header("keyward-coalesced") == Some("true"))
        .count();
    assert!(followers >= 1, "nothing coalesced: {replies:?}");

    let flight_spans = || -> Vec<Span> {
        received
            .spans()
            .into_iter()
            .filter(|s| s.name == "keyward.single_flight")
            .collect()
    };
    assert!(
        eventually(|| flight_spans().len() >= 4).await,
        "{:#?}",
        flight_spans()
    );
    let spans = flight_spans();
    let leader = spans
        .iter()
        .find(|s| string_attr(&s.attributes, "keyward.outcome").as_deref() == Some("leader"))
        .unwrap();
    let follower_spans: Vec<&Span> = spans
        .iter()
        .filter(|s| string_attr(&s.attributes, "keyward.outcome").as_deref() == Some("follower"))
        .collect();
    assert_eq!(follower_spans.len(), followers);
    for follower in follower_spans {
        assert_ne!(
            follower.trace_id, leader.trace_id,
            "each request its own trace"
        );
        assert!(
            follower
                .links
                .iter()
                .any(|l| l.trace_id == leader.trace_id && l.span_id == leader.span_id),
            "follower without a link to the leader: {follower:#?}"
        );
        assert_eq!(
            string_attr(&follower.attributes, "keyward.leader_trace_id"),
            Some(hex(&leader.trace_id))
        );
    }
    drop(sidecar);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn a_collector_that_is_down_never_affects_requests() {
    let upstream = Upstream::start().await;
    // Nothing listens there: every export fails.
    let down: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = log_path("down");
    let sidecar = sidecar(upstream.addr, down, &log).await;
    let http = client();

    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let key = format!("k-{i}");
        let started = Instant::now();
        let reply = send(
            &http,
            "POST",
            &sidecar.url("/payments/1"),
            &[("idempotency-key", &key)],
            "{}",
        )
        .await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(reply.status, StatusCode::OK);
        // Spread over several export rounds, each failing.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Export failures happen on the SDK's threads; a request never waits for one (an
    // export attempt alone may take up to its 5 s timeout).
    assert!(
        slowest < Duration::from_secs(1),
        "slowest request {slowest:?}"
    );
    let scrape = sidecar.admin_get(&http, "/metrics").await.body;
    assert!(
        scrape.contains(
            "keyward_decisions_total{layer=\"idempotency\",route=\"payments\",outcome=\"executed\"} 30"
        ),
        "{scrape}"
    );

    // The exit flush gives up on the collector within its bound.
    let started = Instant::now();
    assert!(sidecar.terminate().await.success());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let _ = std::fs::remove_file(&log);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

//! Each layer's OpenTelemetry metrics, read back from an SDK meter provider passed with
//! `.meter()`: no global state, so tests run in parallel.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keyward::core::gcra::Quota;
use keyward::{
    IdempotencyLayer, MemoryStore, OnInFlight, PerKeySerialLayer, QuotaLayer, SingleFlightLayer,
};
use keyward_core::KeySpec;
use keyward_core::telemetry::{METRIC_DECISIONS, METRIC_STORE_SECONDS, METRIC_WAIT_SECONDS};
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use tokio::sync::Notify;
use tower::{Layer, ServiceExt, service_fn};

/// A raw key that must never show up in any metric.
const RAW_KEY: &str = "raw-key-7f3a9c-never-in-telemetry";

/// A meter provider whose metrics the test reads back.
struct TestMeter {
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
}

/// One data point: its attributes as sorted `key=value`, and the counter's value or the
/// histogram's count.
type Point = (Vec<String>, u64);

impl TestMeter {
    fn new() -> Self {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        TestMeter { provider, exporter }
    }

    fn meter(&self) -> Meter {
        self.provider.meter("keyward")
    }

    /// Every point of metric `name` so far (cumulative).
    fn points(&self, name: &str) -> Vec<Point> {
        self.exporter.reset();
        self.provider.force_flush().unwrap();
        let exported = self.exporter.get_finished_metrics().unwrap();
        let mut points = Vec::new();
        let Some(last) = exported.last() else {
            return points;
        };
        for scope in last.scope_metrics() {
            for metric in scope.metrics().filter(|m| m.name() == name) {
                match metric.data() {
                    AggregatedMetrics::U64(MetricData::Sum(sum)) => {
                        for point in sum.data_points() {
                            points.push((labels(point.attributes()), point.value()));
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(histogram)) => {
                        for point in histogram.data_points() {
                            points.push((labels(point.attributes()), point.count()));
                        }
                    }
                    other => panic!("unexpected data for {name}: {other:?}"),
                }
            }
        }
        points.sort();
        points
    }

    /// Every attribute value of every metric, to look for leaks.
    fn all_attribute_values(&self) -> String {
        [METRIC_DECISIONS, METRIC_WAIT_SECONDS, METRIC_STORE_SECONDS]
            .iter()
            .flat_map(|name| self.points(name))
            .flat_map(|(labels, _)| labels)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn labels<'a>(attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> Vec<String> {
    let mut labels: Vec<String> = attributes
        .map(|kv| format!("{}={}", kv.key, kv.value))
        .collect();
    labels.sort();
    labels
}

fn point(labels: &[&str], value: u64) -> Point {
    let mut labels: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
    labels.sort();
    (labels, value)
}

type Body = Full<Bytes>;

async fn ok(_req: Request<Body>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
}

/// A handler that signals `entered` on each call and answers 200 "ok" once `release`
/// is notified: a request held in flight without sleeps.
fn held_handler(
    entered: Arc<Notify>,
    release: Arc<Notify>,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(move |_req: Request<Body>| {
        let (entered, release) = (entered.clone(), release.clone());
        async move {
            entered.notify_one();
            release.notified().await;
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }
    })
}

fn post(key: &str) -> Request<Body> {
    Request::post("/payments")
        .header("idempotency-key", key)
        .header("x-api-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test]
async fn idempotency_counts_decisions_and_store_calls() {
    let meter = TestMeter::new();
    let service = IdempotencyLayer::new(MemoryStore::new())
        .meter(&meter.meter())
        .route("payments")
        .layer(service_fn(ok));

    for _ in 0..2 {
        let res = service.clone().oneshot(post(RAW_KEY)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    assert_eq!(
        meter.points(METRIC_DECISIONS),
        [
            point(
                &["layer=idempotency", "route=payments", "outcome=executed"],
                1
            ),
            point(
                &["layer=idempotency", "route=payments", "outcome=replayed"],
                1
            ),
        ]
    );
    assert_eq!(
        meter.points(METRIC_STORE_SECONDS),
        [point(&["op=claim"], 2), point(&["op=complete"], 1)]
    );
    assert!(!meter.all_attribute_values().contains(RAW_KEY));
}

#[tokio::test(flavor = "current_thread")]
async fn idempotency_records_the_wait_of_a_duplicate_in_flight() {
    let meter = TestMeter::new();
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = held_handler(entered.clone(), release.clone());
    let service = IdempotencyLayer::new(MemoryStore::new())
        .route("payments")
        .on_in_flight(OnInFlight::Wait(Duration::from_secs(5)))
        .meter(&meter.meter())
        .layer(handler);

    let first = tokio::spawn(service.clone().oneshot(post(RAW_KEY)));
    entered.notified().await;
    let duplicate = tokio::spawn(service.clone().oneshot(post(RAW_KEY)));
    // On this one-thread runtime the duplicate finds the key in flight on its first poll.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    release.notify_one();
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    let duplicate = duplicate.await.unwrap().unwrap();
    assert_eq!(duplicate.headers()["idempotent-replayed"], "true");

    assert_eq!(
        meter.points(METRIC_WAIT_SECONDS),
        [point(&["layer=idempotency", "route=payments"], 1)]
    );
    assert_eq!(
        meter.points(METRIC_DECISIONS),
        [
            point(
                &["layer=idempotency", "route=payments", "outcome=executed"],
                1
            ),
            point(
                &["layer=idempotency", "route=payments", "outcome=replayed"],
                1
            ),
        ]
    );
}

#[tokio::test]
async fn quota_counts_allowed_and_limited_and_store_checks() {
    let meter = TestMeter::new();
    let quota = Quota::new(1, Duration::from_secs(60)).unwrap();
    let service = QuotaLayer::new(MemoryStore::new(), quota)
        .key("header:x-api-key".parse::<KeySpec>().unwrap())
        .route("api")
        .meter(&meter.meter())
        .layer(service_fn(ok));

    let first = service.clone().oneshot(post(RAW_KEY)).await.unwrap();
    let second = service.clone().oneshot(post(RAW_KEY)).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);

    assert_eq!(
        meter.points(METRIC_DECISIONS),
        [
            point(&["layer=quota", "route=api", "outcome=allowed"], 1),
            point(&["layer=quota", "route=api", "outcome=limited"], 1),
        ]
    );
    assert_eq!(
        meter.points(METRIC_STORE_SECONDS),
        [point(&["op=check"], 2)]
    );
    assert!(!meter.all_attribute_values().contains(RAW_KEY));
}

#[tokio::test]
async fn serial_counts_acquired_and_records_the_wait() {
    let meter = TestMeter::new();
    let service = PerKeySerialLayer::new(MemoryStore::new())
        .key("header:x-api-key".parse::<KeySpec>().unwrap())
        .route("accounts")
        .meter(&meter.meter())
        .layer(service_fn(ok));

    let res = service.oneshot(post(RAW_KEY)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    drop(res);

    assert_eq!(
        meter.points(METRIC_DECISIONS),
        [point(
            &["layer=serial", "route=accounts", "outcome=acquired"],
            1
        )]
    );
    assert_eq!(
        meter.points(METRIC_WAIT_SECONDS),
        [point(&["layer=serial", "route=accounts"], 1)]
    );
    assert!(!meter.all_attribute_values().contains(RAW_KEY));
}

#[tokio::test(flavor = "current_thread")]
async fn single_flight_counts_leader_and_follower_and_the_followers_wait() {
    let meter = TestMeter::new();
    let (entered, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let handler = held_handler(entered.clone(), release.clone());
    let service = SingleFlightLayer::new(MemoryStore::new())
        .route("catalog")
        .meter(&meter.meter())
        .layer(handler);
    let get = || {
        Request::get(format!("/items?k={RAW_KEY}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    let leader = tokio::spawn(service.clone().oneshot(get()));
    entered.notified().await;
    let follower = tokio::spawn(service.clone().oneshot(get()));
    // On this one-thread runtime the follower joins the flight on its first poll.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    release.notify_one();
    assert_eq!(leader.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(follower.await.unwrap().unwrap().status(), StatusCode::OK);

    assert_eq!(
        meter.points(METRIC_DECISIONS),
        [
            point(
                &["layer=single_flight", "route=catalog", "outcome=follower"],
                1
            ),
            point(
                &["layer=single_flight", "route=catalog", "outcome=leader"],
                1
            ),
        ]
    );
    assert_eq!(
        meter.points(METRIC_WAIT_SECONDS),
        [point(&["layer=single_flight", "route=catalog"], 1)]
    );
    assert_eq!(
        meter.points(METRIC_STORE_SECONDS),
        [point(&["op=lead"], 1), point(&["op=publish"], 1)]
    );
    assert!(!meter.all_attribute_values().contains(RAW_KEY));
}

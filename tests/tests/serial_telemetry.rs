//! PerKeySerialLayer telemetry: one `keyward.serial` span per decision with the contract's
//! fields, the inner call inside it, and never the raw key.
#![allow(clippy::unwrap_used)]

mod serial_support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::poll;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keyward::{MemoryStore, PerKeySerialLayer};
use keyward_core::telemetry::SPAN_SERIAL;
use keyward_core::{Key, KeySpec};
use serial_support::DownStore;
use tower::{Layer, ServiceExt, service_fn};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Subscriber, subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

const RAW_KEY: &str = "customer-4711-secret";

type Fields = HashMap<String, String>;

/// Records every `keyward.serial` span's fields, in creation order.
#[derive(Clone, Default)]
struct Capture {
    spans: Arc<Mutex<Vec<(Id, Fields)>>>,
}

impl Capture {
    fn spans(&self) -> Vec<Fields> {
        let spans = self.spans.lock().unwrap();
        spans.iter().map(|(_, fields)| fields.clone()).collect()
    }

    fn update(&self, id: &Id, record: impl FnOnce(&mut Fields)) {
        let mut spans = self.spans.lock().unwrap();
        if let Some((_, fields)) = spans.iter_mut().find(|(span, _)| span == id) {
            record(fields);
        }
    }
}

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        if attrs.metadata().name() == SPAN_SERIAL {
            let mut fields = Fields::new();
            attrs.record(&mut Visitor(&mut fields));
            self.spans.lock().unwrap().push((id.clone(), fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        self.update(id, |fields| values.record(&mut Visitor(fields)));
    }
}

fn req() -> Request<Full<Bytes>> {
    Request::get("/")
        .header("x-key", RAW_KEY)
        .body(Full::default())
        .unwrap()
}

fn layer<St>(store: St) -> PerKeySerialLayer<St> {
    PerKeySerialLayer::new(store)
        .route("ledger")
        .key(KeySpec::parse("header:x-key").unwrap())
        .max_wait(Duration::from_millis(1500))
        .max_queue(1)
}

/// Answers 200 and checks that it runs inside the decision's span.
async fn inside_span(_req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let current = tracing::Span::current();
    assert_eq!(current.metadata().map(|m| m.name()), Some(SPAN_SERIAL));
    Ok(Response::new(Full::default()))
}

fn assert_common(fields: &Fields, outcome: &str) {
    assert_eq!(fields["keyward.route"], "ledger");
    assert_eq!(
        fields["keyward.key_hash"],
        Key::from(RAW_KEY).hash().as_str()
    );
    assert_eq!(fields["keyward.outcome"], outcome);
    assert!(fields.contains_key("keyward.wait_seconds"));
    assert!(
        fields.values().all(|value| !value.contains(RAW_KEY)),
        "the raw key never reaches telemetry: {fields:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn acquired_timeout_and_queue_full_spans_carry_the_contract_fields() {
    let capture = Capture::default();
    let _default = subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let store = MemoryStore::new();
    let svc = layer(store).layer(service_fn(inside_span));

    let holder = svc.clone().oneshot(req()).await.unwrap();
    let mut waiting = Box::pin(svc.clone().oneshot(req()));
    assert!(poll!(&mut waiting).is_pending());
    let full = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(full.status(), StatusCode::SERVICE_UNAVAILABLE);
    let timed_out = waiting.await.unwrap();
    assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE);
    drop(holder);

    let spans = capture.spans();
    assert_eq!(spans.len(), 3, "one span per decision");
    let acquired = &spans[0];
    assert_common(acquired, "acquired");
    assert!(acquired["keyward.fencing_token"].parse::<u64>().unwrap() > 0);
    assert_eq!(acquired["keyward.wait_seconds"], "0.0");

    let (timeout, queue_full) = (&spans[1], &spans[2]);
    assert_common(timeout, "timeout");
    assert_eq!(timeout["keyward.wait_seconds"], "1.5");
    assert!(!timeout.contains_key("keyward.fencing_token"));
    assert_common(queue_full, "queue_full");
}

#[tokio::test]
async fn store_errors_are_a_span_outcome() {
    let capture = Capture::default();
    let _default = subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));
    let svc = layer(DownStore).layer(service_fn(inside_span));
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let spans = capture.spans();
    assert_eq!(spans.len(), 1);
    assert_common(&spans[0], "store_error");
}

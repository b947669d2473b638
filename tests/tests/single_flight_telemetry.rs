//! `keyward.single_flight` spans: fields, outcomes, and the shared work running inside
//! the leader's span.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use keyward::{MemoryStore, SingleFlightLayer};
use keyward_core::Key;
use tokio::sync::Notify;
use tower::{Layer, ServiceExt, service_fn};
use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

type Fields = HashMap<String, String>;

/// Records every span's name and fields, in creation order.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(String, Fields)>>>);

struct Visitor<'a>(&'a mut Fields);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
}

#[derive(Clone, Copy)]
struct Index(usize);

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::new();
        attrs.record(&mut Visitor(&mut fields));
        let mut spans = self.0.lock().unwrap();
        spans.push((attrs.metadata().name().to_owned(), fields));
        let index = Index(spans.len() - 1);
        ctx.span(id).unwrap().extensions_mut().insert(index);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(Index(index)) = ctx.span(id).unwrap().extensions().get::<Index>().copied() else {
            return;
        };
        let mut spans = self.0.lock().unwrap();
        values.record(&mut Visitor(&mut spans[index].1));
    }
}

#[tokio::test]
async fn spans_name_route_hash_outcome_and_wait_and_wrap_the_inner_call() {
    let capture = Capture::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(capture.clone()));

    let release = Arc::new(Notify::new());
    let span_in_handler = Arc::new(Mutex::new(None));
    let handler = service_fn({
        let (release, span_in_handler) = (release.clone(), span_in_handler.clone());
        move |_req: Request<()>| {
            let (release, span_in_handler) = (release.clone(), span_in_handler.clone());
            async move {
                let current = tracing::Span::current();
                *span_in_handler.lock().unwrap() = current.metadata().map(|m| m.name());
                release.notified().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
            }
        }
    });
    let svc = SingleFlightLayer::new(MemoryStore::new())
        .route("reports")
        .layer(handler);
    let uri = "/reports/secret-customer-42";
    let (leader, follower, ()) = tokio::join!(
        svc.clone().oneshot(Request::get(uri).body(()).unwrap()),
        svc.clone().oneshot(Request::get(uri).body(()).unwrap()),
        async { release.notify_one() },
    );
    assert!(leader.is_ok() && follower.is_ok());

    assert_eq!(
        *span_in_handler.lock().unwrap(),
        Some("keyward.single_flight")
    );
    let spans = capture.0.lock().unwrap().clone();
    let flights: Vec<&Fields> = spans
        .iter()
        .filter(|(name, _)| name == "keyward.single_flight")
        .map(|(_, fields)| fields)
        .collect();
    assert_eq!(flights.len(), 2);
    let expected_hash = Key::from(format!("GET {uri}")).hash().to_string();
    for fields in &flights {
        assert_eq!(fields["keyward.route"], "reports");
        assert_eq!(fields["keyward.key_hash"], expected_hash);
    }
    assert_eq!(flights[0]["keyward.outcome"], "leader");
    assert_eq!(flights[1]["keyward.outcome"], "follower");
    let waited: f64 = flights[1]["keyward.wait_seconds"].parse().unwrap();
    assert!(waited >= 0.0);
    // The raw key never reaches telemetry.
    for (_, fields) in &spans {
        assert!(
            fields
                .values()
                .all(|value| !value.contains("secret-customer"))
        );
    }
}

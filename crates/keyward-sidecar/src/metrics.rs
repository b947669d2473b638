//! The admin `/metrics` and what the sidecar reads from the layers' decisions.
//!
//! The counters and histograms (`keyward_decisions_total{layer,route,outcome}`,
//! `keyward_wait_seconds{layer,route}`, `keyward_store_seconds{op}`) are recorded by the
//! layers through the OpenTelemetry API into the sidecar's meter provider; `/metrics`
//! collects its [`PullReader`] on each scrape, and the OTLP exporter (if configured)
//! reads the same instruments: one source of truth.
//!
//! What only the request knows, its outcomes for the access log and its key hashes for
//! the hot-key sketches ([`crate::hotkeys`]), the layers report to the request's
//! [`RequestDecisions`] (a [`keyward::DecisionSink`] in its extensions) as they decide.
//! No span is needed for either: decision spans exist only when a subscriber records
//! them (a sampled trace, a log level that shows spans).
//!
//! A scrape that asks for OpenMetrics also gets the histograms' exemplars: the trace of
//! a sampled request per bucket ([`crate::exemplars`]).
//!
//! Hot keys count one hit per request, route and key hash: a request passing through
//! several layers of its route (quota, idempotency, ...) that see the same key counts
//! once, not once per layer; layers keyed on different things (an API key for quota,
//! an idempotency key) each count their own key.

use std::sync::Mutex;

use keyward::core::KeyHash;
use keyward::{DecisionSink, ReportedDecision};

use crate::exemplars::Exemplars;
use crate::hotkeys::{HotKeys, RouteSketch};
use crate::prometheus::{Format, PullReader};

/// Name of the per-request span the sidecar opens (when a subscriber records it).
pub const REQUEST_SPAN: &str = "keyward.request";

/// The sidecar's metrics: the meter provider's pull reader, the histograms' exemplars
/// and the hot-key sketches.
#[derive(Clone, Default)]
pub struct Metrics {
    reader: PullReader,
    exemplars: Exemplars,
    hot_keys: HotKeys,
}

impl Metrics {
    /// The reader to install in the meter provider.
    pub fn reader(&self) -> &PullReader {
        &self.reader
    }

    /// The hot-key sketches fed by the requests' decisions.
    pub fn hot_keys(&self) -> &HotKeys {
        &self.hot_keys
    }

    /// The exemplars the histograms keep (with OTLP export on, see
    /// [`crate::telemetry::Telemetry::meter`]).
    pub fn exemplars(&self) -> &Exemplars {
        &self.exemplars
    }

    /// Every metric in `format`: Prometheus text exposition format 0.0.4, or
    /// OpenMetrics 1.0.0 with exemplars.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Prometheus => self.reader.render(),
            Format::OpenMetrics => self.reader.render_openmetrics(&self.exemplars),
        }
    }
}

/// One request's decisions, as its layers report them: the outcomes for its access-log
/// line, and one hot-key hit per key hash.
pub struct RequestDecisions {
    hot_keys: Option<RouteSketch>,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    outcomes: Vec<(&'static str, &'static str)>,
    key_hashes: Vec<KeyHash>,
}

impl RequestDecisions {
    /// The decisions of one request, counting hot keys into its route's sketch.
    pub fn new(hot_keys: Option<RouteSketch>) -> Self {
        RequestDecisions {
            hot_keys,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// The outcomes so far, as `layer=outcome ...`.
    pub fn outcomes(&self) -> String {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = String::new();
        for (layer, outcome) in &seen.outcomes {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(layer);
            line.push('=');
            line.push_str(outcome);
        }
        line
    }
}

impl DecisionSink for RequestDecisions {
    fn decided(&self, decision: ReportedDecision<'_>) {
        let first = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.outcomes.push((decision.layer, decision.outcome));
            match decision.key_hash {
                // Every layer a request passes belongs to its route: the hash alone
                // says whether this (route, key) was counted for it.
                Some(hash) if !seen.key_hashes.contains(&hash) => {
                    seen.key_hashes.push(hash);
                    Some(hash)
                }
                _ => None,
            }
        };
        // The request's route: every layer it passes belongs to it.
        if let (Some(hash), Some(sketch)) = (first, &self.hot_keys) {
            sketch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(hash.as_str());
        }
    }
}

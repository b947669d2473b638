//! Decisions reported per request, without spans: the cheap way for a caller to log or
//! count what the layers decided for each request (the sidecar's access log and hot
//! keys), whether or not any `tracing` subscriber records the decision spans.

use std::fmt;
use std::sync::Arc;

use keyward_core::KeyHash;

/// One decision of one layer for one request, as [`DecisionSink::decided`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct ReportedDecision<'a> {
    /// The layer: `"idempotency"`, `"quota"`, `"serial"` or `"single_flight"` (the
    /// `layer` metric label).
    pub layer: &'static str,
    /// The layer's route name.
    pub route: &'a str,
    /// The outcome (the `outcome` metric label, e.g. `"allowed"`, `"replayed"`).
    pub outcome: &'static str,
    /// The telemetry hash of the request's key (as in `keyward.key_hash`), or `None` for
    /// a decision about a request without a usable key.
    pub key_hash: Option<KeyHash>,
}

/// Receives the decisions of the requests that carry its [`DecisionReporter`].
pub trait DecisionSink: Send + Sync + 'static {
    /// Called once per decision, when it is made, on the task that made it.
    fn decided(&self, decision: ReportedDecision<'_>);
}

/// A request extension: every keyward layer the request passes reports its decision to
/// the reporter's sink, in the order they are made.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use keyward::{DecisionReporter, DecisionSink, MemoryStore, QuotaLayer, ReportedDecision};
/// use keyward::core::gcra::Quota;
/// use tower::{Layer, Service, ServiceExt};
///
/// #[derive(Default)]
/// struct Outcomes(Mutex<Vec<String>>);
///
/// impl DecisionSink for Outcomes {
///     fn decided(&self, decision: ReportedDecision<'_>) {
///         let line = format!("{}={}", decision.layer, decision.outcome);
///         self.0.lock().unwrap().push(line);
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let inner = tower::service_fn(|_req: http::Request<String>| async {
///     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("ok")))
/// });
/// let mut service = QuotaLayer::new(MemoryStore::new(), Quota::per_second(1)?)
///     .route("api")
///     .key(keyward::KeySpec::parse("header:x-api-key")?)
///     .layer(inner);
///
/// let outcomes = Arc::new(Outcomes::default());
/// for _ in 0..2 {
///     let mut req = http::Request::new(String::new());
///     req.headers_mut().insert("x-api-key", "alice".parse()?);
///     req.extensions_mut().insert(DecisionReporter::new(outcomes.clone()));
///     service.ready().await?.call(req).await?;
/// }
/// assert_eq!(*outcomes.0.lock().unwrap(), ["quota=allowed", "quota=limited"]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DecisionReporter(Arc<dyn DecisionSink>);

impl DecisionReporter {
    /// A reporter to `sink`.
    pub fn new(sink: Arc<dyn DecisionSink>) -> Self {
        DecisionReporter(sink)
    }

    pub(crate) fn report(&self, decision: ReportedDecision<'_>) {
        self.0.decided(decision);
    }
}

impl fmt::Debug for DecisionReporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionReporter").finish_non_exhaustive()
    }
}

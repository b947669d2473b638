use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use keyward_core::KeySpec;
use keyward_core::store::OnStoreError;
use keyward_core::telemetry::LAYER_SINGLE_FLIGHT;
use opentelemetry::metrics::Meter;
use tower_layer::Layer;

use super::flight::FlightTable;
use super::service::SingleFlight;
use crate::telemetry::LayerMetrics;

/// What followers do when the leader of their flight fails: its inner call returned an
/// error, panicked or its body failed, or (across instances) the remote leader failed or
/// did not land within its lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeaderFailure {
    /// One of the followers becomes the leader of a new flight with its own request; the
    /// others follow it. A follower whose leaders keep failing gives up with 502 after a
    /// few elections.
    #[default]
    Elect,
    /// Followers answer 502 problem `coalesced-leader-failed` at once.
    BadGateway,
}

/// Coalesces concurrent identical requests into one inner call: see the
/// [module docs](crate::single_flight).
pub struct SingleFlightLayer<St, K = KeySpec> {
    pub(crate) config: Arc<Config<St, K>>,
}

pub(crate) struct Config<St, K> {
    pub(crate) store: St,
    pub(crate) route: Arc<str>,
    pub(crate) key: K,
    pub(crate) scope: Option<KeySpec>,
    pub(crate) methods: Vec<Method>,
    pub(crate) max_body: usize,
    pub(crate) lease: Duration,
    pub(crate) on_leader_failure: LeaderFailure,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) metrics: LayerMetrics,
}

impl<St: Clone, K: Clone> Clone for Config<St, K> {
    fn clone(&self) -> Self {
        Config {
            store: self.store.clone(),
            route: self.route.clone(),
            key: self.key.clone(),
            scope: self.scope.clone(),
            methods: self.methods.clone(),
            max_body: self.max_body,
            lease: self.lease,
            on_leader_failure: self.on_leader_failure,
            on_store_error: self.on_store_error,
            metrics: self.metrics.clone(),
        }
    }
}

/// Default `max_body`: 8 MiB.
pub const DEFAULT_MAX_BODY: usize = 8 * 1024 * 1024;
/// Default lease of a flight in the store: 30 s.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

impl<St> SingleFlightLayer<St> {
    /// Coalesces GET and HEAD requests by `method_uri`, scoped by the `Authorization`
    /// header, on route `"default"`.
    pub fn new(store: St) -> Self {
        let route: Arc<str> = Arc::from("default");
        SingleFlightLayer {
            config: Arc::new(Config {
                store,
                metrics: LayerMetrics::new(LAYER_SINGLE_FLIGHT, &route, None),
                route,
                key: KeySpec::MethodUri,
                scope: Some(KeySpec::Header(http::header::AUTHORIZATION)),
                methods: vec![Method::GET, Method::HEAD],
                max_body: DEFAULT_MAX_BODY,
                lease: DEFAULT_LEASE,
                on_leader_failure: LeaderFailure::default(),
                on_store_error: OnStoreError::default(),
            }),
        }
    }
}

impl<St: Clone, K: Clone> SingleFlightLayer<St, K> {
    fn map<K2>(self, f: impl FnOnce(Config<St, K>) -> Config<St, K2>) -> SingleFlightLayer<St, K2> {
        let config = Arc::try_unwrap(self.config).unwrap_or_else(|shared| (*shared).clone());
        SingleFlightLayer {
            config: Arc::new(f(config)),
        }
    }

    /// The route name used in keys and telemetry (default `"default"`).
    pub fn route(self, route: impl Into<Arc<str>>) -> Self {
        let route = route.into();
        self.map(|config| Config {
            metrics: config.metrics.for_route(&route),
            route,
            ..config
        })
    }

    /// Records metrics with `meter` instead of `opentelemetry::global::meter("keyward")`
    /// (which must be installed before the layer is built to take effect).
    pub fn meter(self, meter: &Meter) -> Self {
        self.map(|config| Config {
            metrics: LayerMetrics::new(LAYER_SINGLE_FLIGHT, &config.route, Some(meter)),
            ..config
        })
    }

    /// How the coalescing key is taken from a request (default `method_uri`). Requests
    /// without a key pass through uncoalesced.
    pub fn key<K2>(self, key: K2) -> SingleFlightLayer<St, K2> {
        self.map(|config| Config {
            key,
            store: config.store,
            route: config.route,
            scope: config.scope,
            methods: config.methods,
            max_body: config.max_body,
            lease: config.lease,
            on_leader_failure: config.on_leader_failure,
            on_store_error: config.on_store_error,
            metrics: config.metrics,
        })
    }

    /// Whose requests may share a response (default `header:Authorization`): requests of
    /// two principals never coalesce. Requests without the principal share one anonymous
    /// scope.
    pub fn scope(self, scope: KeySpec) -> Self {
        self.map(|config| Config {
            scope: Some(scope),
            ..config
        })
    }

    /// Lets all callers of the route share responses (`scope = "none"`). Only for
    /// responses that do not depend on who asks.
    pub fn unscoped(self) -> Self {
        self.map(|config| Config {
            scope: None,
            ..config
        })
    }

    /// The methods that coalesce (default GET and HEAD); other requests pass through.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.map(|config| Config { methods, ..config })
    }

    /// The largest response body copied to followers (default 8 MiB). A larger response
    /// streams through to the request that drove the flight, and each follower makes its
    /// own inner call.
    pub fn max_body(self, bytes: usize) -> Self {
        self.map(|config| Config {
            max_body: bytes,
            ..config
        })
    }

    /// How long a flight is led in the store before another instance may take over
    /// (default 30 s), and the longest a follower on another instance waits for it.
    pub fn lease(self, lease: Duration) -> Self {
        self.map(|config| Config { lease, ..config })
    }

    /// What followers do when their leader fails (default [`LeaderFailure::Elect`]).
    pub fn on_leader_failure(self, policy: LeaderFailure) -> Self {
        self.map(|config| Config {
            on_leader_failure: policy,
            ..config
        })
    }

    /// What happens when the store fails (default [`OnStoreError::Closed`]: 503). With
    /// [`OnStoreError::Open`] requests still coalesce inside the process.
    pub fn on_store_error(self, policy: OnStoreError) -> Self {
        self.map(|config| Config {
            on_store_error: policy,
            ..config
        })
    }
}

impl<St, K> Clone for SingleFlightLayer<St, K> {
    fn clone(&self) -> Self {
        SingleFlightLayer {
            config: self.config.clone(),
        }
    }
}

impl<St, K> fmt::Debug for SingleFlightLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.config;
        f.debug_struct("SingleFlightLayer")
            .field("route", &config.route)
            .field("scope", &config.scope)
            .field("methods", &config.methods)
            .field("max_body", &config.max_body)
            .field("lease", &config.lease)
            .field("on_leader_failure", &config.on_leader_failure)
            .field("on_store_error", &config.on_store_error)
            .finish_non_exhaustive()
    }
}

impl<S, St, K> Layer<S> for SingleFlightLayer<St, K> {
    type Service = SingleFlight<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        SingleFlight {
            inner,
            config: self.config.clone(),
            table: Arc::new(FlightTable::new()),
        }
    }
}

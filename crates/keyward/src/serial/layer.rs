use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keyward_core::KeySpec;
use keyward_core::store::{OnStoreError, SerialLimits};
use keyward_core::telemetry::LAYER_SERIAL;
use opentelemetry::metrics::Meter;
use tower_layer::Layer;

use super::PerKeySerial;
use crate::telemetry::LayerMetrics;

/// Runs at most one request per key at a time, in arrival order. See the [module
/// docs](crate::serial) for the behaviour and an example.
pub struct PerKeySerialLayer<St, K = KeySpec> {
    store: St,
    key: Arc<K>,
    config: Config,
}

/// Settings shared by the layer, its services and their futures.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) route: Arc<str>,
    pub(crate) limits: SerialLimits,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) metrics: LayerMetrics,
}

impl<St> PerKeySerialLayer<St> {
    /// A layer coordinating through `store`, with route `"default"`, key `method_uri`,
    /// `max_wait` 5 s and `max_queue` 64. Most routes want another key, e.g. a resource
    /// id: `.key("path:id".parse::<KeySpec>()?)`.
    pub fn new(store: St) -> Self {
        let route: Arc<str> = Arc::from("default");
        PerKeySerialLayer {
            store,
            key: Arc::new(KeySpec::MethodUri),
            config: Config {
                metrics: LayerMetrics::new(LAYER_SERIAL, &route, None),
                route,
                limits: SerialLimits {
                    max_wait: Duration::from_secs(5),
                    max_queue: 64,
                },
                on_store_error: OnStoreError::default(),
            },
        }
    }
}

impl<St, K> PerKeySerialLayer<St, K> {
    /// The route name: part of every stored key, and of telemetry.
    pub fn route(mut self, route: impl Into<Arc<str>>) -> Self {
        self.config.route = route.into();
        self.config.metrics = self.config.metrics.for_route(&self.config.route);
        self
    }

    /// Records metrics with `meter` instead of `opentelemetry::global::meter("keyward")`
    /// (which must be installed before the layer is built to take effect).
    pub fn meter(mut self, meter: &Meter) -> Self {
        self.config.metrics = LayerMetrics::new(LAYER_SERIAL, &self.config.route, Some(meter));
        self
    }

    /// How the key is taken from a request: a [`KeySpec`] or any
    /// [`KeyExtractor`](keyward_core::KeyExtractor). Requests without a key pass through
    /// uncoordinated.
    pub fn key<K2>(self, key: K2) -> PerKeySerialLayer<St, K2> {
        PerKeySerialLayer {
            store: self.store,
            key: Arc::new(key),
            config: self.config,
        }
    }

    /// Longest wait for the key's turn; past it the request gets 503
    /// `serial-wait-timeout`. Default 5 s.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.config.limits.max_wait = max_wait;
        self
    }

    /// Most requests waiting for one key (the one inside the service not counted); one
    /// more gets 503 `serial-queue-full` at once. Default 64; 0 means never wait.
    pub fn max_queue(mut self, max_queue: usize) -> Self {
        self.config.limits.max_queue = max_queue;
        self
    }

    /// What to do when the store fails: 503 (`Closed`, the default) or let the request
    /// through uncoordinated (`Open`).
    pub fn on_store_error(mut self, policy: OnStoreError) -> Self {
        self.config.on_store_error = policy;
        self
    }
}

impl<St: Clone, K> Clone for PerKeySerialLayer<St, K> {
    fn clone(&self) -> Self {
        PerKeySerialLayer {
            store: self.store.clone(),
            key: self.key.clone(),
            config: self.config.clone(),
        }
    }
}

impl<St, K> fmt::Debug for PerKeySerialLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerKeySerialLayer")
            .field("route", &self.config.route)
            .field("max_wait", &self.config.limits.max_wait)
            .field("max_queue", &self.config.limits.max_queue)
            .field("on_store_error", &self.config.on_store_error)
            .finish_non_exhaustive()
    }
}

impl<S, St: Clone, K> Layer<S> for PerKeySerialLayer<St, K> {
    type Service = PerKeySerial<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        PerKeySerial::new(
            inner,
            self.store.clone(),
            self.key.clone(),
            self.config.clone(),
        )
    }
}

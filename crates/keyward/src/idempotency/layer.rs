use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Request};
use keyward_core::store::{IdempotencyStore, OnStoreError, RecordState, StoreError};
use keyward_core::telemetry::LAYER_IDEMPOTENCY;
use keyward_core::{Key, KeyExtractor, KeySpec, Scope, ScopedKey, parse_idempotency_key};
use opentelemetry::metrics::Meter;
use tower_layer::Layer;

use super::service::IdempotencyService;
use crate::telemetry::LayerMetrics;

/// What a duplicate does while the first request with its key is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnInFlight {
    /// Answer 409 with `Retry-After` at once.
    Reject,
    /// Wait up to this long for the first request to finish, then replay its response
    /// (or run, if it was released); still in flight after that: 409.
    Wait(Duration),
}

/// Which response headers are stored for replay. `Set-Cookie`, `Authorization`, `Date`
/// and hop-by-hop headers are never stored, whatever this says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ReplayHeaders {
    /// Every header but the never-stored ones.
    #[default]
    AllSafe,
    /// Only these headers (and never the never-stored ones).
    Only(Vec<HeaderName>),
}

#[derive(Clone)]
pub(crate) struct Config<K> {
    pub(crate) key: K,
    pub(crate) key_name: String,
    pub(crate) settings: Settings,
}

/// Short layer name in stored keys: `idem:{route}:{scope}:{key}`.
const LAYER: &str = "idem";

impl<K> Config<K> {
    /// The key `req` is coordinated under, `None` without a key, or what is wrong with
    /// it (naming the spec, never the raw key).
    pub(crate) fn scoped_key<B>(&self, req: &Request<B>) -> Result<Option<ScopedKey>, String>
    where
        K: KeyExtractor<B>,
    {
        let Some(raw) = self.key.extract(req).map_err(|err| err.to_string())? else {
            return Ok(None);
        };
        let key = parse_idempotency_key(raw.as_str())
            .map_err(|err| format!("{} ({})", err, self.key_name))?;
        let settings = &self.settings;
        let scope =
            Scope::of_request(settings.scope.as_ref(), req).map_err(|err| err.to_string())?;
        Ok(Some(ScopedKey::new(
            LAYER,
            &settings.route,
            scope,
            Key::from(key),
        )))
    }
}

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) route: Arc<str>,
    pub(crate) scope: Option<KeySpec>,
    pub(crate) required: bool,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) on_in_flight: OnInFlight,
    pub(crate) max_body: usize,
    pub(crate) max_response: usize,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) replay_headers: ReplayHeaders,
    pub(crate) store_server_errors: bool,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) record_retry: Duration,
    pub(crate) metrics: LayerMetrics,
}

/// Applies [`IdempotencyService`]: a retried request with the same `Idempotency-Key`
/// takes effect once and gets the first response replayed. See the [module
/// docs](crate::idempotency) for the full behaviour.
pub struct IdempotencyLayer<St, K = KeySpec> {
    pub(crate) store: St,
    pub(crate) config: Arc<Config<K>>,
}

/// Default of [`IdempotencyLayer::record_retry`].
pub const DEFAULT_RECORD_RETRY: Duration = Duration::from_secs(5);

/// The `Idempotency-Key` header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set to `true` on replayed responses.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

impl<St> IdempotencyLayer<St> {
    /// A layer on `store` with the contract's defaults: key from `Idempotency-Key`,
    /// scoped by `Authorization`, not required, TTL 24 h, lease 30 s, duplicates in flight
    /// rejected with 409, request bodies up to 1 MiB, responses stored up to 1 MiB.
    pub fn new(store: St) -> Self {
        let route: Arc<str> = "default".into();
        IdempotencyLayer {
            store,
            config: Arc::new(Config {
                key: KeySpec::Header(IDEMPOTENCY_KEY),
                key_name: "header:idempotency-key".to_owned(),
                settings: Settings {
                    metrics: LayerMetrics::new(LAYER_IDEMPOTENCY, &route, None),
                    route,
                    scope: Some(KeySpec::Header(http::header::AUTHORIZATION)),
                    required: false,
                    ttl: Duration::from_secs(24 * 60 * 60),
                    lease: Duration::from_secs(30),
                    on_in_flight: OnInFlight::Reject,
                    max_body: 1024 * 1024,
                    max_response: 1024 * 1024,
                    fingerprint_headers: Vec::new(),
                    replay_headers: ReplayHeaders::AllSafe,
                    store_server_errors: false,
                    on_store_error: OnStoreError::Closed,
                    record_retry: DEFAULT_RECORD_RETRY,
                },
            }),
        }
    }
}

impl<St, K: Clone> IdempotencyLayer<St, K> {
    fn with(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        change(&mut Arc::make_mut(&mut self.config).settings);
        self
    }

    /// Takes the key from another [`KeySpec`] than `header:Idempotency-Key`. The value
    /// must still be a valid key (1..=255 visible ASCII characters, or an sf-string).
    pub fn key(self, spec: KeySpec) -> IdempotencyLayer<St, KeySpec> {
        let name = spec.to_string();
        self.key_extractor_named(spec, name)
    }

    /// Takes the key with any [`KeyExtractor`](keyward_core::KeyExtractor), such as a
    /// closure. The value must still be a valid key.
    pub fn key_extractor<K2>(self, extractor: K2) -> IdempotencyLayer<St, K2> {
        self.key_extractor_named(extractor, "custom key extractor".to_owned())
    }

    fn key_extractor_named<K2>(self, key: K2, key_name: String) -> IdempotencyLayer<St, K2> {
        let config = Config {
            key,
            key_name,
            settings: self.config.settings.clone(),
        };
        IdempotencyLayer {
            store: self.store,
            config: Arc::new(config),
        }
    }

    /// The route name used in stored keys and telemetry (default `"default"`). Give every
    /// route its own name so that keys of different routes never collide.
    pub fn route(self, name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        self.with(|c| {
            c.metrics = c.metrics.for_route(&name);
            c.route = name;
        })
    }

    /// Records metrics with `meter` instead of `opentelemetry::global::meter("keyward")`
    /// (which must be installed before the layer is built to take effect).
    pub fn meter(self, meter: &Meter) -> Self {
        self.with(|c| c.metrics = LayerMetrics::new(LAYER_IDEMPOTENCY, &c.route, Some(meter)))
    }

    /// Whose keys these are: responses are only replayed to requests with the same
    /// principal (default `header:Authorization`).
    pub fn scope(self, principal: KeySpec) -> Self {
        self.with(|c| c.scope = Some(principal))
    }

    /// Shares keys between all callers of the route (`scope = "none"`). Only for routes
    /// whose keys are unguessable and not secret-bearing.
    pub fn unscoped(self) -> Self {
        self.with(|c| c.scope = None)
    }

    /// Requests without a key get 400 (default: they pass through uncoordinated).
    pub fn required(self, required: bool) -> Self {
        self.with(|c| c.required = required)
    }

    /// How long a completed response is replayed (default 24 h).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|c| c.ttl = ttl)
    }

    /// How long a claim lasts without renewal (default 30 s). It is renewed every third of
    /// the lease while the handler runs, so it only runs out when the process dies or
    /// stalls.
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|c| c.lease = lease.max(Duration::from_millis(3)))
    }

    /// What a duplicate does while the first is in flight (default [`OnInFlight::Reject`]).
    pub fn on_in_flight(self, policy: OnInFlight) -> Self {
        self.with(|c| c.on_in_flight = policy)
    }

    /// Largest request body, in bytes (default 1 MiB); larger ones get 413 before
    /// anything is claimed.
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_body = bytes)
    }

    /// Largest response body stored for replay (default 1 MiB); a larger response is
    /// passed through and the key released.
    pub fn max_response(self, bytes: usize) -> Self {
        self.with(|c| c.max_response = bytes)
    }

    /// Request headers that are part of the fingerprint besides method, path, query and
    /// body (e.g. `Content-Type`).
    pub fn fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.with(|c| c.fingerprint_headers = headers)
    }

    /// Which response headers are stored for replay.
    pub fn replay_headers(self, policy: ReplayHeaders) -> Self {
        self.with(|c| c.replay_headers = policy)
    }

    /// Store 5xx, 408, 425 and 429 responses too, instead of releasing the key so the
    /// client may retry (default: release).
    pub fn store_server_errors(self, store: bool) -> Self {
        self.with(|c| c.store_server_errors = store)
    }

    /// How long a response whose record the store refuses (an outage, a failover) is
    /// retried before the key is released (default 5 s). Meanwhile the claim is renewed,
    /// so duplicates wait or get 409 instead of running again, and this response waits
    /// too; past it the key is released and a retry of the key runs again.
    pub fn record_retry(self, window: Duration) -> Self {
        self.with(|c| c.record_retry = window)
    }

    /// What to do when the store fails (default [`OnStoreError::Closed`]: 503).
    pub fn on_store_error(self, policy: OnStoreError) -> Self {
        self.with(|c| c.on_store_error = policy)
    }
}

impl<St: Clone, K> Clone for IdempotencyLayer<St, K> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

impl<St, K> fmt::Debug for IdempotencyLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("route", &self.config.settings.route)
            .field("key", &self.config.key_name)
            .field("required", &self.config.settings.required)
            .field("ttl", &self.config.settings.ttl)
            .field("lease", &self.config.settings.lease)
            .field("on_in_flight", &self.config.settings.on_in_flight)
            .finish_non_exhaustive()
    }
}

/// Why [`IdempotencyLayer::inspect`] could not answer.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The request's key (or principal) is unusable; the message names the spec, never
    /// the raw key.
    #[error("unusable key: {0}")]
    Key(String),
    /// The store did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<St: IdempotencyStore, K> IdempotencyLayer<St, K> {
    /// What the store holds for the key `req` carries, exactly as this layer would
    /// coordinate it (route, principal scope, parsed `Idempotency-Key`): "did it already
    /// happen?" for support tools. `None` when `req` carries no key. Changes nothing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use keyward::core::store::RecordState;
    /// use keyward::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).route("payments");
    /// let lookup = http::Request::get("/").header("idempotency-key", "k-1").body(()).unwrap();
    /// let (key, state) = layer.inspect(&lookup).await.unwrap().unwrap();
    /// assert_eq!(state, RecordState::Absent);
    /// assert_eq!(key.route(), "payments");
    /// # }
    /// ```
    pub async fn inspect<B>(
        &self,
        req: &Request<B>,
    ) -> Result<Option<(ScopedKey, RecordState)>, InspectError>
    where
        K: KeyExtractor<B>,
    {
        let Some(key) = self.config.scoped_key(req).map_err(InspectError::Key)? else {
            return Ok(None);
        };
        let state = self.store.inspect(&key).await?;
        Ok(Some((key, state)))
    }
}

impl<S, St: Clone, K> Layer<S> for IdempotencyLayer<St, K> {
    type Service = IdempotencyService<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

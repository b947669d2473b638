//! What every keyed layer is built from, and the per-request step they all start with.

use std::fmt;
use std::mem;
use std::sync::Arc;

use http::Request;
use http_body::Body;
use keyward_core::grpc::Protocol;
use keyward_core::store::OnStoreError;
use keyward_core::telemetry::FIELD_KEY_HASH;
use keyward_core::{Key, KeyError, KeyExtractor, KeyHash, KeySpec, Problem, Scope, ScopedKey};
use opentelemetry::metrics::Meter;
use tower_service::Service;
use tracing::Span;

use super::{LayerKind, ResponseFuture, Trace};
use crate::telemetry::{DecisionReporter, LayerMetrics};

/// A layer's own settings: what the shared pipeline needs to know of them.
pub(crate) trait LayerSettings: Clone {
    /// Which layer these settings are for.
    const KIND: LayerKind;

    /// Checks (or completes) a key the extractor found in `req`, before it is scoped
    /// (default: any key, as it is).
    fn accept_key<B>(&self, key: Key, _key_name: &str, _req: &Request<B>) -> Result<Key, KeyError> {
        Ok(key)
    }

    /// Whether telemetry names the key by the hash of the extractor's key rather than of
    /// the key [`LayerSettings::accept_key`] made of it (single flight adds the authority
    /// and `vary` headers, which operators neither configure nor want split by).
    const NAMES_KEY_AS_EXTRACTED: bool = false;

    /// Called after the route name changed, for settings rendered from it.
    fn route_changed(&mut self, _common: &mut Common) {}
}

/// What a layer whose keys belong to a principal does with a request that carries none
/// (no `Authorization` header, say).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScopeMissing {
    /// The request is coordinated in one scope shared by every anonymous caller, apart
    /// from every principal (the default).
    #[default]
    Anonymous,
    /// The request is refused with 400: on routes where callers must authenticate, one
    /// shared anonymous scope would let anonymous callers meet each other's keys.
    Reject,
}

/// The settings every layer has.
#[derive(Clone)]
pub(crate) struct Common {
    /// The route name, in stored keys and telemetry.
    pub(crate) route: Arc<str>,
    /// The route part of stored keys: the route, or `{route}/{namespace}` where one
    /// route holds two layers of a kind (quota policies per second and per day).
    pub(crate) storage_route: Arc<str>,
    namespace: Option<Arc<str>>,
    /// Whose keys these are; `None`: shared by every caller.
    pub(crate) scope: Option<KeySpec>,
    pub(crate) scope_missing: ScopeMissing,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) metrics: LayerMetrics,
}

impl Common {
    fn new(kind: LayerKind, scope: Option<KeySpec>) -> Self {
        let route: Arc<str> = Arc::from("default");
        Common {
            metrics: LayerMetrics::new(kind.metric_label(), &route, None),
            storage_route: route.clone(),
            route,
            namespace: None,
            scope,
            scope_missing: ScopeMissing::Anonymous,
            on_store_error: OnStoreError::Closed,
        }
    }

    pub(crate) fn set_route(&mut self, route: Arc<str>) {
        self.metrics = self.metrics.for_route(&route);
        self.route = route;
        self.render_storage_route();
    }

    pub(crate) fn set_namespace(&mut self, namespace: Arc<str>) {
        self.namespace = Some(namespace);
        self.render_storage_route();
    }

    fn render_storage_route(&mut self) {
        self.storage_route = match &self.namespace {
            Some(namespace) => format!("{}/{namespace}", self.route).into(),
            None => self.route.clone(),
        };
    }
}

/// A layer's configuration, shared by the layer, its services and their futures.
pub(crate) struct Config<K, X> {
    pub(crate) key: K,
    /// How the key is taken, for messages (`header:idempotency-key`).
    pub(crate) key_name: Arc<str>,
    pub(crate) common: Common,
    pub(crate) own: X,
}

impl<K: Clone, X: Clone> Clone for Config<K, X> {
    fn clone(&self) -> Self {
        Config {
            key: self.key.clone(),
            key_name: self.key_name.clone(),
            common: self.common.clone(),
            own: self.own.clone(),
        }
    }
}

/// A request's key, checked and with its scope, before it becomes a [`ScopedKey`].
pub(crate) struct Found {
    /// The key as the layer accepted it (what the store coordinates).
    pub(crate) key: Key,
    /// The extractor's key, where telemetry names the key by it.
    extracted: Option<Key>,
    scope: Scope,
}

impl<K, X: LayerSettings> Config<K, X> {
    /// The key `req` is coordinated under, `None` without a key, or why its key (or
    /// principal) cannot be used: the message names the spec, never the raw value.
    pub(crate) fn find_key<B>(&self, req: &Request<B>) -> Result<Option<Found>, KeyError>
    where
        K: KeyExtractor<B>,
    {
        let Some(key) = self.key.extract(req)? else {
            return Ok(None);
        };
        let extracted = X::NAMES_KEY_AS_EXTRACTED.then(|| key.clone());
        let key = self.own.accept_key(key, &self.key_name, req)?;
        let scope = Scope::of_request(self.common.scope.as_ref(), req)?;
        if scope == Scope::Anonymous && self.common.scope_missing == ScopeMissing::Reject {
            let spec = self
                .common
                .scope
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            return Err(KeyError::Invalid {
                spec,
                reason: "the request carries no principal, and this route refuses anonymous \
                         requests (scope_missing = reject)"
                    .to_owned(),
            });
        }
        Ok(Some(Found {
            key,
            extracted,
            scope,
        }))
    }

    /// The scoped key of `found`. Its telemetry hash is computed now only when `traced`
    /// and the layer names keys by the extractor's key (a SHA-256 per request is a large
    /// share of a layer's cost); otherwise on first use, from the key itself.
    pub(crate) fn scoped(&self, found: &Found, traced: bool) -> ScopedKey {
        let (prefix, route) = (X::KIND.storage_prefix(), &self.common.storage_route);
        match &found.extracted {
            Some(extracted) if traced => {
                ScopedKey::with_hash(prefix, route, found.scope, &found.key, extracted.hash())
            }
            _ => ScopedKey::new(prefix, route, found.scope, found.key.clone()),
        }
    }

    /// A decision span for this layer's route.
    pub(crate) fn span(&self) -> Span {
        X::KIND.span(&self.common.route)
    }

    /// Where a decision of this layer goes: `span`, and `reporter` if the request has one.
    pub(crate) fn trace(
        &self,
        span: Span,
        reporter: Option<&DecisionReporter>,
        key_hash: Option<KeyHash>,
    ) -> Trace {
        Trace::new(span, reporter, key_hash)
    }
}

/// The builder state every layer wraps: the store and the shared configuration.
/// Changing a setting copies the configuration only while services share it.
pub(crate) struct KeyedLayer<St, K, X> {
    pub(crate) store: St,
    pub(crate) config: Arc<Config<K, X>>,
}

impl<St, X: LayerSettings> KeyedLayer<St, KeySpec, X> {
    /// A layer of kind `X::KIND` on route `"default"`, failing closed, with the global
    /// meter.
    pub(crate) fn new(store: St, key: KeySpec, scope: Option<KeySpec>, own: X) -> Self {
        KeyedLayer {
            store,
            config: Arc::new(Config {
                key_name: key.to_string().into(),
                key,
                common: Common::new(X::KIND, scope),
                own,
            }),
        }
    }
}

impl<St, K: Clone, X: LayerSettings> KeyedLayer<St, K, X> {
    /// Changes the settings.
    pub(crate) fn with(mut self, change: impl FnOnce(&mut Common, &mut X)) -> Self {
        let config = Arc::make_mut(&mut self.config);
        change(&mut config.common, &mut config.own);
        self
    }

    /// Takes the key with `key`, named `key_name` in messages.
    pub(crate) fn with_key<K2>(self, key: K2, key_name: Arc<str>) -> KeyedLayer<St, K2, X> {
        KeyedLayer {
            store: self.store,
            config: Arc::new(Config {
                key,
                key_name,
                common: self.config.common.clone(),
                own: self.config.own.clone(),
            }),
        }
    }

    /// Replaces the layer's own settings with `change(own)` (which may change their type).
    pub(crate) fn map_own<X2: LayerSettings>(
        self,
        change: impl FnOnce(X) -> X2,
    ) -> KeyedLayer<St, K, X2> {
        let config = Arc::unwrap_or_clone(self.config);
        KeyedLayer {
            store: self.store,
            config: Arc::new(Config {
                key: config.key,
                key_name: config.key_name,
                common: config.common,
                own: change(config.own),
            }),
        }
    }

    pub(crate) fn route(self, route: Arc<str>) -> Self {
        self.with(|common, own| {
            common.set_route(route);
            own.route_changed(common);
        })
    }

    pub(crate) fn meter(self, meter: &Meter) -> Self {
        self.with(|common, _| {
            common.metrics = LayerMetrics::new(X::KIND.metric_label(), &common.route, Some(meter));
        })
    }
}

impl<St: Clone, K, X> KeyedLayer<St, K, X> {
    /// The service state around `inner`.
    pub(crate) fn service<S>(&self, inner: S) -> KeyedService<S, St, K, X> {
        KeyedService {
            inner,
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

impl<St: Clone, K, X> Clone for KeyedLayer<St, K, X> {
    fn clone(&self) -> Self {
        KeyedLayer {
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

/// The service state every layer's service wraps.
pub(crate) struct KeyedService<S, St, K, X> {
    pub(crate) inner: S,
    pub(crate) store: St,
    pub(crate) config: Arc<Config<K, X>>,
}

impl<S: Clone, St: Clone, K, X> Clone for KeyedService<S, St, K, X> {
    fn clone(&self) -> Self {
        KeyedService {
            inner: self.inner.clone(),
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

/// A request with its key, ready to be coordinated.
pub(crate) struct Keyed<S, B> {
    /// The inner service `poll_ready` was called on.
    pub(crate) inner: S,
    pub(crate) req: Request<B>,
    pub(crate) key: ScopedKey,
    /// The key as the extractor found it (and the layer accepted it), unscoped.
    pub(crate) raw: Key,
    /// The decision span (with the key's hash recorded when the span is enabled) and
    /// the request's reporter.
    pub(crate) trace: Trace,
    /// How rejections are rendered for this request.
    pub(crate) protocol: Protocol,
}

/// Where a request goes after [`KeyedService::prepare`].
pub(crate) enum Prepared<S, B> {
    /// Coordinate it.
    Keyed(Keyed<S, B>),
    /// It has no key: the layer passes it through, or rejects it where a key is required.
    NoKey { inner: S, req: Request<B> },
    /// Its key or principal cannot be used.
    Invalid {
        error: KeyError,
        protocol: Protocol,
        reporter: Option<DecisionReporter>,
    },
}

impl<S, B> Prepared<S, B> {
    /// The keyed request, or the default future for the others: a request without a key
    /// passes through uncoordinated, an unusable key is answered 400 `key-invalid`.
    // The error is the service's response future, which `call` returns by value anyway.
    #[allow(clippy::result_large_err)]
    pub(crate) fn keyed<C, RB>(self) -> Result<Keyed<S, B>, ResponseFuture<S::Future, C, RB>>
    where
        S: Service<Request<B>>,
        RB: Body,
    {
        match self {
            Prepared::Keyed(keyed) => Ok(keyed),
            Prepared::NoKey { mut inner, req } => {
                Err(ResponseFuture::pass_through(inner.call(req)))
            }
            Prepared::Invalid {
                error, protocol, ..
            } => {
                let problem = Problem::key_invalid(&error);
                Err(ResponseFuture::answered(
                    problem.into_keyward_response(protocol),
                ))
            }
        }
    }
}

impl<S: Clone, St, K, X: LayerSettings> KeyedService<S, St, K, X> {
    /// The inner service `poll_ready` was called on, leaving a fresh clone behind: the
    /// clone may not be ready, so the request must go to the one that is.
    pub(crate) fn take_ready(&mut self) -> S {
        let clone = self.inner.clone();
        mem::replace(&mut self.inner, clone)
    }

    /// The per-request step every layer starts with: take the ready inner service,
    /// extract and check the key, scope it, and open the decision span.
    pub(crate) fn prepare<B>(&mut self, req: Request<B>) -> Prepared<S, B>
    where
        K: KeyExtractor<B>,
    {
        let protocol = Protocol::of(req.headers());
        let found = match self.config.find_key(&req) {
            Ok(Some(found)) => found,
            Ok(None) => {
                let inner = self.take_ready();
                return Prepared::NoKey { inner, req };
            }
            Err(error) => {
                let reporter = req.extensions().get::<DecisionReporter>().cloned();
                return Prepared::Invalid {
                    error,
                    protocol,
                    reporter,
                };
            }
        };
        let span = self.config.span();
        let traced = !span.is_disabled();
        let reporter = req.extensions().get::<DecisionReporter>();
        let key = self.config.scoped(&found, traced || reporter.is_some());
        // Computed only for a span or a reporter that records it: a SHA-256 per request
        // is a large share of a layer's cost.
        let key_hash = (traced || reporter.is_some()).then(|| key.key_hash());
        if let (true, Some(hash)) = (traced, key_hash) {
            span.record(FIELD_KEY_HASH, hash.as_str());
        }
        let trace = self.config.trace(span, reporter, key_hash);
        let raw = found.key;
        Prepared::Keyed(Keyed {
            inner: self.take_ready(),
            req,
            key,
            raw,
            trace,
            protocol,
        })
    }
}

/// `Debug` of a layer: its kind's fields first, then the common ones.
pub(crate) fn debug_layer<K, X>(
    name: &str,
    config: &Config<K, X>,
    f: &mut fmt::Formatter<'_>,
    own: impl FnOnce(&mut fmt::DebugStruct<'_, '_>),
) -> fmt::Result {
    let mut out = f.debug_struct(name);
    out.field("route", &config.common.route)
        .field("key", &config.key_name);
    own(&mut out);
    out.field("on_store_error", &config.common.on_store_error)
        .finish_non_exhaustive()
}

/// The builder methods every layer has, written once: `route`, `meter` and
/// `on_store_error`, plus `scope` and `unscoped` for the layers whose keys belong to a
/// principal. Expands inside an `impl` of a layer whose only field is `core`, a
/// [`KeyedLayer`].
macro_rules! common_layer_methods {
    () => {
        /// The route name: part of every stored key, and of telemetry (default
        /// `"default"`). Give every route its own name so that keys of different routes
        /// never collide.
        pub fn route(self, name: impl Into<std::sync::Arc<str>>) -> Self {
            Self {
                core: self.core.route(name.into()),
            }
        }

        /// Records metrics with `meter` instead of `opentelemetry::global::meter("keyward")`
        /// (which must be installed before the layer is built to take effect).
        pub fn meter(self, meter: &opentelemetry::metrics::Meter) -> Self {
            Self {
                core: self.core.meter(meter),
            }
        }

        /// What to do when the store fails (default
        /// [`OnStoreError::Closed`](keyward_core::store::OnStoreError): 503 with
        /// `Retry-After`); `Open` lets the request through uncoordinated. Both log a
        /// warning and count the outcome `store_error`.
        pub fn on_store_error(self, policy: keyward_core::store::OnStoreError) -> Self {
            Self {
                core: self.core.with(|common, _| common.on_store_error = policy),
            }
        }
    };
    (scoped) => {
        $crate::pipeline::common_layer_methods!();

        /// Whose keys these are: the stored key includes a hash of the principal taken
        /// with `spec` (e.g. `header:Authorization`), so two principals never share a
        /// key's state. A request without a principal is in one anonymous scope, apart
        /// from every principal.
        pub fn scope(self, spec: keyward_core::KeySpec) -> Self {
            Self {
                core: self.core.with(|common, _| common.scope = Some(spec)),
            }
        }

        /// One state per key, whoever sends it (`scope = "none"` in the sidecar).
        pub fn unscoped(self) -> Self {
            Self {
                core: self.core.with(|common, _| common.scope = None),
            }
        }

        /// What a request without a principal gets (default
        /// [`ScopeMissing::Anonymous`](crate::ScopeMissing): one scope shared by all
        /// anonymous callers); [`ScopeMissing::Reject`](crate::ScopeMissing) answers 400.
        pub fn scope_missing(self, policy: $crate::ScopeMissing) -> Self {
            Self {
                core: self.core.with(|common, _| common.scope_missing = policy),
            }
        }
    };
}

pub(crate) use common_layer_methods;

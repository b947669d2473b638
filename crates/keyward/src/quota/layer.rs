use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::{HeaderValue, Request};
use keyward_core::gcra::Quota;
use keyward_core::ratelimit::{format_policy, to_header_value};
use keyward_core::store::OnStoreError;
use keyward_core::telemetry::LAYER_QUOTA;
use keyward_core::{Key, KeySpec};
use opentelemetry::metrics::Meter;
use tower_layer::Layer;

use super::service::QuotaService;
use crate::telemetry::LayerMetrics;

/// How many quota units a request takes; implemented by [`UnitCost`] (1 per request) and
/// by every closure `Fn(&Request<B>) -> u32`.
pub trait Cost<B> {
    /// The units `req` takes (0 = free: it only reports the key's state).
    fn cost(&self, req: &Request<B>) -> u32;
}

impl<B, F> Cost<B> for F
where
    F: Fn(&Request<B>) -> u32,
{
    fn cost(&self, req: &Request<B>) -> u32 {
        self(req)
    }
}

/// Every request takes one unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnitCost;

impl<B> Cost<B> for UnitCost {
    fn cost(&self, _req: &Request<B>) -> u32 {
        1
    }
}

type OverrideFn = Arc<dyn Fn(&Key) -> Option<Quota> + Send + Sync>;

/// A quota with its pre-rendered `RateLimit-Policy` value.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    pub(crate) quota: Quota,
    pub(crate) header: HeaderValue,
}

impl Policy {
    pub(crate) fn new(name: &str, quota: Quota) -> Self {
        Policy {
            quota,
            header: to_header_value(format_policy(name, quota.limit(), quota.window_seconds())),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Config<K, C> {
    pub(crate) key: K,
    pub(crate) key_name: Arc<str>,
    pub(crate) cost: C,
    pub(crate) settings: Settings,
}

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) route: Arc<str>,
    /// The route part of stored keys: the route, plus the policy name when one is set,
    /// so that stacked quotas on one route (per second and per day) keep separate state.
    pub(crate) storage_route: Arc<str>,
    pub(crate) policy_name: Option<Arc<str>>,
    pub(crate) scope: Option<KeySpec>,
    pub(crate) default: Policy,
    pub(crate) table: HashMap<Key, Policy>,
    pub(crate) overrides: Option<OverrideFn>,
    pub(crate) shadow: bool,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) metrics: LayerMetrics,
}

impl Settings {
    /// The name in the RateLimit headers.
    pub(crate) fn name(&self) -> &Arc<str> {
        self.policy_name.as_ref().unwrap_or(&self.route)
    }

    /// Renders the policy headers and the stored keys' route again after the route or
    /// the policy name changed.
    fn render(&mut self) {
        self.storage_route = match &self.policy_name {
            Some(policy) => format!("{}/{policy}", self.route).into(),
            None => self.route.clone(),
        };
        let name = self.name().clone();
        self.default = Policy::new(&name, self.default.quota);
        for policy in self.table.values_mut() {
            *policy = Policy::new(&name, policy.quota);
        }
    }

    /// The policy for `key`: the override table, then the override function, then the
    /// default.
    pub(crate) fn policy_for(&self, key: &Key) -> Policy {
        if let Some(policy) = self.table.get(key) {
            return policy.clone();
        }
        if let Some(quota) = self.overrides.as_ref().and_then(|f| f(key)) {
            if quota == self.default.quota {
                return self.default.clone();
            }
            return Policy::new(self.name(), quota);
        }
        self.default.clone()
    }
}

/// Applies [`QuotaService`]: per-key GCRA quotas with the IETF RateLimit headers. See the
/// [module docs](crate::quota) for the full behaviour.
pub struct QuotaLayer<St, K = KeySpec, C = UnitCost> {
    pub(crate) store: St,
    pub(crate) config: Arc<Config<K, C>>,
}

impl<St> QuotaLayer<St> {
    /// A layer enforcing `quota` per key on `store`, with the defaults: key `peer_ip`,
    /// route and policy name `"default"`, unscoped, 1 unit per request, enforcing (not
    /// shadow), failing closed (503) when the store fails.
    pub fn new(store: St, quota: Quota) -> Self {
        let route: Arc<str> = "default".into();
        let metrics = LayerMetrics::new(LAYER_QUOTA, &route, None);
        QuotaLayer {
            store,
            config: Arc::new(Config {
                key: KeySpec::PeerIp,
                key_name: "peer_ip".into(),
                cost: UnitCost,
                settings: Settings {
                    default: Policy::new(&route, quota),
                    storage_route: route.clone(),
                    route,
                    policy_name: None,
                    scope: None,
                    table: HashMap::new(),
                    overrides: None,
                    shadow: false,
                    on_store_error: OnStoreError::Closed,
                    metrics,
                },
            }),
        }
    }
}

impl<St, K: Clone, C: Clone> QuotaLayer<St, K, C> {
    fn with(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        change(&mut Arc::make_mut(&mut self.config).settings);
        self
    }

    fn rebuild<K2, C2>(self, key: K2, key_name: Arc<str>, cost: C2) -> QuotaLayer<St, K2, C2> {
        QuotaLayer {
            store: self.store,
            config: Arc::new(Config {
                key,
                key_name,
                cost,
                settings: self.config.settings.clone(),
            }),
        }
    }

    /// Takes the key from a [`KeySpec`] (default `peer_ip`), e.g. `header:X-Api-Key`.
    pub fn key(self, spec: KeySpec) -> QuotaLayer<St, KeySpec, C> {
        let name = spec.to_string().into();
        let cost = self.config.cost.clone();
        self.rebuild(spec, name, cost)
    }

    /// Takes the key with any [`KeyExtractor`](keyward_core::KeyExtractor), such as a
    /// closure.
    pub fn key_extractor<K2>(self, extractor: K2) -> QuotaLayer<St, K2, C> {
        let cost = self.config.cost.clone();
        self.rebuild(extractor, "custom key extractor".into(), cost)
    }

    /// How many units each request takes (default 1), e.g. from a header or the method.
    pub fn cost<C2>(self, cost: C2) -> QuotaLayer<St, K, C2> {
        let key = self.config.key.clone();
        let name = self.config.key_name.clone();
        self.rebuild(key, name, cost)
    }

    /// The route name in stored keys and telemetry (default `"default"`); also the policy
    /// name in the headers unless [`QuotaLayer::policy_name`] sets one.
    pub fn route(self, name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        self.with(|s| {
            s.metrics = s.metrics.for_route(&name);
            s.route = name;
            s.render();
        })
    }

    /// Records metrics with `meter` instead of `opentelemetry::global::meter("keyward")`
    /// (which must be installed before the layer is built to take effect).
    pub fn meter(self, meter: &Meter) -> Self {
        self.with(|s| s.metrics = LayerMetrics::new(LAYER_QUOTA, &s.route, Some(meter)))
    }

    /// The `NAME` of `RateLimit-Policy: "NAME";q=..;w=..` and `RateLimit: "NAME";..`.
    /// Characters other than printable ASCII are sent as `?`. Also part of the stored
    /// keys: two quota layers on one route (say per second and per day) need different
    /// policy names, and renaming a policy starts its keys afresh.
    pub fn policy_name(self, name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        self.with(|s| {
            s.policy_name = Some(name);
            s.render();
        })
    }

    /// Quotas per principal and key: the stored key includes a hash of the principal
    /// taken with `spec` (e.g. `header:Authorization`). Default: unscoped, because a
    /// quota scoped by a header the client chooses can be dodged by varying that header.
    pub fn scope(self, spec: KeySpec) -> Self {
        self.with(|s| s.scope = Some(spec))
    }

    /// One quota per key, whoever sends it (the default).
    pub fn unscoped(self) -> Self {
        self.with(|s| s.scope = None)
    }

    /// Gives `key` its own quota instead of the default.
    pub fn override_key(self, key: impl Into<Key>, quota: Quota) -> Self {
        let key = key.into();
        self.with(|s| {
            s.table.insert(key, Policy::new(s.name(), quota));
        })
    }

    /// Computes per-key quotas: `Some(quota)` replaces the default for that key. Checked
    /// after the [`QuotaLayer::override_key`] table. Runs on every request: keep it cheap.
    pub fn overrides<F>(self, overrides: F) -> Self
    where
        F: Fn(&Key) -> Option<Quota> + Send + Sync + 'static,
    {
        let overrides: OverrideFn = Arc::new(overrides);
        self.with(|s| s.overrides = Some(overrides))
    }

    /// Shadow mode: requests over the quota are let through (outcome `shadow_limited`,
    /// with the RateLimit headers), to measure a quota before enforcing it.
    pub fn shadow(self, shadow: bool) -> Self {
        self.with(|s| s.shadow = shadow)
    }

    /// What to do when the store fails (default [`OnStoreError::Closed`]: 503).
    pub fn on_store_error(self, policy: OnStoreError) -> Self {
        self.with(|s| s.on_store_error = policy)
    }
}

impl<St: Clone, K, C> Clone for QuotaLayer<St, K, C> {
    fn clone(&self) -> Self {
        QuotaLayer {
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

impl<St, K, C> fmt::Debug for QuotaLayer<St, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.config.settings;
        f.debug_struct("QuotaLayer")
            .field("route", &settings.route)
            .field("policy_name", settings.name())
            .field("key", &self.config.key_name)
            .field("quota", &settings.default.quota)
            .field("overrides", &settings.table.len())
            .field("shadow", &settings.shadow)
            .field("on_store_error", &settings.on_store_error)
            .finish_non_exhaustive()
    }
}

impl<S, St: Clone, K, C> Layer<S> for QuotaLayer<St, K, C> {
    type Service = QuotaService<S, St, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        QuotaService {
            inner,
            store: self.store.clone(),
            config: self.config.clone(),
        }
    }
}

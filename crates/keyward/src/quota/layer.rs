use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::{HeaderValue, Request};
use keyward_core::gcra::{Quota, QuotaDecision};
use keyward_core::ratelimit::{format_policy, to_header_value};
use keyward_core::store::QuotaStore;
use keyward_core::{Key, KeyExtractor, KeySpec, ScopedKey};
use tower_layer::Layer;

use super::charge::ResponseCost;
use super::service::QuotaService;
use crate::idempotency::InspectError;
use crate::pipeline::{
    Common, KeyedLayer, LayerKind, LayerSettings, common_layer_methods, debug_layer,
};

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

/// What only the quota layer has.
#[derive(Clone)]
pub(crate) struct QuotaSettings<C> {
    pub(crate) cost: C,
    /// The name in the RateLimit headers (`None`: the route name).
    pub(crate) name: Arc<str>,
    pub(crate) policy_name: Option<Arc<str>>,
    pub(crate) default: Policy,
    pub(crate) table: HashMap<Key, Policy>,
    pub(crate) overrides: Option<OverrideFn>,
    pub(crate) shadow: bool,
    /// `Some`: priced by the response; the request's cost is then only what it needs
    /// left to be admitted.
    pub(crate) charge_after: Option<ResponseCost>,
}

impl<C: Clone> LayerSettings for QuotaSettings<C> {
    const KIND: LayerKind = LayerKind::Quota;

    fn route_changed(&mut self, common: &mut Common) {
        self.render(common);
    }
}

impl<C> QuotaSettings<C> {
    /// Renders the policy headers again after the route or the policy name changed.
    fn render(&mut self, common: &Common) {
        self.name = self
            .policy_name
            .clone()
            .unwrap_or_else(|| common.route.clone());
        self.default = Policy::new(&self.name, self.default.quota);
        for policy in self.table.values_mut() {
            *policy = Policy::new(&self.name, policy.quota);
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
            return Policy::new(&self.name, quota);
        }
        self.default.clone()
    }
}

/// Applies [`QuotaService`]: per-key GCRA quotas with the IETF RateLimit headers. See the
/// [module docs](crate::quota) for the full behaviour.
pub struct QuotaLayer<St, K = KeySpec, C = UnitCost> {
    pub(crate) core: KeyedLayer<St, K, QuotaSettings<C>>,
}

impl<St> QuotaLayer<St> {
    /// A layer enforcing `quota` per key on `store`, with the defaults: key `peer_ip`,
    /// route and policy name `"default"`, unscoped, 1 unit per request, enforcing (not
    /// shadow), failing closed (503) when the store fails.
    pub fn new(store: St, quota: Quota) -> Self {
        let name: Arc<str> = Arc::from("default");
        let own = QuotaSettings {
            cost: UnitCost,
            default: Policy::new(&name, quota),
            name,
            policy_name: None,
            table: HashMap::new(),
            overrides: None,
            shadow: false,
            charge_after: None,
        };
        QuotaLayer {
            core: KeyedLayer::new(store, KeySpec::PeerIp, None, own),
        }
    }
}

impl<St, K: Clone, C: Clone> QuotaLayer<St, K, C> {
    common_layer_methods!(scoped);

    /// Takes the key from a [`KeySpec`] (default `peer_ip`), e.g. `header:X-Api-Key`.
    pub fn key(self, spec: KeySpec) -> QuotaLayer<St, KeySpec, C> {
        let name = spec.to_string().into();
        QuotaLayer {
            core: self.core.with_key(spec, name),
        }
    }

    /// Takes the key with any [`KeyExtractor`](keyward_core::KeyExtractor), such as a
    /// closure.
    pub fn key_extractor<K2>(self, extractor: K2) -> QuotaLayer<St, K2, C> {
        QuotaLayer {
            core: self.core.with_key(extractor, "custom key extractor".into()),
        }
    }

    /// How many units each request takes (default 1), e.g. from a header or the method.
    pub fn cost<C2: Clone>(self, cost: C2) -> QuotaLayer<St, K, C2> {
        QuotaLayer {
            core: self.core.map_own(|own| QuotaSettings {
                cost,
                name: own.name,
                policy_name: own.policy_name,
                default: own.default,
                table: own.table,
                overrides: own.overrides,
                shadow: own.shadow,
                charge_after: own.charge_after,
            }),
        }
    }

    /// The `NAME` of `RateLimit-Policy: "NAME";q=..;w=..` and `RateLimit: "NAME";..`
    /// (default: the route name). Characters other than printable ASCII are sent as `?`.
    /// Also part of the stored keys: two quota layers on one route (say per second and
    /// per day) need different policy names, and renaming a policy starts its keys
    /// afresh.
    pub fn policy_name(self, name: impl Into<Arc<str>>) -> Self {
        let name = name.into();
        let core = self.core.with(|common, own| {
            common.set_namespace(name.clone());
            own.policy_name = Some(name);
            own.render(common);
        });
        QuotaLayer { core }
    }

    /// Gives `key` its own quota instead of the default.
    pub fn override_key(self, key: impl Into<Key>, quota: Quota) -> Self {
        let key = key.into();
        let core = self.core.with(|_, own| {
            let policy = Policy::new(&own.name, quota);
            own.table.insert(key, policy);
        });
        QuotaLayer { core }
    }

    /// Computes per-key quotas: `Some(quota)` replaces the default for that key. Checked
    /// after the [`QuotaLayer::override_key`] table. Runs on every request: keep it cheap.
    pub fn overrides<F>(self, overrides: F) -> Self
    where
        F: Fn(&Key) -> Option<Quota> + Send + Sync + 'static,
    {
        let overrides: OverrideFn = Arc::new(overrides);
        QuotaLayer {
            core: self.core.with(|_, own| own.overrides = Some(overrides)),
        }
    }

    /// Prices requests by their responses: the units a request takes are known only
    /// once the inner service answered (an upstream's `x-tokens-used` header or
    /// trailer, a closure on the response), or only some outcomes count (only 401/403
    /// for a login route, only 2xx for paid calls). See [`ResponseCost`].
    ///
    /// - **Admission, before the call**: a request is let in while its key has at least
    ///   [`QuotaLayer::cost`] units left (default 1), taking nothing: one read-only
    ///   store round trip. A key in debt, or without that much left, gets 429 with the
    ///   `Retry-After` at which the units are back.
    /// - **The charge, after the call**: the response's units, whether or not they fit,
    ///   when its body ends, fails or is dropped (one store round trip, in the background
    ///   on Redis). A key may so go into debt: its next requests wait until it is paid
    ///   back at the quota's rate. A response whose status is not counted, an inner
    ///   service error (no response) and a request let through by a failing store
    ///   (`on_store_error = open`) charge nothing.
    /// - The RateLimit headers on the response report the admission (what was left
    ///   before this response's charge).
    /// - Requests admitted at the same time are charged after all of them ran: with `c`
    ///   concurrent requests per key a key can go `c` responses over before it is
    ///   stopped. That is the price of not knowing costs up front; a serial layer on the
    ///   same key bounds `c`.
    pub fn charge_after(self, cost: ResponseCost) -> Self {
        QuotaLayer {
            core: self.core.with(|_, own| own.charge_after = Some(cost)),
        }
    }

    /// Shadow mode: requests over the quota are let through (outcome `shadow_limited`,
    /// with the RateLimit headers), to measure a quota before enforcing it.
    pub fn shadow(self, shadow: bool) -> Self {
        QuotaLayer {
            core: self.core.with(|_, own| own.shadow = shadow),
        }
    }
}

impl<St: QuotaStore, K, C> QuotaLayer<St, K, C> {
    /// What the key `req` carries has left, found exactly as this layer would find it
    /// (route, scope, per-key overrides), without taking anything: for support tools.
    /// `None` when `req` carries no key.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use keyward::core::gcra::Quota;
    /// use keyward::{KeySpec, MemoryStore, QuotaLayer};
    ///
    /// let layer = QuotaLayer::new(MemoryStore::new(), Quota::per_minute(10).unwrap())
    ///     .route("api")
    ///     .key(KeySpec::parse("header:x-api-key").unwrap())
    ///     .override_key("big-tenant", Quota::per_minute(1000).unwrap());
    /// let lookup = |key: &str| http::Request::get("/").header("x-api-key", key).body(()).unwrap();
    ///
    /// let peek = layer.peek(&lookup("small")).await.unwrap().unwrap();
    /// assert_eq!((peek.quota.limit(), peek.decision.remaining), (10, 10));
    /// let again = layer.peek(&lookup("small")).await.unwrap().unwrap();
    /// assert_eq!(again.decision.remaining, 10, "peeking takes nothing");
    /// let big = layer.peek(&lookup("big-tenant")).await.unwrap().unwrap();
    /// assert_eq!(big.quota.limit(), 1000);
    /// # }
    /// ```
    pub async fn peek<B>(&self, req: &Request<B>) -> Result<Option<QuotaPeek>, InspectError>
    where
        K: KeyExtractor<B>,
        C: Clone,
    {
        let config = &self.core.config;
        let found = config.find_key(req);
        let Some(found) = found.map_err(|error| InspectError::Key(error.to_string()))? else {
            return Ok(None);
        };
        let key = config.scoped(&found, false);
        let quota = config.own.policy_for(&found.key).quota;
        // A cost of 0 reports the state and takes nothing (`Quota::decide`).
        let decision = self.core.store.check(&key, &quota, 0).await?;
        Ok(Some(QuotaPeek {
            key,
            quota,
            decision,
        }))
    }
}

/// What [`QuotaLayer::peek`] found for a key.
#[derive(Clone, Debug)]
pub struct QuotaPeek {
    /// The key, as the store holds it (name it by [`ScopedKey::key_hash`]).
    pub key: ScopedKey,
    /// The key's quota: the default or its override.
    pub quota: Quota,
    /// What is left (`remaining`) and when the bucket is full again (`reset_after`).
    pub decision: QuotaDecision,
}

impl<St: Clone, K, C> Clone for QuotaLayer<St, K, C> {
    fn clone(&self) -> Self {
        QuotaLayer {
            core: self.core.clone(),
        }
    }
}

impl<St, K, C> fmt::Debug for QuotaLayer<St, K, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.core.config;
        debug_layer("QuotaLayer", config, f, |out| {
            let own = &config.own;
            out.field("policy_name", &own.name)
                .field("quota", &own.default.quota)
                .field("overrides", &own.table.len())
                .field("shadow", &own.shadow)
                .field("charge_after", &own.charge_after);
        })
    }
}

impl<S, St: Clone, K, C> Layer<S> for QuotaLayer<St, K, C> {
    type Service = QuotaService<S, St, K, C>;

    fn layer(&self, inner: S) -> Self::Service {
        QuotaService {
            core: self.core.service(inner),
        }
    }
}

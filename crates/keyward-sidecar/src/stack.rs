//! Each route's layer stack, outermost first: body (read for `json:` keys, webhook
//! signatures verified) -> quota -> idempotency -> serial -> single_flight -> upstream.

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use keyward::core::store::{IdempotencyStore, QuotaStore, SerialStore, SingleFlightStore};
use keyward::webhook::StandardWebhooks;
use keyward::{
    BufferedBodyLayer, IdempotencyLayer, PerKeySerialLayer, QuotaLayer, SingleFlightLayer,
};
use opentelemetry::metrics::Meter;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::config::{IdempotencyConfig, QuotaConfig, RouteConfig, StoreConfig};
use crate::http_metrics::{RouteHttp, TimedUpstream};
use crate::proxy::{ProxyError, Upstream};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A route's stack. Upstream errors (no response: unreachable, timeout) stay errors
/// through every layer, so idempotency counts them `ambiguous`; the app turns them into
/// 502/504 problems last.
pub type Stack = BoxCloneSyncService<Request<Body>, Response<Body>, ProxyError>;

fn boxed<S, B>(service: S) -> Stack
where
    S: Service<Request<Body>, Response = Response<B>, Error = ProxyError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(service.map_response(|res| res.map(Body::new)))
}

/// A store every layer can use: the memory store, or Redis.
pub trait Store: IdempotencyStore + QuotaStore + SerialStore + SingleFlightStore {}

impl<St: IdempotencyStore + QuotaStore + SerialStore + SingleFlightStore> Store for St {}

/// The stack of `route`.
pub fn build<St: Store>(
    route: &RouteConfig,
    store: &St,
    store_config: &StoreConfig,
    meter: &Meter,
    upstream: Upstream,
    http: RouteHttp,
) -> Stack {
    let mut stack = boxed(TimedUpstream::new(upstream, http));
    if let Some(flight) = &route.single_flight {
        let mut layer = SingleFlightLayer::new(store.clone())
            .route(route.name.as_str())
            .meter(meter)
            .key(flight.key.clone())
            .methods(flight.methods.iter().cloned())
            .max_body(flight.max_body)
            .vary(flight.vary.iter().cloned())
            .reuse_for(flight.reuse_for)
            .scope_missing(flight.scope_missing)
            .on_store_error(store_config.on_error);
        layer = match &flight.scope {
            Some(scope) => layer.scope(scope.clone()),
            None => layer.unscoped(),
        };
        stack = boxed(layer.layer(stack));
    }
    if let Some(serial) = &route.serial {
        let mut layer = PerKeySerialLayer::new(store.clone())
            .route(route.name.as_str())
            .meter(meter)
            .key(serial.key.clone())
            .max_wait(serial.max_wait)
            .max_queue(serial.max_queue)
            .permits(serial.permits)
            .on_store_error(store_config.on_error);
        if let Some(max_hold) = serial.max_hold {
            layer = layer.max_hold(max_hold);
        }
        stack = boxed(layer.layer(stack));
    }
    if let Some(idem) = &route.idempotency {
        let layer = idempotency_layer(route, idem, store, store_config, meter);
        stack = boxed(layer.layer(stack));
    }
    // The first table is the outermost layer: each adds its policy to
    // `RateLimit-Policy`, and `RateLimit` reports the one closest to its limit.
    for quota in route.quotas.iter().rev() {
        let layer = quota_layer(route, quota, store, store_config, meter);
        stack = boxed(layer.layer(stack));
    }
    // Outermost: a forged webhook delivery reaches no layer (it cannot claim a real
    // event's id), and `json:` keys find the body read.
    if let Some(max_body) = route.body {
        stack = match &route.webhook {
            Some(webhook) => {
                let verify = StandardWebhooks::new(webhook.secrets.iter().cloned())
                    .tolerance(webhook.tolerance);
                boxed(verify.layer(max_body).layer(stack))
            }
            None => boxed(BufferedBodyLayer::new(max_body).layer(stack)),
        };
    }
    stack
}

/// The quota layer of `route`, with its per-key overrides; the admin's `/quota` look-ups
/// use the same one.
pub fn quota_layer<St: QuotaStore>(
    route: &RouteConfig,
    quota: &QuotaConfig,
    store: &St,
    store_config: &StoreConfig,
    meter: &Meter,
) -> QuotaLayer<St> {
    let mut layer = QuotaLayer::new(store.clone(), quota.quota)
        .route(route.name.as_str())
        .meter(meter)
        .key(quota.key.clone())
        .shadow(quota.shadow)
        .scope_missing(quota.scope_missing)
        .on_store_error(store_config.on_error);
    if let Some(scope) = &quota.scope {
        layer = layer.scope(scope.clone());
    }
    if let Some(name) = &quota.name {
        layer = layer.policy_name(name.as_str());
    }
    if let Some(cost) = &quota.charge_after {
        layer = layer.charge_after(cost.clone());
    }
    for (key, own) in &quota.overrides {
        layer = layer.override_key(key.as_str(), *own);
    }
    layer
}

/// The idempotency layer of `route`; the admin's `/keys` look-ups use the same one, so
/// they find records under exactly the keys requests are coordinated with.
pub fn idempotency_layer<St: IdempotencyStore>(
    route: &RouteConfig,
    idem: &IdempotencyConfig,
    store: &St,
    store_config: &StoreConfig,
    meter: &Meter,
) -> IdempotencyLayer<St> {
    let layer = IdempotencyLayer::new(store.clone())
        .route(route.name.as_str())
        .meter(meter)
        .key(idem.key.clone())
        .required(idem.required)
        .ttl(idem.ttl)
        .lease(idem.lease)
        .on_in_flight(idem.on_in_flight)
        .max_body(idem.max_body)
        .max_response(idem.max_response)
        .store_server_errors(idem.store_server_errors)
        .record_retry(idem.record_retry)
        .scope_missing(idem.scope_missing)
        .on_store_error(store_config.on_error);
    let layer = match &idem.fingerprint_json {
        Some(identity) => layer.fingerprint_json(identity.clone()),
        None => layer,
    };
    match &idem.scope {
        Some(scope) => layer.scope(scope.clone()),
        None => layer.unscoped(),
    }
}

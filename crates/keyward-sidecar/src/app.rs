//! Request handling: match a route, run its stack, log one line.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use axum::body::Body;
use http::{Method, Request, Response};
use keyward::DecisionReporter;
use keyward_core::PathParams;
use keyward_core::grpc::Protocol;
use opentelemetry::metrics::Meter;
use tower::{Service, ServiceExt};
use tracing::Instrument;

use arc_swap::ArcSwap;

use crate::config::{Config, UpstreamProtocol};
use crate::hotkeys::{HotKeys, RouteSketch};
use crate::http_metrics::{HttpMetrics, RouteHttp, TimedUpstream};
use crate::ingress::Ingress;
use crate::metrics::{REQUEST_SPAN, RequestDecisions};
use crate::proxy::Upstream;
use crate::stack::{self, Stack, Store};

/// The route name of requests no route matches, in logs and metrics.
const NO_ROUTE: &str = "-";

struct Route {
    name: String,
    methods: Option<Vec<Method>>,
    service: Stack,
    http: RouteHttp,
    hot_keys: Option<RouteSketch>,
}

/// Every route of a config, ready to serve. The routing table sits behind one swappable
/// pointer: [`App::reload`] replaces it whole, each request reads it once, so a request
/// runs under one config from start to end (in-flight requests finish under the old one).
#[derive(Clone)]
pub struct App {
    inner: Arc<ArcSwap<Inner>>,
    /// Counts reloads: a worker thread keeps its own handle on the routing table and
    /// takes a new one when this has moved ([`App::routes`]).
    generation: Arc<AtomicU64>,
    id: u64,
}

/// A worker thread's handle on one routing table. A request holds it for its whole
/// life: its reference count is touched by that thread only, where one `Arc` of the
/// table itself would bounce its count between the cores on every request.
struct ThreadRoutes(Arc<Inner>);

/// One [`App`]'s handle on a thread: the app's id, whether the app is still there, the
/// generation the handle was taken at, and the handle.
type ThreadHandle = (u64, Weak<ArcSwap<Inner>>, u64, Arc<ThreadRoutes>);

thread_local! {
    /// This thread's handle per [`App`].
    static ROUTES: RefCell<Vec<ThreadHandle>> = const { RefCell::new(Vec::new()) };
}

/// Ids of [`App`]s, so that a thread's handles never mix up two of them.
static APP_IDS: AtomicU64 = AtomicU64::new(0);

struct Inner {
    router: matchit::Router<Vec<usize>>,
    routes: Vec<Route>,
    /// The upstream alone, called directly: no stack to clone, no boxed layer future.
    passthrough: TimedUpstream,
    /// Metrics of requests no route matches (`http.route = "-"`).
    unrouted: RouteHttp,
    ingress: Ingress,
    hot_keys: HotKeys,
    /// Kept so that a reload with the same upstream settings keeps its connection pool.
    upstream: Upstream,
    upstream_settings: UpstreamSettings,
}

#[derive(Clone, PartialEq, Eq)]
struct UpstreamSettings {
    uri: http::Uri,
    timeout: std::time::Duration,
    protocol: UpstreamProtocol,
    keepalive: usize,
}

impl App {
    pub fn new<St: Store>(
        config: &Config,
        store: &St,
        meter: &Meter,
        hot_keys: HotKeys,
    ) -> Result<App, matchit::InsertError> {
        let inner = Inner::build(config, store, meter, None, hot_keys)?;
        Ok(App {
            inner: Arc::new(ArcSwap::from_pointee(inner)),
            generation: Arc::new(AtomicU64::new(0)),
            id: APP_IDS.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Replaces every route with those of `config` on the same `store` (its connections
    /// are reused, and so is the upstream's connection pool while the upstream's settings
    /// stay the same). Nothing changes when the routes cannot be built.
    pub fn reload<St: Store>(
        &self,
        config: &Config,
        store: &St,
        meter: &Meter,
    ) -> Result<(), matchit::InsertError> {
        let old = self.inner.load_full();
        let inner = Inner::build(config, store, meter, Some(&old), old.hot_keys.clone())?;
        self.inner.store(Arc::new(inner));
        // After the store: a thread that sees the new generation loads the new table.
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// This thread's handle on the current routing table (a new one after a reload).
    fn routes(&self) -> Arc<ThreadRoutes> {
        let generation = self.generation.load(Ordering::Acquire);
        ROUTES.with(|routes| {
            let mut routes = routes.borrow_mut();
            if let Some((.., seen, handle)) = routes.iter_mut().find(|(id, ..)| *id == self.id) {
                if *seen != generation {
                    *seen = generation;
                    *handle = Arc::new(ThreadRoutes(self.inner.load_full()));
                }
                return handle.clone();
            }
            // A new app on this thread: forget the handles of apps that are gone.
            routes.retain(|(_, app, ..)| app.strong_count() > 0);
            let handle = Arc::new(ThreadRoutes(self.inner.load_full()));
            routes.push((
                self.id,
                Arc::downgrade(&self.inner),
                generation,
                handle.clone(),
            ));
            handle
        })
    }
}

impl Inner {
    fn build<St: Store>(
        config: &Config,
        store: &St,
        meter: &Meter,
        old: Option<&Inner>,
        hot_keys: HotKeys,
    ) -> Result<Inner, matchit::InsertError> {
        let settings = UpstreamSettings {
            uri: config.server.upstream.clone(),
            timeout: config.server.request_timeout,
            protocol: config.server.upstream_protocol,
            keepalive: config.server.upstream_keepalive,
        };
        let upstream = match old {
            Some(old) if old.upstream_settings == settings => old.upstream.clone(),
            _ => Upstream::new(
                settings.uri.clone(),
                settings.timeout,
                settings.protocol,
                settings.keepalive,
            ),
        };
        let http_metrics = HttpMetrics::new(meter);
        let unrouted = http_metrics.route(NO_ROUTE);
        let mut by_path: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut order = Vec::new();
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                let entry = by_path.entry(route.path.as_str()).or_default();
                if entry.is_empty() {
                    order.push(route.path.as_str());
                }
                entry.push(i);
                let http = http_metrics.route(&route.name);
                Route {
                    hot_keys: hot_keys.route(&route.name),
                    name: route.name.clone(),
                    methods: route.methods.clone(),
                    service: stack::build(
                        route,
                        store,
                        &config.store,
                        meter,
                        upstream.clone(),
                        http.clone(),
                    ),
                    http,
                }
            })
            .collect();
        let mut router = matchit::Router::new();
        for path in order {
            router.insert(path, by_path.remove(path).unwrap_or_default())?;
        }
        Ok(Inner {
            router,
            routes,
            passthrough: TimedUpstream::new(upstream.clone(), unrouted.clone()),
            unrouted,
            ingress: Ingress {
                trusted_proxies: config.server.trusted_proxies.clone(),
            },
            upstream,
            upstream_settings: settings,
            hot_keys,
        })
    }
}

impl App {
    /// Serves one request from `peer`: admitted by [ingress](crate::ingress) (canonical
    /// path, keyward's and hop-by-hop headers removed), routed on the canonical path.
    ///
    /// Its layers report their decisions to a [`RequestDecisions`] (the access log's
    /// outcomes, the hot keys); the request span exists only when a subscriber records
    /// it (OTLP export, a log level that shows spans).
    pub async fn handle(&self, req: Request<Body>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        // One read of the routing table per request: a reload meanwhile does not touch it.
        let routes = self.routes();
        let inner = &routes.0;
        let method = req.method().clone();
        let protocol = Protocol::of(req.headers());
        let mut req = match inner.ingress.admit(req, peer) {
            Ok(req) => req,
            Err(refused) => {
                let res = refused.into_response();
                inner
                    .unrouted
                    .served(&method, res.status(), started.elapsed());
                tracing::info!(route = "-", method = %method, status = res.status().as_u16(), "request refused at ingress");
                return res;
            }
        };
        let (route_name, service, http, hot_keys) = match inner.route_for(&mut req) {
            Some(route) => (
                route.name.as_str(),
                Some(route.service.clone()),
                &route.http,
                Some(&route.hot_keys),
            ),
            None => (NO_ROUTE, None, &inner.unrouted, None),
        };
        // Requests no route matches meet no layer: nothing to report.
        let decisions = hot_keys.map(|hot_keys| {
            let decisions = Arc::new(RequestDecisions::new(hot_keys.clone()));
            req.extensions_mut()
                .insert(DecisionReporter::new(decisions.clone()));
            decisions
        });
        let mut span = tracing::info_span!(REQUEST_SPAN, route = route_name);
        if !span.is_disabled() {
            crate::telemetry::extract_parent(req.headers(), &span);
            if !crate::telemetry::wanted(&span) {
                span = tracing::Span::none();
            }
        }
        let call = async {
            match service {
                Some(service) => service.oneshot(req).await,
                None => inner.passthrough.clone().call(req).await,
            }
        };
        let res = if span.is_disabled() {
            call.await
        } else {
            call.instrument(span.clone()).await
        };
        let res = match res {
            Ok(res) => res,
            Err(error) => {
                tracing::warn!(parent: &span, route = route_name, %error, "no response from upstream");
                error.into_response(protocol)
            }
        };
        let served = || http.served(&method, res.status(), started.elapsed());
        // Inside the request's span, when it may be sampled: the latency histogram then
        // keeps its trace as an exemplar.
        if crate::telemetry::exporting_traces() && !span.is_disabled() {
            span.in_scope(served);
        } else {
            served();
        }
        tracing::info!(
            parent: &span,
            route = route_name,
            method = %method,
            status = res.status().as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            outcomes = %decisions.as_ref().map(|d| d.outcomes()).unwrap_or_default(),
            "request"
        );
        res
    }
}

impl Inner {
    fn route_for(&self, req: &mut Request<Body>) -> Option<&Route> {
        let matched = self.router.at(req.uri().path()).ok()?;
        let route = matched
            .value
            .iter()
            .map(|&i| &self.routes[i])
            .find(|route| {
                route
                    .methods
                    .as_ref()
                    .is_none_or(|m| m.contains(req.method()))
            })?;
        let params = PathParams(
            matched
                .params
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        );
        req.extensions_mut().insert(params);
        Some(route)
    }
}

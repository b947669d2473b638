//! Request handling: match a route, run its stack, log one line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use http::{Method, Request, Response};
use keyward::DecisionReporter;
use keyward_core::PathParams;
use keyward_core::grpc::Protocol;
use opentelemetry::metrics::Meter;
use tower::ServiceExt;
use tracing::Instrument;

use crate::config::Config;
use crate::hotkeys::HotKeys;
use crate::ingress::Ingress;
use crate::metrics::{REQUEST_SPAN, RequestDecisions};
use crate::proxy::Upstream;
use crate::stack::{self, Stack, Store};

struct Route {
    name: String,
    methods: Option<Vec<Method>>,
    service: Stack,
}

/// Every route of a config, ready to serve.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    router: matchit::Router<Vec<usize>>,
    routes: Vec<Route>,
    passthrough: Stack,
    ingress: Ingress,
    hot_keys: HotKeys,
}

impl App {
    pub fn new<St: Store>(
        config: &Config,
        store: &St,
        meter: &Meter,
        hot_keys: HotKeys,
    ) -> Result<App, matchit::InsertError> {
        let upstream = Upstream::new(
            config.server.upstream.clone(),
            config.server.request_timeout,
            config.server.upstream_protocol,
            config.server.upstream_keepalive,
        );
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
                Route {
                    name: route.name.clone(),
                    methods: route.methods.clone(),
                    service: stack::build(route, store, &config.store, meter, upstream.clone()),
                }
            })
            .collect();
        let mut router = matchit::Router::new();
        for path in order {
            router.insert(path, by_path.remove(path).unwrap_or_default())?;
        }
        Ok(App {
            inner: Arc::new(Inner {
                router,
                routes,
                passthrough: stack::boxed_upstream(upstream),
                ingress: Ingress {
                    trusted_proxies: config.server.trusted_proxies.clone(),
                },
                hot_keys,
            }),
        })
    }

    /// Serves one request from `peer`: admitted by [ingress](crate::ingress) (canonical
    /// path, keyward's and hop-by-hop headers removed), routed on the canonical path.
    ///
    /// Its layers report their decisions to a [`RequestDecisions`] (the access log's
    /// outcomes, the hot keys); the request span exists only when a subscriber records
    /// it (OTLP export, a log level that shows spans).
    pub async fn handle(&self, req: Request<Body>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let protocol = Protocol::of(req.headers());
        let mut req = match self.inner.ingress.admit(req, peer) {
            Ok(req) => req,
            Err(refused) => {
                let res = refused.into_response();
                tracing::info!(route = "-", method = %method, status = res.status().as_u16(), "request refused at ingress");
                return res;
            }
        };
        let (route_name, service, routed) = match self.route_for(&mut req) {
            Some(route) => (route.name.as_str(), route.service.clone(), true),
            None => ("-", self.inner.passthrough.clone(), false),
        };
        // Requests no route matches meet no layer: nothing to report.
        let decisions = routed.then(|| {
            let decisions = Arc::new(RequestDecisions::new(self.inner.hot_keys.clone()));
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
        let res = if span.is_disabled() {
            service.oneshot(req).await
        } else {
            service.oneshot(req).instrument(span.clone()).await
        };
        let res = match res {
            Ok(res) => res,
            Err(error) => {
                tracing::warn!(parent: &span, route = route_name, %error, "no response from upstream");
                error.into_response(protocol)
            }
        };
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

    fn route_for(&self, req: &mut Request<Body>) -> Option<&Route> {
        let matched = self.inner.router.at(req.uri().path()).ok()?;
        let route = matched
            .value
            .iter()
            .map(|&i| &self.inner.routes[i])
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

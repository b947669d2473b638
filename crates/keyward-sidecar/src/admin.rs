//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/hotkeys` (top key hashes per
//! route, see [`crate::hotkeys`]), `GET`/`DELETE /keys/{route}/{key}` (an idempotency
//! record's state; forget it, see [`crate::keys`]), `GET /quota/{route}/{key}`,
//! `POST /reload` ([`crate::reload`]). Bound to loopback by default; with `admin_token`
//! set, everything but the probes needs the token.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use std::net::SocketAddr;

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use http::{HeaderMap, Uri};

use crate::config::AdminToken;
use crate::keys::{KeyLookup, QuotaLookup};
use crate::metrics::Metrics;
use crate::reload::Reloader;

type Check = dyn Fn() -> Pin<Box<dyn Future<Output = Ready> + Send>> + Send + Sync;

/// What `/readyz` found: whether the store answers, and what an operator should know.
pub struct Ready {
    ok: bool,
    warning: Option<String>,
}

/// Whether the store answers, for `/readyz`.
#[derive(Clone)]
pub struct Readiness(Arc<Check>);

impl Readiness {
    /// The memory store always answers.
    pub fn always() -> Self {
        Readiness(Arc::new(|| {
            Box::pin(async {
                Ready {
                    ok: true,
                    warning: None,
                }
            })
        }))
    }

    /// Ready while Redis answers a PING within the store timeout. Ready, but with a
    /// warning (in the body, and logged once per change), while Redis may evict keys:
    /// any `maxmemory-policy` but `noeviction` can drop live claims and locks.
    pub fn redis(store: keyward::RedisStore) -> Self {
        let warned = Arc::new(std::sync::Mutex::new(None::<String>));
        Readiness(Arc::new(move || {
            let (store, warned) = (store.clone(), warned.clone());
            Box::pin(async move {
                if store.ping().await.is_err() {
                    return Ready {
                        ok: false,
                        warning: None,
                    };
                }
                let warning = eviction_warning(&store).await;
                let mut last = warned.lock().unwrap_or_else(|p| p.into_inner());
                if *last != warning {
                    if let Some(warning) = &warning {
                        tracing::warn!("{warning}");
                    }
                    last.clone_from(&warning);
                }
                Ready { ok: true, warning }
            })
        }))
    }
}

/// The warning for a Redis that may evict coordination records, if it may.
async fn eviction_warning(store: &keyward::RedisStore) -> Option<String> {
    let policies = store.maxmemory_policies().await.ok()?;
    let evicting: Vec<&str> = policies
        .iter()
        .map(String::as_str)
        .filter(|p| *p != "noeviction")
        .collect();
    (!evicting.is_empty()).then(|| {
        format!(
            "redis maxmemory-policy is {}, not noeviction: under memory pressure Redis may evict live idempotency claims, serial locks and fencing counters (a key may then run twice); set maxmemory-policy noeviction",
            evicting.join(", ")
        )
    })
}

/// What the admin listener serves that a reload replaces: the look-ups built from the
/// routes, and the token.
pub struct AdminRoutes {
    pub keys: KeyLookup,
    pub quotas: QuotaLookup,
    pub token: Option<AdminToken>,
}

/// The admin listener's current [`AdminRoutes`], swapped whole by a reload.
#[derive(Clone)]
pub struct AdminShared(Arc<ArcSwap<AdminRoutes>>);

impl AdminShared {
    pub fn new(routes: AdminRoutes) -> Self {
        AdminShared(Arc::new(ArcSwap::from_pointee(routes)))
    }

    pub fn replace(&self, routes: AdminRoutes) {
        self.0.store(Arc::new(routes));
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    ready: Readiness,
    shared: AdminShared,
    reloader: Option<Arc<Reloader>>,
}

/// The header that carries the admin token when `Authorization` is the customer's (a
/// look-up on a route scoped by `header:Authorization`).
pub const ADMIN_TOKEN_HEADER: &str = "keyward-admin-token";

pub fn router(
    metrics: Metrics,
    ready: Readiness,
    shared: AdminShared,
    reloader: Option<Arc<Reloader>>,
) -> Router {
    let state = AdminState {
        metrics,
        ready,
        shared,
        reloader,
    };
    let guarded = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/hotkeys", get(hot_keys))
        .route("/keys/{route}/{*key}", get(key_state).delete(forget_key))
        .route("/quota/{route}/{*key}", get(quota_state))
        .route("/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    // Probes carry no credentials and learn nothing but "up".
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(state)
}

/// With `admin_token` set, every admin request but the probes must carry it, as
/// `Authorization: Bearer TOKEN` or in `Keyward-Admin-Token`. The header that carried it
/// is removed before a look-up sees the request, so it never stands in for a principal.
async fn require_token(
    State(state): State<AdminState>,
    mut req: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    // Cloned out: no guard of the shared pointer is held across an await.
    let Some(AdminToken(token)) = state.shared.0.load().token.clone() else {
        return next.run(req).await;
    };
    let headers = req.headers();
    let own = headers.get(ADMIN_TOKEN_HEADER).map(|v| v.as_bytes());
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    if own.is_some_and(|given| same(given, token.as_bytes())) {
        req.headers_mut().remove(ADMIN_TOKEN_HEADER);
    } else if bearer.is_some_and(|given| same(given, token.as_bytes())) {
        req.headers_mut().remove(http::header::AUTHORIZATION);
    } else {
        let mut res = (
            StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({
                "error": "the admin listener needs its admin_token: Authorization: Bearer TOKEN or Keyward-Admin-Token: TOKEN"
            })),
        )
            .into_response();
        res.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer realm=\"keyward-admin\""),
        );
        return res;
    }
    next.run(req).await
}

/// Constant-time equality, so that a token is not guessed byte by byte from timings.
fn same(given: &[u8], token: &[u8]) -> bool {
    given.len() == token.len() && given.iter().zip(token).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

async fn key_state(
    State(state): State<AdminState>,
    Path((route, key)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let keys = state.shared.0.load().keys.clone();
    let (status, body) = keys.lookup(&route, &key, headers, uri).await;
    (status, axum::Json(body))
}

async fn forget_key(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((route, key)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let caller = caller(peer, &headers);
    let keys = state.shared.0.load().keys.clone();
    let (status, body) = keys.forget(&route, &key, headers, uri, &caller).await;
    (status, axum::Json(body))
}

/// Who sent an admin request, for audit lines: the peer, and the operator's own name if
/// the request gives one (`Keyward-Operator`, printable ASCII, at most 64 bytes).
fn caller(peer: SocketAddr, headers: &HeaderMap) -> String {
    let operator = headers
        .get("keyward-operator")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
    match operator {
        Some(name) => format!("{peer} ({name})"),
        None => peer.to_string(),
    }
}

async fn quota_state(
    State(state): State<AdminState>,
    Path((route, key)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let quotas = state.shared.0.load().quotas.clone();
    let (status, body) = quotas.peek(&route, &key, headers, uri).await;
    (status, axum::Json(body))
}

async fn reload(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let Some(reloader) = state.reloader else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({ "error": "this sidecar cannot reload" })),
        );
    };
    let (status, body) = reloader
        .reload_answer(&format!("POST /reload from {peer}"))
        .await;
    (status, axum::Json(body))
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, String) {
    answer((state.ready.0)().await)
}

fn answer(ready: Ready) -> (StatusCode, String) {
    match (ready.ok, ready.warning) {
        (true, None) => (StatusCode::OK, "ready\n".to_owned()),
        (true, Some(warning)) => (StatusCode::OK, format!("ready\nwarning: {warning}\n")),
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "store not answering\n".to_owned(),
        ),
    }
}

/// `/metrics`: Prometheus text, or OpenMetrics (with exemplars) when the scrape's
/// `Accept` asks for `application/openmetrics-text`.
async fn render_metrics(
    State(state): State<AdminState>,
    headers: HeaderMap,
) -> ([(http::HeaderName, &'static str); 1], String) {
    let accept = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = crate::prometheus::Format::negotiate(accept);
    (
        [(http::header::CONTENT_TYPE, format.content_type())],
        state.metrics.render(format),
    )
}

async fn hot_keys(State(state): State<AdminState>) -> axum::Json<crate::hotkeys::Report> {
    axum::Json(state.metrics.hot_keys().report())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use keyward_tests::redis_kit::RedisServer;

    async fn body(ready: Readiness) -> (StatusCode, String) {
        answer((ready.0)().await)
    }

    #[tokio::test]
    async fn readyz_warns_when_redis_may_evict_coordination_records() {
        let evicting = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
        let store = keyward::RedisStore::new(evicting.url()).unwrap();
        let (status, text) = body(Readiness::redis(store)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "still ready: a warning, not an outage"
        );
        assert!(
            text.contains("maxmemory-policy is allkeys-lru, not noeviction"),
            "{text}"
        );

        let safe = RedisServer::start();
        let store = keyward::RedisStore::new(safe.url()).unwrap();
        assert_eq!(
            body(Readiness::redis(store)).await,
            (StatusCode::OK, "ready\n".to_owned())
        );
    }
}

//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/hotkeys` (top key hashes per
//! route, see [`crate::hotkeys`]), `/keys/{route}/{key}` (an idempotency record's state,
//! see [`crate::keys`]). Bound to loopback by default.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use http::{HeaderMap, Uri};

use crate::keys::KeyLookup;
use crate::metrics::Metrics;

type Check = dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync;

/// Whether the store answers, for `/readyz`.
#[derive(Clone)]
pub struct Readiness(Arc<Check>);

impl Readiness {
    /// The memory store always answers.
    pub fn always() -> Self {
        Readiness(Arc::new(|| Box::pin(async { true })))
    }

    /// Ready while Redis answers a PING within the store timeout.
    pub fn redis(store: keyward::RedisStore) -> Self {
        Readiness(Arc::new(move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.is_ok() })
        }))
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    ready: Readiness,
    keys: KeyLookup,
}

pub fn router(metrics: Metrics, ready: Readiness, keys: KeyLookup) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/hotkeys", get(hot_keys))
        .route("/keys/{route}/{*key}", get(key_state))
        .with_state(AdminState {
            metrics,
            ready,
            keys,
        })
}

async fn key_state(
    State(state): State<AdminState>,
    Path((route, key)): Path<(String, String)>,
    headers: HeaderMap,
    uri: Uri,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    let (status, body) = state.keys.lookup(&route, &key, headers, uri).await;
    (status, axum::Json(body))
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if (state.ready.0)().await {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "store not answering\n")
    }
}

async fn render_metrics(
    State(state): State<AdminState>,
) -> ([(http::HeaderName, &'static str); 1], String) {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn hot_keys(State(state): State<AdminState>) -> axum::Json<crate::hotkeys::Report> {
    axum::Json(state.metrics.hot_keys().report())
}

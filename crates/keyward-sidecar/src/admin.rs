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

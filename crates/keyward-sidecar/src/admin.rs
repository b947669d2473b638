//! The admin listener: `/healthz`, `/readyz`, `/metrics`. Bound to loopback by default.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
}

pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { metrics })
}

/// Ready when the store answers. The memory store always does.
async fn ready() -> (StatusCode, &'static str) {
    (StatusCode::OK, "ready\n")
}

async fn render_metrics(
    State(state): State<AdminState>,
) -> ([(http::HeaderName, &'static str); 1], String) {
    (
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

//! A payments API whose `POST /payments` is idempotent: a retried request with the same
//! `Idempotency-Key` charges once and gets the first response back.
//!
//! ```sh
//! cargo run --release -p examples --example payments      # listens on 127.0.0.1:3000
//! ```
//! See the README section "Try it" for the curl lines.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use keyward::{IdempotencyLayer, MemoryStore};
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Ledger {
    charges: Arc<AtomicU64>,
}

#[derive(serde::Deserialize)]
struct Options {
    /// Simulated processing time, to try concurrent duplicates.
    #[serde(default)]
    delay_ms: u64,
}

async fn create_payment(
    State(ledger): State<Ledger>,
    Query(options): Query<Options>,
    Json(payment): Json<Value>,
) -> (StatusCode, Json<Value>) {
    tokio::time::sleep(Duration::from_millis(options.delay_ms.min(30_000))).await;
    let n = ledger.charges.fetch_add(1, Ordering::SeqCst) + 1;
    tracing::info!(charge = n, "card charged");
    let body =
        json!({ "id": format!("ch_{n}"), "amount": payment["amount"], "status": "succeeded" });
    (StatusCode::CREATED, Json(body))
}

fn app(store: MemoryStore) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .route_layer(
            IdempotencyLayer::new(store)
                .route("payments")
                .required(true),
        )
        .with_state(Ledger::default())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,keyward=debug".into()),
        )
        .init();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("payments example listening on http://{addr}");
    axum::serve(listener, app(MemoryStore::new()))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

//! The orders gRPC service on 127.0.0.1:50051 (or `PORT`), state in memory.
//!
//! ```sh
//! cargo run --release -p grpc-orders
//! ```
//! See the README section "gRPC (tonic)" for grpcurl lines.

use std::net::SocketAddr;

use grpc_orders::{OrderBook, serve};
use keyward::MemoryStore;
use keyward::core::gcra::Quota;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,keyward=debug".into()),
        )
        .init();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(50051);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("orders gRPC example listening on {addr}");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    // 60 calls per minute per x-api-key.
    let quota = Quota::per_minute(60)?;
    serve(
        listener,
        OrderBook::default(),
        MemoryStore::new(),
        quota,
        shutdown,
    )
    .await?;
    Ok(())
}

//! A tonic gRPC orders service behind keyward's layers.
//!
//! - Every call: [`QuotaLayer`] per `x-api-key` metadata, as a tonic server layer
//!   (`Server::builder().layer(..)`). Over the quota: `RESOURCE_EXHAUSTED` with
//!   `retry-after` and RateLimit metadata.
//! - `CreateOrder`: [`IdempotencyLayer`], key from `idempotency-key` metadata (required),
//!   scoped by `x-api-key`. A retry gets the first answer with `idempotent-replayed: true`;
//!   the same key with another message: `FAILED_PRECONDITION`; while the first call runs:
//!   `ABORTED`; missing or malformed key: `INVALID_ARGUMENT`.
//! - `UpdateOrder`: [`PerKeySerialLayer`] keyed by `order-id` metadata: updates of one
//!   order never overlap.
//!
//! keyward's layers are plain Tower layers over `http` requests, so they sit on a tonic
//! server like on any other. Per-method layers wrap the generated `OrdersServer` on the
//! method's path in tonic's [`Routes`] (an axum router): its request body type converts
//! from bytes, which `IdempotencyLayer` needs to hand the buffered message on.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::HeaderName;
use keyward::core::gcra::Quota;
use keyward::core::store::{IdempotencyStore, QuotaStore, SerialStore};
use keyward::{IdempotencyLayer, KeySpec, PerKeySerialLayer, QuotaLayer};
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tower::ServiceBuilder;

/// The generated messages, client and server.
pub mod pb {
    tonic::include_proto!("orders.v1");
}

pub use pb::orders_server::{Orders, OrdersServer};
use pb::{CreateOrderRequest, Order, UpdateOrderRequest};

/// Metadata naming the caller: the quota key and the idempotency scope.
pub const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Metadata naming the order an update is for: the serial key.
pub const ORDER_ID: HeaderName = HeaderName::from_static("order-id");
/// The HTTP/2 path of `CreateOrder`.
pub const CREATE_ORDER: &str = "/orders.v1.Orders/CreateOrder";
/// The HTTP/2 path of `UpdateOrder`.
pub const UPDATE_ORDER: &str = "/orders.v1.Orders/UpdateOrder";

/// The service's routes: `CreateOrder` idempotent, `UpdateOrder` serial per order, any
/// other method straight to `orders`.
pub fn routes<T, St>(orders: T, store: St) -> Routes
where
    T: Orders,
    St: IdempotencyStore + SerialStore,
{
    let server = OrdersServer::new(orders);
    let create = ServiceBuilder::new()
        .layer(
            IdempotencyLayer::new(store.clone())
                .route("create_order")
                .required(true)
                .scope(KeySpec::Header(API_KEY)),
        )
        .service(server.clone());
    let update = ServiceBuilder::new()
        .layer(
            PerKeySerialLayer::new(store)
                .route("update_order")
                .key(KeySpec::Header(ORDER_ID)),
        )
        .service(server.clone());
    Routes::new(server)
        .into_axum_router()
        .route_service(CREATE_ORDER, create)
        .route_service(UPDATE_ORDER, update)
        .into()
}

/// The quota over every method: `quota` per `x-api-key` (calls without it are not
/// counted). A tonic server layer: `Server::builder().layer(quota_layer(..))`.
pub fn quota_layer<St: QuotaStore>(store: St, quota: Quota) -> QuotaLayer<St> {
    QuotaLayer::new(store, quota)
        .route("orders")
        .key(KeySpec::Header(API_KEY))
}

/// Serves `orders` on `listener` until `shutdown` resolves, with a quota of `quota` per
/// `x-api-key` over every method (calls without the metadata are not counted).
pub async fn serve<T, St>(
    listener: TcpListener,
    orders: T,
    store: St,
    quota: Quota,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error>
where
    T: Orders,
    St: IdempotencyStore + SerialStore + QuotaStore,
{
    Server::builder()
        .layer(quota_layer(store.clone(), quota))
        .add_routes(routes(orders, store))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// An in-memory order book.
#[derive(Clone, Debug, Default)]
pub struct OrderBook {
    orders: Arc<Mutex<HashMap<String, Order>>>,
    next_id: Arc<AtomicU64>,
}

impl OrderBook {
    /// How many orders were created: a retried `CreateOrder` does not add one.
    pub fn created(&self) -> u64 {
        self.next_id.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl Orders for OrderBook {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let CreateOrderRequest { item, quantity } = request.into_inner();
        if quantity == 0 {
            // Deterministic: stored, so a retry with the same key gets it again.
            return Err(Status::invalid_argument("quantity must be at least 1"));
        }
        let id = format!("ord_{}", self.next_id.fetch_add(1, Ordering::SeqCst) + 1);
        let order = Order {
            id: id.clone(),
            item,
            quantity,
            version: 1,
        };
        tracing::info!(%id, "order created");
        let mut orders = self.orders.lock().unwrap_or_else(PoisonError::into_inner);
        orders.insert(id, order.clone());
        Ok(Response::new(order))
    }

    async fn update_order(
        &self,
        request: Request<UpdateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        // The serial key is the metadata; it must name the order the message updates.
        let serialised_on = request.metadata().get(ORDER_ID.as_str()).cloned();
        let UpdateOrderRequest { order_id, quantity } = request.into_inner();
        if serialised_on.as_ref().and_then(|v| v.to_str().ok()) != Some(order_id.as_str()) {
            return Err(Status::invalid_argument(
                "order-id metadata must name the order in the message",
            ));
        }
        let mut orders = self.orders.lock().unwrap_or_else(PoisonError::into_inner);
        let order = orders
            .get_mut(&order_id)
            .ok_or_else(|| Status::not_found(format!("no order {order_id}")))?;
        order.quantity = quantity;
        order.version += 1;
        Ok(Response::new(order.clone()))
    }
}

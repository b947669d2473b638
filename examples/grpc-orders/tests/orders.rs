//! The orders service over real HTTP/2 with a real tonic client: keyward's rejections
//! arrive as gRPC statuses, unary calls replay, updates of one order never overlap.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use grpc_orders::pb::orders_client::OrdersClient;
use grpc_orders::pb::{CreateOrderRequest, Order, UpdateOrderRequest};
use grpc_orders::{OrderBook, Orders, quota_layer, routes};
use keyward::MemoryStore;
use keyward::core::gcra::Quota;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};

/// A handler the tests script through the message: `item` "unavailable" and "invalid"
/// fail with that status, "hold" waits for a permit; updates always wait for one.
struct Scripted {
    creates: AtomicUsize,
    updates: AtomicUsize,
    inside: AtomicUsize,
    max_inside: AtomicUsize,
    entered: mpsc::UnboundedSender<()>,
    release: Semaphore,
}

impl Scripted {
    /// Announces that a held call is inside the handler, then waits for a permit.
    async fn hold(&self) {
        self.entered.send(()).unwrap();
        self.release.acquire().await.unwrap().forget();
    }
}

/// What the server holds; the test keeps a clone to script and inspect it.
#[derive(Clone)]
struct Handler(Arc<Scripted>);

impl std::ops::Deref for Handler {
    type Target = Scripted;
    fn deref(&self) -> &Scripted {
        &self.0
    }
}

#[tonic::async_trait]
impl Orders for Handler {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let n = self.creates.fetch_add(1, Ordering::SeqCst) + 1;
        let CreateOrderRequest { item, quantity } = request.into_inner();
        match item.as_str() {
            "unavailable" => return Err(Status::unavailable("inventory offline")),
            "invalid" => return Err(Status::invalid_argument(format!("bad item (call {n})"))),
            "hold" => self.hold().await,
            _ => {}
        }
        Ok(Response::new(Order {
            id: format!("ord_{n}"),
            item,
            quantity,
            version: 1,
        }))
    }

    async fn update_order(
        &self,
        request: Request<UpdateOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let inside = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inside.fetch_max(inside, Ordering::SeqCst);
        let n = self.updates.fetch_add(1, Ordering::SeqCst) + 1;
        self.hold().await;
        self.inside.fetch_sub(1, Ordering::SeqCst);
        let UpdateOrderRequest { order_id, quantity } = request.into_inner();
        Ok(Response::new(Order {
            id: order_id,
            item: String::new(),
            quantity,
            version: n as u64,
        }))
    }
}

/// The example's layers (quota over the server, idempotency and serial per method) on a
/// free loopback port, plus a counter of calls that reached the server.
struct Harness {
    client: OrdersClient<Channel>,
    arrivals: watch::Receiver<usize>,
}

async fn start<T: Orders>(orders: T, quota: Quota) -> Harness {
    let (listener, addr) = listen().await;
    let store = MemoryStore::new();
    let (arrived, arrivals) = watch::channel(0);
    let arrived = Arc::new(arrived);
    let count = tower::layer::layer_fn(move |inner| {
        let arrived = arrived.clone();
        tower::ServiceExt::map_request(inner, move |req: http::Request<tonic::body::Body>| {
            arrived.send_modify(|n| *n += 1);
            req
        })
    });
    let server = Server::builder()
        .layer(count)
        .layer(quota_layer(store.clone(), quota))
        .add_routes(routes(orders, store))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    let client = connect(addr).await;
    Harness { client, arrivals }
}

impl Harness {
    async fn create(
        &self,
        key: Option<&str>,
        item: &str,
        quantity: u32,
    ) -> Result<Response<Order>, Status> {
        self.client
            .clone()
            .create_order(create(key, item, quantity))
            .await
    }
}

async fn listen() -> (tokio::net::TcpListener, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

async fn connect(addr: std::net::SocketAddr) -> OrdersClient<Channel> {
    OrdersClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn scripted() -> (Handler, mpsc::UnboundedReceiver<()>) {
    let (entered, rx) = mpsc::unbounded_channel();
    let scripted = Handler(Arc::new(Scripted {
        creates: AtomicUsize::new(0),
        updates: AtomicUsize::new(0),
        inside: AtomicUsize::new(0),
        max_inside: AtomicUsize::new(0),
        entered,
        release: Semaphore::new(0),
    }));
    (scripted, rx)
}

fn plenty() -> Quota {
    Quota::per_minute(1000).unwrap()
}

fn create(key: Option<&str>, item: &str, quantity: u32) -> Request<CreateOrderRequest> {
    let mut req = Request::new(CreateOrderRequest {
        item: item.to_owned(),
        quantity,
    });
    req.metadata_mut()
        .insert("x-api-key", "acme".parse().unwrap());
    if let Some(key) = key {
        req.metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
    }
    req
}

fn update(order_id: &str, quantity: u32) -> Request<UpdateOrderRequest> {
    let mut req = Request::new(UpdateOrderRequest {
        order_id: order_id.to_owned(),
        quantity,
    });
    req.metadata_mut()
        .insert("order-id", order_id.parse().unwrap());
    req
}

fn replayed<T>(res: &Response<T>) -> bool {
    res.metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test]
async fn a_retried_create_order_is_replayed_and_runs_once() {
    let book = OrderBook::default();
    let h = start(book.clone(), plenty()).await;
    let first = h.create(Some("k-1"), "tea", 2).await.unwrap();
    let retry = h.create(Some("k-1"), "tea", 2).await.unwrap();
    assert!(!replayed(&first));
    assert!(
        replayed(&retry),
        "replays carry idempotent-replayed metadata"
    );
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(first.get_ref().id, "ord_1");
    assert_eq!(book.created(), 1, "the handler ran once");
    // Another key is another order.
    let other = h.create(Some("k-2"), "tea", 2).await.unwrap();
    assert_eq!(other.get_ref().id, "ord_2");
}

#[tokio::test]
async fn the_same_key_with_another_message_is_failed_precondition() {
    let h = start(OrderBook::default(), plenty()).await;
    h.create(Some("k"), "tea", 2).await.unwrap();
    let status = h.create(Some("k"), "tea", 3).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains("different method, path, query or body"),
        "{}",
        status.message()
    );
    assert_eq!(
        status.metadata().get("keyward-problem-type").unwrap(),
        "https://keyward.dev/problems/idempotency-key-reused"
    );
}

#[tokio::test]
async fn a_duplicate_while_the_first_runs_is_aborted() {
    let (handler, mut entered) = scripted();
    let h = start(handler.clone(), plenty()).await;
    let mut client = h.client.clone();
    let first =
        tokio::spawn(async move { client.create_order(create(Some("k"), "hold", 1)).await });
    entered.recv().await.unwrap();
    let status = h.create(Some("k"), "hold", 1).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.metadata().get("retry-after").unwrap(), "1");
    handler.release.add_permits(1);
    let first = first.await.unwrap().unwrap();
    let again = h.create(Some("k"), "hold", 1).await.unwrap();
    assert_eq!(again.get_ref(), first.get_ref());
    assert!(replayed(&again));
    assert_eq!(handler.creates.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn missing_or_invalid_keys_are_invalid_argument() {
    let book = OrderBook::default();
    let h = start(book.clone(), plenty()).await;
    let missing = h.create(None, "tea", 1).await.unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(
        missing.message().contains("Idempotency-Key required"),
        "{}",
        missing.message()
    );
    let too_long = "k".repeat(256);
    let invalid = h.create(Some(&too_long), "tea", 1).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        !invalid.message().contains(&too_long),
        "the raw key is never echoed"
    );
    assert_eq!(book.created(), 0);
}

#[tokio::test]
async fn an_exhausted_quota_is_resource_exhausted() {
    let h = start(
        OrderBook::default(),
        Quota::new(2, std::time::Duration::from_secs(3600)).unwrap(),
    )
    .await;
    for key in ["a", "b"] {
        let ok = h.create(Some(key), "tea", 1).await.unwrap();
        assert!(ok.metadata().contains_key("ratelimit"));
    }
    let status = h.create(Some("c"), "tea", 1).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().starts_with("Quota exceeded"),
        "{}",
        status.message()
    );
    let retry_after: u64 = status
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1800).contains(&retry_after), "{retry_after}");
    assert!(status.metadata().contains_key("ratelimit-policy"));
}

#[tokio::test]
async fn updates_of_one_order_never_overlap() {
    const CALLS: usize = 5;
    let (handler, mut entered) = scripted();
    let h = start(handler.clone(), plenty()).await;
    let calls: Vec<_> = (0..CALLS as u32)
        .map(|i| {
            let mut client = h.client.clone();
            tokio::spawn(async move { client.update_order(update("ord_7", i)).await })
        })
        .collect();
    // Every call has reached the server, so any that the serial layer failed to hold back
    // would now be inside the handler next to the held one.
    let mut arrivals = h.arrivals.clone();
    arrivals.wait_for(|n| *n >= CALLS).await.unwrap();
    for _ in 0..CALLS {
        entered.recv().await.unwrap();
        assert_eq!(handler.inside.load(Ordering::SeqCst), 1);
        handler.release.add_permits(1);
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert_eq!(handler.max_inside.load(Ordering::SeqCst), 1);
    assert_eq!(handler.updates.load(Ordering::SeqCst), CALLS);
}

#[tokio::test]
async fn unavailable_releases_the_key_and_invalid_argument_is_replayed() {
    let (handler, _entered) = scripted();
    let h = start(handler.clone(), plenty()).await;
    for expected in 1..=2 {
        let status = h.create(Some("u"), "unavailable", 1).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            handler.creates.load(Ordering::SeqCst),
            expected,
            "the retry executes again"
        );
    }
    let first = h.create(Some("i"), "invalid", 1).await.unwrap_err();
    let replay = h.create(Some("i"), "invalid", 1).await.unwrap_err();
    assert_eq!(
        handler.creates.load(Ordering::SeqCst),
        3,
        "stored, not run again"
    );
    assert_eq!(replay.code(), Code::InvalidArgument);
    assert_eq!(replay.message(), first.message());
    assert_eq!(replay.message(), "bad item (call 3)");
    assert_eq!(
        replay.metadata().get("idempotent-replayed").unwrap(),
        "true"
    );
}

#[tokio::test]
async fn the_example_server_answers_on_its_listener() {
    let (listener, addr) = listen().await;
    let book = OrderBook::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(grpc_orders::serve(
        listener,
        book.clone(),
        MemoryStore::new(),
        plenty(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut client = connect(addr).await;
    let order = client
        .create_order(create(Some("k"), "tea", 1))
        .await
        .unwrap();
    let updated = client
        .update_order(update(&order.get_ref().id, 5))
        .await
        .unwrap();
    assert_eq!(
        (updated.get_ref().quantity, updated.get_ref().version),
        (5, 2)
    );
    let mismatch = client.update_order({
        let mut req = update(&order.get_ref().id, 6);
        req.metadata_mut()
            .insert("order-id", "ord_9".parse().unwrap());
        req
    });
    assert_eq!(mismatch.await.unwrap_err().code(), Code::InvalidArgument);
    drop(client);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// The whole server behind `IdempotencyLayer` as a tonic server layer: tonic's request
/// body cannot be rebuilt from bytes, axum's (which tonic's router uses) can.
#[tokio::test]
async fn idempotency_works_as_a_server_layer_with_a_body_conversion() {
    let (listener, addr) = listen().await;
    let book = OrderBook::default();
    let layers = tower::ServiceBuilder::new()
        .map_request(|req: http::Request<tonic::body::Body>| req.map(axum::body::Body::new))
        .layer(keyward::IdempotencyLayer::new(MemoryStore::new()));
    let server = Server::builder()
        .layer(layers)
        .add_service(grpc_orders::OrdersServer::new(book.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);
    let mut client = connect(addr).await;
    let first = client
        .create_order(create(Some("k"), "tea", 1))
        .await
        .unwrap();
    let retry = client
        .create_order(create(Some("k"), "tea", 1))
        .await
        .unwrap();
    assert!(replayed(&retry));
    assert_eq!(retry.get_ref(), first.get_ref());
    assert_eq!(book.created(), 1);
}

//! The test kit for keyward's black-box tests (see `tests/*.rs`): a counting upstream
//! service and helpers to drive layers with plain `http` requests.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;

/// The request and response body of test services.
pub type TestBody = Full<Bytes>;

/// An upstream that counts its calls and can be held: while the gate is closed, every
/// call waits inside the handler (in flight) until [`Upstream::open`].
#[derive(Clone, Debug)]
pub struct Upstream {
    calls: Arc<AtomicUsize>,
    entered: Arc<Semaphore>,
    gate: Arc<Semaphore>,
    status: StatusCode,
}

impl Upstream {
    /// An upstream answering `status`, gate open.
    pub fn new(status: StatusCode) -> Self {
        Upstream {
            calls: Arc::new(AtomicUsize::new(0)),
            entered: Arc::new(Semaphore::new(0)),
            gate: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
            status,
        }
    }

    /// An upstream answering `status` whose calls wait until [`Upstream::open`].
    pub fn held(status: StatusCode) -> Self {
        Upstream {
            gate: Arc::new(Semaphore::new(0)),
            ..Upstream::new(status)
        }
    }

    /// Lets every waiting and future call through.
    pub fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    /// Waits until `n` calls have entered the handler.
    pub async fn entered(&self, n: u32) {
        let permits = self.entered.acquire_many(n).await.expect("never closed");
        permits.forget();
    }

    /// How many times the handler ran.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Handles one request: counts it, waits at the gate, answers
    /// `"{method} {path} call={n} body={body}"` with a `Set-Cookie` and a `Date`.
    pub async fn handle(self, req: Request<TestBody>) -> Result<Response<TestBody>, Infallible> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.entered.add_permits(1);
        let _pass = self.gate.acquire().await.expect("never closed");
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let token = parts
            .extensions
            .get::<keyward::FencingToken>()
            .map(|t| t.get())
            .unwrap_or(0);
        let text = format!(
            "{} {} call={n} token={token} body={}",
            parts.method,
            parts.uri.path(),
            String::from_utf8_lossy(&body)
        );
        Ok(Response::builder()
            .status(self.status)
            .header("content-type", "text/plain")
            .header("set-cookie", format!("session={n}"))
            .header("date", "Mon, 23 Nov 2026 00:00:00 GMT")
            .header("x-call", n.to_string())
            .body(Full::new(Bytes::from(text)))
            .expect("valid response"))
    }
}

/// A request with an optional idempotency key, principal and body.
pub fn post(
    path: &str,
    key: Option<&str>,
    principal: Option<&str>,
    body: &str,
) -> Request<TestBody> {
    let mut builder = Request::post(path);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    if let Some(principal) = principal {
        builder = builder.header("authorization", principal);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("valid request")
}

/// A response read to the end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Status.
    pub status: StatusCode,
    /// Whether `Idempotent-Replayed: true` was set.
    pub replayed: bool,
    /// Whether `Set-Cookie` was present.
    pub set_cookie: bool,
    /// `Retry-After`, if any.
    pub retry_after: Option<String>,
    /// Body text.
    pub body: String,
}

/// Reads a response to the end.
pub async fn seen<B>(res: Response<B>) -> Seen
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body readable").to_bytes();
    Seen {
        status: parts.status,
        replayed: parts
            .headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true"),
        set_cookie: parts.headers.contains_key("set-cookie"),
        retry_after: parts
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub mod redis_kit;

use std::time::Duration;

use keyward::core::store::{IdempotencyStore, QuotaStore, SerialStore, SingleFlightStore};
use keyward::{MemoryStore, RedisStore};
use redis_kit::RedisServer;

/// A store backend the shared behaviour suites run on. Timed tests are written in
/// [`Backend::unit`]s: on memory the clock is paused (a unit is 1 s and costs nothing), on
/// Redis time is real (a unit is 100 ms, so a suite stays within seconds).
pub trait Backend: Send + Sync + 'static {
    /// The store under test.
    type Store: IdempotencyStore + QuotaStore + SerialStore + SingleFlightStore + std::fmt::Debug;
    /// A handle on the backend's store; instances share state like processes sharing one
    /// Redis.
    fn store(&self) -> Self::Store;
    /// Another instance on the same backend, as a second process would have it (its own
    /// connections on Redis; a clone of the one store in memory).
    fn instance(&self) -> Self::Store;
    /// One time unit of the timed tests.
    fn unit(&self) -> Duration;
    /// How much later than its deadline an expiry may be observed (zero on paused time).
    fn slack(&self) -> Duration;
}

/// The in-memory store; run its timed tests with `start_paused = true`.
#[derive(Debug, Default)]
pub struct Memory {
    store: MemoryStore,
}

impl Backend for Memory {
    type Store = MemoryStore;
    fn store(&self) -> MemoryStore {
        self.store.clone()
    }
    fn instance(&self) -> MemoryStore {
        self.store.clone()
    }
    fn unit(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn slack(&self) -> Duration {
        Duration::ZERO
    }
}

/// `Backend` for a fixture with a `store: RedisStore` field; `$instance` (a closure on the
/// fixture) makes another instance.
macro_rules! redis_backend {
    ($fixture:ident, $instance:expr) => {
        impl Backend for $fixture {
            type Store = RedisStore;
            fn store(&self) -> RedisStore {
                self.store.clone()
            }
            fn instance(&self) -> RedisStore {
                ($instance)(self)
            }
            fn unit(&self) -> Duration {
                Duration::from_millis(100)
            }
            fn slack(&self) -> Duration {
                Duration::from_millis(150)
            }
        }
    };
}

/// A `RedisStore` on a `redis-server` of its own (real time; never pause the clock: the
/// store's timeouts would fire while Redis answers).
#[derive(Debug)]
pub struct Redis {
    /// The server; tests may kill and restart it.
    pub server: RedisServer,
    store: RedisStore,
}

impl Redis {
    /// Starts a server and builds a store on it (inside a tokio runtime).
    pub fn start() -> Self {
        let server = RedisServer::start();
        let store = Self::store_on(&server, "keyward:");
        Redis { server, store }
    }

    /// A store on `server` with `prefix` and a test-friendly timeout.
    pub fn store_on(server: &RedisServer, prefix: &str) -> RedisStore {
        RedisStore::builder()
            .url(server.url())
            .prefix(prefix)
            .timeout(Duration::from_millis(250))
            .build()
            .expect("store builds")
    }
}

redis_backend!(Redis, |r: &Redis| Redis::store_on(
    &r.server,
    r.store.prefix()
));

/// A `RedisStore` in cluster mode on the binary's shared three-node Redis Cluster.
#[derive(Debug)]
pub struct RedisClusterBackend {
    /// The cluster (shared by the tests of one binary).
    pub cluster: &'static redis_kit::RedisCluster,
    store: RedisStore,
}

impl RedisClusterBackend {
    /// A cluster-mode store with a prefix of its own on the shared cluster.
    pub fn start() -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cluster = redis_kit::RedisCluster::shared();
        let store = Self::store_on(cluster, &format!("t{n}:"));
        RedisClusterBackend { cluster, store }
    }

    /// A cluster-mode store with `prefix` seeded with every node.
    pub fn store_on(cluster: &redis_kit::RedisCluster, prefix: &str) -> RedisStore {
        let mut builder = RedisStore::builder()
            .cluster(true)
            .prefix(prefix)
            .timeout(Duration::from_millis(250));
        for url in cluster.urls() {
            builder = builder.url(url);
        }
        builder.build().expect("store builds")
    }
}

redis_backend!(RedisClusterBackend, |r: &RedisClusterBackend| {
    RedisClusterBackend::store_on(r.cluster, r.store.prefix())
});

/// Spawns `future` and returns once it has been polled once: a request future polled
/// once has joined (or started) its flight or queue, so tests order requests
/// deterministically.
pub async fn spawn_joined<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (polled, was_polled) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn(async move {
        let mut future = std::pin::pin!(future);
        let mut polled = Some(polled);
        std::future::poll_fn(|cx| {
            let poll = future.as_mut().poll(cx);
            if let Some(polled) = polled.take() {
                let _ = polled.send(());
            }
            poll
        })
        .await
    });
    let _ = was_polled.await;
    handle
}

/// Instantiates generic test bodies, `async fn test<B: Backend>(b: B)` in the calling
/// file, once per backend: modules `memory` (paused time), `redis` and `redis_cluster`
/// (a server or cluster of their own per test, real time).
#[macro_export]
macro_rules! backend_suite {
    ($($test:ident),* $(,)?) => {
        $crate::backend_suite!(@on memory, $crate::Memory::default(), true; $($test),*);
        $crate::backend_suite!(@on redis, $crate::Redis::start(), false; $($test),*);
        $crate::backend_suite!(@on redis_cluster, $crate::RedisClusterBackend::start(), false; $($test),*);
    };
    (@on $name:ident, $backend:expr, $paused:tt; $($test:ident),*) => {
        mod $name {
            $(
                #[tokio::test(start_paused = $paused)]
                async fn $test() {
                    super::$test($backend).await
                }
            )*
        }
    };
}

/// A store with a short timeout on `server`, for outage tests.
pub fn store_with_timeout(server: &RedisServer, timeout: Duration) -> RedisStore {
    RedisStore::builder()
        .url(server.url())
        .timeout(timeout)
        .build()
        .expect("store builds")
}

/// Asserts that `call` (a store decision while Redis is down) fails with a timeout or
/// unavailable store error within `timeout` plus 100 ms, three times in a row.
pub async fn fails_within<T, F, Fut>(timeout: Duration, mut call: F)
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, keyward::core::store::StoreError>>,
{
    use keyward::core::store::StoreError;
    for attempt in 0..3 {
        let started = tokio::time::Instant::now();
        let result = call().await;
        assert!(
            matches!(
                result,
                Err(StoreError::Timeout(_) | StoreError::Unavailable(_))
            ),
            "attempt {attempt}: {result:?}"
        );
        let took = started.elapsed();
        assert!(
            took < timeout + Duration::from_millis(100),
            "attempt {attempt} took {took:?}"
        );
    }
}

/// Asserts that `delta` (commands Redis ran, see [`redis_kit::command_delta`]) is one
/// round trip: exactly one `EVALSHA`, everything else among `from_scripts` (Redis counts
/// the commands a script runs too).
pub fn assert_one_script(delta: &[(String, u64)], from_scripts: &[&str]) {
    assert_eq!(
        delta.iter().find(|(name, _)| name == "evalsha"),
        Some(&("evalsha".to_owned(), 1)),
        "{delta:?}"
    );
    for (name, _) in delta {
        assert!(
            name == "evalsha" || from_scripts.contains(&name.as_str()),
            "a second round trip: {name} in {delta:?}"
        );
    }
}

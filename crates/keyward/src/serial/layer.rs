use std::fmt;

use keyward_core::KeySpec;
use keyward_core::store::SerialLimits;
use tower_layer::Layer;

use super::PerKeySerialService;
use super::hold::HoldLimit;
use crate::defaults::{DEFAULT_SERIAL_MAX_QUEUE, DEFAULT_SERIAL_MAX_WAIT};
use crate::pipeline::{KeyedLayer, LayerKind, LayerSettings, common_layer_methods, debug_layer};

/// Runs at most one request per key at a time, in arrival order. See the [module
/// docs](crate::serial) for the behaviour and an example.
pub struct PerKeySerialLayer<St, K = KeySpec> {
    pub(crate) core: KeyedLayer<St, K, SerialSettings>,
}

/// What only the serial layer has.
#[derive(Clone, Debug)]
pub(crate) struct SerialSettings {
    pub(crate) limits: SerialLimits,
    /// Longest a holder keeps the key (`None`: until its response is over).
    pub(crate) max_hold: Option<HoldLimit>,
}

impl LayerSettings for SerialSettings {
    const KIND: LayerKind = LayerKind::Serial;
}

impl<St> PerKeySerialLayer<St> {
    /// A layer coordinating through `store`, with route `"default"`, key `method_uri`,
    /// `max_wait` 5 s and `max_queue` 64, failing closed (503) when the store fails.
    /// Most routes want another key, e.g. a resource id:
    /// `.key("path:id".parse::<KeySpec>()?)`. Keys are never scoped by principal: the
    /// point is mutual exclusion on a resource, which must hold whoever calls.
    pub fn new(store: St) -> Self {
        let own = SerialSettings {
            limits: SerialLimits {
                max_wait: DEFAULT_SERIAL_MAX_WAIT,
                max_queue: DEFAULT_SERIAL_MAX_QUEUE,
                permits: 1,
            },
            max_hold: None,
        };
        PerKeySerialLayer {
            core: KeyedLayer::new(store, KeySpec::MethodUri, None, own),
        }
    }
}

impl<St, K: Clone> PerKeySerialLayer<St, K> {
    common_layer_methods!();

    fn with(self, change: impl FnOnce(&mut SerialSettings)) -> Self {
        PerKeySerialLayer {
            core: self.core.with(|_, own| change(own)),
        }
    }

    /// How the key is taken from a request: a [`KeySpec`] (default `method_uri`).
    /// Requests without a key pass through uncoordinated.
    pub fn key(self, spec: KeySpec) -> PerKeySerialLayer<St, KeySpec> {
        let name = spec.to_string().into();
        PerKeySerialLayer {
            core: self.core.with_key(spec, name),
        }
    }

    /// Takes the key with any [`KeyExtractor`](keyward_core::KeyExtractor), such as a
    /// closure.
    pub fn key_extractor<K2>(self, extractor: K2) -> PerKeySerialLayer<St, K2> {
        PerKeySerialLayer {
            core: self.core.with_key(extractor, "custom key extractor".into()),
        }
    }

    /// Longest wait for the key's turn; past it the request gets 503
    /// `serial-wait-timeout`. Default 5 s.
    pub fn max_wait(self, max_wait: std::time::Duration) -> Self {
        self.with(|own| own.limits.max_wait = max_wait)
    }

    /// Longest a request keeps the key (default: until its response body ends or is
    /// dropped, however long that takes). After it the key goes to the next request even
    /// if this one is still running or its client still has not read the response: a
    /// client that never reads cannot hold a key for as long as its connection lives.
    /// Mutual exclusion then rests on the fencing token: the next holder's is higher, and
    /// a resource that refuses lower tokens refuses the stale holder's writes.
    pub fn max_hold(self, max_hold: std::time::Duration) -> Self {
        self.with(|own| own.max_hold = Some(HoldLimit::new(max_hold)))
    }

    /// How many requests with one key may be inside the service at once (default 1:
    /// mutual exclusion). With `N`, the layer is a per-key semaphore (per tenant, per
    /// upstream account): the first `N` go in, the next ones wait in arrival order for
    /// one of them to finish, within `max_wait` and `max_queue` as with one permit; on
    /// Redis across every instance, and a crashed holder's permit comes back when its
    /// lease runs out. Every holder still gets a fencing token, rising per key, but with
    /// `N > 1` tokens order writes rather than exclude them. 0 is taken as 1.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http::{Request, Response, StatusCode};
    /// use http_body_util::Full;
    /// use keyward::{KeySpec, MemoryStore, PerKeySerialLayer};
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// let layer = PerKeySerialLayer::new(MemoryStore::new())
    ///     .key("header:x-tenant".parse::<KeySpec>().unwrap())
    ///     .permits(2)
    ///     .max_wait(Duration::from_millis(20));
    /// let svc = layer.layer(service_fn(|_req: Request<Full<Bytes>>| async {
    ///     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
    /// }));
    /// let request = || Request::get("/").header("x-tenant", "t1").body(Full::default()).unwrap();
    ///
    /// // Two responses of tenant t1 are open (their bodies hold the permits)...
    /// let first = svc.clone().oneshot(request()).await.unwrap();
    /// let second = svc.clone().oneshot(request()).await.unwrap();
    /// assert_eq!(second.status(), StatusCode::OK);
    /// // ...so a third waits, and gives up after max_wait.
    /// let third = svc.clone().oneshot(request()).await.unwrap();
    /// assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    /// drop(first);
    /// assert_eq!(svc.clone().oneshot(request()).await.unwrap().status(), StatusCode::OK);
    /// # });
    /// ```
    pub fn permits(self, permits: u32) -> Self {
        self.with(|own| own.limits.permits = permits.max(1))
    }

    /// Most requests waiting for one key (the one inside the service not counted); one
    /// more gets 503 `serial-queue-full` at once. Default 64; 0 means never wait.
    pub fn max_queue(self, max_queue: usize) -> Self {
        self.with(|own| own.limits.max_queue = max_queue)
    }
}

impl<St: Clone, K> Clone for PerKeySerialLayer<St, K> {
    fn clone(&self) -> Self {
        PerKeySerialLayer {
            core: self.core.clone(),
        }
    }
}

impl<St, K> fmt::Debug for PerKeySerialLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.core.config;
        debug_layer("PerKeySerialLayer", config, f, |out| {
            out.field("max_wait", &config.own.limits.max_wait)
                .field("max_queue", &config.own.limits.max_queue)
                .field("permits", &config.own.limits.permits)
                .field(
                    "max_hold",
                    &config.own.max_hold.as_ref().map(HoldLimit::max_hold),
                );
        })
    }
}

impl<S, St: Clone, K> Layer<S> for PerKeySerialLayer<St, K> {
    type Service = PerKeySerialService<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        PerKeySerialService {
            core: self.core.service(inner),
        }
    }
}

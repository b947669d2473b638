use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, ACCEPT_ENCODING, HOST, HeaderName, RANGE};
use http::{Method, Request};
use keyward_core::{Key, KeyError, KeySpec};
use tower_layer::Layer;

use super::flight::FlightTable;
use super::service::{SingleFlightService, keyed_on};
use crate::defaults::{DEFAULT_SINGLE_FLIGHT_LEASE, DEFAULT_SINGLE_FLIGHT_MAX_BODY};
use crate::pipeline::{KeyedLayer, LayerKind, LayerSettings, common_layer_methods, debug_layer};

/// What followers do when the leader of their flight fails: its inner call returned an
/// error, panicked or its body failed, or (across instances) the remote leader failed or
/// did not land within its lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LeaderFailure {
    /// One of the followers becomes the leader of a new flight with its own request; the
    /// others follow it. A follower whose leaders keep failing gives up with 502 after a
    /// few elections.
    #[default]
    Elect,
    /// Followers answer 502 problem `coalesced-leader-failed` at once.
    BadGateway,
}

/// Coalesces concurrent identical requests into one inner call: see the
/// [module docs](crate::single_flight).
pub struct SingleFlightLayer<St, K = KeySpec> {
    pub(crate) core: KeyedLayer<St, K, SingleFlightSettings>,
}

/// What only the single-flight layer has.
#[derive(Clone)]
pub(crate) struct SingleFlightSettings {
    pub(crate) methods: Vec<Method>,
    /// Request headers whose values are part of every key, besides the authority.
    pub(crate) vary: Vec<HeaderName>,
    pub(crate) max_body: usize,
    pub(crate) lease: Duration,
    /// How long requests after a landing still get its response (zero: not at all).
    pub(crate) reuse_for: Duration,
    pub(crate) on_leader_failure: LeaderFailure,
}

impl LayerSettings for SingleFlightSettings {
    const KIND: LayerKind = LayerKind::SingleFlight;
    const NAMES_KEY_AS_EXTRACTED: bool = true;

    /// Requests share a response only if they ask for the same representation of the
    /// same resource: the authority and the `vary` headers join whatever the extractor
    /// found, each part length-prefixed so that no two different requests spell the same
    /// key.
    fn accept_key<B>(&self, key: Key, _key_name: &str, req: &Request<B>) -> Result<Key, KeyError> {
        let authority = req
            .uri()
            .authority()
            .map(|authority| authority.as_str())
            .or_else(|| req.headers().get(HOST).and_then(|host| host.to_str().ok()))
            .unwrap_or_default();
        let mut spelled = String::with_capacity(key.as_str().len() + authority.len() + 32);
        push_part(&mut spelled, key.as_str().as_bytes());
        // The authority without case: `Host: A.example` is `a.example`.
        let _ = write!(spelled, "{}:", authority.len());
        spelled.extend(authority.chars().map(|c| c.to_ascii_lowercase()));
        for name in &self.vary {
            let values = req.headers().get_all(name);
            // How many values, then each: an absent header and an empty one differ.
            let _ = write!(spelled, "{};", values.iter().count());
            for value in values {
                push_part(&mut spelled, value.as_bytes());
            }
        }
        Ok(Key::from(spelled))
    }
}

/// Appends `part` as `{len}:{part}` (`len` in bytes, so the part's end is known
/// whatever it contains; bytes that are not UTF-8 are replaced, the length kept).
fn push_part(out: &mut String, part: &[u8]) {
    let _ = write!(out, "{}:{}", part.len(), String::from_utf8_lossy(part));
}

/// The request headers that select a representation, part of every single-flight key
/// by default: `Accept`, `Accept-Encoding` and `Range`.
pub const DEFAULT_VARY: [HeaderName; 3] = [ACCEPT, ACCEPT_ENCODING, RANGE];

/// Default `max_body`: 8 MiB (also [`DEFAULT_SINGLE_FLIGHT_MAX_BODY`]).
pub const DEFAULT_MAX_BODY: usize = DEFAULT_SINGLE_FLIGHT_MAX_BODY;
/// Default lease of a flight in the store: 30 s.
#[deprecated(
    note = "named apart from other leases now: use `keyward::defaults::DEFAULT_SINGLE_FLIGHT_LEASE`"
)]
pub const DEFAULT_LEASE: Duration = DEFAULT_SINGLE_FLIGHT_LEASE;

impl<St> SingleFlightLayer<St> {
    /// Coalesces GET and HEAD requests by `method_uri`, scoped by the `Authorization`
    /// header, on route `"default"`, failing closed (503) when the store fails.
    pub fn new(store: St) -> Self {
        let own = SingleFlightSettings {
            methods: vec![Method::GET, Method::HEAD],
            vary: DEFAULT_VARY.to_vec(),
            max_body: DEFAULT_SINGLE_FLIGHT_MAX_BODY,
            lease: DEFAULT_SINGLE_FLIGHT_LEASE,
            reuse_for: Duration::ZERO,
            on_leader_failure: LeaderFailure::default(),
        };
        let scope = Some(KeySpec::Header(http::header::AUTHORIZATION));
        SingleFlightLayer {
            core: KeyedLayer::new(store, KeySpec::MethodUri, scope, own),
        }
    }
}

impl<St, K: Clone> SingleFlightLayer<St, K> {
    common_layer_methods!(scoped);

    fn with(self, change: impl FnOnce(&mut SingleFlightSettings)) -> Self {
        SingleFlightLayer {
            core: self.core.with(|_, own| change(own)),
        }
    }

    /// How the coalescing key is taken from a request (default `method_uri`), e.g.
    /// `header:X-Report-Id`. Requests without a key pass through.
    pub fn key(self, spec: KeySpec) -> SingleFlightLayer<St, KeySpec> {
        let name = spec.to_string().into();
        SingleFlightLayer {
            core: self.core.with_key(spec, name),
        }
    }

    /// Takes the coalescing key with any [`KeyExtractor`](keyward_core::KeyExtractor),
    /// such as a closure.
    pub fn key_extractor<K2>(self, extractor: K2) -> SingleFlightLayer<St, K2> {
        SingleFlightLayer {
            core: self.core.with_key(extractor, "custom key extractor".into()),
        }
    }

    /// Request headers whose values must match for two requests to share a response
    /// (default [`DEFAULT_VARY`]: `Accept`, `Accept-Encoding`, `Range`), on top of the key
    /// and the authority (`Host`), which always must.
    pub fn vary(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let vary = headers.into_iter().collect();
        self.with(|own| own.vary = vary)
    }

    /// The methods that coalesce (default GET and HEAD); other requests pass through.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        let methods = methods.into_iter().collect();
        self.with(|own| own.methods = methods)
    }

    /// The largest response body copied to followers (default 8 MiB). A larger response
    /// streams through to the request that drove the flight, and each follower makes its
    /// own inner call.
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|own| own.max_body = bytes)
    }

    /// How long a flight is led in the store before another instance may take over
    /// (default 30 s), and the longest a follower on another instance waits for it.
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|own| own.lease = lease)
    }

    /// Requests arriving up to `reuse_for` after a flight landed get its response too,
    /// without a call (micro-caching: a burst of identical reads reaches the inner
    /// service once per `reuse_for`), marked `Keyward-Coalesced: true` and with an `Age`
    /// header (seconds since it landed, plus any `Age` it came with). Default zero: only
    /// concurrent requests share a response. Still never across principals, hosts or
    /// representations (the key), never a `private`/`no-store` response or one varying on
    /// other headers; and a 5xx or a response to revalidate (`no-cache`, `max-age=0`) is
    /// shared with the requests that waited for it but not kept. The response is kept in
    /// the store (a `MemoryStore` bounds them in bytes, Redis expires them), so instances
    /// sharing a Redis reuse each other's landings; a store that cannot keep responses
    /// only coalesces.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use keyward::{MemoryStore, SingleFlightLayer};
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// let calls = Arc::new(AtomicUsize::new(0));
    /// let counter = calls.clone();
    /// let svc = SingleFlightLayer::new(MemoryStore::new())
    ///     .route("prices")
    ///     .reuse_for(Duration::from_secs(1))
    ///     .layer(service_fn(move |_req: http::Request<()>| {
    ///         counter.fetch_add(1, Ordering::SeqCst);
    ///         async { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("42")))) }
    ///     }));
    /// let get = || svc.clone().oneshot(http::Request::get("/prices/eur").body(()).unwrap());
    /// let first = get().await.unwrap();
    /// assert!(first.headers().get("keyward-coalesced").is_none());
    /// tokio::time::advance(Duration::from_millis(500)).await;
    /// let soon_after = get().await.unwrap();
    /// assert_eq!(soon_after.headers()["keyward-coalesced"], "true");
    /// assert_eq!(soon_after.headers()["age"], "0");
    /// assert_eq!(calls.load(Ordering::SeqCst), 1);
    /// tokio::time::advance(Duration::from_millis(600)).await;
    /// let later = get().await.unwrap();
    /// assert!(later.headers().get("keyward-coalesced").is_none());
    /// assert_eq!(calls.load(Ordering::SeqCst), 2);
    /// # }
    /// ```
    pub fn reuse_for(self, reuse_for: Duration) -> Self {
        self.with(|own| own.reuse_for = reuse_for)
    }

    /// What followers do when their leader fails (default [`LeaderFailure::Elect`]).
    pub fn on_leader_failure(self, policy: LeaderFailure) -> Self {
        self.with(|own| own.on_leader_failure = policy)
    }
}

impl<St: Clone, K> Clone for SingleFlightLayer<St, K> {
    fn clone(&self) -> Self {
        SingleFlightLayer {
            core: self.core.clone(),
        }
    }
}

impl<St, K> fmt::Debug for SingleFlightLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.core.config;
        debug_layer("SingleFlightLayer", config, f, |out| {
            let own = &config.own;
            out.field("scope", &config.common.scope)
                .field("methods", &own.methods)
                .field("vary", &own.vary)
                .field("max_body", &own.max_body)
                .field("lease", &own.lease)
                .field("reuse_for", &own.reuse_for)
                .field("on_leader_failure", &own.on_leader_failure);
        })
    }
}

impl<S, St: Clone, K> Layer<S> for SingleFlightLayer<St, K> {
    type Service = SingleFlightService<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        SingleFlightService {
            keyed_on: keyed_on(&self.core.config),
            core: self.core.service(inner),
            table: Arc::new(FlightTable::new()),
        }
    }
}

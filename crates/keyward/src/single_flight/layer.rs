use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, ACCEPT_ENCODING, HOST, HeaderName, RANGE};
use http::{Method, Request};
use keyward_core::{Key, KeyError, KeySpec};
use tower_layer::Layer;

use super::flight::FlightTable;
use super::service::SingleFlightService;
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
        push_part(&mut spelled, authority.to_ascii_lowercase().as_bytes());
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
                .field("on_leader_failure", &own.on_leader_failure);
        })
    }
}

impl<S, St: Clone, K> Layer<S> for SingleFlightLayer<St, K> {
    type Service = SingleFlightService<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        SingleFlightService {
            core: self.core.service(inner),
            table: Arc::new(FlightTable::new()),
        }
    }
}

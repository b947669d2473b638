use std::fmt;
use std::time::Duration;

use http::{HeaderName, Request};
use keyward_core::json::JsonIdentity;
use keyward_core::store::{IdempotencyStore, RecordState, StoreError};
use keyward_core::{Key, KeyError, KeyExtractor, KeySpec, ScopedKey, parse_idempotency_key};
use tower_layer::Layer;

use super::service::IdempotencyService;
use crate::defaults::{
    DEFAULT_IDEMPOTENCY_LEASE, DEFAULT_IDEMPOTENCY_MAX_BODY, DEFAULT_IDEMPOTENCY_MAX_RESPONSE,
    DEFAULT_IDEMPOTENCY_RECORD_RETRY, DEFAULT_IDEMPOTENCY_TTL,
};
use crate::pipeline::{KeyedLayer, LayerKind, LayerSettings, common_layer_methods, debug_layer};

/// What a duplicate does while the first request with its key is still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnInFlight {
    /// Answer 409 with `Retry-After` at once.
    Reject,
    /// Wait up to this long for the first request to finish, then replay its response
    /// (or run, if it was released); still in flight after that: 409.
    Wait(Duration),
}

/// Which response headers are stored for replay. `Set-Cookie`, `Authorization`, `Date`
/// and hop-by-hop headers are never stored, whatever this says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ReplayHeaders {
    /// Every header but the never-stored ones.
    #[default]
    AllSafe,
    /// Only these headers (and never the never-stored ones).
    Only(Vec<HeaderName>),
}

/// What only the idempotency layer has.
#[derive(Clone)]
pub(crate) struct IdempotencySettings {
    pub(crate) required: bool,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) on_in_flight: OnInFlight,
    pub(crate) max_body: usize,
    pub(crate) max_response: usize,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    /// `None`: the body is part of the fingerprint byte for byte.
    pub(crate) fingerprint_json: Option<JsonIdentity>,
    pub(crate) replay_headers: ReplayHeaders,
    pub(crate) store_server_errors: bool,
    pub(crate) record_retry: Duration,
}

impl LayerSettings for IdempotencySettings {
    const KIND: LayerKind = LayerKind::Idempotency;

    /// Whatever the extractor, the value must be a valid `Idempotency-Key`: an
    /// sf-string or a bare token of 1..=255 visible ASCII characters.
    fn accept_key<B>(&self, key: Key, key_name: &str, _req: &Request<B>) -> Result<Key, KeyError> {
        parse_idempotency_key(key.as_str())
            .map(Key::from)
            .map_err(|error| KeyError::Invalid {
                spec: key_name.to_owned(),
                reason: error.to_string(),
            })
    }
}

/// Applies [`IdempotencyService`]: a retried request with the same `Idempotency-Key`
/// takes effect once and gets the first response replayed. See the [module
/// docs](crate::idempotency) for the full behaviour.
pub struct IdempotencyLayer<St, K = KeySpec> {
    pub(crate) core: KeyedLayer<St, K, IdempotencySettings>,
}

/// The `Idempotency-Key` header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set to `true` on replayed responses.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

impl<St> IdempotencyLayer<St> {
    /// A layer on `store` with the defaults: key from `Idempotency-Key`, scoped by
    /// `Authorization`, not required, TTL 24 h ([`DEFAULT_IDEMPOTENCY_TTL`]), lease 30 s,
    /// duplicates in flight rejected with 409, request bodies up to 1 MiB, responses
    /// stored up to 1 MiB, failing closed (503) when the store fails.
    pub fn new(store: St) -> Self {
        let own = IdempotencySettings {
            required: false,
            ttl: DEFAULT_IDEMPOTENCY_TTL,
            lease: DEFAULT_IDEMPOTENCY_LEASE,
            on_in_flight: OnInFlight::Reject,
            max_body: DEFAULT_IDEMPOTENCY_MAX_BODY,
            max_response: DEFAULT_IDEMPOTENCY_MAX_RESPONSE,
            fingerprint_headers: Vec::new(),
            fingerprint_json: None,
            replay_headers: ReplayHeaders::AllSafe,
            store_server_errors: false,
            record_retry: DEFAULT_IDEMPOTENCY_RECORD_RETRY,
        };
        let key = KeySpec::Header(IDEMPOTENCY_KEY);
        let scope = Some(KeySpec::Header(http::header::AUTHORIZATION));
        IdempotencyLayer {
            core: KeyedLayer::new(store, key, scope, own),
        }
    }
}

impl<St, K: Clone> IdempotencyLayer<St, K> {
    common_layer_methods!(scoped);

    fn with(self, change: impl FnOnce(&mut IdempotencySettings)) -> Self {
        IdempotencyLayer {
            core: self.core.with(|_, own| change(own)),
        }
    }

    /// Takes the key from another [`KeySpec`] than `header:Idempotency-Key`. The value
    /// must still be a valid key (1..=255 visible ASCII characters, or an sf-string).
    pub fn key(self, spec: KeySpec) -> IdempotencyLayer<St, KeySpec> {
        let name = spec.to_string().into();
        IdempotencyLayer {
            core: self.core.with_key(spec, name),
        }
    }

    /// Takes the key with any [`KeyExtractor`](keyward_core::KeyExtractor), such as a
    /// closure. The value must still be a valid key.
    pub fn key_extractor<K2>(self, extractor: K2) -> IdempotencyLayer<St, K2> {
        IdempotencyLayer {
            core: self.core.with_key(extractor, "custom key extractor".into()),
        }
    }

    /// Requests without a key get 400 (default: they pass through uncoordinated).
    pub fn required(self, required: bool) -> Self {
        self.with(|own| own.required = required)
    }

    /// How long a completed response is replayed (default 24 h).
    pub fn ttl(self, ttl: Duration) -> Self {
        self.with(|own| own.ttl = ttl)
    }

    /// How long a claim lasts without renewal (default 30 s). It is renewed every third of
    /// the lease while the handler runs, so it only runs out when the process dies or
    /// stalls.
    pub fn lease(self, lease: Duration) -> Self {
        self.with(|own| own.lease = lease.max(Duration::from_millis(3)))
    }

    /// What a duplicate does while the first is in flight (default [`OnInFlight::Reject`]).
    pub fn on_in_flight(self, policy: OnInFlight) -> Self {
        self.with(|own| own.on_in_flight = policy)
    }

    /// Largest request body, in bytes (default 1 MiB); larger ones get 413 before
    /// anything is claimed.
    pub fn max_body(self, bytes: usize) -> Self {
        self.with(|own| own.max_body = bytes)
    }

    /// Largest response body stored for replay (default 1 MiB); a larger response is
    /// passed through and the key released.
    pub fn max_response(self, bytes: usize) -> Self {
        self.with(|own| own.max_response = bytes)
    }

    /// Request headers that are part of the fingerprint besides method, path, query and
    /// body (e.g. `Content-Type`).
    pub fn fingerprint_headers(self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        let headers = headers.into_iter().collect();
        self.with(|own| own.fingerprint_headers = headers)
    }

    /// Fingerprints the body by its meaning as JSON rather than its bytes: the canonical
    /// form of RFC 8785 (JCS), so a retry re-serialized with its members in another order,
    /// other whitespace or other spellings of its numbers (`10.0`, `1E1`) is the same
    /// request, minus the members `identity` excludes (a client timestamp) or only the
    /// ones it includes. A non-empty body that is not I-JSON (not JSON, or a member name
    /// twice in one object) is refused with 400 `request-body-not-json` before anything
    /// is claimed; an empty body counts as no body.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use keyward::core::json::{JsonIdentity, JsonPointer};
    /// use keyward::{IdempotencyLayer, MemoryStore};
    /// use tower::{Layer, ServiceExt, service_fn};
    ///
    /// let identity = JsonIdentity::canonical().exclude(JsonPointer::parse("/sent_at").unwrap());
    /// let service = IdempotencyLayer::new(MemoryStore::new())
    ///     .route("transfers")
    ///     .fingerprint_json(identity)
    ///     .layer(service_fn(|_req: http::Request<Full<Bytes>>| async {
    ///         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("done"))))
    ///     }));
    /// let send = |body: &'static str| {
    ///     let req = http::Request::post("/transfers").header("idempotency-key", "t-1");
    ///     service.clone().oneshot(req.body(Full::new(Bytes::from(body))).unwrap())
    /// };
    /// send(r#"{"amount": 10.0, "to": "bob", "sent_at": 1}"#).await.unwrap();
    /// let retry = send(r#"{"to":"bob","amount":10,"sent_at":2}"#).await.unwrap();
    /// assert_eq!(retry.headers()["idempotent-replayed"], "true");
    /// let other = send(r#"{"to":"bob","amount":11}"#).await.unwrap();
    /// assert_eq!(other.status(), 422);
    /// let garbled = http::Request::post("/transfers").header("idempotency-key", "t-2");
    /// let garbled = service.clone().oneshot(garbled.body(Full::new(Bytes::from("{oops"))).unwrap()).await.unwrap();
    /// assert_eq!(garbled.status(), 400);
    /// # }
    /// ```
    pub fn fingerprint_json(self, identity: JsonIdentity) -> Self {
        self.with(|own| own.fingerprint_json = Some(identity))
    }

    /// Which response headers are stored for replay.
    pub fn replay_headers(self, policy: ReplayHeaders) -> Self {
        self.with(|own| own.replay_headers = policy)
    }

    /// Store 5xx, 408, 425 and 429 responses too, instead of releasing the key so the
    /// client may retry (default: release).
    pub fn store_server_errors(self, store: bool) -> Self {
        self.with(|own| own.store_server_errors = store)
    }

    /// How long a response whose record the store refuses (an outage, a failover) is
    /// retried before the key is released (default 5 s,
    /// [`DEFAULT_IDEMPOTENCY_RECORD_RETRY`]). Meanwhile the claim is renewed, so
    /// duplicates wait or get 409 instead of running again, and this response waits too;
    /// past it the key is released and a retry of the key runs again.
    pub fn record_retry(self, window: Duration) -> Self {
        self.with(|own| own.record_retry = window)
    }
}

impl<St: Clone, K> Clone for IdempotencyLayer<St, K> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            core: self.core.clone(),
        }
    }
}

impl<St, K> fmt::Debug for IdempotencyLayer<St, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.core.config;
        debug_layer("IdempotencyLayer", config, f, |out| {
            let own = &config.own;
            out.field("required", &own.required)
                .field("ttl", &own.ttl)
                .field("lease", &own.lease)
                .field("on_in_flight", &own.on_in_flight);
        })
    }
}

/// Why a look-up for support tools ([`IdempotencyLayer::inspect`], [`IdempotencyLayer::forget`],
/// [`QuotaLayer::peek`](crate::QuotaLayer::peek)) could not answer.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The request's key (or principal) is unusable; the message names the spec, never
    /// the raw key.
    #[error("unusable key: {0}")]
    Key(String),
    /// The store did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl<St: IdempotencyStore, K> IdempotencyLayer<St, K> {
    /// What the store holds for the key `req` carries, exactly as this layer would
    /// coordinate it (route, principal scope, parsed `Idempotency-Key`): "did it already
    /// happen?" for support tools. `None` when `req` carries no key. Changes nothing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use keyward::core::store::RecordState;
    /// use keyward::{IdempotencyLayer, MemoryStore};
    ///
    /// let layer = IdempotencyLayer::new(MemoryStore::new()).route("payments");
    /// let lookup = http::Request::get("/").header("idempotency-key", "k-1").body(()).unwrap();
    /// let (key, state) = layer.inspect(&lookup).await.unwrap().unwrap();
    /// assert_eq!(state, RecordState::Absent);
    /// assert_eq!(key.route(), "payments");
    /// # }
    /// ```
    pub async fn inspect<B>(
        &self,
        req: &Request<B>,
    ) -> Result<Option<(ScopedKey, RecordState)>, InspectError>
    where
        K: KeyExtractor<B>,
    {
        let config = &self.core.config;
        let found = config.find_key(req);
        let Some(found) = found.map_err(|error| InspectError::Key(error.to_string()))? else {
            return Ok(None);
        };
        let key = config.scoped(&found, false);
        let state = self.core.store.inspect(&key).await?;
        Ok(Some((key, state)))
    }

    /// Forgets the key `req` carries, found exactly as [`IdempotencyLayer::inspect`]
    /// finds it, and answers what the store held: a completed record is deleted (the
    /// next request with the key executes again); an in-flight claim is freed and
    /// fenced (its holder's response is not stored, and the next holder gets a higher
    /// fencing token). `None` when `req` carries no key. For support tools.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use keyward::core::store::{ClaimOutcome, Completion, IdempotencyStore, RecordState};
    /// use keyward::{IdempotencyLayer, MemoryStore};
    /// use std::time::Duration;
    ///
    /// let store = MemoryStore::new();
    /// let layer = IdempotencyLayer::new(store.clone()).route("payments").unscoped();
    /// let lookup = http::Request::get("/").header("idempotency-key", "k-1").body(()).unwrap();
    /// let (key, _) = layer.inspect(&lookup).await.unwrap().unwrap();
    /// // A request holds the key and is stuck.
    /// let fp = keyward::core::store::Fingerprint([0; 32]);
    /// let lease = Duration::from_secs(30);
    /// let ClaimOutcome::Claimed(stuck) = store.claim(&key, &fp, lease).await.unwrap() else { panic!() };
    ///
    /// let (_, was) = layer.forget(&lookup).await.unwrap().unwrap();
    /// assert!(matches!(was, RecordState::InFlight { holder, .. } if holder == stuck));
    /// // A retry runs again, with a higher token; the stuck holder can no longer complete.
    /// let ClaimOutcome::Claimed(retry) = store.claim(&key, &fp, lease).await.unwrap() else { panic!() };
    /// assert!(retry > stuck);
    /// let response = keyward::core::store::StoredResponse {
    ///     status: http::StatusCode::OK, headers: Default::default(), body: "late".into(), trailers: None,
    /// };
    /// let late = store.complete(&key, stuck, &fp, response, Duration::from_secs(60)).await.unwrap();
    /// assert_eq!(late, Completion::Fenced);
    /// # }
    /// ```
    pub async fn forget<B>(
        &self,
        req: &Request<B>,
    ) -> Result<Option<(ScopedKey, RecordState)>, InspectError>
    where
        K: KeyExtractor<B>,
    {
        let config = &self.core.config;
        let found = config.find_key(req);
        let Some(found) = found.map_err(|error| InspectError::Key(error.to_string()))? else {
            return Ok(None);
        };
        let key = config.scoped(&found, false);
        let state = self.core.store.forget(&key).await?;
        Ok(Some((key, state)))
    }
}

impl<S, St: Clone, K> Layer<S> for IdempotencyLayer<St, K> {
    type Service = IdempotencyService<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            core: self.core.service(inner),
        }
    }
}

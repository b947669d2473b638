//! `GET /keys/{route}/{key}` on the admin listener: what the store holds for an
//! idempotency key — "did it already happen?" for support staff; `DELETE` on the same
//! path forgets it (fenced, audited); `GET /quota/{route}/{key}` ([`QuotaLookup`]) what
//! a quota key has left.
//!
//! The look-up runs the route's own [`IdempotencyLayer`](keyward::IdempotencyLayer) (built by
//! [`crate::stack::idempotency_layer`]), so the key is parsed and scoped exactly as the
//! request was: a route scoped by `header:Authorization` needs the customer's
//! `Authorization` header on the look-up too, a route scoped by `query:tenant` its query
//! parameter. The answer names the key by its hash only. Routes whose key is not a header
//! (e.g. `path:id`) cannot be looked up this way (400).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use keyward::core::store::{IdempotencyStore, QuotaStore, RecordState};
use keyward::idempotency::InspectError;
use keyward::quota::QuotaPeek;
use keyward_core::{KeySpec, PeerAddr, ScopedKey};
use opentelemetry::metrics::Meter;
use serde_json::{Value, json};

use crate::config::Config;
use crate::stack;

/// The environment variable that holds the deployment's key hash secret.
pub const SECRET_ENV: &str = "KEYWARD_KEY_HASH_SECRET";

/// Where this process's key hash secret came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretSource {
    /// `KEYWARD_KEY_HASH_SECRET`: hashes are stable across restarts and instances that
    /// share it, and `keyward hash` computes them.
    Env,
    /// Random at start-up: hashes mean something only within this process's lifetime
    /// (map a key through `GET /keys/...` on this instance).
    Random,
}

/// The deployment's secret from the environment, if set (and not empty).
pub fn secret_from_env() -> Option<Vec<u8>> {
    std::env::var_os(SECRET_ENV)
        .map(|value| value.into_encoded_bytes())
        .filter(|value| !value.is_empty())
}

/// Keys every key hash that leaves this process (logs, spans, metrics, `/hotkeys`,
/// `/keys`) with the deployment's secret, or with 32 random bytes if none is set: a
/// SHA-256 prefix of a guessable key (an IP, a tenant id) is reversed by hashing guesses.
pub fn install_key_hash_secret() -> Result<SecretSource, String> {
    let (secret, source) = match secret_from_env() {
        Some(secret) => (secret, SecretSource::Env),
        None => (random_secret()?, SecretSource::Random),
    };
    keyward_core::set_key_hash_secret(&secret).map_err(|err| err.to_string())?;
    Ok(source)
}

fn random_secret() -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut secret = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut secret))
        .map_err(|err| {
            format!("cannot read /dev/urandom for a key hash secret ({err}); set {SECRET_ENV}")
        })?;
    Ok(secret)
}

type Found = Result<Option<(ScopedKey, RecordState)>, InspectError>;
type Inspect =
    dyn Fn(Request<()>, Action) -> Pin<Box<dyn Future<Output = Found> + Send>> + Send + Sync;

/// What an admin request does to an idempotency key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// `GET /keys/...`: report, change nothing.
    Inspect,
    /// `DELETE /keys/...`: forget (fenced), report what was there.
    Forget,
}

struct RouteLookup {
    inspect: Arc<Inspect>,
    /// The header the route takes its key from, if it does.
    key_header: Option<HeaderName>,
    key_spec: String,
    ttl: Duration,
}

/// Look-ups for every route with an idempotency layer.
#[derive(Clone)]
pub struct KeyLookup {
    routes: Arc<HashMap<String, RouteLookup>>,
}

impl KeyLookup {
    /// Look-ups on `store` for the routes of `config` (`meter` only builds the layers;
    /// look-ups record no decisions).
    pub fn new<St: IdempotencyStore>(config: &Config, store: &St, meter: &Meter) -> Self {
        let routes = config
            .routes
            .iter()
            .filter_map(|route| {
                let idem = route.idempotency.as_ref()?;
                let layer = stack::idempotency_layer(route, idem, store, &config.store, meter);
                let inspect: Arc<Inspect> = Arc::new(move |req: Request<()>, action| {
                    let layer = layer.clone();
                    Box::pin(async move {
                        match action {
                            Action::Inspect => layer.inspect(&req).await,
                            Action::Forget => layer.forget(&req).await,
                        }
                    })
                });
                let key_header = match &idem.key {
                    KeySpec::Header(name) => Some(name.clone()),
                    _ => None,
                };
                let lookup = RouteLookup {
                    inspect,
                    key_header,
                    key_spec: idem.key.to_string(),
                    ttl: idem.ttl,
                };
                Some((route.name.clone(), lookup))
            })
            .collect();
        KeyLookup {
            routes: Arc::new(routes),
        }
    }

    /// Looks up `key` on `route`, with the admin request's headers and query standing in
    /// for the original request's (for the principal scope).
    pub async fn lookup(
        &self,
        route: &str,
        key: &str,
        headers: HeaderMap,
        uri: Uri,
    ) -> (StatusCode, Value) {
        match self.run(route, key, headers, uri, Action::Inspect).await {
            Ok((lookup, key, state)) => (StatusCode::OK, describe(route, &key, &state, lookup.ttl)),
            Err(answer) => answer,
        }
    }

    /// Forgets `key` on `route`, found exactly as [`KeyLookup::lookup`] finds it: a
    /// completed record is deleted, an in-flight claim freed and fenced. Logs an audit
    /// line naming the key by its hash and the caller.
    pub async fn forget(
        &self,
        route: &str,
        key: &str,
        headers: HeaderMap,
        uri: Uri,
        caller: &str,
    ) -> (StatusCode, Value) {
        match self.run(route, key, headers, uri, Action::Forget).await {
            Ok((lookup, key, state)) => {
                let was = describe(route, &key, &state, lookup.ttl);
                let state_name = was["state"].as_str().unwrap_or("absent").to_owned();
                tracing::warn!(
                    target: "keyward::audit",
                    audit = "forget",
                    route,
                    key_hash = %key.key_hash(),
                    was = %state_name,
                    caller,
                    "admin: idempotency key forgotten"
                );
                let body = json!({
                    "route": route,
                    "key_hash": key.key_hash().as_str(),
                    "forgotten": state_name != "absent",
                    "was": was,
                });
                (StatusCode::OK, body)
            }
            Err(answer) => answer,
        }
    }

    async fn run(
        &self,
        route: &str,
        key: &str,
        headers: HeaderMap,
        uri: Uri,
        action: Action,
    ) -> Result<(&RouteLookup, ScopedKey, RecordState), (StatusCode, Value)> {
        let Some(lookup) = self.routes.get(route) else {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("no route named {route:?} has an idempotency layer"),
            ));
        };
        let Some(header) = &lookup.key_header else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "route {route:?} takes its key from {}; /keys looks up header keys only",
                    lookup.key_spec
                ),
            ));
        };
        let req = stand_in(headers, uri, header, key)?;
        match (lookup.inspect)(req, action).await {
            Ok(Some((key, state))) => Ok((lookup, key, state)),
            Ok(None) => Err(error(StatusCode::BAD_REQUEST, "no key given".to_owned())),
            Err(InspectError::Key(why)) => Err(error(StatusCode::BAD_REQUEST, why)),
            Err(InspectError::Store(why)) => {
                Err(error(StatusCode::SERVICE_UNAVAILABLE, why.to_string()))
            }
        }
    }
}

/// The request an admin look-up stands in for: the admin request's headers and query
/// (for the principal scope), with `key` in `header`.
fn stand_in(
    headers: HeaderMap,
    uri: Uri,
    header: &HeaderName,
    key: &str,
) -> Result<Request<()>, (StatusCode, Value)> {
    let Ok(value) = HeaderValue::from_str(key) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the key is not a valid header value".to_owned(),
        ));
    };
    let mut req = Request::new(());
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req.headers_mut().insert(header.clone(), value);
    Ok(req)
}

type Peeked = Result<Option<QuotaPeek>, InspectError>;
type Peek = dyn Fn(Request<()>) -> Pin<Box<dyn Future<Output = Peeked> + Send>> + Send + Sync;

struct QuotaRoute {
    peek: Arc<Peek>,
    key: KeySpec,
}

/// `GET /quota/{route}/{key}`: what a quota key has left, found exactly as the route's
/// quota layer finds it (scope, per-key overrides), without taking anything.
#[derive(Clone)]
pub struct QuotaLookup {
    routes: Arc<HashMap<String, QuotaRoute>>,
}

impl QuotaLookup {
    /// Look-ups on `store` for the routes of `config` with a quota.
    pub fn new<St: QuotaStore>(config: &Config, store: &St, meter: &Meter) -> Self {
        let routes = config
            .routes
            .iter()
            .filter_map(|route| {
                // A route with several quotas is looked up in its first (outermost) one.
                let quota = route.quotas.first()?;
                let layer = stack::quota_layer(route, quota, store, &config.store, meter);
                let peek: Arc<Peek> = Arc::new(move |req: Request<()>| {
                    let layer = layer.clone();
                    Box::pin(async move { layer.peek(&req).await })
                });
                let lookup = QuotaRoute {
                    peek,
                    key: quota.key.clone(),
                };
                Some((route.name.clone(), lookup))
            })
            .collect();
        QuotaLookup {
            routes: Arc::new(routes),
        }
    }

    /// Peeks at `key` on `route`: a header key's value, or for `peer_ip` keys the
    /// client's IP address (IPv6 cut to the route's prefix, like requests).
    pub async fn peek(
        &self,
        route: &str,
        key: &str,
        headers: HeaderMap,
        uri: Uri,
    ) -> (StatusCode, Value) {
        let Some(lookup) = self.routes.get(route) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("no route named {route:?} has a quota"),
            );
        };
        let req = match &lookup.key {
            KeySpec::Header(name) => stand_in(headers, uri, name, key),
            KeySpec::PeerIp | KeySpec::PeerIpPrefix { .. } => match key.parse::<IpAddr>() {
                Ok(ip) => {
                    let mut req = Request::new(());
                    *req.uri_mut() = uri;
                    *req.headers_mut() = headers;
                    req.extensions_mut()
                        .insert(PeerAddr(SocketAddr::new(ip, 0)));
                    Ok(req)
                }
                Err(_) => Err(error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "route {route:?} keys its quota on the client IP; the key must be an IP address"
                    ),
                )),
            },
            other => Err(error(
                StatusCode::BAD_REQUEST,
                format!(
                    "route {route:?} takes its quota key from {other}; /quota looks up header and peer_ip keys only"
                ),
            )),
        };
        let req = match req {
            Ok(req) => req,
            Err(answer) => return answer,
        };
        match (lookup.peek)(req).await {
            Ok(Some(peek)) => {
                let d = peek.decision;
                let q = peek.quota;
                (
                    StatusCode::OK,
                    json!({
                        "route": route,
                        "key_hash": peek.key.key_hash().as_str(),
                        "limit": q.limit(),
                        "per_seconds": q.per().as_secs_f64(),
                        "burst": q.burst(),
                        "remaining": d.remaining,
                        "reset_seconds": d.reset_after.as_secs_f64(),
                    }),
                )
            }
            Ok(None) => error(StatusCode::BAD_REQUEST, "no key given".to_owned()),
            Err(InspectError::Key(why)) => error(StatusCode::BAD_REQUEST, why),
            Err(InspectError::Store(why)) => {
                error(StatusCode::SERVICE_UNAVAILABLE, why.to_string())
            }
        }
    }
}

fn error(status: StatusCode, message: String) -> (StatusCode, Value) {
    (status, json!({ "error": message }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn describe(route: &str, key: &ScopedKey, state: &RecordState, ttl: Duration) -> Value {
    let mut out = json!({ "route": route, "key_hash": key.key_hash().as_str() });
    let fields = match state {
        RecordState::Absent => json!({
            "state": "absent",
            "meaning": "never used, released after a failure (a retry runs again), or expired",
        }),
        RecordState::InFlight {
            holder,
            lease_left,
            fingerprint,
        } => json!({
            "state": "in_flight",
            "fencing_token": holder.get(),
            "lease_left_seconds": lease_left.as_secs_f64(),
            "fingerprint": hex(&fingerprint.0),
        }),
        RecordState::Completed {
            status,
            fingerprint,
            expires_in,
        } => {
            // The record was written with the route's TTL: its age is what has run out.
            let age = ttl.saturating_sub(*expires_in);
            let completed_at = SystemTime::now()
                .checked_sub(age)
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
                .map(|at| at.as_secs());
            json!({
                "state": "completed",
                "status": status.as_u16(),
                "completed_at_unix": completed_at,
                "age_seconds": age.as_secs_f64(),
                "expires_in_seconds": expires_in.as_secs_f64(),
                "fingerprint": hex(&fingerprint.0),
            })
        }
    };
    if let (Some(out), Value::Object(fields)) = (out.as_object_mut(), fields) {
        out.extend(fields);
    }
    out
}

//! `GET /keys/{route}/{key}` on the admin listener: what the store holds for an
//! idempotency key — "did it already happen?" for support staff.
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

use http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use keyward::core::store::{IdempotencyStore, RecordState};
use keyward::idempotency::InspectError;
use keyward_core::{KeySpec, ScopedKey};
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
type Inspect = dyn Fn(Request<()>) -> Pin<Box<dyn Future<Output = Found> + Send>> + Send + Sync;

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
                let inspect: Arc<Inspect> = Arc::new(move |req: Request<()>| {
                    let layer = layer.clone();
                    Box::pin(async move { layer.inspect(&req).await })
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
        let Some(lookup) = self.routes.get(route) else {
            return error(
                StatusCode::NOT_FOUND,
                format!("no route named {route:?} has an idempotency layer"),
            );
        };
        let Some(header) = &lookup.key_header else {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "route {route:?} takes its key from {}; /keys looks up header keys only",
                    lookup.key_spec
                ),
            );
        };
        let Ok(value) = HeaderValue::from_str(key) else {
            return error(
                StatusCode::BAD_REQUEST,
                "the key is not a valid header value".to_owned(),
            );
        };
        let mut req = Request::new(());
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req.headers_mut().insert(header.clone(), value);
        match (lookup.inspect)(req).await {
            Ok(Some((key, state))) => (StatusCode::OK, describe(route, &key, &state, lookup.ttl)),
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

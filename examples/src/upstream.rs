//! The demo upstream: a tiny orders/payments API to put behind `keyward serve`, so that
//! every config in `examples/sidecar/` can be tried and its guarantee seen.
//!
//! Every request that reaches it is one **effect** (a charge, an order, a read of the
//! origin), counted per method and path and per idempotency key. It answers with what
//! a user of the sidecar wants to see:
//!
//! ```json
//! {"effect":3,"method":"POST","path":"/accounts/alice/payments","idempotency_key":"order-1",
//!  "fencing_token":"2","concurrent":1,"body":{"amount":1000}}
//! ```
//!
//! - `effect`: this request's number: a replay shows the first request's number again;
//! - `fencing_token`: the `Keyward-Fencing-Token` header it received (the serial layer's);
//! - `concurrent`: requests in flight on this path, this one included ("never two at a
//!   time" means this is always 1 behind a serial route);
//! - `?delay_ms=N` makes it slow (at most 30 s), `?status=N` answers status `N`.
//!
//! `GET /effects` shows the counters; `POST /effects/reset` zeroes them.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The port the examples' sidecar configs point at (`upstream = "http://127.0.0.1:9000"`).
pub const DEFAULT_PORT: u16 = 9000;

/// The longest `?delay_ms=` honoured.
const MAX_DELAY: Duration = Duration::from_secs(30);

/// The largest request body read.
const MAX_BODY: usize = 1 << 20;

/// The headers whose value names the effect a client wants once: the idempotency key of
/// `payments.toml` and the delivery id of `webhooks.toml`.
const EFFECT_KEY_HEADERS: [&str; 2] = ["idempotency-key", "webhook-id"];

/// The header the serial layer puts on every request it lets through.
const FENCING_TOKEN: &str = "keyward-fencing-token";

/// What the upstream has done, as `GET /effects` shows it.
#[derive(Debug, Default)]
struct Effects {
    total: u64,
    /// `"POST /accounts/alice/payments"` -> effects.
    by_route: BTreeMap<String, u64>,
    /// Idempotency key (or webhook delivery id) -> effects: 1 is "charged once".
    by_idempotency_key: BTreeMap<String, u64>,
    /// Path -> requests in flight now.
    in_flight: HashMap<String, u64>,
    /// Path -> the most requests ever in flight at once.
    max_concurrent: BTreeMap<String, u64>,
    /// Path -> the highest fencing token received.
    highest_fencing_token: BTreeMap<String, u64>,
    /// Requests whose fencing token was below one already seen on their path: a
    /// resource that checks tokens would refuse them.
    stale_fencing_tokens: u64,
}

impl Effects {
    fn report(&self) -> Value {
        json!({
            "total": self.total,
            "by_route": self.by_route,
            "by_idempotency_key": self.by_idempotency_key,
            "max_concurrent": self.max_concurrent,
            "highest_fencing_token": self.highest_fencing_token,
            "stale_fencing_tokens": self.stale_fencing_tokens,
        })
    }
}

/// The demo upstream's shared state.
#[derive(Debug, Clone, Default)]
pub struct Upstream {
    effects: Arc<Mutex<Effects>>,
}

impl Upstream {
    fn effects(&self) -> MutexGuard<'_, Effects> {
        // A panic elsewhere leaves the counters as they were: still worth showing.
        self.effects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `GET /effects`, as JSON.
    pub fn report(&self) -> Value {
        self.effects().report()
    }
}

/// Counts a request in flight on a path until it is dropped (answered or cancelled).
struct InFlight {
    upstream: Upstream,
    path: String,
}

impl InFlight {
    fn enter(upstream: &Upstream, path: &str) -> (InFlight, u64) {
        let mut effects = upstream.effects();
        let now = {
            let n = effects.in_flight.entry(path.to_owned()).or_default();
            *n += 1;
            *n
        };
        let max = effects.max_concurrent.entry(path.to_owned()).or_default();
        *max = (*max).max(now);
        let guard = InFlight {
            upstream: upstream.clone(),
            path: path.to_owned(),
        };
        (guard, now)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut effects = self.upstream.effects();
        if let Some(n) = effects.in_flight.get_mut(&self.path) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The demo upstream's routes: `GET /effects`, `POST /effects/reset`, and every other
/// method and path as an effect.
pub fn router(upstream: Upstream) -> Router {
    Router::new()
        .route("/effects", get(effects))
        .route("/effects/reset", post(reset))
        .fallback(effect)
        .with_state(upstream)
}

async fn effects(State(upstream): State<Upstream>) -> Response {
    pretty(StatusCode::OK, &upstream.report())
}

async fn reset(State(upstream): State<Upstream>) -> Response {
    *upstream.effects() = Effects::default();
    pretty(StatusCode::OK, &upstream.report())
}

fn pretty(status: StatusCode, value: &Value) -> Response {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{text}\n"),
    )
        .into_response()
}

/// `?delay_ms=` and `?status=` from a query string; anything else is ignored.
fn options(query: Option<&str>) -> (Duration, Option<StatusCode>) {
    let mut delay = Duration::ZERO;
    let mut status = None;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("delay_ms", ms)) => {
                if let Ok(ms) = ms.parse() {
                    delay = Duration::from_millis(ms).min(MAX_DELAY);
                }
            }
            Some(("status", code)) => {
                status = code
                    .parse::<u16>()
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok());
            }
            _ => {}
        }
    }
    (delay, status)
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn body_value(headers: &HeaderMap, body: &Bytes) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    match json.then(|| serde_json::from_slice(body)) {
        Some(Ok(value)) => value,
        _ => Value::String(String::from_utf8_lossy(body).into_owned()),
    }
}

/// One request, one effect.
async fn effect(State(upstream): State<Upstream>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let (delay, status) = options(parts.uri.query());
    let body = match axum::body::to_bytes(Body::new(body), MAX_BODY).await {
        Ok(body) => body,
        Err(_) => return (StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB\n").into_response(),
    };
    let effect_key = EFFECT_KEY_HEADERS
        .iter()
        .find_map(|name| header_text(&parts.headers, name));
    let fencing_token = header_text(&parts.headers, FENCING_TOKEN);
    let (in_flight, concurrent) = InFlight::enter(&upstream, &path);
    let n = {
        let mut guard = upstream.effects();
        let effects = &mut *guard;
        effects.total += 1;
        *effects
            .by_route
            .entry(format!("{} {path}", parts.method))
            .or_default() += 1;
        if let Some(key) = &effect_key {
            *effects.by_idempotency_key.entry(key.clone()).or_default() += 1;
        }
        if let Some(token) = fencing_token.as_deref().and_then(|t| t.parse::<u64>().ok()) {
            let highest = effects
                .highest_fencing_token
                .entry(path.clone())
                .or_default();
            if token < *highest {
                effects.stale_fencing_tokens += 1;
            }
            *highest = (*highest).max(token);
        }
        effects.total
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    drop(in_flight);
    let status = status.unwrap_or(if parts.method == Method::POST {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    });
    let answer = json!({
        "effect": n,
        "method": parts.method.as_str(),
        "path": path,
        "idempotency_key": effect_key,
        "fencing_token": fencing_token,
        "concurrent": concurrent,
        "body": body_value(&parts.headers, &body),
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{answer}\n"),
    )
        .into_response()
}

/// Serves the demo upstream on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    upstream: Upstream,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(upstream))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The port to listen on: `--port N`, else `$PORT`, else [`DEFAULT_PORT`].
pub fn port_from(args: &[String], env_port: Option<&str>) -> Result<u16, String> {
    let flag = args
        .iter()
        .position(|a| a == "--port")
        .map(|i| args.get(i + 1).map(String::as_str).unwrap_or(""));
    match flag.or(env_port) {
        None => Ok(DEFAULT_PORT),
        Some(text) => text
            .parse()
            .map_err(|_| format!("{text:?} is not a port number")),
    }
}

/// The loopback address for `port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_comes_from_the_flag_then_the_environment() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(port_from(&args(&[]), None), Ok(9000));
        assert_eq!(port_from(&args(&[]), Some("9100")), Ok(9100));
        assert_eq!(
            port_from(&args(&["--port", "9200"]), Some("9100")),
            Ok(9200)
        );
        assert!(port_from(&args(&["--port"]), None).is_err());
    }

    #[test]
    fn options_are_bounded() {
        let (delay, status) = options(Some("delay_ms=99999999&status=503"));
        assert_eq!(delay, MAX_DELAY);
        assert_eq!(status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(options(Some("status=99")).1, None);
    }
}

//! The sidecar's configuration: TOML parsed with serde into [`raw`] structs, then checked
//! into a [`Config`] whose every value is usable. Every problem found is reported with the
//! field's path and the bad value, all at once.

mod cidr;
mod raw;
pub mod units;

pub use cidr::Cidr;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{Method, Uri};
use keyward::core::json::{JsonIdentity, JsonPointer};
use keyward::defaults::{
    DEFAULT_IDEMPOTENCY_LEASE, DEFAULT_IDEMPOTENCY_MAX_BODY, DEFAULT_IDEMPOTENCY_MAX_RESPONSE,
    DEFAULT_IDEMPOTENCY_TTL, DEFAULT_MEMORY_MAX_RESPONSE_BYTES, DEFAULT_SERIAL_MAX_QUEUE,
    DEFAULT_SERIAL_MAX_WAIT, DEFAULT_SINGLE_FLIGHT_MAX_BODY,
};
use keyward::idempotency::OnInFlight;
use keyward::webhook::{DEFAULT_TOLERANCE, WebhookSecret};

/// How long a serial holder keeps its key at most, unless a route says otherwise: like
/// nginx's 60 s between reads, long past any normal write, short enough that a client
/// that never reads its response cannot hold an account for as long as TCP stays up.
pub const DEFAULT_SERIAL_MAX_HOLD: Duration = Duration::from_secs(60);
use keyward::{KeySpec, OnStoreError, ScopeMissing};

use raw::{RawConfig, RawKey, RawRoute};
use units::{parse_duration, parse_size};

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub telemetry: TelemetryConfig,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub upstream: Uri,
    pub upstream_protocol: UpstreamProtocol,
    pub admin: Option<SocketAddr>,
    /// A bearer token every admin request must carry (`Authorization: Bearer ...`).
    pub admin_token: Option<AdminToken>,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub header_read_timeout: Duration,
    /// Longest gap between two parts of a request body (nginx `client_body_timeout`).
    pub body_read_timeout: Duration,
    /// Longest a response write may wait for the client to read (nginx `send_timeout`).
    pub idle_write_timeout: Duration,
    /// Peers whose `X-Forwarded-For` / `Forwarded` name the client for `peer_ip` keys.
    pub trusted_proxies: Vec<Cidr>,
    /// Proxy worker threads, each with its own runtime and listener (default: one per
    /// core).
    pub workers: usize,
    /// Idle upstream connections each worker keeps for reuse (nginx `keepalive`).
    pub upstream_keepalive: usize,
}

/// The most proxy worker threads a config may ask for.
pub const MAX_WORKERS: usize = 256;

/// Idle upstream connections per worker by default.
pub const DEFAULT_UPSTREAM_KEEPALIVE: usize = 64;

/// How the sidecar talks to its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over pooled keep-alive connections (`"http1"`, the default).
    Http1,
    /// HTTP/2 with prior knowledge over cleartext (`"h2c"`), e.g. for gRPC upstreams:
    /// requests are multiplexed and trailers pass through.
    H2c,
}

/// The admin listener's bearer token; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(pub String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    Memory,
    /// `urls`: the one Redis, or a cluster's seed nodes (any live one will do).
    Redis {
        urls: Vec<String>,
        cluster: bool,
    },
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Memory => f.write_str("Memory"),
            Backend::Redis { urls, cluster } => f
                .debug_struct("Redis")
                .field(
                    "urls",
                    &urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
                )
                .field("cluster", cluster)
                .finish(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub backend: Backend,
    pub prefix: String,
    pub timeout: Duration,
    pub on_error: OnStoreError,
    pub max_response_bytes: u64,
    /// Memory only: bytes of single-flight responses kept for `reuse_for`.
    pub max_reuse_bytes: u64,
    /// Memory only: bounds of the tables of live keys (see `keyward::MemoryStoreBuilder`).
    pub max_quota_keys: usize,
    pub max_claims: usize,
    pub max_serial_keys: usize,
    /// Redis only: how long a crashed serial holder keeps its key (renewed every third
    /// of it while the holder's process lives).
    pub serial_lease: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub service_name: String,
    pub otlp_endpoint: Option<String>,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// `None`: every method.
    pub methods: Option<Vec<Method>>,
    pub path: String,
    /// The largest request body read before the layers, for `json:` keys and webhook
    /// signatures (`None`: the route reads no body before its layers).
    pub body: Option<usize>,
    /// Standard Webhooks verification, before every layer.
    pub webhook: Option<WebhookConfig>,
    pub idempotency: Option<IdempotencyConfig>,
    /// Outermost first: one table, or several (`[[routes.quota]]`).
    pub quotas: Vec<QuotaConfig>,
    pub serial: Option<SerialConfig>,
    pub single_flight: Option<SingleFlightConfig>,
}

#[derive(Debug, Clone)]
pub struct IdempotencyConfig {
    pub key: KeySpec,
    pub required: bool,
    pub scope: Option<KeySpec>,
    /// What a request without a principal gets.
    pub scope_missing: ScopeMissing,
    pub ttl: Duration,
    pub lease: Duration,
    pub on_in_flight: OnInFlight,
    pub max_body: usize,
    pub max_response: usize,
    pub store_server_errors: bool,
    /// How long a response whose record the store refuses is retried, holding the key.
    pub record_retry: Duration,
    /// `Some`: the body is fingerprinted as canonical JSON, selected so.
    pub fingerprint_json: Option<JsonIdentity>,
}

/// A route that receives Standard Webhooks deliveries.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub secrets: Vec<WebhookSecret>,
    pub tolerance: Duration,
}

#[derive(Debug, Clone)]
pub struct QuotaConfig {
    /// The policy name (`None`: the route's name); required and distinct when a route
    /// has several quotas.
    pub name: Option<String>,
    pub key: KeySpec,
    pub scope: Option<KeySpec>,
    /// What a request without a principal gets.
    pub scope_missing: ScopeMissing,
    pub quota: keyward_core::gcra::Quota,
    pub shadow: bool,
    /// `Some`: priced by the response (`cost_header`, `count_statuses`).
    pub charge_after: Option<keyward::quota::ResponseCost>,
    /// Keys with a quota of their own (`[[routes.quota.overrides]]`), in file order.
    pub overrides: Vec<(String, keyward_core::gcra::Quota)>,
}

/// Serial keys are not scoped by principal: mutual exclusion on a resource must hold
/// whoever calls.
#[derive(Debug, Clone)]
pub struct SerialConfig {
    pub key: KeySpec,
    /// Requests per key inside the upstream at once (1: one at a time).
    pub permits: u32,
    pub max_wait: Duration,
    pub max_queue: usize,
    /// Longest a request keeps the key; `None` (`"off"`): until its response is over.
    pub max_hold: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct SingleFlightConfig {
    pub key: KeySpec,
    pub scope: Option<KeySpec>,
    /// What a request without a principal gets.
    pub scope_missing: ScopeMissing,
    pub methods: Vec<Method>,
    pub max_body: usize,
    /// Request headers whose values must match for requests to share a response.
    pub vary: Vec<http::HeaderName>,
    /// How long a landed response still serves later requests (zero: off).
    pub reuse_for: Duration,
}

impl RouteConfig {
    /// Whether a layer of the route takes a key from the body (`json:`).
    pub fn reads_body_keys(&self) -> bool {
        let keys = [
            self.idempotency.as_ref().map(|c| &c.key),
            self.serial.as_ref().map(|c| &c.key),
            self.single_flight.as_ref().map(|c| &c.key),
        ];
        let scopes = [
            self.idempotency.as_ref().and_then(|c| c.scope.as_ref()),
            self.single_flight.as_ref().and_then(|c| c.scope.as_ref()),
        ];
        let quotas = self
            .quotas
            .iter()
            .flat_map(|q| [Some(&q.key), q.scope.as_ref()]);
        keys.into_iter()
            .chain(scopes)
            .chain(quotas)
            .flatten()
            .any(reads_body)
    }
}

fn reads_body(spec: &KeySpec) -> bool {
    match spec {
        KeySpec::Json(_) => true,
        KeySpec::Composite(parts) => parts.iter().any(reads_body),
        _ => false,
    }
}

/// One problem in a configuration: the field's path and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{path}: invalid configuration\n{}", list(.errors))]
    Invalid {
        path: String,
        errors: Vec<FieldError>,
    },
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::from_toml(&text).map_err(|err| match err {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: shown.clone(),
                message,
            },
            ConfigError::Invalid { errors, .. } => ConfigError::Invalid {
                path: shown.clone(),
                errors,
            },
            other => other,
        })
    }

    /// Parses and checks TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Syntax {
            path: "<config>".to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        let mut check = Checker::default();
        let config = check.config(raw);
        if check.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: "<config>".to_owned(),
                errors: check.errors,
            })
        }
    }
}

/// Collects every problem while building a config with placeholder values, so that one
/// run of `keyward check` reports them all.
#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
}

const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

impl Checker {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    fn duration(&mut self, field: &str, value: Option<&str>, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        match parse_duration(text) {
            Some(d) if !d.is_zero() => d,
            Some(_) => {
                self.fail(field, format!("{text:?} must be longer than zero"));
                default
            }
            None => {
                self.fail(
                    field,
                    format!(
                        "{text:?} is not a duration like \"500ms\", \"30s\", \"5m\" or \"24h\""
                    ),
                );
                default
            }
        }
    }

    fn size(&mut self, field: &str, value: Option<&str>, default: u64) -> u64 {
        let Some(text) = value else { return default };
        match parse_size(text) {
            Some(n) if n > 0 => n,
            _ => {
                self.fail(
                    field,
                    format!("{text:?} is not a size like \"64KiB\" or \"1MiB\""),
                );
                default
            }
        }
    }

    fn key(&mut self, field: &str, value: Option<&RawKey>, default: &str) -> KeySpec {
        let parsed = match value {
            None => KeySpec::parse(default),
            Some(RawKey::One(spec)) => KeySpec::parse(spec),
            Some(RawKey::Many(specs)) if specs.is_empty() => {
                self.fail(field, "an empty list names no key");
                return KeySpec::MethodUri;
            }
            Some(RawKey::Many(specs)) => KeySpec::parse_all(specs),
        };
        parsed.unwrap_or_else(|err| {
            self.fail(field, err.to_string());
            KeySpec::MethodUri
        })
    }

    fn scope(&mut self, field: &str, value: Option<&str>) -> Option<KeySpec> {
        match value {
            None => Some(KeySpec::Header(http::header::AUTHORIZATION)),
            Some("none") => None,
            Some(spec) => match KeySpec::parse(spec) {
                Ok(spec) => Some(spec),
                Err(err) => {
                    self.fail(field, format!("{err} (or \"none\")"));
                    None
                }
            },
        }
    }

    fn header_names(&mut self, field: &str, names: &[String]) -> Vec<http::HeaderName> {
        names
            .iter()
            .filter_map(|name| match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) => Some(name),
                Err(_) => {
                    self.fail(field, format!("{name:?} is not a header name"));
                    None
                }
            })
            .collect()
    }

    fn scope_missing(&mut self, field: &str, value: Option<&str>) -> ScopeMissing {
        match value {
            None | Some("anonymous") => ScopeMissing::Anonymous,
            Some("reject") => ScopeMissing::Reject,
            Some(other) => {
                self.fail(
                    field,
                    format!("{other:?} is not \"anonymous\" or \"reject\""),
                );
                ScopeMissing::Anonymous
            }
        }
    }

    fn methods(&mut self, field: &str, values: &[String]) -> Vec<Method> {
        values
            .iter()
            .filter_map(
                |m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(method) => Some(method),
                    Err(_) => {
                        self.fail(field, format!("{m:?} is not an HTTP method"));
                        None
                    }
                },
            )
            .collect()
    }

    fn socket(&mut self, field: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.fail(
                    field,
                    format!("{text:?} is not an address like \"127.0.0.1:8080\""),
                );
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let server = self.server(&raw.server);
        let store = self.store(&raw.store);
        let telemetry = self.telemetry(&raw.telemetry);
        let mut names = HashSet::new();
        let mut paths = matchit::Router::new();
        let routes = raw
            .routes
            .iter()
            .enumerate()
            .map(|(i, route)| {
                let field = format!("routes[{i}]");
                if !names.insert(route.name.clone()) {
                    self.fail(
                        &format!("{field}.name"),
                        format!("{:?} is used by an earlier route", route.name),
                    );
                }
                self.route(&field, route, &mut paths)
            })
            .collect();
        Config {
            server,
            store,
            telemetry,
            routes,
        }
    }

    fn server(&mut self, raw: &raw::RawServer) -> ServerConfig {
        let listen = self
            .socket("server.listen", &raw.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let upstream = match raw.upstream.parse::<Uri>() {
            Ok(uri)
                if uri.scheme_str() == Some("http")
                    && uri.authority().is_some()
                    && matches!(uri.path(), "" | "/")
                    && uri.query().is_none() =>
            {
                uri
            }
            Ok(uri) if uri.scheme_str() == Some("https") => {
                self.fail("server.upstream", format!("{:?}: https upstreams are not supported yet; terminate TLS in front of the upstream or use http://", raw.upstream));
                uri
            }
            _ => {
                self.fail("server.upstream", format!("{:?} is not an upstream like \"http://127.0.0.1:9000\" (scheme and authority, no path)", raw.upstream));
                Uri::from_static("http://127.0.0.1:9000")
            }
        };
        let upstream_protocol = match raw.upstream_protocol.as_deref() {
            None | Some("http1") => UpstreamProtocol::Http1,
            Some("h2c") => UpstreamProtocol::H2c,
            Some(other) => {
                self.fail(
                    "server.upstream_protocol",
                    format!("{other:?} is not one of \"http1\", \"h2c\""),
                );
                UpstreamProtocol::Http1
            }
        };
        let trusted_proxies = raw
            .trusted_proxies
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, text)| match text.parse::<Cidr>() {
                Ok(cidr) => Some(cidr),
                Err(err) => {
                    self.fail(
                        &format!("server.trusted_proxies[{i}]"),
                        format!("{text:?} {err}"),
                    );
                    None
                }
            })
            .collect();
        let admin = match raw.admin.as_deref() {
            Some("off") => None,
            Some(text) => self.socket("server.admin", text),
            None => DEFAULT_ADMIN.parse().ok(),
        };
        let admin_token = raw.admin_token.as_deref().and_then(|token| {
            let usable = !token.is_empty()
                && token.bytes().all(|b| b.is_ascii_graphic())
                && token.len() <= 4096;
            if usable {
                Some(AdminToken(token.to_owned()))
            } else {
                // Never echo a secret back, even a malformed one.
                self.fail(
                    "server.admin_token",
                    format!(
                        "a token of {} bytes is not 1..=4096 visible ASCII characters (no spaces)",
                        token.len()
                    ),
                );
                None
            }
        });
        ServerConfig {
            listen,
            upstream,
            upstream_protocol,
            admin,
            admin_token,
            request_timeout: self.duration(
                "server.request_timeout",
                raw.request_timeout.as_deref(),
                Duration::from_secs(30),
            ),
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                raw.shutdown_grace.as_deref(),
                Duration::from_secs(10),
            ),
            header_read_timeout: self.duration(
                "server.header_read_timeout",
                raw.header_read_timeout.as_deref(),
                Duration::from_secs(10),
            ),
            body_read_timeout: self.duration(
                "server.body_read_timeout",
                raw.body_read_timeout.as_deref(),
                Duration::from_secs(60),
            ),
            idle_write_timeout: self.duration(
                "server.idle_write_timeout",
                raw.idle_write_timeout.as_deref(),
                Duration::from_secs(60),
            ),
            trusted_proxies,
            workers: self.workers(raw.workers),
            upstream_keepalive: match raw.upstream_keepalive {
                None => DEFAULT_UPSTREAM_KEEPALIVE,
                Some(n) => match usize::try_from(n) {
                    Ok(n) => n,
                    Err(_) => {
                        self.fail(
                            "server.upstream_keepalive",
                            format!("{n} must be 0 (no reuse) or more"),
                        );
                        DEFAULT_UPSTREAM_KEEPALIVE
                    }
                },
            },
        }
    }

    /// `server.workers`: 1 to [`MAX_WORKERS`], by default the machine's cores.
    fn workers(&mut self, value: Option<i64>) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        match value {
            None => cores.min(MAX_WORKERS),
            Some(n) => match usize::try_from(n) {
                Ok(n) if (1..=MAX_WORKERS).contains(&n) => n,
                _ => {
                    self.fail(
                        "server.workers",
                        format!("{n} must be a whole number from 1 to {MAX_WORKERS} (this machine has {cores} cores)"),
                    );
                    1
                }
            },
        }
    }

    fn store(&mut self, raw: &raw::RawStore) -> StoreConfig {
        let backend = match raw.backend.as_deref() {
            None | Some("memory") => Backend::Memory,
            Some("redis") => {
                let cluster = raw.cluster.unwrap_or(false);
                let urls = self.redis_urls(raw, cluster);
                Backend::Redis { urls, cluster }
            }
            Some(other) => {
                self.fail(
                    "store.backend",
                    format!("{other:?} is not \"memory\" or \"redis\""),
                );
                Backend::Memory
            }
        };
        let on_error = match raw.on_error.as_deref() {
            None | Some("closed") => OnStoreError::Closed,
            Some("open") => OnStoreError::Open,
            Some(other) => {
                self.fail(
                    "store.on_error",
                    format!("{other:?} is not \"closed\" or \"open\""),
                );
                OnStoreError::Closed
            }
        };
        StoreConfig {
            backend,
            prefix: raw.prefix.clone().unwrap_or_else(|| "keyward:".to_owned()),
            timeout: self.duration(
                "store.timeout",
                raw.timeout.as_deref(),
                Duration::from_millis(50),
            ),
            on_error,
            max_response_bytes: self.size(
                "store.max_response_bytes",
                raw.max_response_bytes.as_deref(),
                DEFAULT_MEMORY_MAX_RESPONSE_BYTES,
            ),
            max_reuse_bytes: self.size(
                "store.max_reuse_bytes",
                raw.max_reuse_bytes.as_deref(),
                keyward::defaults::DEFAULT_MEMORY_MAX_REUSE_BYTES,
            ),
            max_quota_keys: self.entries(
                "store.max_quota_keys",
                raw.max_quota_keys,
                keyward::defaults::DEFAULT_MEMORY_MAX_QUOTA_KEYS,
            ),
            max_claims: self.entries(
                "store.max_claims",
                raw.max_claims,
                keyward::defaults::DEFAULT_MEMORY_MAX_CLAIMS,
            ),
            max_serial_keys: self.entries(
                "store.max_serial_keys",
                raw.max_serial_keys,
                keyward::defaults::DEFAULT_MEMORY_MAX_SERIAL_KEYS,
            ),
            serial_lease: self.duration(
                "store.serial_lease",
                raw.serial_lease.as_deref(),
                Duration::from_secs(10),
            ),
        }
    }

    /// `store.url` (one URL, default `redis://127.0.0.1:6379`) or `store.urls` (a
    /// cluster's seed nodes); never both.
    fn redis_urls(&mut self, raw: &raw::RawStore, cluster: bool) -> Vec<String> {
        let (field, urls) = match (&raw.url, &raw.urls) {
            (Some(_), Some(_)) => {
                self.fail(
                    "store.urls",
                    "give either store.url or store.urls, not both".to_owned(),
                );
                return vec!["redis://127.0.0.1:6379".to_owned()];
            }
            (_, Some(urls)) => ("store.urls", urls.clone()),
            (Some(url), None) => ("store.url", vec![url.clone()]),
            (None, None) => ("store.url", vec!["redis://127.0.0.1:6379".to_owned()]),
        };
        if urls.is_empty() {
            self.fail(
                field,
                "an empty list: give at least one seed node".to_owned(),
            );
        }
        if urls.len() > 1 && !cluster {
            self.fail(
                field,
                format!(
                    "{} URLs for a standalone Redis: several seed nodes need store.cluster = true",
                    urls.len()
                ),
            );
        }
        for url in &urls {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                self.fail(
                    field,
                    format!("{:?} is not a redis:// or rediss:// URL", redact_url(url)),
                );
            }
        }
        urls
    }

    fn telemetry(&mut self, raw: &raw::RawTelemetry) -> TelemetryConfig {
        let log_format = match raw.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.fail(
                    "telemetry.log_format",
                    format!("{other:?} is not \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        if let Some(endpoint) = &raw.otlp_endpoint {
            let usable = endpoint
                .parse::<http::Uri>()
                .is_ok_and(|uri| uri.scheme_str() == Some("http") && uri.authority().is_some());
            if !usable {
                self.fail(
                    "telemetry.otlp_endpoint",
                    format!("{endpoint:?} is not an http:// URL of an OTLP/gRPC collector (TLS is not built in)"),
                );
            }
        }
        TelemetryConfig {
            service_name: raw
                .service_name
                .clone()
                .unwrap_or_else(|| "keyward".to_owned()),
            otlp_endpoint: raw.otlp_endpoint.clone(),
            log_format,
        }
    }

    fn route(
        &mut self,
        field: &str,
        raw: &RawRoute,
        paths: &mut matchit::Router<()>,
    ) -> RouteConfig {
        let valid_name = !raw.name.is_empty()
            && raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            self.fail(
                &format!("{field}.name"),
                format!("{:?} must be letters, digits, '_' or '-'", raw.name),
            );
        }
        if !raw.path.starts_with('/') {
            self.fail(
                &format!("{field}.path"),
                format!("{:?} must start with '/'", raw.path),
            );
        } else if let Err(err) = keyward_core::PathTemplate::new(&raw.path) {
            // Checked first: matchit panics on too many parameters instead of failing.
            self.fail(&format!("{field}.path"), err.to_string());
        } else if let Some(reason) = non_canonical(&raw.path) {
            self.fail(
                &format!("{field}.path"),
                format!(
                    "{:?} is not a canonical path ({reason}): requests are routed on their canonical form, so this route would never match",
                    raw.path
                ),
            );
        } else if let Err(err) = paths.insert(raw.path.as_str(), ()) {
            // The same path twice is fine when the methods differ; the router groups them.
            if !matches!(err, matchit::InsertError::Conflict { ref with } if *with == raw.path) {
                self.fail(&format!("{field}.path"), format!("{:?}: {err}", raw.path));
            }
        }
        let methods = raw
            .methods
            .as_ref()
            .map(|m| self.methods(&format!("{field}.methods"), m));
        let webhook = raw
            .webhook
            .as_ref()
            .map(|r| self.webhook(&format!("{field}.webhook"), r));
        // A webhook route dedupes on the delivery id, shared by every sender, unless its
        // own `[routes.idempotency]` says otherwise.
        let idempotency = match (&raw.idempotency, &webhook) {
            (Some(r), _) => {
                Some(self.idempotency(&format!("{field}.idempotency"), r, webhook.is_some()))
            }
            (None, Some(_)) => Some(self.idempotency(
                &format!("{field}.idempotency"),
                &raw::RawIdempotency::default(),
                true,
            )),
            (None, None) => None,
        };
        let mut route = RouteConfig {
            name: raw.name.clone(),
            methods,
            path: raw.path.clone(),
            body: None,
            webhook,
            idempotency,
            quotas: self.quotas(field, raw.quota.as_ref()),
            serial: raw
                .serial
                .as_ref()
                .map(|r| self.serial(&format!("{field}.serial"), r)),
            single_flight: raw
                .single_flight
                .as_ref()
                .map(|r| self.single_flight(&format!("{field}.single_flight"), r)),
        };
        let max_body = self.size_usize(
            &format!("{field}.max_body"),
            raw.max_body.as_deref(),
            DEFAULT_IDEMPOTENCY_MAX_BODY,
        );
        if route.webhook.is_some() || route.reads_body_keys() {
            route.body = Some(max_body);
        }
        route
    }

    fn webhook(&mut self, field: &str, raw: &raw::RawWebhook) -> WebhookConfig {
        let f = |name: &str| format!("{field}.{name}");
        let mut texts: Vec<(String, String)> = Vec::new();
        let mut env_unset = false;
        for (i, secret) in raw.secrets.iter().flatten().enumerate() {
            texts.push((format!("{}[{i}]", f("secrets")), secret.clone()));
        }
        if let Some(var) = &raw.secrets_env {
            match std::env::var(var) {
                Ok(value) => {
                    for secret in value.split([' ', ',', '\n']).filter(|s| !s.is_empty()) {
                        texts.push((format!("{} (${var})", f("secrets_env")), secret.to_owned()));
                    }
                }
                Err(_) => {
                    env_unset = true;
                    self.fail(
                        &f("secrets_env"),
                        format!("the environment variable {var:?} is not set (or not UTF-8)"),
                    );
                }
            }
        }
        let secrets: Vec<WebhookSecret> = texts
            .iter()
            .filter_map(|(field, text)| match WebhookSecret::parse(text) {
                Ok(secret) => Some(secret),
                Err(err) => {
                    self.fail(field, err.to_string());
                    None
                }
            })
            .collect();
        if texts.is_empty() && !env_unset {
            self.fail(
                field,
                "no secret: give `secrets` or `secrets_env` (every delivery would be refused)",
            );
        }
        WebhookConfig {
            secrets,
            tolerance: self.duration(&f("tolerance"), raw.tolerance.as_deref(), DEFAULT_TOLERANCE),
        }
    }

    /// `webhook`: the route verifies Standard Webhooks deliveries, so keys default to
    /// their `webhook-id`, shared by every sender, and are required.
    fn idempotency(
        &mut self,
        field: &str,
        raw: &raw::RawIdempotency,
        webhook: bool,
    ) -> IdempotencyConfig {
        let f = |name: &str| format!("{field}.{name}");
        let (default_key, default_scope) = if webhook {
            ("header:webhook-id", Some("none"))
        } else {
            ("header:Idempotency-Key", None)
        };
        let wait = self.duration(&f("wait"), raw.wait.as_deref(), Duration::from_secs(10));
        let on_in_flight = match raw.on_in_flight.as_deref() {
            None | Some("reject") => OnInFlight::Reject,
            Some("wait") => OnInFlight::Wait(wait),
            Some(other) => {
                self.fail(
                    &f("on_in_flight"),
                    format!("{other:?} is not \"reject\" or \"wait\""),
                );
                OnInFlight::Reject
            }
        };
        IdempotencyConfig {
            key: self.key(&f("key"), raw.key.as_ref(), default_key),
            required: raw.required.unwrap_or(webhook),
            scope: self.scope(&f("scope"), raw.scope.as_deref().or(default_scope)),
            scope_missing: self.scope_missing(&f("scope_missing"), raw.scope_missing.as_deref()),
            ttl: self.duration(&f("ttl"), raw.ttl.as_deref(), DEFAULT_IDEMPOTENCY_TTL),
            lease: self.duration(&f("lease"), raw.lease.as_deref(), DEFAULT_IDEMPOTENCY_LEASE),
            on_in_flight,
            max_body: self.size_usize(
                &f("max_body"),
                raw.max_body.as_deref(),
                DEFAULT_IDEMPOTENCY_MAX_BODY,
            ),
            max_response: self.size_usize(
                &f("max_response"),
                raw.max_response.as_deref(),
                DEFAULT_IDEMPOTENCY_MAX_RESPONSE,
            ),
            store_server_errors: raw.store_server_errors.unwrap_or(false),
            record_retry: self.duration(
                &f("record_retry"),
                raw.record_retry.as_deref(),
                keyward::defaults::DEFAULT_IDEMPOTENCY_RECORD_RETRY,
            ),
            fingerprint_json: self.fingerprint_json(field, raw),
        }
    }

    fn fingerprint_json(&mut self, field: &str, raw: &raw::RawIdempotency) -> Option<JsonIdentity> {
        let f = |name: &str| format!("{field}.{name}");
        let json = match raw.fingerprint_body.as_deref() {
            None | Some("bytes") => false,
            Some("json") => true,
            Some(other) => {
                self.fail(
                    &f("fingerprint_body"),
                    format!("{other:?} is not \"bytes\" or \"json\""),
                );
                false
            }
        };
        let mut identity = JsonIdentity::canonical();
        for (name, pointers) in [
            ("fingerprint_include", &raw.fingerprint_include),
            ("fingerprint_exclude", &raw.fingerprint_exclude),
        ] {
            let Some(pointers) = pointers else { continue };
            if !json {
                self.fail(&f(name), "needs fingerprint_body = \"json\"");
                continue;
            }
            for (i, text) in pointers.iter().enumerate() {
                match JsonPointer::parse(text) {
                    Ok(pointer) if name == "fingerprint_include" => {
                        identity = identity.include(pointer)
                    }
                    Ok(pointer) => identity = identity.exclude(pointer),
                    Err(err) => self.fail(&format!("{}[{i}]", f(name)), err.to_string()),
                }
            }
        }
        json.then_some(identity)
    }

    /// A bound on a table's entries: a whole number of at least 1.
    fn entries(&mut self, field: &str, value: Option<i64>, default: usize) -> usize {
        match value.map(usize::try_from) {
            None => default,
            Some(Ok(n)) if n >= 1 => n,
            Some(_) => {
                let shown = value.unwrap_or_default();
                self.fail(field, format!("{shown} must be 1 or more"));
                default
            }
        }
    }

    fn size_usize(&mut self, field: &str, value: Option<&str>, default: usize) -> usize {
        let bytes = self.size(field, value, default as u64);
        usize::try_from(bytes).unwrap_or(usize::MAX)
    }

    fn count(&mut self, field: &str, value: i64, min: i64) -> u32 {
        match u32::try_from(value) {
            Ok(n) if value >= min => n,
            _ => {
                self.fail(
                    field,
                    format!("{value} must be a whole number from {min} to {}", u32::MAX),
                );
                1
            }
        }
    }

    /// Every quota table of a route; several need distinct names.
    fn quotas(
        &mut self,
        route: &str,
        raw: Option<&raw::OneOrMany<raw::RawQuota>>,
    ) -> Vec<QuotaConfig> {
        let Some(raw) = raw else { return Vec::new() };
        let several = matches!(raw, raw::OneOrMany::Many(list) if list.len() > 1);
        let mut names = HashSet::new();
        let mut quotas = Vec::new();
        for (index, table) in raw.iter() {
            let field = match index {
                Some(i) => format!("{route}.quota[{i}]"),
                None => format!("{route}.quota"),
            };
            let quota = self.quota(&field, table);
            match &quota.name {
                Some(name) if !names.insert(name.clone()) => self.fail(
                    &format!("{field}.name"),
                    format!("{name:?} names another quota of this route already"),
                ),
                None if several => self.fail(
                    &format!("{field}.name"),
                    "missing: a route with several quotas must name each (the RateLimit policy name)"
                        .to_owned(),
                ),
                _ => {}
            }
            quotas.push(quota);
        }
        quotas
    }

    fn gcra(
        &mut self,
        field: &str,
        limit: u32,
        per: Duration,
        burst: u32,
    ) -> keyward_core::gcra::Quota {
        keyward_core::gcra::Quota::new(limit, per)
            .and_then(|quota| quota.with_burst(burst))
            .unwrap_or_else(|err| {
                self.fail(field, err.to_string());
                keyward_core::gcra::Quota::per_second(1).expect("1/s is a valid quota")
            })
    }

    fn quota(&mut self, field: &str, raw: &raw::RawQuota) -> QuotaConfig {
        let f = |name: &str| format!("{field}.{name}");
        let limit = self.count(&f("limit"), raw.limit, 1);
        let burst = match raw.burst {
            Some(burst) => self.count(&f("burst"), burst, 1),
            None => limit,
        };
        let per = self.duration(&f("per"), Some(raw.per.as_str()), Duration::from_secs(60));
        let quota = self.gcra(field, limit, per, burst);
        let mut seen = HashSet::new();
        let overrides = raw
            .overrides
            .iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, over)| {
                let field = f(&format!("overrides[{i}]"));
                let g = |name: &str| format!("{field}.{name}");
                if over.key.is_empty() {
                    self.fail(&g("key"), "must not be empty");
                    return None;
                }
                if !seen.insert(over.key.clone()) {
                    self.fail(
                        &g("key"),
                        format!("{:?} has an earlier override in this route", over.key),
                    );
                }
                let limit = self.count(&g("limit"), over.limit, 1);
                let burst = match over.burst {
                    Some(burst) => self.count(&g("burst"), burst, 1),
                    None => limit,
                };
                let per = match &over.per {
                    Some(text) => self.duration(&g("per"), Some(text.as_str()), per),
                    None => per,
                };
                Some((over.key.clone(), self.gcra(&field, limit, per, burst)))
            })
            .collect();
        QuotaConfig {
            overrides,
            key: self.key(&f("key"), raw.key.as_ref(), "peer_ip"),
            scope: match raw.scope.as_deref() {
                None => None,
                Some(s) => self.scope(&f("scope"), Some(s)),
            },
            scope_missing: self.scope_missing(&f("scope_missing"), raw.scope_missing.as_deref()),
            quota,
            shadow: raw.shadow.unwrap_or(false),
            name: raw
                .name
                .as_ref()
                .map(|name| self.policy_name(&f("name"), name)),
            charge_after: self.charge_after(field, raw),
        }
    }

    /// A quota's policy name: what route names may be.
    fn policy_name(&mut self, field: &str, name: &str) -> String {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            self.fail(
                field,
                format!("{name:?} must be letters, digits, '_' or '-'"),
            );
        }
        name.to_owned()
    }

    /// `cost_header`, `cost_missing` and `count_statuses`: how a quota priced by its
    /// responses charges them.
    fn charge_after(
        &mut self,
        field: &str,
        raw: &raw::RawQuota,
    ) -> Option<keyward::quota::ResponseCost> {
        use keyward::quota::{ResponseCost, StatusSet};
        let f = |name: &str| format!("{field}.{name}");
        let statuses = raw.count_statuses.as_ref().map(|list| {
            if list.is_empty() {
                self.fail(
                    &f("count_statuses"),
                    "[] would count nothing: list statuses such as \"401\" or \"2xx\", or leave it out"
                        .to_owned(),
                );
            }
            list.iter()
                .fold(StatusSet::new(), |set, item| match set.with_item(item.trim()) {
                    Ok(set) => set,
                    Err(err) => {
                        self.fail(&f("count_statuses"), err.to_string());
                        set
                    }
                })
        });
        let missing = raw
            .cost_missing
            .map(|n| self.count(&f("cost_missing"), n, 0));
        let cost = match raw.cost_header.as_deref() {
            Some(name) => match http::HeaderName::try_from(name) {
                Ok(name) => ResponseCost::header_name(name).missing(missing.unwrap_or(0)),
                Err(_) => {
                    self.fail(&f("cost_header"), format!("{name:?} is not a header name"));
                    ResponseCost::per_response(1)
                }
            },
            None => {
                if missing.is_some() {
                    self.fail(
                        &f("cost_missing"),
                        "only means something with cost_header".to_owned(),
                    );
                }
                // Neither set: not priced by the response.
                statuses?;
                ResponseCost::per_response(1)
            }
        };
        Some(match statuses {
            Some(statuses) => cost.only(statuses),
            None => cost,
        })
    }

    fn serial(&mut self, field: &str, raw: &raw::RawSerial) -> SerialConfig {
        let f = |name: &str| format!("{field}.{name}");
        let max_queue = match raw.max_queue {
            None => DEFAULT_SERIAL_MAX_QUEUE,
            Some(n) => match usize::try_from(n) {
                Ok(n) => n,
                Err(_) => {
                    self.fail(&f("max_queue"), format!("{n} must be zero or more"));
                    DEFAULT_SERIAL_MAX_QUEUE
                }
            },
        };
        let permits = raw.permits.map_or(1, |n| self.count(&f("permits"), n, 1));
        SerialConfig {
            permits,
            key: self.key(&f("key"), raw.key.as_ref(), "method_uri"),
            max_wait: self.duration(
                &f("max_wait"),
                raw.max_wait.as_deref(),
                DEFAULT_SERIAL_MAX_WAIT,
            ),
            max_queue,
            max_hold: match raw.max_hold.as_deref() {
                Some("off") => None,
                other => Some(self.duration(&f("max_hold"), other, DEFAULT_SERIAL_MAX_HOLD)),
            },
        }
    }

    fn single_flight(&mut self, field: &str, raw: &raw::RawSingleFlight) -> SingleFlightConfig {
        let f = |name: &str| format!("{field}.{name}");
        let methods = match &raw.methods {
            Some(m) => self.methods(&f("methods"), m),
            None => vec![Method::GET, Method::HEAD],
        };
        SingleFlightConfig {
            key: self.key(&f("key"), raw.key.as_ref(), "method_uri"),
            scope: self.scope(&f("scope"), raw.scope.as_deref()),
            scope_missing: self.scope_missing(&f("scope_missing"), raw.scope_missing.as_deref()),
            methods,
            max_body: self.size_usize(
                &f("max_body"),
                raw.max_body.as_deref(),
                DEFAULT_SINGLE_FLIGHT_MAX_BODY,
            ),
            vary: match &raw.vary {
                None => keyward::single_flight::DEFAULT_VARY.to_vec(),
                Some(names) => self.header_names(&f("vary"), names),
            },
            reuse_for: match raw.reuse_for.as_deref() {
                None | Some("off") => Duration::ZERO,
                Some(text) => self.duration(&f("reuse_for"), Some(text), Duration::ZERO),
            },
        }
    }
}

/// Why a route template is not canonical, if it is not: every `{param}` stands for one
/// canonical segment (`p`), the rest must already be in canonical form.
fn non_canonical(template: &str) -> Option<String> {
    let mut probe = String::with_capacity(template.len());
    let mut depth = 0usize;
    for c in template.chars() {
        match c {
            '{' => {
                if depth == 0 {
                    probe.push('p');
                }
                depth += 1;
            }
            '}' => depth = depth.saturating_sub(1),
            c if depth == 0 => probe.push(c),
            _ => {}
        }
    }
    match keyward_core::canon::canonical_path(&probe) {
        Ok(canonical) if canonical == probe => None,
        Ok(canonical) => Some(format!("its canonical form is {canonical:?}")),
        Err(err) => Some(err.to_string()),
    }
}

/// `url` with any password replaced by `***`, for logs and messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

#[cfg(test)]
mod tests;

//! The TOML file as written: strings where the file has strings, checked by
//! [`super::Config::from_toml`]. Unknown fields are rejected.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: String,
    pub upstream: String,
    pub upstream_protocol: Option<String>,
    pub admin: Option<String>,
    pub admin_token: Option<String>,
    pub request_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub idle_write_timeout: Option<String>,
    pub trusted_proxies: Option<Vec<String>>,
    pub workers: Option<i64>,
    pub upstream_keepalive: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    pub url: Option<String>,
    /// Cluster seed nodes (instead of `url`).
    pub urls: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub timeout: Option<String>,
    pub on_error: Option<String>,
    pub max_response_bytes: Option<String>,
    pub max_reuse_bytes: Option<String>,
    pub max_quota_keys: Option<i64>,
    pub max_claims: Option<i64>,
    pub max_serial_keys: Option<i64>,
    pub serial_lease: Option<String>,
    pub cluster: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub service_name: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub log_format: Option<String>,
}

/// A key spec: one string or a list (a composite key).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawKey {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub methods: Option<Vec<String>>,
    pub path: String,
    pub max_body: Option<String>,
    pub webhook: Option<RawWebhook>,
    pub idempotency: Option<RawIdempotency>,
    /// One `[routes.quota]` table, or several (`[[routes.quota]]`).
    pub quota: Option<OneOrMany<RawQuota>>,
    pub serial: Option<RawSerial>,
    pub single_flight: Option<RawSingleFlight>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdempotency {
    pub key: Option<RawKey>,
    pub required: Option<bool>,
    pub scope: Option<String>,
    pub scope_missing: Option<String>,
    pub ttl: Option<String>,
    pub lease: Option<String>,
    pub on_in_flight: Option<String>,
    pub wait: Option<String>,
    pub max_body: Option<String>,
    pub max_response: Option<String>,
    pub store_server_errors: Option<bool>,
    pub record_retry: Option<String>,
    pub fingerprint_body: Option<String>,
    pub fingerprint_include: Option<Vec<String>>,
    pub fingerprint_exclude: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub secrets: Option<Vec<String>>,
    pub secrets_env: Option<String>,
    pub tolerance: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub name: Option<String>,
    pub key: Option<RawKey>,
    pub scope: Option<String>,
    pub scope_missing: Option<String>,
    pub limit: i64,
    pub per: String,
    pub burst: Option<i64>,
    pub shadow: Option<bool>,
    pub cost_header: Option<String>,
    pub cost_missing: Option<i64>,
    pub count_statuses: Option<Vec<String>>,
    pub overrides: Option<Vec<RawQuotaOverride>>,
}

/// A table or an array of tables. Not `#[serde(untagged)]`: that would replace the
/// table's own errors (an unknown field, a wrong type) with "did not match any variant".
#[derive(Debug)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The tables in file order, each with its index when the file has an array.
    pub fn iter(&self) -> impl Iterator<Item = (Option<usize>, &T)> {
        let (one, many) = match self {
            OneOrMany::One(one) => (Some(one), &[][..]),
            OneOrMany::Many(many) => (None, &many[..]),
        };
        one.into_iter()
            .map(|t| (None, t))
            .chain(many.iter().enumerate().map(|(i, t)| (Some(i), t)))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table or an array of tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(OneOrMany::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(OneOrMany::Many)
            }
        }
        deserializer.deserialize_any(Visit(std::marker::PhantomData))
    }
}

/// `[[routes.quota.overrides]]`: one key's own quota.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuotaOverride {
    pub key: String,
    pub limit: i64,
    pub per: Option<String>,
    pub burst: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSerial {
    pub key: Option<RawKey>,
    pub permits: Option<i64>,
    pub max_wait: Option<String>,
    pub max_queue: Option<i64>,
    pub max_hold: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSingleFlight {
    pub key: Option<RawKey>,
    pub scope: Option<String>,
    pub scope_missing: Option<String>,
    pub methods: Option<Vec<String>>,
    pub max_body: Option<String>,
    pub vary: Option<Vec<String>>,
    pub reuse_for: Option<String>,
}

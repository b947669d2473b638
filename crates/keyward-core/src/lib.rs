//! Core types shared by every keyward layer and store.
//!
//! keyward gives services "one coordinator per key". Every request yields a [`Key`]
//! (through a [`KeyExtractor`]); the key is scoped by the principal and the route into a
//! [`ScopedKey`], and a store coordinates all requests sharing that scoped key.
//!
//! This crate holds what layers and stores agree on:
//!
//! - [`Key`], [`KeyHash`], [`ScopedKey`]: what is coordinated, and how it is named in
//!   storage and in telemetry (raw keys never appear in telemetry, only [`KeyHash`]).
//! - [`KeyExtractor`], [`KeySpec`]: how a key is taken from a request; [`canon`]: the one
//!   spelling of a path and query that routes and keys see.
//! - [`store`]: the store traits each layer needs, shaped so that a remote store (Redis)
//!   answers each decision in one round trip.
//! - [`Problem`]: RFC 9457 `application/problem+json` rejections with stable `type` values.
//! - [`KeywardBody`]: the response body every layer returns.
//! - [`grpc`]: gRPC requests get their rejections as gRPC statuses (the mapping table).
//! - [`gcra`]: quotas and the GCRA decision; [`ratelimit`]: the IETF RateLimit headers.
//! - [`telemetry`]: span, field, metric and outcome names (stable: dashboards use them).
#![forbid(unsafe_code)]

mod body;
pub mod canon;
mod extract;
mod fencing;
pub mod gcra;
pub mod grpc;
mod idempotency_key;
pub mod ip;
pub mod json;
mod key;
pub mod problem;
pub mod ratelimit;
pub mod store;
pub mod telemetry;

pub use body::KeywardBody;
pub use extract::{
    BufferedBody, ClientIp, DEFAULT_IPV6_PREFIX, KeyError, KeyExtractor, KeySpec, PathParams,
    PathTemplate, PeerAddr, SpecError,
};
pub use fencing::FencingToken;
pub use idempotency_key::{IdempotencyKeyError, MAX_IDEMPOTENCY_KEY_LEN, parse_idempotency_key};
pub use key::{Key, KeyHash, KeyHashSecretSet, Scope, ScopedKey, set_key_hash_secret};
pub use problem::Problem;

//! keyward: one coordinator per key.
//!
//! Tower layers that coordinate all requests sharing a key, through a store shared by
//! every instance that uses it:
//!
//! | layer | guarantees |
//! |---|---|
//! | [`IdempotencyLayer`] | a retried request takes effect once; the retry gets the first response |
//! | [`QuotaLayer`] | each key gets `limit` requests per `per` (GCRA, burst), with IETF RateLimit headers |
//! | [`SingleFlightLayer`] | concurrent identical requests share one inner call (`Keyward-Coalesced: true`) |
//! | [`PerKeySerialLayer`] | at most one request per key runs at a time, FIFO, with fencing tokens |
//!
//! Stores: [`MemoryStore`] (feature `memory`, default) for one process; `RedisStore`
//! (feature `redis`) for many processes sharing one Redis or Redis Cluster.
//!
//! The key of each request comes from a [`KeySpec`] (`header:NAME`, `path:PARAM`,
//! `query:NAME`, `peer_ip`, `method_uri`, or a list of them) or any closure implementing
//! [`KeyExtractor`]. Rejections are RFC 9457 problem responses
//! ([`keyward_core::problem::types`]); gRPC requests get them as gRPC statuses
//! ([`keyward_core::grpc`] has the mapping).
//!
//! # Telemetry
//!
//! Every decision is a `tracing` span (`keyward.idempotency`, ...; names in
//! [`keyward_core::telemetry`]) carrying the key's hash, never the key. Every layer also
//! records OpenTelemetry metrics: `keyward_decisions_total{layer,route,outcome}`,
//! `keyward_wait_seconds{layer,route}` and `keyward_store_seconds{op}`. Instruments come
//! from `opentelemetry::global::meter("keyward")` when the layer is built, or from the
//! meter passed to the layer's `.meter()`; with no meter provider they are no-ops.
//! With the feature `bound-instruments` the points go through handles bound to their
//! attributes (OpenTelemetry's experimental bound instruments, in the API and the SDK):
//! no attribute hashing per request; a meter provider other than the SDK must then
//! implement `SyncInstrument::bind`.
//!
//! ```
//! use keyward::{IdempotencyLayer, MemoryStore};
//! use opentelemetry::metrics::MeterProvider as _;
//!
//! # fn provider() -> impl opentelemetry::metrics::MeterProvider {
//! #     opentelemetry::metrics::noop::NoopMeterProvider::new()
//! # }
//! // Any meter provider: the OpenTelemetry SDK's, with an OTLP or Prometheus reader.
//! let meter = provider().meter("keyward");
//! let layer = IdempotencyLayer::new(MemoryStore::new())
//!     .route("payments")
//!     .meter(&meter);
//! assert!(format!("{layer:?}").contains("payments"));
//! ```
//!
//! Feature `opentelemetry`: a single-flight follower's span is linked (through
//! `tracing-opentelemetry`) to the span of the leader whose response it received, and
//! records the leader's trace id as `keyward.leader_trace_id`.
#![forbid(unsafe_code)]

pub mod buffered_body;
pub mod defaults;
pub mod idempotency;
#[cfg(feature = "memory")]
mod memory;
mod pipeline;
pub mod quota;
pub mod serial;
mod sharded;
pub mod single_flight;
mod telemetry;
pub mod webhook;

pub use buffered_body::{AnyBody, BodyCheck, BufferedBodyLayer, BufferedBodyService};
pub use idempotency::{IdempotencyLayer, IdempotencyService, OnInFlight};
pub use keyward_core::store::OnStoreError;
pub use keyward_core::{FencingToken, Key, KeyExtractor, KeySpec, KeywardBody};
#[cfg(feature = "redis")]
pub use keyward_redis::{BuildError as RedisBuildError, RedisStore, RedisStoreBuilder};
#[cfg(feature = "memory")]
pub use memory::{MemoryStore, MemoryStoreBuilder, TableSize, TableSizes};
pub use pipeline::ScopeMissing;
pub use quota::{QuotaLayer, QuotaService};
#[allow(deprecated)]
pub use serial::PerKeySerial;
pub use serial::{PerKeySerialLayer, PerKeySerialService};
pub use single_flight::{LeaderFailure, SingleFlightLayer, SingleFlightService};
pub use telemetry::{DecisionReporter, DecisionSink, ReportedDecision};

/// The core types, re-exported.
pub use keyward_core as core;

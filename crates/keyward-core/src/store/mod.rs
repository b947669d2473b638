//! The store traits the layers coordinate through.
//!
//! Every decision a layer makes is one method call, so that a remote store can answer it
//! in one round trip (one Lua script on Redis). Implementations: `keyward::MemoryStore`
//! (one process, bounded in-memory tables) and `keyward::RedisStore` (many processes).

mod idempotency;
mod quota;
mod serial;
mod single_flight;

pub use idempotency::{
    ClaimOutcome, Completion, Fingerprint, FingerprintBuilder, IdempotencyStore, RecordState,
    StoredResponse,
};
pub use quota::QuotaStore;
pub use serial::{AcquireOutcome, SerialLimits, SerialPermit, SerialStore};
pub use single_flight::{FlightRole, Landing, LeadOrReuse, SingleFlightStore};

use std::time::Duration;

/// A store that failed to answer. What the layer does then is [`OnStoreError`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No answer within `store.timeout`.
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store could not be reached or refused the command.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with data this version cannot read.
    #[error("store returned malformed data: {0}")]
    Corrupt(String),
}

/// What a layer does when its store fails (`store.on_error`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnStoreError {
    /// Answer 503 `store-unavailable`: never run a request uncoordinated.
    #[default]
    Closed,
    /// Let the request through uncoordinated, counted as `store_error` and logged.
    Open,
}

//! `MemoryStore`: coordination inside one process, bounded in memory.

mod idempotency;
mod quota;
mod serial;
mod single_flight;

use std::fmt;
use std::sync::Arc;

use idempotency::IdempotencyTable;
use quota::QuotaTable;
use serial::SerialTable;
use single_flight::FlightLeads;

/// A store for one process: every layer's records live in bounded in-memory tables
/// (moka caches with per-entry expiry where records expire; plain maps where entries
/// only exist while requests are in flight; for quotas, a sharded map of one integer per
/// key whose idle keys are swept).
///
/// Cloning is cheap and clones share the same tables: build one store and hand clones to
/// every layer.
///
/// ```
/// use keyward::MemoryStore;
/// let store = MemoryStore::builder().max_response_bytes(64 * 1024 * 1024).build();
/// let clone = store.clone();
/// # drop((store, clone));
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    idempotency: IdempotencyTable,
    serial: SerialTable,
    quota: QuotaTable,
    single_flight: FlightLeads,
}

impl MemoryStore {
    /// A store with default limits (256 MiB of stored responses).
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to set the limits.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_response_bytes: crate::defaults::DEFAULT_MEMORY_MAX_RESPONSE_BYTES,
            max_quota_keys: crate::defaults::DEFAULT_MEMORY_MAX_QUOTA_KEYS,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

/// Limits of a [`MemoryStore`].
#[derive(Clone, Debug)]
pub struct MemoryStoreBuilder {
    max_response_bytes: u64,
    max_quota_keys: usize,
}

impl MemoryStoreBuilder {
    /// Upper bound on the bytes of completed idempotent responses kept for replay; the
    /// least valuable records are evicted first when it is reached. In-flight claims are
    /// never evicted.
    pub fn max_response_bytes(mut self, bytes: u64) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Upper bound on quota keys held at once (default 2^20, about 100 bytes plus the key
    /// length each). Idle keys are dropped; while the table is full of active keys, new
    /// keys get a store error and the layer's `on_store_error` applies.
    pub fn max_quota_keys(mut self, keys: usize) -> Self {
        self.max_quota_keys = keys;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                idempotency: IdempotencyTable::new(self.max_response_bytes),
                serial: SerialTable::new(),
                quota: QuotaTable::new(self.max_quota_keys),
                single_flight: FlightLeads::new(),
            }),
        }
    }
}

//! `MemoryStore`: coordination inside one process, bounded in memory.

mod completed;
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

/// A store for one process: every layer's records live in bounded in-memory tables,
/// sharded maps of what each record really holds (completed idempotency responses,
/// bounded in bytes and expiring after their TTL; quota keys, whose idle keys are swept;
/// claims, serial keys and flights, which only exist while requests are in flight).
/// [`MemoryStore::table_sizes`] reports each table's entries and bytes.
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
            max_claims: crate::defaults::DEFAULT_MEMORY_MAX_CLAIMS,
            max_serial_keys: crate::defaults::DEFAULT_MEMORY_MAX_SERIAL_KEYS,
            max_reuse_bytes: crate::defaults::DEFAULT_MEMORY_MAX_REUSE_BYTES,
        }
    }

    /// How big each table is right now: entries, and the bytes they hold as the store
    /// accounts them (each entry's key, payload and its share of the table, counted
    /// high), with the table's bounds. For an exporter to scrape every few seconds, not
    /// for the request path: it takes every shard lock in turn and walks the entries of
    /// the tables that only hold live requests or keys.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use keyward::MemoryStore;
    /// use keyward_core::gcra::Quota;
    /// use keyward_core::store::QuotaStore;
    /// use keyward_core::{Key, Scope, ScopedKey};
    ///
    /// let store = MemoryStore::builder().max_quota_keys(1000).build();
    /// let key = ScopedKey::new("quota", "search", Scope::Unscoped, Key::from("tenant-a"));
    /// store.check(&key, &Quota::per_minute(10).unwrap(), 1).await.unwrap();
    ///
    /// let sizes = store.table_sizes();
    /// assert_eq!(sizes.quota_keys.entries, 1);
    /// assert!(sizes.quota_keys.bytes > key.storage_key().len() as u64);
    /// assert_eq!(sizes.quota_keys.max_entries, Some(1024)); // 1000, rounded up to 64 shards
    /// assert_eq!(sizes.idempotency_records.entries, 0);
    /// assert_eq!(sizes.idempotency_records.max_bytes, Some(256 << 20));
    /// # });
    /// ```
    pub fn table_sizes(&self) -> TableSizes {
        let inner = &self.inner;
        let (entries, bytes) = inner.idempotency.completed().size();
        let idempotency_records = TableSize {
            entries,
            bytes,
            max_entries: None,
            max_bytes: Some(inner.idempotency.completed().max_bytes()),
        };
        let (entries, bytes) = inner.idempotency.claims_size();
        let idempotency_claims = TableSize {
            entries,
            bytes,
            max_entries: Some(inner.idempotency.max_claims()),
            max_bytes: None,
        };
        let (entries, bytes) = inner.quota.size();
        let quota_keys = TableSize {
            entries,
            bytes,
            max_entries: Some(inner.quota.max_keys()),
            max_bytes: None,
        };
        let (entries, bytes) = inner.serial.size();
        let serial_keys = TableSize {
            entries,
            bytes,
            max_entries: Some(inner.serial.max_keys()),
            max_bytes: None,
        };
        let (entries, bytes) = inner.single_flight.size();
        let single_flight_leads = TableSize {
            entries,
            bytes,
            max_entries: None,
            max_bytes: None,
        };
        let (entries, bytes, max_bytes) = inner.single_flight.kept_size();
        let single_flight_kept = TableSize {
            entries,
            bytes,
            max_entries: None,
            max_bytes: Some(max_bytes),
        };
        TableSizes {
            idempotency_records,
            idempotency_claims,
            quota_keys,
            serial_keys,
            single_flight_leads,
            single_flight_kept,
        }
    }
}

/// One table of a [`MemoryStore`], as [`MemoryStore::table_sizes`] reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSize {
    /// Entries held.
    pub entries: usize,
    /// Heap bytes they hold, as accounted: keys, payloads and per-entry overhead.
    pub bytes: u64,
    /// The bound on entries, for tables bounded in entries.
    pub max_entries: Option<usize>,
    /// The bound on bytes, for tables bounded in bytes.
    pub max_bytes: Option<u64>,
}

/// Every table of a [`MemoryStore`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableSizes {
    /// Completed idempotency responses kept for replay (bounded in bytes; evicted oldest
    /// first).
    pub idempotency_records: TableSize,
    /// Idempotency keys whose request is in flight (bounded in entries; never evicted).
    pub idempotency_claims: TableSize,
    /// Quota keys whose bucket is not full (bounded in entries; idle keys swept).
    pub quota_keys: TableSize,
    /// Serial keys held, with their waiters (bounded in entries; never evicted).
    pub serial_keys: TableSize,
    /// Single-flight flights in progress among layers sharing this store (bounded by
    /// concurrency: one per request leading a flight).
    pub single_flight_leads: TableSize,
    /// Single-flight responses kept for `reuse_for` after their flight landed (bounded in
    /// bytes, [`MemoryStoreBuilder::max_reuse_bytes`]; evicted oldest first).
    pub single_flight_kept: TableSize,
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
    max_claims: usize,
    max_serial_keys: usize,
    max_reuse_bytes: u64,
}

impl MemoryStoreBuilder {
    /// Upper bound on the heap bytes of single-flight responses kept for reuse
    /// (`SingleFlightLayer::reuse_for`; default 64 MiB), accounted like idempotency
    /// records (see [`Self::max_response_bytes`]); the oldest are evicted first. A
    /// response heavier than the whole bound is not kept (followers then lead anew).
    pub fn max_reuse_bytes(mut self, bytes: u64) -> Self {
        self.max_reuse_bytes = bytes;
        self
    }

    /// Upper bound on the heap bytes of completed idempotent responses kept for replay
    /// (default 256 MiB). Each record is accounted by what it holds: its body, header
    /// names and values (6 bytes more each), key (counted twice: once more for the
    /// eviction queue), and 355 bytes of record and table overhead, so
    /// this bounds memory, not just payload. The oldest records are evicted first when it
    /// is reached. In-flight claims are never evicted (see [`Self::max_claims`]).
    pub fn max_response_bytes(mut self, bytes: u64) -> Self {
        self.max_response_bytes = bytes;
        self
    }

    /// Upper bound on quota keys held at once (default 2^20; each 57 bytes, whatever the
    /// key's length: the table keeps a 128-bit digest of the key, not the key). Idle keys are dropped; while the table is
    /// full of active keys, new keys get a store error and the layer's `on_store_error`
    /// applies. Rounded up to a multiple of 64 (the table's shards).
    pub fn max_quota_keys(mut self, keys: usize) -> Self {
        self.max_quota_keys = keys;
        self
    }

    /// Upper bound on idempotency keys in flight at once (default 2^16; each 299 bytes
    /// plus the key's length: 2^16 claims of 64-byte keys are 23 MiB). Claims are never evicted: while the table is full,
    /// a request with a new key gets a store error (with the layer's default
    /// `on_store_error`, 503 with `Retry-After`), and replays and requests for keys in
    /// flight are answered as usual. Rounded up to a multiple of 64.
    pub fn max_claims(mut self, claims: usize) -> Self {
        self.max_claims = claims;
        self
    }

    /// Upper bound on keys `PerKeySerialLayer` holds at once (default 2^16; each 198
    /// bytes plus the key's length, and 160 bytes per waiter, at most the route's
    /// `max_queue` per key). Held keys are
    /// never evicted: while the table is full, a request for a key nobody holds gets a
    /// store error (503 with `Retry-After` by default). Rounded up to a multiple of 64.
    pub fn max_serial_keys(mut self, keys: usize) -> Self {
        self.max_serial_keys = keys;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                idempotency: IdempotencyTable::new(self.max_response_bytes, self.max_claims),
                serial: SerialTable::new(self.max_serial_keys),
                quota: QuotaTable::new(self.max_quota_keys),
                single_flight: FlightLeads::new(self.max_reuse_bytes),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-entry sizes README "Memory" and the builder's docs state.
    #[test]
    fn documented_per_entry_bytes_match_the_accounting() {
        let record = completed::Record::weight(0, 0);
        let claim = idempotency::CLAIM_OVERHEAD;
        let quota = quota::KEY_BYTES;
        let serial = serial::KEY_OVERHEAD;
        let waiter = serial::WAITER_BYTES;
        let lead = single_flight::LEAD_OVERHEAD;
        assert_eq!(
            (record, claim, quota, serial, waiter, lead),
            (355, 299, 57, 198, 160, 162)
        );
    }
}

//! The default of every setting the layers and the memory store have, for code that must
//! state them (the sidecar's config, docs, tests) instead of retyping the numbers.
//!
//! ```
//! use std::time::Duration;
//! use keyward::defaults;
//!
//! assert_eq!(defaults::DEFAULT_IDEMPOTENCY_TTL, Duration::from_secs(24 * 60 * 60));
//! assert_eq!(defaults::DEFAULT_SERIAL_MAX_QUEUE, 64);
//! ```

use std::time::Duration;

/// How long `IdempotencyLayer` replays a completed response: 24 h.
pub const DEFAULT_IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long an idempotency claim lasts without renewal: 30 s.
pub const DEFAULT_IDEMPOTENCY_LEASE: Duration = Duration::from_secs(30);
/// Largest request body `IdempotencyLayer` reads and fingerprints: 1 MiB.
pub const DEFAULT_IDEMPOTENCY_MAX_BODY: usize = 1024 * 1024;
/// Largest response body `IdempotencyLayer` stores for replay: 1 MiB.
pub const DEFAULT_IDEMPOTENCY_MAX_RESPONSE: usize = 1024 * 1024;
/// How long `IdempotencyLayer` retries storing a response (keeping the claim) before it
/// releases the key: 5 s.
pub const DEFAULT_IDEMPOTENCY_RECORD_RETRY: Duration = Duration::from_secs(5);

/// Longest a request waits for its turn in `PerKeySerialLayer`: 5 s.
pub const DEFAULT_SERIAL_MAX_WAIT: Duration = Duration::from_secs(5);
/// Most requests waiting for one key in `PerKeySerialLayer`: 64.
pub const DEFAULT_SERIAL_MAX_QUEUE: usize = 64;

/// Largest response `SingleFlightLayer` copies to followers: 8 MiB.
pub const DEFAULT_SINGLE_FLIGHT_MAX_BODY: usize = 8 * 1024 * 1024;
/// How long a flight is led in the store before another instance may take over: 30 s.
pub const DEFAULT_SINGLE_FLIGHT_LEASE: Duration = Duration::from_secs(30);

/// Bytes of completed idempotent responses a `MemoryStore` keeps: 256 MiB.
pub const DEFAULT_MEMORY_MAX_RESPONSE_BYTES: u64 = 256 * 1024 * 1024;
/// Bytes of single-flight responses a `MemoryStore` keeps for `reuse_for`: 64 MiB.
pub const DEFAULT_MEMORY_MAX_REUSE_BYTES: u64 = 64 * 1024 * 1024;
/// Quota keys a `MemoryStore` holds at once: 2^20.
pub const DEFAULT_MEMORY_MAX_QUOTA_KEYS: usize = 1 << 20;
/// Idempotency keys a `MemoryStore` holds in flight at once: 2^16.
pub const DEFAULT_MEMORY_MAX_CLAIMS: usize = 1 << 16;
/// Keys `PerKeySerialLayer` holds at once in a `MemoryStore`: 2^16.
pub const DEFAULT_MEMORY_MAX_SERIAL_KEYS: usize = 1 << 16;

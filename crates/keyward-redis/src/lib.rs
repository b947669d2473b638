//! `RedisStore`: keyward's coordination store shared by many processes through Redis.
//!
//! Every decision of a layer is ONE round trip: one Lua script, run with `EVALSHA`
//! (loaded again by itself after Redis lost its script cache). Holders get leases and
//! strictly increasing per-key fencing tokens; waiters are woken through pub/sub (one
//! subscriber connection per store), with a fallback timer bounded by the holder's lease,
//! never by polling.
//!
//! - **Connections**: `redis://` and `rediss://` (TLS, feature `tls`), `AUTH` in the URL
//!   (`redis://user:password@host:6379/0`), or Redis Cluster ([`RedisStoreBuilder::cluster`],
//!   one [`RedisStoreBuilder::url`] per seed node; dead seeds are skipped).
//!   A standalone connection is a `ConnectionManager`: it reconnects by itself when Redis
//!   returns. A cluster connection follows failovers: see `conn.rs` (retries only what
//!   provably did not run, rebuilds from the seeds on stale-topology errors and timeouts,
//!   checks `CLUSTER SLOTS` every [`RedisStoreBuilder::topology_refresh`]). The store is built without waiting for Redis, so an application starts (and
//!   applies its `OnStoreError` policy) while Redis is down.
//! - **Timeouts**: every call is bounded by [`RedisStoreBuilder::timeout`] (default 50 ms)
//!   and then fails with `StoreError::Timeout`; errors map to `StoreError::Unavailable`,
//!   unreadable replies to `StoreError::Corrupt`.
//! - **Key layout**: `{prefix}{layer}:{route}:{<tag>}` where `<tag>` is 32 hex digits of
//!   the SHA-256 of the scoped key: raw keys and principals never reach Redis, and all
//!   records of one key share a cluster hash tag (one slot).
//! - **Layers**: every store trait of keyward is implemented. Idempotency: claim /
//!   complete / release / renew. Quota: one GCRA script on Redis `TIME`, exact to the
//!   nanosecond (`quota.rs`). Serial: a FIFO lease lock per key with heartbeats while
//!   held ([`RedisStoreBuilder::serial_lease`]), pub/sub hand-over and fencing tokens
//!   (`serial.rs`). Single flight: one leader across instances, its landing handed to
//!   followers on other instances (`single_flight.rs`).
//!
//! - **Waiting**: every store keeps ONE subscriber connection (the hub) on the channel
//!   `{prefix}settled`. Scripts that let go of a key publish the record's name there, but
//!   only when a duplicate has seen the key held (field `w`), so the common path publishes
//!   nothing. A waiter registers with the hub, checks the record once, then sleeps until
//!   the message or `min(max, lease left)`. The hub pings its connection every second,
//!   reconnects and resubscribes by itself and then wakes every waiter to check again
//!   (messages sent meanwhile are lost).
//! - **Stored responses**: a compact binary record (status, headers, trailers, body), see
//!   the format in `src/codec.rs`; unreadable records are `StoreError::Corrupt`.
//! - **Requirements**: Redis 7 or later (or Valkey 7.2): every script opens with a shebang
//!   that declares its flags (`script.rs`), so a replica redirects writers with `MOVED`.
//!   Tested with Redis 7.0, standalone, Cluster (with replicas, across failovers), TLS and
//!   `AUTH`.
//! - **Eviction**: run Redis with `maxmemory-policy noeviction`; any other policy can
//!   evict live claims and locks ([`RedisStore::maxmemory_policies`] tells).
//!
//! ```
//! use std::time::Duration;
//! use keyward_redis::RedisStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), keyward_redis::BuildError> {
//! // Nothing is contacted yet: the first decision connects.
//! let store = RedisStore::builder()
//!     .url("redis://:secret@127.0.0.1:6379/0")
//!     .prefix("shop:")
//!     .timeout(Duration::from_millis(25))
//!     .build()?;
//! assert_eq!(store.prefix(), "shop:");
//! assert_eq!(store.timeout(), Duration::from_millis(25));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

// Adding a store trait (quota, serial, single flight) takes:
// - `scripts/<layer>/<decision>.lua`: one script per decision, all keys in `KEYS` and named
//   with `KeyLayout::record` (+ `KeyLayout::companion` for more records of the same key:
//   same hash tag, same cluster slot). Held records use the fields `s = 'h'` and
//   `t = token` so that `scripts/watch.lua` and `RedisStore::wait_released` serve their
//   waiters; a script that lets go publishes the record name on `KeyLayout::channel` when
//   the record has `w` set.
// - `<layer>.rs`: `static` `Script`s made with `script!(writes|deletes|reads: files..)`
//   (add them to what `RedisStore::ping` preloads; a script issuing fencing tokens
//   includes `fencing.lua`, or `fencing_set.lua` when it issues them only for a key with
//   no record; every `redis.call` costs Redis ~0.6 µs beyond the command, and every byte
//   handed to Lua is hashed there: see BENCHMARKS.md) and `impl <Layer>Store for RedisStore` calling `self.eval(..)`
//   (bounded by the timeout, errors mapped to `StoreError`); decode each reply into an
//   enum in `reply.rs`, and wait with `hub::Watch::armed`.

mod builder;
mod codec;
mod conn;
mod hub;
mod idempotency;
mod keys;
mod quota;
mod reply;
mod script;
mod serial;
mod single_flight;
mod util;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keyward_core::store::StoreError;
use redis::Script;

pub use builder::{BuildError, RedisStoreBuilder};
pub use quota::RedisCheckFuture;

use conn::{Conn, bounded};
use hub::Hub;
use keys::KeyLayout;

/// A store shared by every process that uses the same Redis and prefix.
///
/// Cloning is cheap; clones share the connection and the pub/sub hub. Build one store per
/// process and hand clones to every layer.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    keys: KeyLayout,
    timeout: Duration,
    hub: Hub,
    runtime: tokio::runtime::Handle,
    /// Random per store ([`util::instance_id`]): claim nonces and serial waiter ids never
    /// repeat across processes.
    instance: u64,
    claims: std::sync::atomic::AtomicU64,
    serial: serial::SerialState,
}

impl RedisStore {
    /// A builder; at least one [`RedisStoreBuilder::url`] is required.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// A standalone store at `url` with default settings.
    pub fn new(url: impl Into<String>) -> Result<Self, BuildError> {
        Self::builder().url(url).build()
    }

    /// The prefix of every Redis key and channel of this store.
    pub fn prefix(&self) -> &str {
        self.inner.keys.prefix()
    }

    /// The bound on every store call.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Checks that Redis answers (for readiness probes) and loads the store's scripts, so
    /// the first decisions need no extra round trip.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let conn = &self.inner.conn;
        bounded(self.inner.timeout, async {
            conn.query::<String>(&redis::cmd("PING")).await?;
            for script in idempotency::SCRIPTS
                .iter()
                .chain(quota::SCRIPTS.iter())
                .chain(serial::SCRIPTS.iter())
                .chain(single_flight::SCRIPTS.iter())
            {
                conn.load(script).await?;
            }
            conn.load(&WATCH).await
        })
        .await
    }

    /// The `maxmemory-policy` of Redis (of every primary of a cluster), distinct and
    /// sorted, from `INFO memory` (which managed services keep even where `CONFIG` is
    /// renamed). Anything but `noeviction` lets Redis evict live claims, locks and fencing
    /// counters under memory pressure: a key then runs twice, or two holders overlap.
    pub async fn maxmemory_policies(&self) -> Result<Vec<String>, StoreError> {
        let conn = &self.inner.conn;
        let info: redis::Value = bounded(
            self.inner.timeout,
            conn.query(redis::cmd("INFO").arg("memory")),
        )
        .await?;
        let mut policies = Vec::new();
        collect_policies(&info, &mut policies);
        if policies.is_empty() {
            return Err(StoreError::Corrupt(
                "INFO memory has no maxmemory_policy line".to_owned(),
            ));
        }
        policies.sort();
        policies.dedup();
        Ok(policies)
    }

    /// Whether the pub/sub subscription that wakes waiters is currently live (waiters
    /// still wake by their fallback timers when it is not).
    pub fn is_subscribed(&self) -> bool {
        self.inner.hub.is_subscribed()
    }

    /// How many records local waiters are registered for (test instrumentation: it must
    /// drop back to zero once waiters are gone).
    #[doc(hidden)]
    pub fn watched_records(&self) -> usize {
        self.inner.hub.watched()
    }

    /// A value no other claim on any store carries: this store's random id and a counter.
    fn nonce(&self) -> [u8; 16] {
        let n = self
            .inner
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut nonce = [0; 16];
        nonce[..8].copy_from_slice(&self.inner.instance.to_be_bytes());
        nonce[8..].copy_from_slice(&n.to_be_bytes());
        nonce
    }

    /// Runs `work` in the background (see [`util::spawn`]). Never blocks.
    fn spawn_detached(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        drop(util::spawn(&self.inner.runtime, work));
    }

    /// Runs `script`, bounded by the store timeout.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let result = bounded(self.inner.timeout, self.inner.conn.eval(script, keys, args)).await;
        if let Err(StoreError::Timeout(_)) = &result {
            self.inner.conn.timed_out();
        }
        result
    }

    /// Waits until `holder` no longer holds `record`, a settlement message arrives, or
    /// `min(max, lease left)` passes. For every layer whose records use the `s`/`t`/`w`
    /// fields (see `scripts/watch.lua`).
    async fn wait_released(
        &self,
        record: &str,
        holder: keyward_core::FencingToken,
        max: Duration,
    ) -> Result<(), StoreError> {
        let deadline = tokio::time::Instant::now() + max;
        let watch = self.inner.hub.watch(record);
        let mut armed = watch.armed();
        let token = holder.get().to_string();
        let lease_left: i64 = self.eval(&WATCH, &[record], &[token.as_bytes()]).await?;
        let Ok(lease_left) = u64::try_from(lease_left) else {
            return Ok(());
        };
        armed
            .sleep(deadline, Duration::from_millis(lease_left))
            .await;
        Ok(())
    }
}

/// Every `maxmemory_policy:` line of an `INFO` reply (a cluster answers per node).
fn collect_policies(value: &redis::Value, into: &mut Vec<String>) {
    use redis::Value;
    match value {
        Value::BulkString(bytes) => {
            for line in String::from_utf8_lossy(bytes).lines() {
                if let Some(policy) = line.trim().strip_prefix("maxmemory_policy:") {
                    into.push(policy.to_owned());
                }
            }
        }
        Value::VerbatimString { text, .. } | Value::SimpleString(text) => {
            collect_policies(&Value::BulkString(text.as_bytes().to_vec()), into);
        }
        Value::Array(items) | Value::Set(items) => {
            items.iter().for_each(|item| collect_policies(item, into));
        }
        Value::Map(pairs) => pairs.iter().for_each(|(_, v)| collect_policies(v, into)),
        _ => {}
    }
}

static WATCH: std::sync::LazyLock<Script> = script::script!(writes: "watch.lua");

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix())
            .field("timeout", &self.inner.timeout)
            .field(
                "mode",
                &match self.inner.conn {
                    Conn::Standalone(_) => "standalone",
                    Conn::Cluster(_) => "cluster",
                },
            )
            .finish_non_exhaustive()
    }
}

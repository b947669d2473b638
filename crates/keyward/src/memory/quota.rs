//! Quota state in memory: one TAT (`u64` nanoseconds) per key.
//!
//! Not moka: a quota decision is a read-modify-write of one integer, and moka's
//! concurrent cache (epoch-based bookkeeping, an access-order log, a second hash for its
//! frequency sketch) costs several times the whole GCRA step; with it the decision was
//! far over the goal of 1.5x governor's keyed `check_key` (see `benches/results/quota.md`).
//! Instead, like governor's keyed store, the crate's sharded table
//! ([`crate::sharded`]: 64 mutex-guarded maps, the key hashed once per request):
//!
//! - The decision runs under the shard lock, so it is atomic per key without CAS loops.
//! - Keys are not kept: each shard's map is keyed by a 128-bit digest of the storage key
//!   (the table's SipHash and a second SipHash under independent random keys), with the
//!   TAT beside it, 24 bytes and no allocation per key. Two keys would share a bucket only
//!   if both digests collided, about 2^-108 for a million keys, and clients cannot aim at
//!   it (the hash keys are random per process). Measured with dhat
//!   (`benches/memory.rs`): 91 heap bytes per key with the key's `Arc<str>` kept (for a
//!   31-byte key, plus the allocator's block header), 33 with digests.
//! - Bounded: at most `max_keys` entries (split evenly over the shards). A key whose TAT
//!   is in the past is equivalent to no entry (its bucket is full), so idle keys are
//!   dropped by sweeps: a shard is swept when it is touched and its last sweep is older
//!   than [`SWEEP_INTERVAL`], and when it is full ([`FULL_SWEEP_GAP`] apart). Each shard
//!   remembers a lower bound of its entries' TATs, so it never sweeps when nothing can
//!   have gone idle: a full shard of active keys answers in O(1). After a sweep, a map
//!   that is mostly empty gives its memory back (`shrink_to`).
//! - When a shard is full of active keys, a new key gets a store error (the layer's
//!   `on_store_error` decides) rather than evicting an active key, which would reset its
//!   quota.
//!
//! Time is tokio's clock, as nanoseconds since the table was created, so that
//! `tokio::time::pause()` drives quotas in tests.

use std::collections::HashMap;
use std::future::{Ready, ready};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::mem::size_of;
use std::time::Duration;

use keyward_core::ScopedKey;
use keyward_core::gcra::{GcraStep, Quota, QuotaDecision};
use keyward_core::store::{QuotaStore, StoreError};
use tokio::time::Instant;

use super::MemoryStore;
use crate::sharded::{PassThrough, SHARDS, ShardedTable};

/// A touched shard is swept for idle keys at most this often.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A full shard is swept at most this often.
pub(super) const FULL_SWEEP_GAP: Duration = Duration::from_millis(10);

/// Heap bytes of one quota key, counted high: its map slot (digest, TAT, control byte)
/// at the map's lowest load (7/16, just after it doubled). Nothing else is allocated per
/// key.
pub(super) const KEY_BYTES: usize = (size_of::<Digest>() + size_of::<u64>() + 1) * 16 / 7;

pub(super) struct QuotaTable {
    /// Sharding, locking and the first hash come from the crate's sharded table; its own
    /// maps (keyed by whole keys) stay empty, the TATs live in each shard's [`Tats`].
    tats: ShardedTable<(), Tats>,
    /// The second, independent hash of the digest.
    check: RandomState,
    epoch: Instant,
    shard_capacity: usize,
}

/// A storage key as the quota table remembers it: two independent 64-bit SipHashes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Digest {
    hash: u64,
    check: u64,
}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The map's pass-through hasher takes the first hash as it is.
        state.write_u64(self.hash);
    }
}

/// A shard's TATs and sweep bookkeeping.
struct Tats {
    map: HashMap<Digest, u64, BuildHasherDefault<PassThrough>>,
    /// No entry's TAT is below this: nothing can be idle before it.
    min_tat: u64,
    last_sweep: u64,
}

impl QuotaTable {
    pub(super) fn new(max_keys: usize) -> Self {
        QuotaTable {
            tats: ShardedTable::with_state(|| Tats {
                map: HashMap::default(),
                min_tat: u64::MAX,
                last_sweep: 0,
            }),
            check: RandomState::new(),
            epoch: Instant::now(),
            shard_capacity: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    fn now(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.epoch);
        // Nanosecond 0 means "no record": the clock starts at 1.
        u64::try_from(elapsed.as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    pub(super) fn check(
        &self,
        key: &ScopedKey,
        quota: &Quota,
        cost: u32,
    ) -> Result<QuotaDecision, StoreError> {
        self.step(key, |tat, now| quota.decide(tat, now, cost))
    }

    /// The decision without taking anything.
    pub(super) fn peek(
        &self,
        key: &ScopedKey,
        quota: &Quota,
        cost: u32,
    ) -> Result<QuotaDecision, StoreError> {
        self.step(key, |tat, now| GcraStep {
            new_tat: None,
            decision: quota.decide(tat, now, cost).decision,
        })
    }

    /// Takes `cost` units, into debt if need be.
    pub(super) fn charge(
        &self,
        key: &ScopedKey,
        quota: &Quota,
        cost: u32,
    ) -> Result<QuotaDecision, StoreError> {
        self.step(key, |tat, now| quota.charge(tat, now, cost))
    }

    /// Runs one GCRA step (`decide(stored TAT, now)`) on `key` under its shard lock and
    /// stores the TAT it answers.
    #[inline]
    fn step(
        &self,
        key: &ScopedKey,
        decide: impl Fn(u64, u64) -> GcraStep,
    ) -> Result<QuotaDecision, StoreError> {
        let now = self.now();
        let storage_key = key.storage_key();
        let probe = self.tats.probe(storage_key);
        let digest = Digest {
            hash: probe.hash(),
            check: self.check.hash_one(storage_key),
        };
        let mut guard = self.tats.lock(&probe);
        let shard = &mut guard.extra;
        sweep_if_due(shard, now, SWEEP_INTERVAL);
        if let Some(tat) = shard.map.get_mut(&digest) {
            let step = decide(*tat, now);
            if let Some(new_tat) = step.new_tat {
                *tat = new_tat;
            }
            return Ok(step.decision);
        }
        let step = decide(0, now);
        // A TAT at or before `now` is a full bucket: nothing to remember.
        let Some(new_tat) = step.new_tat.filter(|tat| *tat > now) else {
            return Ok(step.decision);
        };
        if shard.map.len() >= self.shard_capacity {
            sweep_if_due(shard, now, FULL_SWEEP_GAP);
            if shard.map.len() >= self.shard_capacity {
                return Err(StoreError::Unavailable(format!(
                    "quota table full: {} active keys in one shard (max_quota_keys / {SHARDS})",
                    self.shard_capacity
                )));
            }
        }
        shard.min_tat = shard.min_tat.min(new_tat);
        shard.map.insert(digest, new_tat);
        Ok(step.decision)
    }

    /// Drops every idle key now; returns how many were dropped.
    pub(super) fn evict_idle(&self) -> usize {
        let now = self.now();
        self.tats
            .each_shard()
            .map(|mut shard| {
                let before = shard.extra.map.len();
                sweep(&mut shard.extra, now);
                before - shard.extra.map.len()
            })
            .sum()
    }

    /// Keys held and their accounted bytes ([`KEY_BYTES`] each).
    pub(super) fn size(&self) -> (usize, u64) {
        let entries = self.len();
        (entries, (entries * KEY_BYTES) as u64)
    }

    pub(super) fn max_keys(&self) -> usize {
        self.shard_capacity * SHARDS
    }

    pub(super) fn len(&self) -> usize {
        self.tats
            .each_shard()
            .map(|shard| shard.extra.map.len())
            .sum()
    }
}

fn sweep_if_due(shard: &mut Tats, now: u64, gap: Duration) {
    let gap = u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX);
    let due = shard.last_sweep.saturating_add(gap);
    if now >= shard.min_tat && now >= due {
        sweep(shard, now);
    }
}

fn sweep(shard: &mut Tats, now: u64) {
    let mut min_tat = u64::MAX;
    shard.map.retain(|_, tat| {
        let active = *tat > now;
        if active {
            min_tat = min_tat.min(*tat);
        }
        active
    });
    shard.min_tat = min_tat;
    shard.last_sweep = now;
    let map = &mut shard.map;
    if map.capacity() > 64 && map.len() * 4 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

impl QuotaStore for MemoryStore {
    type CheckFuture = Ready<Result<QuotaDecision, StoreError>>;

    fn check(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        ready(self.inner.quota.check(key, quota, cost))
    }

    fn peek(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        ready(self.inner.quota.peek(key, quota, cost))
    }

    fn charge(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        ready(self.inner.quota.charge(key, quota, cost))
    }

    fn charge_detached(&self, key: ScopedKey, quota: Quota, cost: u32) {
        if let Err(error) = self.inner.quota.charge(&key, &quota, cost) {
            tracing::warn!(%error, key_hash = %key.key_hash(), cost, "quota charge not recorded");
        }
    }
}

impl MemoryStore {
    /// Drops every quota key that is idle (its bucket is full again) and returns how many
    /// were dropped. Touched shards are swept automatically about once a second; call this
    /// from a timer only if the process may sit idle for long holding many keys.
    pub fn evict_idle_quotas(&self) -> usize {
        self.inner.quota.evict_idle()
    }

    /// Number of quota keys held (idle ones included until swept). For tests and
    /// debugging; takes every shard lock.
    #[doc(hidden)]
    pub fn quota_entry_count(&self) -> usize {
        self.inner.quota.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_core::{Key, Scope};

    fn key(n: usize) -> ScopedKey {
        ScopedKey::new("quota", "r", Scope::Unscoped, Key::from(format!("k{n}")))
    }

    #[tokio::test(start_paused = true)]
    async fn full_table_refuses_new_keys_until_they_idle() {
        let table = QuotaTable::new(SHARDS); // one key per shard
        let quota = Quota::per_second(1).unwrap();
        let mut refused = 0;
        for n in 0..1000 {
            if table.check(&key(n), &quota, 1).is_err() {
                refused += 1;
            }
        }
        assert_eq!(table.len(), SHARDS);
        assert_eq!(refused, 1000 - SHARDS);
        // Known keys are still decided while the table is full.
        let known = (0..1000)
            .find(|n| {
                table
                    .check(&key(*n), &quota, 0)
                    .is_ok_and(|d| d.remaining == 0)
            })
            .unwrap();
        assert!(!table.check(&key(known), &quota, 1).unwrap().is_allowed());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(table.check(&key(5000), &quota, 1).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_keeps_active_keys() {
        let table = QuotaTable::new(1000);
        let short = Quota::per_second(1).unwrap();
        let long = Quota::per_minute(1).unwrap();
        table.check(&key(1), &short, 1).unwrap();
        table.check(&key(2), &long, 1).unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(table.evict_idle(), 1);
        assert_eq!(table.len(), 1);
        assert!(!table.check(&key(2), &long, 1).unwrap().is_allowed());
    }

    #[tokio::test(start_paused = true)]
    async fn peeks_take_nothing_and_charges_go_into_debt() {
        let table = QuotaTable::new(1000);
        let quota = Quota::per_second(10).unwrap();
        assert_eq!(table.peek(&key(1), &quota, 1).unwrap().remaining, 9);
        assert_eq!(table.len(), 0, "a peek stores nothing");
        let charged = table.charge(&key(1), &quota, 30).unwrap();
        assert_eq!(charged.remaining, 0);
        assert_eq!(charged.reset_after, Duration::from_secs(3));
        let waiting = table.peek(&key(1), &quota, 1).unwrap();
        assert_eq!(waiting.retry_after(), Some(Duration::from_millis(2100)));
        tokio::time::advance(Duration::from_millis(2100)).await;
        assert!(table.peek(&key(1), &quota, 1).unwrap().is_allowed());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_cost_on_a_new_key_stores_nothing() {
        let table = QuotaTable::new(1000);
        let decision = table
            .check(&key(1), &Quota::per_second(5).unwrap(), 0)
            .unwrap();
        assert_eq!(decision.remaining, 5);
        assert_eq!(table.len(), 0);
    }
}

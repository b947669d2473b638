//! Quota state in memory: one TAT (`u64` nanoseconds) per key.
//!
//! Not moka: a quota decision is a read-modify-write of one integer, and moka's
//! concurrent cache (epoch-based bookkeeping, an access-order log, a second hash for its
//! frequency sketch) costs several times the whole GCRA step; with it the decision was
//! far over the goal of 1.5x governor's keyed `check_key` (see `benches/results/quota.md`).
//! Instead, like governor's keyed store, a sharded map:
//!
//! - 64 shards, each a `Mutex<HashMap>` keyed by the storage key with its SipHash
//!   (`RandomState`, so clients cannot aim collisions at one bucket or one shard)
//!   computed once: the shard is picked from bits of that hash and the map reuses it
//!   through a pass-through hasher.
//! - The decision runs under the shard lock, so it is atomic per key without CAS loops.
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

use std::borrow::Borrow;
use std::collections::HashMap;
use std::future::{Ready, ready};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keyward_core::ScopedKey;
use keyward_core::gcra::{Quota, QuotaDecision};
use keyward_core::store::{QuotaStore, StoreError};
use tokio::time::Instant;

use super::MemoryStore;

const SHARDS: usize = 64;
/// A touched shard is swept for idle keys at most this often.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// A full shard is swept at most this often.
pub(super) const FULL_SWEEP_GAP: Duration = Duration::from_millis(10);

pub(super) struct QuotaTable {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    epoch: Instant,
    shard_capacity: usize,
}

struct Shard {
    tats: HashMap<SlotKey, u64, BuildHasherDefault<PassThrough>>,
    /// No entry's TAT is below this: nothing can be idle before it.
    min_tat: u64,
    last_sweep: u64,
}

/// A storage key with its precomputed hash.
struct SlotKey {
    hash: u64,
    key: Arc<str>,
}

/// What a look-up needs: the hash and the key. `dyn Lookup` lets the map be searched
/// with a borrowed `(hash, &str)`, so a hit costs no `Arc` clone.
trait Lookup {
    fn hash(&self) -> u64;
    fn key(&self) -> &str;
}

impl Lookup for SlotKey {
    fn hash(&self) -> u64 {
        self.hash
    }

    fn key(&self) -> &str {
        &self.key
    }
}

impl Lookup for (u64, &str) {
    fn hash(&self) -> u64 {
        self.0
    }

    fn key(&self) -> &str {
        self.1
    }
}

impl<'a> Borrow<dyn Lookup + 'a> for SlotKey {
    fn borrow(&self) -> &(dyn Lookup + 'a) {
        self
    }
}

impl Hash for dyn Lookup + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(Lookup::hash(self));
    }
}

impl PartialEq for dyn Lookup + '_ {
    fn eq(&self, other: &Self) -> bool {
        Lookup::hash(self) == Lookup::hash(other) && self.key() == other.key()
    }
}

impl Eq for dyn Lookup + '_ {}

// Must agree with `dyn Lookup` (the `Borrow` contract).
impl Hash for SlotKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for SlotKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl Eq for SlotKey {}

/// Hands the precomputed SipHash to the map unchanged.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in rather than drop it.
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

impl QuotaTable {
    pub(super) fn new(max_keys: usize) -> Self {
        QuotaTable {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tats: HashMap::default(),
                        min_tat: u64::MAX,
                        last_sweep: 0,
                    })
                })
                .collect(),
            hasher: RandomState::new(),
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

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // Bits the map itself does not use for buckets (low) or control bytes (top 7).
        let index = (hash >> 40) as usize % SHARDS;
        // Every critical section leaves the map consistent, so a poisoned lock is safe.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn check(
        &self,
        key: &ScopedKey,
        quota: &Quota,
        cost: u32,
    ) -> Result<QuotaDecision, StoreError> {
        let now = self.now();
        let storage_key = key.storage_key();
        let hash = self.hasher.hash_one(storage_key);
        let mut shard = self.shard(hash);
        shard.sweep_if_due(now, SWEEP_INTERVAL);
        if let Some(tat) = shard.tats.get_mut(&(hash, storage_key) as &dyn Lookup) {
            let step = quota.decide(*tat, now, cost);
            if let Some(new_tat) = step.new_tat {
                *tat = new_tat;
            }
            return Ok(step.decision);
        }
        let step = quota.decide(0, now, cost);
        // A TAT at or before `now` is a full bucket: nothing to remember.
        let Some(new_tat) = step.new_tat.filter(|tat| *tat > now) else {
            return Ok(step.decision);
        };
        if shard.tats.len() >= self.shard_capacity {
            shard.sweep_if_due(now, FULL_SWEEP_GAP);
            if shard.tats.len() >= self.shard_capacity {
                return Err(StoreError::Unavailable(format!(
                    "quota table full: {} active keys in one shard (max_quota_keys / {SHARDS})",
                    self.shard_capacity
                )));
            }
        }
        shard.min_tat = shard.min_tat.min(new_tat);
        let slot = SlotKey {
            hash,
            key: key.shared_storage_key(),
        };
        shard.tats.insert(slot, new_tat);
        Ok(step.decision)
    }

    /// Drops every idle key now; returns how many were dropped.
    pub(super) fn evict_idle(&self) -> usize {
        let now = self.now();
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
                let before = shard.tats.len();
                shard.sweep(now);
                before - shard.tats.len()
            })
            .sum()
    }

    pub(super) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|p| p.into_inner()).tats.len())
            .sum()
    }
}

impl Shard {
    fn sweep_if_due(&mut self, now: u64, gap: Duration) {
        let gap = u64::try_from(gap.as_nanos()).unwrap_or(u64::MAX);
        if now >= self.min_tat && now >= self.last_sweep.saturating_add(gap) {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: u64) {
        let mut min_tat = u64::MAX;
        self.tats.retain(|_, tat| {
            let active = *tat > now;
            if active {
                min_tat = min_tat.min(*tat);
            }
            active
        });
        self.min_tat = min_tat;
        self.last_sweep = now;
        if self.tats.capacity() > 64 && self.tats.len() * 4 < self.tats.capacity() {
            self.tats.shrink_to(self.tats.len() * 2);
        }
    }
}

impl QuotaStore for MemoryStore {
    type CheckFuture = Ready<Result<QuotaDecision, StoreError>>;

    fn check(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        ready(self.inner.quota.check(key, quota, cost))
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
    async fn zero_cost_on_a_new_key_stores_nothing() {
        let table = QuotaTable::new(1000);
        let decision = table
            .check(&key(1), &Quota::per_second(5).unwrap(), 0)
            .unwrap();
        assert_eq!(decision.remaining, 5);
        assert_eq!(table.len(), 0);
    }
}

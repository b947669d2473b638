//! The one sharded table behind every in-memory map keyed by a storage key: the memory
//! store's claims, quota TATs, serial queues and single-flight leads, and the
//! single-flight layer's table of flights.
//!
//! - 64 shards, each a `Mutex` around a `HashMap` and an optional per-shard state `X`
//!   (the quota table keeps its sweep bookkeeping there).
//! - A key is hashed once per request with SipHash under per-table random keys
//!   (`RandomState`), so clients cannot aim collisions at one bucket or one shard. The
//!   hash picks the shard and is reused by the shard's map through a pass-through hasher,
//!   instead of hashing the storage key again for every look-up, insert and remove.
//! - Look-ups take a borrowed [`Probe`] (hash and `&str`), so a hit costs no `Arc`
//!   clone; only inserts take an owned [`SlotKey`].
//! - Callers keep every critical section to map operations that cannot panic halfway,
//!   so a poisoned lock still guards a consistent map and is reused.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shards per table.
pub(crate) const SHARDS: usize = 64;

/// A storage key with its hash, as a table holds it.
#[derive(Clone, Debug)]
pub(crate) struct SlotKey {
    hash: u64,
    key: Arc<str>,
}

/// A storage key with its hash, borrowed: what look-ups take.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Probe<'a> {
    hash: u64,
    key: &'a str,
}

impl Probe<'_> {
    /// The key's hash under the table's keys (the quota table keys its own maps by it).
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    /// The owned key to insert under; `key` is the string this probe was made from.
    pub(crate) fn slot(&self, key: Arc<str>) -> SlotKey {
        debug_assert_eq!(&*key, self.key, "a slot is made from its probe's key");
        SlotKey {
            hash: self.hash,
            key,
        }
    }
}

impl SlotKey {
    /// The key itself, shared (the completed-record table tells a current entry from a
    /// replaced one by `Arc::ptr_eq`).
    pub(crate) fn key(&self) -> &Arc<str> {
        &self.key
    }

    /// The borrowed form of this key, for look-ups.
    pub(crate) fn probe(&self) -> Probe<'_> {
        Probe {
            hash: self.hash,
            key: &self.key,
        }
    }
}

/// What the map compares: the hash and the key. `dyn Lookup` lets a map of [`SlotKey`]s
/// be searched with a [`Probe`].
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

impl Lookup for Probe<'_> {
    fn hash(&self) -> u64 {
        self.hash
    }

    fn key(&self) -> &str {
        self.key
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
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; fold anything else in rather than drop it.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

/// One shard's map.
pub(crate) type Map<V> = HashMap<SlotKey, V, BuildHasherDefault<PassThrough>>;

/// One shard: its map and the table's per-shard state.
pub(crate) struct Shard<V, X = ()> {
    pub(crate) map: Map<V>,
    pub(crate) extra: X,
}

impl<V, X> Shard<V, X> {
    pub(crate) fn get(&self, probe: &Probe<'_>) -> Option<&V> {
        self.map.get(probe as &dyn Lookup)
    }

    pub(crate) fn get_key_value(&self, probe: &Probe<'_>) -> Option<(&SlotKey, &V)> {
        self.map.get_key_value(probe as &dyn Lookup)
    }

    pub(crate) fn get_mut(&mut self, probe: &Probe<'_>) -> Option<&mut V> {
        self.map.get_mut(probe as &dyn Lookup)
    }

    pub(crate) fn remove(&mut self, probe: &Probe<'_>) -> Option<V> {
        let removed = self.map.remove(probe as &dyn Lookup);
        self.shrink_if_sparse();
        removed
    }

    /// Removes and returns the entry with its key, so it can be put back without
    /// allocating a new key.
    pub(crate) fn remove_entry(&mut self, probe: &Probe<'_>) -> Option<(SlotKey, V)> {
        let removed = self.map.remove_entry(probe as &dyn Lookup);
        self.shrink_if_sparse();
        removed
    }

    /// A map that grew in a burst keeps its capacity after the burst; give most of it
    /// back once it is under a quarter full. Halving only when a quarter is used keeps
    /// the rehash amortized: the map must shed half its entries again before the next.
    fn shrink_if_sparse(&mut self) {
        let (len, capacity) = (self.map.len(), self.map.capacity());
        if capacity > 64 && len * 4 < capacity {
            self.map.shrink_to(len * 2);
        }
    }

    pub(crate) fn insert(&mut self, key: SlotKey, value: V) -> Option<V> {
        self.map.insert(key, value)
    }

    pub(crate) fn entry(&mut self, key: SlotKey) -> Entry<'_, SlotKey, V> {
        self.map.entry(key)
    }
}

/// A map from storage keys to `V`, in [`SHARDS`] mutex-guarded shards with per-shard
/// state `X`.
pub(crate) struct ShardedTable<V, X = ()> {
    shards: Box<[Mutex<Shard<V, X>>]>,
    hasher: RandomState,
}

impl<V, X: Default> ShardedTable<V, X> {
    pub(crate) fn new() -> Self {
        Self::with_state(X::default)
    }
}

impl<V, X> ShardedTable<V, X> {
    /// A table whose shards start with the state `state()` makes.
    pub(crate) fn with_state(mut state: impl FnMut() -> X) -> Self {
        ShardedTable {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: Map::default(),
                        extra: state(),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
        }
    }

    /// Hashes `key` for this table.
    pub(crate) fn probe<'a>(&self, key: &'a str) -> Probe<'a> {
        Probe {
            hash: self.hasher.hash_one(key),
            key,
        }
    }

    /// Hashes an owned key for this table (for inserts and for keys kept across calls).
    pub(crate) fn slot(&self, key: Arc<str>) -> SlotKey {
        SlotKey {
            hash: self.hasher.hash_one(&*key),
            key,
        }
    }

    /// The shard holding `probe`'s key, locked.
    pub(crate) fn lock(&self, probe: &Probe<'_>) -> MutexGuard<'_, Shard<V, X>> {
        // The map uses the low bits for buckets and the top 7 for tags: shard by others.
        let index = ((probe.hash >> 40) as usize) % SHARDS;
        lock(&self.shards[index])
    }

    /// Shard `index` (modulo [`SHARDS`]), locked: for work that visits shards in turn.
    pub(crate) fn shard_at(&self, index: usize) -> MutexGuard<'_, Shard<V, X>> {
        lock(&self.shards[index % SHARDS])
    }

    /// Every shard in turn, locked one at a time (sweeps, counts).
    pub(crate) fn each_shard(&self) -> impl Iterator<Item = MutexGuard<'_, Shard<V, X>>> {
        self.shards.iter().map(lock)
    }

    /// Entries in all shards (takes every shard lock in turn).
    pub(crate) fn len(&self) -> usize {
        self.each_shard().map(|shard| shard.map.len()).sum()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_meet_and_different_keys_do_not() {
        let table: ShardedTable<u32> = ShardedTable::new();
        let a: Arc<str> = Arc::from("flight:r:-:GET /a");
        let probe = table.probe(&a);
        table.lock(&probe).insert(probe.slot(a.clone()), 1);
        let again = table.probe("flight:r:-:GET /a");
        assert_eq!(table.lock(&again).get(&again), Some(&1));
        let b = table.probe("flight:r:-:GET /b");
        assert_eq!(table.lock(&b).get(&b), None);
        // Same hash, different key: not equal.
        let forged = Probe {
            hash: probe.hash,
            key: "other",
        };
        assert_eq!(table.lock(&forged).get(&forged), None);
        assert_eq!(table.len(), 1);
        let (slot, value) = table.lock(&again).remove_entry(&again).unwrap();
        assert_eq!((slot.probe().key, value), ("flight:r:-:GET /a", 1));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_map_gives_its_memory_back_after_a_burst() {
        let table: ShardedTable<u32> = ShardedTable::new();
        let keys: Vec<Arc<str>> = (0..20_000).map(|i| Arc::from(format!("k{i}"))).collect();
        for key in &keys {
            let probe = table.probe(key);
            table.lock(&probe).insert(probe.slot(key.clone()), 1);
        }
        let grown: usize = table.each_shard().map(|s| s.map.capacity()).sum();
        assert!(grown >= 20_000);
        for key in &keys {
            let probe = table.probe(key);
            table.lock(&probe).remove(&probe);
        }
        let after: usize = table.each_shard().map(|s| s.map.capacity()).sum();
        assert!(after <= SHARDS * 64 * 2, "{after} slots kept of {grown}");
    }

    #[test]
    fn per_shard_state_starts_from_its_constructor() {
        let table: ShardedTable<u32, u64> = ShardedTable::with_state(|| 7);
        assert!(table.each_shard().all(|shard| shard.extra == 7));
        assert_eq!(table.each_shard().count(), SHARDS);
    }
}

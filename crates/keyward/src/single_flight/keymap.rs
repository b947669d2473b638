//! A sharded map of in-flight entries whose key is hashed once per request: the hash
//! picks the shard and is reused by the shard's map, instead of hashing the storage key
//! again for every look-up, insert and remove.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 64;

/// A storage key with its hash.
#[derive(Clone, Debug)]
pub(crate) struct HashedKey {
    hash: u64,
    key: Arc<str>,
}

impl PartialEq for HashedKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.key == other.key
    }
}

impl Eq for HashedKey {}

impl Hash for HashedKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Passes a [`HashedKey`]'s precomputed hash through.
#[derive(Default)]
pub(crate) struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `HashedKey`; fold anything else in all the same.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

pub(crate) type Map<V> = HashMap<HashedKey, V, BuildHasherDefault<PrehashedHasher>>;

/// Mutex-sharded map keyed by [`HashedKey`] (SipHash with per-map random keys, so keys
/// chosen by clients cannot be made to collide).
pub(crate) struct ShardedMap<V> {
    shards: Box<[Mutex<Map<V>>]>,
    hasher: RandomState,
}

impl<V> ShardedMap<V> {
    pub(crate) fn new() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| Mutex::new(Map::default())).collect(),
            hasher: RandomState::new(),
        }
    }

    /// Hashes `key` for this map.
    pub(crate) fn key(&self, key: Arc<str>) -> HashedKey {
        HashedKey {
            hash: self.hasher.hash_one(&*key),
            key,
        }
    }

    /// The shard holding `key`. Callers keep every critical section to single map
    /// operations, so a poisoned lock still guards a consistent map.
    pub(crate) fn shard(&self, key: &HashedKey) -> MutexGuard<'_, Map<V>> {
        // The map uses the low bits for buckets and the top 7 for tags: shard by others.
        let index = ((key.hash >> 40) as usize) % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Entries in all shards.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().map_or(0, |map| map.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_meet_and_different_keys_do_not() {
        let map: ShardedMap<u32> = ShardedMap::new();
        let a = map.key(Arc::from("flight:r:-:GET /a"));
        map.shard(&a).insert(a.clone(), 1);
        let again = map.key(Arc::from("flight:r:-:GET /a"));
        assert_eq!(map.shard(&again).get(&again), Some(&1));
        let b = map.key(Arc::from("flight:r:-:GET /b"));
        assert_eq!(map.shard(&b).get(&b), None);
        // Same hash, different key: not equal.
        let forged = HashedKey {
            hash: a.hash,
            key: Arc::from("other"),
        };
        assert_ne!(forged, a);
        assert_eq!(map.shard(&forged).get(&forged), None);
        assert_eq!(map.len(), 1);
    }
}

//! Hot keys: the most frequent key hashes per route, in bounded memory, for the admin
//! `GET /hotkeys`.
//!
//! Each route has a space-saving sketch (Metwally, Agrawal, El Abbadi 2005) of
//! [`CAPACITY`] counters. A key already tracked is incremented; a new key takes a free
//! counter, or, when all are taken, replaces the key with the smallest count `m` and
//! starts at `m + 1` with `error = m`. So every reported `count` overestimates the key's
//! true count by at most `error`, and any key seen more than `n / CAPACITY` times out of
//! `n` is guaranteed to be tracked.
//!
//! Only the telemetry-safe [`keyward_core::KeyHash`] strings from the decision spans are
//! stored, never raw keys. Routes are limited to [`MAX_ROUTES`] (they come from the
//! config, so this is only a guard); decisions on further routes are not tracked.
//!
//! Memory: a key hash is 16 hex digits, kept inline ([`InlineKey`], no allocation per
//! counter; anything longer is not a key hash and is not tracked), so a sketch is its
//! two fixed-size arrays: [`SKETCH_BYTES`] per route, at most [`MAX_BYTES`] in all.

use std::collections::{BTreeMap, HashMap};
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Counters per route.
pub const CAPACITY: usize = 64;

/// Routes tracked at most.
pub const MAX_ROUTES: usize = 1024;

/// Heap bytes of one route's sketch, counted high: the counters' vector, the index at its
/// capacity (made with room for twice the counters, 256 buckets for 64, so that the
/// tombstones a replacement leaves are cleaned by rehashing in place, never by growing),
/// the sketch itself in the
/// routes map's slot at that map's lowest load (7/16), and a route name of up to 64
/// bytes.
#[allow(
    dead_code,
    reason = "the size API for the metrics exporter, which is a later issue"
)]
pub const SKETCH_BYTES: usize = CAPACITY * size_of::<Counter>()
    + 256 * (size_of::<(InlineKey, usize)>() + 1)
    + (size_of::<(String, Sketch)>() + 1) * 16 / 7
    + 64;

/// Heap bytes of every sketch, at [`MAX_ROUTES`] routes.
#[allow(
    dead_code,
    reason = "the size API for the metrics exporter, which is a later issue"
)]
pub const MAX_BYTES: usize = MAX_ROUTES * SKETCH_BYTES;

/// A key hash of up to 16 bytes, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct InlineKey {
    len: u8,
    bytes: [u8; 16],
}

impl InlineKey {
    /// `None` for keys over 16 bytes (not a key hash).
    fn new(key: &str) -> Option<InlineKey> {
        let mut bytes = [0; 16];
        bytes.get_mut(..key.len())?.copy_from_slice(key.as_bytes());
        Some(InlineKey {
            len: key.len() as u8,
            bytes,
        })
    }

    fn as_str(&self) -> &str {
        // Only ever made from a `&str`, cut at its end.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Debug for InlineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One counter.
#[derive(Debug, Clone, Copy)]
struct Counter {
    key: InlineKey,
    count: u64,
    error: u64,
}

impl Counter {
    fn hot_key(&self) -> HotKey {
        HotKey {
            key_hash: self.key.as_str().to_owned(),
            count: self.count,
            error: self.error,
        }
    }
}

/// One tracked key of a route, as served by `/hotkeys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HotKey {
    /// The key's hash (16 hex digits), never the raw key.
    pub key_hash: String,
    /// Estimated hits: at least the true count, at most `error` more.
    pub count: u64,
    /// Largest possible overestimate of `count`.
    pub error: u64,
}

/// A space-saving sketch of at most `capacity` counters.
#[derive(Debug)]
pub struct Sketch {
    capacity: usize,
    entries: Vec<Counter>,
    /// Key hashes are keyed SHA-256 digests, which a client cannot steer: a fast
    /// hasher (a new key of a full sketch costs a removal and an insertion).
    index: HashMap<InlineKey, usize, foldhash::fast::RandomState>,
    /// No count is below it (see [`Sketch::min_slot`]).
    floor: u64,
    /// Where the next search for a smallest count starts.
    cursor: usize,
}

impl Sketch {
    /// An empty sketch keeping `capacity` counters (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Sketch {
            capacity,
            entries: Vec::with_capacity(capacity),
            index: HashMap::with_capacity_and_hasher(capacity * 2, Default::default()),
            floor: 0,
            cursor: 0,
        }
    }

    /// Counts one hit of `key_hash` (ignored if it is over 16 bytes: not a key hash).
    pub fn observe(&mut self, key_hash: &str) {
        let Some(key) = InlineKey::new(key_hash) else {
            return;
        };
        if let Some(entry) = self.index.get(&key).and_then(|&i| self.entries.get_mut(i)) {
            entry.count += 1;
            return;
        }
        if self.entries.len() < self.capacity {
            self.index.insert(key, self.entries.len());
            self.entries.push(Counter {
                key,
                count: 1,
                error: 0,
            });
            return;
        }
        // Full: the new key replaces the minimum and inherits its count as error.
        let slot = self.min_slot();
        let Some(entry) = self.entries.get_mut(slot) else {
            return;
        };
        self.index.remove(&entry.key);
        let min = entry.count;
        *entry = Counter {
            key,
            count: min + 1,
            error: min,
        };
        self.index.insert(key, slot);
    }

    /// A counter with the smallest count (the sketch is full). Counts only grow, so a
    /// count at `floor`, which no count is below, is a smallest one: the search goes on
    /// from where the last one stopped and usually ends at the first counter it looks at
    /// (a flood of new keys leaves them all at the floor). Only when none is at the
    /// floor any more does it look at every counter, and raise the floor to their
    /// minimum.
    fn min_slot(&mut self) -> usize {
        let n = self.entries.len();
        let mut lowest = (u64::MAX, 0);
        for step in 0..n {
            let slot = (self.cursor + step) % n;
            let count = self.entries[slot].count;
            if count <= self.floor {
                self.cursor = (slot + 1) % n;
                return slot;
            }
            if count < lowest.0 {
                lowest = (count, slot);
            }
        }
        self.floor = lowest.0;
        self.cursor = (lowest.1 + 1) % n;
        lowest.1
    }

    /// Number of counters in use (never more than the capacity).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The tracked keys by count, highest first (ties by hash, for stable output).
    pub fn top(&self) -> Vec<HotKey> {
        let mut top: Vec<HotKey> = self.entries.iter().map(Counter::hot_key).collect();
        top.sort_by(|a, b| b.count.cmp(&a.count).then(a.key_hash.cmp(&b.key_hash)));
        top
    }
}

/// The `/hotkeys` document: `{"routes": {"<route>": [HotKey, ...]}}`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub routes: BTreeMap<String, Vec<HotKey>>,
}

/// Hot-key sketches of all routes; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct HotKeys {
    routes: Arc<Mutex<HashMap<String, RouteSketch>>>,
}

/// One route's sketch. Requests count into it directly (the routing table holds it), so
/// a hit locks this route's sketch only, not every route's map.
pub type RouteSketch = Arc<Mutex<Sketch>>;

impl HotKeys {
    /// The sketch of `route`, made on first ask and the same one after a reload; `None`
    /// beyond [`MAX_ROUTES`] routes.
    pub fn route(&self, route: &str) -> Option<RouteSketch> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sketch) = routes.get(route) {
            return Some(sketch.clone());
        }
        if routes.len() >= MAX_ROUTES {
            return None;
        }
        let sketch = Arc::new(Mutex::new(Sketch::new(CAPACITY)));
        routes.insert(route.to_owned(), sketch.clone());
        Some(sketch)
    }

    /// Counts one hit of `key_hash` on `route`.
    #[cfg(test)]
    pub fn observe(&self, route: &str, key_hash: &str) {
        if let Some(sketch) = self.route(route) {
            sketch
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(key_hash);
        }
    }

    /// Routes tracked and counters in use, and the bytes they hold at most
    /// ([`SKETCH_BYTES`] per route): for an exporter.
    #[allow(
        dead_code,
        reason = "the size API for the metrics exporter, which is a later issue"
    )]
    pub fn size(&self) -> (usize, usize, usize) {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let counters = routes
            .values()
            .map(|sketch| {
                sketch
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entries
                    .len()
            })
            .sum();
        (routes.len(), counters, routes.len() * SKETCH_BYTES)
    }

    /// Every route's top keys, highest count first.
    pub fn report(&self) -> Report {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        Report {
            routes: routes
                .iter()
                .filter_map(|(route, sketch)| {
                    let sketch = sketch.lock().unwrap_or_else(|p| p.into_inner());
                    // A route is listed from its first hit on, as before it had a sketch
                    // of its own from the start.
                    (!sketch.entries.is_empty()).then(|| (route.clone(), sketch.top()))
                })
                .collect(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_key_with_90_percent_of_the_stream_comes_first_in_bounded_memory() {
        let mut sketch = Sketch::new(64);
        let hot = keyward_core::Key::from("hot").hash().to_string();
        let cold: Vec<String> = (0..999)
            .map(|i| {
                keyward_core::Key::from(format!("cold-{i}"))
                    .hash()
                    .to_string()
            })
            .collect();
        // 10k items, 1000 distinct keys: every tenth item is a cold key (each cold key
        // once, which churns the sketch as much as possible), the rest the hot key.
        let mut cold_seen = 0;
        for i in 0..10_000 {
            if i % 10 == 9 && cold_seen < cold.len() {
                sketch.observe(&cold[cold_seen]);
                cold_seen += 1;
            } else {
                sketch.observe(&hot);
            }
            assert!(sketch.len() <= 64);
        }
        assert_eq!(cold_seen, 999);
        assert_eq!(sketch.len(), 64);
        let top = sketch.top();
        assert_eq!(top[0].key_hash, hot);
        // Hot key seen 9001 times; space-saving overestimates by at most `error`.
        assert!(top[0].count >= 9001 && top[0].count - top[0].error <= 9001);
        assert!(top.windows(2).all(|w| w[0].count >= w[1].count));
        assert!(top.iter().skip(1).all(|e| e.count < 1000));
    }

    #[test]
    fn counts_are_exact_while_under_capacity_and_errors_bound_them_after() {
        let mut sketch = Sketch::new(2);
        for key in ["a", "a", "b", "a"] {
            sketch.observe(key);
        }
        let top = sketch.top();
        assert_eq!(
            (top[0].key_hash.as_str(), top[0].count, top[0].error),
            ("a", 3, 0)
        );
        assert_eq!((top[1].count, top[1].error), (1, 0));
        sketch.observe("c");
        let top = sketch.top();
        assert_eq!(top.len(), 2);
        let c = top.iter().find(|e| e.key_hash == "c").unwrap();
        assert_eq!((c.count, c.error), (2, 1));
        assert!(top.iter().all(|e| e.key_hash != "b"));
    }

    #[test]
    fn a_new_key_of_a_full_sketch_always_replaces_a_smallest_count() {
        // Against the plain definition (a scan for the minimum), over a stream that
        // mixes repeats of a few keys with floods of new ones.
        let mut sketch = Sketch::new(8);
        let mut state = 7_u64;
        for i in 0..5_000_u64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = if (state >> 33) % 3 == 0 {
                format!("hot-{}", (state >> 40) % 4)
            } else {
                format!("new-{i}")
            };
            let tracked = sketch.index.contains_key(&InlineKey::new(&key).unwrap());
            let full = sketch.entries.len() == 8;
            let min = sketch.entries.iter().map(|e| e.count).min().unwrap_or(0);
            sketch.observe(&key);
            if full && !tracked {
                let entry = sketch.entries[sketch.index[&InlineKey::new(&key).unwrap()]];
                assert_eq!((entry.count, entry.error), (min + 1, min), "item {i}");
            }
            assert!(sketch.entries.iter().all(|e| e.count >= sketch.floor));
        }
    }

    #[test]
    fn a_sketch_holds_no_allocation_per_key_and_longer_strings_are_not_tracked() {
        let mut sketch = Sketch::new(CAPACITY);
        let index_capacity = sketch.index.capacity();
        assert!(index_capacity < 256, "{index_capacity}");
        // Every key new: each one replaces the minimum, the worst churn of the index.
        for i in 0..20_000 {
            sketch.observe(&format!("{i:016x}"));
        }
        assert_eq!(sketch.entries.capacity(), CAPACITY);
        // `capacity` is entries plus room left, which tombstones lower until a rehash in
        // place: it never exceeds the first one unless the table grew.
        let now = sketch.index.capacity();
        assert!(
            now <= index_capacity,
            "the index grew: {now} > {index_capacity}"
        );
        sketch.observe("this is no key hash at all");
        assert!(sketch.top().iter().all(|e| e.key_hash.len() == 16));
        let hot = HotKeys::default();
        hot.observe("a", "0123456789abcdef");
        assert_eq!(hot.size(), (1, 1, SKETCH_BYTES));
        const { assert!(SKETCH_BYTES < 12 * 1024) };
    }

    #[test]
    fn routes_are_reported_separately() {
        let hot = HotKeys::default();
        hot.observe("a", "k1");
        hot.observe("b", "k2");
        hot.observe("b", "k2");
        let json = serde_json::to_value(hot.report()).unwrap();
        assert_eq!(json["routes"]["a"][0]["key_hash"], "k1");
        assert_eq!(json["routes"]["b"][0]["count"], 2);
        assert_eq!(json["routes"]["b"][0]["error"], 0);
    }
}

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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Counters per route.
pub const CAPACITY: usize = 64;

/// Routes tracked at most.
pub const MAX_ROUTES: usize = 1024;

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
    entries: Vec<HotKey>,
    index: HashMap<String, usize>,
}

impl Sketch {
    /// An empty sketch keeping `capacity` counters (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Sketch {
            capacity,
            entries: Vec::with_capacity(capacity),
            index: HashMap::with_capacity(capacity),
        }
    }

    /// Counts one hit of `key_hash`.
    pub fn observe(&mut self, key_hash: &str) {
        if let Some(entry) = self
            .index
            .get(key_hash)
            .and_then(|&i| self.entries.get_mut(i))
        {
            entry.count += 1;
            return;
        }
        if self.entries.len() < self.capacity {
            self.index.insert(key_hash.to_owned(), self.entries.len());
            self.entries.push(HotKey {
                key_hash: key_hash.to_owned(),
                count: 1,
                error: 0,
            });
            return;
        }
        // Full: the new key replaces the minimum and inherits its count as error.
        let Some((slot, _)) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.count) else {
            return;
        };
        let Some(entry) = self.entries.get_mut(slot) else {
            return;
        };
        self.index.remove(&entry.key_hash);
        let min = entry.count;
        *entry = HotKey {
            key_hash: key_hash.to_owned(),
            count: min + 1,
            error: min,
        };
        self.index.insert(key_hash.to_owned(), slot);
    }

    /// Number of counters in use (never more than the capacity).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The tracked keys by count, highest first (ties by hash, for stable output).
    pub fn top(&self) -> Vec<HotKey> {
        let mut top = self.entries.clone();
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
    routes: Arc<Mutex<HashMap<String, Sketch>>>,
}

impl HotKeys {
    /// Counts one hit of `key_hash` on `route`.
    pub fn observe(&self, route: &str, key_hash: &str) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sketch) = routes.get_mut(route) {
            sketch.observe(key_hash);
        } else if routes.len() < MAX_ROUTES {
            let mut sketch = Sketch::new(CAPACITY);
            sketch.observe(key_hash);
            routes.insert(route.to_owned(), sketch);
        }
    }

    /// Every route's top keys, highest count first.
    pub fn report(&self) -> Report {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        Report {
            routes: routes
                .iter()
                .map(|(route, sketch)| (route.clone(), sketch.top()))
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

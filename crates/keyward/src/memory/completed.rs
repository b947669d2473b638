//! Completed idempotency records in memory, bounded in bytes that are really held.
//!
//! Not moka: measured with dhat (`benches/memory.rs`), moka's bookkeeping for one entry
//! (its hash-table bucket, entry info, deque and timer-wheel nodes, an `Arc` around the
//! key) was ~260 bytes in 7 allocations, more than the whole small record it held. And a
//! record kept whatever its response pointed at: hyper parses an upstream's header values
//! as slices of the connection's 8 KiB read buffer, so each stored `HeaderMap` kept a
//! whole read buffer alive (~5.5 KiB per record in the sidecar, against ~300 accounted).
//!
//! So a record is stored compactly, and owns exactly what it holds:
//! - body, headers and trailers are copied into one exact-size buffer ([`Blob`]); a
//!   replay's body and header values are slices of it, no copy;
//! - the fingerprint, expiry and lengths sit beside it in one small box;
//! - every record's accounted weight ([`Record::weight`]) is what it holds in the heap,
//!   its key and its share of the table included, so the byte bound bounds memory.
//!
//! The table is the crate's [`ShardedTable`]; each shard keeps its keys in insertion
//! order. When the total weight passes the bound, the oldest records are evicted, shard
//! by shard in turn (oldest first within a shard; with equal TTLs, closest to expiry).
//! Expired records are dropped when their shard is next touched, at most once per
//! [`SWEEP_INTERVAL`], and by look-ups that find them.

use std::collections::VecDeque;
use std::mem::size_of;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use keyward_core::store::{Fingerprint, StoredResponse};
use tokio::time::Instant;

use crate::sharded::{SHARDS, Shard, ShardedTable, SlotKey};

/// A touched shard drops its expired records at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Heap bytes of one entry besides its record box, blob and key text, counted high:
/// the map slot (key, hash, box pointer and control byte) at the map's lowest load
/// (7/16, just after it doubled), the order queue's slot at its lowest load (1/2), the
/// `Arc` counts of the key, the blob's shared header (made on its first replay), and the
/// allocator's per-block overhead (16 bytes, glibc) for the record, blob, key and shared
/// header.
pub(super) const ENTRY_OVERHEAD: usize = (size_of::<SlotKey>() + size_of::<Box<Record>>() + 1) * 16
    / 7
    + size_of::<Arc<str>>() * 2
    + 16
    + 24
    + 4 * 16;

/// A stale key's share besides its text: its queue slot, `Arc` counts and block header.
const STALE_KEY_OVERHEAD: usize = size_of::<Arc<str>>() + 16 + 16;

/// A stored response, owned compactly.
pub(super) struct Record {
    fingerprint: Fingerprint,
    /// Nanoseconds since the table's epoch (tokio's clock).
    expires_at: u64,
    status: StatusCode,
    headers: u16,
    trailers: u16,
    has_trailers: bool,
    /// Accounted bytes, [`Record::weight`] at insertion.
    weight: u32,
    blob: Blob,
}

/// Body, then every header and trailer as `name_len: u16, value_len: u32, name, value`.
struct Blob {
    bytes: Bytes,
    body_len: usize,
}

impl Record {
    /// `None` if the response cannot be represented (more than 65535 headers, a header
    /// over 4 GiB): such a response is not stored.
    fn new(
        response: &StoredResponse,
        fingerprint: Fingerprint,
        expires_at: u64,
        key_len: usize,
    ) -> Option<Record> {
        let section = |map: &HeaderMap| {
            map.iter()
                .map(|(name, value)| 6 + name.as_str().len() + value.len())
                .sum::<usize>()
        };
        let len = response.body.len()
            + section(&response.headers)
            + response.trailers.as_ref().map_or(0, section);
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(&response.body);
        let mut put = |map: &HeaderMap| -> Option<u16> {
            for (name, value) in map {
                let name = name.as_str().as_bytes();
                bytes.extend_from_slice(&u16::try_from(name.len()).ok()?.to_le_bytes());
                bytes.extend_from_slice(&u32::try_from(value.len()).ok()?.to_le_bytes());
                bytes.extend_from_slice(name);
                bytes.extend_from_slice(value.as_bytes());
            }
            u16::try_from(map.len()).ok()
        };
        let headers = put(&response.headers)?;
        let trailers = match &response.trailers {
            Some(map) => put(map)?,
            None => 0,
        };
        debug_assert_eq!(bytes.len(), len, "the blob is sized exactly");
        let mut record = Record {
            fingerprint,
            expires_at,
            status: response.status,
            headers,
            trailers,
            has_trailers: response.trailers.is_some(),
            weight: 0,
            blob: Blob {
                bytes: Bytes::from(bytes),
                body_len: response.body.len(),
            },
        };
        record.weight = u32::try_from(Record::weight(len, key_len)).ok()?;
        Some(record)
    }

    /// What a record with a blob of `blob_len` bytes under a key of `key_len` bytes holds.
    /// The key is counted twice: a record that expired or was replaced leaves its key in
    /// the order queue until the queue is next compacted, at the shard's next sweep once
    /// stale keys outnumber live records (plus 16), so each record answers for one.
    pub(super) fn weight(blob_len: usize, key_len: usize) -> usize {
        size_of::<Record>() + blob_len + key_len + ENTRY_OVERHEAD + key_len + STALE_KEY_OVERHEAD
    }

    pub(super) fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    /// The response, rebuilt: body and header values are slices of the blob.
    pub(super) fn response(&self) -> StoredResponse {
        let bytes = &self.blob.bytes;
        let mut at = self.blob.body_len;
        let mut read = |count: u16| {
            let mut map = HeaderMap::with_capacity(usize::from(count));
            for _ in 0..count {
                let Some((name, value, next)) = entry_at(bytes, at) else {
                    break;
                };
                at = next;
                map.append(name, value);
            }
            map
        };
        let headers = read(self.headers);
        let trailers = self.has_trailers.then(|| read(self.trailers));
        StoredResponse {
            status: self.status,
            headers,
            body: bytes.slice(..self.blob.body_len),
            trailers,
        }
    }
}

/// The header stored at `at`, and where the next one starts. Everything in a blob was a
/// valid header when it was written, so `None` only guards against a bug.
fn entry_at(bytes: &Bytes, at: usize) -> Option<(HeaderName, HeaderValue, usize)> {
    let name_len = u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?);
    let value_len = u32::from_le_bytes(bytes.get(at + 2..at + 6)?.try_into().ok()?);
    let name_start = at + 6;
    let value_start = name_start + usize::from(name_len);
    let end = value_start + usize::try_from(value_len).ok()?;
    let name = HeaderName::from_bytes(bytes.get(name_start..value_start)?).ok()?;
    if end > bytes.len() {
        return None;
    }
    let value = HeaderValue::from_maybe_shared(bytes.slice(value_start..end)).ok()?;
    Some((name, value, end))
}

/// Per-shard bookkeeping.
#[derive(Default)]
struct Order {
    /// Keys in insertion order, oldest first. A key whose record was replaced or removed
    /// since is stale (its `Arc` is no longer the map's) and is skipped.
    keys: VecDeque<Arc<str>>,
    last_sweep: u64,
}

pub(super) struct CompletedTable {
    table: ShardedTable<Box<Record>, Order>,
    max_bytes: u64,
    /// Sum of the weights of the records held.
    bytes: AtomicU64,
    /// The shard the next eviction looks at first.
    evict_from: AtomicUsize,
    epoch: Instant,
}

impl CompletedTable {
    pub(super) fn new(max_bytes: u64) -> Self {
        CompletedTable {
            table: ShardedTable::new(),
            max_bytes,
            bytes: AtomicU64::new(0),
            evict_from: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.epoch);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Runs `found` on the live record under `key`, if there is one.
    pub(super) fn with<T>(
        &self,
        key: &str,
        found: impl FnOnce(&Record, Duration) -> T,
    ) -> Option<T> {
        let now = self.now();
        let probe = self.table.probe(key);
        let mut shard = self.table.lock(&probe);
        let record = shard.get(&probe)?;
        if record.expires_at > now {
            return Some(found(record, Duration::from_nanos(record.expires_at - now)));
        }
        if let Some(expired) = shard.remove(&probe) {
            self.forget(&expired);
        }
        None
    }

    /// Stores `response` under `key` for `ttl`; the caller then calls
    /// [`CompletedTable::evict_over_bound`] (after letting go of its own locks). A record
    /// heavier than the whole bound is not stored.
    pub(super) fn insert(
        &self,
        key: Arc<str>,
        fingerprint: Fingerprint,
        response: &StoredResponse,
        ttl: Duration,
    ) {
        let now = self.now();
        let ttl = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        let Some(record) = Record::new(response, fingerprint, now.saturating_add(ttl), key.len())
        else {
            return;
        };
        let weight = u64::from(record.weight);
        if weight > self.max_bytes {
            return;
        }
        let slot = self.table.slot(key.clone());
        let probe = slot.probe();
        {
            let mut shard = self.table.lock(&probe);
            self.sweep_if_due(&mut shard, now);
            // Removed first so that the map holds the new key, the one queued below.
            if let Some(replaced) = shard.remove(&probe) {
                self.forget(&replaced);
            }
            self.bytes.fetch_add(weight, Ordering::Relaxed);
            shard.insert(slot.clone(), Box::new(record));
            shard.extra.keys.push_back(key);
        }
    }

    /// Removes the live record under `key`, answering its status, fingerprint and the
    /// time it had left.
    pub(super) fn remove(&self, key: &str) -> Option<(StatusCode, Fingerprint, Duration)> {
        let now = self.now();
        let probe = self.table.probe(key);
        let mut shard = self.table.lock(&probe);
        let record = shard.remove(&probe)?;
        self.forget(&record);
        // Its key stays queued for eviction, stale: eviction and sweeps skip it.
        (record.expires_at > now).then(|| {
            (
                record.status(),
                *record.fingerprint(),
                Duration::from_nanos(record.expires_at - now),
            )
        })
    }

    fn forget(&self, record: &Record) {
        self.bytes
            .fetch_sub(u64::from(record.weight), Ordering::Relaxed);
    }

    /// Evicts oldest-first, one shard at a time (never two locks at once), until the
    /// table is within its bound or a whole round found nothing to evict.
    pub(super) fn evict_over_bound(&self) {
        let mut idle_shards = 0;
        while self.bytes.load(Ordering::Relaxed) > self.max_bytes && idle_shards < SHARDS {
            let index = self.evict_from.fetch_add(1, Ordering::Relaxed) % SHARDS;
            let mut shard = self.table.shard_at(index);
            let mut evicted = false;
            while let Some(key) = shard.extra.keys.pop_front() {
                let probe = self.table.probe(&key);
                let current = shard
                    .get_key_value(&probe)
                    .is_some_and(|(held, _)| Arc::ptr_eq(held.key(), &key));
                if current {
                    if let Some(record) = shard.remove(&probe) {
                        self.forget(&record);
                        evicted = true;
                        break;
                    }
                }
            }
            idle_shards = if evicted { 0 } else { idle_shards + 1 };
        }
    }

    fn sweep_if_due(&self, shard: &mut Shard<Box<Record>, Order>, now: u64) {
        if now
            < shard
                .extra
                .last_sweep
                .saturating_add(SWEEP_INTERVAL.as_nanos() as u64)
        {
            return;
        }
        shard.extra.last_sweep = now;
        let mut freed = 0;
        shard.map.retain(|_, record| {
            let live = record.expires_at > now;
            if !live {
                freed += u64::from(record.weight);
            }
            live
        });
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        // Stale keys are skipped by eviction, but would otherwise pile up behind live
        // ones (and keep their strings) when records expire rather than get evicted.
        if shard.extra.keys.len() > shard.map.len() * 2 + 16 {
            // Over one stale key per live record (plus 16): `Record::weight` counts one.
            let mut keys = std::mem::take(&mut shard.extra.keys);
            keys.retain(|key| {
                let probe = self.table.probe(key);
                shard
                    .get_key_value(&probe)
                    .is_some_and(|(held, _)| Arc::ptr_eq(held.key(), key))
            });
            keys.shrink_to(shard.map.len() * 2);
            shard.extra.keys = keys;
        }
        let (len, capacity) = (shard.map.len(), shard.map.capacity());
        if capacity > 64 && len * 4 < capacity {
            shard.map.shrink_to(len * 2);
        }
    }

    /// Records held and their accounted bytes (takes every shard lock in turn).
    pub(super) fn size(&self) -> (usize, u64) {
        (self.table.len(), self.bytes.load(Ordering::Relaxed))
    }

    pub(super) fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    #[cfg(test)]
    fn each_queue_len(&self) -> usize {
        self.table
            .each_shard()
            .map(|shard| shard.extra.keys.len())
            .sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn response(body: &str) -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-tag", HeaderValue::from_static("b"));
        StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::copy_from_slice(body.as_bytes()),
            trailers: None,
        }
    }

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    const TTL: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_record_replays_exactly_what_was_stored() {
        let table = CompletedTable::new(1 << 20);
        let mut stored = response("{\"ok\":true}");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        stored.trailers = Some(trailers);
        table.insert(Arc::from("k"), fp(1), &stored, TTL);
        let (replayed, fingerprint) = table
            .with("k", |record, _| (record.response(), *record.fingerprint()))
            .unwrap();
        assert_eq!(replayed, stored);
        assert_eq!(fingerprint, fp(1));
        // No trailers stays no trailers (not an empty map).
        table.insert(Arc::from("plain"), fp(1), &response("x"), TTL);
        let plain = table.with("plain", |record, _| record.response()).unwrap();
        assert_eq!(plain.trailers, None);
        assert_eq!(plain.headers.get_all("x-tag").iter().count(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_bound_holds_and_the_oldest_records_go_first() {
        let weight = Record::weight(
            11 + 6 * 3 + "content-typeapplication/jsonx-tagax-tagb".len(),
            "key-0000".len(),
        ) as u64;
        let table = CompletedTable::new(weight * 100);
        for i in 0..1000 {
            table.insert(
                Arc::from(format!("key-{i:04}")),
                fp(1),
                &response("{\"ok\":true}"),
                TTL,
            );
            table.evict_over_bound();
            let (_, bytes) = table.size();
            assert!(bytes <= weight * 100, "{bytes} over the bound after {i}");
        }
        let (entries, bytes) = table.size();
        assert_eq!(bytes, weight * entries as u64);
        assert!(entries >= 90, "{entries}");
        // Eviction goes shard by shard, oldest first in each: old keys are gone, the
        // newest are kept.
        assert!(table.with("key-0000", |_, _| ()).is_none());
        assert!(table.with("key-0999", |_, _| ()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn expired_records_are_dropped_and_their_bytes_given_back() {
        let table = CompletedTable::new(1 << 20);
        for i in 0..500 {
            table.insert(Arc::from(format!("old-{i}")), fp(1), &response("x"), TTL);
        }
        tokio::time::advance(TTL + SWEEP_INTERVAL).await;
        assert!(table.with("old-1", |_, _| ()).is_none());
        // Touching every shard sweeps it.
        for i in 0..2000 {
            table.insert(
                Arc::from(format!("new-{i}")),
                fp(1),
                &response("x"),
                Duration::from_secs(1),
            );
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        for i in 0..2000 {
            table.insert(Arc::from(format!("newer-{i}")), fp(1), &response("x"), TTL);
        }
        let (entries, bytes) = table.size();
        assert_eq!(entries, 2000);
        assert!(table.each_queue_len() <= entries * 2 + 16 * SHARDS);
        let blob = 1 + 6 * 3 + "content-typeapplication/jsonx-tagax-tagb".len();
        let expected: usize = (0..2000)
            .map(|i| Record::weight(blob, format!("newer-{i}").len()))
            .sum();
        assert_eq!(
            bytes, expected as u64,
            "expired records gave their bytes back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_larger_than_the_bound_is_not_stored() {
        let table = CompletedTable::new(100);
        table.insert(Arc::from("k"), fp(1), &response("x"), TTL);
        assert_eq!(table.size(), (0, 0));
    }
}

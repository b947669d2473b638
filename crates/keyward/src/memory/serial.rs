//! Per-key FIFO mutexes (and, with several permits per key, FIFO semaphores) in memory.
//!
//! An entry exists only while its key is held: it is created by the first acquire and
//! removed when the last holder releases with nobody waiting, so the table's size is
//! bounded by concurrency, not by the number of keys ever seen. Waiters queue behind the
//! holder, each with a oneshot channel; a release hands the key (with a fresh token)
//! directly to the first waiter, so a woken waiter never has to race for it.
//!
//! Tokens come from one counter for the whole table: strictly increasing per key even
//! across the key's entry being removed and created again.
//!
//! Bounded anyway, since concurrency is what a flood raises: at most `max_serial_keys`
//! keys held at once (split evenly over the shards), each with at most the route's
//! `max_queue` waiters. A new key arriving at a full shard gets a store error (503 with
//! `Retry-After` under the layer's default `on_store_error`); held keys are never
//! evicted, and known keys still queue.

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};

use keyward_core::store::{AcquireOutcome, SerialLimits, SerialPermit, SerialStore, StoreError};
use keyward_core::{FencingToken, ScopedKey};
use tokio::sync::oneshot;

use super::MemoryStore;
use crate::sharded::{SHARDS, ShardedTable, SlotKey};

/// Heap bytes of one held key besides its key text and waiters, counted high: the map
/// slot at the map's lowest load (7/16), the key's `Arc` counts and 16 bytes of
/// allocator overhead for the key.
pub(super) const KEY_OVERHEAD: usize =
    (size_of::<SlotKey>() + size_of::<KeyQueue>() + 1) * 16 / 7 + 16 + 16;

/// Heap bytes of one waiter: its queue slot (at the queue's lowest load, 1/2) and its
/// oneshot channel (tokio's shared state, ~100 bytes, with allocator overhead).
pub(super) const WAITER_BYTES: usize = size_of::<Waiter>() * 2 + 128;

pub(super) struct SerialTable {
    queues: ShardedTable<KeyQueue>,
    /// Keys one shard may hold (`max_serial_keys` split over the shards).
    shard_keys: usize,
    max_keys: usize,
    next_token: AtomicU64,
    next_waiter: AtomicU64,
}

/// `KeyQueue::holder` of a key whose last holder just left (tokens start at 1).
const NO_HOLDER: FencingToken = FencingToken(0);

/// A held key and the requests waiting for it, in arrival order.
struct KeyQueue {
    holder: FencingToken,
    /// The other holders, on a key with several permits (`None` with one: boxed so
    /// that a key with one permit holds 8 bytes more, not 24).
    #[allow(clippy::box_collection)] // the box is the point: 8 bytes in every entry
    others: Option<Box<Vec<FencingToken>>>,
    waiters: VecDeque<Waiter>,
}

impl KeyQueue {
    fn holders(&self) -> usize {
        1 + self.others.as_ref().map_or(0, |others| others.len())
    }

    /// Removes `token` from the holders; `false` if it holds nothing (a stale permit).
    /// The key is then held by nobody when this was its last holder: `is_free`.
    fn remove_holder(&mut self, token: FencingToken) -> bool {
        if self.holder == token {
            // The key stays held by one of the others, if any.
            if let Some(other) = self.others.as_mut().and_then(|others| others.pop()) {
                self.holder = other;
            } else {
                self.holder = NO_HOLDER;
            }
            return true;
        }
        let Some(others) = self.others.as_mut() else {
            return false;
        };
        match others.iter().position(|t| *t == token) {
            Some(i) => {
                others.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Adds a holder to a key that just lost one.
    fn add_holder(&mut self, token: FencingToken) {
        if self.holder == NO_HOLDER {
            self.holder = token;
        } else {
            self.others.get_or_insert_default().push(token);
        }
    }

    /// Heap bytes of the other holders: the boxed `Vec` (24 bytes and an allocator
    /// header) and its slots.
    fn others_bytes(&self) -> usize {
        self.others.as_ref().map_or(0, |others| {
            24 + 16 + others.capacity() * size_of::<FencingToken>() + 16
        })
    }

    fn is_free(&self) -> bool {
        self.holder == NO_HOLDER
    }
}

struct Waiter {
    id: u64,
    grant: oneshot::Sender<FencingToken>,
}

enum Entered {
    Acquired(FencingToken),
    Queued {
        id: u64,
        grant: oneshot::Receiver<FencingToken>,
    },
    QueueFull,
    /// The key is not held and its shard is full of held keys.
    TableFull,
}

impl SerialTable {
    pub(super) fn new(max_keys: usize) -> Self {
        SerialTable {
            queues: ShardedTable::new(),
            shard_keys: max_keys.div_ceil(SHARDS).max(1),
            max_keys,
            next_token: AtomicU64::new(1),
            next_waiter: AtomicU64::new(1),
        }
    }

    fn issue_token(&self) -> FencingToken {
        FencingToken(self.next_token.fetch_add(1, Ordering::Relaxed))
    }

    /// Takes a permit of the key if one is free (and nobody waits for one), else queues
    /// behind the holders, else refuses.
    fn enter(&self, key: &ScopedKey, max_queue: usize, permits: u32) -> Entered {
        let slot = self.queues.slot(key.shared_storage_key());
        let mut shard = self.queues.lock(&slot.probe());
        if shard.map.len() >= self.shard_keys && shard.get(&slot.probe()).is_none() {
            return Entered::TableFull;
        }
        let queue = match shard.entry(slot) {
            Entry::Vacant(vacant) => {
                let token = self.issue_token();
                vacant.insert(KeyQueue {
                    holder: token,
                    others: None,
                    waiters: VecDeque::new(),
                });
                return Entered::Acquired(token);
            }
            Entry::Occupied(occupied) => occupied.into_mut(),
        };
        // FIFO: a free permit goes to an arrival only when nobody waits (a release hands
        // it to the first waiter at once, so waiters and free permits never coexist).
        if queue.holders() < permits as usize && queue.waiters.is_empty() {
            let token = self.issue_token();
            queue.others.get_or_insert_default().push(token);
            return Entered::Acquired(token);
        }
        if queue.waiters.len() >= max_queue {
            return Entered::QueueFull;
        }
        let (sender, receiver) = oneshot::channel();
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        queue.waiters.push_back(Waiter { id, grant: sender });
        Entered::Queued {
            id,
            grant: receiver,
        }
    }

    /// Hands `token`'s permit to the first waiter, or frees it if nobody waits; the
    /// entry goes when the key's last holder leaves.
    fn release(&self, key: &ScopedKey, token: FencingToken) {
        let probe = self.queues.probe(key.storage_key());
        let mut shard = self.queues.lock(&probe);
        // Remove first: the uncontended release is then a single map operation.
        let Some((shared_key, mut queue)) = shard.remove_entry(&probe) else {
            return;
        };
        if !queue.remove_holder(token) {
            // A stale permit (already released): the current holders keep the key.
            shard.insert(shared_key, queue);
            return;
        }
        while let Some(waiter) = queue.waiters.pop_front() {
            let next = self.issue_token();
            // Sending fails only if the waiter is gone without leaving the queue, which
            // `leave` prevents (it runs under this lock before the receiver drops); skip
            // such a waiter rather than hand the key to nobody.
            if waiter.grant.send(next).is_ok() {
                queue.add_holder(next);
                break;
            }
        }
        if !queue.is_free() {
            shard.insert(shared_key, queue);
        }
    }

    /// Takes waiter `id` out of `key`'s queue. If a release handed it the key first,
    /// returns the token it was granted: the caller now holds the key.
    fn leave(
        &self,
        key: &ScopedKey,
        id: u64,
        grant: &mut oneshot::Receiver<FencingToken>,
    ) -> Option<FencingToken> {
        let probe = self.queues.probe(key.storage_key());
        let mut shard = self.queues.lock(&probe);
        if let Some(queue) = shard.get_mut(&probe) {
            if let Some(position) = queue.waiters.iter().position(|w| w.id == id) {
                queue.waiters.remove(position);
                return None;
            }
        }
        drop(shard);
        // Not queued any more: a release popped this waiter and sent it the key, under the
        // lock just taken, so the token is already in the channel.
        grant.try_recv().ok()
    }

    fn keys_in_use(&self) -> usize {
        self.queues.len()
    }

    /// Keys held, and the accounted bytes of the keys and their waiters.
    pub(super) fn size(&self) -> (usize, u64) {
        let mut entries = 0;
        let mut bytes = 0;
        for shard in self.queues.each_shard() {
            entries += shard.map.len();
            bytes += shard
                .map
                .iter()
                .map(|(slot, queue)| {
                    (slot.key().len()
                        + KEY_OVERHEAD
                        + queue.waiters.len() * WAITER_BYTES
                        + queue.others_bytes()) as u64
                })
                .sum::<u64>();
        }
        (entries, bytes)
    }

    pub(super) fn max_keys(&self) -> usize {
        self.shard_keys * SHARDS
    }

    #[cfg(test)]
    fn waiting(&self, key: &ScopedKey) -> usize {
        let probe = self.queues.probe(key.storage_key());
        self.queues
            .lock(&probe)
            .get(&probe)
            .map_or(0, |queue| queue.waiters.len())
    }
}

/// A queued waiter. Dropping it (the acquire future was cancelled) leaves the queue, and
/// passes the key on if it had just been handed over.
struct QueuedWaiter<'a> {
    table: &'a SerialTable,
    key: &'a ScopedKey,
    id: u64,
    grant: oneshot::Receiver<FencingToken>,
    settled: bool,
}

impl QueuedWaiter<'_> {
    /// Gives up waiting; the grant that raced with giving up, if any.
    fn leave(&mut self) -> Option<FencingToken> {
        self.settled = true;
        self.table.leave(self.key, self.id, &mut self.grant)
    }
}

impl Drop for QueuedWaiter<'_> {
    fn drop(&mut self) {
        if !self.settled {
            if let Some(token) = self.leave() {
                self.table.release(self.key, token);
            }
        }
    }
}

impl SerialStore for MemoryStore {
    async fn acquire(
        &self,
        key: &ScopedKey,
        limits: SerialLimits,
    ) -> Result<AcquireOutcome, StoreError> {
        let table = &self.inner.serial;
        let permits = limits.permits();
        let (id, grant) = match table.enter(key, limits.max_queue, permits) {
            Entered::Acquired(token) => {
                return Ok(AcquireOutcome::Acquired(SerialPermit::of_many(
                    key.clone(),
                    token,
                    permits,
                )));
            }
            Entered::QueueFull => return Ok(AcquireOutcome::QueueFull),
            Entered::TableFull => {
                return Err(StoreError::Unavailable(format!(
                    "serial table full: {} keys held in one shard (max_serial_keys {} / {SHARDS})",
                    table.shard_keys, table.max_keys
                )));
            }
            Entered::Queued { id, grant } => (id, grant),
        };
        let mut waiter = QueuedWaiter {
            table,
            key,
            id,
            grant,
            settled: false,
        };
        let token = match tokio::time::timeout(limits.max_wait, &mut waiter.grant).await {
            Ok(Ok(token)) => {
                waiter.settled = true;
                Some(token)
            }
            // Timed out (or, defensively, the sender vanished): leave, unless the key
            // arrived in the meantime, in which case this request takes its turn.
            Ok(Err(_)) | Err(_) => waiter.leave(),
        };
        Ok(match token {
            Some(token) => {
                AcquireOutcome::Acquired(SerialPermit::of_many(key.clone(), token, permits))
            }
            None => AcquireOutcome::Timeout,
        })
    }

    async fn release(&self, permit: SerialPermit) -> Result<(), StoreError> {
        self.release_detached(permit);
        Ok(())
    }

    fn release_detached(&self, permit: SerialPermit) {
        self.inner.serial.release(permit.key(), permit.token());
    }
}

impl MemoryStore {
    /// How many keys `PerKeySerialLayer` holds or has requests waiting on right now. Zero
    /// once traffic stops: entries only live while their key is in use.
    ///
    /// ```
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// use keyward::MemoryStore;
    /// use keyward_core::store::{AcquireOutcome, SerialLimits, SerialStore};
    /// use keyward_core::{Key, Scope, ScopedKey};
    /// use std::time::Duration;
    ///
    /// let store = MemoryStore::new();
    /// let key = ScopedKey::new("serial", "default", Scope::Unscoped, Key::from("order-7"));
    /// let limits = SerialLimits { max_wait: Duration::from_secs(1), max_queue: 8, permits: 1 };
    /// let AcquireOutcome::Acquired(permit) = store.acquire(&key, limits).await.unwrap() else {
    ///     panic!("a free key is acquired at once");
    /// };
    /// assert_eq!(store.serial_keys_in_use(), 1);
    /// store.release(permit).await.unwrap();
    /// assert_eq!(store.serial_keys_in_use(), 0);
    /// # });
    /// ```
    pub fn serial_keys_in_use(&self) -> usize {
        self.inner.serial.keys_in_use()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod model_tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::pin::pin;
    use std::time::Duration;

    use crate::sharded::SHARDS;
    use futures::FutureExt;
    use keyward_core::{Key, Scope};
    use tokio::time::Instant;

    fn key(k: &str) -> ScopedKey {
        ScopedKey::new("serial", "r", Scope::Unscoped, Key::from(k))
    }

    const LIMITS: SerialLimits = SerialLimits {
        max_wait: Duration::from_secs(5),
        max_queue: 4,
        permits: 1,
    };

    async fn acquired(store: &MemoryStore, k: &str) -> SerialPermit {
        match store.acquire(&key(k), LIMITS).await.unwrap() {
            AcquireOutcome::Acquired(permit) => permit,
            other => panic!("expected a permit, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn release_hands_over_in_fifo_order_with_rising_tokens() {
        let store = MemoryStore::new();
        let ka = key("a");
        let first = acquired(&store, "a").await;
        let mut second = pin!(store.acquire(&ka, LIMITS));
        let mut third = pin!(store.acquire(&ka, LIMITS));
        assert!(second.as_mut().now_or_never().is_none());
        assert!(third.as_mut().now_or_never().is_none());
        assert_eq!(store.inner.serial.waiting(&key("a")), 2);

        store.release(first.clone()).await.unwrap();
        assert!(third.as_mut().now_or_never().is_none(), "third is not next");
        let AcquireOutcome::Acquired(second) = second.await.unwrap() else {
            panic!("second is next")
        };
        assert!(second.token() > first.token());
        store.release(second.clone()).await.unwrap();
        let AcquireOutcome::Acquired(third) = third.await.unwrap() else {
            panic!("third after second")
        };
        assert!(third.token() > second.token());
        store.release(third).await.unwrap();
        assert_eq!(store.serial_keys_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_full_and_timeout() {
        let store = MemoryStore::new();
        let ka = key("a");
        let holder = acquired(&store, "a").await;
        let one = SerialLimits {
            max_wait: Duration::from_secs(2),
            max_queue: 1,
            permits: 1,
        };
        let mut waiting = pin!(store.acquire(&ka, one));
        assert!(waiting.as_mut().now_or_never().is_none());
        assert_eq!(
            store.acquire(&ka, one).await.unwrap(),
            AcquireOutcome::QueueFull
        );
        let start = Instant::now();
        assert_eq!(waiting.await.unwrap(), AcquireOutcome::Timeout);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert_eq!(store.inner.serial.waiting(&key("a")), 0);
        store.release(holder).await.unwrap();
        assert_eq!(store.serial_keys_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_leaves_the_queue() {
        let store = MemoryStore::new();
        let ka = key("a");
        let holder = acquired(&store, "a").await;
        let mut gone = Box::pin(store.acquire(&ka, LIMITS));
        assert!(gone.as_mut().now_or_never().is_none());
        let mut next = pin!(store.acquire(&ka, LIMITS));
        assert!(next.as_mut().now_or_never().is_none());
        drop(gone);
        assert_eq!(store.inner.serial.waiting(&key("a")), 1);
        store.release(holder).await.unwrap();
        let AcquireOutcome::Acquired(next) = next.await.unwrap() else {
            panic!("the remaining waiter gets the key")
        };
        store.release(next).await.unwrap();
        assert_eq!(store.serial_keys_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_dropped_after_the_handover_passes_the_key_on() {
        let store = MemoryStore::new();
        let ka = key("a");
        let holder = acquired(&store, "a").await;
        let mut handed = Box::pin(store.acquire(&ka, LIMITS));
        assert!(handed.as_mut().now_or_never().is_none());
        let mut next = pin!(store.acquire(&ka, LIMITS));
        assert!(next.as_mut().now_or_never().is_none());
        // The key is sent to `handed`, which is dropped before it sees it.
        store.release(holder).await.unwrap();
        drop(handed);
        let AcquireOutcome::Acquired(next) = next.await.unwrap() else {
            panic!("the key passed on")
        };
        store.release(next).await.unwrap();
        assert_eq!(store.serial_keys_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn stale_release_is_ignored_and_tokens_survive_idle_cleanup() {
        let store = MemoryStore::new();
        let first = acquired(&store, "a").await;
        store.release(first.clone()).await.unwrap();
        assert_eq!(store.serial_keys_in_use(), 0);
        let second = acquired(&store, "a").await;
        assert!(second.token() > first.token());
        store.release(first).await.unwrap();
        assert_eq!(
            store
                .acquire(
                    &key("a"),
                    SerialLimits {
                        max_wait: Duration::ZERO,
                        max_queue: 0,
                        permits: 1,
                    }
                )
                .await
                .unwrap(),
            AcquireOutcome::QueueFull,
            "the stale release did not free the key"
        );
        store.release(second).await.unwrap();
        assert_eq!(store.serial_keys_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_refuses_new_keys_but_queues_on_held_ones() {
        let store = MemoryStore::builder().max_serial_keys(SHARDS).build();
        let mut held = Vec::new();
        let mut refused = 0;
        for n in 0..1000 {
            match store.acquire(&key(&format!("k{n}")), LIMITS).await {
                Ok(AcquireOutcome::Acquired(permit)) => held.push(permit),
                Err(StoreError::Unavailable(message)) => {
                    assert!(message.contains("max_serial_keys 64"), "{message}");
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(held.len(), SHARDS);
        assert_eq!(refused, 1000 - SHARDS);
        let sizes = store.table_sizes().serial_keys;
        assert_eq!((sizes.entries, sizes.max_entries), (SHARDS, Some(SHARDS)));
        // A held key still queues its next request.
        let first = held.remove(0);
        let first_key = first.key().clone();
        let mut next = pin!(store.acquire(&first_key, LIMITS));
        assert!(next.as_mut().now_or_never().is_none());
        store.release(first).await.unwrap();
        let AcquireOutcome::Acquired(second) = next.await.unwrap() else {
            panic!("handed over")
        };
        store.release(second).await.unwrap();
        for permit in held {
            store.release(permit).await.unwrap();
        }
        assert_eq!(store.serial_keys_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn several_permits_admit_that_many_then_queue_in_order() {
        let store = MemoryStore::new();
        let ka = key("a");
        let three = SerialLimits {
            permits: 3,
            ..LIMITS
        };
        let mut held = Vec::new();
        for _ in 0..3 {
            match store.acquire(&ka, three).await.unwrap() {
                AcquireOutcome::Acquired(permit) => held.push(permit),
                other => panic!("{other:?}"),
            }
        }
        assert!(held.windows(2).all(|w| w[0].token() < w[1].token()));
        assert_eq!(held[0].permits(), 3);
        let mut fourth = pin!(store.acquire(&ka, three));
        let mut fifth = pin!(store.acquire(&ka, three));
        assert!(fourth.as_mut().now_or_never().is_none());
        assert!(fifth.as_mut().now_or_never().is_none());
        // Any holder's release lets the first waiter in; the others keep running.
        store.release(held.remove(1)).await.unwrap();
        assert!(fifth.as_mut().now_or_never().is_none(), "fifth is not next");
        let AcquireOutcome::Acquired(fourth) = fourth.await.unwrap() else {
            panic!("fourth is next")
        };
        // Released twice: the second, stale, release frees nothing more.
        store.release(fourth.clone()).await.unwrap();
        store.release(fourth).await.unwrap();
        let AcquireOutcome::Acquired(fifth) = fifth.await.unwrap() else {
            panic!("fifth after fourth")
        };
        assert_eq!(store.inner.serial.waiting(&ka), 0);
        for permit in held.drain(..).chain([fifth]) {
            store.release(permit).await.unwrap();
        }
        assert_eq!(store.serial_keys_in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn different_keys_are_independent() {
        let store = MemoryStore::new();
        let a = acquired(&store, "a").await;
        let b = acquired(&store, "b").await;
        assert_eq!(store.serial_keys_in_use(), 2);
        store.release(a).await.unwrap();
        store.release(b).await.unwrap();
        assert_eq!(store.serial_keys_in_use(), 0);
    }
}

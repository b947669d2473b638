//! `max_hold`: takes the key from a holder that keeps it too long.
//!
//! Every permit of a layer has the same `max_hold`, so permits run out in the order they
//! were taken, and a FIFO is the whole timer wheel. Taking a permit pushes it, with its
//! deadline, on the queue of the taking thread's shard; releasing it takes it out again
//! (found by binary search: ids rise along the queue, and the oldest permits are usually
//! the first released, near the front); one sleeper task per shard, alive while its shard
//! holds permits, wakes at the front's deadline and releases every permit past it.
//!
//! This replaced a timer task per permit, spawned and aborted around every request:
//! about 1.3 µs of user CPU per request in the sidecar (BENCHMARKS.md). A shard per
//! thread keeps the threads that take permits off each other's locks.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use keyward_core::store::{SerialPermit, SerialStore};
use tokio::time::Instant;

/// Shards of one layer's queue: more than the worker threads of most deployments, so
/// that threads rarely share one.
const SHARDS: usize = 8;

/// A layer's `max_hold` and the permits it may still take away. Clones share the queue.
#[derive(Clone)]
pub(crate) struct HoldLimit {
    max_hold: Duration,
    shards: Arc<[Mutex<Shard>; SHARDS]>,
}

impl fmt::Debug for HoldLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.max_hold.fmt(f)
    }
}

/// Permits of one shard, in the order they were taken (and so of their deadlines).
#[derive(Default)]
struct Shard {
    held: VecDeque<Held>,
    next_id: u64,
    /// Whether a sleeper task watches this shard.
    watched: bool,
}

struct Held {
    id: u64,
    deadline: Instant,
    permit: SerialPermit,
}

/// A permit on the queue: [`Hold::end`] takes it off when its holder releases it first.
pub(crate) struct Hold {
    limit: HoldLimit,
    shard: usize,
    id: u64,
}

impl HoldLimit {
    pub(crate) fn new(max_hold: Duration) -> Self {
        HoldLimit {
            max_hold,
            shards: Arc::new(std::array::from_fn(|_| Mutex::default())),
        }
    }

    pub(crate) fn max_hold(&self) -> Duration {
        self.max_hold
    }

    /// Puts `permit` on the queue: past `max_hold` it is released through `store`
    /// unless [`Hold::end`] came first. Needs a Tokio runtime (the shard's sleeper is a
    /// task), like the rest of the layer. Takes the request's own handle on the queue
    /// (no second count change on a count every thread's requests touch).
    pub(crate) fn start<St: SerialStore>(self, store: &St, permit: SerialPermit) -> Hold {
        let shard = thread_shard();
        let (id, unwatched) = {
            let mut queue = self.lock(shard);
            let id = queue.next_id;
            queue.next_id += 1;
            queue.held.push_back(Held {
                id,
                deadline: Instant::now() + self.max_hold,
                permit,
            });
            (id, !std::mem::replace(&mut queue.watched, true))
        };
        if unwatched {
            tokio::spawn(watch(self.clone(), shard, store.clone()));
        }
        Hold {
            limit: self,
            shard,
            id,
        }
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic while the lock was held left the queue consistent (every step is one
        // push or remove), so a poisoned lock is used as it is.
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many permits the queue holds (tests: nothing stays behind).
    #[cfg(test)]
    fn len(&self) -> usize {
        (0..SHARDS).map(|shard| self.lock(shard).held.len()).sum()
    }
}

impl Hold {
    /// Takes the permit off the queue: its holder released it before `max_hold`. After
    /// the deadline the permit is already gone (released by the sleeper), and this is a
    /// no-op.
    pub(crate) fn end(self) {
        let mut queue = self.limit.lock(self.shard);
        if let Ok(position) = queue.held.binary_search_by_key(&self.id, |held| held.id) {
            queue.held.remove(position);
        }
    }
}

/// Releases `shard`'s permits as their deadlines pass, until the shard is empty.
fn watch<St: SerialStore>(
    limit: HoldLimit,
    shard: usize,
    store: St,
) -> impl Future<Output = ()> + Send {
    // Made before the task first runs: if it is dropped before it is done (its runtime
    // shut down, maybe before it ever ran), the next permit taken starts another watcher.
    let mut watching = Watching {
        limit,
        shard,
        armed: true,
    };
    async move {
        loop {
            let mut expired = Vec::new();
            let next = {
                let mut queue = watching.limit.lock(shard);
                let now = Instant::now();
                while queue.held.front().is_some_and(|held| held.deadline <= now) {
                    if let Some(held) = queue.held.pop_front() {
                        expired.push(held.permit);
                    }
                }
                let next = queue.held.front().map(|held| held.deadline);
                if next.is_none() {
                    queue.watched = false;
                    watching.armed = false;
                }
                next
            };
            for permit in expired {
                tracing::warn!(
                    route = permit.key().route(),
                    max_hold = ?watching.limit.max_hold,
                    fencing_token = permit.token().get(),
                    "serial: the holder kept its key past max_hold; the key is released"
                );
                store.release_detached(permit);
            }
            match next {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => return,
            }
        }
    }
}

/// A shard's watcher: marks the shard unwatched if dropped before it is done.
struct Watching {
    limit: HoldLimit,
    shard: usize,
    armed: bool,
}

impl Drop for Watching {
    fn drop(&mut self) {
        if self.armed {
            self.limit.lock(self.shard).watched = false;
        }
    }
}

/// The shard of the calling thread: threads take shards in turn on first use.
fn thread_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    use keyward_core::store::{AcquireOutcome, SerialLimits, StoreError};
    use keyward_core::{FencingToken, Key, Scope, ScopedKey};

    /// Records the tokens it was asked to release.
    #[derive(Clone, Default)]
    struct Releases(Arc<Mutex<Vec<u64>>>, Arc<AtomicU64>);

    impl SerialStore for Releases {
        async fn acquire(
            &self,
            key: &ScopedKey,
            _limits: SerialLimits,
        ) -> Result<AcquireOutcome, StoreError> {
            let token = self.1.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(AcquireOutcome::Acquired(SerialPermit::new(
                key.clone(),
                FencingToken(token),
            )))
        }

        async fn release(&self, permit: SerialPermit) -> Result<(), StoreError> {
            self.release_detached(permit);
            Ok(())
        }

        fn release_detached(&self, permit: SerialPermit) {
            self.0.lock().unwrap().push(permit.token().get());
        }
    }

    fn permit(token: u64) -> SerialPermit {
        let key = ScopedKey::new("serial", "r", Scope::Unscoped, Key::from("k"));
        SerialPermit::new(key, FencingToken(token))
    }

    #[tokio::test(start_paused = true)]
    async fn releases_only_the_permits_still_held_at_their_deadline() {
        let store = Releases::default();
        let limit = HoldLimit::new(Duration::from_secs(10));
        let first = limit.clone().start(&store, permit(1));
        tokio::time::advance(Duration::from_secs(4)).await;
        let second = limit.clone().start(&store, permit(2));
        let third = limit.clone().start(&store, permit(3));
        second.end();
        tokio::time::sleep(Duration::from_secs(6)).await;
        tokio::task::yield_now().await;
        assert_eq!(*store.0.lock().unwrap(), vec![1], "the first is past 10 s");
        first.end(); // too late: a no-op
        tokio::time::sleep(Duration::from_secs(4)).await;
        tokio::task::yield_now().await;
        assert_eq!(*store.0.lock().unwrap(), vec![1, 3]);
        third.end();
        assert_eq!(limit.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_stops_when_the_queue_is_empty_and_a_new_one_starts_after() {
        let store = Releases::default();
        let limit = HoldLimit::new(Duration::from_secs(1));
        limit.clone().start(&store, permit(1)).end();
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        assert!(store.0.lock().unwrap().is_empty(), "ended in time");
        assert!(!limit.lock(thread_shard()).watched, "nothing left to watch");
        let _held = limit.clone().start(&store, permit(2));
        assert!(limit.lock(thread_shard()).watched);
        tokio::time::sleep(Duration::from_secs(2)).await;
        tokio::task::yield_now().await;
        assert_eq!(*store.0.lock().unwrap(), vec![2]);
    }

    #[test]
    fn a_watcher_dropped_with_its_runtime_is_replaced() {
        let store = Releases::default();
        let limit = HoldLimit::new(Duration::from_secs(1));
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        let first = runtime();
        let held = first.block_on(async { limit.clone().start(&store, permit(1)) });
        drop(first);
        assert!(
            !limit.lock(thread_shard()).watched,
            "its watcher went with it"
        );
        runtime().block_on(async {
            let _next = limit.clone().start(&store, permit(2));
            tokio::time::sleep(Duration::from_secs(2)).await;
            tokio::task::yield_now().await;
        });
        assert_eq!(*store.0.lock().unwrap(), vec![1, 2], "both past max_hold");
        held.end();
        assert_eq!(limit.len(), 0);
    }
}

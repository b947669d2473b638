use std::future::Future;
use std::time::Duration;

use super::StoreError;
use crate::{FencingToken, ScopedKey};

/// How long and behind how many others a request may wait for its key's turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SerialLimits {
    /// Longest time to wait in the queue before giving up with
    /// [`AcquireOutcome::Timeout`]. Zero means "only if the key is free right now".
    pub max_wait: Duration,
    /// Most requests that may wait for the key at once (the holders not counted). An
    /// arrival that finds this many waiters gets [`AcquireOutcome::QueueFull`] at once.
    pub max_queue: usize,
    /// How many requests may hold the key at once: 1 (the default of every layer) is
    /// mutual exclusion; `N` is a per-key semaphore (per tenant, per upstream account).
    /// 0 is taken as 1.
    pub permits: u32,
}

impl SerialLimits {
    /// `permits`, with 0 taken as 1.
    pub fn permits(&self) -> u32 {
        self.permits.max(1)
    }
}

/// The right to be one of the key's holders (its only one, with one permit per key),
/// until it is released.
///
/// Carries the key it was issued for and its [`FencingToken`], strictly increasing per
/// key across holders (in this process and, with a shared store, across processes).
/// With several permits per key, tokens still rise with every holder, but several
/// holders run at once: they order writes, they no longer exclude each other.
///
/// A permit must be released with [`SerialStore::release`] or
/// [`SerialStore::release_detached`]; dropping it without releasing leaves the key held
/// (in a distributed store, until its lease runs out).
#[must_use = "a permit holds its key until released"]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialPermit {
    key: ScopedKey,
    token: FencingToken,
    permits: u32,
}

impl SerialPermit {
    /// A permit for `key` held with `token`, on a key with one permit (mutual
    /// exclusion). Called by store implementations.
    pub fn new(key: ScopedKey, token: FencingToken) -> Self {
        SerialPermit {
            key,
            token,
            permits: 1,
        }
    }

    /// A permit for `key` held with `token`, on a key with `permits` permits
    /// ([`SerialLimits::permits`]). Called by store implementations.
    pub fn of_many(key: ScopedKey, token: FencingToken, permits: u32) -> Self {
        SerialPermit {
            key,
            token,
            permits: permits.max(1),
        }
    }

    /// How many permits the key has (1: this is its only holder).
    pub fn permits(&self) -> u32 {
        self.permits
    }

    /// The key this permit holds.
    pub fn key(&self) -> &ScopedKey {
        &self.key
    }

    /// The holder's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }
}

/// The answer to [`SerialStore::acquire`].
#[derive(Debug, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// It is this request's turn: it is the only holder of the key until the permit is
    /// released.
    Acquired(SerialPermit),
    /// The request waited [`SerialLimits::max_wait`] without getting its turn and has left
    /// the queue.
    Timeout,
    /// [`SerialLimits::max_queue`] requests were already waiting; this one did not queue.
    QueueFull,
}

/// Storage for `PerKeySerialLayer`: a FIFO mutex per key, with fencing tokens.
///
/// Contract for implementations:
/// - at most [`SerialLimits::permits`] permits per key are outstanding at any time (one:
///   mutual exclusion); waiters get a permit in the order they arrived (FIFO), and each
///   new holder's token is greater than every token issued for that key before;
/// - [`acquire`](SerialStore::acquire) is one decision ("take it, queue, or refuse") and
///   then, if queued, a wait that is woken by the releasing holder handing the key over
///   (a notification, or pub/sub for a remote store), never by polling;
/// - dropping an `acquire` future leaves the queue; if the key had just been handed to
///   it, the key passes on to the next waiter;
/// - a remote store holds each permit as a lease renewed in the background (heartbeat)
///   until release, so that a crashed holder's key passes on when its lease runs out; the
///   lease length is the store's configuration, not the caller's.
///
/// With Redis each step is one script: acquire-or-enqueue, release-and-hand-over
/// (publishing the new token to the next waiter), leave (which hands over a grant that
/// raced with the waiter's departure), renew.
pub trait SerialStore: Clone + Send + Sync + 'static {
    /// Waits for `key`'s turn within `limits`.
    fn acquire(
        &self,
        key: &ScopedKey,
        limits: SerialLimits,
    ) -> impl Future<Output = Result<AcquireOutcome, StoreError>> + Send;

    /// Releases `permit`: the next waiter (if any) becomes the holder. A permit that no
    /// longer holds its key (its lease ran out) is ignored.
    fn release(&self, permit: SerialPermit) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Releases `permit` from a destructor (a finished or dropped response body, a
    /// cancelled or panicked request): must not block and must not need the caller to
    /// poll anything.
    fn release_detached(&self, permit: SerialPermit);
}

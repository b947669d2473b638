use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{StoreError, StoredResponse};
use crate::{FencingToken, ScopedKey};

/// The answer to [`SingleFlightStore::lead`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlightRole {
    /// No flight was in progress under the key (or its leader's lease expired): the caller
    /// now leads it, makes the inner call and must [`publish`](SingleFlightStore::publish)
    /// what it got with this token (or abandon the flight with
    /// [`abandon_detached`](SingleFlightStore::abandon_detached)).
    Leader(FencingToken),
    /// Another instance leads the flight: [`wait`](SingleFlightStore::wait) for its
    /// landing.
    Follower,
}

/// The answer to [`SingleFlightStore::lead_or_reuse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeadOrReuse {
    /// No kept response: the caller leads or follows, as with [`SingleFlightStore::lead`].
    Role(FlightRole),
    /// A flight under the key landed `age` ago and its response is kept for reuse: serve
    /// a copy, no flight needed.
    Reused {
        /// The kept response.
        response: Arc<StoredResponse>,
        /// How long ago it landed.
        age: Duration,
    },
}

/// How a flight ended, as its leader publishes it to followers on other instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Landing {
    /// The leader's complete response: serve a copy.
    Response(Arc<StoredResponse>),
    /// The leader's response was larger than its `max_body` and was not shared: make your
    /// own inner call.
    TooLarge,
    /// The leader failed (inner error, panic, cancelled) or did not land within its lease:
    /// apply the leader-failure policy (elect a new leader, or 502).
    Failed,
}

/// Storage for `SingleFlightLayer`: the cross-process half of request coalescing.
///
/// Requests coalesce inside one process without touching the store: only the one request
/// per process that drives a flight calls it. That request asks to
/// [`lead`](Self::lead) the key; the one leader across all processes makes the inner call
/// and [`publish`](Self::publish)es its [`Landing`]; drivers on other processes
/// [`wait`](Self::wait) for it (a Redis store wakes them with pub/sub) and hand the
/// response to their local followers. A stampede across N instances thus reaches the
/// upstream once.
///
/// Coalescing is an optimisation, not exactly-once execution (that is
/// `IdempotencyLayer`'s job): in the short window between a leader publishing and a late
/// follower starting to wait, the follower may lead a second flight.
pub trait SingleFlightStore: Clone + Send + Sync + 'static {
    /// Leads `key` for at most `lease` if no live flight exists, else reports a follower.
    fn lead(
        &self,
        key: &ScopedKey,
        lease: Duration,
    ) -> impl Future<Output = Result<FlightRole, StoreError>> + Send;

    /// Ends the flight of `token` on `key` and hands `landing` to everyone waiting on it.
    /// Does nothing if `token` no longer leads `key` (its lease expired and someone else
    /// leads now).
    fn publish(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        landing: Landing,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Like [`lead`](Self::lead), but first looks for a response a flight under `key`
    /// landed less than `reuse_for` ago and [kept](Self::publish_kept): one round trip
    /// either way. The default never finds one (a store that cannot keep responses only
    /// coalesces concurrent requests).
    fn lead_or_reuse(
        &self,
        key: &ScopedKey,
        lease: Duration,
        reuse_for: Duration,
    ) -> impl Future<Output = Result<LeadOrReuse, StoreError>> + Send {
        let _ = reuse_for;
        let lead = self.lead(key, lease);
        async move { lead.await.map(LeadOrReuse::Role) }
    }

    /// Like [`publish`](Self::publish), and if `landing` is a response and `keep` is not
    /// zero, keeps it for `keep` so that [`lead_or_reuse`](Self::lead_or_reuse) finds it
    /// (only if `token` still led the flight). The default keeps nothing.
    fn publish_kept(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        landing: Landing,
        keep: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = keep;
        self.publish(key, token, landing)
    }

    /// Ends the flight of `token` as [`Landing::Failed`] from a destructor (the local
    /// flight was cancelled because its last waiter left, or the leader panicked): must
    /// not block and must not need the caller to poll anything.
    fn abandon_detached(&self, key: ScopedKey, token: FencingToken);

    /// Waits, at most `max` and at most the leader's lease, for the landing of the flight
    /// in progress under `key`. `Ok(None)` if no flight is in progress (it landed before
    /// the wait began): lead again. A leader that does not land in time counts as
    /// [`Landing::Failed`]. Wakes on a notification, never by polling the store.
    fn wait(
        &self,
        key: &ScopedKey,
        max: Duration,
    ) -> impl Future<Output = Result<Option<Landing>, StoreError>> + Send;
}

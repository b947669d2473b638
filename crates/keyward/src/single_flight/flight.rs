//! In-process coalescing: the table of flights in progress and the hand-over of the
//! shared work between the requests waiting on it.
//!
//! A flight's work (the inner call and the buffering of its body) is one boxed future
//! owned by the flight. No task is spawned: the request that leads a flight polls the
//! work itself (the "driver"), while followers sleep on a [`Notify`]. If the driver is
//! dropped before the work completes, the work goes back into the flight, the followers
//! are woken and one of them becomes the driver: the inner call continues. Until the
//! leader first polls it, the work is reserved for the leader (only the leader can answer
//! for its own error or oversize response). When the last waiter leaves, the work is
//! dropped, which cancels the inner call. Panics of the work are caught so that they
//! reach the driver as a failure instead of poisoning the flight.
//!
//! Locks: a table shard, then a flight's state, never the other way round; the work is
//! never polled or dropped under either.

use std::any::Any;
use std::collections::hash_map::Entry;
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use keyward_core::store::StoredResponse;
use tokio::sync::Notify;
use tracing::Span;

use crate::sharded::{ShardedTable, SlotKey};

/// The shared work of a flight, and the span of the request that started it: whoever
/// drives the work polls it inside that span.
pub(crate) struct Work {
    future: Pin<Box<dyn Future<Output = Landed> + Send>>,
    span: Span,
}

impl Work {
    pub(crate) fn new(future: impl Future<Output = Landed> + Send + 'static, span: Span) -> Self {
        Work {
            future: Box::pin(future),
            span,
        }
    }
}

/// What every waiter of a flight learns when it ends.
#[derive(Clone, Debug)]
pub(crate) enum Shared {
    /// A complete response to copy.
    Response(Arc<StoredResponse>),
    /// The response was larger than `max_body` and went to the driver only.
    TooLarge,
    /// The response says it is not for other requests (`Cache-Control: private` or
    /// `no-store`, or it varies on something the key does not hold): every waiter makes
    /// its own call.
    Private,
    /// The inner call failed (error, panic, body error) or the remote leader failed.
    Failed,
    /// The store failed and the route fails closed.
    StoreUnavailable,
}

/// What the work yields: the shared part, and what only the driver receives (the
/// leader's own typed response or error, or a panic payload).
pub(crate) struct Landed {
    pub(crate) shared: Shared,
    pub(crate) own: Own,
    /// The store failed on the way and the flight ran uncoordinated across processes.
    pub(crate) store_error: bool,
}

/// The driver's private result.
pub(crate) enum Own {
    /// Nothing beyond [`Landed::shared`].
    None,
    /// A `Result<Response<..>, E>` of the service's types.
    Typed(Box<dyn Any + Send>),
    /// The work panicked with this payload.
    Panic(Box<dyn Any + Send>),
}

/// The in-process flights of one `SingleFlight` service and its clones. An entry lives
/// from the moment its leader joins until the flight ends or its last waiter leaves.
pub(crate) struct FlightTable {
    flights: ShardedTable<Arc<Flight>>,
    next_id: AtomicU64,
}

struct Flight {
    id: u64,
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    /// The work while nobody drives it (`None` while a driver holds it, or once done).
    work: Option<Work>,
    /// The parked work is the leader's until the leader first polls it or leaves:
    /// followers never start it behind the leader's back (the leader alone can answer
    /// for its own error or oversize response).
    reserved: bool,
    result: Option<Shared>,
    waiters: usize,
    ended: bool,
    /// The span of the request that started the flight, for followers to link to.
    #[cfg(feature = "opentelemetry")]
    leader: Option<Span>,
}

/// A request's place in a flight. Dropping it leaves the flight; the last one to leave
/// an unfinished flight cancels it.
pub(crate) struct Seat {
    table: Arc<FlightTable>,
    key: SlotKey,
    flight: Arc<Flight>,
    leader: bool,
}

/// The outcome of [`FlightTable::join`].
pub(crate) enum Joined {
    /// The caller starts the flight: it must [`Seat::start`] it with its work at once.
    Leader(Seat),
    /// The caller waits for a flight in progress.
    Follower(Seat),
}

enum Step {
    Drive(Work),
    Done(Outcome),
}

/// How a seat's wait ended.
pub(crate) struct Outcome {
    pub(crate) shared: Shared,
    pub(crate) own: Own,
    pub(crate) store_error: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent before anything can panic (the
    // work is never polled under a lock), so a poisoned lock is safe to reuse.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl FlightTable {
    pub(crate) fn new() -> Self {
        FlightTable {
            flights: ShardedTable::new(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Joins the flight in progress under `key`, or starts one.
    pub(crate) fn join(self: &Arc<Self>, key: Arc<str>) -> Joined {
        let key = self.flights.slot(key);
        let mut shard = self.flights.lock(&key.probe());
        let (flight, leader) = match shard.entry(key.clone()) {
            // Entries are removed (under this lock) as their flight ends, so a flight
            // found here is live.
            Entry::Occupied(entry) => {
                lock(&entry.get().state).waiters += 1;
                (entry.get().clone(), false)
            }
            Entry::Vacant(entry) => {
                let flight = Arc::new(Flight {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    state: Mutex::new(State {
                        waiters: 1,
                        ..State::default()
                    }),
                    notify: Notify::new(),
                });
                (entry.insert(flight).clone(), true)
            }
        };
        drop(shard);
        let seat = Seat {
            table: self.clone(),
            key,
            flight,
            leader,
        };
        if leader {
            Joined::Leader(seat)
        } else {
            Joined::Follower(seat)
        }
    }

    /// Flights in progress.
    pub(crate) fn len(&self) -> usize {
        self.flights.len()
    }

    fn remove_if_current(&self, key: &SlotKey, flight: &Flight) -> Option<Arc<Flight>> {
        let probe = key.probe();
        let mut shard = self.flights.lock(&probe);
        // Two probes rather than `entry`, which would need an owned key (an Arc clone).
        if shard.get(&probe).is_some_and(|entry| entry.id == flight.id) {
            shard.remove(&probe)
        } else {
            None
        }
    }
}

impl Seat {
    /// Parks the leader's work in the flight. Call it right after [`FlightTable::join`]
    /// returned [`Joined::Leader`], before any await: from then on the work belongs to
    /// the flight, whichever of its waiters polls first drives it, and it is dropped
    /// only with the flight.
    pub(crate) fn start(&self, work: Work) {
        let mut state = lock(&self.flight.state);
        #[cfg(feature = "opentelemetry")]
        {
            state.leader = Some(work.span.clone());
        }
        state.work = Some(work);
        state.reserved = true;
    }

    /// The span of the request that started the flight (once it has).
    #[cfg(feature = "opentelemetry")]
    pub(crate) fn leader_span(&self) -> Option<Span> {
        lock(&self.flight.state).leader.clone()
    }

    /// Waits for the flight to end, driving its work whenever nobody else does (the
    /// leader right away, a follower after a driver left before the end).
    pub(crate) async fn run(&self) -> Outcome {
        loop {
            // Look before arming a notification: the leader finds its work at once and
            // never touches the notifier.
            match self.step() {
                Some(Step::Drive(work)) => return self.drive(work).await,
                Some(Step::Done(outcome)) => return outcome,
                None => {}
            }
            let mut notified = pin!(self.flight.notify.notified());
            // Armed before looking again, so that an end or a hand-over between the look
            // and the await is not missed.
            notified.as_mut().enable();
            match self.step() {
                Some(Step::Drive(work)) => return self.drive(work).await,
                Some(Step::Done(outcome)) => return outcome,
                None => notified.await,
            }
        }
    }

    fn step(&self) -> Option<Step> {
        let mut state = lock(&self.flight.state);
        if let Some(shared) = &state.result {
            return Some(Step::Done(Outcome {
                shared: shared.clone(),
                own: Own::None,
                store_error: false,
            }));
        }
        if state.reserved && !self.leader {
            return None;
        }
        state.reserved = false;
        state.work.take().map(Step::Drive)
    }

    async fn drive(&self, work: Work) -> Outcome {
        let mut driver = Driver {
            flight: &self.flight,
            work: Some(work),
        };
        let landed = poll_fn(|cx| driver.poll_work(cx)).await;
        self.finish(landed.shared.clone());
        Outcome {
            shared: landed.shared,
            own: landed.own,
            store_error: landed.store_error,
        }
    }

    fn finish(&self, shared: Shared) {
        let removed = self.table.remove_if_current(&self.key, &self.flight);
        let others_wait = {
            let mut state = lock(&self.flight.state);
            state.result = Some(shared);
            state.ended = true;
            // Joins happen under the table lock, and the flight has left the table: the
            // count cannot grow any more.
            state.waiters > 1
        };
        if others_wait {
            self.flight.notify.notify_waiters();
        }
        drop(removed);
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        {
            let mut state = lock(&self.flight.state);
            if state.ended || state.waiters > 1 {
                state.waiters -= 1;
                if self.leader {
                    state.reserved = false;
                }
                // Work parked and undriven (its leader left before polling it): wake
                // the others so that one of them drives it.
                let parked = !state.ended && state.work.is_some();
                drop(state);
                if parked {
                    self.flight.notify.notify_waiters();
                }
                return;
            }
        }
        // Possibly the last waiter of an unfinished flight: decide under the table lock
        // so that no request joins the flight while it is being cancelled.
        let probe = self.key.probe();
        let mut shard = self.table.flights.lock(&probe);
        let mut state = lock(&self.flight.state);
        state.waiters -= 1;
        if self.leader {
            state.reserved = false;
        }
        if state.ended || state.waiters > 0 {
            // Others joined or left meanwhile: as above.
            let parked = !state.ended && state.work.is_some();
            drop(state);
            drop(shard);
            if parked {
                self.flight.notify.notify_waiters();
            }
            return;
        }
        state.ended = true;
        let work = state.work.take();
        drop(state);
        let removed = shard
            .get(&probe)
            .is_some_and(|entry| entry.id == self.flight.id)
            .then(|| shard.remove(&probe));
        drop(shard);
        drop(removed);
        // Cancels the inner call, outside every lock: its destructors may do anything.
        drop(work);
    }
}

/// Holds the work while a seat polls it; hands it back to the flight if the seat is
/// dropped before the work completes.
struct Driver<'a> {
    flight: &'a Flight,
    work: Option<Work>,
}

impl Driver<'_> {
    fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<Landed> {
        let Some(work) = self.work.as_mut() else {
            return Poll::Ready(Landed {
                shared: Shared::Failed,
                own: Own::None,
                store_error: false,
            });
        };
        let polled = {
            let _entered = work.span.enter();
            catch_unwind(AssertUnwindSafe(|| work.future.as_mut().poll(cx)))
        };
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(landed)) => {
                self.work = None;
                Poll::Ready(landed)
            }
            Err(payload) => {
                let work = self.work.take();
                // A future that panicked may panic again in its destructor.
                let _ = catch_unwind(AssertUnwindSafe(|| drop(work)));
                Poll::Ready(Landed {
                    shared: Shared::Failed,
                    own: Own::Panic(payload),
                    store_error: false,
                })
            }
        }
    }
}

impl Drop for Driver<'_> {
    fn drop(&mut self) {
        if let Some(work) = self.work.take() {
            lock(&self.flight.state).work = Some(work);
            self.flight.notify.notify_waiters();
        }
    }
}

#[cfg(test)]
#[path = "flight_tests.rs"]
mod tests;

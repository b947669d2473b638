//! Timers for the deadlines every request arms and almost never reaches: hyper's header
//! read timeout (re-armed for each request on a kept-alive connection) and the upstream
//! timeout. With Tokio's timer each of them is a wheel entry registered and cancelled per
//! request (about 1.8k instructions per request for the header read timeout alone,
//! `benches/load/instructions.sh`).
//!
//! Every deadline of one kind is "now + the same duration", so deadlines arrive in order
//! and a sorted queue takes them at its back. Each thread keeps one queue per duration;
//! a sleep joins its queue on its first pending poll (an entry with its waker) and leaves
//! it when dropped (found by binary search; the oldest leave first, near the front). One
//! sweeper task per queue, alive while the queue has entries, sleeps on a single Tokio
//! timer until the front's deadline and wakes the sleeps that are due. A sleep is due
//! when the clock says so: the sweeper only wakes it.
//!
//! Needs a Tokio runtime with time enabled (the sweeper is a task), as Tokio's own sleep
//! does.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A hyper [`Timer`](hyper::rt::Timer) whose sleeps are all about `duration` long (the
/// header read timeout): deadlines come from hyper, the queue from the duration.
#[derive(Clone, Copy, Debug)]
pub struct FifoTimer {
    duration: Duration,
}

impl FifoTimer {
    /// A timer for sleeps of about `duration`.
    pub fn new(duration: Duration) -> Self {
        FifoTimer { duration }
    }
}

impl hyper::rt::Timer for FifoTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(FifoSleep::new(duration, Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(FifoSleep::new(self.duration, deadline))
    }
}

/// `future` bounded by `duration`, like [`tokio::time::timeout`]: `Err(Elapsed)` once
/// `duration` has passed without it finishing.
pub fn timeout<F: Future>(duration: Duration, future: F) -> Timeout<F> {
    Timeout {
        future,
        sleep: FifoSleep::new(duration, Instant::now() + duration),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`timeout`].
    pub struct Timeout<F> {
        #[pin]
        future: F,
        sleep: FifoSleep,
    }
}

/// A [`timeout`] that ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match Pin::new(this.sleep).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A sleep until `deadline` on the calling thread's queue for `duration`.
pub struct FifoSleep {
    duration: Duration,
    deadline: Instant,
    /// Its queue and place there, once a poll found it not yet due.
    joined: Option<(Arc<Queue>, u64)>,
}

impl FifoSleep {
    fn new(duration: Duration, deadline: Instant) -> Self {
        FifoSleep {
            duration,
            deadline,
            joined: None,
        }
    }
}

impl Future for FifoSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some((queue, id)) = &self.joined else {
            // First poll: join without reading the clock (the sleep was made a moment
            // ago, `duration` before its deadline). One already due is woken by the
            // sweeper at once.
            let queue = Queue::of_thread(self.duration);
            let id = queue.join(self.deadline, cx.waker().clone());
            self.joined = Some((queue, id));
            return Poll::Pending;
        };
        if Instant::now() >= self.deadline {
            self.leave();
            return Poll::Ready(());
        }
        queue.rewake(*id, self.deadline, cx.waker());
        Poll::Pending
    }
}

impl FifoSleep {
    fn leave(&mut self) {
        if let Some((queue, id)) = self.joined.take() {
            queue.leave(id, self.deadline);
        }
    }
}

impl Drop for FifoSleep {
    fn drop(&mut self) {
        self.leave();
    }
}

impl hyper::rt::Sleep for FifoSleep {}

/// One thread's sleeps of one duration, sorted by (deadline, id).
struct Queue {
    state: Mutex<QueueState>,
    /// Tells the sweeper that a sleep due before the one it waits for joined.
    earlier: tokio::sync::Notify,
}

#[derive(Default)]
struct QueueState {
    entries: VecDeque<Entry>,
    next_id: u64,
    /// Whether a sweeper task watches this queue.
    swept: bool,
    /// The deadline the sweeper sleeps until.
    sweeping_until: Option<Instant>,
}

struct Entry {
    deadline: Instant,
    id: u64,
    waker: Waker,
}

thread_local! {
    /// This thread's queues, one per duration (a handful: the header read timeout and
    /// the routes' upstream timeouts).
    static QUEUES: RefCell<Vec<(Duration, Arc<Queue>)>> = const { RefCell::new(Vec::new()) };
}

impl Queue {
    fn of_thread(duration: Duration) -> Arc<Queue> {
        QUEUES.with(|queues| {
            let mut queues = queues.borrow_mut();
            if let Some((_, queue)) = queues.iter().find(|(d, _)| *d == duration) {
                return queue.clone();
            }
            let queue = Arc::new(Queue {
                state: Mutex::default(),
                earlier: tokio::sync::Notify::new(),
            });
            queues.push((duration, queue.clone()));
            queue
        })
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every step under the lock is one insert or remove: a panic elsewhere cannot
        // leave the queue half-changed.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a sleep due at `deadline`; its id.
    fn join(self: &Arc<Self>, deadline: Instant, waker: Waker) -> u64 {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        // From the back: deadlines of one duration arrive in order, so this is the
        // back itself but for clock reads racing on the way in.
        let at = state
            .entries
            .iter()
            .rposition(|entry| entry.deadline <= deadline)
            .map_or(0, |i| i + 1);
        state.entries.insert(
            at,
            Entry {
                deadline,
                id,
                waker,
            },
        );
        let earlier = at == 0 && state.sweeping_until.is_some_and(|until| deadline < until);
        self.keep_swept(state);
        if earlier {
            self.earlier.notify_one();
        }
        id
    }

    fn find(state: &QueueState, id: u64, deadline: Instant) -> Option<usize> {
        state
            .entries
            .binary_search_by(|entry| (entry.deadline, entry.id).cmp(&(deadline, id)))
            .ok()
    }

    /// Keeps the waker of sleep `id` current (a future moved to another task), and its
    /// queue swept (its sweeper went with a runtime that shut down).
    fn rewake(self: &Arc<Self>, id: u64, deadline: Instant, waker: &Waker) {
        let mut state = self.lock();
        if let Some(at) = Self::find(&state, id, deadline) {
            let entry = &mut state.entries[at];
            if !entry.waker.will_wake(waker) {
                entry.waker = waker.clone();
            }
        }
        self.keep_swept(state);
    }

    /// Starts a sweeper if none watches the queue.
    fn keep_swept(self: &Arc<Self>, mut state: MutexGuard<'_, QueueState>) {
        if !state.swept {
            state.swept = true;
            drop(state);
            tokio::spawn(sweep(self.clone()));
        }
    }

    fn leave(&self, id: u64, deadline: Instant) {
        let mut state = self.lock();
        if let Some(at) = Self::find(&state, id, deadline) {
            state.entries.remove(at);
        }
    }
}

/// Wakes `queue`'s sleeps as they come due, until the queue is empty.
fn sweep(queue: Arc<Queue>) -> impl Future<Output = ()> + Send {
    // Made before the task first runs: if it is dropped unfinished (its runtime shut
    // down), the next sleep to join starts another sweeper.
    let mut sweeping = Sweeping { queue, armed: true };
    async move {
        loop {
            let mut due = Vec::new();
            let next = {
                let mut state = sweeping.queue.lock();
                let now = Instant::now();
                while state
                    .entries
                    .front()
                    .is_some_and(|entry| entry.deadline <= now)
                {
                    if let Some(entry) = state.entries.pop_front() {
                        due.push(entry.waker);
                    }
                }
                let next = state.entries.front().map(|entry| entry.deadline);
                state.sweeping_until = next;
                if next.is_none() {
                    state.swept = false;
                    sweeping.armed = false;
                }
                next
            };
            due.into_iter().for_each(Waker::wake);
            let Some(deadline) = next else { return };
            let queue = &sweeping.queue;
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
                () = queue.earlier.notified() => {}
            }
        }
    }
}

struct Sweeping {
    queue: Arc<Queue>,
    armed: bool,
}

impl Drop for Sweeping {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.queue.lock();
            state.swept = false;
            state.sweeping_until = None;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::future::pending;

    fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
    }

    fn len(duration: Duration) -> usize {
        Queue::of_thread(duration).lock().entries.len()
    }

    #[tokio::test]
    async fn a_timeout_fires_after_its_duration_and_leaves_nothing_queued() {
        let duration = Duration::from_millis(30);
        let started = Instant::now();
        let result = timeout(duration, pending::<()>()).await;
        assert_eq!(result, Err(Elapsed));
        assert!(started.elapsed() >= duration);
        assert_eq!(len(duration), 0);
    }

    #[tokio::test]
    async fn a_future_that_finishes_first_wins_and_leaves_its_queue() {
        let duration = Duration::from_secs(60);
        let mut slow = Box::pin(timeout(duration, pending::<()>()));
        assert!(poll_once(&mut slow).is_pending());
        assert_eq!(len(duration), 1, "pending: queued");
        drop(slow);
        assert_eq!(len(duration), 0, "dropped: gone");
        let quick = timeout(duration, async { 7 }).await;
        assert_eq!(quick, Ok(7));
        assert_eq!(len(duration), 0, "ready at once: never queued");
    }

    #[tokio::test]
    async fn sleeps_fire_in_deadline_order_whatever_order_they_joined_in() {
        let timer = FifoTimer::new(Duration::from_millis(40));
        let now = Instant::now();
        let late = hyper::rt::Timer::sleep_until(&timer, now + Duration::from_millis(60));
        let early = hyper::rt::Timer::sleep_until(&timer, now + Duration::from_millis(20));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (a, b) = (order.clone(), order.clone());
        let late = tokio::spawn(async move {
            late.await;
            a.lock().unwrap().push("late");
        });
        let early = tokio::spawn(async move {
            early.await;
            b.lock().unwrap().push("early");
        });
        early.await.unwrap();
        late.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["early", "late"]);
        assert!(now.elapsed() >= Duration::from_millis(60));
        assert_eq!(len(Duration::from_millis(40)), 0);
    }

    #[tokio::test]
    async fn a_sleep_due_before_the_one_the_sweeper_waits_for_is_not_late() {
        let timer = FifoTimer::new(Duration::from_millis(500));
        let now = Instant::now();
        let mut late = hyper::rt::Timer::sleep_until(&timer, now + Duration::from_secs(30));
        assert!(poll_once(&mut late).is_pending());
        // Let the sweeper start and go to sleep until the late one's deadline.
        tokio::task::yield_now().await;
        let early = hyper::rt::Timer::sleep_until(&timer, now + Duration::from_millis(20));
        early.await;
        assert!(
            now.elapsed() < Duration::from_secs(30),
            "woken at its own deadline"
        );
        drop(late);
        assert_eq!(len(Duration::from_millis(500)), 0);
    }

    #[test]
    fn a_sweeper_dropped_with_its_runtime_is_replaced() {
        let duration = Duration::from_millis(10);
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
        };
        let first = runtime();
        let mut stuck = Box::pin(timeout(duration, pending::<()>()));
        first.block_on(async { assert!(poll_once(&mut stuck).is_pending()) });
        drop(first);
        assert!(!Queue::of_thread(duration).lock().swept, "its sweeper went");
        let result = runtime().block_on(stuck);
        assert_eq!(result, Err(Elapsed), "a new sweeper woke it");
    }
}

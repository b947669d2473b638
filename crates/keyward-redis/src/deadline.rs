//! The store timeout, enforced by one ticker per store instead of one tokio timer per call.
//!
//! Every call registers its deadline (`now + timeout`) and its waker in a slot table (one
//! short lock, and one more to free the slot when the call ends); a single task per store
//! wakes, every [`tick`] while calls are in flight, the calls whose deadline has passed,
//! and they then fail with `StoreError::Timeout(timeout)` exactly as with
//! `tokio::time::timeout`: never before the timeout, at most one tick (a tenth of the
//! timeout, 1–25 ms) after it. A tokio timer per call cost a timer-wheel insert and
//! removal and, whenever the wheel was empty (one call at a time), a wake-up of the
//! thread parked on the timer driver: that was most of the ~3 µs a bounded call cost over
//! an unbounded one with one caller.
//!
//! The ticker sleeps (no wake-ups) once a whole tick passed with no call; the first call
//! after that wakes it. It runs on the store's runtime; if that runtime is gone (a store
//! used from another runtime after the one that built it shut down), calls fall back to a
//! tokio timer each.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

/// The ticker's period for `timeout`: a tenth of it, 1–25 ms.
pub(crate) fn tick(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(1), Duration::from_millis(25))
}

/// The deadlines of one store's calls; dropping it ends the ticker.
pub(crate) struct Deadlines {
    shared: Arc<Shared>,
}

struct Shared {
    timeout: Duration,
    state: Mutex<State>,
    /// Wakes an idle ticker (or a closing one).
    wake: Notify,
}

#[derive(Default)]
struct State {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Calls registered now.
    live: usize,
    /// A call registered since the ticker last looked.
    busy: bool,
    /// The ticker is ticking (not asleep until the next call).
    ticking: bool,
    /// The ticker task exists (its runtime is running).
    alive: bool,
    closed: bool,
}

struct Slot {
    deadline: Instant,
    /// `None`: free.
    waker: Option<Waker>,
}

impl Deadlines {
    /// Deadlines of `timeout`, with the ticker spawned on `runtime`.
    pub(crate) fn new(timeout: Duration, runtime: &tokio::runtime::Handle) -> Self {
        let shared = Arc::new(Shared {
            timeout,
            state: Mutex::new(State {
                alive: true,
                ticking: true,
                ..State::default()
            }),
            wake: Notify::new(),
        });
        runtime.spawn(ticker(Arc::downgrade(&shared), tick(timeout)));
        Deadlines { shared }
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// A future that is ready once the timeout has passed since this call.
    pub(crate) fn expiry(&self) -> Expiry<'_> {
        Expiry {
            shared: &self.shared,
            deadline: Instant::now() + self.shared.timeout,
            slot: None,
            fallback: None,
        }
    }
}

impl Drop for Deadlines {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.wake.notify_one();
    }
}

/// See [`Deadlines::expiry`]. Registers on its first poll, frees its slot when dropped.
pub(crate) struct Expiry<'a> {
    shared: &'a Shared,
    deadline: Instant,
    slot: Option<usize>,
    /// Only when the ticker is gone.
    fallback: Option<Pin<Box<Sleep>>>,
}

impl Future for Expiry<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(sleep) = &mut self.fallback {
            return sleep.as_mut().poll(cx);
        }
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        let mut state = lock(&self.shared.state);
        if !state.alive {
            if let Some(i) = self.slot.take() {
                free(&mut state, i);
            }
            drop(state);
            let mut sleep = Box::pin(tokio::time::sleep_until(self.deadline));
            let polled = sleep.as_mut().poll(cx);
            self.fallback = Some(sleep);
            return polled;
        }
        match self.slot {
            Some(i) => {
                if let Some(waker) = &mut state.slots[i].waker {
                    if !waker.will_wake(cx.waker()) {
                        waker.clone_from(cx.waker());
                    }
                }
            }
            None => {
                let slot = Slot {
                    deadline: self.deadline,
                    waker: Some(cx.waker().clone()),
                };
                let i = match state.free.pop() {
                    Some(i) => {
                        state.slots[i] = slot;
                        i
                    }
                    None => {
                        state.slots.push(slot);
                        state.slots.len() - 1
                    }
                };
                state.live += 1;
                state.busy = true;
                let asleep = !state.ticking;
                state.ticking = true;
                drop(state);
                self.slot = Some(i);
                if asleep {
                    self.shared.wake.notify_one();
                }
            }
        }
        Poll::Pending
    }
}

impl Drop for Expiry<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            free(&mut lock(&self.shared.state), i);
        }
    }
}

fn free(state: &mut State, i: usize) {
    state.slots[i].waker = None;
    state.free.push(i);
    state.live -= 1;
}

/// Sets `alive` off when the ticker's task ends or is dropped with its runtime.
struct Alive(Weak<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            let mut state = lock(&shared.state);
            state.alive = false;
            state.ticking = false;
            // Whoever waits on a slot now waits in vain: wake them to fall back.
            for slot in &state.slots {
                if let Some(waker) = &slot.waker {
                    waker.wake_by_ref();
                }
            }
        }
    }
}

async fn ticker(shared: Weak<Shared>, tick: Duration) {
    let _alive = Alive(shared.clone());
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let idle = {
            let mut state = lock(&strong.state);
            if state.closed {
                return;
            }
            if state.live == 0 && !state.busy {
                state.ticking = false;
                true
            } else {
                state.busy = false;
                false
            }
        };
        if idle {
            // Until the next call (or the store's end) says otherwise.
            strong.wake.notified().await;
            continue;
        }
        drop(strong);
        tokio::time::sleep(tick).await;
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let state = lock(&strong.state);
        for slot in &state.slots {
            if let Some(waker) = &slot.waker {
                if slot.deadline <= now {
                    waker.wake_by_ref();
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain bookkeeping: a poisoned value is consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn bounded<T>(deadlines: &Deadlines, call: impl Future<Output = T>) -> Option<T> {
        let expiry = deadlines.expiry();
        tokio::select! {
            biased;
            value = call => Some(value),
            () = expiry => None,
        }
    }

    #[tokio::test]
    async fn a_call_that_answers_in_time_is_not_cut_and_frees_its_slot() {
        let deadlines = Deadlines::new(
            Duration::from_millis(200),
            &tokio::runtime::Handle::current(),
        );
        let answered = bounded(&deadlines, tokio::time::sleep(Duration::from_millis(5))).await;
        assert_eq!(answered, Some(()));
        assert_eq!(lock(&deadlines.shared.state).live, 0);
    }

    #[tokio::test]
    async fn a_call_is_cut_after_the_timeout_never_before_and_within_a_tick() {
        let timeout = Duration::from_millis(50);
        let deadlines = Deadlines::new(timeout, &tokio::runtime::Handle::current());
        for _ in 0..3 {
            let started = std::time::Instant::now();
            let cut = bounded(&deadlines, std::future::pending::<()>()).await;
            let took = started.elapsed();
            assert_eq!(cut, None);
            assert!(took >= timeout, "{took:?}");
            assert!(
                took < timeout + tick(timeout) + Duration::from_millis(40),
                "{took:?}"
            );
            // Let the ticker fall asleep: the next call must wake it.
            tokio::time::sleep(3 * tick(timeout)).await;
        }
        let many = futures::future::join_all(
            (0..100).map(|_| bounded(&deadlines, std::future::pending::<()>())),
        )
        .await;
        assert!(many.iter().all(Option::is_none));
        assert_eq!(lock(&deadlines.shared.state).live, 0);
    }

    #[test]
    fn without_its_runtime_the_deadline_falls_back_to_a_timer() {
        let gone = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let deadlines = Deadlines::new(Duration::from_millis(30), gone.handle());
        gone.block_on(tokio::task::yield_now());
        drop(gone);
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let cut = other.block_on(bounded(&deadlines, std::future::pending::<()>()));
        assert_eq!(cut, None);
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    /// CPU cost of the bound itself, against `tokio::time::timeout`, for calls that
    /// answer after one yield (so both register): `cargo test -p keyward-redis --release
    /// -- --ignored --nocapture bound_cost`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn bound_cost() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let timeout = Duration::from_secs(1);
        let deadlines = Deadlines::new(timeout, rt.handle());
        let call = || async {
            tokio::task::yield_now().await;
            Ok::<(), ()>(())
        };
        for concurrency in [1usize, 64] {
            let n = 200_000 / concurrency;
            for round in 0..3 {
                let started = std::time::Instant::now();
                rt.block_on(async {
                    for _ in 0..n {
                        futures::future::join_all((0..concurrency).map(|_| call())).await;
                    }
                });
                let bare = started.elapsed();
                let started = std::time::Instant::now();
                rt.block_on(async {
                    for _ in 0..n {
                        futures::future::join_all(
                            (0..concurrency).map(|_| tokio::time::timeout(timeout, call())),
                        )
                        .await;
                    }
                });
                let timer = started.elapsed();
                let started = std::time::Instant::now();
                rt.block_on(async {
                    for _ in 0..n {
                        futures::future::join_all(
                            (0..concurrency).map(|_| bounded(&deadlines, call())),
                        )
                        .await;
                    }
                });
                let ticked = started.elapsed();
                let per = |d: Duration| d.as_nanos() as f64 / (n * concurrency) as f64;
                println!(
                    "concurrency {concurrency} round {round}: bare {:.0} ns, tokio timeout {:.0} ns \
                     (+{:.0}), deadlines {:.0} ns (+{:.0}) per call",
                    per(bare),
                    per(timer),
                    per(timer) - per(bare),
                    per(ticked),
                    per(ticked) - per(bare)
                );
            }
        }
    }

    #[test]
    fn ticks_are_a_tenth_of_the_timeout_within_bounds() {
        assert_eq!(tick(Duration::from_millis(50)), Duration::from_millis(5));
        assert_eq!(tick(Duration::from_secs(5)), Duration::from_millis(25));
        assert_eq!(tick(Duration::from_micros(100)), Duration::from_millis(1));
    }
}

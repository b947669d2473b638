//! The pub/sub hub: ONE subscriber connection per store, shared by every local waiter.
//!
//! Scripts that let go of a key (complete, release, ...) publish the record's name on the
//! prefix's channel when the record says someone waits (field `w`). The hub task
//! subscribes to that channel and wakes the local waiters registered for that record.
//!
//! Waiting is never polling: a waiter registers here, then checks the record once (one
//! round trip, which also sets `w`), then sleeps until a message or its fallback timer
//! (the holder's lease end, bounded by the caller's `max`). Messages published while the
//! hub was disconnected are lost, so after every (re)subscription the hub wakes all
//! waiters to check again; the fallback timer bounds what a lost message can cost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::pin::Pin;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often an idle subscriber connection is checked with `PING`, so that a half-open
/// TCP connection (a partition, a frozen server) is noticed and replaced.
const PING_EVERY: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Handle on the hub task; aborting it on drop ends the subscription with the store.
pub(crate) struct Hub {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    waiters: Mutex<HashMap<Box<[u8]>, Waiting>>,
    subscribed: AtomicBool,
}

struct Waiting {
    notify: Arc<Notify>,
    count: usize,
}

impl Hub {
    /// Starts the hub task on `runtime`; `nodes` are tried in turn until one accepts the
    /// subscription (any node of a cluster delivers cluster-wide `PUBLISH`es).
    pub(crate) fn start(
        runtime: &tokio::runtime::Handle,
        nodes: Vec<redis::Client>,
        channel: String,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let task = runtime.spawn(run(nodes, channel, shared.clone()));
        Hub { shared, task }
    }

    /// Registers interest in `record`; the returned guard's `notify` fires on a message
    /// for it (or on a resubscription). Register before checking the record, so that a
    /// message between the check and the wait is not lost.
    pub(crate) fn watch(&self, record: &str) -> Watch {
        let key: Box<[u8]> = record.as_bytes().into();
        let notify = {
            let mut waiters = self.shared.lock();
            let waiting = waiters.entry(key.clone()).or_insert_with(|| Waiting {
                notify: Arc::new(Notify::new()),
                count: 0,
            });
            waiting.count += 1;
            waiting.notify.clone()
        };
        Watch {
            shared: self.shared.clone(),
            key,
            notify,
        }
    }

    /// Whether the hub currently holds a live subscription.
    pub(crate) fn is_subscribed(&self) -> bool {
        self.shared.subscribed.load(Ordering::Acquire)
    }

    pub(crate) fn watched(&self) -> usize {
        self.shared.lock().len()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A registered waiter; deregisters on drop so the map only holds live waiters.
pub(crate) struct Watch {
    shared: Arc<Shared>,
    key: Box<[u8]>,
    notify: Arc<Notify>,
}

impl Watch {
    /// Starts listening now: a message from here on ends the next [`Armed::sleep`], even
    /// one that arrives before the sleep starts. Arm before the script that checks the
    /// record, so that a settlement between its answer and the sleep is not lost.
    pub(crate) fn armed(&self) -> Armed<'_> {
        let mut notified = Box::pin(self.notify.notified());
        notified.as_mut().enable();
        Armed {
            notify: &self.notify,
            notified,
        }
    }
}

/// The one way a Redis waiter waits (idempotency duplicates, serial waiters, single-flight
/// followers): until a publication for its record, the holder's lease end, or its own
/// deadline, whichever comes first; never by polling.
pub(crate) struct Armed<'a> {
    notify: &'a Notify,
    notified: Pin<Box<Notified<'a>>>,
}

impl Armed<'_> {
    /// Sleeps until a message, `lease_left` plus one millisecond (so that Redis has
    /// expired the holder's record when the waiter looks again), or `deadline`; then
    /// listens again for the next sleep.
    pub(crate) async fn sleep(&mut self, deadline: Instant, lease_left: Duration) {
        let fallback = deadline
            .saturating_duration_since(Instant::now())
            .min(lease_left.saturating_add(Duration::from_millis(1)));
        let _ = tokio::time::timeout(fallback, self.notified.as_mut()).await;
        self.notified.set(self.notify.notified());
        self.notified.as_mut().enable();
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiters = self.shared.lock();
        if let Some(waiting) = waiters.get_mut(&self.key) {
            waiting.count -= 1;
            if waiting.count == 0 {
                waiters.remove(&self.key);
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<[u8]>, Waiting>> {
        // Critical sections are single map operations: a poisoned map is consistent.
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wake(&self, record: &[u8]) {
        if let Some(waiting) = self.lock().get(record) {
            waiting.notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for waiting in self.lock().values() {
            waiting.notify.notify_waiters();
        }
    }
}

async fn run(nodes: Vec<redis::Client>, channel: String, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(25);
    for node in nodes.iter().cycle() {
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut pubsub = node.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => {
                tracing::debug!(%error, "keyward redis hub: subscribe failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            Err(_elapsed) => {
                tracing::debug!("keyward redis hub: subscribe timed out");
                continue;
            }
        };
        shared.subscribed.store(true, Ordering::Release);
        // Anything published while we were away is lost: everyone checks again.
        shared.wake_all();
        let subscribed_at = tokio::time::Instant::now();
        listen(pubsub, &shared).await;
        shared.subscribed.store(false, Ordering::Release);
        tracing::debug!("keyward redis hub: subscription lost, reconnecting");
        // A subscription that keeps dying at once must not turn into a reconnect (and
        // wake-everyone) loop: back off unless it lived a while.
        if subscribed_at.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_millis(25);
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Routes messages until the connection ends or stops answering pings.
async fn listen(pubsub: redis::aio::PubSub, shared: &Shared) {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = stream.next() => match message {
                Some(message) => shared.wake(message.get_payload_bytes()),
                None => return,
            },
            _ = ping.tick() => {
                // A subscribed connection answers `["pong", ""]`, not `+PONG`: any
                // answer will do.
                let pong = tokio::time::timeout(CONNECT_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) {
                    return;
                }
            }
        }
    }
}

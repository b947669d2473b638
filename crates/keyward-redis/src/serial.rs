//! `SerialStore` on Redis: a FIFO lock per key with leases, heartbeats, fencing tokens and
//! pub/sub hand-over.
//!
//! Records, all in the key's hash slot (see `scripts/serial/lib.lua`):
//! - `{prefix}serial:{route}:{<tag>}`: the holder (`s=h`, token `t`, waiter id `g`),
//!   expiring with its lease;
//! - `…:q`: the queue, a zset of waiter ids scored by arrival number (FIFO);
//! - `…:d`: each waiter's deadline on Redis's clock, after which it is skipped (it gave
//!   up, or its process died while queued);
//! - `…:n`: the fencing counter, `INCR`ed for tokens and arrival numbers; kept alive
//!   while the key is in use and restarted from the clock in microseconds when gone, so
//!   tokens per key only grow.
//!
//! Each step is one script: acquire-or-enqueue, check (after a wake-up), leave, release
//! (which hands the key to the first live waiter with a fresh token and publishes the
//! record on the store's channel), renew. A queued waiter registers with the hub before
//! its first script, then sleeps until a publication for its record or its fallback timer
//! (`min(max_wait left, holder's lease left)`, so a dead holder's expiry is noticed), and
//! checks once per wake-up: no polling loop.
//!
//! The holder's lease ([`RedisStoreBuilder::serial_lease`](crate::RedisStoreBuilder::serial_lease))
//! is renewed by a heartbeat task every third of the lease until the permit is released;
//! the task holds the store weakly, so a store that is gone (a crashed process) stops
//! renewing and its key passes on when the lease runs out. A permit must be released (the
//! trait's contract, which `PerKeySerialLayer` keeps on every path): a leaked one is
//! renewed for as long as its store lives.
//!
//! Every publication for a record wakes all of this process's waiters on it, and each
//! checks once (one round trip): the hand-over goes to the queue head, the others sleep
//! again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use keyward_core::store::{AcquireOutcome, SerialLimits, SerialPermit, SerialStore, StoreError};
use keyward_core::{FencingToken, ScopedKey};
use redis::{Script, Value};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::RedisStore;
use crate::keys::KeyLayout;
use crate::reply::{self, Leave, Turn};
use crate::script::script;
use crate::util::{millis, spawn};

static ACQUIRE: LazyLock<Script> =
    script!(writes: "fencing.lua", "serial/lib.lua", "serial/acquire.lua");
static CHECK: LazyLock<Script> =
    script!(writes: "fencing.lua", "serial/lib.lua", "serial/check.lua");
static LEAVE: LazyLock<Script> =
    script!(writes: "fencing.lua", "serial/lib.lua", "serial/leave.lua");
static RELEASE: LazyLock<Script> =
    script!(writes: "fencing.lua", "serial/lib.lua", "serial/release.lua");
static RENEW: LazyLock<Script> =
    script!(writes: "fencing.lua", "serial/lib.lua", "serial/renew.lua");

static PERMITS_ACQUIRE: LazyLock<Script> =
    script!(writes: "fencing.lua", "permits/lib.lua", "permits/acquire.lua");
static PERMITS_CHECK: LazyLock<Script> =
    script!(writes: "fencing.lua", "permits/lib.lua", "permits/check.lua");
static PERMITS_LEAVE: LazyLock<Script> =
    script!(writes: "fencing.lua", "permits/lib.lua", "permits/leave.lua");
static PERMITS_RELEASE: LazyLock<Script> =
    script!(writes: "fencing.lua", "permits/lib.lua", "permits/release.lua");
static PERMITS_RENEW: LazyLock<Script> =
    script!(writes: "fencing.lua", "permits/lib.lua", "permits/renew.lua");

/// Scripts [`RedisStore::ping`] preloads.
pub(crate) static SCRIPTS: [&LazyLock<Script>; 10] = [
    &ACQUIRE,
    &CHECK,
    &LEAVE,
    &RELEASE,
    &RENEW,
    &PERMITS_ACQUIRE,
    &PERMITS_CHECK,
    &PERMITS_LEAVE,
    &PERMITS_RELEASE,
    &PERMITS_RENEW,
];

/// The five steps of one kind of per-key lock.
struct Family {
    acquire: &'static LazyLock<Script>,
    check: &'static LazyLock<Script>,
    leave: &'static LazyLock<Script>,
    release: &'static LazyLock<Script>,
    renew: &'static LazyLock<Script>,
}

/// One permit per key: a FIFO mutex (`scripts/serial/`).
static MUTEX: Family = Family {
    acquire: &ACQUIRE,
    check: &CHECK,
    leave: &LEAVE,
    release: &RELEASE,
    renew: &RENEW,
};

/// Several permits per key: a FIFO semaphore (`scripts/permits/`).
static SEMAPHORE: Family = Family {
    acquire: &PERMITS_ACQUIRE,
    check: &PERMITS_CHECK,
    leave: &PERMITS_LEAVE,
    release: &PERMITS_RELEASE,
    renew: &PERMITS_RENEW,
};

/// Default holder lease: how long a crashed holder keeps its key.
pub(crate) const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// Per-store serial state: the lease, unique waiter ids, the running heartbeats.
pub(crate) struct SerialState {
    lease: Duration,
    instance: u64,
    next_waiter: AtomicU64,
    heartbeats: Mutex<HashMap<(Box<str>, u64), AbortHandle>>,
}

impl SerialState {
    /// `instance`: the store's random id, so waiter ids of two processes never collide.
    pub(crate) fn new(lease: Duration, instance: u64) -> Self {
        SerialState {
            lease,
            instance,
            next_waiter: AtomicU64::new(1),
            heartbeats: Mutex::new(HashMap::new()),
        }
    }

    fn waiter_id(&self) -> String {
        let n = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n}", self.instance)
    }

    fn heartbeats(&self) -> MutexGuard<'_, HashMap<(Box<str>, u64), AbortHandle>> {
        // Single map operations: a poisoned map is consistent.
        self.heartbeats
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The records of one key's lock, all in its hash slot.
struct Names {
    /// The key's record: names its heartbeats.
    record: String,
    /// The scripts' keys: with one permit the record, queue, deadlines and fencing
    /// counter; with several the holders (`:p`), queue (`:pq`), deadlines (`:pd`), the
    /// same counter, and the grants (`:pg`).
    keys: Vec<String>,
    /// `None` with one permit; else how many, as a script argument.
    permits: Option<String>,
}

impl Names {
    fn of(record: String, permits: u32) -> Self {
        let companion = |suffix| KeyLayout::companion(&record, suffix);
        let (keys, permits) = if permits <= 1 {
            let keys = vec![
                record.clone(),
                companion("q"),
                companion("d"),
                companion("n"),
            ];
            (keys, None)
        } else {
            let keys = vec![
                companion("p"),
                companion("pq"),
                companion("pd"),
                companion("n"),
                companion("pg"),
            ];
            (keys, Some(permits.to_string()))
        };
        Names {
            record,
            keys,
            permits,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.keys.iter().map(String::as_str).collect()
    }

    /// What a hand-over publishes, so what a waiter watches: the first key.
    fn watched(&self) -> &str {
        &self.keys[0]
    }

    fn family(&self) -> &'static Family {
        match self.permits {
            None => &MUTEX,
            Some(_) => &SEMAPHORE,
        }
    }

    /// `args` and, with several permits, their number last.
    fn args<'a>(&'a self, args: &[&'a [u8]]) -> Vec<&'a [u8]> {
        let mut all = args.to_vec();
        if let Some(permits) = &self.permits {
            all.push(permits.as_bytes());
        }
        all
    }
}

impl RedisStore {
    fn serial_names(&self, key: &ScopedKey, permits: u32) -> Names {
        Names::of(self.inner.keys.record(key), permits)
    }

    fn lease_ms(&self) -> String {
        millis(self.inner.serial.lease)
    }

    /// The permit of a new holder: starts its heartbeat.
    fn held(&self, key: &ScopedKey, names: &Names, token: FencingToken) -> AcquireOutcome {
        let record = names.record.as_str();
        let permits = names_permits(names);
        let weak = Arc::downgrade(&self.inner);
        let every = self.inner.serial.lease / 3;
        let entry: Box<str> = record.into();
        let task_entry = entry.clone();
        let heartbeat = async move {
            let mut tick = tokio::time::interval_at(Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // The store is gone (its process "crashed"): stop renewing.
                let Some(inner) = weak.upgrade() else { return };
                let store = RedisStore { inner };
                match store.renew_serial(&task_entry, token, permits).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(
                            "keyward serial: lease lost before release; the key may run twice"
                        );
                        store
                            .inner
                            .serial
                            .heartbeats()
                            .remove(&(task_entry, token.get()));
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "keyward serial: heartbeat failed, retrying");
                    }
                }
            }
        };
        let handle = spawn(&self.inner.runtime, heartbeat);
        if let Some(previous) = self
            .inner
            .serial
            .heartbeats()
            .insert((entry, token.get()), handle)
        {
            previous.abort();
        }
        AcquireOutcome::Acquired(SerialPermit::of_many(key.clone(), token, permits))
    }

    async fn renew_serial(
        &self,
        record: &str,
        token: FencingToken,
        permits: u32,
    ) -> Result<bool, StoreError> {
        let token = token.get().to_string();
        // Every key of the script, though it uses two: a cluster checks they share a slot.
        let names = Names::of(record.to_owned(), permits);
        let lease = self.lease_ms();
        let renewed: i64 = self
            .eval(
                names.family().renew,
                &names.keys(),
                &[token.as_bytes(), lease.as_bytes()],
            )
            .await?;
        Ok(reply::Fenced::decode(renewed, "serial renew")? == reply::Fenced::Done)
    }

    fn stop_heartbeat(&self, record: &str, token: FencingToken) {
        let key: (Box<str>, u64) = (record.into(), token.get());
        if let Some(handle) = self.inner.serial.heartbeats().remove(&key) {
            handle.abort();
        }
    }

    async fn release_serial(&self, permit: &SerialPermit) -> Result<(), StoreError> {
        let names = self.serial_names(permit.key(), permit.permits());
        self.stop_heartbeat(&names.record, permit.token());
        let token = permit.token().get().to_string();
        let lease = self.lease_ms();
        let args = names.args(&[
            token.as_bytes(),
            lease.as_bytes(),
            self.inner.keys.channel().as_bytes(),
        ]);
        let _released: i64 = self
            .eval(names.family().release, &names.keys(), &args)
            .await?;
        Ok(())
    }

    /// Runs the leave script for `member`; `pass_on`: hand a raced grant to the next
    /// waiter instead of keeping it. Returns the kept token, if any.
    async fn leave_serial(
        &self,
        names: &Names,
        member: &str,
        pass_on: bool,
    ) -> Result<Option<FencingToken>, StoreError> {
        let lease = self.lease_ms();
        let args = names.args(&[
            member.as_bytes(),
            lease.as_bytes(),
            self.inner.keys.channel().as_bytes(),
            if pass_on { b"1" } else { b"0" },
        ]);
        let value: Value = self
            .eval(names.family().leave, &names.keys(), &args)
            .await?;
        Ok(match Leave::decode(value)? {
            Leave::Kept(token) => Some(token),
            Leave::Left => None,
        })
    }

    /// The lease of a serial permit (see `RedisStoreBuilder::serial_lease`).
    pub fn serial_lease(&self) -> Duration {
        self.inner.serial.lease
    }

    /// How many permits of this store are being renewed (test instrumentation: it drops
    /// back to zero once every permit is released).
    #[doc(hidden)]
    pub fn serial_heartbeats(&self) -> usize {
        self.inner.serial.heartbeats().len()
    }
}

/// How many permits `names` are for.
fn names_permits(names: &Names) -> u32 {
    names
        .permits
        .as_deref()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// A waiter whose place in the queue (or a grant) may exist in Redis: dropped unsettled
/// (the acquire future was cancelled, or a script failed), it leaves in the background and
/// passes on a key that was handed to it.
struct Queued<'a> {
    store: &'a RedisStore,
    names: &'a Names,
    member: &'a str,
    settled: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let store = self.store.clone();
        let names = Names::of(self.names.record.clone(), names_permits(self.names));
        let member = self.member.to_owned();
        spawn(&self.store.inner.runtime, async move {
            if let Err(error) = store.leave_serial(&names, &member, true).await {
                tracing::warn!(%error, "keyward serial: a cancelled waiter could not leave; it is skipped after its deadline");
            }
        });
    }
}

impl SerialStore for RedisStore {
    async fn acquire(
        &self,
        key: &ScopedKey,
        limits: SerialLimits,
    ) -> Result<AcquireOutcome, StoreError> {
        let names = self.serial_names(key, limits.permits());
        let member = self.inner.serial.waiter_id();
        let deadline = Instant::now() + limits.max_wait;
        // Registered before the first script, so a hand-over published between the
        // script's answer and the wait is not lost.
        let watch = self.inner.hub.watch(names.watched());
        let mut armed = watch.armed();
        let mut queued = Queued {
            store: self,
            names: &names,
            member: &member,
            settled: false,
        };
        let lease = self.lease_ms();
        let max_queue = limits.max_queue.to_string();
        let max_wait = limits
            .max_wait
            .as_millis()
            .min(i64::MAX as u128)
            .to_string();
        let channel = self.inner.keys.channel().as_bytes();
        let family = names.family();
        let args = names.args(&[
            member.as_bytes(),
            lease.as_bytes(),
            max_queue.as_bytes(),
            max_wait.as_bytes(),
            channel,
        ]);
        let value: Value = self.eval(family.acquire, &names.keys(), &args).await?;
        let mut left = match Turn::decode(value)? {
            Turn::Acquired(token) => {
                queued.settled = true;
                return Ok(self.held(key, &names, token));
            }
            Turn::Queued { lease_left } => lease_left,
            Turn::QueueFull => {
                queued.settled = true;
                return Ok(AcquireOutcome::QueueFull);
            }
            Turn::TimedOut => {
                queued.settled = true;
                return Ok(AcquireOutcome::Timeout);
            }
        };
        loop {
            if Instant::now() < deadline {
                armed.sleep(deadline, left).await;
            }
            if Instant::now() >= deadline {
                // Out of time: leave, unless the key arrived meanwhile (then take it).
                let kept = self.leave_serial(&names, &member, false).await?;
                queued.settled = true;
                return Ok(match kept {
                    Some(token) => self.held(key, &names, token),
                    None => AcquireOutcome::Timeout,
                });
            }
            let args = names.args(&[member.as_bytes(), lease.as_bytes(), channel]);
            let value: Value = self.eval(family.check, &names.keys(), &args).await?;
            match Turn::decode(value)? {
                Turn::Acquired(token) => {
                    queued.settled = true;
                    return Ok(self.held(key, &names, token));
                }
                Turn::Queued { lease_left } => left = lease_left,
                Turn::TimedOut => {
                    queued.settled = true;
                    return Ok(AcquireOutcome::Timeout);
                }
                Turn::QueueFull => {
                    return Err(StoreError::Corrupt(
                        "serial check answered 'queue full'".to_owned(),
                    ));
                }
            }
        }
    }

    async fn release(&self, permit: SerialPermit) -> Result<(), StoreError> {
        self.release_serial(&permit).await
    }

    fn release_detached(&self, permit: SerialPermit) {
        // Stop renewing now, even if the release itself has to wait for the runtime.
        self.stop_heartbeat(&self.inner.keys.record(permit.key()), permit.token());
        let store = self.clone();
        spawn(&self.inner.runtime, async move {
            if let Err(error) = store.release_serial(&permit).await {
                tracing::warn!(%error, key_hash = %permit.key().key_hash(), "keyward serial: detached release failed; the key frees when its lease ends");
            }
        });
    }
}

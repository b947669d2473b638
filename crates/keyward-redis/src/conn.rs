//! The command connection: one multiplexed connection (standalone, via
//! `ConnectionManager`, which reconnects by itself) or a cluster connection; every call
//! bounded by the store timeout and mapped onto [`StoreError`].
//!
//! **Cluster topology.** The cluster client is built with its own retries OFF: it would
//! re-send a command whose connection dropped after Redis may have run it, and a claim,
//! an acquire or a quota check run twice is not the same as run once (issue 13). Instead
//! [`Conn::eval`] retries, within the store timeout, exactly the failures that prove the
//! script did NOT run: `MOVED`/`ASK` (a slot moved), `TRYAGAIN`, `CLUSTERDOWN`,
//! `MASTERDOWN`, `LOADING`, `READONLY` (a demoted primary refused a write; scripts
//! declare their flags, so Redis 7 checks before running them) and a refused connection.
//! Those that say the slot map is stale (`READONLY`, `CLUSTERDOWN`, a refused or timed-out
//! node) also make the store rebuild its cluster connection from the seeds: the client
//! refreshes its slot map by itself only on `MOVED`. A background task also compares
//! `CLUSTER SLOTS` with the map the connection was built from every
//! [`RedisStoreBuilder::topology_refresh`](crate::RedisStoreBuilder::topology_refresh)
//! and rebuilds on a change, which catches a failover that nothing else reports (a frozen
//! primary whose calls only time out).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use keyward_core::store::StoreError;
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind, Value};
use tokio::time::Instant;

#[derive(Clone)]
pub(crate) enum Conn {
    Standalone(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// A cluster connection made on first use (so a store can be built while Redis is down)
/// and rebuilt from the seeds when the topology changed under it.
pub(crate) struct Cluster {
    client: ClusterClient,
    current: Mutex<Option<Current>>,
    /// One connect at a time (first use or rebuild).
    connecting: tokio::sync::Mutex<()>,
    rebuilding: AtomicBool,
    last_rebuild: Mutex<Option<Instant>>,
    runtime: tokio::runtime::Handle,
}

#[derive(Clone)]
struct Current {
    conn: ClusterConnection,
    /// The primaries per slot range when it was built (`None`: not read yet).
    slots: Option<Arc<Vec<SlotOwner>>>,
}

/// One line of `CLUSTER SLOTS`: a slot range and its primary's address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct SlotOwner {
    first: i64,
    last: i64,
    primary: String,
}

/// Two rebuilds of the cluster connection are at least this far apart: a storm of errors
/// during a failover costs one rebuild per period, not one per request.
const MIN_REBUILD_GAP: Duration = Duration::from_millis(250);
/// Longest a rebuild may take (connect to the seeds, read the slots, connect to every
/// node: each step bounded by the connect timeout, at least 1 s).
const REBUILD_BOUND: Duration = Duration::from_secs(10);
/// Backoff between two attempts of a script that provably did not run.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// What a failed call tells about the script and the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Redis did not run it: safe to send again. `stale`: the slot map is out of date.
    NotRun { stale: bool },
    /// It may have run (the connection dropped or timed out after sending): never sent
    /// again. `stale` as above.
    MaybeRan { stale: bool },
    /// Anything else (a script error, a corrupt reply): reported as it is.
    Final,
}

/// Classifies a cluster call's error (see the module docs).
pub(crate) fn classify(error: &RedisError) -> Failure {
    match error.kind() {
        ErrorKind::Server(kind) => match kind {
            // The client rebuilds its slot map itself on MOVED; the others are transient.
            ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::TryAgain
            | ServerErrorKind::BusyLoading => Failure::NotRun { stale: false },
            ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly => Failure::NotRun { stale: true },
            _ => Failure::Final,
        },
        ErrorKind::ClusterConnectionNotFound => Failure::NotRun { stale: true },
        ErrorKind::Io if error.is_connection_refusal() => Failure::NotRun { stale: true },
        ErrorKind::Io => Failure::MaybeRan { stale: true },
        _ => Failure::Final,
    }
}

impl Conn {
    pub(crate) fn cluster(client: ClusterClient, runtime: tokio::runtime::Handle) -> Self {
        Conn::Cluster(Arc::new(Cluster {
            client,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            rebuilding: AtomicBool::new(false),
            last_rebuild: Mutex::new(None),
            runtime,
        }))
    }

    /// Runs `script` with `keys` and `args`: `EVALSHA`, and only after Redis lost its
    /// script cache (restart, `SCRIPT FLUSH`, failover) `SCRIPT LOAD` + `EVALSHA` again.
    /// On a cluster, failures that prove the script did not run are retried (see the
    /// module docs) until the caller's bound cuts the call off.
    ///
    /// The command is built once, straight into one buffer ([`evalsha`]): no copy of the
    /// keys and arguments per call beyond that (redis-rs's `ScriptInvocation` made one
    /// `Vec` per key and argument and then copied them all into the command).
    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, RedisError> {
        let cmd = evalsha(script, keys, args);
        match self {
            Conn::Standalone(manager) => {
                let mut manager = manager.clone();
                match cmd.query_async(&mut manager).await {
                    Err(error) if is_noscript(&error) => {
                        script.load_async(&mut manager).await?;
                        cmd.query_async(&mut manager).await
                    }
                    result => result,
                }
            }
            Conn::Cluster(cluster) => {
                let mut backoff = FIRST_BACKOFF;
                loop {
                    let result = match cluster.get().await {
                        Ok(mut conn) => match cmd.query_async(&mut conn).await {
                            Err(error) if is_noscript(&error) => {
                                match script.load_async(&mut conn).await {
                                    Ok(_) => cmd.query_async(&mut conn).await,
                                    Err(error) => Err(error),
                                }
                            }
                            result => result,
                        },
                        Err(error) => Err(error),
                    };
                    let Err(error) = result else { return result };
                    match classify(&error) {
                        Failure::NotRun { stale } => {
                            if stale {
                                cluster.rebuild_soon();
                            }
                            tracing::debug!(%error, "keyward redis cluster: script not run; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(MAX_BACKOFF);
                        }
                        Failure::MaybeRan { stale } => {
                            if stale {
                                cluster.rebuild_soon();
                            }
                            return Err(error);
                        }
                        Failure::Final => return Err(error),
                    }
                }
            }
        }
    }

    /// Sends one plain command.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        match self {
            Conn::Standalone(manager) => cmd.query_async(&mut manager.clone()).await,
            Conn::Cluster(cluster) => {
                let result = cmd.query_async(&mut cluster.get().await?).await;
                if let Err(error) = &result {
                    if !matches!(classify(error), Failure::Final) {
                        cluster.rebuild_soon();
                    }
                }
                result
            }
        }
    }

    /// Loads `script` into Redis's script cache (on every primary of a cluster).
    pub(crate) async fn load(&self, script: &Script) -> Result<(), RedisError> {
        match self {
            Conn::Standalone(manager) => script.load_async(&mut manager.clone()).await?,
            Conn::Cluster(cluster) => script.load_async(&mut cluster.get().await?).await?,
        };
        Ok(())
    }

    /// A call on this connection timed out: on a cluster, the node it went to may be
    /// frozen or gone and its replica promoted, which no error would tell.
    pub(crate) fn timed_out(&self) {
        if let Conn::Cluster(cluster) = self {
            cluster.rebuild_soon();
        }
    }

    /// Starts the periodic topology check of a cluster connection (nothing for a
    /// standalone one); it ends with the store.
    pub(crate) fn watch_topology(&self, every: Duration, timeout: Duration) {
        if let Conn::Cluster(cluster) = self {
            let weak = Arc::downgrade(cluster);
            cluster.runtime.spawn(watch_topology(weak, every, timeout));
        }
    }
}

async fn watch_topology(cluster: Weak<Cluster>, every: Duration, timeout: Duration) {
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        cluster.check_topology(timeout).await;
    }
}

impl Cluster {
    async fn get(&self) -> Result<ClusterConnection, RedisError> {
        if let Some(current) = self.current() {
            return Ok(current.conn);
        }
        let _one = self.connecting.lock().await;
        if let Some(current) = self.current() {
            return Ok(current.conn);
        }
        let conn = self.client.get_async_connection().await?;
        self.set(Current {
            conn: conn.clone(),
            slots: None,
        });
        Ok(conn)
    }

    fn current(&self) -> Option<Current> {
        lock(&self.current).clone()
    }

    fn set(&self, current: Current) {
        *lock(&self.current) = Some(current);
    }

    /// Rebuilds the connection from the seeds in the background, unless a rebuild runs
    /// or ran less than [`MIN_REBUILD_GAP`] ago. Calls in flight finish on the old one.
    fn rebuild_soon(self: &Arc<Self>) {
        {
            let mut last = lock(&self.last_rebuild);
            if last.is_some_and(|at| at.elapsed() < MIN_REBUILD_GAP) {
                return;
            }
            if self.rebuilding.swap(true, Ordering::AcqRel) {
                return;
            }
            *last = Some(Instant::now());
        }
        let cluster = self.clone();
        self.runtime.spawn(async move {
            let _one = cluster.connecting.lock().await;
            // Bounded, so that a rebuild that never ends cannot stop all later ones.
            let rebuilt =
                tokio::time::timeout(REBUILD_BOUND, cluster.client.get_async_connection()).await;
            match rebuilt {
                Ok(Ok(conn)) => {
                    tracing::debug!("keyward redis cluster: connection rebuilt from the seeds");
                    cluster.set(Current { conn, slots: None });
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "keyward redis cluster: rebuild failed; the next error tries again");
                }
                Err(_elapsed) => {
                    tracing::debug!("keyward redis cluster: rebuild timed out; the next error tries again");
                }
            }
            cluster.rebuilding.store(false, Ordering::Release);
        });
    }

    /// Reads `CLUSTER SLOTS` and rebuilds the connection if the primaries changed since
    /// it was built (or if the question fails: the node asked may be the one gone).
    async fn check_topology(self: &Arc<Self>, timeout: Duration) {
        let Some(current) = self.current() else {
            return;
        };
        let mut conn = current.conn.clone();
        let asked = tokio::time::timeout(
            timeout.max(Duration::from_millis(500)),
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn),
        )
        .await;
        let slots = match asked {
            Ok(Ok(value)) => match slot_owners(&value) {
                Some(slots) => Arc::new(slots),
                None => return,
            },
            Ok(Err(_)) | Err(_) => return self.rebuild_soon(),
        };
        match &current.slots {
            None => {
                // The first look at this connection: what it was built from (near enough:
                // a change in between is caught by the next look, or by MOVED).
                let mut guard = lock(&self.current);
                if let Some(now) = guard.as_mut().filter(|now| now.slots.is_none()) {
                    now.slots = Some(slots);
                }
            }
            Some(known) if *known != slots => {
                tracing::info!(
                    "keyward redis cluster: slot owners changed; rebuilding the connection"
                );
                self.rebuild_soon();
            }
            Some(_) => {}
        }
    }
}

/// The primaries per slot range of a `CLUSTER SLOTS` reply, sorted.
pub(crate) fn slot_owners(value: &Value) -> Option<Vec<SlotOwner>> {
    let Value::Array(ranges) = value else {
        return None;
    };
    let mut owners = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(parts) = range else {
            return None;
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(node))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return None;
        };
        let host = match node.first() {
            Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
            Some(Value::SimpleString(host)) => host.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = node.get(1) else {
            return None;
        };
        owners.push(SlotOwner {
            first: *first,
            last: *last,
            primary: format!("{host}:{port}"),
        });
    }
    owners.sort();
    Some(owners)
}

/// `EVALSHA <sha> <number of keys> <keys..> <args..>` in one buffer sized up front.
pub(crate) fn evalsha(script: &Script, keys: &[&str], args: &[&[u8]]) -> redis::Cmd {
    let data = script.get_hash().len()
        + 7
        + 2
        + keys.iter().map(|key| key.len()).sum::<usize>()
        + args.iter().map(|arg| arg.len()).sum::<usize>();
    let mut cmd = redis::Cmd::with_capacity(3 + keys.len() + args.len(), data);
    cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys.len());
    for key in keys {
        cmd.arg(*key);
    }
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

fn is_noscript(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single assignments: a poisoned value is consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Bounds `call` by `timeout` and maps its failure onto [`StoreError`].
pub(crate) async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(store_error(&error)),
        Err(_elapsed) => Err(StoreError::Timeout(timeout)),
    }
}

fn store_error(error: &RedisError) -> StoreError {
    if error.kind() == redis::ErrorKind::UnexpectedReturnType {
        StoreError::Corrupt(error.to_string())
    } else {
        StoreError::Unavailable(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn server(code: &str) -> RedisError {
        // The way a reply error reaches a caller: parsed from the wire.
        let wire = format!("-{code} detail\r\n");
        redis::parse_redis_value(wire.as_bytes())
            .unwrap()
            .extract_error()
            .unwrap_err()
    }

    #[test]
    fn only_failures_that_prove_the_script_did_not_run_are_retried() {
        for code in [
            "MOVED 12 127.0.0.1:7000",
            "ASK 12 127.0.0.1:7000",
            "TRYAGAIN",
            "LOADING",
        ] {
            assert_eq!(
                classify(&server(code)),
                Failure::NotRun { stale: false },
                "{code}"
            );
        }
        for code in ["CLUSTERDOWN", "MASTERDOWN", "READONLY"] {
            assert_eq!(
                classify(&server(code)),
                Failure::NotRun { stale: true },
                "{code}"
            );
        }
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&refused), Failure::NotRun { stale: true });
        // Sent, then the connection went away or stalled: it may have run, never resent.
        for kind in [
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::TimedOut,
        ] {
            let error = RedisError::from(std::io::Error::from(kind));
            assert_eq!(
                classify(&error),
                Failure::MaybeRan { stale: true },
                "{kind:?}"
            );
        }
        assert_eq!(classify(&server("ERR script failed")), Failure::Final);
        assert_eq!(classify(&server("NOSCRIPT")), Failure::Final);
    }

    #[test]
    fn evalsha_is_the_command_redis_rs_builds_for_a_script() {
        let script = Script::new("return 1");
        let built = evalsha(&script, &["k1", "{k}:n"], &[b"\x00\xff", b"5000"]);
        let expected = redis::cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(2)
            .arg("k1")
            .arg("{k}:n")
            .arg(&b"\x00\xff"[..])
            .arg("5000")
            .get_packed_command();
        assert_eq!(built.get_packed_command(), expected);
        let none = evalsha(&script, &[], &[]);
        assert!(none.get_packed_command().ends_with(b"$1\r\n0\r\n"));
    }

    #[test]
    fn slot_owners_read_cluster_slots() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node(7001),
                node(7004),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node(7000)]),
        ]);
        let owners = slot_owners(&reply).unwrap();
        assert_eq!(owners[0].primary, "127.0.0.1:7000");
        assert_eq!((owners[1].first, owners[1].last), (5461, 16383));
        assert!(slot_owners(&Value::Nil).is_none());
    }
}

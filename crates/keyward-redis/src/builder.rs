//! Building a [`RedisStore`].

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;

use crate::conn::Conn;
use crate::hub::Hub;
use crate::keys::KeyLayout;
use crate::{Inner, RedisStore};

/// Settings of a [`RedisStore`]; see [`RedisStore::builder`].
#[derive(Clone)]
pub struct RedisStoreBuilder {
    urls: Vec<String>,
    prefix: String,
    timeout: Duration,
    cluster: bool,
    serial_lease: Duration,
    topology_refresh: Duration,
}

/// How often a cluster store compares `CLUSTER SLOTS` with the slot map it uses.
pub(crate) const DEFAULT_TOPOLOGY_REFRESH: Duration = Duration::from_secs(1);

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        RedisStoreBuilder {
            urls: Vec::new(),
            prefix: "keyward:".to_owned(),
            timeout: Duration::from_millis(50),
            cluster: false,
            serial_lease: crate::serial::DEFAULT_LEASE,
            topology_refresh: DEFAULT_TOPOLOGY_REFRESH,
        }
    }
}

impl std::fmt::Debug for RedisStoreBuilder {
    // URLs may carry passwords: only their number is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("urls", &self.urls.len())
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("cluster", &self.cluster)
            .field("serial_lease", &self.serial_lease)
            .field("topology_refresh", &self.topology_refresh)
            .finish()
    }
}

/// Why a [`RedisStore`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// No `url` was given.
    #[error("store.url: no Redis URL given")]
    NoUrl,
    /// Several URLs are only meaningful as cluster seed nodes.
    #[error("store.url: {0} URLs given for a standalone Redis; use cluster mode for several nodes")]
    TooManyUrls(usize),
    /// A URL could not be parsed (the URL itself is not repeated: it may hold a password).
    #[error("store.url: invalid Redis URL #{index}: {reason}")]
    InvalidUrl {
        /// Position of the URL in the order given, from 1.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A zero timeout would fail every call.
    #[error("store.timeout: must be greater than zero")]
    ZeroTimeout,
    /// The store runs background work (reconnects, the pub/sub hub) on tokio.
    #[error("RedisStore must be built inside a tokio runtime")]
    NoRuntime,
}

impl RedisStoreBuilder {
    /// A Redis URL: `redis://[user:password@]host[:port][/db]` or `rediss://...` for TLS.
    /// In cluster mode, call it once per seed node.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }

    /// Prefix of every key and channel (default `keyward:`): separates applications or
    /// environments sharing one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Bound on every store call (default 50 ms); a call that takes longer fails with
    /// `StoreError::Timeout` and the layer applies its `OnStoreError` policy.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Talk to a Redis Cluster whose seed nodes are the given URLs. Any seed that answers
    /// will do: dead seeds are skipped, at build time (nothing is contacted then) and on
    /// every reconnect. Give several, so that one node down does not keep a process from
    /// reaching the cluster.
    pub fn cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Cluster only: how often the store asks the cluster which primary owns which slots
    /// (`CLUSTER SLOTS`, one small command) and rebuilds its connection from the seeds
    /// when that changed (default 1 s, at least 100 ms). Errors that say the map is stale
    /// (`READONLY`, `CLUSTERDOWN`, a refused or timed-out node) rebuild it sooner; `MOVED`
    /// updates it at once. Bounds how long a failover that no error reports (a frozen
    /// primary) goes unnoticed.
    pub fn topology_refresh(mut self, every: Duration) -> Self {
        self.topology_refresh = every.max(Duration::from_millis(100));
        self
    }

    /// Lease of a `PerKeySerialLayer` holder (default 10 s, at least 30 ms): renewed by a
    /// heartbeat every third of it while the holder runs, it is how long a crashed
    /// holder's key stays blocked before the next waiter proceeds.
    pub fn serial_lease(mut self, lease: Duration) -> Self {
        self.serial_lease = lease.max(Duration::from_millis(30));
        self
    }

    /// Builds the store without contacting Redis; the first call connects, and the
    /// connection comes back by itself after Redis restarts. Must run inside a tokio
    /// runtime.
    pub fn build(self) -> Result<RedisStore, BuildError> {
        if self.urls.is_empty() {
            return Err(BuildError::NoUrl);
        }
        if self.urls.len() > 1 && !self.cluster {
            return Err(BuildError::TooManyUrls(self.urls.len()));
        }
        if self.timeout.is_zero() {
            return Err(BuildError::ZeroTimeout);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError::NoRuntime)?;
        let clients = self
            .urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                redis::Client::open(url.as_str()).map_err(|error| BuildError::InvalidUrl {
                    index: i + 1,
                    reason: error.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Reconnects give up after a few attempts; the next call then starts a fresh
        // attempt, so a long outage costs nothing once Redis is back.
        let connect_timeout = self.timeout.max(Duration::from_secs(1));
        let conn = if self.cluster {
            // Retries off: the client would re-send a script whose connection dropped
            // after Redis ran it (a claim or an acquire twice). `Conn::eval` retries what
            // provably did not run.
            let client = ClusterClient::builder(self.urls.clone())
                .connection_timeout(connect_timeout)
                .response_timeout(connect_timeout)
                .retries(0)
                .build()
                .map_err(|error| BuildError::InvalidUrl {
                    index: 1,
                    reason: error.to_string(),
                })?;
            let conn = Conn::cluster(client, runtime.clone());
            conn.watch_topology(self.topology_refresh, self.timeout);
            conn
        } else {
            // No response timeout of redis-rs's own: every call is bounded by the store
            // timeout already (`conn::bounded`), and redis-rs's second timer per call cost
            // ~10 % of a bare `GET`'s throughput with 64 callers (benches/results/redis.md).
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(None)
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500))
                .set_pipeline_buffer_size(1024);
            let client = clients[0].clone();
            let manager = {
                let _guard = runtime.enter();
                ConnectionManager::new_lazy_with_config(client, config)
            };
            Conn::Standalone(manager.map_err(|error| BuildError::InvalidUrl {
                index: 1,
                reason: error.to_string(),
            })?)
        };
        let keys = KeyLayout::new(&self.prefix);
        let instance = crate::util::instance_id();
        let hub = Hub::start(&runtime, clients, keys.channel().to_owned());
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                keys,
                timeout: self.timeout,
                hub,
                runtime,
                instance,
                claims: std::sync::atomic::AtomicU64::new(0),
                serial: crate::serial::SerialState::new(self.serial_lease, instance),
            }),
        })
    }
}

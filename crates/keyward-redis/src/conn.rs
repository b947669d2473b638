//! The command connection: one multiplexed connection (standalone, via
//! `ConnectionManager`, which reconnects by itself) or a cluster connection; every call
//! bounded by the store timeout and mapped onto [`StoreError`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keyward_core::store::StoreError;
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisError, Script, Value};
use tokio::sync::OnceCell;

#[derive(Clone)]
pub(crate) enum Conn {
    Standalone(ConnectionManager),
    Cluster(Arc<LazyCluster>),
}

/// A cluster connection made on first use, so that a store can be built while Redis is
/// down and start working when it comes up; a failed attempt is retried by the next call.
pub(crate) struct LazyCluster {
    pub(crate) client: ClusterClient,
    pub(crate) conn: OnceCell<ClusterConnection>,
}

impl Conn {
    /// Runs `script` with `keys` and `args`: `EVALSHA`, and only after Redis lost its
    /// script cache (restart, `SCRIPT FLUSH`, failover) `SCRIPT LOAD` + `EVALSHA` again.
    pub(crate) async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, RedisError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        match self {
            Conn::Standalone(manager) => invocation.invoke_async(&mut manager.clone()).await,
            Conn::Cluster(lazy) => invocation.invoke_async(&mut lazy.get().await?).await,
        }
    }

    /// Sends one plain command.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        match self {
            Conn::Standalone(manager) => cmd.query_async(&mut manager.clone()).await,
            Conn::Cluster(lazy) => cmd.query_async(&mut lazy.get().await?).await,
        }
    }

    /// Loads `script` into Redis's script cache (on every primary of a cluster).
    pub(crate) async fn load(&self, script: &Script) -> Result<(), RedisError> {
        match self {
            Conn::Standalone(manager) => script.load_async(&mut manager.clone()).await?,
            Conn::Cluster(lazy) => script.load_async(&mut lazy.get().await?).await?,
        };
        Ok(())
    }
}

impl LazyCluster {
    async fn get(&self) -> Result<ClusterConnection, RedisError> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }
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

/// Reads script replies: an array of integers and bulk strings.
pub(crate) struct Reply(std::vec::IntoIter<Value>);

impl Reply {
    pub(crate) fn new(value: Value) -> Result<Self, StoreError> {
        match value {
            Value::Array(items) => Ok(Reply(items.into_iter())),
            other => Err(StoreError::Corrupt(format!(
                "expected a script reply array, got {other:?}"
            ))),
        }
    }

    pub(crate) fn int(&mut self) -> Result<i64, StoreError> {
        match self.0.next() {
            Some(Value::Int(n)) => Ok(n),
            Some(Value::BulkString(bytes)) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| StoreError::Corrupt("expected an integer".to_owned())),
            other => Err(StoreError::Corrupt(format!(
                "expected an integer, got {other:?}"
            ))),
        }
    }

    pub(crate) fn bytes(&mut self) -> Result<Vec<u8>, StoreError> {
        match self.0.next() {
            Some(Value::BulkString(bytes)) => Ok(bytes),
            _ => Err(StoreError::Corrupt("expected a bulk string".to_owned())),
        }
    }
}

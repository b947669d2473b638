//! Shared by the Redis benches: a `redis-server` of their own, a store, a bare connection
//! for the baseline, and the operations compared.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use keyward_core::store::{ClaimOutcome, Fingerprint, IdempotencyStore, StoredResponse};
use keyward_core::{Key, Scope, ScopedKey};
use keyward_redis::RedisStore;
use keyward_tests::redis_kit::RedisServer;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

const LEASE: Duration = Duration::from_secs(5);
const TTL: Duration = Duration::from_secs(600);

/// A Lua script that only reads one hash field: what any one-round-trip Lua decision
/// costs before its own logic.
static HGET: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new("return redis.call('HGET', KEYS[1], 'r')"));

pub struct Setup {
    _server: RedisServer,
    pub store: RedisStore,
    pub bare: ConnectionManager,
    /// A second bare connection without redis-rs's own per-call response timeout.
    #[allow(dead_code)] // used by one of the two benches
    pub untimed: ConnectionManager,
    replay_key: ScopedKey,
    fingerprint: Fingerprint,
    next: AtomicU64,
}

fn key(raw: &str) -> ScopedKey {
    ScopedKey::new("idem", "bench", Scope::of(b"Bearer bench"), Key::from(raw))
}

impl Setup {
    /// Starts Redis and stores a 256-byte response to replay, a 256-byte string for `GET`
    /// and a 256-byte hash field for the bare script.
    pub async fn start() -> Setup {
        let server = RedisServer::start();
        let store = RedisStore::builder()
            .url(server.url())
            .timeout(Duration::from_secs(1))
            .build()
            .expect("store");
        store.ping().await.expect("redis answers");
        let bare = ConnectionManager::new(server.client())
            .await
            .expect("bare connection");
        let untimed = ConnectionManager::new_with_config(
            server.client(),
            redis::aio::ConnectionManagerConfig::new().set_response_timeout(None),
        )
        .await
        .expect("bare connection");
        let fingerprint = Fingerprint::builder().part(b"POST /pay 10 EUR").finish();
        let replay_key = key("replayed");
        let ClaimOutcome::Claimed(token) = store
            .claim(&replay_key, &fingerprint, LEASE)
            .await
            .expect("claim")
        else {
            panic!("fresh key");
        };
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().expect("valid"));
        let response = StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from(vec![b'x'; 256]),
            trailers: None,
        };
        store
            .complete(&replay_key, token, &fingerprint, response, TTL)
            .await
            .expect("complete");
        let mut conn = bare.clone();
        let () = conn.set("bench:plain", vec![b'x'; 256]).await.expect("set");
        let () = conn
            .hset("bench:hash", "r", vec![b'x'; 256])
            .await
            .expect("hset");
        Setup {
            _server: server,
            store,
            bare,
            untimed,
            replay_key,
            fingerprint,
            next: AtomicU64::new(0),
        }
    }

    /// Baseline: one `GET` of a 256-byte value.
    pub async fn get(&self) {
        let value: Vec<u8> = self.bare.clone().get("bench:plain").await.expect("get");
        assert_eq!(value.len(), 256);
    }

    /// A `GET` wrapped in a `tokio::time::timeout` per call: what one timer costs.
    #[allow(dead_code)] // used by one of the two benches
    pub async fn get_with_timeout(&self) {
        let value: Vec<u8> =
            tokio::time::timeout(Duration::from_secs(1), self.bare.clone().get("bench:plain"))
                .await
                .expect("in time")
                .expect("get");
        assert_eq!(value.len(), 256);
    }

    /// A `GET` on the connection without redis-rs's per-call response timeout.
    #[allow(dead_code)] // used by one of the two benches
    pub async fn get_untimed(&self) {
        let value: Vec<u8> = self.untimed.clone().get("bench:plain").await.expect("get");
        assert_eq!(value.len(), 256);
    }

    /// Baseline: one `SET`.
    #[allow(dead_code)] // used by one of the two benches
    pub async fn set(&self) {
        let () = self.bare.clone().set("bench:set", 1).await.expect("set");
    }

    /// Baseline: `EVALSHA` of a script reading one 256-byte hash field.
    pub async fn evalsha_hget(&self) {
        let value: Vec<u8> = HGET
            .key("bench:hash")
            .invoke_async(&mut self.bare.clone())
            .await
            .expect("evalsha");
        assert_eq!(value.len(), 256);
    }

    /// What Redis itself has spent so far: its CPU time (`INFO cpu`, user + system, in
    /// seconds) and per command `(name, calls, usec)` from `INFO commandstats`.
    #[allow(dead_code)] // used by one of the two benches
    pub async fn server_stats(&self) -> ServerStats {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .arg("commandstats")
            .query_async(&mut self.bare.clone())
            .await
            .expect("INFO cpu commandstats");
        let mut stats = ServerStats::default();
        for line in info.lines() {
            let line = line.trim();
            if let Some(v) = line
                .strip_prefix("used_cpu_user:")
                .or_else(|| line.strip_prefix("used_cpu_sys:"))
            {
                stats.cpu += v.parse::<f64>().expect("cpu seconds");
            } else if let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            {
                let field = |key: &str| -> u64 {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                stats
                    .commands
                    .push((name.to_owned(), field("calls"), field("usec")));
            }
        }
        stats
    }

    /// A claim that finds the stored response (a retry's replay decision).
    pub async fn claim_replay(&self) {
        let outcome = self
            .store
            .claim(&self.replay_key, &self.fingerprint, LEASE)
            .await
            .expect("claim");
        assert!(matches!(outcome, ClaimOutcome::Completed(_)));
    }

    /// A claim of a key never seen (a first request's decision).
    pub async fn claim_new_key(&self) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let outcome = self
            .store
            .claim(&key(&format!("k{n}")), &self.fingerprint, LEASE)
            .await
            .expect("claim");
        assert!(matches!(outcome, ClaimOutcome::Claimed(_)));
    }
}

/// See [`Setup::server_stats`].
#[derive(Debug, Default, Clone)]
pub struct ServerStats {
    pub cpu: f64,
    pub commands: Vec<(String, u64, u64)>,
}

impl ServerStats {
    /// `(calls, usec)` of `name` run since `before`.
    #[allow(dead_code)] // used by one of the two benches
    pub fn since(&self, before: &ServerStats, name: &str) -> (u64, u64) {
        let of = |s: &ServerStats| {
            s.commands
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or((0, 0), |(_, calls, usec)| (*calls, *usec))
        };
        let (now, was) = (of(self), of(before));
        (now.0 - was.0, now.1 - was.1)
    }

    /// Every command run since `before` but `info` (the snapshots) and `ping`, as
    /// `(name, calls)`.
    #[allow(dead_code)] // used by one of the two benches
    pub fn commands_since(&self, before: &ServerStats) -> Vec<(String, u64)> {
        self.commands
            .iter()
            .filter(|(n, _, _)| n != "info" && n != "ping")
            .map(|(n, _, _)| (n.clone(), self.since(before, n).0))
            .filter(|(_, calls)| *calls > 0)
            .collect()
    }
}

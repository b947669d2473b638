//! Paired rounds for a noisy machine: every round runs each variant back to back (a bare
//! `GET`, a bare one-command `EVALSHA`, the idempotency claim that replays, the claim of a
//! new key; alone and with 64 concurrent callers), so load drifting over the run hits all
//! variants alike. Reports the median per variant and its ratio to the bare `GET`.
//!
//! `cargo bench -p keyward-benches --bench redis_paired` (needs `redis-server` on PATH).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use keyward_core::store::{ClaimOutcome, Fingerprint, IdempotencyStore, StoredResponse};
use keyward_core::{Key, Scope, ScopedKey};
use keyward_redis::RedisStore;
use keyward_tests::redis_kit::RedisServer;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

const ROUNDS: usize = 21;
const SEQUENTIAL: usize = 1000;
const BATCHES: usize = 40;
const CONCURRENCY: usize = 64;
const LEASE: Duration = Duration::from_secs(5);

static HGET: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new("return redis.call('HGET', KEYS[1], 'r')"));

#[derive(Clone, Copy, Debug)]
enum Variant {
    Get,
    EvalshaHget,
    ClaimReplay,
    ClaimNewKey,
}

const VARIANTS: [Variant; 4] = [
    Variant::Get,
    Variant::EvalshaHget,
    Variant::ClaimReplay,
    Variant::ClaimNewKey,
];

struct Bench {
    conn: ConnectionManager,
    store: RedisStore,
    replay_key: ScopedKey,
    fingerprint: Fingerprint,
    next: AtomicU64,
}

fn key(raw: &str) -> ScopedKey {
    ScopedKey::new("idem", "bench", Scope::of(b"Bearer bench"), Key::from(raw))
}

impl Bench {
    async fn one(&self, variant: Variant) {
        match variant {
            Variant::Get => {
                let value: Vec<u8> = self.conn.clone().get("plain").await.expect("get");
                assert_eq!(value.len(), 256);
            }
            Variant::EvalshaHget => {
                let value: Vec<u8> = HGET
                    .key("hash")
                    .invoke_async(&mut self.conn.clone())
                    .await
                    .expect("evalsha");
                assert_eq!(value.len(), 256);
            }
            Variant::ClaimReplay => {
                let outcome = self
                    .store
                    .claim(&self.replay_key, &self.fingerprint, LEASE)
                    .await
                    .expect("claim");
                assert!(matches!(outcome, ClaimOutcome::Completed(_)));
            }
            Variant::ClaimNewKey => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                let outcome = self
                    .store
                    .claim(&key(&format!("k{n}")), &self.fingerprint, LEASE)
                    .await
                    .expect("claim");
                assert!(matches!(outcome, ClaimOutcome::Claimed(_)));
            }
        }
    }

    /// Microseconds per decision, one caller.
    async fn sequential(&self, variant: Variant) -> f64 {
        let started = Instant::now();
        for _ in 0..SEQUENTIAL {
            self.one(variant).await;
        }
        started.elapsed().as_secs_f64() * 1e6 / SEQUENTIAL as f64
    }

    /// Decisions per second with 64 concurrent callers.
    async fn concurrent(&self, variant: Variant) -> f64 {
        let started = Instant::now();
        for _ in 0..BATCHES {
            futures::future::join_all((0..CONCURRENCY).map(|_| self.one(variant))).await;
        }
        (BATCHES * CONCURRENCY) as f64 / started.elapsed().as_secs_f64()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let server = RedisServer::start();
        let store = RedisStore::builder()
            .url(server.url())
            .timeout(Duration::from_secs(1))
            .build()
            .expect("store");
        store.ping().await.expect("redis answers");
        let conn = ConnectionManager::new(server.client()).await.expect("connect");
        let mut setup = conn.clone();
        let () = setup.set("plain", vec![b'x'; 256]).await.expect("set");
        let () = setup.hset("hash", "r", vec![b'x'; 256]).await.expect("hset");
        let fingerprint = Fingerprint::builder().part(b"POST /pay 10 EUR").finish();
        let replay_key = key("replayed");
        let ClaimOutcome::Claimed(token) = store
            .claim(&replay_key, &fingerprint, LEASE)
            .await
            .expect("claim")
        else {
            panic!("fresh key")
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
            .complete(&replay_key, token, &fingerprint, response, Duration::from_secs(600))
            .await
            .expect("complete");
        let bench = Bench {
            conn,
            store,
            replay_key,
            fingerprint,
            next: AtomicU64::new(0),
        };
        let mut latency = vec![Vec::new(); VARIANTS.len()];
        let mut throughput = vec![Vec::new(); VARIANTS.len()];
        for _ in 0..ROUNDS {
            for (i, variant) in VARIANTS.iter().enumerate() {
                latency[i].push(bench.sequential(*variant).await);
                throughput[i].push(bench.concurrent(*variant).await);
            }
        }
        let latency: Vec<f64> = latency.into_iter().map(median).collect();
        let throughput: Vec<f64> = throughput.into_iter().map(median).collect();
        println!("| variant | latency (µs, median of {ROUNDS}) | vs GET | throughput, 64 callers (/s) | vs GET |");
        println!("|---|---|---|---|---|");
        for (i, variant) in VARIANTS.iter().enumerate() {
            println!(
                "| {variant:?} | {:.1} | {:.2}x | {:.0} | {:.2}x |",
                latency[i],
                latency[i] / latency[0],
                throughput[i],
                throughput[i] / throughput[0]
            );
        }
    });
}

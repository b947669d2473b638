//! RedisStore decisions against a bare Redis round trip on the same server, in the same
//! run: latency of one decision (claim that replays, claim of a new key) vs `GET`/`SET`,
//! and throughput with 64 concurrent callers on one store.
//!
//! `cargo bench -p keyward-benches --bench redis -- --warm-up-time 1 --measurement-time 3`
//! (needs `redis-server` on PATH; the bench starts its own on a free port).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, StatusCode};
use keyward_core::store::{ClaimOutcome, Fingerprint, IdempotencyStore, StoredResponse};
use keyward_core::{Key, Scope, ScopedKey};
use keyward_redis::RedisStore;
use keyward_tests::redis_kit::RedisServer;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

const LEASE: Duration = Duration::from_secs(5);
const TTL: Duration = Duration::from_secs(600);
const CONCURRENCY: usize = 64;

struct Setup {
    _server: RedisServer,
    store: RedisStore,
    bare: ConnectionManager,
    replay_key: ScopedKey,
    fingerprint: Fingerprint,
    next: Arc<AtomicU64>,
}

fn key(raw: &str) -> ScopedKey {
    ScopedKey::new("idem", "bench", Scope::of(b"Bearer bench"), Key::from(raw))
}

async fn setup() -> Setup {
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
        replay_key,
        fingerprint,
        next: Arc::new(AtomicU64::new(0)),
    }
}

async fn get(mut conn: ConnectionManager) {
    let value: Vec<u8> = conn.get("bench:plain").await.expect("get");
    assert_eq!(value.len(), 256);
}

/// A Lua script that only reads one hash field: what any one-round-trip Lua decision
/// costs before its own logic.
static NOOP: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new("return redis.call('HGET', KEYS[1], 'r')"));

async fn evalsha_noop(mut conn: ConnectionManager) {
    let _: Option<Vec<u8>> = NOOP
        .key("bench:hash")
        .invoke_async(&mut conn)
        .await
        .expect("evalsha");
}

async fn evalsha_noop_timeout(conn: ConnectionManager) {
    tokio::time::timeout(Duration::from_secs(1), evalsha_noop(conn))
        .await
        .expect("in time");
}

async fn replay(s: &Setup) {
    let outcome = s
        .store
        .claim(&s.replay_key, &s.fingerprint, LEASE)
        .await
        .expect("claim");
    assert!(matches!(outcome, ClaimOutcome::Completed(_)));
}

async fn claim_new(s: &Setup) {
    let n = s.next.fetch_add(1, Ordering::Relaxed);
    let outcome = s
        .store
        .claim(&key(&format!("k{n}")), &s.fingerprint, LEASE)
        .await
        .expect("claim");
    assert!(matches!(outcome, ClaimOutcome::Claimed(_)));
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let s = rt.block_on(setup());

    let mut latency = c.benchmark_group("redis_latency");
    latency.bench_function("bare_get", |b| b.to_async(&rt).iter(|| get(s.bare.clone())));
    latency.bench_function("bare_set", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = s.bare.clone();
            let () = conn.set("bench:set", 1).await.expect("set");
        })
    });
    latency.bench_function("bare_evalsha_hget", |b| {
        b.to_async(&rt).iter(|| evalsha_noop(s.bare.clone()))
    });
    latency.bench_function("bare_evalsha_hget_timeout", |b| {
        b.to_async(&rt)
            .iter(|| evalsha_noop_timeout(s.bare.clone()))
    });
    latency.bench_function("claim_replay", |b| b.to_async(&rt).iter(|| replay(&s)));
    latency.bench_function("claim_new_key", |b| b.to_async(&rt).iter(|| claim_new(&s)));
    latency.finish();

    let mut throughput = c.benchmark_group("redis_throughput_64");
    throughput.throughput(Throughput::Elements(CONCURRENCY as u64));
    throughput.bench_function("bare_get", |b| {
        b.to_async(&rt)
            .iter(|| futures::future::join_all((0..CONCURRENCY).map(|_| get(s.bare.clone()))))
    });
    throughput.bench_function("bare_evalsha_hget", |b| {
        b.to_async(&rt).iter(|| {
            futures::future::join_all((0..CONCURRENCY).map(|_| evalsha_noop(s.bare.clone())))
        })
    });
    throughput.bench_function("claim_replay", |b| {
        b.to_async(&rt)
            .iter(|| futures::future::join_all((0..CONCURRENCY).map(|_| replay(&s))))
    });
    throughput.bench_function("claim_new_key", |b| {
        b.to_async(&rt)
            .iter(|| futures::future::join_all((0..CONCURRENCY).map(|_| claim_new(&s))))
    });
    throughput.finish();
    rt.block_on(print_server_time(&s));
}

/// Redis's own time per command (`INFO commandstats`): separates server CPU from the round
/// trip.
async fn print_server_time(s: &Setup) {
    let mut conn = s.bare.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    for line in info.lines() {
        if [
            "cmdstat_get:",
            "cmdstat_set:",
            "cmdstat_evalsha:",
            "cmdstat_hmget:",
        ]
        .iter()
        .any(|p| line.starts_with(p))
        {
            println!("server: {line}");
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

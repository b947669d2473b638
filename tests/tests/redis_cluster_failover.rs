//! RedisStore on a Redis Cluster with replicas, across failovers (issue 18): once the
//! cluster is `ok` again, every key is coordinated again within seconds, whatever kind of
//! failover happened, and with one seed URL dead.
//!
//! Each test starts a cluster of its own (3 primaries + 3 replicas, node timeout 1 s) on
//! loopback ports and stops it at the end.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::Duration;

use keyward::RedisStore;
use keyward::core::store::{ClaimOutcome, Fingerprint, IdempotencyStore};
use keyward::core::{Key, Scope, ScopedKey};
use keyward_tests::redis_kit::{ClusterOptions, ReplicatedCluster};
use tokio::time::Instant;

/// Keys spread over every shard (40 keys: each third of the slots gets about 13).
const KEYS: usize = 40;
/// The bound the issue sets: coordinated again within a few seconds of `cluster_state:ok`.
const RECOVERY: Duration = Duration::from_secs(5);
const LEASE: Duration = Duration::from_secs(30);

fn key(run: &str, i: usize) -> ScopedKey {
    ScopedKey::new(
        "idem",
        "payments",
        Scope::Unscoped,
        Key::from(format!("{run}-{i}")),
    )
}

fn fp() -> Fingerprint {
    Fingerprint::builder().part(b"body").finish()
}

fn store(urls: &[String], prefix: &str) -> RedisStore {
    let mut builder = RedisStore::builder()
        .cluster(true)
        .prefix(prefix)
        .timeout(Duration::from_millis(300));
    for url in urls {
        builder = builder.url(url.clone());
    }
    builder.build().unwrap()
}

/// Claims every key of `run` until all are claimed, or `within` passes; returns how long
/// it took, or the keys still failing with their last error.
async fn claim_all(store: &RedisStore, run: &str, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut left: Vec<usize> = (0..KEYS).collect();
    let mut last_error = String::new();
    while !left.is_empty() {
        let mut still = Vec::new();
        for i in left {
            match store.claim(&key(run, i), &fp(), LEASE).await {
                Ok(ClaimOutcome::Claimed(_)) => {}
                Ok(other) => panic!("key {i} of {run}: unexpected {other:?}"),
                Err(error) => {
                    last_error = error.to_string();
                    still.push(i);
                }
            }
        }
        left = still;
        if started.elapsed() > within && !left.is_empty() {
            return Err(format!(
                "{} of {KEYS} keys still not claimable after {within:?}; last error: {last_error}",
                left.len()
            ));
        }
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_manual_failover_claims_on_that_shard_succeed_within_seconds() {
    let cluster =
        tokio::task::block_in_place(|| ReplicatedCluster::start(ClusterOptions::default()));
    let store = store(&cluster.urls(), "mf:");
    // Connected, with the slot map of before the failover.
    claim_all(&store, "before", RECOVERY).await.unwrap();

    // Node 3 (replica of node 0) takes over; node 0 stays up as its replica.
    tokio::task::block_in_place(|| {
        cluster.failover(3, false);
        cluster.wait_until_ok(Duration::from_secs(10));
    });
    let took = claim_all(&store, "after", RECOVERY).await.unwrap();
    println!("manual failover: every key claimable {took:?} after cluster_state:ok");
}

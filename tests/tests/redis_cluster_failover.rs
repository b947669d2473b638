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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_primary_is_killed_its_replica_takes_over_and_claims_succeed_within_seconds() {
    let mut cluster =
        tokio::task::block_in_place(|| ReplicatedCluster::start(ClusterOptions::default()));
    let store = store(&cluster.urls(), "kill:");
    claim_all(&store, "before", RECOVERY).await.unwrap();

    let killed = Instant::now();
    tokio::task::block_in_place(|| {
        cluster.node_mut(0).kill_9();
        // Promoted after the node timeout (1 s) plus an election.
        cluster.wait_for_primary(3, Duration::from_secs(15));
        cluster.wait_until_ok(Duration::from_secs(10));
    });
    let ok_after = killed.elapsed();
    let took = claim_all(&store, "after", RECOVERY).await.unwrap();
    println!(
        "primary kill -9: cluster ok {ok_after:?} after the kill, every key claimable {took:?} after that"
    );

    // The old primary comes back as a replica of the new one; nothing changes for keys.
    tokio::task::block_in_place(|| {
        cluster.node_mut(0).start_again();
        cluster.wait_until_healthy(Duration::from_secs(20));
    });
    claim_all(&store, "rejoined", RECOVERY).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_frozen_primary_is_replaced_claims_succeed_within_seconds() {
    let cluster =
        tokio::task::block_in_place(|| ReplicatedCluster::start(ClusterOptions::default()));
    let store = store(&cluster.urls(), "stop:");
    claim_all(&store, "before", RECOVERY).await.unwrap();

    // Frozen past the node timeout: connections to it stay open and nothing answers, so
    // only timeouts and the periodic topology check can tell the store.
    let frozen = Instant::now();
    tokio::task::block_in_place(|| {
        cluster.nodes()[0].pause();
        cluster.wait_for_primary(3, Duration::from_secs(15));
        cluster.wait_until_ok(Duration::from_secs(10));
    });
    let ok_after = frozen.elapsed();
    let took = claim_all(&store, "during", RECOVERY).await.unwrap();
    println!(
        "primary SIGSTOP: cluster ok {ok_after:?} after the freeze, every key claimable {took:?} after that (old primary still frozen)"
    );

    // Woken, it learns it was replaced and turns replica: it answers MOVED.
    tokio::task::block_in_place(|| {
        cluster.nodes()[0].resume();
        cluster.wait_until_healthy(Duration::from_secs(20));
    });
    claim_all(&store, "after", RECOVERY).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_seed_does_not_keep_the_store_from_the_cluster() {
    let cluster =
        tokio::task::block_in_place(|| ReplicatedCluster::start(ClusterOptions::default()));
    // The first seed is a closed port (a node that is down when the process starts).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("redis://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut seeds = vec![dead];
    seeds.extend(cluster.urls());
    let store = store(&seeds, "seed:");
    store.ping().await.unwrap();
    claim_all(&store, "k", RECOVERY).await.unwrap();
    // The hub found a live seed too.
    let deadline = Instant::now() + RECOVERY;
    while !store.is_subscribed() {
        assert!(Instant::now() < deadline, "the hub never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_resubscribes_elsewhere_when_its_node_dies_and_waiters_are_woken_again() {
    let mut cluster =
        tokio::task::block_in_place(|| ReplicatedCluster::start(ClusterOptions::default()));
    let urls = cluster.urls();
    let holder = store(&urls, "hub:");
    let waiter = store(&urls, "hub:");
    let deadline = Instant::now() + RECOVERY;
    while !waiter.is_subscribed() {
        assert!(Instant::now() < deadline, "the hub never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The hub subscribes to the first seed it reaches: node 0. Kill it.
    tokio::task::block_in_place(|| {
        cluster.node_mut(0).kill_9();
        cluster.wait_for_primary(3, Duration::from_secs(15));
        cluster.wait_until_ok(Duration::from_secs(10));
    });
    claim_all(&holder, "warm", RECOVERY).await.unwrap();
    let deadline = Instant::now() + RECOVERY;
    while !waiter.is_subscribed() {
        assert!(Instant::now() < deadline, "the hub did not resubscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A waiter on another store is woken by the release's publication, not its 30 s bound.
    let k = key("woken", 0);
    let token = match holder.claim(&k, &fp(), LEASE).await.unwrap() {
        ClaimOutcome::Claimed(token) => token,
        other => panic!("{other:?}"),
    };
    let wait = {
        let waiter = waiter.clone();
        let k = k.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            waiter.wait_settled(&k, token, LEASE).await.unwrap();
            started.elapsed()
        })
    };
    // The waiter is registered once it flagged the record as watched.
    let deadline = Instant::now() + RECOVERY;
    while waiter.watched_records() == 0 {
        assert!(Instant::now() < deadline, "the waiter never registered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    holder.release(&k, token).await.unwrap();
    let waited = wait.await.unwrap();
    assert!(waited < Duration::from_secs(2), "woken after {waited:?}");
}

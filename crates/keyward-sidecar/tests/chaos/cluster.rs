//! Redis Cluster failover (issue 18): three sidecars on a 3 primary + 3 replica cluster
//! (AOF `always`, node timeout 1 s, 6 s leases) while the injector fails shards over in
//! every way a cluster does: a manual `CLUSTER FAILOVER`, `kill -9` of a primary (and
//! its restart), SIGSTOP of a primary past the node timeout, and a lagging replica
//! promoted by force. Probes with fresh keys measure, per failover, how long after
//! `cluster_state:ok` every key was coordinated again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keyward_tests::redis_kit::{ClusterOptions, ReplicatedCluster};

use crate::client::{Clients, KeyPlan};
use crate::fleet::{ChaosSidecar, StoreSetup};
use crate::upstream::{FencedUpstream, lock};
use crate::verdict::{Fault, FaultKind, Row, Scenario, Verdict, judge};

const SIDECARS: usize = 3;
const WORKERS: usize = 8;
const KEYS: usize = 200;
const ACCOUNTS: u32 = 10;
/// A worker's pause between keys: the run spans the whole fault schedule (~30 s).
const PACE: Duration = Duration::from_millis(400);
/// Leases as in the setup: longer than a failover (node timeout + election).
pub const CLUSTER_LEASE: Duration = Duration::from_secs(6);
/// Every key must be coordinated again this long after `cluster_state:ok`.
const ANSWERABLE_WITHIN: Duration = Duration::from_secs(5);
const PROBE_EVERY: Duration = Duration::from_millis(100);
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// One failover and when the cluster was `ok` again after it.
#[derive(Debug, Clone, Copy)]
pub struct Failover {
    kind: FaultKind,
    at: Instant,
    /// `cluster_state:ok` on every running node, with the shard served by its new primary.
    ok_at: Instant,
    /// Everything back: restarted or resumed nodes rejoined as replicas, in sync.
    healthy_at: Instant,
}

/// A fresh-key request through a sidecar, sent every [`PROBE_EVERY`].
#[derive(Debug, Clone, Copy)]
struct Probe {
    sent: Instant,
    ok: bool,
    /// The status, or `None` for no answer within 3 s.
    status: Option<u16>,
}

fn wait_ok(cluster: &ReplicatedCluster) -> Instant {
    cluster.wait_until_ok(Duration::from_secs(20));
    Instant::now()
}

/// Runs the schedule on the cluster (blocking: the kit drives `redis-cli`).
fn inject(
    mut cluster: ReplicatedCluster,
    running: &AtomicBool,
) -> (ReplicatedCluster, Vec<Failover>) {
    let pause = |d: Duration| std::thread::sleep(d);
    let calm = Duration::from_millis(2_500);
    let mut done = Vec::new();
    pause(Duration::from_secs(2));

    // 1. Manual failover of shard 0: lossless; the old primary stays up, as replica.
    let replica = cluster.partner(cluster.primary_of_pair(0));
    let at = Instant::now();
    cluster.failover(replica, false);
    let ok_at = wait_ok(&cluster);
    cluster.wait_until_healthy(Duration::from_secs(20));
    done.push(Failover {
        kind: FaultKind::ManualFailover,
        at,
        ok_at,
        healthy_at: Instant::now(),
    });
    pause(calm);

    // 2. kill -9 of shard 1's primary; restarted once its replica took over.
    let primary = cluster.primary_of_pair(1);
    let replica = cluster.partner(primary);
    let at = Instant::now();
    cluster.node_mut(primary).kill_9();
    cluster.wait_for_primary(replica, Duration::from_secs(20));
    let ok_at = wait_ok(&cluster);
    pause(Duration::from_secs(1));
    cluster.node_mut(primary).start_again();
    cluster.wait_until_healthy(Duration::from_secs(30));
    done.push(Failover {
        kind: FaultKind::PrimaryKill,
        at,
        ok_at,
        healthy_at: Instant::now(),
    });
    pause(calm);

    // 3. SIGSTOP of shard 2's primary for 2.5 s, past the node timeout (1 s).
    let primary = cluster.primary_of_pair(2);
    let replica = cluster.partner(primary);
    let at = Instant::now();
    cluster.nodes()[primary].pause();
    cluster.wait_for_primary(replica, Duration::from_secs(20));
    let ok_at = wait_ok(&cluster);
    if let Some(left) = Duration::from_millis(2_500).checked_sub(at.elapsed()) {
        pause(left);
    }
    cluster.nodes()[primary].resume();
    cluster.wait_until_healthy(Duration::from_secs(30));
    done.push(Failover {
        kind: FaultKind::PrimaryFreeze,
        at,
        ok_at,
        healthy_at: Instant::now(),
    });
    pause(calm);

    // 4. A lagging replica: held back from applying what its primary replicates, then
    //    promoted by force. What it had not applied is lost (asynchronous replication).
    if running.load(Ordering::SeqCst) {
        let replica = cluster.partner(cluster.primary_of_pair(0));
        let at = Instant::now();
        let paused = cluster.cli(replica, "CLIENT PAUSE 10000 WRITE");
        assert!(paused.contains("OK"), "CLIENT PAUSE: {paused}");
        pause(Duration::from_millis(500));
        let offset = |i: usize, field: &str| -> i64 {
            let info = cluster.cli(i, "INFO replication");
            info.lines()
                .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
                .unwrap_or(-1)
        };
        let primary = cluster.partner(replica);
        let behind = offset(primary, "master_repl_offset:") - offset(replica, "slave_repl_offset:");
        println!(
            "chaos cluster: the paused replica is {behind} replication bytes behind its primary when promoted"
        );
        cluster.failover(replica, true);
        let unpaused = cluster.cli(replica, "CLIENT UNPAUSE");
        assert!(unpaused.contains("OK"), "CLIENT UNPAUSE: {unpaused}");
        let ok_at = wait_ok(&cluster);
        cluster.wait_until_healthy(Duration::from_secs(30));
        done.push(Failover {
            kind: FaultKind::LaggingFailover,
            at,
            ok_at,
            healthy_at: Instant::now(),
        });
    }
    (cluster, done)
}

/// Sends a fresh key to each sidecar in turn every [`PROBE_EVERY`] while `running`.
async fn probe(sidecars: Vec<std::net::SocketAddr>, running: Arc<AtomicBool>) -> Vec<Probe> {
    let http = crate::support::client();
    let probes = Arc::new(Mutex::new(Vec::new()));
    let n = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    while running.load(Ordering::SeqCst) {
        tick.tick().await;
        let i = n.fetch_add(1, Ordering::SeqCst);
        let url = format!(
            "http://{}/accounts/probe{}/ops",
            sidecars[i as usize % sidecars.len()],
            i % 4
        );
        let (http, probes) = (http.clone(), probes.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let req = http::Request::post(url)
                .header("idempotency-key", format!("probe-{i}"))
                .header("x-chaos-delay-ms", "5")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(3), async {
                let res = http.request(req).await.ok()?;
                let status = res.status();
                res.into_body().collect().await.ok()?;
                Some(status.as_u16())
            })
            .await;
            let status = answer.ok().flatten();
            let ok = status.is_some_and(|s| (200..300).contains(&s));
            probes.lock().unwrap().push(Probe { sent, ok, status });
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let mut probes = probes.lock().unwrap().clone();
    probes.sort_by_key(|p| p.sent);
    probes
}

/// Per failover, the recovery the probes saw, and the "answerable within N s" row.
fn recovery(failovers: &[Failover], probes: &[Probe]) -> (String, Row) {
    use std::fmt::Write as _;
    let mut row =
        Row::new("every key answerable within 5 s of cluster_state:ok (fresh-key probes)");
    let mut t = String::from(
        "\n| failover | cluster `ok` after the fault | probes failing after `ok` for | probes failed in all |\n|---|---:|---:|---:|\n",
    );
    for (i, f) in failovers.iter().enumerate() {
        let next = failovers.get(i + 1).map(|n| n.at);
        let mine: Vec<&Probe> = probes
            .iter()
            .filter(|p| p.sent >= f.at && next.is_none_or(|n| p.sent < n))
            .collect();
        let last_failed = mine.iter().filter(|p| !p.ok).map(|p| p.sent).max();
        let failing_after_ok = last_failed
            .map(|sent| sent.saturating_duration_since(f.ok_at))
            .unwrap_or_default();
        let _ = writeln!(
            t,
            "| {:?} | {:.2} s | {:.2} s | {} of {} |",
            f.kind,
            (f.ok_at - f.at).as_secs_f64(),
            failing_after_ok.as_secs_f64(),
            mine.iter().filter(|p| !p.ok).count(),
            mine.len()
        );
        let late: Vec<Option<u16>> = mine
            .iter()
            .filter(|p| !p.ok && p.sent >= f.ok_at)
            .map(|p| p.status)
            .collect();
        println!(
            "chaos cluster recovery: {:?}: cluster ok {:.2} s after the fault, every probe ok {:.2} s after that (healthy again {:.2} s after the fault); failed after ok: {late:?}",
            f.kind,
            (f.ok_at - f.at).as_secs_f64(),
            failing_after_ok.as_secs_f64(),
            (f.healthy_at - f.at).as_secs_f64()
        );
    }
    for p in probes {
        let owner = failovers.iter().rev().find(|f| f.at <= p.sent);
        let due = owner.is_none_or(|f| p.sent >= f.ok_at + ANSWERABLE_WITHIN);
        if due {
            let sent = p.sent;
            row.check(p.ok, || {
                let since = owner.map(|f| (f.kind, sent - f.ok_at));
                format!("a probe failed {since:?} after cluster_state:ok")
            });
        }
    }
    (t, row)
}

pub async fn scenario(seed: u64) -> Verdict {
    let name = "Redis Cluster 3+3 (AOF always, node timeout 1 s); manual failover, primary kill -9 + restart, primary SIGSTOP past the node timeout, lagging replica promoted by force";
    println!("chaos: {name}: seed {seed:#x} (replay with CHAOS_SEED={seed:#x})");
    let cluster = tokio::task::block_in_place(|| {
        ReplicatedCluster::start(ClusterOptions {
            node_timeout: Duration::from_millis(1000),
            aof_always: true,
        })
    });
    let store = StoreSetup {
        urls: cluster.urls(),
        cluster: true,
        lease: CLUSTER_LEASE,
    };
    let upstream = FencedUpstream::start().await;
    let mut sidecars = Vec::new();
    for i in 0..SIDECARS {
        sidecars.push(ChaosSidecar::start_on(i, upstream.addr, &store).await);
    }
    let addrs: Vec<_> = sidecars.iter().map(|s| s.addr).collect();
    let clients = Clients::paced(
        addrs.clone(),
        KeyPlan::plan(seed, KEYS, ACCOUNTS),
        seed,
        PACE,
    );

    let running = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let prober = tokio::spawn(probe(addrs, running.clone()));
    let injector = {
        let running = running.clone();
        tokio::task::spawn_blocking(move || inject(cluster, &running))
    };
    tokio::time::timeout(RUN_LIMIT, clients.run(WORKERS, false))
        .await
        .expect("the run phase is bounded");
    let (_cluster, failovers) = tokio::time::timeout(RUN_LIMIT, injector)
        .await
        .expect("the fault injector is bounded")
        .unwrap();
    // A few probes after the last failover too.
    tokio::time::sleep(ANSWERABLE_WITHIN + Duration::from_secs(1)).await;
    running.store(false, Ordering::SeqCst);
    let probes = prober.await.unwrap();
    let run = started.elapsed();

    // Let abandoned upstream work end and every lease run out, then ask every key again.
    upstream.settle(CLUSTER_LEASE).await;
    let final_started = Instant::now();
    if tokio::time::timeout(RUN_LIMIT, clients.run(WORKERS, true))
        .await
        .is_err()
    {
        for (i, sidecar) in sidecars.iter().enumerate() {
            println!("--- sidecar {i} log (tail) ---\n{}", sidecar.log_tail(40));
        }
        panic!("the final round did not end within {RUN_LIMIT:?}");
    }
    let final_round = final_started.elapsed();

    let faults: Vec<Fault> = failovers
        .iter()
        .map(|f| Fault {
            at: f.at,
            // Writes may be lost until every node is back in its role: a frozen or killed
            // primary that comes back acknowledges writes for a moment, until it learns
            // it was replaced, and then resyncs from its successor.
            until: f.healthy_at,
            kind: f.kind,
            target: None,
        })
        .collect();
    let ledger = lock(&upstream.ledger);
    let attempts = clients.attempts.lock().unwrap();
    let mut verdict = judge(&Scenario {
        name,
        seed,
        persistent: true,
        plan: &clients.plan,
        attempts: &attempts,
        execs: &ledger.execs,
        uncoordinated: ledger.uncoordinated,
        faults: &faults,
        lease: CLUSTER_LEASE,
        run,
        final_round,
    });
    let (table, row) = recovery(&failovers, &probes);
    verdict.table.push_str(&table);
    verdict.table.push_str(&format!(
        "| {} | {} | {} |\n",
        row.name, row.checked, row.violations
    ));
    for example in &row.examples {
        verdict
            .table
            .push_str(&format!("VIOLATION {}: {example}\n", row.name));
    }
    verdict.rows.push(row);
    println!("{}", verdict.table);
    if verdict.violations() > 0 {
        for (i, sidecar) in sidecars.iter().enumerate() {
            println!("--- sidecar {i} log (tail) ---\n{}", sidecar.log_tail(30));
        }
    }
    verdict
}

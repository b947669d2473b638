//! The invariants, checked on what the clients and the upstream recorded, printed as a
//! table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::client::{Attempt, HANG_DEADLINE, KeyPlan, Outcome};
use crate::fleet::{MAX_WAIT, REQUEST_TIMEOUT};
use crate::upstream::{Exec, ExecOutcome};

/// Time the upstream may take to notice that a caller went away (its connection closed)
/// after the sidecar already handed the key on: an overlap shorter than this is a race
/// between two sockets, not two live holders.
const ABANDON_GRACE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    SidecarKill,
    SidecarFreeze,
    RedisRestart,
    RedisPause,
    /// `CLUSTER FAILOVER` on a replica: the primary hands over after the replica caught
    /// up; nothing is lost.
    ManualFailover,
    /// `kill -9` of a primary: its replica is promoted after the node timeout.
    PrimaryKill,
    /// SIGSTOP of a primary past the node timeout: replaced while frozen.
    PrimaryFreeze,
    /// A replica held back (`CLIENT PAUSE WRITE`) while its primary takes writes, then
    /// promoted with `CLUSTER FAILOVER FORCE`: what it had not applied is lost.
    LaggingFailover,
}

impl FaultKind {
    /// A failover that may lose the old primary's last acknowledged writes (asynchronous
    /// replication): records, claims, locks and counter increments.
    fn may_lose_writes(self) -> bool {
        matches!(
            self,
            FaultKind::PrimaryKill | FaultKind::PrimaryFreeze | FaultKind::LaggingFailover
        )
    }
}

/// How long before a lossy failover a write may have been acknowledged and still be lost
/// (replication lag on loopback is well under this; a paused replica lags from `at`).
const LOSS_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub at: Instant,
    /// When the process was back (restarted, resumed).
    pub until: Instant,
    pub kind: FaultKind,
    /// The sidecar it hit, if it hit one.
    pub target: Option<usize>,
}

pub struct Scenario<'a> {
    pub name: &'a str,
    pub seed: u64,
    /// Redis keeps its data across a restart (AOF, `appendfsync always`).
    pub persistent: bool,
    pub plan: &'a [KeyPlan],
    pub attempts: &'a [Attempt],
    pub execs: &'a [Exec],
    pub uncoordinated: u64,
    pub faults: &'a [Fault],
    /// The sidecars' idempotency and serial lease.
    pub lease: Duration,
    pub run: Duration,
    pub final_round: Duration,
}

/// One invariant's line: how many cases were checked, how many broke it.
pub struct Row {
    pub name: &'static str,
    pub checked: usize,
    pub violations: usize,
    pub examples: Vec<String>,
}

impl Row {
    pub fn new(name: &'static str) -> Row {
        Row {
            name,
            checked: 0,
            violations: 0,
            examples: Vec::new(),
        }
    }

    pub fn check(&mut self, ok: bool, example: impl FnOnce() -> String) {
        self.checked += 1;
        if !ok {
            self.violations += 1;
            if self.examples.len() < 5 {
                self.examples.push(example());
            }
        }
    }
}

pub struct Verdict {
    pub table: String,
    /// Guaranteed invariants: every one must have zero violations.
    pub rows: Vec<Row>,
}

impl Verdict {
    pub fn violations(&self) -> usize {
        self.rows.iter().map(|r| r.violations).sum()
    }
}

fn exec_of_body(body: &str) -> Option<usize> {
    body.strip_prefix("exec=")?.split(' ').next()?.parse().ok()
}

/// Why an earlier execution's answer never reached anyone, from its attempt's fate.
fn lost_cause(attempt: Option<&Attempt>) -> &'static str {
    match attempt.map(|a| &a.outcome) {
        Some(Outcome::Aborted) => "client aborted mid-request",
        Some(Outcome::ConnectionError) => "its sidecar was killed",
        Some(Outcome::Answer { status: 504, .. }) => "upstream past request_timeout (504)",
        Some(Outcome::Answer { body, .. }) if body.starts_with("fenced") => {
            "its caller still waited, but its lock had passed on"
        }
        Some(Outcome::Answer { .. }) => "answered otherwise",
        Some(Outcome::Hung) => "hung",
        None => "unknown attempt",
    }
}

pub fn judge(s: &Scenario<'_>) -> Verdict {
    let attempts: HashMap<u64, &Attempt> = s.attempts.iter().map(|a| (a.id, a)).collect();
    let key_index: HashMap<&str, usize> = s
        .plan
        .iter()
        .enumerate()
        .map(|(i, p)| (p.key.as_str(), i))
        .collect();
    let redis_restarts: Vec<Instant> = s
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::RedisRestart)
        .map(|f| f.at)
        .collect();
    let restart_between = |from: Instant, to: Instant| {
        !s.persistent && redis_restarts.iter().any(|t| *t >= from && *t <= to)
    };
    // A write made at `at` may have been lost in a failover (asynchronous replication).
    let lost_in_failover = |at: Instant| {
        s.faults
            .iter()
            .any(|f| f.kind.may_lose_writes() && f.at <= at + LOSS_WINDOW && at <= f.until)
    };
    // `exec`'s claim (made before it reached the upstream, at most a serial `max_wait`
    // earlier) may have been lost in a failover.
    let claim_lost_in_failover = |exec: &Exec| {
        s.faults.iter().any(|f| {
            f.kind.may_lose_writes()
                && exec.started + LOSS_WINDOW >= f.at
                && exec.started <= f.until + MAX_WAIT
        })
    };
    // `later` started while a lock or claim of `earlier` may have been lost in a failover.
    let overlap_across_failover = |earlier: &Exec, later: &Exec| {
        s.faults.iter().any(|f| {
            f.kind.may_lose_writes()
                && earlier.started <= f.until
                && later.started + LOSS_WINDOW >= f.at
                && later.started <= f.until + s.lease
        })
    };
    // The sidecar that forwarded `exec` was frozen at some time in `exec.started..=to`.
    let frozen_between = |exec: &Exec, to: Instant| {
        let Some(sidecar) = attempts.get(&exec.attempt).map(|a| a.sidecar) else {
            return false;
        };
        s.faults.iter().any(|f| {
            f.kind == FaultKind::SidecarFreeze
                && f.target == Some(sidecar)
                && f.at <= to
                && f.until >= exec.started
        })
    };

    // Execution ids whose answer some client received (fresh or replayed).
    let mut delivered: HashSet<usize> = HashSet::new();
    let mut replay_ok = Row::new("every 2xx (fresh or replay) is an applied effect of its key");
    for a in s.attempts.iter().filter(|a| a.is_success()) {
        let Outcome::Answer { body, .. } = &a.outcome else {
            continue;
        };
        let exec = exec_of_body(body).and_then(|id| s.execs.get(id));
        replay_ok.check(
            exec.is_some_and(|e| {
                e.outcome == ExecOutcome::Applied && key_index.get(e.key.as_str()) == Some(&a.key)
            }),
            || format!("attempt {} of key {} got {body:?}", a.id, s.plan[a.key].key),
        );
        if let Some(e) = exec {
            delivered.insert(e.id);
        }
    }

    // Exactly once: per key, every applied execution after the first is a duplicate; it
    // is excused only when the earlier one's answer was lost (nobody got it, so the key
    // was released and the retry ran again: the documented "outcome unknown" case), or,
    // without persistence, when Redis restarted in between.
    let mut once = Row::new("effect exactly once per key answered 2xx");
    let mut lost_retried: BTreeMap<&'static str, usize> = BTreeMap::new();
    // Without persistence: (records lost, claims lost in flight).
    let mut restart_dups = (0usize, 0usize);
    let mut failover_dups = 0usize;
    let mut applied: HashMap<&str, Vec<&Exec>> = HashMap::new();
    for e in s.execs.iter().filter(|e| e.outcome == ExecOutcome::Applied) {
        applied.entry(e.key.as_str()).or_default().push(e);
    }
    let mut answered = Row::new("every key answerable after the run (final answer 2xx)");
    let mut acknowledged_in_run = 0usize;
    for (i, plan) in s.plan.iter().enumerate() {
        let mine: Vec<&Attempt> = s.attempts.iter().filter(|a| a.key == i).collect();
        if mine.iter().any(|a| a.is_success() && !a.final_round) {
            acknowledged_in_run += 1;
        }
        let last_final = mine.iter().filter(|a| a.final_round).max_by_key(|a| a.id);
        answered.check(last_final.is_some_and(|a| a.is_success()), || {
            format!(
                "key {}: final round ended with {:?}",
                plan.key,
                last_final.map(|a| &a.outcome)
            )
        });
        if !mine.iter().any(|a| a.is_success()) {
            continue;
        }
        let mut execs = applied.get(plan.key.as_str()).cloned().unwrap_or_default();
        execs.sort_by_key(|e| e.ended);
        let mut ok = !execs.is_empty();
        for pair in execs.windows(2) {
            let (prev, next) = (pair[0], pair[1]);
            if restart_between(prev.started, next.started) {
                if delivered.contains(&prev.id) {
                    restart_dups.0 += 1;
                } else {
                    restart_dups.1 += 1;
                }
            } else if delivered.contains(&prev.id)
                && (prev.ended.is_some_and(lost_in_failover) || claim_lost_in_failover(prev))
            {
                failover_dups += 1;
            } else if delivered.contains(&prev.id) {
                ok = false;
            } else {
                *lost_retried
                    .entry(lost_cause(attempts.get(&prev.attempt).copied()))
                    .or_default() += 1;
            }
        }
        once.check(ok, || {
            let list: Vec<String> = execs
                .iter()
                .map(|e| {
                    let since = |at: Instant| {
                        s.faults.first().map_or(0.0, |f| {
                            at.saturating_duration_since(f.at).as_secs_f64()
                                - f.at.saturating_duration_since(at).as_secs_f64()
                        })
                    };
                    format!(
                        "exec {} token {} attempt {} delivered={} ({}) ran {:+.2}..{:+.2} s from the first fault",
                        e.id,
                        e.token,
                        e.attempt,
                        delivered.contains(&e.id),
                        lost_cause(attempts.get(&e.attempt).copied()),
                        since(e.started),
                        e.ended.map_or(f64::NAN, since)
                    )
                })
                .collect();
            format!(
                "key {}: {} effects: {}",
                plan.key,
                execs.len(),
                list.join("; ")
            )
        });
    }

    // Fencing: tokens per account never go backwards; stale writers are refused.
    let mut forward = Row::new("fencing tokens never go backwards (per account)");
    let mut fenced: BTreeMap<&'static str, usize> = BTreeMap::new();
    for e in s.execs {
        forward.check(e.outcome != ExecOutcome::RefusedOnArrival, || {
            format!(
                "exec {} on {} arrived with stale token {}",
                e.id, e.account, e.token
            )
        });
        if e.outcome == ExecOutcome::Fenced {
            *fenced
                .entry(lost_cause(attempts.get(&e.attempt).copied()))
                .or_default() += 1;
        }
    }

    // Overlaps: two executions at the upstream at once whose callers both still waited.
    let overlap_rows = [
        (
            Row::new("serial: one live holder per account at the upstream"),
            true,
        ),
        (Row::new("one live execution per idempotency key"), false),
    ];
    let mut overlap_expected = 0usize;
    let mut overlap_frozen = 0usize;
    let mut overlap_failover = 0usize;
    let mut rows_overlap = Vec::new();
    for (mut row, by_account) in overlap_rows {
        let mut groups: HashMap<&str, Vec<&Exec>> = HashMap::new();
        for e in s
            .execs
            .iter()
            .filter(|e| e.outcome != ExecOutcome::RefusedOnArrival)
        {
            let group = if by_account { &e.account } else { &e.key };
            groups.entry(group.as_str()).or_default().push(e);
        }
        for execs in groups.values_mut() {
            execs.sort_by_key(|e| e.started);
            for (j, later) in execs.iter().enumerate() {
                let live_overlap = execs[..j].iter().find(|earlier| {
                    let running = earlier.ended.is_none_or(|end| end > later.started);
                    let live = earlier
                        .abandoned
                        .is_none_or(|gone| gone > later.started + ABANDON_GRACE);
                    running && live
                });
                match live_overlap {
                    Some(earlier) if restart_between(earlier.started, later.started) => {
                        overlap_expected += 1;
                        row.checked += 1;
                    }
                    Some(earlier) if frozen_between(earlier, later.started) => {
                        overlap_frozen += 1;
                        row.checked += 1;
                    }
                    Some(earlier) if overlap_across_failover(earlier, later) => {
                        overlap_failover += 1;
                        row.checked += 1;
                    }
                    Some(earlier) => row.check(false, || {
                        format!(
                            "exec {} (token {}) started while exec {} (token {}) on {} still ran for a live caller",
                            later.id, later.token, earlier.id, earlier.token, later.account
                        )
                    }),
                    None => row.check(true, String::new),
                }
            }
        }
        rows_overlap.push(row);
    }

    let slowest = s
        .attempts
        .iter()
        .map(|a| a.elapsed)
        .max()
        .unwrap_or_default();
    let mut hung = Row::new("no request hangs past its deadline");
    for a in s.attempts {
        hung.check(!matches!(a.outcome, Outcome::Hung), || {
            format!("attempt {} of key {} hung", a.id, s.plan[a.key].key)
        });
    }
    let mut coordinated = Row::new("nothing reaches the upstream uncoordinated");
    coordinated.checked = s.execs.len() + s.uncoordinated as usize;
    coordinated.violations = s.uncoordinated as usize;

    // Counts for the header.
    let count = |f: &dyn Fn(&Attempt) -> bool| s.attempts.iter().filter(|a| f(a)).count();
    let run_attempts = count(&|a| !a.final_round);
    let final_attempts = count(&|a| a.final_round);
    let kills = s
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::SidecarKill)
        .count();
    let restarts = redis_restarts.len();
    let freezes = s
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::SidecarFreeze)
        .count();
    let pauses = s
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::RedisPause)
        .count();
    let slow = s.execs.iter().filter(|e| e.delay > s.lease).count();
    let stuck = s.execs.iter().filter(|e| e.delay > REQUEST_TIMEOUT).count();
    let aborts = count(&|a| matches!(a.outcome, Outcome::Aborted));
    let status = |code: u16| count(&|a| a.status() == Some(code));
    let replayed = count(&|a| matches!(a.outcome, Outcome::Answer { replayed: true, .. }));
    let conn = count(&|a| matches!(a.outcome, Outcome::ConnectionError));

    let mut rows = vec![once, answered, replay_ok, forward];
    rows.extend(rows_overlap);
    rows.push(hung);
    rows.push(coordinated);

    let mut t = String::new();
    let _ = writeln!(t, "\n=== chaos: {} (seed {:#x}) ===", s.name, s.seed);
    let _ = writeln!(
        t,
        "keys {} | requests {} in the run ({} retries) + {} in the final round | run {:.1} s, final round {:.1} s",
        s.plan.len(),
        run_attempts,
        run_attempts - s.plan.len(),
        final_attempts,
        s.run.as_secs_f64(),
        s.final_round.as_secs_f64()
    );
    let _ = writeln!(
        t,
        "answers: 2xx {} (replayed {}), 409 in flight {}, 503 {}, 504 {}, connection errors {}, client aborts {}",
        count(&|a| a.is_success()),
        replayed,
        status(409),
        status(503),
        status(504),
        conn,
        aborts
    );
    let _ = writeln!(
        t,
        "slowest answered attempt: {:.2} s (hang deadline {} s)",
        slowest.as_secs_f64(),
        HANG_DEADLINE.as_secs()
    );
    let _ = writeln!(t, "\n| fault injected | count |\n|---|---:|");
    let _ = writeln!(
        t,
        "| sidecar `kill -9`, restarted on the same port | {kills} |"
    );
    let what = if s.persistent {
        "Redis `kill -9` + restart (AOF, appendfsync always)"
    } else {
        "Redis `kill -9` + restart (no persistence: data lost)"
    };
    let _ = writeln!(
        t,
        "| sidecar frozen (SIGSTOP) past its lease, then resumed | {freezes} |"
    );
    let cluster_faults = [
        (
            FaultKind::ManualFailover,
            "Redis Cluster: `CLUSTER FAILOVER` on a replica (old primary stays, as replica)",
        ),
        (
            FaultKind::PrimaryKill,
            "Redis Cluster: primary `kill -9` (replica promoted after the node timeout), restarted later",
        ),
        (
            FaultKind::PrimaryFreeze,
            "Redis Cluster: primary frozen (SIGSTOP) past the node timeout, replaced, then resumed",
        ),
        (
            FaultKind::LaggingFailover,
            "Redis Cluster: lagging replica (`CLIENT PAUSE WRITE`) promoted with `CLUSTER FAILOVER FORCE`",
        ),
    ];
    let clustered = s
        .faults
        .iter()
        .any(|f| cluster_faults.iter().any(|(k, _)| *k == f.kind));
    if clustered {
        for (kind, what) in cluster_faults {
            let n = s.faults.iter().filter(|f| f.kind == kind).count();
            let _ = writeln!(t, "| {what} | {n} |");
        }
    } else {
        let _ = writeln!(t, "| {what} | {restarts} |");
        let _ = writeln!(
            t,
            "| Redis frozen (SIGSTOP) for 0.3-0.8 s, then resumed | {pauses} |"
        );
    }
    let _ = writeln!(
        t,
        "| upstream slower than the lease ({} ms) | {slow} |",
        s.lease.as_millis()
    );
    let _ = writeln!(
        t,
        "| ...of which past `request_timeout` ({} s, sidecar answers 504) | {stuck} |",
        REQUEST_TIMEOUT.as_secs()
    );
    let _ = writeln!(t, "| client aborts (request future dropped) | {aborts} |");
    let _ = writeln!(
        t,
        "\n| invariant (guaranteed) | checked | violations |\n|---|---:|---:|"
    );
    for row in &rows {
        let _ = writeln!(t, "| {} | {} | {} |", row.name, row.checked, row.violations);
    }
    let _ = writeln!(t, "\n| measured, not guaranteed | count |\n|---|---:|");
    let _ = writeln!(
        t,
        "| keys answered 2xx during the run (the rest only in the final round) | {acknowledged_in_run} |"
    );
    for (cause, n) in &fenced {
        let _ = writeln!(
            t,
            "| stale writer refused by the fenced upstream ({cause}) | {n} |"
        );
    }
    let _ = writeln!(
        t,
        "| two live holders: the older one's sidecar was frozen past its lease (fencing decides) | {overlap_frozen} |"
    );
    if clustered {
        let _ = writeln!(
            t,
            "| duplicate effects, documented: the record or the claim was acknowledged, then lost in a failover (asynchronous replication, or a replaced primary that came back and took writes until it learned) | {failover_dups} |"
        );
        let _ = writeln!(
            t,
            "| two live holders: a lock or claim lost in a failover (asynchronous replication; fencing decides) | {overlap_failover} |"
        );
    }
    for (cause, n) in &lost_retried {
        let _ = writeln!(
            t,
            "| re-executed after a lost outcome, documented ({cause}) | {n} |"
        );
    }
    if !s.persistent {
        let _ = writeln!(
            t,
            "| duplicate effects, expected: the record was lost in a Redis restart without persistence, a later retry ran again | {} |",
            restart_dups.0
        );
        let _ = writeln!(
            t,
            "| duplicate effects, expected: the claim was lost in a Redis restart while in flight, a retry ran again | {} |",
            restart_dups.1
        );
        let _ = writeln!(
            t,
            "| two live holders across a Redis restart without persistence (expected) | {overlap_expected} |"
        );
    }
    if let Some(first) = s.faults.first() {
        let _ = writeln!(t, "\nfault times from the first fault:");
        for f in s.faults {
            let _ = writeln!(
                t,
                "- {:?}: {:+.2}..{:+.2} s",
                f.kind,
                (f.at - first.at).as_secs_f64(),
                (f.until - first.at).as_secs_f64()
            );
        }
    }
    for row in &rows {
        for example in &row.examples {
            let _ = writeln!(t, "VIOLATION {}: {example}", row.name);
        }
    }
    Verdict { table: t, rows }
}

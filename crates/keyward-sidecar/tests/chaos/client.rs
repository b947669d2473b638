//! Clients: bounded workers that send each planned request until it gets a definite
//! answer, retrying against another sidecar (same key, same body) on a timeout, a 5xx, a
//! connection error or a 409 "in flight". Every attempt is recorded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use keyward_core::problem::types;

use crate::rng::Rng;

/// An attempt still unanswered after this long hangs (the sidecar's own bound is
/// serial `max_wait` + `request_timeout` + a few store timeouts, about 8 s).
pub const HANG_DEADLINE: Duration = Duration::from_secs(12);
/// Attempts per key before the client gives up (the final round asks again).
const MAX_ATTEMPTS: u32 = 16;

/// How long the upstream takes for a key's first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// 5-30 ms.
    Fast,
    /// 2.5 s: beyond the lease (renewed while the sidecar lives), within `request_timeout`.
    Slow,
    /// 5 s: beyond `request_timeout`; the sidecar answers 504 and releases the key while
    /// the upstream goes on.
    Stuck,
}

/// One planned request.
#[derive(Debug, Clone)]
pub struct KeyPlan {
    pub key: String,
    pub account: u32,
    pub body: String,
    pub latency: Latency,
}

impl KeyPlan {
    pub fn plan(seed: u64, keys: usize, accounts: u32) -> Vec<KeyPlan> {
        let mut rng = Rng::new(seed ^ 0x6b65_7973);
        (0..keys)
            .map(|i| {
                let account = rng.below(u64::from(accounts)) as u32;
                let latency = match rng.below(100) {
                    0..=9 => Latency::Slow,
                    10..=12 => Latency::Stuck,
                    _ => Latency::Fast,
                };
                KeyPlan {
                    key: format!("k{seed:x}-{i}"),
                    account,
                    body: format!("{{\"account\":{account},\"amount\":{}}}", rng.below(10_000)),
                    latency,
                }
            })
            .collect()
    }

    pub fn path(&self) -> String {
        format!("/accounts/a{}/ops", self.account)
    }
}

/// What one attempt got.
#[derive(Debug, Clone)]
pub enum Outcome {
    Answer {
        status: u16,
        replayed: bool,
        problem: Option<String>,
        body: String,
    },
    ConnectionError,
    /// The client gave up on purpose (an impatient client): the request future was dropped.
    Aborted,
    /// No answer within [`HANG_DEADLINE`].
    Hung,
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: u64,
    pub key: usize,
    /// Index of the sidecar it was sent to.
    pub sidecar: usize,
    pub final_round: bool,
    pub elapsed: Duration,
    pub outcome: Outcome,
}

impl Attempt {
    pub fn status(&self) -> Option<u16> {
        match &self.outcome {
            Outcome::Answer { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_success(&self) -> bool {
        self.status().is_some_and(|s| (200..300).contains(&s))
    }
}

/// Shared by all workers of a run.
pub struct Clients {
    pub sidecars: Vec<SocketAddr>,
    pub plan: Vec<KeyPlan>,
    pub seed: u64,
    pub attempts: Mutex<Vec<Attempt>>,
    next_attempt: AtomicU64,
    http: crate::support::HttpClient,
    /// Pause of a worker between two keys of the run (not of the final round), so that a
    /// run spans a schedule of faults.
    pace: Duration,
}

type Reply = (http::StatusCode, http::HeaderMap, String);

impl Clients {
    pub fn new(sidecars: Vec<SocketAddr>, plan: Vec<KeyPlan>, seed: u64) -> Arc<Clients> {
        Arc::new(Clients {
            sidecars,
            plan,
            seed,
            attempts: Mutex::new(Vec::new()),
            next_attempt: AtomicU64::new(1),
            http: crate::support::client(),
            pace: Duration::ZERO,
        })
    }

    /// Like [`Clients::new`], with every worker pausing `pace` between two keys.
    pub fn paced(
        sidecars: Vec<SocketAddr>,
        plan: Vec<KeyPlan>,
        seed: u64,
        pace: Duration,
    ) -> Arc<Clients> {
        let mut clients = Clients::new(sidecars, plan, seed);
        if let Some(clients) = Arc::get_mut(&mut clients) {
            clients.pace = pace;
        }
        clients
    }

    /// Runs every planned key once through `workers` concurrent workers; `final_round`
    /// asks patiently and fast (no aborts, no slow upstream): "is every key answerable?".
    pub async fn run(self: &Arc<Self>, workers: usize, final_round: bool) {
        let next = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                let (clients, next) = (self.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        if i >= clients.plan.len() {
                            break;
                        }
                        clients.run_key(i, final_round).await;
                        if !final_round && !clients.pace.is_zero() {
                            tokio::time::sleep(clients.pace).await;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }

    async fn run_key(&self, i: usize, final_round: bool) {
        let plan = &self.plan[i];
        // Per-key randomness: the same decisions whatever worker picks the key up.
        let mut rng = Rng::new(self.seed ^ ((i as u64) << 20) ^ u64::from(final_round));
        let mut sidecar = rng.below(self.sidecars.len() as u64) as usize;
        for n in 0..MAX_ATTEMPTS {
            let delay_ms = match (n, final_round, plan.latency) {
                (0, false, Latency::Slow) => 2_500,
                (0, false, Latency::Stuck) => 5_000,
                _ => 5 + rng.below(25),
            };
            // One attempt in eight gives up early on purpose: below most slow latencies.
            let impatient = !final_round && rng.below(8) == 0;
            let limit = if impatient {
                Duration::from_millis(300 + rng.below(900))
            } else {
                HANG_DEADLINE
            };
            let id = self.next_attempt.fetch_add(1, Ordering::SeqCst);
            let started = Instant::now();
            let url = format!("http://{}{}", self.sidecars[sidecar], plan.path());
            let sent = tokio::time::timeout(limit, self.send(&url, plan, id, delay_ms)).await;
            let outcome = match sent {
                Err(_) if impatient => Outcome::Aborted,
                Err(_) => Outcome::Hung,
                Ok(Err(())) => Outcome::ConnectionError,
                Ok(Ok((status, headers, body))) => Outcome::Answer {
                    status: status.as_u16(),
                    replayed: headers
                        .get("idempotent-replayed")
                        .is_some_and(|v| v == "true"),
                    problem: problem_type(&headers, &body),
                    body,
                },
            };
            let retry_in = match &outcome {
                Outcome::Answer {
                    status, problem, ..
                } => match status {
                    200..=299 => None,
                    409 if problem.as_deref() == Some(types::IDEMPOTENCY_IN_FLIGHT) => {
                        Some(250 + rng.below(250))
                    }
                    429 | 500..=599 => Some(100 + rng.below(200)),
                    _ => None,
                },
                Outcome::ConnectionError => Some(50 + rng.below(100)),
                Outcome::Aborted | Outcome::Hung => Some(0),
            };
            self.attempts.lock().unwrap().push(Attempt {
                id,
                key: i,
                sidecar,
                final_round,
                elapsed: started.elapsed(),
                outcome,
            });
            let Some(retry_in) = retry_in else { return };
            tokio::time::sleep(Duration::from_millis(retry_in)).await;
            // Another sidecar for the retry.
            sidecar = (sidecar + 1 + rng.below(self.sidecars.len() as u64 - 1) as usize)
                % self.sidecars.len();
        }
    }

    async fn send(
        &self,
        url: &str,
        plan: &KeyPlan,
        attempt: u64,
        delay_ms: u64,
    ) -> Result<Reply, ()> {
        let req = http::Request::post(url)
            .header("idempotency-key", &plan.key)
            .header("content-type", "application/json")
            .header("x-chaos-attempt", attempt)
            .header("x-chaos-delay-ms", delay_ms)
            .body(Full::new(Bytes::from(plan.body.clone())))
            .map_err(|_| ())?;
        let res = self.http.request(req).await.map_err(|_| ())?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await.map_err(|_| ())?.to_bytes();
        Ok((
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    }
}

fn problem_type(headers: &http::HeaderMap, body: &str) -> Option<String> {
    let is_problem = headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    if !is_problem {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    json.get("type")?.as_str().map(str::to_owned)
}

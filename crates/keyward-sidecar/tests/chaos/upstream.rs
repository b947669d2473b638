//! The fenced upstream: an in-process axum server that plays a resource guarded by
//! fencing tokens, and keeps a ledger of every execution for the verdict.
//!
//! `POST /accounts/{account}/ops` with `Idempotency-Key`, `Keyward-Fencing-Token`,
//! `X-Chaos-Attempt` (the client's attempt id) and `X-Chaos-Delay-Ms` (how long the work
//! takes). The work runs in a task of its own, so it goes on when the caller goes away
//! (a stuck or slow backend does not notice that nobody waits any more); the handler only
//! waits for it. On arrival the token raises the account's "highest seen"; a token below
//! it is refused at once (fencing went backwards: never expected). When the work ends the
//! effect is applied only if no higher token arrived meanwhile, else the stale writer is
//! refused (effect not applied): what a fenced resource does. It refuses with `503`, a
//! status the idempotency layer does not store: the key is released and the client's
//! retry runs as the new holder. (A `409` would be stored as the key's answer.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};

/// What became of one execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecOutcome {
    Running,
    /// The effect took place.
    Applied,
    /// A higher token arrived while it ran: the stale writer was refused.
    Fenced,
    /// Arrived with a token below one already seen: refused on arrival.
    RefusedOnArrival,
}

/// One request that reached the upstream.
#[derive(Debug, Clone)]
pub struct Exec {
    pub id: usize,
    pub key: String,
    pub account: String,
    pub attempt: u64,
    pub token: u64,
    pub delay: Duration,
    pub started: Instant,
    pub ended: Option<Instant>,
    /// When the caller (the sidecar) went away before the answer was sent.
    pub abandoned: Option<Instant>,
    pub outcome: ExecOutcome,
}

/// Everything the upstream saw.
#[derive(Debug, Default)]
pub struct Ledger {
    pub execs: Vec<Exec>,
    pub highest: HashMap<String, u64>,
    pub effects: HashMap<String, u32>,
    /// Requests that reached the upstream without a fencing token or idempotency key.
    pub uncoordinated: u64,
}

pub type SharedLedger = Arc<Mutex<Ledger>>;

pub fn lock(ledger: &SharedLedger) -> MutexGuard<'_, Ledger> {
    ledger
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct FencedUpstream {
    pub addr: SocketAddr,
    pub ledger: SharedLedger,
}

impl FencedUpstream {
    /// Waits (bounded: 10 s) until no call is running any more, then for `lease` and a
    /// little more, so that every claim and lock of the run has lapsed.
    pub async fn settle(&self, lease: Duration) {
        for _ in 0..100 {
            let busy = lock(&self.ledger)
                .execs
                .iter()
                .any(|e| e.outcome == ExecOutcome::Running);
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(lease + Duration::from_millis(300)).await;
    }

    pub async fn start() -> FencedUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ledger = SharedLedger::default();
        let app = axum::Router::new()
            .route("/accounts/{account}/ops", axum::routing::post(handle))
            .with_state(ledger.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FencedUpstream { addr, ledger }
    }
}

fn header<T: std::str::FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

/// Marks the execution abandoned if the handler is dropped before it answers.
struct AbandonGuard {
    ledger: SharedLedger,
    id: usize,
    armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if self.armed {
            lock(&self.ledger).execs[self.id].abandoned = Some(Instant::now());
        }
    }
}

async fn handle(
    State(ledger): State<SharedLedger>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Response {
    let key: Option<String> = header(&headers, "idempotency-key");
    let token: Option<u64> = header(&headers, "keyward-fencing-token");
    let (Some(key), Some(token)) = (key, token) else {
        lock(&ledger).uncoordinated += 1;
        return (StatusCode::BAD_REQUEST, "uncoordinated").into_response();
    };
    let attempt = header(&headers, "x-chaos-attempt").unwrap_or(0);
    let delay = Duration::from_millis(header(&headers, "x-chaos-delay-ms").unwrap_or(0));
    let id = {
        let mut l = lock(&ledger);
        let id = l.execs.len();
        let highest = l.highest.entry(account.clone()).or_default();
        let refused = token < *highest;
        *highest = (*highest).max(token);
        l.execs.push(Exec {
            id,
            key: key.clone(),
            account: account.clone(),
            attempt,
            token,
            delay,
            started: Instant::now(),
            ended: refused.then(Instant::now),
            abandoned: None,
            outcome: if refused {
                ExecOutcome::RefusedOnArrival
            } else {
                ExecOutcome::Running
            },
        });
        if refused {
            return (StatusCode::CONFLICT, "fenced: token went backwards").into_response();
        }
        id
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let work_ledger = ledger.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let outcome = {
            let mut l = lock(&work_ledger);
            let stale = l.highest.get(&account).is_some_and(|h| *h > token);
            let outcome = if stale {
                ExecOutcome::Fenced
            } else {
                *l.effects.entry(key).or_default() += 1;
                ExecOutcome::Applied
            };
            let exec = &mut l.execs[id];
            exec.ended = Some(Instant::now());
            exec.outcome = outcome;
            outcome
        };
        let _ = tx.send(outcome);
    });
    let mut guard = AbandonGuard {
        ledger,
        id,
        armed: true,
    };
    let outcome = rx.await;
    guard.armed = false;
    match outcome {
        Ok(ExecOutcome::Applied) => {
            (StatusCode::OK, format!("exec={id} token={token}")).into_response()
        }
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("fenced: exec={id} token={token}"),
        )
            .into_response(),
    }
}

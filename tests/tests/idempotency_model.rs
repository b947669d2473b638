//! Property test: random interleavings of requests over a few keys and principals, some
//! held in flight while others arrive, give exactly what a simple reference model of the
//! contract predicts.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keyward::MemoryStore;
use keyward::idempotency::IdempotencyLayer;
use keyward_tests::{TestBody, seen};
use proptest::prelude::*;
use tokio::sync::Semaphore;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

#[derive(Clone, Debug)]
enum Op {
    /// A request that runs to completion.
    Send {
        principal: u8,
        key: u8,
        body: u8,
        fail: bool,
    },
    /// A request left in flight inside the handler.
    Hold { principal: u8, key: u8, body: u8 },
    /// Lets the n-th held request (mod the number held) finish.
    Finish(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2u8, 0..3u8, 0..2u8, any::<bool>()).prop_map(|(principal, key, body, fail)| Op::Send { principal, key, body, fail }),
        1 => (0..2u8, 0..3u8, 0..2u8).prop_map(|(principal, key, body)| Op::Hold { principal, key, body }),
        1 => (0..8usize).prop_map(Op::Finish),
    ]
}

#[derive(Clone, Debug, PartialEq)]
enum Entry {
    InFlight { body: u8 },
    Done { body: u8, response: String },
}

#[derive(Debug, PartialEq)]
enum Expect {
    Executed {
        status: StatusCode,
        response: String,
    },
    Replayed {
        response: String,
    },
    Conflict,
    Mismatch,
}

#[derive(Default)]
struct Model {
    entries: HashMap<(u8, u8), Entry>,
    calls: usize,
}

impl Model {
    /// What a request gets, and the model's new state. `hold`: the request stays in flight.
    fn request(&mut self, principal: u8, key: u8, body: u8, fail: bool, hold: bool) -> Expect {
        match self.entries.get(&(principal, key)) {
            Some(Entry::InFlight { body: first }) => {
                if *first == body {
                    Expect::Conflict
                } else {
                    Expect::Mismatch
                }
            }
            Some(Entry::Done {
                body: first,
                response,
            }) => {
                if *first == body {
                    Expect::Replayed {
                        response: response.clone(),
                    }
                } else {
                    Expect::Mismatch
                }
            }
            None => {
                self.calls += 1;
                let response = format!("call={} body={body}", self.calls);
                if hold {
                    self.entries
                        .insert((principal, key), Entry::InFlight { body });
                } else if !fail {
                    self.entries.insert(
                        (principal, key),
                        Entry::Done {
                            body,
                            response: response.clone(),
                        },
                    );
                }
                let status = if fail {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                };
                Expect::Executed { status, response }
            }
        }
    }

    fn finish(&mut self, principal: u8, key: u8, response: String) {
        if let Some(Entry::InFlight { body }) = self.entries.get(&(principal, key)).cloned() {
            self.entries
                .insert((principal, key), Entry::Done { body, response });
        }
    }
}

type Svc =
    BoxCloneSyncService<Request<TestBody>, Response<keyward::KeywardBody<TestBody>>, Infallible>;

struct System {
    svc: Svc,
    gates: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    entered: Arc<Semaphore>,
}

fn system() -> System {
    let calls = Arc::new(AtomicUsize::new(0));
    let gates: Arc<Mutex<HashMap<String, Arc<Semaphore>>>> = Arc::default();
    let entered = Arc::new(Semaphore::new(0));
    let (handler_gates, handler_entered) = (gates.clone(), entered.clone());
    let svc = ServiceBuilder::new()
        .layer(IdempotencyLayer::new(MemoryStore::new()).route("model"))
        .service_fn(move |req: Request<TestBody>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let gate = req
                .headers()
                .get("x-hold")
                .and_then(|v| v.to_str().ok())
                .and_then(|id| handler_gates.lock().unwrap().get(id).cloned());
            let fail = req.headers().contains_key("x-fail");
            let body = req.headers()["x-body"].to_str().unwrap().to_owned();
            let entered = handler_entered.clone();
            async move {
                if let Some(gate) = gate {
                    entered.add_permits(1);
                    gate.acquire().await.unwrap().forget();
                }
                let status = if fail {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                };
                let res = Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from(format!("call={n} body={body}"))))
                    .unwrap();
                Ok::<_, Infallible>(res)
            }
        });
    System {
        svc: BoxCloneSyncService::new(svc),
        gates,
        entered,
    }
}

fn request(principal: u8, key: u8, body: u8, fail: bool, hold: Option<&str>) -> Request<TestBody> {
    let mut builder = Request::post("/orders")
        .header("authorization", format!("principal-{principal}"))
        .header("idempotency-key", format!("key-{key}"))
        .header("x-body", body.to_string());
    if fail {
        builder = builder.header("x-fail", "1");
    }
    if let Some(id) = hold {
        builder = builder.header("x-hold", id);
    }
    builder.body(Full::new(Bytes::from(vec![body]))).unwrap()
}

fn observed(res: keyward_tests::Seen) -> Expect {
    match res.status {
        StatusCode::CONFLICT => Expect::Conflict,
        StatusCode::UNPROCESSABLE_ENTITY => Expect::Mismatch,
        _ if res.replayed => Expect::Replayed { response: res.body },
        status => Expect::Executed {
            status,
            response: res.body,
        },
    }
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let sys = system();
    let mut model = Model::default();
    let mut held: Vec<(
        u8,
        u8,
        tokio::task::JoinHandle<keyward_tests::Seen>,
        Arc<Semaphore>,
    )> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Send {
                principal,
                key,
                body,
                fail,
            } => {
                let expect = model.request(principal, key, body, fail, false);
                let res = seen(
                    sys.svc
                        .clone()
                        .oneshot(request(principal, key, body, fail, None))
                        .await
                        .unwrap(),
                )
                .await;
                prop_assert_eq!(observed(res), expect, "op {}", i);
            }
            Op::Hold {
                principal,
                key,
                body,
            } => {
                let expect = model.request(principal, key, body, false, true);
                let id = format!("hold-{i}");
                let gate = Arc::new(Semaphore::new(0));
                sys.gates.lock().unwrap().insert(id.clone(), gate.clone());
                let fut = sys
                    .svc
                    .clone()
                    .oneshot(request(principal, key, body, false, Some(&id)));
                if matches!(expect, Expect::Executed { .. }) {
                    let task = tokio::spawn(async move { seen(fut.await.unwrap()).await });
                    sys.entered.acquire().await.unwrap().forget();
                    held.push((principal, key, task, gate));
                } else {
                    // Answered without entering the handler.
                    let res = seen(fut.await.unwrap()).await;
                    prop_assert_eq!(observed(res), expect, "op {}", i);
                }
            }
            Op::Finish(n) if !held.is_empty() => {
                let (principal, key, task, gate) = held.remove(n % held.len());
                gate.add_permits(1);
                let res = task.await.unwrap();
                prop_assert_eq!(res.status, StatusCode::OK);
                prop_assert!(!res.replayed);
                model.finish(principal, key, res.body);
            }
            Op::Finish(_) => {}
        }
    }
    for (_, _, task, gate) in held {
        gate.add_permits(1);
        task.await.unwrap();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn layer_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}

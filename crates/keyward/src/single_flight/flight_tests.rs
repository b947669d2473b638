//! Model test of the flight table: random interleavings of requests joining, being
//! polled and being dropped, and of the shared work completing.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::task::noop_waker;
use http::{HeaderMap, StatusCode};
use keyward_core::store::StoredResponse;
use proptest::prelude::*;

use super::*;

/// Shared work that completes once `done` is set, and notes being dropped unfinished.
struct Probe {
    polls: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
    finished: bool,
}

impl Future for Probe {
    type Output = Landed;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Landed> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if !self.done.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        self.finished = true;
        Poll::Ready(Landed {
            shared: Shared::Response(Arc::new(StoredResponse {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Bytes::from("ok"),
                trailers: None,
            })),
            own: Own::None,
            store_error: false,
        })
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.finished {
            self.cancelled.store(true, Ordering::SeqCst);
        }
    }
}

struct FlightModel {
    polls: Arc<AtomicUsize>,
    /// Index of the leader's request while it has not been polled nor dropped.
    unpolled_leader: Option<usize>,
    done: Arc<AtomicBool>,
    cancelled: Arc<AtomicBool>,
    /// Some member's future returned `Ready`.
    landed: bool,
}

struct Request {
    future: Pin<Box<dyn Future<Output = Outcome> + Send>>,
    flight: usize,
}

#[derive(Clone, Debug)]
enum Op {
    Join,
    Poll(usize),
    Drop(usize),
    Complete,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Join),
        4 => (0usize..8).prop_map(Op::Poll),
        3 => (0usize..8).prop_map(Op::Drop),
        1 => Just(Op::Complete),
    ]
}

fn check(table: &FlightTable, flights: &[FlightModel], requests: &[Option<Request>]) {
    for (index, flight) in flights.iter().enumerate() {
        // Followers never start the work while its leader is there and has not.
        if flight.unpolled_leader.is_some() {
            assert_eq!(flight.polls.load(Ordering::SeqCst), 0, "flight {index}");
        }
        let members = requests
            .iter()
            .flatten()
            .filter(|request| request.flight == index)
            .count();
        // The work is cancelled exactly when every member left before it landed.
        assert_eq!(
            flight.cancelled.load(Ordering::SeqCst),
            members == 0 && !flight.landed,
            "flight {index}: {members} members, landed {}",
            flight.landed
        );
    }
    let live = flights
        .last()
        .is_some_and(|flight| !flight.landed && !flight.cancelled.load(Ordering::SeqCst));
    assert_eq!(table.len(), usize::from(live));
}

proptest! {
    #[test]
    fn flights_hand_over_cancel_and_leave_no_entries(ops in proptest::collection::vec(op(), 1..60)) {
        let table = Arc::new(FlightTable::new());
        let key: Arc<str> = Arc::from("flight:r:-:GET /x");
        let mut flights: Vec<FlightModel> = Vec::new();
        let mut requests: Vec<Option<Request>> = Vec::new();
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        for op in ops {
            match op {
                Op::Join => {
                    let (seat, work) = match table.join(key.clone()) {
                        Joined::Leader(seat) => {
                            let model = FlightModel {
                                polls: Arc::new(AtomicUsize::new(0)),
                                unpolled_leader: Some(requests.len()),
                                done: Arc::new(AtomicBool::new(false)),
                                cancelled: Arc::new(AtomicBool::new(false)),
                                landed: false,
                            };
                            let probe = Probe {
                                polls: model.polls.clone(),
                                done: model.done.clone(),
                                cancelled: model.cancelled.clone(),
                                finished: false,
                            };
                            flights.push(model);
                            (seat, Some(Work::new(probe, tracing::Span::none())))
                        }
                        Joined::Follower(seat) => (seat, None),
                    };
                    if let Some(work) = work {
                        seat.start(work);
                    }
                    let future = Box::pin(async move { seat.run().await });
                    requests.push(Some(Request { future, flight: flights.len() - 1 }));
                }
                Op::Poll(i) => {
                    for flight in &mut flights {
                        if flight.unpolled_leader == Some(i) {
                            flight.unpolled_leader = None;
                        }
                    }
                    if let Some(slot) = requests.get_mut(i) {
                        if let Some(request) = slot.as_mut() {
                            if let Poll::Ready(outcome) = request.future.as_mut().poll(&mut cx) {
                                prop_assert!(matches!(outcome.shared, Shared::Response(_)));
                                flights[request.flight].landed = true;
                                *slot = None;
                            }
                        }
                    }
                }
                Op::Drop(i) => {
                    for flight in &mut flights {
                        if flight.unpolled_leader == Some(i) {
                            flight.unpolled_leader = None;
                        }
                    }
                    if let Some(slot) = requests.get_mut(i) {
                        *slot = None;
                    }
                }
                Op::Complete => {
                    if let Some(flight) = flights.last() {
                        flight.done.store(true, Ordering::SeqCst);
                    }
                }
            }
            check(&table, &flights, &requests);
        }
        // Whoever is still waiting gets the landing once the work can complete.
        if let Some(flight) = flights.last() {
            flight.done.store(true, Ordering::SeqCst);
        }
        for _ in 0..3 {
            for slot in requests.iter_mut() {
                if let Some(request) = slot.as_mut() {
                    if let Poll::Ready(outcome) = request.future.as_mut().poll(&mut cx) {
                        prop_assert!(matches!(outcome.shared, Shared::Response(_)));
                        flights[request.flight].landed = true;
                        *slot = None;
                    }
                }
            }
        }
        prop_assert!(requests.iter().all(Option::is_none), "a waiter never got the landing");
        prop_assert_eq!(table.len(), 0);
    }
}

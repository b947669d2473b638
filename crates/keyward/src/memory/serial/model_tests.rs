//! The memory table against a model: any interleaving of arrivals, releases and
//! cancellations keeps one holder per key, FIFO hand-over, rising tokens, the queue
//! bound, and an empty table at the end.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use keyward_core::store::{AcquireOutcome, SerialLimits, SerialPermit, SerialStore, StoreError};
use keyward_core::{Key, Scope, ScopedKey};
use proptest::prelude::*;

use crate::MemoryStore;

const KEYS: usize = 3;
const LIMITS: SerialLimits = SerialLimits {
    max_wait: Duration::from_secs(3600),
    max_queue: 3,
    permits: 1,
};

#[derive(Clone, Debug)]
enum Op {
    Arrive(usize),
    Release(usize),
    /// Drop the n-th waiter (mod the queue length) before it is polled again.
    Cancel(usize, usize),
    /// Release, then drop the waiter the key was just handed to, unpolled.
    ReleaseAndCancelNext(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..KEYS).prop_map(Op::Arrive),
        2 => (0..KEYS).prop_map(Op::Release),
        1 => (0..KEYS, 0..4usize).prop_map(|(k, n)| Op::Cancel(k, n)),
        1 => (0..KEYS).prop_map(Op::ReleaseAndCancelNext),
    ]
}

type Acquire<'a> = Pin<Box<dyn Future<Output = Result<AcquireOutcome, StoreError>> + 'a>>;

#[derive(Default)]
struct KeyModel<'a> {
    holder: Option<SerialPermit>,
    queue: VecDeque<Acquire<'a>>,
    last_token: u64,
}

fn poll_once(future: &mut Acquire<'_>) -> Poll<Result<AcquireOutcome, StoreError>> {
    future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
}

impl<'a> KeyModel<'a> {
    fn take_turn(&mut self, permit: SerialPermit) {
        assert!(self.holder.is_none(), "two holders");
        assert!(permit.token().get() > self.last_token, "token did not rise");
        self.last_token = permit.token().get();
        self.holder = Some(permit);
    }

    /// After a release: the front waiter (and only it) must now hold the key.
    fn check_handover(&mut self) {
        if let Some(front) = self.queue.front_mut() {
            match poll_once(front) {
                Poll::Ready(Ok(AcquireOutcome::Acquired(permit))) => {
                    self.queue.pop_front();
                    self.take_turn(permit);
                }
                other => panic!("front waiter not handed the key: {other:?}"),
            }
        }
        for waiter in self.queue.iter_mut() {
            assert!(poll_once(waiter).is_pending(), "a later waiter overtook");
        }
    }
}

fn run(ops: Vec<Op>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let _runtime = runtime.enter();
    let store = MemoryStore::new();
    let keys: Vec<ScopedKey> = (0..KEYS)
        .map(|k| ScopedKey::new("serial", "model", Scope::Unscoped, Key::from(k.to_string())))
        .collect();
    let mut models: Vec<KeyModel<'_>> = (0..KEYS).map(|_| KeyModel::default()).collect();
    for op in ops {
        match op {
            Op::Arrive(k) => {
                let model = &mut models[k];
                let mut acquire: Acquire<'_> = Box::pin(store.acquire(&keys[k], LIMITS));
                match poll_once(&mut acquire) {
                    Poll::Ready(Ok(AcquireOutcome::Acquired(permit))) => {
                        assert!(model.queue.is_empty(), "acquired past waiters");
                        model.take_turn(permit);
                    }
                    Poll::Ready(Ok(AcquireOutcome::QueueFull)) => {
                        assert_eq!(model.queue.len(), LIMITS.max_queue);
                    }
                    Poll::Pending => {
                        assert!(model.holder.is_some() && model.queue.len() < LIMITS.max_queue);
                        model.queue.push_back(acquire);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            Op::Release(k) => {
                let model = &mut models[k];
                if let Some(permit) = model.holder.take() {
                    store.release_detached(permit);
                    model.check_handover();
                }
            }
            Op::Cancel(k, n) => {
                let model = &mut models[k];
                if !model.queue.is_empty() {
                    let n = n % model.queue.len();
                    drop(model.queue.remove(n));
                }
            }
            Op::ReleaseAndCancelNext(k) => {
                let model = &mut models[k];
                if let Some(permit) = model.holder.take() {
                    store.release_detached(permit);
                    // The key was sent to the front waiter, which goes away unpolled:
                    // it must pass the key on.
                    drop(model.queue.pop_front());
                    model.check_handover();
                }
            }
        }
    }
    // Drain: every waiter gets its turn in order, then nothing is left.
    for model in &mut models {
        while let Some(permit) = model.holder.take() {
            store.release_detached(permit);
            model.check_handover();
        }
        assert!(model.queue.is_empty());
    }
    assert_eq!(
        store.serial_keys_in_use(),
        0,
        "entries outlived their keys' use"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_table_behaves_like_a_fifo_mutex_per_key(ops in proptest::collection::vec(op(), 0..60)) {
        run(ops);
    }
}

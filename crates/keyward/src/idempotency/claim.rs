//! Holding a claim: release on every path out, and lease renewal while work runs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use keyward_core::store::IdempotencyStore;
use keyward_core::{FencingToken, ScopedKey};

/// Releases the claim if the request ends without completing it: an error, a panic that
/// unwinds through the handler, or the caller dropping the response future.
pub(crate) struct ClaimGuard<St: IdempotencyStore> {
    store: St,
    key: ScopedKey,
    token: FencingToken,
    armed: bool,
}

impl<St: IdempotencyStore> ClaimGuard<St> {
    pub(crate) fn new(store: St, key: ScopedKey, token: FencingToken) -> Self {
        ClaimGuard {
            store,
            key,
            token,
            armed: true,
        }
    }

    /// The claim was completed or released explicitly: nothing left to undo.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl<St: IdempotencyStore> Drop for ClaimGuard<St> {
    fn drop(&mut self) {
        if self.armed {
            self.store.release_detached(self.key.clone(), self.token);
        }
    }
}

/// Runs `work` while renewing the claim every third of the lease, so that a slow but
/// live handler keeps its key and only a dead or stalled process loses it.
///
/// A future of its own rather than an `async fn`: it holds `work` once and the renewal
/// (a timer and a store call) behind a pointer made on the first poll that finds `work`
/// not done. Work done at once (an in-process handler, a body already in memory, the
/// memory store) costs no timer, no clock read and no allocation; and the futures that
/// run several of these in turn stay small to move and to box.
pub(crate) fn with_renewal<'a, St, F>(
    work: F,
    store: &'a St,
    key: &'a ScopedKey,
    token: FencingToken,
    lease: Duration,
) -> Renewing<'a, St, F>
where
    St: IdempotencyStore,
    F: Future,
{
    Renewing {
        work,
        store,
        key,
        token,
        lease,
        renewal: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`with_renewal`]: `work`'s output.
    pub(crate) struct Renewing<'a, St, F> {
        #[pin]
        work: F,
        store: &'a St,
        key: &'a ScopedKey,
        token: FencingToken,
        lease: Duration,
        renewal: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
    }
}

impl<'a, St, F> Future for Renewing<'a, St, F>
where
    St: IdempotencyStore,
    F: Future,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // The work first, always: its end ends the renewal, even one in flight (a
        // renewal that lands after the record is stored finds no holder, and changes
        // nothing).
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(output);
        }
        let (store, key, token, lease) = (*this.store, *this.key, *this.token, *this.lease);
        let renewal = this
            .renewal
            .get_or_insert_with(|| Box::pin(renew_every_third(store, key, token, lease)));
        // Never ready: it renews until the work ends, or waits forever once the lease is
        // lost.
        let _ = renewal.as_mut().poll(cx);
        Poll::Pending
    }
}

/// Renews the claim every third of `lease`, until the store says it is no longer held.
async fn renew_every_third<St: IdempotencyStore>(
    store: &St,
    key: &ScopedKey,
    token: FencingToken,
    lease: Duration,
) {
    let period = lease / 3;
    loop {
        tokio::time::sleep(period).await;
        match store.renew(key, token, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "idempotency lease lost while the handler ran; its response will not be stored"
                );
                return std::future::pending().await;
            }
            Err(error) => tracing::warn!(%error, "idempotency lease renewal failed"),
        }
    }
}

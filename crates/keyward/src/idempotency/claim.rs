//! Holding a claim: release on every path out, and lease renewal while work runs.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
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
pub(crate) async fn with_renewal<St, F>(
    work: F,
    store: &St,
    key: &ScopedKey,
    token: FencingToken,
    lease: Duration,
) -> F::Output
where
    St: IdempotencyStore,
    F: Future,
{
    tokio::pin!(work);
    // Work that is done at once (an in-process handler, a body already in memory, the
    // memory store) needs no renewal timer: no clock read, no timer entry.
    if let Poll::Ready(output) = poll_once(work.as_mut()).await {
        return output;
    }
    let period = lease / 3;
    let mut renewing = true;
    loop {
        tokio::select! {
            biased;
            output = &mut work => return output,
            () = tokio::time::sleep(period), if renewing => {
                match store.renew(key, token, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!("idempotency lease lost while the handler ran; its response will not be stored");
                        renewing = false;
                    }
                    Err(error) => tracing::warn!(%error, "idempotency lease renewal failed"),
                }
            }
        }
    }
}

/// Polls `future` once: its output if it was ready, `Pending` (without waiting) if not.
pub(crate) async fn poll_once<F: Future>(mut future: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
}

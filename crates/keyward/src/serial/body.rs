use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use keyward_core::store::{SerialPermit, SerialStore};
use pin_project_lite::pin_project;

use super::hold::{Hold, HoldLimit};

/// Holds a key until dropped: releases the permit without blocking.
pub(crate) struct PermitGuard<St: SerialStore> {
    store: St,
    permit: Option<SerialPermit>,
    /// The permit's place on the `max_hold` queue, if the route has one.
    hold: Option<Hold>,
}

impl<St: SerialStore> PermitGuard<St> {
    /// Holds `permit`; with `max_hold`, for at most that long: a holder that is still
    /// at it then (a client that never reads its response, a handler that hangs) loses
    /// the key to the next request, whose higher fencing token lets the resource refuse
    /// the stale holder's writes.
    pub(crate) fn new(store: St, permit: SerialPermit, max_hold: Option<HoldLimit>) -> Self {
        let hold = max_hold.map(|limit| limit.start(&store, permit.clone()));
        PermitGuard {
            store,
            permit: Some(permit),
            hold,
        }
    }
}

impl<St: SerialStore> Drop for PermitGuard<St> {
    fn drop(&mut self) {
        if let Some(hold) = self.hold.take() {
            hold.end();
        }
        // After an expiry this release is stale: the store ignores a token that no
        // longer holds the key.
        if let Some(permit) = self.permit.take() {
            self.store.release_detached(permit);
        }
    }
}

pin_project! {
    /// The inner service's response body, holding the request's key until the body has
    /// been read to its end (or failed) or is dropped: the next request for the key only
    /// starts once this response is really over.
    pub struct PermitBody<B, St: SerialStore> {
        #[pin]
        inner: B,
        guard: Option<PermitGuard<St>>,
    }
}

impl<B, St: SerialStore> PermitBody<B, St> {
    pub(crate) fn new(inner: B, guard: Option<PermitGuard<St>>) -> Self {
        PermitBody { inner, guard }
    }

    /// Whether this body still holds its key.
    pub fn holds_key(&self) -> bool {
        self.guard.is_some()
    }
}

/// The body of a request that was not coordinated: it holds no key.
impl<B, St: SerialStore> From<B> for PermitBody<B, St> {
    fn from(inner: B) -> Self {
        PermitBody { inner, guard: None }
    }
}

impl<B: Body, St: SerialStore> Body for PermitBody<B, St> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let finished = match &frame {
            Some(Ok(_)) => this.inner.is_end_stream(),
            // End of stream, or an error after which nothing more is read.
            None | Some(Err(_)) => true,
        };
        if finished {
            this.guard.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug, St: SerialStore> fmt::Debug for PermitBody<B, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PermitBody")
            .field("inner", &self.inner)
            .field("holds_key", &self.holds_key())
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use keyward_core::store::{AcquireOutcome, SerialLimits, StoreError};
    use keyward_core::{FencingToken, Key, Scope, ScopedKey};

    /// Counts releases; never has to wait.
    #[derive(Clone, Default)]
    struct CountingStore(Arc<AtomicUsize>);

    impl SerialStore for CountingStore {
        async fn acquire(
            &self,
            key: &ScopedKey,
            _limits: SerialLimits,
        ) -> Result<AcquireOutcome, StoreError> {
            Ok(AcquireOutcome::Acquired(SerialPermit::new(
                key.clone(),
                FencingToken(1),
            )))
        }

        async fn release(&self, permit: SerialPermit) -> Result<(), StoreError> {
            self.release_detached(permit);
            Ok(())
        }

        fn release_detached(&self, _permit: SerialPermit) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn guarded<B>(body: B, store: &CountingStore) -> PermitBody<B, CountingStore> {
        let key = ScopedKey::new("serial", "r", Scope::Unscoped, Key::from("k"));
        let permit = SerialPermit::new(key, FencingToken(1));
        PermitBody::new(body, Some(PermitGuard::new(store.clone(), permit, None)))
    }

    type Chunk = Result<Frame<Bytes>, std::io::Error>;

    #[tokio::test]
    async fn releases_once_at_the_last_frame_not_again_on_drop() {
        let store = CountingStore::default();
        let frames: Vec<Chunk> = vec![
            Ok(Frame::data(Bytes::from("a"))),
            Ok(Frame::data(Bytes::from("b"))),
        ];
        let mut body = guarded(StreamBody::new(futures::stream::iter(frames)), &store);
        body.frame().await.unwrap().unwrap();
        assert_eq!(
            store.0.load(Ordering::SeqCst),
            0,
            "held while frames remain"
        );
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        assert_eq!(store.0.load(Ordering::SeqCst), 1);
        drop(body);
        assert_eq!(store.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn releases_on_a_body_error() {
        let store = CountingStore::default();
        let frames: Vec<Chunk> = vec![
            Err(std::io::Error::other("reset")),
            Ok(Frame::data(Bytes::new())),
        ];
        let mut body = guarded(StreamBody::new(futures::stream::iter(frames)), &store);
        assert!(body.frame().await.unwrap().is_err());
        assert!(!body.holds_key());
        assert_eq!(store.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn releases_when_dropped_unread() {
        let store = CountingStore::default();
        let body = guarded(http_body_util::Empty::<Bytes>::new(), &store);
        assert!(body.holds_key());
        drop(body);
        assert_eq!(store.0.load(Ordering::SeqCst), 1);
    }
}

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use keyward_core::store::{SerialPermit, SerialStore};
use pin_project_lite::pin_project;

/// Holds a key until dropped: releases the permit without blocking.
pub(crate) struct PermitGuard<St: SerialStore> {
    store: St,
    permit: Option<SerialPermit>,
}

impl<St: SerialStore> PermitGuard<St> {
    pub(crate) fn new(store: St, permit: SerialPermit) -> Self {
        PermitGuard {
            store,
            permit: Some(permit),
        }
    }
}

impl<St: SerialStore> Drop for PermitGuard<St> {
    fn drop(&mut self) {
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

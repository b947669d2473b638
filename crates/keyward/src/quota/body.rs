use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::HeaderName;
use http_body::{Body, Frame, SizeHint};
use keyward_core::ScopedKey;
use keyward_core::gcra::Quota;
use keyward_core::store::QuotaStore;
use pin_project_lite::pin_project;

use super::charge::units_in;

/// A response's charge, landing when it is dropped: when the body ended, failed or was
/// dropped unread.
pub(crate) struct PendingCharge<St: QuotaStore> {
    pub(crate) store: St,
    pub(crate) key: ScopedKey,
    pub(crate) quota: Quota,
    pub(crate) units: u32,
    /// A trailer of this name replaces `units`.
    pub(crate) trailer: Option<HeaderName>,
}

impl<St: QuotaStore> Drop for PendingCharge<St> {
    fn drop(&mut self) {
        if self.units > 0 {
            self.store
                .charge_detached(self.key.clone(), self.quota, self.units);
        }
    }
}

pin_project! {
    /// The inner service's response body; on a quota priced by its responses
    /// ([`QuotaLayer::charge_after`](super::QuotaLayer::charge_after)) it charges the
    /// response's units to its key once the body has ended (or failed, or was dropped),
    /// reading a cost trailer if the body ends with one. Elsewhere it only passes the
    /// body through.
    pub struct ChargeBody<B, St: QuotaStore> {
        #[pin]
        inner: B,
        pending: Option<PendingCharge<St>>,
    }
}

impl<B, St: QuotaStore> ChargeBody<B, St> {
    pub(crate) fn new(inner: B, pending: Option<PendingCharge<St>>) -> Self {
        ChargeBody { inner, pending }
    }

    /// Whether this body's charge has yet to land.
    pub fn charge_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// The body of a request without a charge (not priced, not keyed, not counted).
impl<B, St: QuotaStore> From<B> for ChargeBody<B, St> {
    fn from(inner: B) -> Self {
        ChargeBody {
            inner,
            pending: None,
        }
    }
}

impl<B: Body, St: QuotaStore> Body for ChargeBody<B, St> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(pending) = this.pending.as_mut() {
            let finished = match &frame {
                Some(Ok(frame)) => {
                    if let (Some(trailers), Some(name)) = (frame.trailers_ref(), &pending.trailer) {
                        if let Some(units) = units_in(trailers, name) {
                            pending.units = units;
                        }
                    }
                    this.inner.is_end_stream()
                }
                None | Some(Err(_)) => true,
            };
            if finished {
                // Dropping it charges.
                this.pending.take();
            }
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

impl<B: fmt::Debug, St: QuotaStore> fmt::Debug for ChargeBody<B, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChargeBody")
            .field("inner", &self.inner)
            .field("charge_pending", &self.charge_pending())
            .finish()
    }
}

//! The response future every layer's service returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use http_body::Body;
use keyward_core::KeywardBody;
use pin_project_lite::pin_project;

/// The coordinated work of the layers that run it as one boxed future (idempotency,
/// single flight): its state is large and most of it is only needed on the rare path.
pub type Boxed<B, E> = Pin<Box<dyn Future<Output = Result<Response<KeywardBody<B>>, E>> + Send>>;

pin_project! {
    /// Response future of every keyward service: answered by the layer itself, the inner
    /// service's future passed through, or the layer's coordinated work `C`.
    pub struct ResponseFuture<F, C, B: Body> {
        #[pin]
        kind: Kind<F, C, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, C, B: Body> {
        // Answered without the store or the inner service (a rejected key, a problem).
        Answered { response: Option<Response<KeywardBody<B>>> },
        // Not coordinated (no key, method not configured): the inner future, untouched.
        PassThrough { #[pin] future: F },
        // Coordinated: the layer's own work, which runs the inner service when it decides to.
        Coordinated { #[pin] future: C },
    }
}

impl<F, C, B: Body> ResponseFuture<F, C, B> {
    pub(crate) fn answered(response: Response<KeywardBody<B>>) -> Self {
        ResponseFuture {
            kind: Kind::Answered {
                response: Some(response),
            },
        }
    }

    pub(crate) fn pass_through(future: F) -> Self {
        ResponseFuture {
            kind: Kind::PassThrough { future },
        }
    }

    pub(crate) fn coordinated(future: C) -> Self {
        ResponseFuture {
            kind: Kind::Coordinated { future },
        }
    }
}

impl<F, C, B, R, E> Future for ResponseFuture<F, C, B>
where
    F: Future<Output = Result<Response<R>, E>>,
    C: Future<Output = Result<Response<KeywardBody<B>>, E>>,
    B: Body + From<R>,
{
    type Output = Result<Response<KeywardBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            // `None` only if polled again after completion, which futures need not answer.
            KindProj::Answered { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
            KindProj::PassThrough { future } => future
                .poll(cx)
                .map_ok(|res| res.map(|body| KeywardBody::inner(B::from(body)))),
            KindProj::Coordinated { future } => future.poll(cx),
        }
    }
}

impl<F, C, B: Body> fmt::Debug for ResponseFuture<F, C, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Answered { .. } => "answered",
            Kind::PassThrough { .. } => "pass_through",
            Kind::Coordinated { .. } => "coordinated",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use http_body::Body;
use keyward_core::grpc::Protocol;
use keyward_core::{KeywardBody, Problem};
use pin_project_lite::pin_project;
use tracing::Span;

type Coalesced<RB, E> = Pin<Box<dyn Future<Output = Result<Response<KeywardBody<RB>>, E>> + Send>>;

pin_project! {
    /// Response future of [`SingleFlight`](super::SingleFlight).
    pub struct ResponseFuture<F, RB: Body, E> {
        #[pin]
        kind: Kind<F, RB, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, RB: Body, E> {
        // Not coalesced (method not configured, no key): the inner future, untouched.
        Passthrough { #[pin] future: F },
        // Rejected before any work.
        Problem { problem: Problem, protocol: Protocol },
        // Polled inside the request's `keyward.single_flight` span.
        Coalesced { future: Coalesced<RB, E>, span: Span },
    }
}

impl<F, RB: Body, E> ResponseFuture<F, RB, E> {
    pub(crate) fn passthrough(future: F) -> Self {
        ResponseFuture {
            kind: Kind::Passthrough { future },
        }
    }

    pub(crate) fn problem(problem: Problem, protocol: Protocol) -> Self {
        ResponseFuture {
            kind: Kind::Problem { problem, protocol },
        }
    }

    pub(crate) fn coalesced(future: Coalesced<RB, E>, span: Span) -> Self {
        ResponseFuture {
            kind: Kind::Coalesced { future, span },
        }
    }
}

impl<F, RB, E> Future for ResponseFuture<F, RB, E>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: Body,
{
    type Output = Result<Response<KeywardBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { future } => {
                let response = ready!(future.poll(cx))?;
                Poll::Ready(Ok(response.map(KeywardBody::inner)))
            }
            KindProj::Problem { problem, protocol } => {
                Poll::Ready(Ok(problem.clone().into_keyward_response(*protocol)))
            }
            KindProj::Coalesced { future, span } => {
                let _entered = span.enter();
                future.as_mut().poll(cx)
            }
        }
    }
}

impl<F, RB: Body, E> fmt::Debug for ResponseFuture<F, RB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "Passthrough",
            Kind::Problem { .. } => "Problem",
            Kind::Coalesced { .. } => "Coalesced",
        };
        f.debug_tuple("ResponseFuture").field(&kind).finish()
    }
}

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use http_body::Body;
use keyward_core::KeywardBody;
use pin_project_lite::pin_project;

pub(crate) type Coordinated<ResB, E> =
    Pin<Box<dyn Future<Output = Result<Response<KeywardBody<ResB>>, E>> + Send>>;

pin_project! {
    /// Response future of [`IdempotencyService`](super::IdempotencyService).
    pub struct ResponseFuture<F, ResB: Body, E> {
        #[pin]
        kind: Kind<F, ResB, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, ResB: Body, E> {
        // Answered without the store or the inner service (400, or a bad key).
        Ready { response: Option<Response<KeywardBody<ResB>>> },
        // No key and none required: the inner service alone.
        PassThrough { #[pin] future: F },
        // Claim, run, store or replay.
        Coordinated { future: Coordinated<ResB, E> },
    }
}

impl<F, ResB: Body, E> ResponseFuture<F, ResB, E> {
    pub(crate) fn ready(response: Response<KeywardBody<ResB>>) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn pass_through(future: F) -> Self {
        ResponseFuture {
            kind: Kind::PassThrough { future },
        }
    }

    pub(crate) fn coordinated(future: Coordinated<ResB, E>) -> Self {
        ResponseFuture {
            kind: Kind::Coordinated { future },
        }
    }
}

impl<F, ResB, E> Future for ResponseFuture<F, ResB, E>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    ResB: Body,
{
    type Output = Result<Response<KeywardBody<ResB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Ready { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => Poll::Pending,
            },
            KindProj::PassThrough { future } => future
                .poll(cx)
                .map(|result| result.map(|res| res.map(KeywardBody::inner))),
            KindProj::Coordinated { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, ResB: Body, E> fmt::Debug for ResponseFuture<F, ResB, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

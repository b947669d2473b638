use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The response body of every keyward layer: the inner service's body passed through,
    /// a body keyward produced (a replay, a problem, a coalesced copy), or a body whose
    /// first bytes keyward already read while deciding whether to store it.
    #[project = KeywardBodyProj]
    #[derive(Debug)]
    pub enum KeywardBody<B: Body> {
        /// A complete body held in memory, with optional trailers.
        Full {
            data: Option<Bytes>,
            trailers: Option<HeaderMap>,
        },
        /// The inner body, untouched.
        Inner {
            #[pin]
            body: B,
        },
        /// Bytes already read from `rest`, then what `rest` still yields (or the error
        /// that stopped the read).
        Prefixed {
            prefix: Option<Bytes>,
            error: Option<B::Error>,
            #[pin]
            rest: B,
        },
    }
}

impl<B: Body> KeywardBody<B> {
    /// A body of `data` and nothing else.
    pub fn full(data: Bytes) -> Self {
        KeywardBody::Full {
            data: (!data.is_empty()).then_some(data),
            trailers: None,
        }
    }

    /// A body of `data` followed by `trailers`.
    pub fn full_with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        KeywardBody::Full {
            data: (!data.is_empty()).then_some(data),
            trailers,
        }
    }

    /// The inner service's body, passed through.
    pub fn inner(body: B) -> Self {
        KeywardBody::Inner { body }
    }

    /// `prefix` (already read from `rest`), then the rest of `rest`; if reading stopped on
    /// `error`, that error is yielded after the prefix instead.
    pub fn prefixed(prefix: Bytes, error: Option<B::Error>, rest: B) -> Self {
        KeywardBody::Prefixed {
            prefix: (!prefix.is_empty()).then_some(prefix),
            error,
            rest,
        }
    }
}

impl<B> Body for KeywardBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            KeywardBodyProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            KeywardBodyProj::Inner { body } => body.poll_frame(cx),
            KeywardBodyProj::Prefixed {
                prefix,
                error,
                rest,
            } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                if let Some(error) = error.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                rest.poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            KeywardBody::Full { data, trailers } => data.is_none() && trailers.is_none(),
            KeywardBody::Inner { body } => body.is_end_stream(),
            KeywardBody::Prefixed {
                prefix,
                error,
                rest,
            } => prefix.is_none() && error.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            KeywardBody::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            KeywardBody::Inner { body } => body.size_hint(),
            KeywardBody::Prefixed { prefix, rest, .. } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn prefixed_yields_prefix_then_rest() {
        let body: KeywardBody<Full<Bytes>> =
            KeywardBody::prefixed(Bytes::from("ab"), None, Full::new(Bytes::from("cd")));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "abcd");
    }

    #[tokio::test]
    async fn full_yields_data_and_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body: KeywardBody<Full<Bytes>> =
            KeywardBody::full_with_trailers(Bytes::from("x"), Some(trailers.clone()));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers(), Some(&trailers));
        assert_eq!(collected.to_bytes(), "x");
    }
}

//! Reading a response whole, up to a cap, so that it can be stored or shared: the one
//! response buffer of idempotency (to store it) and single flight (to copy it).

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response};
use http_body::Body;
use http_body_util::BodyExt;
use keyward_core::KeywardBody;

/// A response after [`buffer_response`].
pub(crate) enum Buffered<B: Body> {
    /// The whole response, within the cap.
    Complete {
        parts: http::response::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Larger than the cap: the bytes read so far, then the rest, streamed.
    TooLarge(Response<KeywardBody<B>>),
    /// The body failed while being read: the bytes read so far, then its error.
    Failed(Response<KeywardBody<B>>),
}

/// Reads `res` to its end if it fits in `max` bytes; otherwise hands back a response
/// that yields exactly what the original would have.
pub(crate) async fn buffer_response<B>(res: Response<B>, max: usize) -> Buffered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    let (parts, mut body) = res.into_parts();
    if body.size_hint().lower() > max as u64 {
        let res = Response::from_parts(parts, KeywardBody::inner(body));
        return Buffered::TooLarge(res);
    }
    let mut chunks = Chunks::default();
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                let body = KeywardBody::prefixed(chunks.into_bytes(), Some(error), body);
                return Buffered::Failed(Response::from_parts(parts, body));
            }
        };
        match frame.into_data() {
            Ok(data) => {
                chunks.push(data);
                if chunks.len > max {
                    let body = KeywardBody::prefixed(chunks.into_bytes(), None, body);
                    return Buffered::TooLarge(Response::from_parts(parts, body));
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
            }
        }
    }
    Buffered::Complete {
        parts,
        body: chunks.into_bytes(),
        trailers,
    }
}

/// Body chunks read so far; one chunk (the common case) is kept without a copy or an
/// allocation.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    more: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        if self.first.is_none() {
            self.first = Some(data);
        } else {
            self.more.push(data);
        }
    }

    fn into_bytes(self) -> Bytes {
        let Some(first) = self.first else {
            return Bytes::new();
        };
        if self.more.is_empty() {
            return first;
        }
        let mut out = BytesMut::with_capacity(self.len);
        out.extend_from_slice(&first);
        for chunk in self.more {
            out.extend_from_slice(&chunk);
        }
        out.freeze()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    type Stream = StreamBody<
        futures::stream::Iter<
            std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::convert::Infallible>>,
        >,
    >;

    fn streamed(chunks: &[&'static str], trailer: bool) -> Response<Stream> {
        let mut frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        if trailer {
            let mut map = HeaderMap::new();
            map.insert("grpc-status", "0".parse().unwrap());
            frames.push(Ok(http_body::Frame::trailers(map)));
        }
        Response::new(StreamBody::new(futures::stream::iter(frames)))
    }

    async fn collect<B>(res: Response<KeywardBody<B>>) -> Bytes
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Debug,
    {
        res.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_response_within_the_cap_is_read_whole_with_its_trailers() {
        let Buffered::Complete { body, trailers, .. } =
            buffer_response(streamed(&["ab", "cd"], true), 4).await
        else {
            panic!("4 bytes fit a cap of 4")
        };
        assert_eq!(body, "abcd");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_larger_response_is_handed_back_whole() {
        let Buffered::TooLarge(res) =
            buffer_response(streamed(&["ab", "cd", "ef"], false), 3).await
        else {
            panic!("6 bytes exceed a cap of 3")
        };
        assert_eq!(collect(res).await, "abcdef");
        // A declared length over the cap is refused before anything is read.
        let declared = Response::new(Full::new(Bytes::from_static(b"abcdef")));
        let Buffered::TooLarge(res) = buffer_response(declared, 3).await else {
            panic!("the size hint is over the cap")
        };
        assert_eq!(collect(res).await, "abcdef");
    }
}

//! Reading a request body whole, capped: what the layers that look into the body share
//! (idempotency fingerprints, [`BufferedBodyLayer`](crate::BufferedBodyLayer) for
//! `json:` keys, webhook signatures), and the one way a refused body is answered.

use bytes::Bytes;
use http::StatusCode;
use http::request::Parts;
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use keyward_core::problem::types;
use keyward_core::{BufferedBody, Problem};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request body was not read.
#[derive(Debug)]
pub(crate) enum BodyRejection {
    /// Over the cap.
    TooLarge,
    /// The client's body stream failed.
    Unreadable(BoxError),
}

impl BodyRejection {
    /// The problem answered for it: 413 naming the cap `max`, or 400.
    pub(crate) fn problem(&self, max: usize, what: &str) -> Problem {
        match self {
            BodyRejection::TooLarge => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                types::BODY_TOO_LARGE,
                "Request body too large",
            )
            .detail(format!("{what} on this route are limited to {max} bytes")),
            BodyRejection::Unreadable(error) => {
                tracing::debug!(%error, "request body could not be read");
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    types::BODY_UNREADABLE,
                    "Request body unreadable",
                )
            }
        }
    }
}

/// Reads the whole body, refusing it as soon as it grows past `max` bytes (so an
/// oversized body is never buffered to its end). A body an earlier layer already read
/// (a [`BufferedBody`] extension) is taken from there.
pub(crate) async fn read_body<B>(parts: &Parts, body: B, max: usize) -> Result<Bytes, BodyRejection>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if let Some(BufferedBody(buffered)) = parts.extensions.get::<BufferedBody>() {
        if buffered.len() > max {
            return Err(BodyRejection::TooLarge);
        }
        return Ok(buffered.clone());
    }
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(BodyRejection::TooLarge);
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<LengthLimitError>() => Err(BodyRejection::TooLarge),
        Err(err) => Err(BodyRejection::Unreadable(err)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn parts(uri: &str) -> Parts {
        http::Request::post(uri).body(()).unwrap().into_parts().0
    }

    #[tokio::test]
    async fn body_over_the_cap_is_refused() {
        let p = parts("/");
        let ok = read_body(&p, Full::new(Bytes::from(vec![0u8; 10])), 10).await;
        assert_eq!(ok.unwrap().len(), 10);
        let big = read_body(&p, Full::new(Bytes::from(vec![0u8; 11])), 10).await;
        assert!(matches!(big, Err(BodyRejection::TooLarge)));
        let mut declared = parts("/");
        declared
            .headers
            .insert("content-length", "11".parse().unwrap());
        let early = read_body(&declared, Full::new(Bytes::new()), 10).await;
        assert!(matches!(early, Err(BodyRejection::TooLarge)));
    }

    #[tokio::test]
    async fn a_body_read_before_is_taken_from_the_extension() {
        let mut p = parts("/");
        p.extensions
            .insert(BufferedBody(Bytes::from_static(b"read before")));
        let body = read_body(&p, Full::new(Bytes::new()), 64).await.unwrap();
        assert_eq!(body, "read before");
        let capped = read_body(&p, Full::new(Bytes::new()), 4).await;
        assert!(matches!(capped, Err(BodyRejection::TooLarge)));
    }
}

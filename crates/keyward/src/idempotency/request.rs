//! Reading the request body (capped) and fingerprinting the request.

use bytes::Bytes;
use http::HeaderName;
use http::request::Parts;
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use keyward_core::canon::canonical_path;
use keyward_core::store::Fingerprint;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request body was not read.
#[derive(Debug)]
pub(crate) enum BodyRejection {
    /// Over `max_body`.
    TooLarge,
    /// The client's body stream failed.
    Unreadable(BoxError),
}

/// Reads the whole body, refusing it as soon as it grows past `max` bytes (so an
/// oversized body is never buffered to its end).
pub(crate) async fn read_body<B>(parts: &Parts, body: B, max: usize) -> Result<Bytes, BodyRejection>
where
    B: Body,
    B::Error: Into<BoxError>,
{
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

/// The request's fingerprint: method, canonical path (so `/accounts/%34%32` is the same
/// request as `/accounts/42`, as the router and `path:` keys see it; a path with no
/// canonical form counts as spelled), query, the configured headers (name, number
/// of values, then each value, in order) and the body. Every part is length-prefixed and
/// every header's values are counted, so no two different requests share a fingerprint
/// by moving bytes from one part into the next.
pub(crate) fn fingerprint(parts: &Parts, headers: &[HeaderName], body: &[u8]) -> Fingerprint {
    let path = parts.uri.path();
    let path = canonical_path(path).unwrap_or(std::borrow::Cow::Borrowed(path));
    let mut builder = Fingerprint::builder()
        .part(parts.method.as_str().as_bytes())
        .part(path.as_bytes())
        .part(parts.uri.query().unwrap_or("").as_bytes());
    for name in headers {
        let values = parts.headers.get_all(name);
        let count = values.iter().count() as u64;
        builder = builder
            .part(name.as_str().as_bytes())
            .part(&count.to_be_bytes());
        for value in values {
            builder = builder.part(value.as_bytes());
        }
    }
    builder.part(body).finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn parts(uri: &str) -> Parts {
        http::Request::post(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn fingerprint_covers_method_path_query_body_and_headers() {
        let base = fingerprint(&parts("/a?x=1"), &[], b"body");
        assert_eq!(base, fingerprint(&parts("/a?x=1"), &[], b"body"));
        assert_ne!(base, fingerprint(&parts("/a?x=2"), &[], b"body"));
        assert_ne!(base, fingerprint(&parts("/b?x=1"), &[], b"body"));
        // Spellings of one path are one request.
        assert_eq!(base, fingerprint(&parts("/%61?x=1"), &[], b"body"));
        assert_eq!(base, fingerprint(&parts("//a/?x=1"), &[], b"body"));
        assert_ne!(base, fingerprint(&parts("/a?x=1"), &[], b"bodY"));
        let get = http::Request::get("/a?x=1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_ne!(base, fingerprint(&get, &[], b"body"));
        let mut typed = parts("/a?x=1");
        typed
            .headers
            .insert("content-type", "text/plain".parse().unwrap());
        let ct = [http::header::CONTENT_TYPE];
        assert_ne!(
            fingerprint(&typed, &ct, b"body"),
            fingerprint(&parts("/a?x=1"), &ct, b"body")
        );
    }

    /// Found in review (issue 13): with headers `[a, b]`, `a: b` and `b: b` on their own
    /// spelled the same parts (`a`, `b`, `b`) and so the same fingerprint.
    #[test]
    fn header_values_cannot_move_between_configured_headers() {
        let names = [HeaderName::from_static("a"), HeaderName::from_static("b")];
        let mut first = parts("/");
        first.headers.insert("a", "b".parse().unwrap());
        let mut second = parts("/");
        second.headers.insert("b", "b".parse().unwrap());
        assert_ne!(
            fingerprint(&first, &names, b""),
            fingerprint(&second, &names, b"")
        );
        let mut two = parts("/");
        two.headers.append("a", "x".parse().unwrap());
        two.headers.append("a", "y".parse().unwrap());
        let mut split = parts("/");
        split.headers.insert("a", "x".parse().unwrap());
        split.headers.insert("b", "y".parse().unwrap());
        assert_ne!(
            fingerprint(&two, &names, b""),
            fingerprint(&split, &names, b"")
        );
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
}

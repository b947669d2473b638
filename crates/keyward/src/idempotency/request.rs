//! Fingerprinting the request.

use std::borrow::Cow;

use http::HeaderName;
use http::request::Parts;
use keyward_core::canon::canonical_path;
use keyward_core::json::{JsonError, JsonIdentity};
use keyward_core::store::Fingerprint;

/// The request's fingerprint: method, canonical path (so `/accounts/%34%32` is the same
/// request as `/accounts/42`, as the router and `path:` keys see it; a path with no
/// canonical form counts as spelled), query, the configured headers (name, number
/// of values, then each value, in order) and the body (its bytes, or with
/// [`JsonIdentity`] the canonical JSON it selects). Every part is length-prefixed and
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

/// What of `body` identifies the request: its bytes, or with `json` the canonical JSON
/// it selects. An empty body is no body (its zero bytes) either way; any other must be
/// I-JSON when `json` is set.
pub(crate) fn body_identity<'a>(
    body: &'a [u8],
    json: Option<&JsonIdentity>,
) -> Result<Cow<'a, [u8]>, JsonError> {
    match json {
        Some(identity) if !body.is_empty() => identity.identity(body).map(Cow::Owned),
        _ => Ok(Cow::Borrowed(body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

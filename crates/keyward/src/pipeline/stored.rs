//! Responses that reach another request than the one they answered: an idempotent
//! replay, a single-flight follower's copy. Which headers they may carry, and how they
//! are rendered.

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Response};
use http_body::Body;
use keyward_core::KeywardBody;
use keyward_core::store::StoredResponse;

/// Headers a response never carries to another request: credentials and cookies (a
/// replay or a copy must not hand out the first caller's session), `Date` (it is not the
/// original message) and hop-by-hop headers (they describe a connection, not the
/// response). Headers named by `Connection` are hop-by-hop too.
pub(crate) const NEVER_SHARED: [HeaderName; 11] = [
    header::SET_COOKIE,
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::DATE,
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The headers of `headers` that may reach another request and that `allow` accepts.
pub(crate) fn shareable_headers(
    headers: &HeaderMap,
    allow: impl Fn(&HeaderName) -> bool,
) -> HeaderMap {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if allow(name) && !NEVER_SHARED.contains(name) && !named_by_connection.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// `stored` as a response to another request, marked `{marker}: true`
/// (`Idempotent-Replayed`, `Keyward-Coalesced`).
pub(crate) fn render_stored<B: Body>(
    stored: &StoredResponse,
    marker: HeaderName,
) -> Response<KeywardBody<B>> {
    let body = KeywardBody::full_with_trailers(stored.body.clone(), stored.trailers.clone());
    let mut response = Response::new(body);
    *response.status_mut() = stored.status;
    // Sized up front: inserting into a plain clone would grow and rehash it.
    let mut headers = HeaderMap::with_capacity(stored.headers.len() + 1);
    headers.extend(
        stored
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone())),
    );
    headers.insert(marker, HeaderValue::from_static("true"));
    *response.headers_mut() = headers;
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn never_shares_cookies_credentials_date_or_hop_by_hop() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("set-cookie", "session=1"),
            ("authorization", "Bearer x"),
            ("date", "Mon, 23 Nov 2026 00:00:00 GMT"),
            ("connection", "x-private"),
            ("x-private", "hop"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/json"),
            ("location", "/payments/1"),
        ] {
            headers.append(name, value.parse().unwrap());
        }
        let kept = shareable_headers(&headers, |_| true);
        let names: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "location"]);
        let kept = shareable_headers(&headers, |name| name == header::LOCATION);
        let names: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["location"]);
    }
}

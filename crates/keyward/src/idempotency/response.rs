//! Which responses are stored, which of their headers, and how a replay looks.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use keyward_core::KeywardBody;
use keyward_core::grpc::{self, Code, Protocol};
use keyward_core::store::StoredResponse;

use super::layer::{IDEMPOTENT_REPLAYED, ReplayHeaders};

/// Headers that are never stored or replayed: credentials and cookies (a replay must not
/// hand out a session), `Date` (a replay is not the original message) and hop-by-hop
/// headers (they describe a connection, not the response).
const NEVER_STORED: [HeaderName; 12] = [
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
    // Recomputed from the stored body on replay.
    header::CONTENT_LENGTH,
];

/// Whether a response of this status frees the key instead of being stored: server
/// errors and "try again" statuses mean the effect may not have happened, so the client
/// must be able to retry.
pub(crate) fn releases_key(status: StatusCode, store_server_errors: bool) -> bool {
    if store_server_errors {
        return false;
    }
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status.as_u16() == 425
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// Whether a gRPC response frees the key: gRPC answers HTTP 200 even for failures, so
/// the call's `grpc-status` decides. Transient codes ([`Code::is_transient`]: the analogue
/// of 5xx, 408 and 429) and a missing status (a broken call) release the key;
/// `OK` and deterministic errors such as `INVALID_ARGUMENT` are stored and replayed.
pub(crate) fn grpc_releases_key(
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
    store_server_errors: bool,
) -> bool {
    if store_server_errors || Protocol::of(headers) != Protocol::Grpc {
        return false;
    }
    grpc::status_of(headers, trailers).is_none_or(Code::is_transient)
}

/// The headers of `headers` that may be stored under `policy`.
pub(crate) fn storable_headers(headers: &HeaderMap, policy: &ReplayHeaders) -> HeaderMap {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let allowed = match policy {
            ReplayHeaders::AllSafe => true,
            ReplayHeaders::Only(list) => list.contains(name),
        };
        if allowed && !NEVER_STORED.contains(name) && !named_by_connection.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// A response read for storing.
pub(crate) enum Buffered<B: Body> {
    /// The whole response, within the cap.
    Complete {
        parts: http::response::Parts,
        body: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Over the cap or failed while reading: passed through as it is, not stored.
    PassThrough(Response<KeywardBody<B>>),
}

/// Reads `res` to its end if it fits in `max` bytes.
pub(crate) async fn buffer_response<B>(res: Response<B>, max: usize) -> Buffered<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    let (parts, mut body) = res.into_parts();
    if body.size_hint().lower() > max as u64 {
        return Buffered::PassThrough(Response::from_parts(parts, KeywardBody::inner(body)));
    }
    let mut data = BytesMut::new();
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if data.len() > max {
                        let prefix = data.freeze();
                        return Buffered::PassThrough(Response::from_parts(
                            parts,
                            KeywardBody::prefixed(prefix, None, body),
                        ));
                    }
                }
                Err(frame) => {
                    if let Ok(map) = frame.into_trailers() {
                        trailers.get_or_insert_with(HeaderMap::new).extend(map);
                    }
                }
            },
            Some(Err(err)) => {
                let prefix = data.freeze();
                return Buffered::PassThrough(Response::from_parts(
                    parts,
                    KeywardBody::prefixed(prefix, Some(err), body),
                ));
            }
        }
    }
    Buffered::Complete {
        parts,
        body: data.freeze(),
        trailers,
    }
}

/// The response sent to the first caller after its response was read for storing.
pub(crate) fn original<B: Body>(
    parts: http::response::Parts,
    body: Bytes,
    trailers: Option<HeaderMap>,
) -> Response<KeywardBody<B>> {
    Response::from_parts(parts, KeywardBody::full_with_trailers(body, trailers))
}

/// A replay of `stored`, marked `Idempotent-Replayed: true`.
pub(crate) fn replay<B: Body>(stored: &StoredResponse) -> Response<KeywardBody<B>> {
    let mut res = Response::new(KeywardBody::full_with_trailers(
        stored.body.clone(),
        stored.trailers.clone(),
    ));
    *res.status_mut() = stored.status;
    *res.headers_mut() = stored.headers.clone();
    res.headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_stores_cookies_credentials_date_or_hop_by_hop() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("set-cookie", "session=1"),
            ("authorization", "Bearer x"),
            ("date", "Mon, 23 Nov 2026 00:00:00 GMT"),
            ("connection", "x-private"),
            ("x-private", "hop"),
            ("transfer-encoding", "chunked"),
            ("content-length", "3"),
            ("content-type", "application/json"),
            ("location", "/payments/1"),
        ] {
            headers.append(name, value.parse().unwrap());
        }
        let kept = storable_headers(&headers, &ReplayHeaders::AllSafe);
        let names: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "location"]);
        let only = ReplayHeaders::Only(vec![header::LOCATION, header::SET_COOKIE]);
        let kept = storable_headers(&headers, &only);
        let names: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["location"]);
    }

    #[test]
    fn grpc_status_decides_for_grpc_responses() {
        let grpc = |status: Option<&str>| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, "application/grpc".parse().unwrap());
            let trailers = status.map(|code| {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", code.parse().unwrap());
                trailers
            });
            (headers, trailers)
        };
        for code in ["1", "2", "4", "8", "10", "13", "14", "15"] {
            let (headers, trailers) = grpc(Some(code));
            assert!(
                grpc_releases_key(&headers, trailers.as_ref(), false),
                "{code}"
            );
            assert!(
                !grpc_releases_key(&headers, trailers.as_ref(), true),
                "{code}"
            );
        }
        for code in ["0", "3", "5", "6", "7", "9", "11", "12", "16"] {
            let (headers, trailers) = grpc(Some(code));
            assert!(
                !grpc_releases_key(&headers, trailers.as_ref(), false),
                "{code}"
            );
        }
        // No status at all: the call broke off.
        let (headers, _) = grpc(None);
        assert!(grpc_releases_key(&headers, None, false));
        // Trailers-only: the status is in the headers.
        let (mut headers, _) = grpc(None);
        headers.insert("grpc-status", "3".parse().unwrap());
        assert!(!grpc_releases_key(&headers, None, false));
        // Not gRPC: the HTTP status alone decides.
        assert!(!grpc_releases_key(&HeaderMap::new(), None, false));
    }

    #[test]
    fn releases_on_server_errors_and_retryable_statuses() {
        for code in [500, 502, 503, 504, 408, 425, 429] {
            let status = StatusCode::from_u16(code).unwrap();
            assert!(releases_key(status, false), "{code}");
            assert!(!releases_key(status, true), "{code}");
        }
        for code in [200, 201, 204, 301, 400, 404, 409, 422] {
            assert!(
                !releases_key(StatusCode::from_u16(code).unwrap(), false),
                "{code}"
            );
        }
    }
}

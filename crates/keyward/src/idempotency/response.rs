//! Which responses are stored, which of their headers, and how a replay looks.

use bytes::Bytes;
use http::header;
use http::{HeaderMap, Response, StatusCode};
use http_body::Body;
use keyward_core::KeywardBody;
use keyward_core::grpc::{self, Code, Protocol};
use keyward_core::store::StoredResponse;

use super::layer::{IDEMPOTENT_REPLAYED, ReplayHeaders};
use crate::pipeline::{render_stored, shareable_headers};

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

/// The headers of `headers` that may be stored under `policy`: never the
/// [`NEVER_SHARED`](crate::pipeline::NEVER_SHARED) ones, nor `Content-Length` (recomputed
/// from the stored body on replay).
pub(crate) fn storable_headers(headers: &HeaderMap, policy: &ReplayHeaders) -> HeaderMap {
    shareable_headers(headers, |name| {
        name != header::CONTENT_LENGTH
            && match policy {
                ReplayHeaders::AllSafe => true,
                ReplayHeaders::Only(list) => list.contains(name),
            }
    })
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
    render_stored(stored, IDEMPOTENT_REPLAYED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_neither_never_shared_headers_nor_content_length() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("set-cookie", "session=1"),
            ("content-length", "3"),
            ("content-type", "application/json"),
            ("location", "/payments/1"),
        ] {
            headers.append(name, value.parse().unwrap());
        }
        let kept = storable_headers(&headers, &ReplayHeaders::AllSafe);
        let names: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "location"]);
        // An allow-list cannot bring a never-shared header back.
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

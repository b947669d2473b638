//! gRPC awareness: which requests are gRPC, how a rejection becomes a gRPC status, and
//! which gRPC outcomes an idempotency key may keep.
//!
//! A gRPC call is an HTTP/2 request with `content-type: application/grpc…`. A gRPC client
//! does not read problem documents: it reads `grpc-status` and `grpc-message`, from the
//! trailers or, for a "trailers-only" answer, from the response headers. So every keyward
//! rejection of a gRPC request is rendered as a trailers-only response (HTTP 200, empty
//! body) by [`Problem::into_response_for`](crate::Problem::into_response_for); the layers
//! pick the form with [`Protocol::of`].
//!
//! | problem | HTTP | gRPC status |
//! |---|---|---|
//! | missing or invalid key, unreadable body | 400 | `INVALID_ARGUMENT` (3) |
//! | idempotency key reused with another request | 422 | `FAILED_PRECONDITION` (9) |
//! | idempotency request in flight | 409 | `ABORTED` (10) |
//! | request body too large | 413 | `RESOURCE_EXHAUSTED` (8) |
//! | quota exceeded | 429 | `RESOURCE_EXHAUSTED` (8) |
//! | serial wait timeout, serial queue full, store unavailable | 503 | `UNAVAILABLE` (14) |
//! | coalesced leader failed, upstream unreachable | 502 | `UNAVAILABLE` (14) |
//! | upstream timeout | 504 | `DEADLINE_EXCEEDED` (4) |
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use keyward_core::grpc::{Code, Protocol};
//!
//! let mut headers = HeaderMap::new();
//! headers.insert("content-type", "application/grpc+proto".parse().unwrap());
//! assert_eq!(Protocol::of(&headers), Protocol::Grpc);
//! assert_eq!(Code::for_http(StatusCode::CONFLICT), Code::Aborted);
//! assert!(Code::Unavailable.is_transient());
//! assert!(!Code::InvalidArgument.is_transient());
//! ```

use http::header::{CONTENT_TYPE, HeaderName};
use http::{HeaderMap, StatusCode};

/// `grpc-status`: the call's status code, in the trailers (or the headers of a
/// trailers-only response).
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`: the status message, percent-encoded.
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `keyward-problem-type`: the stable problem `type` of a keyward rejection, so that gRPC
/// clients can switch on it as HTTP clients switch on the problem document's `type`.
pub const PROBLEM_TYPE: HeaderName = HeaderName::from_static("keyward-problem-type");

/// The protocol a request speaks, which decides how a rejection is rendered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// Plain HTTP: rejections are `application/problem+json`.
    #[default]
    Http,
    /// gRPC (`content-type: application/grpc…`): rejections are trailers-only responses
    /// carrying `grpc-status` and `grpc-message`.
    Grpc,
}

impl Protocol {
    /// The protocol of a request (or response) with these headers.
    pub fn of(headers: &HeaderMap) -> Self {
        let grpc = headers
            .get(CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
        if grpc { Protocol::Grpc } else { Protocol::Http }
    }
}

/// gRPC status codes (see `grpc/doc/statuscodes.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl Code {
    const ALL: [Code; 17] = [
        Code::Ok,
        Code::Cancelled,
        Code::Unknown,
        Code::InvalidArgument,
        Code::DeadlineExceeded,
        Code::NotFound,
        Code::AlreadyExists,
        Code::PermissionDenied,
        Code::ResourceExhausted,
        Code::FailedPrecondition,
        Code::Aborted,
        Code::OutOfRange,
        Code::Unimplemented,
        Code::Internal,
        Code::Unavailable,
        Code::DataLoss,
        Code::Unauthenticated,
    ];

    /// The numeric code, as sent in `grpc-status`.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The code for a numeric `grpc-status`; `None` for values outside 0..=16.
    pub fn from_u8(code: u8) -> Option<Code> {
        Code::ALL.get(usize::from(code)).copied()
    }

    /// The gRPC status a keyward rejection with this HTTP status is sent as (the table in
    /// the [module docs](self)). Statuses keyward does not produce map to `UNKNOWN`.
    pub fn for_http(status: StatusCode) -> Code {
        match status.as_u16() {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::Aborted,
            413 | 429 => Code::ResourceExhausted,
            422 => Code::FailedPrecondition,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }

    /// Whether a call that ended with this code may not have taken effect, or may succeed
    /// when retried: the gRPC analogue of HTTP 5xx, 408, 425 and 429. An idempotency key
    /// is released after such an outcome instead of storing it.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Code::Cancelled
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Internal
                | Code::Unavailable
                | Code::DataLoss
        )
    }
}

/// The `grpc-status` a response ended with: from its trailers, or from its headers for a
/// trailers-only response. `None` when neither has a valid one (the client sees a
/// protocol error).
pub fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<Code> {
    let value = trailers
        .and_then(|trailers| trailers.get(GRPC_STATUS))
        .or_else(|| headers.get(GRPC_STATUS))?;
    let code = value.to_str().ok()?.trim().parse::<u8>().ok()?;
    Code::from_u8(code)
}

/// Percent-encodes `message` for `grpc-message`: every byte outside printable ASCII
/// (0x20..=0x7E), and `%` itself, becomes `%XX` of its UTF-8 byte, as the gRPC HTTP/2
/// protocol requires.
pub fn encode_message(message: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(message.len());
    for &byte in message.as_bytes() {
        if (0x20..=0x7E).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0F)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_grpc_content_types_are_grpc() {
        for (content_type, expected) in [
            ("application/grpc", Protocol::Grpc),
            ("application/grpc+proto", Protocol::Grpc),
            ("application/grpc-web+proto", Protocol::Grpc),
            ("application/json", Protocol::Http),
            ("text/plain", Protocol::Http),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, content_type.parse().unwrap());
            assert_eq!(Protocol::of(&headers), expected, "{content_type}");
        }
        assert_eq!(Protocol::of(&HeaderMap::new()), Protocol::Http);
    }

    #[test]
    fn keyward_statuses_map_to_the_documented_codes() {
        for (status, code) in [
            (400, Code::InvalidArgument),
            (409, Code::Aborted),
            (413, Code::ResourceExhausted),
            (422, Code::FailedPrecondition),
            (429, Code::ResourceExhausted),
            (502, Code::Unavailable),
            (503, Code::Unavailable),
            (504, Code::DeadlineExceeded),
            (418, Code::Unknown),
        ] {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(Code::for_http(status), code, "{status}");
        }
    }

    #[test]
    fn codes_round_trip_and_out_of_range_is_none() {
        for code in Code::ALL {
            assert_eq!(Code::from_u8(code.as_u8()), Some(code));
        }
        assert_eq!(Code::from_u8(17), None);
    }

    #[test]
    fn transient_codes_are_the_retryable_ones() {
        let transient: Vec<u8> = Code::ALL
            .into_iter()
            .filter(|code| code.is_transient())
            .map(Code::as_u8)
            .collect();
        assert_eq!(transient, [1, 2, 4, 8, 10, 13, 14, 15]);
    }

    #[test]
    fn status_prefers_trailers_and_falls_back_to_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_STATUS, "14".parse().unwrap());
        let mut trailers = HeaderMap::new();
        trailers.insert(GRPC_STATUS, "0".parse().unwrap());
        assert_eq!(status_of(&headers, Some(&trailers)), Some(Code::Ok));
        assert_eq!(status_of(&headers, None), Some(Code::Unavailable));
        assert_eq!(status_of(&HeaderMap::new(), None), None);
        headers.insert(GRPC_STATUS, "99".parse().unwrap());
        assert_eq!(status_of(&headers, None), None);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("plain text: ok"), "plain text: ok");
        assert_eq!(encode_message("100%"), "100%25");
        assert_eq!(encode_message("a\nb"), "a%0Ab");
        assert_eq!(encode_message("€"), "%E2%82%AC");
    }
}

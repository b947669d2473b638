//! RFC 9457 `application/problem+json` rejections.
//!
//! Every rejection keyward produces carries one of the stable `type` values in [`types`];
//! clients and dashboards may switch on them. They are documented in `docs/problems.md`.
//! gRPC requests get the same rejections as gRPC statuses (see [`crate::grpc`]).

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use std::time::Duration;

use crate::grpc::{Code, GRPC_MESSAGE, GRPC_STATUS, PROBLEM_TYPE, Protocol, encode_message};

/// The stable `type` URIs of keyward's problem responses.
pub mod types {
    /// 400: the route requires an `Idempotency-Key` and the request has none.
    pub const IDEMPOTENCY_KEY_MISSING: &str =
        "https://keyward.dev/problems/idempotency-key-missing";
    /// 400: the `Idempotency-Key` is not a 1..=255 character sf-string or token.
    pub const IDEMPOTENCY_KEY_INVALID: &str =
        "https://keyward.dev/problems/idempotency-key-invalid";
    /// 422: the key was first used with a different request (method, path, query, body).
    pub const IDEMPOTENCY_KEY_REUSED: &str = "https://keyward.dev/problems/idempotency-key-reused";
    /// 409: a request with this key is still being processed.
    pub const IDEMPOTENCY_IN_FLIGHT: &str =
        "https://keyward.dev/problems/idempotency-request-in-flight";
    /// 400: a coordination key (quota, serial, single flight) is present but unusable.
    pub const KEY_INVALID: &str = "https://keyward.dev/problems/key-invalid";
    /// 413: the request body is larger than the route's `max_body`.
    pub const BODY_TOO_LARGE: &str = "https://keyward.dev/problems/request-body-too-large";
    /// 400: the request body could not be read.
    pub const BODY_UNREADABLE: &str = "https://keyward.dev/problems/request-body-unreadable";
    /// 400: the route identifies requests by their JSON body (canonical JSON
    /// fingerprints, `json:` keys) and the body is not I-JSON.
    pub const BODY_NOT_JSON: &str = "https://keyward.dev/problems/request-body-not-json";
    /// 401: a webhook delivery without a valid Standard Webhooks signature.
    pub const WEBHOOK_SIGNATURE_INVALID: &str =
        "https://keyward.dev/problems/webhook-signature-invalid";
    /// 401: a webhook delivery signed too long ago (or in the future): outside the
    /// route's tolerance.
    pub const WEBHOOK_TIMESTAMP_INVALID: &str =
        "https://keyward.dev/problems/webhook-timestamp-invalid";
    /// 429: the key's quota is used up.
    pub const QUOTA_EXCEEDED: &str = "https://keyward.dev/problems/quota-exceeded";
    /// 429: the request alone costs more than the quota's burst, so it can never pass;
    /// no `Retry-After`, and retrying the same request is pointless.
    pub const QUOTA_COST_OVER_BURST: &str = "https://keyward.dev/problems/quota-cost-over-burst";
    /// 503: waited longer than `max_wait` for the key's turn.
    pub const SERIAL_TIMEOUT: &str = "https://keyward.dev/problems/serial-wait-timeout";
    /// 503: more than `max_queue` requests already wait for this key.
    pub const SERIAL_QUEUE_FULL: &str = "https://keyward.dev/problems/serial-queue-full";
    /// 502: the request this one was coalesced with failed.
    pub const COALESCED_LEADER_FAILED: &str =
        "https://keyward.dev/problems/coalesced-leader-failed";
    /// 502: the sidecar could not reach the upstream (the outcome is unknown).
    pub const UPSTREAM_UNREACHABLE: &str = "https://keyward.dev/problems/upstream-unreachable";
    /// 504: the upstream did not answer within `request_timeout` (the outcome is unknown).
    pub const UPSTREAM_TIMEOUT: &str = "https://keyward.dev/problems/upstream-timeout";
    /// 503: the coordination store did not answer and the route fails closed.
    pub const STORE_UNAVAILABLE: &str = "https://keyward.dev/problems/store-unavailable";
    /// 400: (sidecar) the request path has no single meaning to upstreams (an encoded
    /// slash, a backslash, `%00`, a broken escape); see [`crate::canon`].
    pub const PATH_INVALID: &str = "https://keyward.dev/problems/request-path-invalid";
    /// 408: (sidecar) the client sent no part of its body for `body_read_timeout`.
    pub const BODY_TIMEOUT: &str = "https://keyward.dev/problems/request-body-timeout";
}

/// A problem response under construction.
///
/// ```
/// use keyward_core::problem::{Problem, types};
/// use http::StatusCode;
/// let res = Problem::new(StatusCode::CONFLICT, types::IDEMPOTENCY_IN_FLIGHT, "Request in flight")
///     .detail("a request with this Idempotency-Key is still being processed")
///     .retry_after(std::time::Duration::from_millis(1500))
///     .into_response();
/// assert_eq!(res.status(), StatusCode::CONFLICT);
/// assert_eq!(res.headers()["content-type"], "application/problem+json");
/// assert_eq!(res.headers()["retry-after"], "2");
/// let json: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
/// assert_eq!(json["type"], types::IDEMPOTENCY_IN_FLIGHT);
/// assert_eq!(json["status"], 409);
/// ```
#[derive(Clone, Debug)]
pub struct Problem {
    status: StatusCode,
    type_uri: &'static str,
    title: &'static str,
    detail: Option<String>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    /// A problem with its status, stable type and short title.
    pub fn new(status: StatusCode, type_uri: &'static str, title: &'static str) -> Self {
        Problem {
            status,
            type_uri,
            title,
            detail: None,
            headers: Vec::new(),
        }
    }

    /// 400 [`types::KEY_INVALID`]: a coordination key the request carries but that cannot be
    /// used. The detail names the spec and the reason, never the raw key.
    pub fn key_invalid(error: &crate::KeyError) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, types::KEY_INVALID, "Invalid key")
            .detail(error.to_string())
    }

    /// 503 [`types::STORE_UNAVAILABLE`] with `Retry-After: 1`: the store did not answer
    /// and the layer fails closed. Every layer answers a store failure with this one.
    pub fn store_unavailable() -> Self {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            types::STORE_UNAVAILABLE,
            "Coordination store unavailable",
        )
        .retry_after(Duration::from_secs(1))
    }

    /// A human-readable explanation of this occurrence. Never put raw keys in it.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds `Retry-After` in whole seconds, rounded up, at least 1.
    pub fn retry_after(self, after: Duration) -> Self {
        let value = HeaderValue::from(retry_after_seconds(after));
        self.header(RETRY_AFTER, value)
    }

    /// Adds a response header.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stable type URI.
    pub fn type_uri(&self) -> &'static str {
        self.type_uri
    }

    /// Renders the response for a request speaking `protocol`, with a
    /// [`KeywardBody`](crate::KeywardBody), the body type every layer returns. This is
    /// how every layer answers a rejection, so gRPC callers always get a gRPC status.
    pub fn into_keyward_response<B: http_body::Body>(
        self,
        protocol: Protocol,
    ) -> Response<crate::KeywardBody<B>> {
        self.into_response_for(protocol)
            .map(crate::KeywardBody::full)
    }

    /// Renders the response for a request speaking `protocol`: an
    /// `application/problem+json` document for HTTP, a trailers-only response for gRPC
    /// (HTTP 200, no body, `grpc-status` from [`Code::for_http`], `grpc-message` =
    /// percent-encoded "title: detail", the type in `keyward-problem-type`; added headers
    /// such as `Retry-After` become response metadata).
    ///
    /// ```
    /// use keyward_core::grpc::Protocol;
    /// use keyward_core::problem::{Problem, types};
    /// use http::StatusCode;
    /// let res = Problem::new(StatusCode::CONFLICT, types::IDEMPOTENCY_IN_FLIGHT, "In flight")
    ///     .detail("still running: 100%")
    ///     .retry_after(std::time::Duration::from_secs(1))
    ///     .into_response_for(Protocol::Grpc);
    /// assert_eq!(res.status(), StatusCode::OK);
    /// assert_eq!(res.headers()["content-type"], "application/grpc");
    /// assert_eq!(res.headers()["grpc-status"], "10"); // ABORTED
    /// assert_eq!(res.headers()["grpc-message"], "In flight: still running: 100%25");
    /// assert_eq!(res.headers()["keyward-problem-type"], types::IDEMPOTENCY_IN_FLIGHT);
    /// assert_eq!(res.headers()["retry-after"], "1");
    /// assert!(res.body().is_empty());
    /// ```
    pub fn into_response_for(self, protocol: Protocol) -> Response<Bytes> {
        match protocol {
            Protocol::Http => self.into_response(),
            Protocol::Grpc => self.into_grpc_response(),
        }
    }

    fn into_grpc_response(self) -> Response<Bytes> {
        let message = match &self.detail {
            Some(detail) => format!("{}: {}", self.title, detail),
            None => self.title.to_owned(),
        };
        let mut res = Response::new(Bytes::new());
        let headers = res.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(
            GRPC_STATUS,
            HeaderValue::from(u16::from(Code::for_http(self.status).as_u8())),
        );
        // Percent-encoding leaves only visible ASCII and spaces: always a valid value.
        if let Ok(value) = HeaderValue::try_from(encode_message(&message)) {
            headers.insert(GRPC_MESSAGE, value);
        }
        headers.insert(PROBLEM_TYPE, HeaderValue::from_static(self.type_uri));
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        res
    }

    /// Renders the response as an `application/problem+json` document.
    pub fn into_response(self) -> Response<Bytes> {
        let mut body = serde_json::json!({
            "type": self.type_uri,
            "title": self.title,
            "status": self.status.as_u16(),
        });
        if let (Some(detail), Some(map)) = (self.detail, body.as_object_mut()) {
            map.insert("detail".to_owned(), detail.into());
        }
        let bytes = Bytes::from(body.to_string());
        let mut res = Response::new(bytes);
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        res
    }
}

/// Whole seconds for `Retry-After`: rounded up and at least 1, so that a client never
/// retries immediately into the same rejection.
pub fn retry_after_seconds(after: Duration) -> u64 {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(60)), 60);
    }

    #[test]
    fn detail_is_json_escaped() {
        let res = Problem::new(StatusCode::BAD_REQUEST, types::KEY_INVALID, "Invalid key")
            .detail("quote \" and \n newline")
            .into_response();
        let json: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(json["detail"], "quote \" and \n newline");
    }

    #[test]
    fn grpc_rejections_are_trailers_only_with_mapped_status() {
        let res = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            types::QUOTA_EXCEEDED,
            "Quota",
        )
        .detail("über\nlimit")
        .header(
            HeaderName::from_static("ratelimit"),
            HeaderValue::from_static("\"q\";r=0;t=5"),
        )
        .into_response_for(Protocol::Grpc);
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["grpc-message"], "Quota: %C3%BCber%0Alimit");
        assert_eq!(res.headers()["ratelimit"], "\"q\";r=0;t=5");
        assert!(res.body().is_empty());

        let res = Problem::store_unavailable().into_response_for(Protocol::Grpc);
        assert_eq!(res.headers()["grpc-status"], "14");
        assert_eq!(
            res.headers()["grpc-message"],
            "Coordination store unavailable"
        );
        let http = Problem::store_unavailable().into_response_for(Protocol::Http);
        assert_eq!(http.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http.headers()["content-type"], "application/problem+json");
    }
}

//! The upstream: a pooled HTTP/1.1 or h2c client that forwards a request as a reverse
//! proxy does (`X-Forwarded-For` and `Forwarded` appended; what the client sent was
//! sanitized at [ingress](crate::ingress), before any layer ran) and
//! fails with a [`ProxyError`] when no response arrives, so that layers see "outcome
//! unknown" rather than a response. Response trailers (gRPC's `grpc-status`) pass through.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keyward_core::grpc::Protocol;
use keyward_core::problem::types;
use keyward_core::{PeerAddr, Problem};
use tower::Service;

use crate::config::UpstreamProtocol;
use crate::ingress::{AcceptsTrailers, remove_hop_by_hop};

/// No response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream unreachable: {0}")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream response body failed: {0}")]
    Body(#[source] hyper::Error),
    #[error("cannot build the upstream request: {0}")]
    BadRequest(String),
}

impl ProxyError {
    /// The problem response a client gets for this error: problem+json, or a gRPC
    /// status (UNAVAILABLE, DEADLINE_EXCEEDED, ...) when the client speaks gRPC.
    pub fn into_response(self, protocol: Protocol) -> Response<Body> {
        let problem = match &self {
            ProxyError::Unreachable(_) | ProxyError::Body(_) => Problem::new(
                StatusCode::BAD_GATEWAY,
                types::UPSTREAM_UNREACHABLE,
                "Upstream unreachable",
            ),
            ProxyError::Timeout(after) => Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                types::UPSTREAM_TIMEOUT,
                "Upstream timeout",
            )
            .detail(format!("no response within {} ms", after.as_millis())),
            ProxyError::BadRequest(_) => Problem::new(
                StatusCode::BAD_REQUEST,
                types::BODY_UNREADABLE,
                "Request cannot be forwarded",
            ),
        };
        problem.into_response_for(protocol).map(Body::from)
    }
}

/// Responses up to this size (with a Content-Length) are read whole before answering.
const SMALL_RESPONSE: u64 = 16 * 1024;

/// The upstream service.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    base: Uri,
    timeout: Duration,
    protocol: UpstreamProtocol,
}

impl Upstream {
    pub fn new(base: Uri, timeout: Duration, protocol: UpstreamProtocol) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256);
        if protocol == UpstreamProtocol::H2c {
            // Prior knowledge: one multiplexed connection, no Upgrade dance.
            builder.http2_only(true);
        }
        Upstream {
            client: builder.build(connector),
            base,
            timeout,
            protocol,
        }
    }

    fn upstream_uri(&self, uri: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(
            path_and_query
                .parse()
                .map_err(|_| ProxyError::BadRequest("bad path".into()))?,
        );
        Uri::from_parts(parts).map_err(|err| ProxyError::BadRequest(err.to_string()))
    }
}

impl Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let uri = self.upstream_uri(&parts.uri);
        let client = self.client.clone();
        let timeout = self.timeout;
        // Taken here, inside the caller's span: the boxed future runs in no span of its
        // own. Empty unless OTLP export is on.
        let mut trace_context = HeaderMap::new();
        crate::telemetry::inject_current(&mut trace_context);
        let protocol = self.protocol;
        Box::pin(async move {
            parts.uri = uri?;
            let peer = parts.extensions.get::<PeerAddr>().map(|p| p.0);
            // Only h2c forwards `TE: trailers` (ingress removed the client's own).
            let forward_te = protocol == UpstreamProtocol::H2c
                && parts.extensions.get::<AcceptsTrailers>().is_some();
            append_forwarded(&mut parts.headers, peer);
            parts.headers.extend(trace_context);
            parts.version = match protocol {
                UpstreamProtocol::Http1 => http::Version::HTTP_11,
                UpstreamProtocol::H2c => http::Version::HTTP_2,
            };
            if forward_te {
                // The one TE value HTTP/2 allows; gRPC servers require it.
                parts
                    .headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            let req = Request::from_parts(parts, body);
            let res = match tokio::time::timeout(timeout, client.request(req)).await {
                Err(_) => return Err(ProxyError::Timeout(timeout)),
                Ok(Err(err)) => return Err(ProxyError::Unreachable(err)),
                Ok(Ok(res)) => res,
            };
            let (mut parts, body) = res.into_parts();
            remove_hop_by_hop(&mut parts.headers);
            // A small response of known length is read whole: the upstream connection goes
            // back to the pool at once, and the client gets headers and body in one write
            // instead of a hand-off between tasks per frame. Larger ones stream.
            if body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= SMALL_RESPONSE)
            {
                let collected = body.collect().await.map_err(ProxyError::Body)?;
                if collected.trailers().is_some() {
                    return Ok(Response::from_parts(parts, Body::new(collected)));
                }
                return Ok(Response::from_parts(
                    parts,
                    Body::from(collected.to_bytes()),
                ));
            }
            Ok(Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded` (RFC 7239).
pub fn append_forwarded(headers: &mut HeaderMap, peer: Option<SocketAddr>) {
    let Some(peer) = peer else { return };
    let ip = peer.ip();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", value);
    }
    let node = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let mut element = format!("for={node};proto=http");
    // The client writes Host: only a plain authority goes into the quoted string, so no
    // quote, backslash, `,` or `;` can end the element and start another one.
    if let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) {
        if is_plain_authority(host) {
            element.push_str(&format!(";host=\"{host}\""));
        }
    }
    if let Ok(value) = HeaderValue::from_str(&element) {
        headers.append(header::FORWARDED, value);
    }
}

/// A host name or address with an optional port: letters, digits, `-`, `.`, `_`, `:`,
/// and `[` `]` around an IPv6 address.
fn is_plain_authority(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'[' | b']')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_are_appended() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        headers.insert("host", "api.example".parse().unwrap());
        append_forwarded(&mut headers, Some("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(headers["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(
            headers["forwarded"],
            "for=127.0.0.1;proto=http;host=\"api.example\""
        );
        let mut v6 = HeaderMap::new();
        append_forwarded(&mut v6, Some("[::1]:5000".parse().unwrap()));
        assert_eq!(v6["forwarded"], "for=\"[::1]\";proto=http");
    }

    #[test]
    fn a_host_that_is_not_a_plain_authority_is_left_out_of_forwarded() {
        for host in [
            "a\",for=6.6.6.6;host=\"b",
            "a\\\"b",
            "a,b",
            "a;b",
            "a b",
            "",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("host", HeaderValue::from_str(host).unwrap());
            append_forwarded(&mut headers, Some("127.0.0.1:5000".parse().unwrap()));
            assert_eq!(headers["forwarded"], "for=127.0.0.1;proto=http", "{host}");
        }
        let mut headers = HeaderMap::new();
        headers.insert("host", "[::1]:8080".parse().unwrap());
        append_forwarded(&mut headers, Some("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(
            headers["forwarded"],
            "for=127.0.0.1;proto=http;host=\"[::1]:8080\""
        );
    }
}

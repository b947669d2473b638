//! The upstream: a pooled HTTP/1.1 or h2c client that forwards a request as a reverse
//! proxy does (`X-Forwarded-For` and `Forwarded` appended; what the client sent was
//! sanitized at [ingress](crate::ingress), before any layer ran) and
//! fails with a [`ProxyError`] when no response arrives, so that layers see "outcome
//! unknown" rather than a response. Response trailers (gRPC's `grpc-status`) pass through.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use keyward_core::grpc::Protocol;
use keyward_core::problem::types;
use keyward_core::{PeerAddr, Problem};
use thread_local::ThreadLocal;
use tower::Service;

use crate::config::UpstreamProtocol;
use crate::ingress::{AcceptsTrailers, remove_hop_by_hop};
use crate::pool::{self, Http1Pool};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream unreachable: {0}")]
    Unreachable(#[source] BoxError),
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

/// The upstream service. Connections belong to the worker thread a request arrived on
/// (see [`crate::pool`]): HTTP/1.1 through the thread's [`Http1Pool`], h2c through the
/// thread's own multiplexing client, whose connection tasks run on that thread too.
/// Idle connections are bounded per thread (`upstream_keepalive`, like nginx's
/// `keepalive` per worker); a client that is idle holds no upstream connection.
#[derive(Clone, Debug)]
pub struct Upstream(Arc<UpstreamInner>);

/// One `Arc` for all of it: every request clones its route's stack, and so this.
#[derive(Debug)]
struct UpstreamInner {
    client: UpstreamClient,
    base: Uri,
    timeout: Duration,
}

#[derive(Clone, Debug)]
enum UpstreamClient {
    Http1(Arc<Http1Pool>),
    H2c(Arc<ThreadLocal<Client<HttpConnector, Body>>>),
}

impl Upstream {
    pub fn new(base: Uri, timeout: Duration, protocol: UpstreamProtocol, keepalive: usize) -> Self {
        let client = match protocol {
            UpstreamProtocol::Http1 => {
                let host = base.host().unwrap_or("127.0.0.1");
                let port = base.port_u16().unwrap_or(80);
                UpstreamClient::Http1(Arc::new(Http1Pool::new(host, port, keepalive)))
            }
            UpstreamProtocol::H2c => UpstreamClient::H2c(Arc::new(ThreadLocal::new())),
        };
        Upstream(Arc::new(UpstreamInner {
            client,
            base,
            timeout,
        }))
    }

    /// This thread's h2c client, made on its first request: prior knowledge, one
    /// multiplexed connection, no Upgrade dance.
    fn h2c_client(
        clients: &ThreadLocal<Client<HttpConnector, Body>>,
    ) -> &Client<HttpConnector, Body> {
        clients.get_or(|| {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            connector.set_keepalive(Some(Duration::from_secs(60)));
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(pool::IDLE_TIMEOUT)
                .http2_only(true)
                .build(connector)
        })
    }

    /// The absolute URI the h2c client needs (`:scheme` and `:authority` of the
    /// upstream).
    fn absolute_uri(&self, uri: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut parts = self.0.base.clone().into_parts();
        parts.path_and_query = Some(
            path_and_query
                .parse()
                .map_err(|_| ProxyError::BadRequest("bad path".into()))?,
        );
        Uri::from_parts(parts).map_err(|err| ProxyError::BadRequest(err.to_string()))
    }
}

/// `uri` in origin-form (`/path?query`), as HTTP/1.1 sends it to the upstream.
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
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
        let peer = parts.extensions.get::<PeerAddr>().map(|p| p.0);
        append_forwarded(&mut parts.headers, peer);
        // Taken here, inside the caller's span: the boxed future runs in no span of its
        // own. Nothing happens unless OTLP export is on.
        crate::telemetry::inject_current(&mut parts.headers);
        let timeout = self.0.timeout;
        match &self.0.client {
            UpstreamClient::Http1(pool) => {
                let pool = pool.clone();
                parts.uri = origin_form(std::mem::take(&mut parts.uri));
                parts.version = http::Version::HTTP_11;
                let req = Request::from_parts(parts, body);
                Box::pin(async move {
                    match crate::fifo_timer::timeout(timeout, pool.send(req)).await {
                        Err(_) => Err(ProxyError::Timeout(timeout)),
                        Ok(Err(err)) => Err(ProxyError::Unreachable(err)),
                        Ok(Ok(res)) => respond(res).await,
                    }
                })
            }
            UpstreamClient::H2c(clients) => {
                let uri = self.absolute_uri(&parts.uri);
                let client = Self::h2c_client(clients).clone();
                // `TE: trailers` is the one TE value HTTP/2 allows, and gRPC servers
                // require it (ingress removed the client's own).
                if parts.extensions.get::<AcceptsTrailers>().is_some() {
                    parts
                        .headers
                        .insert(header::TE, HeaderValue::from_static("trailers"));
                }
                parts.version = http::Version::HTTP_2;
                Box::pin(async move {
                    parts.uri = uri?;
                    let req = Request::from_parts(parts, body);
                    match crate::fifo_timer::timeout(timeout, client.request(req)).await {
                        Err(_) => Err(ProxyError::Timeout(timeout)),
                        Ok(Err(err)) => Err(ProxyError::Unreachable(err.into())),
                        Ok(Ok(res)) => respond(res).await,
                    }
                })
            }
        }
    }
}

/// The upstream's response as the client gets it: hop-by-hop headers removed; a small
/// response of known length read whole (its connection goes back to the pool at once,
/// and the client gets headers and body in one write instead of a hand-off per frame),
/// larger ones streamed.
async fn respond<B>(res: Response<B>) -> Result<Response<Body>, ProxyError>
where
    B: http_body::Body<Data = Bytes, Error = hyper::Error> + Send + 'static,
{
    let (mut parts, body) = res.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    if body.size_hint().exact().is_none_or(|n| n > SMALL_RESPONSE) {
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    // Most small bodies come in one frame: taken as it is, without a collecting buffer.
    let mut body = std::pin::pin!(body);
    let first = match body.frame().await {
        None => return Ok(Response::from_parts(parts, Body::empty())),
        Some(frame) => frame.map_err(ProxyError::Body)?,
    };
    let first = match first.into_data() {
        Ok(data) if body.is_end_stream() => {
            return Ok(Response::from_parts(parts, Body::from(data)));
        }
        Ok(data) => data,
        // Trailers and nothing before them (gRPC's trailers-only responses arrive
        // as headers; this is an HTTP/1.1 upstream's empty chunked body with trailers).
        Err(frame) => {
            let trailers = frame.into_trailers().ok();
            return Ok(Response::from_parts(
                parts,
                with_trailers(Bytes::new(), trailers),
            ));
        }
    };
    let rest = body.collect().await.map_err(ProxyError::Body)?;
    let trailers = rest.trailers().cloned();
    let mut whole = bytes::BytesMut::from(first);
    whole.extend_from_slice(&rest.to_bytes());
    Ok(Response::from_parts(
        parts,
        with_trailers(whole.freeze(), trailers),
    ))
}

/// A body of `data`, then `trailers` if there are any.
fn with_trailers(data: Bytes, trailers: Option<HeaderMap>) -> Body {
    match trailers {
        None => Body::from(data),
        Some(trailers) => Body::new(
            http_body_util::Full::new(data).with_trailers(std::future::ready(Some(Ok(trailers)))),
        ),
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded` (RFC 7239). Each value is
/// written once into its own buffer (this runs on every proxied request).
pub fn append_forwarded(headers: &mut HeaderMap, peer: Option<SocketAddr>) {
    let Some(peer) = peer else { return };
    let ip = peer.ip();
    let mut xff = String::with_capacity(48);
    if let Some(existing) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        xff.push_str(existing);
        xff.push_str(", ");
    }
    keyward_core::ip::push_ip(&mut xff, ip);
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
        headers.insert(&X_FORWARDED_FOR, value);
    }
    let mut element = String::with_capacity(64);
    if ip.is_ipv6() {
        element.push_str("for=\"[");
        keyward_core::ip::push_ip(&mut element, ip);
        element.push_str("]\";proto=http");
    } else {
        element.push_str("for=");
        keyward_core::ip::push_ip(&mut element, ip);
        element.push_str(";proto=http");
    }
    // The client writes Host: only a plain authority goes into the quoted string, so no
    // quote, backslash, `,` or `;` can end the element and start another one.
    if let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) {
        if is_plain_authority(host) {
            element.push_str(";host=\"");
            element.push_str(host);
            element.push('"');
        }
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(element)) {
        headers.append(header::FORWARDED, value);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

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

//! The one place that decides what of a client's request keyward believes and forwards.
//! It runs before routing and before any layer:
//!
//! - the path is made [canonical](keyward_core::canon) (or refused with 400): routes,
//!   keys and the upstream all see the same spelling;
//! - hop-by-hop headers and those `Connection` names are removed, and so is every
//!   `Keyward-*` header: keyward's headers towards the upstream (`Keyward-Fencing-Token`)
//!   are keyward's to set, never the client's;
//! - the client address for `peer_ip` keys is the connection's peer, or, when the peer
//!   is a `trusted_proxies` address, what it says in `X-Forwarded-For` / `Forwarded`.
//!
//! [`ReadTimeout`] bounds the gaps in a client's request body.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use keyward_core::canon::{PathError, canonical_path};
use keyward_core::grpc::Protocol;
use keyward_core::problem::types;
use keyward_core::{ClientIp, PeerAddr, Problem};

use crate::config::Cidr;

/// The client said `TE: trailers` (gRPC does); the header itself is hop-by-hop and
/// removed at ingress, the upstream client re-adds it for h2c upstreams.
#[derive(Clone, Copy, Debug)]
pub struct AcceptsTrailers;

/// What ingress needs from the config.
#[derive(Clone, Debug, Default)]
pub struct Ingress {
    pub trusted_proxies: Vec<Cidr>,
}

impl Ingress {
    /// `req` as the layers and the upstream may see it, or the response refusing it.
    pub fn admit(
        &self,
        mut req: Request<Body>,
        peer: SocketAddr,
    ) -> Result<Request<Body>, Refused> {
        canonicalize(&mut req)?;
        let headers = req.headers_mut();
        let trailers = accepts_trailers(headers);
        remove_hop_by_hop(headers);
        remove_keyward_headers(headers);
        let client = self.client_ip(req.headers(), peer.ip());
        let extensions = req.extensions_mut();
        extensions.insert(PeerAddr(peer));
        if let Some(client) = client {
            extensions.insert(ClientIp(client));
        }
        if trailers {
            extensions.insert(AcceptsTrailers);
        }
        Ok(req)
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted_proxies.iter().any(|cidr| cidr.contains(ip))
    }

    /// The client a trusted peer speaks for (nginx `real_ip_recursive on`): walking the
    /// forwarding chain from the nearest hop, the first address that is not a trusted
    /// proxy. `None` (key on the peer itself) if the peer is not trusted or the chain
    /// holds something that is not an address where the client should be.
    fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> Option<IpAddr> {
        if !self.trusted(peer) {
            return None;
        }
        let mut chain = forwarded_for(headers, "x-forwarded-for", xff_entries);
        if chain.is_empty() {
            chain = forwarded_for(headers, header::FORWARDED.as_str(), forwarded_entries);
        }
        let mut client = None;
        for entry in chain.iter().rev() {
            let ip = parse_node(entry)?;
            client = Some(ip);
            if !self.trusted(ip) {
                break;
            }
        }
        client
    }
}

/// A request ingress does not let in.
#[derive(Debug)]
pub struct Refused {
    error: PathError,
    protocol: Protocol,
}

impl Refused {
    /// The 400 problem (or gRPC status) the client gets.
    pub fn into_response(self) -> Response<Body> {
        Problem::new(
            StatusCode::BAD_REQUEST,
            types::PATH_INVALID,
            "Ambiguous request path",
        )
        .detail(self.error.to_string())
        .into_response_for(self.protocol)
        .map(Body::from)
    }
}

/// Rewrites the request's path to its canonical form (the query is kept as sent).
fn canonicalize(req: &mut Request<Body>) -> Result<(), Refused> {
    let path = req.uri().path();
    let canonical = match canonical_path(path) {
        Ok(canonical) if canonical == path => return Ok(()),
        Ok(canonical) => canonical.into_owned(),
        Err(error) => {
            return Err(Refused {
                error,
                protocol: Protocol::of(req.headers()),
            });
        }
    };
    let with_query = match req.uri().query() {
        Some(query) => format!("{canonical}?{query}"),
        None => canonical,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(with_query).ok();
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    Ok(())
}

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Whether the client said it accepts trailers (`TE: trailers`, as gRPC clients do).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Removes the headers that describe one connection, including those `Connection` names.
///
/// This runs twice per proxied request (the request and the response): one pass over the
/// names finds which are there, and a request without any (the common case) is not
/// touched; only the names present are looked up again to be removed.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u16;
    for name in headers.keys() {
        // Their lengths first: most names are none of them, and a length is one load.
        if !hop_by_hop_length(name.as_str().len()) {
            continue;
        }
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // `Connection` (index 0) may name more headers; `keep-alive`, the usual value of an
    // upstream's responses, is removed below anyway.
    if present & 1 != 0 && !names_only_itself(headers) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| !name.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Whether a header name of `len` bytes can be one of [`HOP_BY_HOP`] (checked against
/// the list in a test).
fn hop_by_hop_length(len: usize) -> bool {
    matches!(len, 2 | 7 | 10 | 17 | 18 | 19)
}

/// Whether every `Connection` value is `keep-alive` (what upstreams send with every
/// response): an option that names no header not removed anyway.
fn names_only_itself(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .all(|value| value.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
}

/// Removes every `Keyward-*` header: those keyward sends upstream are its own word.
fn remove_keyward_headers(headers: &mut HeaderMap) {
    let ours = |name: &HeaderName| name.as_str().starts_with("keyward-");
    if !headers.keys().any(ours) {
        return;
    }
    let ours: Vec<HeaderName> = headers.keys().filter(|name| ours(name)).cloned().collect();
    for name in ours {
        headers.remove(name);
    }
}

fn forwarded_for(headers: &HeaderMap, name: &str, entries: fn(&str) -> Vec<String>) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(entries)
        .collect()
}

fn xff_entries(value: &str) -> Vec<String> {
    value.split(',').map(|e| e.trim().to_owned()).collect()
}

/// The `for=` nodes of a `Forwarded` value (RFC 7239), one per element.
fn forwarded_entries(value: &str) -> Vec<String> {
    value
        .split(',')
        .filter_map(|element| {
            element.split(';').find_map(|pair| {
                let (name, node) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| node.trim().trim_matches('"').to_owned())
            })
        })
        .collect()
}

/// An address in a forwarding header: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:80`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    node.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// The response for a request whose body stopped arriving: 408, connection closed.
pub fn body_timeout_response(protocol: Protocol, timeout: Duration, http1: bool) -> Response<Body> {
    let mut res = Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        types::BODY_TIMEOUT,
        "Request body timeout",
    )
    .detail(format!(
        "no part of the request body arrived for {} ms",
        timeout.as_millis()
    ))
    .into_response_for(protocol)
    .map(Body::from);
    if http1 {
        res.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    res
}

/// The client's body, failing when no frame arrives for `timeout` while someone waits
/// for one (nginx `client_body_timeout`). The clock runs only while the body is polled,
/// so a layer that has not started reading does not count against the client.
pub struct ReadTimeout<B = Body> {
    inner: B,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl<B> ReadTimeout<B> {
    /// `body` bounded by `timeout`; `timed_out` is set when it fires.
    pub fn new(body: B, timeout: Duration, timed_out: Arc<AtomicBool>) -> Self {
        ReadTimeout {
            inner: body,
            timeout,
            sleep: None,
            timed_out,
        }
    }
}

/// The error a [`ReadTimeout`] body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no part of the request body arrived for {0:?}")]
pub struct BodyReadTimedOut(Duration);

impl<B> http_body::Body for ReadTimeout<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.sleep = None;
            return Poll::Ready(frame.map(|frame| frame.map_err(axum::Error::new)));
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(sleep.as_mut().poll(cx));
        this.sleep = None;
        this.timed_out.store(true, Ordering::Release);
        Poll::Ready(Some(Err(axum::Error::new(BodyReadTimedOut(timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn every_hop_by_hop_name_passes_the_length_filter() {
        for name in &HOP_BY_HOP {
            assert!(hop_by_hop_length(name.as_str().len()), "{name}");
        }
    }

    fn ingress(trusted: &[&str]) -> Ingress {
        Ingress {
            trusted_proxies: trusted.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 4000)
    }

    fn admitted(ingress: &Ingress, req: http::request::Builder, from: &str) -> Request<Body> {
        ingress
            .admit(req.body(Body::empty()).unwrap(), peer(from))
            .unwrap()
    }

    #[test]
    fn hop_by_hop_connection_named_and_keyward_headers_are_removed() {
        let req = Request::get("/")
            .header("connection", "close, x-secret, keyward-fencing-token")
            .header("x-secret", "1")
            .header("transfer-encoding", "chunked")
            .header("keyward-fencing-token", "18446744073709551615")
            .header("Keyward-Anything", "1")
            .header("te", "trailers")
            .header("x-kept", "1");
        let req = admitted(&Ingress::default(), req, "127.0.0.1");
        assert_eq!(
            req.headers().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-kept"]
        );
        assert!(req.extensions().get::<AcceptsTrailers>().is_some());
        assert!(req.extensions().get::<ClientIp>().is_none());
    }

    #[test]
    fn the_path_is_canonical_and_the_query_kept() {
        let req = admitted(
            &Ingress::default(),
            Request::post("/a//%62/./c/?x=%31&y"),
            "127.0.0.1",
        );
        assert_eq!(req.uri(), "/a/b/c?x=%31&y");
        let refused = Ingress::default()
            .admit(
                Request::get("/a%2Fb").body(Body::empty()).unwrap(),
                peer("127.0.0.1"),
            )
            .unwrap_err()
            .into_response();
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn forwarded_for_counts_only_from_trusted_peers_rightmost_untrusted_first() {
        let trusted = ingress(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let client = |from: &str, name: &str, value: &str| {
            let req = admitted(&trusted, Request::get("/").header(name, value), from);
            req.extensions().get::<ClientIp>().map(|c| c.0.to_string())
        };
        let xff = "x-forwarded-for";
        assert_eq!(client("192.0.2.9", xff, "1.1.1.1"), None);
        assert_eq!(
            client("10.1.1.1", xff, "1.1.1.1").as_deref(),
            Some("1.1.1.1")
        );
        assert_eq!(
            client("10.1.1.1", xff, "6.6.6.6, 1.1.1.1, 10.2.2.2").as_deref(),
            Some("1.1.1.1")
        );
        assert_eq!(
            client("10.1.1.1", xff, "10.3.3.3, 10.2.2.2").as_deref(),
            Some("10.3.3.3")
        );
        assert_eq!(
            client("10.1.1.1", xff, "garbage, 1.1.1.1").as_deref(),
            Some("1.1.1.1")
        );
        assert_eq!(client("10.1.1.1", xff, "1.1.1.1, garbage"), None);
        assert_eq!(
            client("::ffff:10.1.1.1", xff, "[2001:db8::1]:99").as_deref(),
            Some("2001:db8::1")
        );
        let fwd = "forwarded";
        assert_eq!(
            client(
                "2001:db8:ffff::1",
                fwd,
                "for=6.6.6.6, for=\"[2001:db8::7]:80\";proto=https"
            )
            .as_deref(),
            Some("2001:db8::7")
        );
        assert_eq!(client("10.1.1.1", fwd, "for=unknown"), None);
    }

    /// A body whose frames come from a channel.
    struct Channel(tokio::sync::mpsc::Receiver<Bytes>);

    impl http_body::Body for Channel {
        type Data = Bytes;
        type Error = axum::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|data| Ok(http_body::Frame::data(data))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_fails_after_the_timeout_and_says_so() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let flag = Arc::new(AtomicBool::new(false));
        let mut timed = ReadTimeout::new(
            Body::new(Channel(rx)),
            Duration::from_secs(60),
            flag.clone(),
        );
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert_eq!(
            timed.frame().await.unwrap().unwrap().into_data().unwrap(),
            "a"
        );
        // 59 s of silence, a frame, then silence: the clock restarts with each frame.
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(59)).await;
            tx.send(Bytes::from_static(b"b")).await.unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        assert_eq!(
            timed.frame().await.unwrap().unwrap().into_data().unwrap(),
            "b"
        );
        assert!(!flag.load(Ordering::Acquire));
        let started = tokio::time::Instant::now();
        let err = timed.frame().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        assert!(
            err.to_string().contains("no part of the request body"),
            "{err}"
        );
        assert!(flag.load(Ordering::Acquire));
        feeder.abort();
    }
}

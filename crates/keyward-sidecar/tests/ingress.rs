//! What a hostile client controls at ingress, against the `keyward` binary: the spelling
//! of the path, keyward's own headers, `Connection`, `Host`, `X-Forwarded-For`, and how
//! slowly it sends or reads. None of it may bypass, forge or pin what keyward coordinates.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::{Sidecar, Upstream, client, send};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ACCOUNTS: &str = r#"
[[routes]]
name = "accounts"
methods = ["POST"]
path = "/accounts/{id}"

[routes.serial]
key = "path:id"
max_wait = "10s"
"#;

/// Two requests at once, each held 300 ms by the upstream: the upstream sees both on
/// `expect_path`, one after the other.
async fn assert_serialized(sidecar: &Sidecar, upstream: &Upstream, a: &str, b: &str) {
    let http = client();
    upstream.seen.max_total_in_flight.store(0, Ordering::SeqCst);
    let (ua, ub) = (
        sidecar.url(&format!("{a}?delay_ms=300")),
        sidecar.url(&format!("{b}?delay_ms=300")),
    );
    let (ra, rb) = tokio::join!(
        send(&http, "POST", &ua, &[], ""),
        send(&http, "POST", &ub, &[], "")
    );
    assert_eq!(
        (ra.status.as_u16(), rb.status.as_u16()),
        (200, 200),
        "{a} / {b}: {rb:?}"
    );
    assert_eq!(
        upstream.seen.max_total_in_flight.load(Ordering::SeqCst),
        1,
        "{a} and {b} ran side by side: two spellings, two serial keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_serial_path_shares_its_key_and_reaches_the_upstream_canonical() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ACCOUNTS).await;
    for spelling in [
        "/accounts/%34%32",
        "//accounts/42",
        "/accounts//42",
        "/accounts/./42",
        "/other/../accounts/42",
        "/accounts/%2E/42",
        "/accounts/42/",
    ] {
        assert_serialized(&sidecar, &upstream, "/accounts/42", spelling).await;
    }
    // Hex case and encoded vs. raw sub-delimiters are one key too.
    assert_serialized(&sidecar, &upstream, "/accounts/%C3%A9", "/accounts/%c3%a9").await;
    assert_serialized(&sidecar, &upstream, "/accounts/a!b", "/accounts/a%21b").await;
    // What the upstream saw is the canonical form, so it acts on what was coordinated.
    let by_path = upstream.seen.by_path.lock().unwrap().clone();
    assert_eq!(by_path.get("/accounts/42"), Some(&14), "{by_path:?}");
    assert_eq!(by_path.get("/accounts/%C3%A9"), Some(&2), "{by_path:?}");
    assert_eq!(by_path.get("/accounts/a!b"), Some(&2), "{by_path:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_and_repeated_query_keys_are_refused_with_400() {
    let upstream = Upstream::start().await;
    let routes = format!(
        "{ACCOUNTS}\n[[routes]]\nname = \"search\"\npath = \"/search\"\n\n[routes.serial]\nkey = \"query:account\"\n"
    );
    let sidecar = Sidecar::start(upstream.addr, &routes).await;
    let http = client();
    for path in [
        "/accounts/4%2F2",
        "/accounts/4%2f2",
        "/accounts/4%5C2",
        "/accounts/%zz",
        "/accounts/4%00",
        "/search?account=1&account=2",
        "/search?account=1&%61ccount=2",
    ] {
        let res = send(&http, "POST", &sidecar.url(path), &[], "").await;
        assert_eq!(res.status, 400, "{path}: {res:?}");
        assert_eq!(
            res.header("content-type"),
            Some("application/problem+json"),
            "{path}"
        );
    }
    assert_eq!(
        upstream.hits(),
        0,
        "an ambiguous request reached the upstream"
    );
    // Spellings of one query value are one key: `+` is a space, as in forms.
    upstream.seen.max_total_in_flight.store(0, Ordering::SeqCst);
    let (ua, ub) = (
        sidecar.url("/search?account=a+b&delay_ms=300"),
        sidecar.url("/search?delay_ms=300&account=a%20b"),
    );
    let (a, b) = tokio::join!(
        send(&http, "POST", &ua, &[], ""),
        send(&http, "POST", &ub, &[], "")
    );
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    assert_eq!(upstream.seen.max_total_in_flight.load(Ordering::SeqCst), 1);
}

const FENCING: &str = "keyward-fencing-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_forge_or_strip_the_fencing_token() {
    let upstream = Upstream::start().await;
    let routes = format!(
        "{ACCOUNTS}\n[[routes]]\nname = \"plain\"\npath = \"/plain\"\n\n[routes.quota]\nlimit = 100\nper = \"1m\"\n"
    );
    let sidecar = Sidecar::start(upstream.addr, &routes).await;
    let http = client();
    let forged = [(FENCING, "18446744073709551615"), ("keyward-other", "x")];
    for path in ["/plain", "/unmatched", "/accounts/7"] {
        let res = send(&http, "POST", &sidecar.url(path), &forged, "").await;
        assert_eq!(res.status, 200, "{path}");
    }
    // `Connection` naming keyward's header must not remove the real token.
    let res = send(
        &http,
        "POST",
        &sidecar.url("/accounts/8"),
        &[("connection", "keep-alive, keyward-fencing-token")],
        "",
    )
    .await;
    assert_eq!(res.status, 200);
    let seen = upstream.seen.headers.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    for (i, headers) in seen.iter().enumerate() {
        let tokens: Vec<_> = headers.get_all(FENCING).iter().collect();
        assert!(headers.get("keyward-other").is_none(), "request {i}");
        assert!(
            tokens.iter().all(|t| *t != "18446744073709551615"),
            "request {i}: the forged token reached the upstream: {headers:?}"
        );
        // Routes with a serial layer get exactly the token it issued; others none.
        let expected = usize::from(i >= 2);
        assert_eq!(tokens.len(), expected, "request {i}: {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_header_cannot_inject_a_forwarded_element() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, "").await;
    let http = client();
    let res = send(
        &http,
        "GET",
        &sidecar.url("/x"),
        &[("host", "a\",for=6.6.6.6;host=\"b")],
        "",
    )
    .await;
    assert_eq!(res.status, 200);
    let res = send(
        &http,
        "GET",
        &sidecar.url("/x"),
        &[("host", "api.example:80")],
        "",
    )
    .await;
    assert_eq!(res.status, 200);
    let seen = upstream.seen.headers.lock().unwrap().clone();
    let forwarded: Vec<&str> = seen
        .iter()
        .map(|h| h.get("forwarded").unwrap().to_str().unwrap())
        .collect();
    assert!(!forwarded[0].contains("6.6.6.6"), "{}", forwarded[0]);
    assert_eq!(forwarded[0].matches("for=").count(), 1, "{}", forwarded[0]);
    assert_eq!(
        forwarded[1],
        "for=127.0.0.1;proto=http;host=\"api.example:80\""
    );
}

const PER_CLIENT: &str = r#"
[[routes]]
name = "per-client"
path = "/limited"

[routes.quota]
key = "peer_ip"
limit = 1
per = "1h"
"#;

async fn status_from(sidecar: &Sidecar, xff: &str) -> u16 {
    let res = send(
        &client(),
        "GET",
        &sidecar.url("/limited"),
        &[("x-forwarded-for", xff)],
        "",
    )
    .await;
    res.status.as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies_and_ipv6_keys_on_its_64() {
    let upstream = Upstream::start().await;
    // The test client connects from 127.0.0.1: a trusted proxy here.
    let trusted = Sidecar::start_with_server(
        upstream.addr,
        "trusted_proxies = [\"127.0.0.0/8\", \"10.0.0.0/8\"]",
        PER_CLIENT,
    )
    .await;
    assert_eq!(status_from(&trusted, "203.0.113.7").await, 200);
    assert_eq!(status_from(&trusted, "203.0.113.8").await, 200);
    assert_eq!(status_from(&trusted, "203.0.113.7").await, 429);
    // The rightmost address no trusted proxy owns is the client: a spoofed first
    // element does not buy a fresh key.
    assert_eq!(
        status_from(&trusted, "1.2.3.4, 203.0.113.7, 10.0.0.9").await,
        429
    );
    // One /64 is one client: 2^64 addresses, one quota.
    assert_eq!(status_from(&trusted, "2001:db8:0:1::1").await, 200);
    assert_eq!(status_from(&trusted, "2001:db8:0:1::2").await, 429);
    assert_eq!(status_from(&trusted, "2001:db8:0:1:ffff::1").await, 429);
    assert_eq!(status_from(&trusted, "2001:db8:0:2::1").await, 200);

    // Without trusted proxies, the header is the client's word: ignored for keys.
    let untrusted = Sidecar::start(upstream.addr, PER_CLIENT).await;
    assert_eq!(status_from(&untrusted, "203.0.113.7").await, 200);
    assert_eq!(status_from(&untrusted, "203.0.113.8").await, 429);
}

const SLOW: &str = r#"
[[routes]]
name = "accounts"
path = "/accounts/{id}"

[routes.serial]
key = "path:id"
max_wait = "10s"
"#;

/// A request on the key that must get its turn although another client holds it in a
/// slow connection: it is served within `within`.
async fn assert_key_freed(sidecar: &Sidecar, within: Duration) {
    let started = Instant::now();
    let res = send(&client(), "POST", &sidecar.url("/accounts/1"), &[], "hi").await;
    assert_eq!(res.status, 200, "{res:?}");
    assert!(
        started.elapsed() < within,
        "the key was held for {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dripped_body_gets_408_and_releases_the_serial_key() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start_with_server(
        upstream.addr,
        // The upstream's deadline must not be what frees the key.
        "body_read_timeout = \"500ms\"\nrequest_timeout = \"30s\"",
        SLOW,
    )
    .await;
    let mut stream = TcpStream::connect(sidecar.addr).await.unwrap();
    stream
        .write_all(b"POST /accounts/1 HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    // The dripping client holds the key once the upstream has begun reading its body.
    upstream.wait_for_hits(1).await;
    assert_key_freed(&sidecar, Duration::from_secs(5)).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the dripping connection is still open");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request-body-timeout"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_response_loses_the_connection_and_the_key() {
    let upstream = Upstream::start().await;
    let sidecar =
        Sidecar::start_with_server(upstream.addr, "idle_write_timeout = \"500ms\"", SLOW).await;
    let mut stream = TcpStream::connect(sidecar.addr).await.unwrap();
    // 64 MiB: more than every socket buffer between the sidecar and this client holds.
    stream
        .write_all(
            b"POST /accounts/1?size=67108864 HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
        )
        .await
        .unwrap();
    upstream.wait_for_hits(1).await;
    assert_key_freed(&sidecar, Duration::from_secs(6)).await;
    drop(stream);
}

//! `upstream_protocol = "h2c"`: the sidecar speaks HTTP/2 with prior knowledge to its
//! upstream, forwards `TE: trailers`, and response trailers (gRPC's `grpc-status`) reach
//! the client, through the layers and without them.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::Sidecar;

/// What the HTTP/2-only upstream saw of each request: its version and its `te` header.
type Seen = Arc<Mutex<Vec<(Version, Option<String>)>>>;

/// An upstream that speaks only HTTP/2 (prior knowledge) and answers with a body and
/// gRPC-style trailers.
async fn h2_only_upstream() -> (SocketAddr, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let seen_by_server = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let seen = seen_by_server.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let te = req
                        .headers()
                        .get("te")
                        .map(|v| v.to_str().unwrap().to_owned());
                    seen.lock().unwrap().push((req.version(), te));
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let body = Full::new(Bytes::from_static(b"reply"))
                        .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) });
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upstream_gets_http2_and_trailers_reach_the_client() {
    let (upstream, seen) = h2_only_upstream().await;
    let sidecar = Sidecar::start_with_server(
        upstream,
        "upstream_protocol = \"h2c\"",
        r#"
[[routes]]
name = "orders"
path = "/orders.Orders/{method}"

[routes.quota]
key = "header:x-api-key"
limit = 100
per = "1m"
"#,
    )
    .await;
    // A gRPC-like client: HTTP/2 prior knowledge to the sidecar, `te: trailers`.
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    for path in ["/orders.Orders/Create", "/unrouted"] {
        let req = Request::post(sidecar.url(path))
            .header("te", "trailers")
            .header("x-api-key", "k1")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"request")))
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let collected = res.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), "reply", "{path}");
        assert_eq!(
            trailers
                .as_ref()
                .and_then(|t| t.get("grpc-status"))
                .unwrap(),
            "0",
            "{path}: trailers lost"
        );
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (version, te) in seen {
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(te.as_deref(), Some("trailers"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_upstream_is_the_default_and_te_is_not_forwarded() {
    let upstream = support::Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, "").await;
    let reply = support::send(
        &support::client(),
        "GET",
        &sidecar.url("/plain"),
        &[("te", "trailers")],
        "",
    )
    .await;
    assert_eq!(reply.status, 200);
    let headers = upstream.seen.headers.lock().unwrap().clone();
    assert_eq!(headers.len(), 1);
    assert!(headers[0].get("te").is_none(), "{:?}", headers[0]);
}

/// A gRPC caller gets gRPC statuses, not problem+json, for the sidecar's own answers: a
/// layer's rejection (no idempotency key: INVALID_ARGUMENT) and an unreachable upstream
/// (UNAVAILABLE), both as trailers-only responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_get_grpc_statuses_from_the_sidecar() {
    let closed: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let sidecar = Sidecar::start_with_server(
        closed,
        "upstream_protocol = \"h2c\"",
        r#"
[[routes]]
name = "orders"
path = "/orders.Orders/CreateOrder"

[routes.idempotency]
required = true
scope = "none"
"#,
    )
    .await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let cases = [
        (
            "/orders.Orders/CreateOrder",
            None,
            "3",
            "idempotency-key-missing",
        ),
        (
            "/orders.Orders/CreateOrder",
            Some("k-1"),
            "14",
            "upstream-unreachable",
        ),
        ("/orders.Orders/Other", None, "14", "upstream-unreachable"),
    ];
    for (path, key, code, problem) in cases {
        let mut req = Request::post(sidecar.url(path))
            .header("te", "trailers")
            .header("content-type", "application/grpc");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let res = client
            .request(
                req.body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                    .unwrap(),
            )
            .await
            .unwrap();
        let what = format!("{path} key={key:?}: {:?}", res.headers());
        assert_eq!(res.status(), 200, "{what}");
        assert_eq!(res.headers()["content-type"], "application/grpc", "{what}");
        assert_eq!(res.headers()["grpc-status"], code, "{what}");
        let problem_type = res.headers()["keyward-problem-type"].to_str().unwrap();
        assert!(problem_type.ends_with(problem), "{what}");
    }
}

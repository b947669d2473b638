//! The proxy core, black-box: workers own their upstream connections, idle clients hold
//! none, idle upstream connections are bounded per worker, and the listening port is
//! the sidecar's alone.
#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use support::{Sidecar, binary, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 upstream that counts the connections it accepted and those still open,
/// answering `ok` after `?delay_ms=` (real time: only for a handful of requests).
#[derive(Clone, Default)]
struct Counting {
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl Counting {
    async fn start() -> (Counting, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counting = Counting::default();
        let seen = counting.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                seen.open.fetch_add(1, Ordering::SeqCst);
                let open = seen.open.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: http::Request<_>| async move {
                        let delay = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("delay_ms="))
                            .and_then(|ms| ms.parse().ok())
                            .unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (counting, addr)
    }
}

/// One `GET path` on `stream` (kept alive), returning the status line.
async fn get(stream: &mut TcpStream, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0; 1024];
    // The upstream's answer is 2 bytes with a Content-Length: read to the end of it.
    while !response.ends_with(b"\r\n\r\nok") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "the sidecar closed the connection: {response:?}");
        response.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_hundred_idle_clients_hold_no_upstream_connection() {
    let (upstream, addr) = Counting::start().await;
    let sidecar = Sidecar::start_with_server(addr, "workers = 2", "").await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut stream = TcpStream::connect(sidecar.addr).await.unwrap();
        assert_eq!(get(&mut stream, "/").await, "HTTP/1.1 200 OK");
        // Kept open and idle.
        clients.push(stream);
    }
    // One request at a time: each reused its worker's connection, which went back to
    // the worker's pool when the response ended.
    let accepted = upstream.accepted.load(Ordering::SeqCst);
    assert!(
        accepted <= 2,
        "100 sequential requests from 100 idle clients opened {accepted} upstream connections"
    );
    drop(clients);
}

#[tokio::test]
async fn idle_upstream_connections_are_bounded_per_worker() {
    let (upstream, addr) = Counting::start().await;
    let sidecar = Sidecar::start_with_server(addr, "workers = 1\nupstream_keepalive = 2", "").await;
    // Eight requests at once on eight client connections: eight upstream connections.
    let mut streams = Vec::new();
    for _ in 0..8 {
        streams.push(TcpStream::connect(sidecar.addr).await.unwrap());
    }
    let (_streams, answers) = get_all(streams, "/slow?delay_ms=300").await;
    assert!(
        answers.iter().all(|status| status == "HTTP/1.1 200 OK"),
        "{answers:?}"
    );
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 8);
    // Once they are idle, the worker keeps two and closes the rest (bounded wait: the
    // upstream notices the closes asynchronously).
    for _ in 0..200 {
        if upstream.open.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.open.load(Ordering::SeqCst), 2);
}

/// `GET path` on every stream at once; the streams come back with their statuses.
async fn get_all(streams: Vec<TcpStream>, path: &str) -> (Vec<TcpStream>, Vec<String>) {
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let path = path.to_owned();
            tokio::spawn(async move {
                let status = get(&mut stream, &path).await;
                (stream, status)
            })
        })
        .collect();
    let mut streams = Vec::new();
    let mut statuses = Vec::new();
    for task in tasks {
        let (stream, status) = task.await.unwrap();
        streams.push(stream);
        statuses.push(status);
    }
    (streams, statuses)
}

#[tokio::test]
async fn a_port_another_sidecar_holds_is_refused() {
    let (_upstream, addr) = Counting::start().await;
    let first = Sidecar::start(addr, "").await;
    let dir = std::env::temp_dir().join(format!("keyward-port-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("second.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"{}\"\nupstream = \"http://{addr}\"\nadmin = \"127.0.0.1:{}\"\n",
            first.addr,
            free_port()
        ),
    )
    .unwrap();
    // Both would set SO_REUSEPORT: without the probe the second would silently take
    // half of the first one's connections.
    let output = tokio::process::Command::new(binary())
        .args(["serve", "-c"])
        .arg(&config)
        .env("KEYWARD_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(15), output)
        .await
        .expect("a second sidecar on a taken port must exit, not serve")
        .unwrap();
    assert!(!output.status.success());
    let logged = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(logged.contains("cannot listen"), "{logged}");
    std::fs::remove_dir_all(&dir).unwrap();
}

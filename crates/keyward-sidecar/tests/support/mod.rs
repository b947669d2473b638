//! Black-box kit: a counting upstream, the built `keyward` binary as a process, and a
//! small HTTP client. Everything listens on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::IntoResponse;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub mod openmetrics;
pub mod prometheus;

/// What the upstream saw.
#[derive(Default)]
pub struct Seen {
    pub hits: AtomicUsize,
    pub by_path: Mutex<HashMap<String, usize>>,
    pub headers: Mutex<Vec<HeaderMap>>,
    pub in_flight: Mutex<HashMap<String, usize>>,
    pub max_in_flight: Mutex<HashMap<String, usize>>,
    /// Requests inside the handler right now and at most, over all paths.
    pub total_in_flight: AtomicUsize,
    pub max_total_in_flight: AtomicUsize,
    /// The gates `?hold=NAME` requests wait at.
    pub gates: Mutex<HashMap<String, Arc<Gate>>>,
}

impl Seen {
    fn gate(&self, name: &str) -> Arc<Gate> {
        self.gates
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Gate::default()))
            .clone()
    }
}

/// Where `?hold=NAME` requests wait, inside the upstream, until the test opens it: a
/// request held for exactly as long as a test needs, without sleeps.
pub struct Gate {
    arrived: tokio::sync::watch::Sender<usize>,
    open: tokio::sync::watch::Sender<bool>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            arrived: tokio::sync::watch::Sender::new(0),
            open: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Gate {
    /// Waits (bounded: 10 s) until `n` requests have come to the gate.
    pub async fn arrived(&self, n: usize) {
        let mut arrived = self.arrived.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), arrived.wait_for(|c| *c >= n));
        assert!(
            matches!(waited.await, Ok(Ok(_))),
            "{n} request(s) did not reach the upstream's gate within 10 s"
        );
    }

    /// Lets every request held at the gate, and every later one, through.
    pub fn release(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        self.arrived.send_modify(|n| *n += 1);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

/// A counting upstream: answers `{method} {path} hit={n}`; `?delay_ms=N` makes it slow;
/// `?hold=NAME` holds the request until the test opens [`Upstream::gate`]`(NAME)`;
/// `?status=N` sets the status; `?size=N` answers N bytes of `x` instead.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

async fn upstream_handler(State(seen): State<Arc<Seen>>, req: Request) -> impl IntoResponse {
    let n = seen.hits.fetch_add(1, Ordering::SeqCst) + 1;
    let path = req.uri().path().to_owned();
    *seen
        .by_path
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default() += 1;
    seen.headers.lock().unwrap().push(req.headers().clone());
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect();
    {
        let mut in_flight = seen.in_flight.lock().unwrap();
        let now = in_flight.entry(path.clone()).or_default();
        *now += 1;
        let mut max = seen.max_in_flight.lock().unwrap();
        let m = max.entry(path.clone()).or_default();
        *m = (*m).max(*now);
    }
    let total = seen.total_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_total_in_flight.fetch_max(total, Ordering::SeqCst);
    if let Some(ms) = query.get("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(name) = query.get("hold") {
        let gate = seen.gate(name);
        gate.pass().await;
    }
    *seen.in_flight.lock().unwrap().get_mut(&path).unwrap() -= 1;
    seen.total_in_flight.fetch_sub(1, Ordering::SeqCst);
    let status = query
        .get("status")
        .and_then(|v| v.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    // A client whose body stream the sidecar cut off: answer, do not panic.
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::from_static(b"<body failed>"),
    };
    if let Some(size) = query.get("size").and_then(|v| v.parse::<usize>().ok()) {
        return (status, [("set-cookie", format!("s={n}"))], "x".repeat(size));
    }
    (
        status,
        [("set-cookie", format!("s={n}"))],
        format!("{path} hit={n} body={}", String::from_utf8_lossy(&body)),
    )
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let app = axum::Router::new()
            .fallback(upstream_handler)
            .with_state(seen.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Upstream { addr, seen }
    }

    pub fn hits(&self) -> usize {
        self.seen.hits.load(Ordering::SeqCst)
    }

    /// The gate `?hold=NAME` requests wait at (made on first use, by either side).
    pub fn gate(&self, name: &str) -> Arc<Gate> {
        self.seen.gate(name)
    }

    /// Waits (bounded: 2 s) until the upstream has seen `n` requests; fails if it has not.
    pub async fn wait_for_hits(&self, n: usize) {
        for _ in 0..200 {
            if self.hits() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(self.hits(), n, "requests at the upstream");
    }
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keyward"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `keyward serve`; killed on drop.
pub struct Sidecar {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempdir::Dir,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};

    /// A directory removed on drop.
    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "keyward-test-{tag}-{}-{}",
                std::process::id(),
                super::free_port()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Sidecar {
    /// Starts `keyward serve` with `[server]` pointing at `upstream` and `rest` appended.
    pub async fn start(upstream: SocketAddr, rest: &str) -> Sidecar {
        Sidecar::start_with_server(upstream, "", rest).await
    }

    /// Like [`Sidecar::start`], with `server_lines` (e.g. `header_read_timeout = "1s"`)
    /// added to the `[server]` table.
    pub async fn start_with_server(
        upstream: SocketAddr,
        server_lines: &str,
        rest: &str,
    ) -> Sidecar {
        Sidecar::start_configured(upstream, server_lines, rest, |_| {}).await
    }

    /// Like [`Sidecar::start_with_server`], with `configure` adjusting the command
    /// (environment, output) before it is spawned.
    ///
    /// The ports come from [`free_port`], which another test may take before keyward
    /// binds them; a start that exits early is retried on fresh ports (bounded).
    pub async fn start_configured(
        upstream: SocketAddr,
        server_lines: &str,
        rest: &str,
        configure: impl Fn(&mut Command),
    ) -> Sidecar {
        // `server_lines` may set its own request_timeout (TOML refuses a key twice).
        let request_timeout = if server_lines.contains("request_timeout") {
            ""
        } else {
            "request_timeout = \"2s\"\n"
        };
        let config = |addr: SocketAddr, admin: SocketAddr| {
            format!(
                "[server]\nlisten = \"{addr}\"\nupstream = \"http://{upstream}\"\nadmin = \"{admin}\"\n{request_timeout}shutdown_grace = \"5s\"\n{server_lines}\n\n{rest}"
            )
        };
        Self::serve(config, configure).await
    }

    /// Runs `keyward serve` on the config `config(listen, admin)` makes for two free
    /// ports, and waits until both listeners accept. A start that exits early (a port
    /// taken in between) is retried on fresh ports, three times at most.
    pub async fn serve(
        config: impl Fn(SocketAddr, SocketAddr) -> String,
        configure: impl Fn(&mut Command),
    ) -> Sidecar {
        let mut exits = Vec::new();
        for _ in 0..3 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let dir = tempdir::Dir::new("sidecar");
            let path = dir.path().join("keyward.toml");
            std::fs::write(&path, config(addr, admin)).unwrap();
            let mut command = Command::new(binary());
            command
                .args(["serve", "-c"])
                .arg(&path)
                .env("KEYWARD_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            configure(&mut command);
            let child = command.spawn().unwrap();
            let mut sidecar = Sidecar {
                child,
                addr,
                admin,
                _dir: dir,
            };
            // Bounded wait for the listeners (a process start, not a race in the code);
            // generous, for a debug build on a loaded CI machine.
            for _ in 0..600 {
                if let Some(status) = sidecar.child.try_wait().unwrap() {
                    exits.push(format!("{addr}/{admin}: {status}"));
                    break;
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok()
                    && tokio::net::TcpStream::connect(admin).await.is_ok()
                {
                    return sidecar;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            if exits.is_empty() {
                panic!("keyward did not start listening on {addr} within 15 s");
            }
        }
        panic!("keyward exited at start three times: {exits:?}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The config file this sidecar serves (rewrite it, then reload).
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("keyward.toml")
    }

    /// GET `path` on the admin listener (`/metrics`, `/healthz`, `/readyz`, ...).
    pub async fn admin_get(&self, client: &HttpClient, path: &str) -> Reply {
        send(
            client,
            "GET",
            &format!("http://{}{path}", self.admin),
            &[],
            "",
        )
        .await
    }

    /// Sends SIGTERM and waits for the exit status (bounded).
    pub async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        for _ in 0..400 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("keyward did not exit after SIGTERM");
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read to the end.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut builder = http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Sends `n` requests at once (each from its own task); the replies in sending order.
pub async fn send_concurrently(
    client: &HttpClient,
    n: usize,
    method: &'static str,
    url: &str,
    headers: &[(&'static str, &'static str)],
    body: &'static str,
) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, url, headers) = (client.clone(), url.to_owned(), headers.to_vec());
            tokio::spawn(async move { send(&client, method, &url, &headers, body).await })
        })
        .collect();
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

/// Runs `keyward check -c` on a file with `text`.
pub fn check(text: &str) -> (i32, String) {
    let dir = tempdir::Dir::new("check");
    let path = dir.path().join("keyward.toml");
    std::fs::write(&path, text).unwrap();
    check_file(&path)
}

pub fn check_file(path: &std::path::Path) -> (i32, String) {
    let out = Command::new(binary())
        .args(["check", "-c"])
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub fn unused(_: Body) {}

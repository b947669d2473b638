//! The proxy listener, thread per core: `workers` OS threads, each with its own
//! single-threaded tokio runtime and its own `SO_REUSEPORT` listener on the same address,
//! so the kernel spreads connections over the threads and a connection, its requests and
//! their upstream connections (see [`crate::proxy`]) stay on one thread: no work
//! stealing, no cross-thread wake-ups, no shared accept queue. HTTP/1.1 and h2c from
//! clients, graceful drain on shutdown. A client is never allowed to stall: headers, body
//! and response writes each have a deadline, so no slow client holds a key for longer
//! than them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::Request;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use keyward_core::grpc::Protocol;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::app::App;
use crate::fifo_timer::FifoTimer;
use crate::ingress::{ReadTimeout, body_timeout_response};

/// How long a client may take: to send its headers, between two parts of its body, and
/// to read what has been written to it.
#[derive(Clone, Copy, Debug)]
pub struct ClientDeadlines {
    pub header_read: Duration,
    pub body_read: Duration,
    pub idle_write: Duration,
}

/// The proxy's listening sockets: one per worker, all bound to one address.
#[derive(Debug)]
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
}

/// Backlog of each listening socket (nginx's default on Linux is 511; accept queues are
/// per socket with `SO_REUSEPORT`).
const BACKLOG: i32 = 1024;

impl Listeners {
    /// Binds `workers` sockets to `addr` with `SO_REUSEPORT`. A port some other socket
    /// holds is refused, even one that also set `SO_REUSEPORT` (a second sidecar started
    /// on the same port by mistake would otherwise silently take half the traffic):
    /// the first bind is a probe without the option.
    pub fn bind(addr: SocketAddr, workers: usize) -> io::Result<Listeners> {
        let addr = {
            let probe = std::net::TcpListener::bind(addr)?;
            probe.local_addr()?
        };
        let sockets = (0..workers.max(1))
            .map(|_| reuseport_socket(addr))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Listeners { sockets })
    }
}

fn reuseport_socket(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Serves `app` on `listeners`, one worker thread each, until `shutdown` resolves, then
/// stops accepting and lets in-flight requests finish for up to `grace`. Returns whether
/// everything drained.
pub async fn serve(
    listeners: Listeners,
    app: App,
    deadlines: ClientDeadlines,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> bool {
    let (stop, stopped) = watch::channel(false);
    // A worker keeps its runtime until every worker has drained: tasks one runtime
    // started (a store connection's driver, a spawned completion) may serve requests
    // still draining on another.
    let (release, released) = watch::channel(false);
    let mut workers = Vec::with_capacity(listeners.sockets.len());
    for (index, socket) in listeners.sockets.into_iter().enumerate() {
        let (done, finished) = tokio::sync::oneshot::channel();
        let app = app.clone();
        let stopped = stopped.clone();
        let released = released.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("keyward-worker-{index}"))
            .spawn(move || {
                run_worker(socket, app, deadlines, grace, stopped, done, released);
            });
        match spawned {
            Ok(_) => workers.push(finished),
            Err(error) => {
                tracing::error!(%error, index, "cannot start a worker thread");
            }
        }
    }
    if workers.is_empty() {
        return false;
    }
    shutdown.await;
    let _ = stop.send(true);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: draining in-flight requests"
    );
    let mut drained = true;
    for worker in workers {
        // A worker that panicked or could not start its runtime did not drain.
        drained &= worker.await.unwrap_or(false);
    }
    let _ = release.send(true);
    drained
}

/// One worker thread: its runtime, its listener, its connections. Says on `done`
/// whether its connections drained, then keeps its runtime until `released`.
fn run_worker(
    socket: std::net::TcpListener,
    app: App,
    deadlines: ClientDeadlines,
    grace: Duration,
    stopped: watch::Receiver<bool>,
    done: tokio::sync::oneshot::Sender<bool>,
    mut released: watch::Receiver<bool>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start a worker runtime");
            let _ = done.send(false);
            return;
        }
    };
    runtime.block_on(async move {
        let drained = match TcpListener::from_std(socket) {
            Ok(listener) => accept_loop(listener, app, deadlines, grace, stopped).await,
            Err(error) => {
                tracing::error!(%error, "cannot register the listener");
                false
            }
        };
        let _ = done.send(drained);
        let _ = released.wait_for(|released| *released).await;
    });
}

async fn accept_loop(
    listener: TcpListener,
    app: App,
    deadlines: ClientDeadlines,
    grace: Duration,
    mut stopped: watch::Receiver<bool>,
) -> bool {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(FifoTimer::new(deadlines.header_read))
        .header_read_timeout(deadlines.header_read)
        .max_buf_size(64 * 1024 + 8 * 1024)
        // One write per response head and small body: hyper's vectored writes cost more
        // than the copy (about 1.5 µs per request, benches/load/run.sh).
        .writev(false);
    let graceful = GracefulShutdown::new();
    // This worker's own reference: requests clone it without touching a count that
    // the other workers' requests touch too.
    let app = Arc::new(app);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let app = app.clone();
            // Boxed: hyper moves the future it is given, and the whole request's state
            // (every layer's future) lives in it: moving a pointer is cheaper.
            Box::pin(async move {
                Ok::<_, Infallible>(handle(&app, req, peer, deadlines.body_read).await)
            })
        });
        let stream = WriteTimeout::new(stream, deadlines.idle_write);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => true,
        () = tokio::time::sleep(grace) => false,
    }
}

/// One request with its body under `body_read`: a client that stops sending gets 408
/// (whatever a layer made of the failed body) and its connection closed.
async fn handle(
    app: &App,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
    body_read: Duration,
) -> http::Response<Body> {
    let http1 = req.version() < http::Version::HTTP_2;
    let protocol = Protocol::of(req.headers());
    // A request without a body (most GETs) has nothing to time out: no flag, no wrapper.
    let (req, timed_out) = if req.body().is_end_stream() {
        (req.map(|_| Body::empty()), None)
    } else {
        let timed_out = Arc::new(AtomicBool::new(false));
        let flag = timed_out.clone();
        let req = req.map(|body| Body::new(ReadTimeout::new(body, body_read, flag)));
        (req, Some(timed_out))
    };
    let res = app.handle(req, peer).await;
    if timed_out.is_some_and(|timed_out| timed_out.load(Ordering::Acquire)) {
        tracing::info!(%peer, "request body timed out");
        return body_timeout_response(protocol, body_read, http1);
    }
    res
}

/// A connection whose writes fail when the client has not made room for `timeout`
/// (nginx `send_timeout`): hyper then drops the connection and with it the response
/// body, which releases whatever key the request still held.
struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteTimeout<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// After a write that did not progress: `Ready(Err)` once it has stalled too long.
    fn check(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => match self.check(cx) {
                Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                _ => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, polled)
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_idle_timeout() {
        // A pipe with a 16-byte buffer whose other end nobody reads.
        let (ours, _theirs) = tokio::io::duplex(16);
        let mut conn = WriteTimeout::new(ours, Duration::from_secs(60));
        conn.write_all(&[0; 16]).await.unwrap();
        let started = tokio::time::Instant::now();
        let err = conn.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_cut_off() {
        use tokio::io::AsyncReadExt;
        let (ours, mut theirs) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut buf = [0; 16];
            let mut total = 0;
            while total < 64 {
                tokio::time::sleep(Duration::from_secs(59)).await;
                total += theirs.read(&mut buf).await.unwrap();
            }
        });
        let mut conn = WriteTimeout::new(ours, Duration::from_secs(60));
        conn.write_all(&[0; 64]).await.unwrap();
        reader.await.unwrap();
    }
}

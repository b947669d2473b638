//! The HTTP/1.1 upstream connections of each worker thread.
//!
//! Every worker thread has its own idle list ([`ThreadLocal`]): a request takes the
//! most recently used idle connection of its own thread (or opens one), and the
//! connection goes back to that list when the response body has been read to its end.
//! Each connection's task is spawned on the thread that opened it, so a request, its
//! upstream connection and the connection's I/O stay on one thread: no shared pool lock,
//! no cross-thread hand-off. At most `keepalive` idle connections are kept per thread
//! (nginx's `keepalive`), each for at most [`IDLE_TIMEOUT`]; busy ones are one per
//! request in flight, so idle clients hold none.
//!
//! A request that was never written (a kept-alive connection the upstream had closed)
//! is sent once more on a fresh connection; one that may have been written is never
//! sent twice.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use thread_local::ThreadLocal;
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No connection to the upstream could be made (refused, unreachable, ...).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the upstream: {0}")]
pub struct ConnectFailed(#[source] pub std::io::Error);

/// How long an idle connection is kept (the upstream may close it sooner).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// TCP keep-alive probes on upstream connections start after this much silence.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Largest response head read from the upstream.
const MAX_BUF: usize = 64 * 1024 + 8 * 1024;

/// One upstream's connections, per worker thread.
#[derive(Debug)]
pub struct Http1Pool {
    host: String,
    port: u16,
    /// `Host` for requests that arrive without one (HTTP/2 clients send `:authority`).
    authority: HeaderValue,
    keepalive: usize,
    idle: ThreadLocal<RefCell<VecDeque<Idle>>>,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

impl Http1Pool {
    /// Connections to `host:port`, keeping up to `keepalive` idle ones per thread.
    pub fn new(host: &str, port: u16, keepalive: usize) -> Self {
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Http1Pool {
            authority: HeaderValue::from_str(&authority)
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            keepalive,
            idle: ThreadLocal::new(),
        }
    }

    /// Sends `req` (origin-form URI) and returns the response, whose body gives the
    /// connection back when it ends.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, BoxError> {
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut()
                .insert(header::HOST, self.authority.clone());
        }
        // A new connection is the rare path, and its handshake's state is large: boxed,
        // it does not make every request's future (moved on each poll) larger.
        let mut sender = match self.checkout().await {
            Some(sender) => sender,
            None => Box::pin(self.connect()).await?,
        };
        let res = match sender.try_send_request(req).await {
            Ok(res) => res,
            Err(mut error) => match error.take_message() {
                // Never written: the connection was gone before it could be. Once more,
                // on a connection of its own.
                Some(req) => {
                    sender = Box::pin(self.connect()).await?;
                    Box::pin(sender.send_request(req)).await?
                }
                None => return Err(error.into_error().into()),
            },
        };
        Ok(res.map(|body| PooledBody::new(body, sender, self.clone())))
    }

    /// The most recently used idle connection of this thread that is still usable.
    async fn checkout(&self) -> Option<SendRequest<Body>> {
        loop {
            let idle = self.idle.get_or_default().borrow_mut().pop_back()?;
            if idle.since.elapsed() > IDLE_TIMEOUT {
                continue;
            }
            let mut sender = idle.sender;
            if sender.is_ready() {
                return Some(sender);
            }
            // Its last response has ended; the connection task may not have run since.
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Keeps `sender` for the next request of this thread, dropping the oldest beyond
    /// `keepalive` (a dropped sender closes its connection).
    fn checkin(&self, sender: SendRequest<Body>) {
        if self.keepalive == 0 || sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.get_or_default().borrow_mut();
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) > IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() >= self.keepalive {
            idle.pop_front();
        }
        idle.push_back(Idle { sender, since: now });
    }

    /// A new connection, its task spawned on this thread's runtime.
    async fn connect(&self) -> Result<SendRequest<Body>, BoxError> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(ConnectFailed)?;
        stream.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
        let (sender, connection) = http1::Builder::new()
            // One write per request head and small body (see `server`).
            .writev(false)
            .max_buf_size(MAX_BUF)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body that gives its connection back to the pool when it
    /// ends (dropped before its end, the connection is closed: it is mid-response).
    pub struct PooledBody {
        #[pin]
        body: Incoming,
        conn: Option<(SendRequest<Body>, Arc<Http1Pool>)>,
    }
}

impl PooledBody {
    fn new(body: Incoming, sender: SendRequest<Body>, pool: Arc<Http1Pool>) -> Self {
        if http_body::Body::is_end_stream(&body) {
            // Nothing to read (HEAD, 204, 304): nobody may ever poll it.
            pool.checkin(sender);
            return PooledBody { body, conn: None };
        }
        PooledBody {
            body,
            conn: Some((sender, pool)),
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.body.as_mut().poll_frame(cx));
        // At its end, whether or not anyone polls again (hyper stops at `is_end_stream`).
        if frame.is_none() || this.body.is_end_stream() {
            if let Some((sender, pool)) = this.conn.take() {
                pool.checkin(sender);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

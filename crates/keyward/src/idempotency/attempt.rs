//! One coordinated request: claim the key (waiting for an in-flight holder where the
//! route says so), run the handler as the key's holder, then store or release.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use keyward_core::grpc::Protocol;
use keyward_core::problem::types;
use keyward_core::store::{
    ClaimOutcome, Completion, Fingerprint, IdempotencyStore, OnStoreError, StoreError,
    StoredResponse,
};
use keyward_core::telemetry::{
    FIELD_FENCING_TOKEN, IdempotencyOutcome, STORE_OP_CLAIM, STORE_OP_COMPLETE, STORE_OP_RELEASE,
};
use keyward_core::{FencingToken, KeywardBody, Problem, ScopedKey};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower_service::Service;
use tracing::Instrument;

use crate::pipeline::Trace;

use super::claim::{ClaimGuard, with_renewal};
use super::layer::{IdempotencySettings, OnInFlight, ReplayHeaders};
use super::request::{body_identity, fingerprint};
use super::response::{grpc_releases_key, original, releases_key, replay, storable_headers};
use crate::pipeline::{Buffered, Config, buffer_response, read_body};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One coordinated request: everything the boxed future needs.
pub(crate) struct Attempt<St, K> {
    pub(crate) store: St,
    pub(crate) config: Arc<Config<K, IdempotencySettings>>,
    pub(crate) key: ScopedKey,
    pub(crate) trace: Trace,
    /// How rejections are rendered for this request.
    pub(crate) protocol: Protocol,
}

impl<St: Clone, K> Clone for Attempt<St, K> {
    fn clone(&self) -> Self {
        Attempt {
            store: self.store.clone(),
            config: self.config.clone(),
            key: self.key.clone(),
            trace: self.trace.clone(),
            protocol: self.protocol,
        }
    }
}

impl<St, K> Attempt<St, K>
where
    St: IdempotencyStore,
{
    fn settings(&self) -> &IdempotencySettings {
        &self.config.own
    }

    fn record(&self, outcome: IdempotencyOutcome) {
        self.config
            .common
            .metrics
            .decided(&self.trace, outcome.as_str());
    }

    pub(crate) async fn run<S, B, ResB>(
        self,
        mut inner: S,
        req: Request<B>,
    ) -> Result<Response<KeywardBody<ResB>>, S::Error>
    where
        S: Service<Request<B>, Response = Response<ResB>>,
        K: Send + Sync + 'static,
        B: Body + From<Bytes>,
        B::Error: Into<BoxError>,
        ResB: Body<Data = Bytes> + Send + Unpin + 'static,
        ResB::Error: Send,
    {
        let settings = self.settings();
        let (parts, body) = req.into_parts();
        let body = match read_body(&parts, body, settings.max_body).await {
            Ok(body) => body,
            Err(rejection) => {
                let problem = rejection.problem(settings.max_body, "idempotent requests");
                return Ok(problem.into_keyward_response(self.protocol));
            }
        };
        let identity = match body_identity(&body, settings.fingerprint_json.as_ref()) {
            Ok(identity) => identity,
            Err(error) => {
                let problem = Problem::new(
                    StatusCode::BAD_REQUEST,
                    types::BODY_NOT_JSON,
                    "Request body is not JSON",
                )
                .detail(format!(
                    "this route identifies requests by their JSON body, and {error}"
                ));
                return Ok(problem.into_keyward_response(self.protocol));
            }
        };
        let fingerprint = fingerprint(&parts, &settings.fingerprint_headers, &identity);

        let token = match self.claim(&fingerprint).await {
            Ok(Claim::Token(token)) => token,
            Ok(Claim::Answer(res)) => return Ok(*res),
            Err(error) => {
                self.record(IdempotencyOutcome::StoreError);
                tracing::warn!(%error, "idempotency store failed");
                return match self.config.common.on_store_error {
                    OnStoreError::Closed => Ok(store_unavailable(self.protocol)),
                    OnStoreError::Open => {
                        self.config.common.metrics.failed_open();
                        let req = Request::from_parts(parts, B::from(body));
                        let res = Box::pin(inner.call(req)).await;
                        res.map(|res| res.map(KeywardBody::inner))
                    }
                };
            }
        };
        self.trace.span.record(FIELD_FENCING_TOKEN, token.get());

        let req = Request::from_parts(parts, B::from(body));
        // Boxed on its own: the first execution is the rare path, and keeping its state
        // out of this future keeps replays (the common path) small and cheap to move.
        let execute = Box::pin(self.execute(inner, req, token, &fingerprint));
        execute.await
    }

    /// Runs the handler as the key's holder, then stores or releases.
    async fn execute<S, B, ResB>(
        &self,
        mut inner: S,
        mut req: Request<B>,
        token: FencingToken,
        fingerprint: &Fingerprint,
    ) -> Result<Response<KeywardBody<ResB>>, S::Error>
    where
        S: Service<Request<B>, Response = Response<ResB>>,
        K: Send + Sync + 'static,
        ResB: Body<Data = Bytes> + Send + Unpin + 'static,
        ResB::Error: Send,
    {
        let settings = self.settings();
        let guard = ClaimGuard::new(self.store.clone(), self.key.clone(), token);
        req.extensions_mut().insert(token);
        // The handler runs inside the request: a client that leaves first cancels it, and
        // the key is released (the outcome is unknown).
        let call = inner.call(req);
        let called = with_renewal(call, &self.store, &self.key, token, settings.lease).await;
        let res = match called {
            Err(error) => {
                // The inner service failed without a response (a transport error or a
                // timeout upstream): whether the effect happened is unknown.
                self.release(token).await;
                self.record(IdempotencyOutcome::Ambiguous);
                guard.disarm();
                return Err(error);
            }
            Ok(res) if releases_key(res.status(), settings.store_server_errors) => {
                self.release(token).await;
                self.record(IdempotencyOutcome::Released);
                guard.disarm();
                return Ok(res.map(KeywardBody::inner));
            }
            Ok(res) => res,
        };
        // The handler has answered: the outcome is known, and storing it must not depend
        // on the client waiting for it. Reading the body and storing the record run in a
        // task of their own; a client that leaves stops waiting, not the task.
        let (waiting, gone) = oneshot::channel::<()>();
        let mut finish = Box::pin(
            self.clone()
                .finish(res, guard, token, *fingerprint, gone)
                .instrument(self.trace.span.clone()),
        );
        // A response already in memory stored in a store that answers at once (the
        // memory store) finishes in its first poll: no task is needed for that. Anything
        // else goes on in a task, with nothing awaited in between.
        if let Poll::Ready(response) = poll_once(finish.as_mut()).await {
            return Ok(response);
        }
        let finished = tokio::spawn(finish).await;
        drop(waiting);
        match finished {
            Ok(response) => Ok(response),
            Err(error) => match error.try_into_panic() {
                // The body panicked while being read: the guard has released the key.
                Ok(payload) => std::panic::resume_unwind(payload),
                // The runtime is shutting down.
                Err(_) => Ok(store_unavailable(self.protocol)),
            },
        }
    }

    /// Reads the handler's response and stores it (or releases the key), then hands the
    /// response on. If the client is `gone` meanwhile, the body is still read, for at
    /// most a lease, so that a retry finds the record instead of running again.
    async fn finish<ResB>(
        self,
        res: Response<ResB>,
        guard: ClaimGuard<St>,
        token: FencingToken,
        fingerprint: Fingerprint,
        gone: oneshot::Receiver<()>,
    ) -> Response<KeywardBody<ResB>>
    where
        ResB: Body<Data = Bytes> + Unpin,
    {
        let settings = self.settings();
        // In a block of its own: the buffering ends before the record is stored.
        let buffered = {
            let buffering = buffer_response(res, settings.max_response);
            let buffering = with_renewal(buffering, &self.store, &self.key, token, settings.lease);
            tokio::pin!(buffering);
            tokio::select! {
                biased;
                buffered = &mut buffering => Some(buffered),
                // Boxed: a client that leaves first is rare, and its timer would make
                // every first execution's future larger.
                _ = gone => Box::pin(tokio::time::timeout(settings.lease, &mut buffering)).await.ok(),
            }
        };
        let response = match buffered {
            Some(Buffered::Complete {
                parts,
                body,
                trailers,
            }) if !grpc_releases_key(
                &parts.headers,
                trailers.as_ref(),
                settings.store_server_errors,
            ) =>
            {
                let stored = StoredResponse {
                    status: parts.status,
                    headers: storable_headers(&parts.headers, &settings.replay_headers),
                    body: body.clone(),
                    // Trailers carry the response's own metadata (gRPC's status and
                    // message): kept whatever the replay allow-list says, but never the
                    // never-stored headers.
                    trailers: trailers
                        .as_ref()
                        .map(|t| storable_headers(t, &ReplayHeaders::AllSafe)),
                };
                self.complete(token, &fingerprint, stored).await;
                original(parts, body, trailers)
            }
            released => {
                self.release(token).await;
                self.record(IdempotencyOutcome::Released);
                match released {
                    // A transient gRPC status: sent on, not stored.
                    Some(Buffered::Complete {
                        parts,
                        body,
                        trailers,
                    }) => original(parts, body, trailers),
                    // Too large to store, or the body failed: passed through, not stored.
                    Some(Buffered::TooLarge(res) | Buffered::Failed(res)) => res,
                    // The client left and the body did not end within a lease: nobody
                    // receives this.
                    None => store_unavailable(self.protocol),
                }
            }
        };
        guard.disarm();
        response
    }

    /// Claims the key, waiting for an in-flight holder if the route says so. Either the
    /// caller now holds the key, or the request is answered here (replay, 409, 422).
    async fn claim<ResB: Body>(
        &self,
        fingerprint: &Fingerprint,
    ) -> Result<Claim<ResB>, StoreError> {
        let settings = self.settings();
        let started = Instant::now();
        let deadline = match settings.on_in_flight {
            OnInFlight::Wait(wait) => Some(started + wait),
            OnInFlight::Reject => None,
        };
        let mut waited = false;
        loop {
            let metrics = &self.config.common.metrics;
            let claim = self.store.claim(&self.key, fingerprint, settings.lease);
            let outcome = metrics.timed(STORE_OP_CLAIM, claim).await?;
            if waited {
                metrics.waited(&self.trace.span, started.elapsed().as_secs_f64());
            }
            match outcome {
                ClaimOutcome::Claimed(token) => return Ok(Claim::Token(token)),
                ClaimOutcome::Completed(stored) => {
                    self.record(IdempotencyOutcome::Replayed);
                    return Ok(Claim::Answer(Box::new(replay(&stored))));
                }
                ClaimOutcome::Mismatch => {
                    self.record(IdempotencyOutcome::Mismatch);
                    let problem = Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        types::IDEMPOTENCY_KEY_REUSED,
                        "Idempotency-Key reused with a different request",
                    )
                    .detail("this key was first used with a different method, path, query or body");
                    return Ok(Claim::Answer(Box::new(
                        problem.into_keyward_response(self.protocol),
                    )));
                }
                ClaimOutcome::InFlight { holder, .. } => {
                    let now = Instant::now();
                    if let Some(deadline) = deadline.filter(|deadline| *deadline > now) {
                        // Boxed: waiting is rare, and its timer would bloat every request.
                        Box::pin(self.store.wait_settled(&self.key, holder, deadline - now))
                            .await?;
                        waited = true;
                        continue;
                    }
                    self.record(IdempotencyOutcome::InFlight);
                    let problem = Problem::new(
                        StatusCode::CONFLICT,
                        types::IDEMPOTENCY_IN_FLIGHT,
                        "Request with this Idempotency-Key in flight",
                    )
                    .detail("a request with this key is still being processed; retry later")
                    .retry_after(Duration::from_secs(1));
                    return Ok(Claim::Answer(Box::new(
                        problem.into_keyward_response(self.protocol),
                    )));
                }
            }
        }
    }

    /// Stores the response. A store error here is retried (with backoff, for
    /// [`IdempotencyLayer::record_retry`](super::IdempotencyLayer::record_retry), 5 s by
    /// default) while the claim is renewed, before giving up: the handler already ran
    /// and its answer goes back to the client, so a record that is not stored means the
    /// next retry of the key runs it a second time, while a claim kept meanwhile makes
    /// duplicates wait or get 409. Store errors are usually short (a reconnect, a
    /// restarting Redis, a failover), and completing is fenced by the token, so retrying
    /// cannot overwrite a successor's record.
    fn complete<'a>(
        &'a self,
        token: FencingToken,
        fingerprint: &'a Fingerprint,
        stored: StoredResponse,
    ) -> impl Future<Output = ()> + 'a {
        // Not an `async fn` around an `async` block: that would hold `stored` twice.
        let lease = self.settings().lease;
        with_renewal(
            self.store_record(token, fingerprint, stored),
            &self.store,
            &self.key,
            token,
            lease,
        )
    }

    /// Stores the record, retrying a failing store for up to `record_retry`, then gives
    /// up and releases the key.
    async fn store_record(
        &self,
        token: FencingToken,
        fingerprint: &Fingerprint,
        stored: StoredResponse,
    ) {
        let settings = self.settings();
        let deadline = Instant::now() + settings.record_retry;
        let mut backoff = Duration::from_millis(10);
        loop {
            let complete =
                self.store
                    .complete(&self.key, token, fingerprint, stored.clone(), settings.ttl);
            let result = self
                .config
                .common
                .metrics
                .timed(STORE_OP_COMPLETE, complete)
                .await;
            match result {
                Ok(Completion::Stored) => return self.record(IdempotencyOutcome::Executed),
                Ok(Completion::Fenced) => {
                    // Our lease ran out and another request took the key over: storing now
                    // would overwrite its result. Downstream fencing decides which write wins.
                    tracing::warn!(
                        "idempotency lease expired before completion; response not stored"
                    );
                    return self.record(IdempotencyOutcome::Executed);
                }
                Err(error) if Instant::now() + backoff < deadline => {
                    tracing::debug!(%error, "idempotency store failed to store the response; retrying");
                    // Boxed: retrying is rare, and its timer would make every first
                    // execution's future larger.
                    Box::pin(tokio::time::sleep(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(250));
                }
                Err(error) => {
                    tracing::warn!(%error, "idempotency store failed to store the response; releasing the key");
                    self.record(IdempotencyOutcome::StoreError);
                    return self.release(token).await;
                }
            }
        }
    }

    async fn release(&self, token: FencingToken) {
        let release = self.store.release(&self.key, token);
        let released = self
            .config
            .common
            .metrics
            .timed(STORE_OP_RELEASE, release)
            .await;
        if let Err(error) = released {
            tracing::warn!(%error, "idempotency release failed; the key frees when its lease ends");
        }
    }
}

enum Claim<ResB: Body> {
    Token(FencingToken),
    Answer(Box<Response<KeywardBody<ResB>>>),
}

/// Polls `future` once and says what that gave, without waiting.
async fn poll_once<F: Future>(mut future: Pin<&mut F>) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
}

fn store_unavailable<ResB: Body>(protocol: Protocol) -> Response<KeywardBody<ResB>> {
    Problem::store_unavailable().into_keyward_response(protocol)
}

//! The shared work of a flight: lead it across processes through the store, make the
//! inner call, buffer the response for the followers, publish the landing.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::SET_COOKIE;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use keyward_core::store::{
    FlightRole, Landing, OnStoreError, SingleFlightStore, StoreError, StoredResponse,
};
use keyward_core::telemetry::{STORE_OP_LEAD, STORE_OP_PUBLISH};
use keyward_core::{FencingToken, KeywardBody, ScopedKey};
use tower_service::Service;

use super::flight::{Landed, Own, Shared};
use super::layer::LeaderFailure;
use crate::telemetry::LayerMetrics;

/// Rounds of "lead, or wait for a remote leader that then fails" before the work makes
/// its inner call without cross-process coordination.
const MAX_REMOTE_ROUNDS: usize = 3;

/// The typed result the driver of a flight receives privately.
pub(crate) type OwnResult<RB, E> = Result<Response<KeywardBody<RB>>, E>;

/// What the work needs besides the request.
pub(crate) struct WorkSettings<St> {
    pub(crate) store: St,
    pub(crate) key: ScopedKey,
    pub(crate) lease: std::time::Duration,
    pub(crate) max_body: usize,
    pub(crate) on_leader_failure: LeaderFailure,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) metrics: LayerMetrics,
}

pub(crate) async fn flight_work<S, B, RB, St>(
    settings: WorkSettings<St>,
    svc: S,
    req: Request<B>,
) -> Landed
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Send + 'static,
    St: SingleFlightStore,
{
    let (lead, store_error) = match coordinate(&settings).await {
        Coordinated::Lead(lead) => (Some(lead), false),
        Coordinated::Alone { store_error } => (None, store_error),
        Coordinated::Landed(landed) => return landed,
    };
    let mut landed = call_and_buffer(svc, req, settings.max_body).await;
    landed.store_error |= store_error;
    if let Some(mut lead) = lead {
        let landing = match &landed.shared {
            Shared::Response(response) => Landing::Response(response.clone()),
            Shared::TooLarge => Landing::TooLarge,
            Shared::Failed | Shared::StoreUnavailable => Landing::Failed,
        };
        let started = std::time::Instant::now();
        let published = lead.publish(landing).await;
        settings.metrics.store_call(STORE_OP_PUBLISH, started);
        if let Err(error) = published {
            tracing::warn!(%error, "single flight: publishing the landing failed");
            landed.store_error = true;
        }
    }
    landed
}

/// The cross-process decision of a flight.
enum Coordinated<'a, St: SingleFlightStore> {
    /// This process leads the key: make the call and publish.
    Lead(LeadGuard<'a, St>),
    /// Make the call without a lead: the remote response was too large to share, remote
    /// leaders kept failing, or the store failed and the route fails open.
    Alone { store_error: bool },
    /// The flight ended without a call here: a remote leader's response, its failure
    /// (policy `BadGateway`), or a store failure (policy `Closed`).
    Landed(Landed),
}

async fn coordinate<St: SingleFlightStore>(settings: &WorkSettings<St>) -> Coordinated<'_, St> {
    let landed = |shared| {
        Coordinated::Landed(Landed {
            shared,
            own: Own::None,
            store_error: false,
        })
    };
    for _ in 0..MAX_REMOTE_ROUNDS {
        let started = std::time::Instant::now();
        let role = settings.store.lead(&settings.key, settings.lease).await;
        settings.metrics.store_call(STORE_OP_LEAD, started);
        let role = match role {
            Ok(role) => role,
            Err(error) => return store_failed(settings, &error),
        };
        if let FlightRole::Leader(token) = role {
            return Coordinated::Lead(LeadGuard {
                store: &settings.store,
                key: &settings.key,
                token: Some(token),
            });
        }
        let waiting = tokio::time::Instant::now();
        let landing = settings.store.wait(&settings.key, settings.lease).await;
        // This work runs in its leader's span: the wait for the remote leader is its wait.
        let waited = waiting.elapsed().as_secs_f64();
        settings.metrics.waited(&tracing::Span::current(), waited);
        match landing {
            Ok(Some(Landing::Response(response))) => return landed(Shared::Response(response)),
            Ok(Some(Landing::TooLarge)) => return Coordinated::Alone { store_error: false },
            Ok(Some(Landing::Failed))
                if settings.on_leader_failure == LeaderFailure::BadGateway =>
            {
                return landed(Shared::Failed);
            }
            // The remote leader failed (elect: lead again) or landed before we waited.
            Ok(Some(Landing::Failed) | None) => {}
            Err(error) => return store_failed(settings, &error),
        }
    }
    Coordinated::Alone { store_error: false }
}

/// Fails open (the call goes on, coalesced in-process only) or closed (503).
fn store_failed<'a, St: SingleFlightStore>(
    settings: &'a WorkSettings<St>,
    error: &StoreError,
) -> Coordinated<'a, St> {
    match settings.on_store_error {
        OnStoreError::Open => {
            tracing::warn!(%error, "single flight: store failed, coalescing in-process only");
            Coordinated::Alone { store_error: true }
        }
        OnStoreError::Closed => {
            tracing::warn!(%error, "single flight: store failed, failing closed");
            Coordinated::Landed(Landed {
                shared: Shared::StoreUnavailable,
                own: Own::None,
                store_error: true,
            })
        }
    }
}

/// This process leads the flight in the store until it publishes; if the work is dropped
/// (cancelled) first, the flight is abandoned so that remote followers elect at once
/// instead of waiting out the lease.
struct LeadGuard<'a, St: SingleFlightStore> {
    store: &'a St,
    key: &'a ScopedKey,
    token: Option<FencingToken>,
}

impl<St: SingleFlightStore> LeadGuard<'_, St> {
    async fn publish(&mut self, landing: Landing) -> Result<(), StoreError> {
        let Some(token) = self.token else {
            return Ok(());
        };
        let published = self.store.publish(self.key, token, landing).await;
        self.token = None;
        published
    }
}

impl<St: SingleFlightStore> Drop for LeadGuard<'_, St> {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            self.store.abandon_detached(self.key.clone(), token);
        }
    }
}

fn own<RB, E>(result: OwnResult<RB, E>) -> Own
where
    RB: Body + Send + 'static,
    RB::Error: Send,
    E: Send + 'static,
{
    Own::Typed(Box::new(result))
}

/// Makes the inner call and reads the body up to `max_body`: what followers can copy,
/// and the driver's own response (with the leader's extensions).
async fn call_and_buffer<S, B, RB>(mut svc: S, req: Request<B>, max_body: usize) -> Landed
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Send + 'static,
{
    let failed = |own| Landed {
        shared: Shared::Failed,
        own,
        store_error: false,
    };
    let response = match svc.call(req).await {
        Ok(response) => response,
        Err(error) => return failed(own::<RB, S::Error>(Err(error))),
    };
    let (parts, mut body) = response.into_parts();
    let too_large = |parts, prefix, rest| Landed {
        shared: Shared::TooLarge,
        own: own::<RB, S::Error>(Ok(Response::from_parts(
            parts,
            KeywardBody::prefixed(prefix, None, rest),
        ))),
        store_error: false,
    };
    if body.size_hint().lower() > max_body as u64 {
        return too_large(parts, Bytes::new(), body);
    }
    let mut chunks = Chunks::default();
    let mut trailers: Option<http::HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                let body = KeywardBody::prefixed(chunks.into_bytes(), Some(error), body);
                return failed(own::<RB, S::Error>(Ok(Response::from_parts(parts, body))));
            }
        };
        match frame.into_data() {
            Ok(data) => {
                chunks.push(data);
                if chunks.len > max_body {
                    return too_large(parts, chunks.into_bytes(), body);
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(Default::default).extend(more);
                }
            }
        }
    }
    let bytes = chunks.into_bytes();
    let mut headers = parts.headers.clone();
    // A cookie set for the leader's client is not the followers' to keep.
    headers.remove(SET_COOKIE);
    let shared = Arc::new(StoredResponse {
        status: parts.status,
        headers,
        body: bytes.clone(),
        trailers: trailers.clone(),
    });
    Landed {
        shared: Shared::Response(shared),
        own: own::<RB, S::Error>(Ok(Response::from_parts(
            parts,
            KeywardBody::full_with_trailers(bytes, trailers),
        ))),
        store_error: false,
    }
}

/// Body chunks read so far; one chunk (the common case) is kept without a copy or an
/// allocation.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    more: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        if self.first.is_none() {
            self.first = Some(data);
        } else {
            self.more.push(data);
        }
    }

    fn into_bytes(self) -> Bytes {
        let Some(first) = self.first else {
            return Bytes::new();
        };
        if self.more.is_empty() {
            return first;
        }
        let mut out = BytesMut::with_capacity(self.len);
        out.extend_from_slice(&first);
        for chunk in self.more {
            out.extend_from_slice(&chunk);
        }
        out.freeze()
    }
}

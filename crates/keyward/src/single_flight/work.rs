//! The shared work of a flight: lead it across processes through the store, make the
//! inner call, buffer the response for the followers, publish the landing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AGE, CACHE_CONTROL, HeaderName, HeaderValue, VARY};
use http::{HeaderMap, Request, Response};
use http_body::Body;
use keyward_core::store::{
    FlightRole, Landing, LeadOrReuse, OnStoreError, SingleFlightStore, StoreError, StoredResponse,
};
use keyward_core::telemetry::{STORE_OP_LEAD, STORE_OP_PUBLISH};
use keyward_core::{FencingToken, KeywardBody, ScopedKey};
use tower_service::Service;

use super::flight::{Landed, Own, Shared};
use super::layer::LeaderFailure;
use crate::pipeline::{Buffered, buffer_response, shareable_headers};
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
    pub(crate) lease: Duration,
    /// How long a landed response is kept for later requests (zero: not at all).
    pub(crate) reuse_for: Duration,
    pub(crate) max_body: usize,
    /// The request headers the key holds: a response varying on any other is not shared.
    pub(crate) keyed_on: Arc<[HeaderName]>,
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
    let mut landed = call_and_buffer(svc, req, settings.max_body, &settings.keyed_on).await;
    landed.store_error |= store_error;
    if let Some(mut lead) = lead {
        let mut keep = Duration::ZERO;
        let landing = match &landed.shared {
            Shared::Response(response) => {
                if reusable(response) {
                    keep = settings.reuse_for;
                }
                Landing::Response(response.clone())
            }
            // Remote followers then make their own call, as for a private response.
            Shared::TooLarge | Shared::Private => Landing::TooLarge,
            Shared::Failed | Shared::StoreUnavailable => Landing::Failed,
        };
        let publish = lead.publish(landing, keep);
        let published = settings.metrics.timed(STORE_OP_PUBLISH, publish).await;
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
        let (key, lease) = (&settings.key, settings.lease);
        let lead = settings.store.lead_or_reuse(key, lease, settings.reuse_for);
        let role = match settings.metrics.timed(STORE_OP_LEAD, lead).await {
            Ok(LeadOrReuse::Role(role)) => role,
            // A flight landed moments ago: its response, without a flight.
            Ok(LeadOrReuse::Reused { response, age }) => {
                return landed(Shared::Response(aged(&response, age)));
            }
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
            settings.metrics.failed_open();
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
    async fn publish(&mut self, landing: Landing, keep: Duration) -> Result<(), StoreError> {
        let Some(token) = self.token else {
            return Ok(());
        };
        let published = self
            .store
            .publish_kept(self.key, token, landing, keep)
            .await;
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
async fn call_and_buffer<S, B, RB>(
    mut svc: S,
    req: Request<B>,
    max_body: usize,
    keyed_on: &[HeaderName],
) -> Landed
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Send + 'static,
    RB: Body<Data = Bytes> + Unpin + Send + 'static,
    RB::Error: Send + 'static,
{
    let landed = |shared, own| Landed {
        shared,
        own,
        store_error: false,
    };
    let response = match svc.call(req).await {
        Ok(response) => response,
        Err(error) => return landed(Shared::Failed, own::<RB, S::Error>(Err(error))),
    };
    let (parts, body, trailers) = match buffer_response(response, max_body).await {
        Buffered::Complete {
            parts,
            body,
            trailers,
        } => (parts, body, trailers),
        Buffered::TooLarge(response) => {
            return landed(Shared::TooLarge, own::<RB, S::Error>(Ok(response)));
        }
        Buffered::Failed(response) => {
            return landed(Shared::Failed, own::<RB, S::Error>(Ok(response)));
        }
    };
    if !shareable(&parts.headers, keyed_on) {
        let response = Response::from_parts(parts, KeywardBody::full_with_trailers(body, trailers));
        return landed(Shared::Private, own::<RB, S::Error>(Ok(response)));
    }
    let shared = Arc::new(StoredResponse {
        status: parts.status,
        // The leader's cookies and credentials are not the followers' to keep.
        headers: shareable_headers(&parts.headers, |_| true),
        body: body.clone(),
        trailers: trailers.clone(),
    });
    let own = own::<RB, S::Error>(Ok(Response::from_parts(
        parts,
        KeywardBody::full_with_trailers(body, trailers),
    )));
    landed(Shared::Response(shared), own)
}

/// Whether a shared response may also be kept for requests after its flight landed
/// (`reuse_for`): not a 5xx (a failure is for the requests that waited for it, not for
/// the next ones), nor one that must be revalidated before every reuse
/// (`Cache-Control: no-cache` or `max-age=0`).
fn reusable(response: &StoredResponse) -> bool {
    if response.status.is_server_error() {
        return false;
    }
    let Some(directives) = response
        .headers
        .get_all(CACHE_CONTROL)
        .iter()
        .map(|value| value.to_str().ok())
        .collect::<Option<Vec<&str>>>()
    else {
        return false;
    };
    !directives
        .iter()
        .flat_map(|value| value.split(','))
        .map(|directive| {
            let (name, value) = directive.split_once('=').unwrap_or((directive, ""));
            (
                name.trim().to_ascii_lowercase(),
                value.trim().trim_matches('"'),
            )
        })
        .any(|(name, value)| name == "no-cache" || (name == "max-age" && value == "0"))
}

/// A kept response as a later request gets it: with `Age` (RFC 9111) counting the time
/// since it landed, on top of any `Age` the upstream gave it.
fn aged(response: &StoredResponse, age: Duration) -> Arc<StoredResponse> {
    let upstream_age = response
        .headers
        .get(AGE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let mut copy = response.clone();
    let seconds = upstream_age.saturating_add(age.as_secs());
    copy.headers.insert(AGE, HeaderValue::from(seconds));
    Arc::new(copy)
}

/// Whether a response may be copied to requests other than the one that got it: not if
/// it says it is private (`Cache-Control: private` or `no-store`), nor if it varies on a
/// request header the key does not hold (`Vary: *`, or a header outside `keyed_on`).
fn shareable(headers: &HeaderMap, keyed_on: &[HeaderName]) -> bool {
    let directives = |name| {
        headers
            .get_all(name)
            .iter()
            .map(|value| value.to_str().ok())
            .collect::<Option<Vec<&str>>>()
    };
    let Some(cache_control) = directives(CACHE_CONTROL) else {
        return false;
    };
    let private = cache_control
        .iter()
        .flat_map(|value| value.split(','))
        .map(|directive| directive.split('=').next().unwrap_or_default().trim())
        .any(|name| name.eq_ignore_ascii_case("private") || name.eq_ignore_ascii_case("no-store"));
    let Some(vary) = directives(VARY) else {
        return false;
    };
    let varies_elsewhere = vary
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .any(|name| match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => !keyed_on.contains(&name),
            // `*`, or not a header name at all.
            Err(_) => true,
        });
    !private && !varies_elsewhere
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                )
            })
            .collect()
    }

    fn stored(status: u16, pairs: &[(&str, &str)]) -> StoredResponse {
        StoredResponse {
            status: http::StatusCode::from_u16(status).unwrap(),
            headers: headers(pairs),
            body: Bytes::new(),
            trailers: None,
        }
    }

    #[test]
    fn failures_and_revalidated_responses_are_not_reused() {
        assert!(reusable(&stored(200, &[])));
        assert!(reusable(&stored(
            404,
            &[("cache-control", "public, max-age=5")]
        )));
        for (status, pairs) in [
            (500, &[][..]),
            (503, &[][..]),
            (200, &[("cache-control", "No-Cache")][..]),
            (200, &[("cache-control", "public, max-age=0")][..]),
            (200, &[("cache-control", "max-age=\"0\"")][..]),
        ] {
            assert!(!reusable(&stored(status, pairs)), "{status} {pairs:?}");
        }
    }

    #[test]
    fn age_counts_from_the_landing_on_top_of_the_upstream_age() {
        let fresh = aged(&stored(200, &[]), Duration::from_millis(1500));
        assert_eq!(fresh.headers[AGE], "1");
        let cached = aged(&stored(200, &[("age", "30")]), Duration::from_secs(2));
        assert_eq!(cached.headers[AGE], "32");
        assert_eq!(cached.headers.get_all(AGE).iter().count(), 1);
    }

    #[test]
    fn private_or_foreign_varying_responses_are_not_shared() {
        let keyed_on = [http::header::ACCEPT, http::header::HOST];
        assert!(shareable(&headers(&[]), &keyed_on));
        assert!(shareable(
            &headers(&[("cache-control", "public, max-age=60")]),
            &keyed_on
        ));
        assert!(shareable(&headers(&[("vary", "Accept, host")]), &keyed_on));
        for unshared in [
            ("cache-control", "max-age=0, Private"),
            ("cache-control", "private=\"set-cookie\""),
            ("cache-control", "no-store"),
            ("vary", "*"),
            ("vary", "Accept, Origin"),
            ("vary", "Cookie"),
        ] {
            assert!(!shareable(&headers(&[unshared]), &keyed_on), "{unshared:?}");
        }
    }
}

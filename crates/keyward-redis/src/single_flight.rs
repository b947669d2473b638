//! `SingleFlightStore` on Redis: one leader per key across instances, landings handed to
//! followers on other instances through pub/sub.
//!
//! Records, all in the key's hash slot:
//! - `{prefix}flight:{route}:{<tag>}`: the flight in progress (`s=h`, token `t`, `w` once
//!   a follower watches it), expiring with the leader's lease;
//! - `…:n`: the fencing counter (`INCR` per lead; restarts from the clock when gone);
//! - `…:l:{token}`: that flight's landing, kept [`LANDING_TTL`] for the followers that
//!   watched it (only written when someone did);
//! - `…:k`: the last response landed, kept for the route's `reuse_for` when it has one, for
//!   the next requests' `lead` to reuse (one round trip: the same script answers "reuse
//!   this", "lead" or "follow").
//!
//! Steps, one script each: lead; publish (end the flight, keep the landing, `PUBLISH` the
//! record); watch (a follower learns the flight's token and flags it watched); landed (after
//! a wake-up: the landing, still flying, or ended without one). A follower sleeps until a
//! publication for the record or the leader's lease end, bounded by its `max`.
//!
//! Landing encoding: `R` + the response (`codec.rs`), or `T` (too large); a failed flight
//! stores nothing (followers find the flight ended without a landing: failed).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use keyward_core::store::{FlightRole, Landing, LeadOrReuse, SingleFlightStore, StoreError};
use keyward_core::{FencingToken, ScopedKey};
use redis::{Script, Value};
use tokio::time::Instant;

use crate::RedisStore;
use crate::codec;
use crate::keys::KeyLayout;
use crate::reply::{Flight, Landed, Lead};
use crate::script::script;
use crate::util::{millis, spawn};

static LEAD: LazyLock<Script> = script!(writes: "fencing.lua", "flight/lead.lua");
static PUBLISH: LazyLock<Script> = script!(writes: "flight/publish.lua");
static WATCH: LazyLock<Script> = script!(writes: "flight/watch.lua");
static LANDED: LazyLock<Script> = script!(writes: "flight/landed.lua");

/// Scripts [`RedisStore::ping`] preloads.
pub(crate) static SCRIPTS: [&LazyLock<Script>; 4] = [&LEAD, &PUBLISH, &WATCH, &LANDED];

/// How long a landing stays readable for the followers that watched its flight: they
/// are woken within milliseconds; this covers a follower whose wake-up message was lost
/// and who reads at its fallback timer.
pub(crate) const LANDING_TTL: Duration = Duration::from_secs(10);

fn landing_name(record: &str, token: FencingToken) -> String {
    KeyLayout::companion(record, &format!("l:{}", token.get()))
}

fn encode(landing: &Landing) -> Vec<u8> {
    match landing {
        Landing::Response(response) => {
            let mut out = vec![b'R'];
            out.extend_from_slice(&codec::encode(response));
            out
        }
        Landing::TooLarge => vec![b'T'],
        Landing::Failed => Vec::new(),
    }
}

fn decode(bytes: Vec<u8>) -> Result<Landing, StoreError> {
    match bytes.first() {
        Some(b'R') => Ok(Landing::Response(Arc::new(codec::decode(
            Bytes::from(bytes).slice(1..),
        )?))),
        Some(b'T') => Ok(Landing::TooLarge),
        _ => Err(StoreError::Corrupt("unknown landing".to_owned())),
    }
}

fn kept_name(record: &str) -> String {
    KeyLayout::companion(record, "k")
}

/// `reuse_for` or `keep` in milliseconds for the scripts, `0` for none (unlike
/// [`millis`], which never says zero).
fn reuse_millis(duration: Duration) -> String {
    if duration.is_zero() {
        "0".to_owned()
    } else {
        millis(duration)
    }
}

impl RedisStore {
    /// Publishes `landing`, keeping a response for `keep` (zero: not kept).
    async fn land(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        landing: &Landing,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let record = self.inner.keys.record(key);
        let landing_key = landing_name(&record, token);
        let kept_key = kept_name(&record);
        let token = token.get().to_string();
        let ttl = millis(LANDING_TTL);
        let keep = reuse_millis(keep);
        let _landed: i64 = self
            .eval(
                &PUBLISH,
                &[&record, &landing_key, &kept_key],
                &[
                    token.as_bytes(),
                    &encode(landing),
                    ttl.as_bytes(),
                    self.inner.keys.channel().as_bytes(),
                    keep.as_bytes(),
                ],
            )
            .await?;
        Ok(())
    }

    async fn lead_with(
        &self,
        key: &ScopedKey,
        lease: Duration,
        reuse_for: Duration,
    ) -> Result<LeadOrReuse, StoreError> {
        let record = self.inner.keys.record(key);
        let counter = KeyLayout::companion(&record, "n");
        let kept_key = kept_name(&record);
        let lease_ms = millis(lease);
        let reuse_ms = reuse_millis(reuse_for);
        let nonce = self.nonce();
        let led = self
            .eval::<Value>(
                &LEAD,
                &[&record, &counter, &kept_key],
                &[lease_ms.as_bytes(), &nonce, reuse_ms.as_bytes()],
            )
            .await;
        let value = match led {
            Ok(value) => value,
            Err(error) => {
                // The lead may still run (a frozen Redis answers later), and its flight
                // would make every instance's followers wait a whole lease for a leader
                // that never flies: undo it by nonce, as idempotency undoes a claim.
                if !matches!(error, StoreError::Corrupt(_)) {
                    self.abandon_by_nonce(record, nonce, lease);
                }
                return Err(error);
            }
        };
        Ok(match Lead::decode(value)? {
            Lead::Leader(token) => LeadOrReuse::Role(FlightRole::Leader(token)),
            Lead::Follower => LeadOrReuse::Role(FlightRole::Follower),
            Lead::Reused { landing, kept_for } => match decode(landing)? {
                // Kept for the publisher's `reuse_for`; one longer than this layer's (two
                // layers on one key) leaves the age unknown: lead instead of guessing.
                Landing::Response(response) => match reuse_for.checked_sub(kept_for) {
                    Some(age) => LeadOrReuse::Reused { response, age },
                    None => return Box::pin(self.lead_with(key, lease, Duration::ZERO)).await,
                },
                _ => {
                    return Err(StoreError::Corrupt(
                        "a kept landing that is no response".into(),
                    ));
                }
            },
        })
    }
}

impl SingleFlightStore for RedisStore {
    async fn lead(&self, key: &ScopedKey, lease: Duration) -> Result<FlightRole, StoreError> {
        match self.lead_with(key, lease, Duration::ZERO).await? {
            LeadOrReuse::Role(role) => Ok(role),
            // Never asked for: a zero `reuse_for` reads no kept response.
            LeadOrReuse::Reused { .. } => Ok(FlightRole::Follower),
        }
    }

    async fn lead_or_reuse(
        &self,
        key: &ScopedKey,
        lease: Duration,
        reuse_for: Duration,
    ) -> Result<LeadOrReuse, StoreError> {
        self.lead_with(key, lease, reuse_for).await
    }

    async fn publish_kept(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        landing: Landing,
        keep: Duration,
    ) -> Result<(), StoreError> {
        self.land(key, token, &landing, keep).await
    }

    async fn publish(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        landing: Landing,
    ) -> Result<(), StoreError> {
        self.land(key, token, &landing, Duration::ZERO).await
    }

    fn abandon_detached(&self, key: ScopedKey, token: FencingToken) {
        let store = self.clone();
        let abandon = async move {
            if let Err(error) = store
                .land(&key, token, &Landing::Failed, Duration::ZERO)
                .await
            {
                tracing::warn!(%error, key_hash = %key.key_hash(), "keyward single flight: abandoning failed; followers wait for the lease");
            }
        };
        spawn(&self.inner.runtime, abandon);
    }

    async fn wait(&self, key: &ScopedKey, max: Duration) -> Result<Option<Landing>, StoreError> {
        let deadline = Instant::now() + max;
        let record = self.inner.keys.record(key);
        // Registered before the first script: a landing published in between is not lost.
        let watch = self.inner.hub.watch(&record);
        let mut armed = watch.armed();
        let value: Value = self.eval(&WATCH, &[&record], &[]).await?;
        let (token, mut left) = match Flight::decode(value)? {
            Flight::Grounded => return Ok(None),
            Flight::Flying { token, lease_left } => (token, lease_left),
        };
        let landing_key = landing_name(&record, token);
        let token_arg = token.get().to_string();
        loop {
            if Instant::now() >= deadline {
                return Ok(Some(Landing::Failed));
            }
            armed.sleep(deadline, left).await;
            let value: Value = self
                .eval(&LANDED, &[&record, &landing_key], &[token_arg.as_bytes()])
                .await?;
            match Landed::decode(value)? {
                Landed::Down(landing) => return decode(landing).map(Some),
                Landed::Flying { lease_left } => left = lease_left,
                Landed::Ended => return Ok(Some(Landing::Failed)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::{HeaderMap, StatusCode};
    use keyward_core::store::StoredResponse;

    #[test]
    fn landings_round_trip() {
        let response = Landing::Response(Arc::new(StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"T is not a tag here"),
            trailers: None,
        }));
        assert_eq!(decode(encode(&response)).unwrap(), response);
        assert_eq!(
            decode(encode(&Landing::TooLarge)).unwrap(),
            Landing::TooLarge
        );
        assert!(encode(&Landing::Failed).is_empty());
        assert!(decode(Vec::new()).is_err());
    }
}

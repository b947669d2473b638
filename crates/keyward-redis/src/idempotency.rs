//! `IdempotencyStore` on Redis: one Lua script per decision.
//!
//! Records, all in the key's hash slot:
//! - `{prefix}idem:{route}:{<tag>}`: a hash. Held: `s=h`, `f` fingerprint (32 bytes), `t`
//!   token, `o` the claim's nonce, `w` set once a duplicate saw it; expires with the lease.
//!   A claim whose reply is lost (timeout, dropped connection) is undone by nonce right
//!   after (`abandon.lua`), so a Redis hiccup does not leave keys "in flight" for a lease. Completed: `s=c`, `f`,
//!   `r` the response in the binary form of `codec.rs`; expires after the TTL.
//! - `{prefix}idem:{route}:{<tag>}:n`: the fencing counter, advanced by every claim to
//!   `max(counter + 1, Redis TIME in µs)` (`fencing_set.lua`). A claim (of a key with no
//!   record) sets its lifetime to [`COUNTER_LIFETIME`] (or the lease, if longer); renewals
//!   lengthen it back to that, completions to the record's TTL if longer, and neither ever
//!   shortens it: it lives at least as long as a held or completed record. While it shows
//!   a holder's token, nobody claimed after that holder, so the holder may still complete
//!   even if its lease lapsed (there is no successor to overwrite), as on the memory
//!   store. Once the counter is gone it restarts from Redis's
//!   clock in microseconds, so tokens per key only grow.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use keyward_core::store::{
    ClaimOutcome, Completion, Fingerprint, IdempotencyStore, RecordState, StoreError,
    StoredResponse,
};
use keyward_core::{FencingToken, ScopedKey};
use redis::{Script, Value};

use crate::RedisStore;
use crate::codec;
use crate::keys::KeyLayout;
use crate::reply;
use crate::script::script;
use crate::util::{Decimal, millis_arg};

static CLAIM: LazyLock<Script> = script!(writes: "fencing_set.lua", "idempotency/claim.lua");
static COMPLETE: LazyLock<Script> = script!(writes: "idempotency/complete.lua");
static RELEASE: LazyLock<Script> = script!(deletes: "idempotency/release.lua");
static RENEW: LazyLock<Script> = script!(writes: "idempotency/renew.lua");
/// Shared with single flight: undoes a held record by the nonce of the call that made it.
pub(crate) static ABANDON: LazyLock<Script> = script!(deletes: "abandon.lua");
static INSPECT: LazyLock<Script> = script!(reads: "idempotency/inspect.lua");
static FORGET: LazyLock<Script> = script!(writes: "fencing.lua", "idempotency/forget.lua");

/// Scripts [`RedisStore::ping`] preloads.
pub(crate) static SCRIPTS: [&LazyLock<Script>; 7] = [
    &CLAIM, &COMPLETE, &RELEASE, &RENEW, &ABANDON, &INSPECT, &FORGET,
];

/// How long the fencing counter outlives the last claim or renewal of its key.
const COUNTER_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// The record and its counter (`<record>:n`), in one buffer: one allocation per call.
struct Names {
    both: String,
    split: usize,
}

impl Names {
    fn record(&self) -> &str {
        &self.both[..self.split]
    }

    fn counter(&self) -> &str {
        &self.both[self.split..]
    }
}

impl RedisStore {
    fn idempotency_names(&self, key: &ScopedKey) -> Names {
        let keys = &self.inner.keys;
        let mut both = String::with_capacity(2 * keys.record_len(key) + 2);
        let digest = KeyLayout::digest(key);
        keys.push_record_of(key, &digest, &mut both);
        let split = both.len();
        keys.push_record_of(key, &digest, &mut both);
        both.push_str(":n");
        debug_assert_eq!(&both[split..], KeyLayout::companion(&both[..split], "n"));
        Names { both, split }
    }

    async fn release_record(&self, record: &str, token: FencingToken) -> Result<(), StoreError> {
        let token = Decimal::new(token.get());
        let channel = self.inner.keys.channel();
        let _released: i64 = self
            .eval(&RELEASE, &[record], &[token.as_bytes(), channel.as_bytes()])
            .await?;
        Ok(())
    }
}

impl RedisStore {
    /// Undoes, in the background, the held record (an idempotency claim or a flight) that
    /// a call with `nonce` may have made although its reply was lost. Sent behind that
    /// call on the same connection, so Redis runs it after the call if the call ran at
    /// all; bounded by `within` (the lease: past it the record has expired anyway).
    pub(crate) fn abandon_by_nonce(&self, record: String, nonce: [u8; 16], within: Duration) {
        let store = self.clone();
        self.spawn_detached(async move {
            let channel = store.inner.keys.channel().as_bytes();
            let (keys, args) = ([record.as_str()], [nonce.as_slice(), channel]);
            let undo = store.inner.conn.eval::<i64>(&ABANDON, &keys, &args);
            if let Err(error) = crate::conn::bounded(within, undo).await {
                tracing::debug!(%error, "abandoning a failed claim or lead failed; its lease frees it");
            }
        });
    }
}

fn claim_outcome(value: Value) -> Result<ClaimOutcome, StoreError> {
    Ok(match reply::Claim::decode(value)? {
        reply::Claim::Claimed(token) => ClaimOutcome::Claimed(token),
        reply::Claim::InFlight { holder, lease_left } => {
            ClaimOutcome::InFlight { holder, lease_left }
        }
        reply::Claim::Completed(response) => {
            ClaimOutcome::Completed(Arc::new(codec::decode(Bytes::from(response))?))
        }
        reply::Claim::Mismatch => ClaimOutcome::Mismatch,
    })
}

fn fingerprint_of(bytes: Vec<u8>) -> Result<Fingerprint, StoreError> {
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| StoreError::Corrupt(format!("fingerprint of {} bytes", b.len())))?;
    Ok(Fingerprint(bytes))
}

fn record_state(value: Value) -> Result<RecordState, StoreError> {
    Ok(match reply::Inspect::decode(value)? {
        reply::Inspect::Absent => RecordState::Absent,
        reply::Inspect::Held {
            holder,
            lease_left,
            fingerprint,
        } => RecordState::InFlight {
            holder,
            lease_left,
            fingerprint: fingerprint_of(fingerprint)?,
        },
        reply::Inspect::Completed {
            response,
            expires_in,
            fingerprint,
        } => RecordState::Completed {
            status: codec::decode(Bytes::from(response))?.status,
            fingerprint: fingerprint_of(fingerprint)?,
            expires_in,
        },
    })
}

impl IdempotencyStore for RedisStore {
    async fn claim(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let names = self.idempotency_names(key);
        let keep = millis_arg(COUNTER_LIFETIME.max(lease));
        let lease_ms = millis_arg(lease);
        let nonce = self.nonce();
        let claimed = self
            .eval::<Value>(
                &CLAIM,
                &[names.record(), names.counter()],
                &[&fingerprint.0, lease_ms.as_bytes(), keep.as_bytes(), &nonce],
            )
            .await;
        match claimed {
            Ok(value) => claim_outcome(value),
            Err(error) => {
                // The claim may still run (a frozen Redis answers later) and would hold
                // the key for a whole lease with nobody to release it: undo it, behind
                // the claim on the same connection, bounded by the lease.
                if !matches!(error, StoreError::Corrupt(_)) {
                    self.abandon_by_nonce(names.record().to_owned(), nonce, lease);
                }
                Err(error)
            }
        }
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        fingerprint: &Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        let names = self.idempotency_names(key);
        let token = Decimal::new(token.get());
        let encoded = codec::encode(&response);
        let ttl = millis_arg(ttl);
        let stored: i64 = self
            .eval(
                &COMPLETE,
                &[names.record(), names.counter()],
                &[
                    token.as_bytes(),
                    &fingerprint.0,
                    &encoded,
                    ttl.as_bytes(),
                    self.inner.keys.channel().as_bytes(),
                ],
            )
            .await?;
        Ok(match reply::Fenced::decode(stored, "complete")? {
            reply::Fenced::Done => Completion::Stored,
            reply::Fenced::NotHolder => Completion::Fenced,
        })
    }

    async fn release(&self, key: &ScopedKey, token: FencingToken) -> Result<(), StoreError> {
        self.release_record(&self.inner.keys.record(key), token)
            .await
    }

    fn release_detached(&self, key: ScopedKey, token: FencingToken) {
        let store = self.clone();
        let release = async move {
            let record = store.inner.keys.record(&key);
            if let Err(error) = store.release_record(&record, token).await {
                tracing::warn!(%error, key_hash = %key.key_hash(), "detached idempotency release failed; the key frees when its lease ends");
            }
        };
        self.spawn_detached(release);
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let names = self.idempotency_names(key);
        let token = Decimal::new(token.get());
        let keep = millis_arg(COUNTER_LIFETIME.max(lease));
        let lease = millis_arg(lease);
        let renewed: i64 = self
            .eval(
                &RENEW,
                &[names.record(), names.counter()],
                &[token.as_bytes(), lease.as_bytes(), keep.as_bytes()],
            )
            .await?;
        Ok(reply::Fenced::decode(renewed, "renew")? == reply::Fenced::Done)
    }

    async fn wait_settled(
        &self,
        key: &ScopedKey,
        holder: FencingToken,
        max: Duration,
    ) -> Result<(), StoreError> {
        self.wait_released(&self.inner.keys.record(key), holder, max)
            .await
    }

    async fn inspect(&self, key: &ScopedKey) -> Result<RecordState, StoreError> {
        let record = self.inner.keys.record(key);
        let value = self.eval::<Value>(&INSPECT, &[&record], &[]).await?;
        record_state(value)
    }

    async fn forget(&self, key: &ScopedKey) -> Result<RecordState, StoreError> {
        let names = self.idempotency_names(key);
        let keep = millis_arg(COUNTER_LIFETIME);
        let channel = self.inner.keys.channel();
        let value = self
            .eval::<Value>(
                &FORGET,
                &[names.record(), names.counter()],
                &[keep.as_bytes(), channel.as_bytes()],
            )
            .await?;
        record_state(value)
    }
}

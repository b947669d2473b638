//! Idempotency records in memory.
//!
//! Two tables, so that a claim can never be lost to eviction:
//! - in-flight claims live in a sharded map; an entry exists only while its request runs
//!   (or until a later claim takes over its expired lease), so their number is bounded by
//!   concurrency, not by traffic. It is bounded anyway (`max_claims`): when a shard is
//!   full of live claims, a new key gets a store error (503 with `Retry-After` under the
//!   layer's default `on_store_error`), never an evicted claim;
//! - completed responses live in [`CompletedTable`], bounded in the bytes they really
//!   hold, each expiring after its TTL.
//!
//! Expiry decisions use tokio's clock (so `tokio::time::pause()` drives them in tests).

use std::mem::size_of;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keyward_core::store::{
    ClaimOutcome, Completion, Fingerprint, IdempotencyStore, RecordState, StoreError,
    StoredResponse,
};
use keyward_core::{FencingToken, ScopedKey};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::MemoryStore;
use super::completed::CompletedTable;
use crate::sharded::{SHARDS, ShardedTable, SlotKey};

/// Heap bytes of one claim besides its key text, counted high: the map slot at the map's
/// lowest load (7/16), the key's `Arc` counts, the `Notify` in its `Arc`, and 16 bytes
/// of allocator overhead for each of the key and the notifier.
pub(super) const CLAIM_OVERHEAD: usize = (size_of::<SlotKey>() + size_of::<Claim>() + 1) * 16 / 7
    + 16
    + size_of::<Notify>()
    + 16
    + 2 * 16;

pub(super) struct IdempotencyTable {
    in_flight: ShardedTable<Claim>,
    completed: CompletedTable,
    /// Claims one shard may hold (`max_claims` split over the shards).
    shard_claims: usize,
    max_claims: usize,
    next_token: AtomicU64,
}

pub(super) struct Claim {
    token: FencingToken,
    fingerprint: Fingerprint,
    expires_at: Instant,
    settled: Arc<Notify>,
}

impl IdempotencyTable {
    pub(super) fn new(max_response_bytes: u64, max_claims: usize) -> Self {
        IdempotencyTable {
            in_flight: ShardedTable::new(),
            completed: CompletedTable::new(max_response_bytes),
            shard_claims: max_claims.div_ceil(SHARDS).max(1),
            max_claims,
            next_token: AtomicU64::new(1),
        }
    }

    fn completed_outcome(&self, key: &str, fingerprint: &Fingerprint) -> Option<ClaimOutcome> {
        self.completed.with(key, |record, _| {
            if record.fingerprint() == fingerprint {
                ClaimOutcome::Completed(Arc::new(record.response()))
            } else {
                ClaimOutcome::Mismatch
            }
        })
    }

    fn claim(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let now = Instant::now();
        let storage_key = key.storage_key();
        // Replays are the hot path after the first request: answered by one look-up.
        if let Some(outcome) = self.completed_outcome(storage_key, fingerprint) {
            return Ok(outcome);
        }
        let probe = self.in_flight.probe(storage_key);
        let mut shard = self.in_flight.lock(&probe);
        if let Some(claim) = shard.get(&probe) {
            if claim.expires_at > now {
                return Ok(if claim.fingerprint == *fingerprint {
                    ClaimOutcome::InFlight {
                        holder: claim.token,
                        lease_left: claim.expires_at - now,
                    }
                } else {
                    ClaimOutcome::Mismatch
                });
            }
        }
        // The holder may have completed between the first look-up and taking the lock;
        // completion writes the record before removing the claim, under this lock.
        if let Some(outcome) = self.completed_outcome(storage_key, fingerprint) {
            return Ok(outcome);
        }
        if shard.get(&probe).is_none() && shard.map.len() >= self.shard_claims {
            // Claims whose holders stalled past their lease are taken over by the next
            // claim of their key; when the shard is full, they give way to new keys.
            shard.map.retain(|_, claim| {
                let live = claim.expires_at > now;
                if !live {
                    claim.settled.notify_waiters();
                }
                live
            });
            if shard.map.len() >= self.shard_claims {
                return Err(StoreError::Unavailable(format!(
                    "idempotency claims table full: {} requests in flight in one shard \
                     (max_claims {} / {SHARDS})",
                    shard.map.len(),
                    self.max_claims
                )));
            }
        }
        let token = FencingToken(self.next_token.fetch_add(1, Ordering::Relaxed));
        let claim = Claim {
            token,
            fingerprint: *fingerprint,
            expires_at: now + lease,
            settled: Arc::new(Notify::new()),
        };
        if let Some(expired) = shard.insert(probe.slot(key.shared_storage_key()), claim) {
            // Waiters on the expired holder re-check and find the new claim.
            expired.settled.notify_waiters();
        }
        Ok(ClaimOutcome::Claimed(token))
    }

    fn complete(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        fingerprint: &Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> Completion {
        let storage_key = key.storage_key();
        let probe = self.in_flight.probe(storage_key);
        let mut shard = self.in_flight.lock(&probe);
        let holds_key = shard.get(&probe).is_some_and(|claim| claim.token == token);
        if !holds_key {
            return Completion::Fenced;
        }
        self.completed
            .insert(key.shared_storage_key(), *fingerprint, &response, ttl);
        if let Some(claim) = shard.remove(&probe) {
            drop(shard);
            claim.settled.notify_waiters();
        }
        self.completed.evict_over_bound();
        Completion::Stored
    }

    fn release(&self, key: &str, token: FencingToken) {
        let probe = self.in_flight.probe(key);
        let mut shard = self.in_flight.lock(&probe);
        if shard.get(&probe).is_some_and(|claim| claim.token == token) {
            if let Some(claim) = shard.remove(&probe) {
                drop(shard);
                claim.settled.notify_waiters();
            }
        }
    }

    fn renew(&self, key: &str, token: FencingToken, lease: Duration) -> bool {
        let probe = self.in_flight.probe(key);
        let mut shard = self.in_flight.lock(&probe);
        match shard.get_mut(&probe) {
            Some(claim) if claim.token == token => {
                claim.expires_at = Instant::now() + lease;
                true
            }
            _ => false,
        }
    }

    /// The holder's notifier and time left on its lease, if `holder` still holds `key`.
    fn holder_state(&self, key: &str, holder: FencingToken) -> Option<(Arc<Notify>, Duration)> {
        let probe = self.in_flight.probe(key);
        let shard = self.in_flight.lock(&probe);
        let claim = shard.get(&probe).filter(|claim| claim.token == holder)?;
        let left = claim.expires_at.saturating_duration_since(Instant::now());
        Some((claim.settled.clone(), left))
    }

    async fn wait_settled(&self, key: &ScopedKey, holder: FencingToken, max: Duration) {
        let storage_key = key.storage_key();
        let Some((settled, _)) = self.holder_state(storage_key, holder) else {
            return;
        };
        let notified = settled.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Look again now that the notification is armed: a completion in between would
        // otherwise be missed.
        let Some((_, lease_left)) = self.holder_state(storage_key, holder) else {
            return;
        };
        // A holder that died without releasing never notifies: its lease expiry is the
        // event then, after which a new claim takes over.
        let _ = tokio::time::timeout(max.min(lease_left), notified).await;
    }

    fn inspect(&self, key: &str) -> RecordState {
        let completed = self
            .completed
            .with(key, |record, expires_in| RecordState::Completed {
                status: record.status(),
                fingerprint: *record.fingerprint(),
                expires_in,
            });
        if let Some(state) = completed {
            return state;
        }
        let now = Instant::now();
        let probe = self.in_flight.probe(key);
        let shard = self.in_flight.lock(&probe);
        match shard.get(&probe).filter(|claim| claim.expires_at > now) {
            Some(claim) => RecordState::InFlight {
                holder: claim.token,
                lease_left: claim.expires_at - now,
                fingerprint: claim.fingerprint,
            },
            None => RecordState::Absent,
        }
    }

    /// Deletes `key`'s completed record and frees its claim. Both happen under the
    /// claim's shard lock, the lock a completion stores its record under: a holder whose
    /// claim is gone finds no claim with its token and is fenced.
    fn forget(&self, key: &str) -> RecordState {
        let now = Instant::now();
        let probe = self.in_flight.probe(key);
        let mut shard = self.in_flight.lock(&probe);
        let completed = self.completed.remove(key);
        let claim = shard.remove(&probe);
        drop(shard);
        if let Some(claim) = &claim {
            // Waiters claim again and find the key free.
            claim.settled.notify_waiters();
        }
        if let Some((status, fingerprint, expires_in)) = completed {
            return RecordState::Completed {
                status,
                fingerprint,
                expires_in,
            };
        }
        match claim.filter(|claim| claim.expires_at > now) {
            Some(claim) => RecordState::InFlight {
                holder: claim.token,
                lease_left: claim.expires_at - now,
                fingerprint: claim.fingerprint,
            },
            None => RecordState::Absent,
        }
    }

    /// Claims held and their accounted bytes.
    pub(super) fn claims_size(&self) -> (usize, u64) {
        let mut entries = 0;
        let mut bytes = 0;
        for shard in self.in_flight.each_shard() {
            entries += shard.map.len();
            bytes += shard
                .map
                .keys()
                .map(|slot| (slot.key().len() + CLAIM_OVERHEAD) as u64)
                .sum::<u64>();
        }
        (entries, bytes)
    }

    pub(super) fn max_claims(&self) -> usize {
        self.shard_claims * SHARDS
    }

    pub(super) fn completed(&self) -> &CompletedTable {
        &self.completed
    }

    #[cfg(test)]
    fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }
}

impl IdempotencyStore for MemoryStore {
    async fn claim(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        self.inner.idempotency.claim(key, fingerprint, lease)
    }

    async fn complete(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        fingerprint: &Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<Completion, StoreError> {
        Ok(self
            .inner
            .idempotency
            .complete(key, token, fingerprint, response, ttl))
    }

    async fn release(&self, key: &ScopedKey, token: FencingToken) -> Result<(), StoreError> {
        self.inner.idempotency.release(key.storage_key(), token);
        Ok(())
    }

    fn release_detached(&self, key: ScopedKey, token: FencingToken) {
        self.inner.idempotency.release(key.storage_key(), token);
    }

    async fn renew(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .idempotency
            .renew(key.storage_key(), token, lease))
    }

    async fn wait_settled(
        &self,
        key: &ScopedKey,
        holder: FencingToken,
        max: Duration,
    ) -> Result<(), StoreError> {
        self.inner.idempotency.wait_settled(key, holder, max).await;
        Ok(())
    }

    async fn inspect(&self, key: &ScopedKey) -> Result<RecordState, StoreError> {
        Ok(self.inner.idempotency.inspect(key.storage_key()))
    }

    async fn forget(&self, key: &ScopedKey) -> Result<RecordState, StoreError> {
        Ok(self.inner.idempotency.forget(key.storage_key()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use keyward_core::{Key, Scope};

    fn key(k: &str) -> ScopedKey {
        ScopedKey::new("idem", "r", Scope::Unscoped, Key::from(k))
    }

    fn fp(body: &str) -> Fingerprint {
        Fingerprint::builder().part(body.as_bytes()).finish()
    }

    fn response(body: &'static str) -> StoredResponse {
        StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(body),
            trailers: None,
        }
    }

    const LEASE: Duration = Duration::from_secs(30);
    const TTL: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn claim_complete_replay_and_mismatch() {
        let store = MemoryStore::new();
        let ClaimOutcome::Claimed(token) = store.claim(&key("a"), &fp("x"), LEASE).await.unwrap()
        else {
            panic!("first claim must succeed")
        };
        assert!(matches!(
            store.claim(&key("a"), &fp("x"), LEASE).await.unwrap(),
            ClaimOutcome::InFlight { holder, .. } if holder == token
        ));
        assert_eq!(
            store.claim(&key("a"), &fp("y"), LEASE).await.unwrap(),
            ClaimOutcome::Mismatch
        );
        let done = store
            .complete(&key("a"), token, &fp("x"), response("ok"), TTL)
            .await
            .unwrap();
        assert_eq!(done, Completion::Stored);
        assert!(matches!(
            store.claim(&key("a"), &fp("x"), LEASE).await.unwrap(),
            ClaimOutcome::Completed(res) if res.body == "ok"
        ));
        assert_eq!(store.inner.idempotency.in_flight_len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_lease_is_taken_over_and_old_holder_is_fenced() {
        let store = MemoryStore::new();
        let ClaimOutcome::Claimed(old) = store.claim(&key("a"), &fp("x"), LEASE).await.unwrap()
        else {
            panic!()
        };
        tokio::time::advance(LEASE + Duration::from_millis(1)).await;
        let ClaimOutcome::Claimed(new) = store.claim(&key("a"), &fp("x"), LEASE).await.unwrap()
        else {
            panic!("expired lease must be claimable")
        };
        assert!(new > old);
        let late = store
            .complete(&key("a"), old, &fp("x"), response("stale"), TTL)
            .await
            .unwrap();
        assert_eq!(late, Completion::Fenced);
        store.release(&key("a"), old).await.unwrap();
        assert!(matches!(
            store.claim(&key("a"), &fp("x"), LEASE).await.unwrap(),
            ClaimOutcome::InFlight { holder, .. } if holder == new
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_claims_table_refuses_new_keys_and_evicts_no_claim() {
        let store = MemoryStore::builder().max_claims(SHARDS).build(); // one per shard
        let mut held = Vec::new();
        let mut refused = 0;
        for n in 0..1000 {
            match store.claim(&key(&format!("k{n}")), &fp("x"), LEASE).await {
                Ok(ClaimOutcome::Claimed(token)) => held.push((n, token)),
                Err(StoreError::Unavailable(message)) => {
                    assert!(message.contains("max_claims 64"), "{message}");
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(held.len(), SHARDS);
        assert_eq!(refused, 1000 - SHARDS);
        assert_eq!(store.table_sizes().idempotency_claims.entries, SHARDS);
        // Held keys are still answered, and complete as usual.
        let (n, token) = held[0];
        assert!(matches!(
            store.claim(&key(&format!("k{n}")), &fp("x"), LEASE).await,
            Ok(ClaimOutcome::InFlight { holder, .. }) if holder == token
        ));
        let done = store
            .complete(&key(&format!("k{n}")), token, &fp("x"), response("ok"), TTL)
            .await
            .unwrap();
        assert_eq!(done, Completion::Stored);
        // A lease that ran out gives way to a new key once its shard is full.
        tokio::time::advance(LEASE).await;
        assert!(matches!(
            store.claim(&key("late"), &fp("x"), LEASE).await,
            Ok(ClaimOutcome::Claimed(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn renew_extends_the_lease() {
        let store = MemoryStore::new();
        let ClaimOutcome::Claimed(token) = store.claim(&key("a"), &fp("x"), LEASE).await.unwrap()
        else {
            panic!()
        };
        tokio::time::advance(LEASE - Duration::from_secs(1)).await;
        assert!(store.renew(&key("a"), token, LEASE).await.unwrap());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(matches!(
            store.claim(&key("a"), &fp("x"), LEASE).await.unwrap(),
            ClaimOutcome::InFlight { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn completed_records_expire_after_ttl() {
        let store = MemoryStore::new();
        let ClaimOutcome::Claimed(token) = store.claim(&key("a"), &fp("x"), LEASE).await.unwrap()
        else {
            panic!()
        };
        store
            .complete(&key("a"), token, &fp("x"), response("ok"), TTL)
            .await
            .unwrap();
        tokio::time::advance(TTL).await;
        assert!(matches!(
            store.claim(&key("a"), &fp("x"), LEASE).await.unwrap(),
            ClaimOutcome::Claimed(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_on_completion_without_polling() {
        let store = MemoryStore::new();
        let ClaimOutcome::Claimed(token) = store.claim(&key("a"), &fp("x"), LEASE).await.unwrap()
        else {
            panic!()
        };
        let waiter = {
            let store = store.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                store
                    .wait_settled(&key("a"), token, Duration::from_secs(10))
                    .await
                    .unwrap();
                start.elapsed()
            })
        };
        tokio::task::yield_now().await;
        store.release(&key("a"), token).await.unwrap();
        let waited = waiter.await.unwrap();
        assert_eq!(
            waited,
            Duration::ZERO,
            "woken by the release, not by a timer"
        );
    }
}

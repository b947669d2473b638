//! Idempotency records in memory.
//!
//! Two tables, so that a claim can never be lost to cache eviction:
//! - in-flight claims live in sharded maps; an entry exists only while its request runs
//!   (or until a later claim takes over its expired lease), so their number is bounded by
//!   concurrency, not by traffic;
//! - completed responses live in a moka cache bounded in bytes, each expiring after its
//!   TTL.
//!
//! Expiry decisions use tokio's clock (so `tokio::time::pause()` drives them in tests);
//! moka's own expiry only reclaims memory, a little after the logical expiry.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keyward_core::store::{
    ClaimOutcome, Completion, Fingerprint, IdempotencyStore, RecordState, StoreError,
    StoredResponse,
};
use keyward_core::{FencingToken, ScopedKey};
use moka::Expiry;
use moka::sync::Cache;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::MemoryStore;
use crate::sharded::ShardedTable;

pub(super) struct IdempotencyTable {
    in_flight: ShardedTable<Claim>,
    completed: Cache<Arc<str>, Arc<CompletedRecord>>,
    next_token: AtomicU64,
}

struct Claim {
    token: FencingToken,
    fingerprint: Fingerprint,
    expires_at: Instant,
    settled: Arc<Notify>,
}

struct CompletedRecord {
    fingerprint: Fingerprint,
    response: Arc<StoredResponse>,
    expires_at: Instant,
    ttl: Duration,
}

struct CompletedExpiry;

impl Expiry<Arc<str>, Arc<CompletedRecord>> for CompletedExpiry {
    fn expire_after_create(
        &self,
        _key: &Arc<str>,
        value: &Arc<CompletedRecord>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl IdempotencyTable {
    pub(super) fn new(max_response_bytes: u64) -> Self {
        let completed = Cache::builder()
            .max_capacity(max_response_bytes)
            .weigher(|_key: &Arc<str>, record: &Arc<CompletedRecord>| {
                u32::try_from(record.response.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(CompletedExpiry)
            .build();
        IdempotencyTable {
            in_flight: ShardedTable::new(),
            completed,
            next_token: AtomicU64::new(1),
        }
    }

    fn completed_outcome(
        &self,
        key: &str,
        fingerprint: &Fingerprint,
        now: Instant,
    ) -> Option<ClaimOutcome> {
        let record = self.completed.get(key)?;
        if record.expires_at <= now {
            return None;
        }
        Some(if record.fingerprint == *fingerprint {
            ClaimOutcome::Completed(record.response.clone())
        } else {
            ClaimOutcome::Mismatch
        })
    }

    fn claim(&self, key: &ScopedKey, fingerprint: &Fingerprint, lease: Duration) -> ClaimOutcome {
        let now = Instant::now();
        let storage_key = key.storage_key();
        // Replays are the hot path after the first request: answer them without a lock.
        if let Some(outcome) = self.completed_outcome(storage_key, fingerprint, now) {
            return outcome;
        }
        let probe = self.in_flight.probe(storage_key);
        let mut shard = self.in_flight.lock(&probe);
        if let Some(claim) = shard.get(&probe) {
            if claim.expires_at > now {
                return if claim.fingerprint == *fingerprint {
                    ClaimOutcome::InFlight {
                        holder: claim.token,
                        lease_left: claim.expires_at - now,
                    }
                } else {
                    ClaimOutcome::Mismatch
                };
            }
        }
        // The holder may have completed between the lock-free look-up and taking the lock;
        // completion writes the record before removing the claim, under this lock.
        if let Some(outcome) = self.completed_outcome(storage_key, fingerprint, now) {
            return outcome;
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
        ClaimOutcome::Claimed(token)
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
        let record = CompletedRecord {
            fingerprint: *fingerprint,
            response: Arc::new(response),
            expires_at: Instant::now() + ttl,
            ttl,
        };
        self.completed
            .insert(key.shared_storage_key(), Arc::new(record));
        if let Some(claim) = shard.remove(&probe) {
            drop(shard);
            claim.settled.notify_waiters();
        }
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
        let now = Instant::now();
        if let Some(record) = self.completed.get(key).filter(|r| r.expires_at > now) {
            return RecordState::Completed {
                status: record.response.status,
                fingerprint: record.fingerprint,
                expires_in: record.expires_at - now,
            };
        }
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
        Ok(self.inner.idempotency.claim(key, fingerprint, lease))
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

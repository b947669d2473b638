//! Single-flight leads in memory.
//!
//! Inside one `SingleFlightLayer` requests coalesce without the store; this table is what
//! lets several layers (or services built by separate `layer` calls) sharing one
//! `MemoryStore` coalesce with each other, exactly like instances sharing a Redis store.
//! An entry exists only while its flight is in progress, so the table is bounded by
//! in-flight work. Lease expiry uses tokio's clock.
//!
//! Responses kept for reuse (`SingleFlightLayer::reuse_for`) live beside it in a
//! [`CompletedTable`]: exact-size copies, expiring after their `reuse_for`, bounded in
//! bytes (`MemoryStoreBuilder::max_reuse_bytes`), oldest evicted first.

use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keyward_core::store::{
    Fingerprint, FlightRole, Landing, LeadOrReuse, SingleFlightStore, StoreError,
};
use keyward_core::{FencingToken, ScopedKey};
use tokio::sync::watch;
use tokio::time::Instant;

use super::MemoryStore;
use super::completed::CompletedTable;
use crate::sharded::ShardedTable;

/// Heap bytes of one flight besides its key text, counted high: the map slot at the
/// map's lowest load (7/16), the key's `Arc` counts and 16 bytes of allocator overhead.
pub(super) const LEAD_OVERHEAD: usize =
    (std::mem::size_of::<crate::sharded::SlotKey>() + std::mem::size_of::<Lead>() + 1) * 16 / 7
        + 16
        + 16;

/// Heap bytes of the watch channel made for a flight's first follower (tokio's shared
/// state with the landing slot, allocator overhead included). Followers themselves wait
/// in their own request futures, one receiver each, which is not counted here.
pub(super) const WATCH_BYTES: usize = 256;

pub(super) struct FlightLeads {
    leads: ShardedTable<Lead>,
    next_token: AtomicU64,
    /// Landed responses kept for reuse, by storage key.
    kept: CompletedTable,
}

struct Lead {
    token: FencingToken,
    expires_at: Instant,
    /// Created by the first waiter only: a flight nobody waits for costs no channel.
    landing: Option<watch::Sender<Option<Landing>>>,
}

impl Lead {
    fn land(self, landing: Landing) {
        if let Some(sender) = self.landing {
            sender.send_replace(Some(landing));
        }
    }
}

impl FlightLeads {
    pub(super) fn new(max_kept_bytes: u64) -> Self {
        FlightLeads {
            leads: ShardedTable::new(),
            next_token: AtomicU64::new(1),
            kept: CompletedTable::new(max_kept_bytes),
        }
    }

    /// The response kept under `key`, if it landed less than `reuse_for` ago, and its age.
    fn kept(&self, key: &ScopedKey, reuse_for: Duration) -> Option<LeadOrReuse> {
        let (response, left) = self
            .kept
            .with(key.storage_key(), |record, left| (record.response(), left))?;
        // Kept for the publisher's `reuse_for`: with a longer one than this layer's (two
        // layers, one key) the age is unknown, and it is not reused.
        let age = reuse_for.checked_sub(left)?;
        Some(LeadOrReuse::Reused {
            response: std::sync::Arc::new(response),
            age,
        })
    }

    fn keep(&self, key: &ScopedKey, landing: &Landing, keep: Duration) {
        if let (Landing::Response(response), false) = (landing, keep.is_zero()) {
            let unused = Fingerprint([0; 32]);
            self.kept
                .insert(key.shared_storage_key(), unused, response, keep);
            self.kept.evict_over_bound();
        }
    }

    /// Kept responses and their accounted bytes, and the bound.
    pub(super) fn kept_size(&self) -> (usize, u64, u64) {
        let (entries, bytes) = self.kept.size();
        (entries, bytes, self.kept.max_bytes())
    }

    fn lead(&self, key: &ScopedKey, lease: Duration) -> FlightRole {
        let now = Instant::now();
        let key = self.leads.slot(key.shared_storage_key());
        let mut shard = self.leads.lock(&key.probe());
        let new_lead = || Lead {
            token: FencingToken(self.next_token.fetch_add(1, Ordering::Relaxed)),
            expires_at: now + lease,
            landing: None,
        };
        let (token, expired) = match shard.entry(key) {
            Entry::Occupied(entry) if entry.get().expires_at > now => {
                return FlightRole::Follower;
            }
            Entry::Occupied(mut entry) => {
                let lead = new_lead();
                (lead.token, Some(entry.insert(lead)))
            }
            Entry::Vacant(entry) => (entry.insert(new_lead()).token, None),
        };
        drop(shard);
        if let Some(expired) = expired {
            expired.land(Landing::Failed);
        }
        FlightRole::Leader(token)
    }

    /// Ends the flight of `token`; `false` if `token` no longer leads `key`.
    fn land(&self, key: &ScopedKey, token: FencingToken, landing: Landing) -> bool {
        let probe = self.leads.probe(key.storage_key());
        let mut shard = self.leads.lock(&probe);
        if shard.get(&probe).is_none_or(|lead| lead.token != token) {
            return false;
        }
        let Some(lead) = shard.remove(&probe) else {
            return false;
        };
        drop(shard);
        lead.land(landing);
        true
    }

    fn leads_now(&self, key: &ScopedKey, token: FencingToken) -> bool {
        let probe = self.leads.probe(key.storage_key());
        let shard = self.leads.lock(&probe);
        shard.get(&probe).is_some_and(|lead| lead.token == token)
    }

    async fn wait(&self, key: &ScopedKey, max: Duration) -> Option<Landing> {
        let now = Instant::now();
        let (mut receiver, deadline) = {
            let probe = self.leads.probe(key.storage_key());
            let mut shard = self.leads.lock(&probe);
            let lead = shard.get_mut(&probe)?;
            if lead.expires_at <= now {
                // Its leader died without landing; the next `lead` takes over.
                return Some(Landing::Failed);
            }
            let sender = lead.landing.get_or_insert_with(|| watch::channel(None).0);
            (sender.subscribe(), lead.expires_at.min(now + max))
        };
        let landed = tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some)).await;
        match landed {
            Ok(Ok(landing)) => Some(landing.clone().unwrap_or(Landing::Failed)),
            // Timed out, or the lead was dropped without landing.
            Ok(Err(_)) | Err(_) => Some(Landing::Failed),
        }
    }

    /// Flights in progress and their accounted bytes: per flight its key text and
    /// [`LEAD_OVERHEAD`], plus a watch channel once a follower waits.
    pub(super) fn size(&self) -> (usize, u64) {
        let mut entries = 0;
        let mut bytes = 0;
        for shard in self.leads.each_shard() {
            entries += shard.map.len();
            bytes += shard
                .map
                .iter()
                .map(|(slot, lead)| {
                    let channel = if lead.landing.is_some() {
                        WATCH_BYTES
                    } else {
                        0
                    };
                    (slot.key().len() + LEAD_OVERHEAD + channel) as u64
                })
                .sum::<u64>();
        }
        (entries, bytes)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.leads.len()
    }
}

impl SingleFlightStore for MemoryStore {
    async fn lead(&self, key: &ScopedKey, lease: Duration) -> Result<FlightRole, StoreError> {
        Ok(self.inner.single_flight.lead(key, lease))
    }

    async fn publish(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        landing: Landing,
    ) -> Result<(), StoreError> {
        self.inner.single_flight.land(key, token, landing);
        Ok(())
    }

    async fn lead_or_reuse(
        &self,
        key: &ScopedKey,
        lease: Duration,
        reuse_for: Duration,
    ) -> Result<LeadOrReuse, StoreError> {
        let flights = &self.inner.single_flight;
        if !reuse_for.is_zero() {
            if let Some(reused) = flights.kept(key, reuse_for) {
                return Ok(reused);
            }
        }
        Ok(LeadOrReuse::Role(flights.lead(key, lease)))
    }

    async fn publish_kept(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        landing: Landing,
        keep: Duration,
    ) -> Result<(), StoreError> {
        let flights = &self.inner.single_flight;
        // Kept before the landing wakes anyone: a follower that wakes and asks again
        // finds it.
        if flights.leads_now(key, token) {
            flights.keep(key, &landing, keep);
        }
        flights.land(key, token, landing);
        Ok(())
    }

    fn abandon_detached(&self, key: ScopedKey, token: FencingToken) {
        self.inner.single_flight.land(&key, token, Landing::Failed);
    }

    async fn wait(&self, key: &ScopedKey, max: Duration) -> Result<Option<Landing>, StoreError> {
        Ok(self.inner.single_flight.wait(key, max).await)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use keyward_core::store::StoredResponse;
    use keyward_core::{Key, Scope};
    use std::sync::Arc;

    fn key(k: &str) -> ScopedKey {
        ScopedKey::new("flight", "r", Scope::Unscoped, Key::from(k))
    }

    const LEASE: Duration = Duration::from_secs(30);

    fn landing(body: &'static str) -> Landing {
        Landing::Response(Arc::new(StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(body),
            trailers: None,
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn one_leader_followers_receive_its_landing() {
        let store = MemoryStore::new();
        let FlightRole::Leader(token) = store.lead(&key("a"), LEASE).await.unwrap() else {
            panic!("first lead must lead")
        };
        assert_eq!(
            store.lead(&key("a"), LEASE).await.unwrap(),
            FlightRole::Follower
        );
        // Another key is independent.
        assert!(matches!(
            store.lead(&key("b"), LEASE).await.unwrap(),
            FlightRole::Leader(_)
        ));
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait(&key("a"), LEASE).await.unwrap() }
        });
        tokio::task::yield_now().await;
        store
            .publish(&key("a"), token, landing("ok"))
            .await
            .unwrap();
        assert_eq!(waiter.await.unwrap(), Some(landing("ok")));
        // Landed: no flight any more, the next request leads.
        assert_eq!(store.wait(&key("a"), LEASE).await.unwrap(), None);
        assert!(matches!(
            store.lead(&key("a"), LEASE).await.unwrap(),
            FlightRole::Leader(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_or_expired_leads_land_as_failed() {
        let store = MemoryStore::new();
        let FlightRole::Leader(token) = store.lead(&key("a"), LEASE).await.unwrap() else {
            panic!()
        };
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { store.wait(&key("a"), LEASE).await.unwrap() }
        });
        tokio::task::yield_now().await;
        store.abandon_detached(key("a"), token);
        assert_eq!(waiter.await.unwrap(), Some(Landing::Failed));

        // A leader that never lands: its waiters give up at the lease, and a new leader
        // takes over with a higher token; the stale leader can no longer publish.
        let FlightRole::Leader(old) = store.lead(&key("a"), LEASE).await.unwrap() else {
            panic!()
        };
        let started = Instant::now();
        assert_eq!(
            store.wait(&key("a"), LEASE * 2).await.unwrap(),
            Some(Landing::Failed)
        );
        assert_eq!(started.elapsed(), LEASE);
        let FlightRole::Leader(new) = store.lead(&key("a"), LEASE).await.unwrap() else {
            panic!("an expired lead must be taken over")
        };
        assert!(new > old);
        store
            .publish(&key("a"), old, landing("stale"))
            .await
            .unwrap();
        assert_eq!(
            store.lead(&key("a"), LEASE).await.unwrap(),
            FlightRole::Follower
        );
        store.publish(&key("a"), new, landing("ok")).await.unwrap();
        assert_eq!(store.inner.single_flight.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_landing_is_reused_until_reuse_for_then_led_again() {
        let store = MemoryStore::new();
        let reuse = Duration::from_secs(1);
        let LeadOrReuse::Role(FlightRole::Leader(token)) =
            store.lead_or_reuse(&key("a"), LEASE, reuse).await.unwrap()
        else {
            panic!("nothing kept yet: lead")
        };
        store
            .publish_kept(&key("a"), token, landing("ok"), reuse)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(400)).await;
        let LeadOrReuse::Reused { response, age } =
            store.lead_or_reuse(&key("a"), LEASE, reuse).await.unwrap()
        else {
            panic!("landed 400 ms ago: reused")
        };
        assert_eq!(response.body, "ok");
        assert_eq!(age, Duration::from_millis(400));
        // Without reuse (or another key) nothing is found.
        assert!(matches!(
            store.lead_or_reuse(&key("b"), LEASE, reuse).await.unwrap(),
            LeadOrReuse::Role(FlightRole::Leader(_))
        ));
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(matches!(
            store.lead_or_reuse(&key("a"), LEASE, reuse).await.unwrap(),
            LeadOrReuse::Role(FlightRole::Leader(_))
        ));
        // A stale leader keeps nothing; failures and oversize landings are never kept.
        let LeadOrReuse::Role(FlightRole::Leader(current)) =
            store.lead_or_reuse(&key("c"), LEASE, reuse).await.unwrap()
        else {
            panic!()
        };
        store
            .publish_kept(
                &key("c"),
                FencingToken(current.get() + 99),
                landing("stale"),
                reuse,
            )
            .await
            .unwrap();
        store
            .publish_kept(&key("c"), current, Landing::TooLarge, reuse)
            .await
            .unwrap();
        assert!(matches!(
            store.lead_or_reuse(&key("c"), LEASE, reuse).await.unwrap(),
            LeadOrReuse::Role(FlightRole::Leader(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn kept_landings_are_bounded_in_bytes() {
        let store = MemoryStore::builder().max_reuse_bytes(64 * 1024).build();
        let reuse = Duration::from_secs(60);
        let big = Landing::Response(Arc::new(StoredResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; 1024]),
            trailers: None,
        }));
        for i in 0..1000 {
            let k = key(&format!("k{i}"));
            let LeadOrReuse::Role(FlightRole::Leader(token)) =
                store.lead_or_reuse(&k, LEASE, reuse).await.unwrap()
            else {
                panic!()
            };
            store
                .publish_kept(&k, token, big.clone(), reuse)
                .await
                .unwrap();
            let sizes = store.table_sizes().single_flight_kept;
            assert!(sizes.bytes <= 64 * 1024, "{sizes:?}");
        }
        assert!(store.table_sizes().single_flight_kept.entries > 10);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_is_bounded_by_max() {
        let store = MemoryStore::new();
        let _leader = store.lead(&key("a"), LEASE).await.unwrap();
        let started = Instant::now();
        let landed = store.wait(&key("a"), Duration::from_secs(2)).await.unwrap();
        assert_eq!(landed, Some(Landing::Failed));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
}

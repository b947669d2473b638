//! `QuotaStore` on Redis: one GCRA decision per `EVALSHA`, clock from Redis `TIME`.
//!
//! Record: `{prefix}quota:{route}:{<tag>}`, a string holding the key's theoretical
//! arrival time (TAT) as `SECONDS.NNNNNNNNN` since the Unix epoch. It expires when the
//! TAT passes (a full bucket is the same as no record), so idle keys cost Redis nothing.
//!
//! Exactness: Lua numbers are doubles (exact below 2^53) and nanoseconds since the epoch
//! are above that, so the script (`scripts/quota/check.lua`) keeps every instant and span
//! as a (seconds, nanoseconds) pair and decides exactly like [`Quota::decide`] at
//! nanosecond precision; the clock itself has `TIME`'s resolution, one microsecond. The
//! script answers the TAT it found and the clock, and the reported numbers (remaining,
//! reset, retry after) are computed here by [`Quota::decide`] itself, so both stores
//! report identically for the same state.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::time::Duration;

use keyward_core::ScopedKey;
use keyward_core::gcra::{Quota, QuotaDecision};
use keyward_core::store::{QuotaStore, StoreError};
use redis::{Script, Value};

use crate::RedisStore;
use crate::reply::QuotaCheck;
use crate::script::script;

static CHECK: LazyLock<Script> = script!(writes: "quota/check.lua");

/// Scripts [`RedisStore::ping`] preloads.
pub(crate) static SCRIPTS: [&LazyLock<Script>; 1] = [&CHECK];

const NANOS: u64 = 1_000_000_000;

/// The future of one Redis quota decision (boxed: it owns the script call).
pub type RedisCheckFuture = Pin<Box<dyn Future<Output = Result<QuotaDecision, StoreError>> + Send>>;

/// `(seconds, nanoseconds)` of `nanos`, as script arguments.
fn pair(nanos: u64) -> [String; 2] {
    [(nanos / NANOS).to_string(), (nanos % NANOS).to_string()]
}

fn nanos_of(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl RedisStore {
    async fn quota_decide(
        &self,
        record: String,
        quota: Quota,
        cost: u32,
        now: Option<Duration>,
    ) -> Result<QuotaDecision, StoreError> {
        let increment = nanos_of(quota.emission_interval()).checked_mul(u64::from(cost));
        let [inc_s, inc_n] = match increment {
            Some(nanos) => pair(nanos),
            // Refused whatever the state: the script only reads.
            None => ["0".to_owned(), "-1".to_owned()],
        };
        let [tau_s, tau_n] = pair(nanos_of(quota.tolerance()));
        let mut args: Vec<&[u8]> = vec![
            inc_s.as_bytes(),
            inc_n.as_bytes(),
            tau_s.as_bytes(),
            tau_n.as_bytes(),
        ];
        let clock = now.map(|now| pair(nanos_of(now)));
        if let Some([now_s, now_n]) = &clock {
            args.push(now_s.as_bytes());
            args.push(now_n.as_bytes());
        }
        let value: Value = self.eval(&CHECK, &[&record], &args).await?;
        let QuotaCheck { allowed, tat, now } = QuotaCheck::decode(value)?;
        let tat = instant(tat.0, tat.1)?;
        let now = instant(now.0, now.1)?;
        let step = quota.decide(tat, now, cost);
        if step.decision.is_allowed() != allowed {
            return Err(StoreError::Corrupt(format!(
                "quota script and GCRA disagree (tat {tat}, now {now}, cost {cost})"
            )));
        }
        Ok(step.decision)
    }

    /// The quota decision at a given clock instead of Redis `TIME` (nanoseconds since the
    /// Unix epoch as a `Duration`). Test instrumentation for checking the script against
    /// [`Quota::decide`]; records written this way never expire.
    #[doc(hidden)]
    pub async fn quota_check_at(
        &self,
        key: &ScopedKey,
        quota: &Quota,
        cost: u32,
        now: Duration,
    ) -> Result<QuotaDecision, StoreError> {
        self.quota_decide(self.inner.keys.record(key), *quota, cost, Some(now))
            .await
    }
}

/// Nanoseconds of a `(seconds, nanoseconds)` reply pair.
fn instant(seconds: i64, nanos: i64) -> Result<u64, StoreError> {
    u64::try_from(seconds)
        .ok()
        .zip(u64::try_from(nanos).ok().filter(|n| *n < NANOS))
        .and_then(|(s, n)| s.checked_mul(NANOS)?.checked_add(n))
        .ok_or_else(|| StoreError::Corrupt(format!("invalid quota instant {seconds}.{nanos}")))
}

impl QuotaStore for RedisStore {
    type CheckFuture = RedisCheckFuture;

    fn check(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        let store = self.clone();
        let record = self.inner.keys.record(key);
        let quota = *quota;
        Box::pin(async move { store.quota_decide(record, quota, cost, None).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_split_and_join_exactly() {
        let big = 1_764_000_000_123_456_789u64;
        let [s, n] = pair(big);
        assert_eq!((s.as_str(), n.as_str()), ("1764000000", "123456789"));
        assert_eq!(instant(1_764_000_000, 123_456_789).ok(), Some(big));
        assert_eq!(instant(0, 0).ok(), Some(0));
        assert!(instant(-1, 0).is_err());
        assert!(instant(1, 1_000_000_000).is_err());
        assert!(instant(i64::MAX, 0).is_err());
    }
}

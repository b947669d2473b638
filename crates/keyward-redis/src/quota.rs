//! `QuotaStore` on Redis: one GCRA decision per `EVALSHA`, clock from Redis `TIME`.
//!
//! Record: `{prefix}quota:{route}:{<tag>}`, a string holding the key's theoretical
//! arrival time (TAT) as `SECONDS.NNNNNNNNN` since the Unix epoch. It expires when the
//! TAT passes (a full bucket is the same as no record), so idle keys cost Redis nothing.
//!
//! Exactness: Lua numbers are doubles (exact below 2^53) and nanoseconds since the epoch
//! are above that, so the scripts (`scripts/quota/`, their shared steps in `lib.lua`) keep every instant and span
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
use keyward_core::gcra::{MAX_TOLERANCE, Quota, QuotaDecision};
use keyward_core::store::{QuotaStore, StoreError};
use redis::{Script, Value};

use crate::RedisStore;
use crate::reply::QuotaCheck;
use crate::script::script;
use crate::util::spawn;

static CHECK: LazyLock<Script> = script!(writes: "quota/lib.lua", "quota/check.lua");
static PEEK: LazyLock<Script> = script!(reads: "quota/lib.lua", "quota/peek.lua");
static CHARGE: LazyLock<Script> = script!(writes: "quota/lib.lua", "quota/charge.lua");

/// Scripts [`RedisStore::ping`] preloads.
pub(crate) static SCRIPTS: [&LazyLock<Script>; 3] = [&CHECK, &PEEK, &CHARGE];

/// Which GCRA step a script runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// `Quota::decide`, taking the units if they fit.
    Check,
    /// `Quota::decide`, taking nothing (`scripts/quota/peek.lua`, read-only).
    Peek,
    /// `Quota::charge`, into debt if need be (`scripts/quota/charge.lua`).
    Charge,
}

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
        self.quota_step(Step::Check, record, quota, cost, now).await
    }

    async fn quota_step(
        &self,
        step: Step,
        record: String,
        quota: Quota,
        cost: u32,
        now: Option<Duration>,
    ) -> Result<QuotaDecision, StoreError> {
        let emission = nanos_of(quota.emission_interval());
        let mut parts: Vec<String> = Vec::with_capacity(6);
        match step {
            Step::Check => {
                parts.extend(match emission.checked_mul(u64::from(cost)) {
                    Some(nanos) => pair(nanos),
                    // Refused whatever the state: the script only reads.
                    None => ["0".to_owned(), "-1".to_owned()],
                });
                parts.extend(pair(nanos_of(quota.tolerance())));
            }
            Step::Peek => {}
            Step::Charge => {
                parts.extend(pair(emission.saturating_mul(u64::from(cost))));
                parts.extend(pair(nanos_of(MAX_TOLERANCE)));
            }
        }
        if let Some(now) = now {
            parts.extend(pair(nanos_of(now)));
        }
        let args: Vec<&[u8]> = parts.iter().map(|part| part.as_bytes()).collect();
        let script = match step {
            Step::Check => &CHECK,
            Step::Peek => &PEEK,
            Step::Charge => &CHARGE,
        };
        let value: Value = self.eval(script, &[&record], &args).await?;
        let QuotaCheck { allowed, tat, now } = QuotaCheck::decode(value)?;
        let tat = instant(tat.0, tat.1)?;
        let now = instant(now.0, now.1)?;
        let answer = match step {
            Step::Check | Step::Peek => quota.decide(tat, now, cost),
            Step::Charge => quota.charge(tat, now, cost),
        };
        if step == Step::Check && answer.decision.is_allowed() != allowed {
            return Err(StoreError::Corrupt(format!(
                "quota script and GCRA disagree (tat {tat}, now {now}, cost {cost})"
            )));
        }
        Ok(answer.decision)
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

    /// [`QuotaStore::charge`] at a given clock, like [`RedisStore::quota_check_at`]: test
    /// instrumentation for checking the script against [`Quota::charge`].
    #[doc(hidden)]
    pub async fn quota_charge_at(
        &self,
        key: &ScopedKey,
        quota: &Quota,
        cost: u32,
        now: Duration,
    ) -> Result<QuotaDecision, StoreError> {
        let record = self.inner.keys.record(key);
        self.quota_step(Step::Charge, record, *quota, cost, Some(now))
            .await
    }

    fn quota_future(
        &self,
        step: Step,
        key: &ScopedKey,
        quota: &Quota,
        cost: u32,
    ) -> RedisCheckFuture {
        let store = self.clone();
        let record = self.inner.keys.record(key);
        let quota = *quota;
        Box::pin(async move { store.quota_step(step, record, quota, cost, None).await })
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

    fn peek(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        self.quota_future(Step::Peek, key, quota, cost)
    }

    fn charge(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture {
        self.quota_future(Step::Charge, key, quota, cost)
    }

    fn charge_detached(&self, key: ScopedKey, quota: Quota, cost: u32) {
        let charge = self.quota_future(Step::Charge, &key, &quota, cost);
        spawn(&self.inner.runtime, async move {
            if let Err(error) = charge.await {
                tracing::warn!(%error, key_hash = %key.key_hash(), cost, "keyward quota: charge not recorded");
            }
        });
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

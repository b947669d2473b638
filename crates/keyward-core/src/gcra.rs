//! Quotas and the GCRA decision, as pure integer arithmetic.
//!
//! A [`Quota`] allows `limit` units per `per`, with up to `burst` units at once. It is
//! enforced with the Generic Cell Rate Algorithm: each key stores one number, its
//! *theoretical arrival time* (TAT), the instant at which its bucket would be full
//! again. With `T = per / limit` (the emission interval, rounded up so that the limit is
//! never exceeded) and `τ = T × burst` (the tolerance), a request of `cost` units at
//! `now` is allowed exactly when
//!
//! ```text
//! delay = max(TAT, now) − now + T × cost  ≤  τ
//! ```
//!
//! and then the new TAT is `now + delay`. A refused request leaves the TAT unchanged, so
//! rejected traffic does not push a key's recovery further out. A TAT at or before `now`
//! means a full bucket: it is the same as no record at all, which is why idle keys can
//! be dropped from a store without changing any decision.
//!
//! [`Quota::decide`] is a function of `(stored TAT, now, quota, cost)` only, with every
//! time in integer nanoseconds on the store's clock (`0` = absent record). Stores call it
//! under their lock; the Redis store runs the same steps in a Lua script with Redis
//! `TIME` as the clock. All arithmetic is checked: no input makes it panic or wrap.
//! (A Lua port must keep its numbers exact: Lua numbers are doubles, exact only below
//! 2^53, and nanoseconds since the Unix epoch are above that, so it should count from a
//! later epoch or in microseconds, rounding `T` up the same way.)
//!
//! ```
//! use std::time::Duration;
//! use keyward_core::gcra::Quota;
//!
//! // 10 requests per second, all 10 at once if the bucket is full.
//! let quota = Quota::new(10, Duration::from_secs(1)).unwrap();
//! let mut tat = 0; // no record yet
//! for i in 0..10 {
//!     let step = quota.decide(tat, 0, 1);
//!     assert!(step.decision.is_allowed());
//!     assert_eq!(step.decision.remaining, 9 - i);
//!     tat = step.new_tat.unwrap();
//! }
//! let refused = quota.decide(tat, 0, 1);
//! assert!(!refused.decision.is_allowed());
//! assert_eq!(refused.new_tat, None);
//! assert_eq!(refused.decision.retry_after(), Some(Duration::from_millis(100)));
//! // One emission interval later, exactly one more unit is available.
//! assert!(quota.decide(tat, 100_000_000, 1).decision.is_allowed());
//! ```

use std::time::Duration;

/// The largest tolerance (`per / limit × burst`) a quota may have: about 292 years, so
/// that `now + tolerance` fits in a `u64` of nanoseconds for as long as a store runs.
pub const MAX_TOLERANCE: Duration = Duration::from_nanos(i64::MAX as u64);

/// A quota that cannot be enforced. Each message names the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// `limit = 0` would refuse everything: say so with a route rule instead.
    #[error("quota limit must be at least 1, got 0")]
    ZeroLimit,
    /// The period is zero.
    #[error("quota period `per` must be longer than zero, got {0:?}")]
    ZeroPeriod(Duration),
    /// `burst = 0` would refuse everything.
    #[error("quota burst must be at least 1, got 0")]
    ZeroBurst,
    /// `per / limit × burst` is longer than [`MAX_TOLERANCE`] (or `per` does not fit in
    /// 64 bits of nanoseconds).
    #[error(
        "quota of {limit} per {per:?} with burst {burst} overflows: per / limit x burst must be at most {MAX_TOLERANCE:?}"
    )]
    Overflow {
        /// The limit.
        limit: u32,
        /// The period.
        per: Duration,
        /// The burst.
        burst: u32,
    },
}

/// `limit` units per `per`, with bursts of up to `burst` units (default: `limit`).
///
/// ```
/// use std::time::Duration;
/// use keyward_core::gcra::{Quota, QuotaError};
///
/// let quota = Quota::new(100, Duration::from_secs(60)).unwrap().with_burst(10).unwrap();
/// assert_eq!(quota.limit(), 100);
/// assert_eq!(quota.burst(), 10);
/// assert_eq!(quota.emission_interval(), Duration::from_millis(600));
///
/// assert_eq!(Quota::new(0, Duration::from_secs(1)), Err(QuotaError::ZeroLimit));
/// let err = Quota::new(1, Duration::ZERO).unwrap_err();
/// assert!(err.to_string().contains("per"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    limit: u32,
    per: Duration,
    burst: u32,
    emission_nanos: u64,
    tolerance_nanos: u64,
}

impl Quota {
    /// `limit` units per `per`, burst = `limit`.
    pub fn new(limit: u32, per: Duration) -> Result<Self, QuotaError> {
        Self::with_all(limit, per, limit)
    }

    /// `limit` units per second.
    pub fn per_second(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` units per minute.
    pub fn per_minute(limit: u32) -> Result<Self, QuotaError> {
        Self::new(limit, Duration::from_secs(60))
    }

    /// The same rate with another burst: how many units a full bucket holds.
    pub fn with_burst(self, burst: u32) -> Result<Self, QuotaError> {
        Self::with_all(self.limit, self.per, burst)
    }

    fn with_all(limit: u32, per: Duration, burst: u32) -> Result<Self, QuotaError> {
        if limit == 0 {
            return Err(QuotaError::ZeroLimit);
        }
        if per.is_zero() {
            return Err(QuotaError::ZeroPeriod(per));
        }
        if burst == 0 {
            return Err(QuotaError::ZeroBurst);
        }
        let overflow = QuotaError::Overflow { limit, per, burst };
        let per_nanos = u64::try_from(per.as_nanos()).map_err(|_| overflow.clone())?;
        // Rounded up: a quota never admits more than `limit` units per `per`.
        let emission_nanos = per_nanos.div_ceil(u64::from(limit));
        let tolerance_nanos = emission_nanos
            .checked_mul(u64::from(burst))
            .filter(|t| *t <= MAX_TOLERANCE.as_nanos() as u64)
            .ok_or(overflow)?;
        Ok(Quota {
            limit,
            per,
            burst,
            emission_nanos,
            tolerance_nanos,
        })
    }

    /// Units per period.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The period.
    pub fn per(&self) -> Duration {
        self.per
    }

    /// Units a full bucket holds.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Time to earn back one unit: `per / limit`, rounded up to a whole nanosecond.
    pub fn emission_interval(&self) -> Duration {
        Duration::from_nanos(self.emission_nanos)
    }

    /// How long an empty bucket takes to fill: `emission_interval × burst`.
    pub fn tolerance(&self) -> Duration {
        Duration::from_nanos(self.tolerance_nanos)
    }

    /// `per` in whole seconds, rounded up and at least 1: the `w` of `RateLimit-Policy`.
    pub fn window_seconds(&self) -> u64 {
        crate::problem::retry_after_seconds(self.per)
    }

    /// The GCRA step: decides a request of `cost` units at `now` for a key whose stored
    /// TAT is `tat` (nanoseconds on the store's clock; `0` or anything `<= now` = full
    /// bucket). Returns the decision and the TAT to store (`None`: leave it unchanged).
    ///
    /// A cost larger than the burst can never be allowed: it is limited with no
    /// retry time ([`QuotaDecision::retry_after`] is `None`). A cost of 0 only reports
    /// the state (allowed while the bucket is not over-full).
    pub fn decide(&self, tat: u64, now: u64, cost: u32) -> GcraStep {
        let t = self.emission_nanos;
        let tau = self.tolerance_nanos;
        // Time until the bucket is full again, before this request.
        let backlog = tat.saturating_sub(now);
        let delay = t
            .checked_mul(u64::from(cost))
            .and_then(|increment| backlog.checked_add(increment));
        match delay {
            Some(delay) if delay <= tau => GcraStep {
                new_tat: Some(now.saturating_add(delay)),
                decision: QuotaDecision {
                    verdict: Verdict::Allowed,
                    remaining: self.units_in(tau - delay),
                    reset_after: Duration::from_nanos(delay),
                },
            },
            _ => {
                // Over-full records (a quota lowered since they were written) report 0.
                let free = tau.saturating_sub(backlog);
                let retry_after = delay
                    .filter(|_| u64::from(cost) <= u64::from(self.burst))
                    .map(|delay| Duration::from_nanos(delay - tau));
                GcraStep {
                    new_tat: None,
                    decision: QuotaDecision {
                        verdict: Verdict::Limited { retry_after },
                        remaining: self.units_in(free),
                        reset_after: Duration::from_nanos(backlog),
                    },
                }
            }
        }
    }

    /// Charges `cost` units after the fact, whether or not they fit: the step of a quota
    /// priced by the response (`QuotaLayer::charge_after`), where the request was
    /// admitted before its cost was known. The bucket may go over-full, *into debt*: the
    /// new TAT is `max(TAT, now) + T × cost`, possibly beyond `now + τ`, and until the
    /// debt is paid back at the quota's rate every request is limited, with a
    /// [`QuotaDecision::retry_after`] that says exactly when one unit is free again.
    /// The debt is capped at [`MAX_TOLERANCE`] beyond `now` so that no input overflows.
    ///
    /// ```
    /// use std::time::Duration;
    /// use keyward_core::gcra::Quota;
    ///
    /// // 10 units per second; a response that turned out to cost 25.
    /// let quota = Quota::new(10, Duration::from_secs(1)).unwrap();
    /// let step = quota.charge(0, 0, 25);
    /// let tat = step.new_tat.unwrap();
    /// assert_eq!(step.decision.remaining, 0);
    /// assert_eq!(step.decision.reset_after, Duration::from_millis(2500));
    /// // In debt: the next request waits until one unit is free (1.6 s).
    /// let next = quota.decide(tat, 0, 1);
    /// assert!(!next.decision.is_allowed());
    /// assert_eq!(next.decision.retry_after(), Some(Duration::from_millis(1600)));
    /// assert!(quota.decide(tat, 1_600_000_000, 1).decision.is_allowed());
    /// ```
    pub fn charge(&self, tat: u64, now: u64, cost: u32) -> GcraStep {
        let max_debt = MAX_TOLERANCE.as_nanos() as u64;
        let backlog = tat.saturating_sub(now);
        let delay = self
            .emission_nanos
            .saturating_mul(u64::from(cost))
            .saturating_add(backlog)
            .min(max_debt.max(backlog));
        GcraStep {
            new_tat: Some(now.saturating_add(delay)),
            decision: QuotaDecision {
                verdict: Verdict::Allowed,
                remaining: self.units_in(self.tolerance_nanos.saturating_sub(delay)),
                reset_after: Duration::from_nanos(delay),
            },
        }
    }

    /// Whole units that fit in `nanos` of free tolerance (never more than `burst`).
    fn units_in(&self, nanos: u64) -> u32 {
        let units = nanos / self.emission_nanos;
        u32::try_from(units).unwrap_or(u32::MAX).min(self.burst)
    }
}

/// The result of [`Quota::decide`]: the decision and the TAT to store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GcraStep {
    /// The key's new TAT, or `None` to leave the stored one unchanged (refusals).
    pub new_tat: Option<u64>,
    /// What to answer.
    pub decision: QuotaDecision,
}

/// Whether a request fits its key's quota, and the numbers for the RateLimit headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaDecision {
    /// Allowed or limited.
    pub verdict: Verdict,
    /// Whole units left after this decision (`r` of the `RateLimit` header), at most the
    /// burst.
    pub remaining: u32,
    /// Time until the key's bucket is full again (`t` of the `RateLimit` header, rounded
    /// up to seconds).
    pub reset_after: Duration,
}

impl QuotaDecision {
    /// The request fits the quota and was counted.
    pub fn is_allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allowed)
    }

    /// For a limited request, how long until the same request would be allowed; `None`
    /// when allowed, or when the cost exceeds the burst and no wait can help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.verdict {
            Verdict::Allowed => None,
            Verdict::Limited { retry_after } => retry_after,
        }
    }
}

/// Allowed or limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within quota: the units were taken.
    Allowed,
    /// Over quota: nothing was taken.
    Limited {
        /// How long until the same request would be allowed, `None` if its cost exceeds
        /// the burst.
        retry_after: Option<Duration>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn validation_names_the_bad_value() {
        assert_eq!(
            Quota::new(0, Duration::from_secs(1)),
            Err(QuotaError::ZeroLimit)
        );
        assert_eq!(
            Quota::new(1, Duration::ZERO),
            Err(QuotaError::ZeroPeriod(Duration::ZERO))
        );
        assert_eq!(
            Quota::per_second(5).and_then(|q| q.with_burst(0)),
            Err(QuotaError::ZeroBurst)
        );
        let err = Quota::new(1, Duration::from_secs(400 * 365 * 86_400)).unwrap_err();
        assert!(matches!(err, QuotaError::Overflow { limit: 1, .. }));
        assert!(err.to_string().contains("burst 1"), "{err}");
        let err = Quota::new(1, Duration::MAX).unwrap_err();
        assert!(matches!(err, QuotaError::Overflow { .. }));
        let err = Quota::new(1, Duration::from_secs(3600))
            .unwrap()
            .with_burst(u32::MAX)
            .unwrap_err();
        assert!(err.to_string().contains(&u32::MAX.to_string()), "{err}");
    }

    #[test]
    fn emission_interval_rounds_up() {
        let quota = Quota::new(3, Duration::from_secs(1)).unwrap();
        assert_eq!(quota.emission_interval(), Duration::from_nanos(333_333_334));
        // More units than nanoseconds: one nanosecond each, never zero.
        let quota = Quota::new(u32::MAX, Duration::from_nanos(1)).unwrap();
        assert_eq!(quota.emission_interval(), Duration::from_nanos(1));
    }

    #[test]
    fn burst_then_one_per_interval() {
        let quota = Quota::new(10, Duration::from_secs(1)).unwrap();
        let mut tat = 0;
        for _ in 0..10 {
            tat = quota.decide(tat, 0, 1).new_tat.unwrap();
        }
        let refused = quota.decide(tat, 0, 1);
        assert_eq!(refused.new_tat, None);
        assert_eq!(refused.decision.remaining, 0);
        assert_eq!(refused.decision.reset_after, Duration::from_secs(1));
        assert_eq!(
            refused.decision.retry_after(),
            Some(Duration::from_millis(100))
        );
        // 99 ms later: still refused; at 100 ms: exactly one.
        assert!(!quota.decide(tat, 99 * MS, 1).decision.is_allowed());
        let step = quota.decide(tat, 100 * MS, 1);
        assert!(step.decision.is_allowed());
        assert_eq!(step.decision.remaining, 0);
        assert!(
            !quota
                .decide(step.new_tat.unwrap(), 100 * MS, 1)
                .decision
                .is_allowed()
        );
    }

    #[test]
    fn costs_take_several_units() {
        let quota = Quota::new(10, Duration::from_secs(1)).unwrap();
        let step = quota.decide(0, 0, 4);
        assert_eq!(step.decision.remaining, 6);
        assert_eq!(step.decision.reset_after, Duration::from_millis(400));
        let tat = step.new_tat.unwrap();
        let step = quota.decide(tat, 0, 7);
        assert_eq!(step.new_tat, None);
        assert_eq!(step.decision.remaining, 6);
        assert_eq!(
            step.decision.retry_after(),
            Some(Duration::from_millis(100))
        );
        assert!(quota.decide(tat, 0, 6).decision.is_allowed());
    }

    #[test]
    fn cost_over_burst_is_never_allowed() {
        let quota = Quota::new(10, Duration::from_secs(1)).unwrap();
        let step = quota.decide(0, 0, 11);
        assert_eq!(step.new_tat, None);
        assert_eq!(step.decision.retry_after(), None);
        assert_eq!(step.decision.remaining, 10);
        assert!(!step.decision.is_allowed());
    }

    #[test]
    fn zero_cost_reports_without_taking() {
        let quota = Quota::new(10, Duration::from_secs(1)).unwrap();
        let step = quota.decide(300 * MS, 0, 0);
        assert_eq!(step.new_tat, Some(300 * MS));
        assert_eq!(step.decision.remaining, 7);
    }

    #[test]
    fn lowered_quota_reports_zero_remaining() {
        let old = Quota::new(100, Duration::from_secs(1)).unwrap();
        let new = Quota::new(1, Duration::from_secs(1)).unwrap();
        let tat = old.decide(0, 0, 100).new_tat.unwrap();
        let step = new.decide(tat, 0, 1);
        assert!(!step.decision.is_allowed());
        assert_eq!(step.decision.remaining, 0);
    }

    #[test]
    fn charges_go_into_debt_and_the_next_request_waits_for_it() {
        let quota = Quota::new(10, Duration::from_secs(1)).unwrap();
        // Within the bucket: like a check.
        let step = quota.charge(0, 0, 4);
        assert_eq!(step.new_tat, Some(400 * MS));
        assert_eq!(step.decision.remaining, 6);
        // Beyond it: the debt is kept, and paid back at the quota's rate.
        let step = quota.charge(step.new_tat.unwrap(), 0, 20);
        let tat = step.new_tat.unwrap();
        assert_eq!(tat, 2_400 * MS);
        assert_eq!(step.decision.remaining, 0);
        let refused = quota.decide(tat, 500 * MS, 1);
        assert_eq!(
            refused.decision.retry_after(),
            Some(Duration::from_millis(1000))
        );
        assert!(quota.decide(tat, 1_500 * MS, 1).decision.is_allowed());
        // A zero charge changes nothing that matters.
        assert_eq!(quota.charge(tat, 0, 0).new_tat, Some(tat));
    }

    fn quota_strategy() -> impl Strategy<Value = Quota> {
        (1u32.., 1u64.., 1u32..).prop_filter_map("quota in range", |(limit, per, burst)| {
            Quota::new(limit, Duration::from_nanos(per))
                .and_then(|q| q.with_burst(burst))
                .ok()
        })
    }

    proptest! {
        #[test]
        fn no_panic_and_bounded(quota in quota_strategy(), tat: u64, now: u64, cost: u32) {
            let step = quota.decide(tat, now, cost);
            prop_assert!(step.decision.remaining <= quota.burst());
            if let Some(new_tat) = step.new_tat {
                prop_assert!(step.decision.is_allowed());
                prop_assert!(new_tat >= tat.max(now));
            }
            if u64::from(cost) > u64::from(quota.burst()) {
                prop_assert!(!step.decision.is_allowed());
            }
        }

        #[test]
        fn charges_never_panic_and_only_add(quota in quota_strategy(), tat: u64, now: u64, cost: u32) {
            let step = quota.charge(tat, now, cost);
            let new_tat = step.new_tat.unwrap();
            prop_assert!(new_tat >= tat.max(now));
            prop_assert!(step.decision.remaining <= quota.burst());
        }

        #[test]
        fn monotone_in_cost(quota in quota_strategy(), tat: u64, now: u64, a: u32, b: u32) {
            let (low, high) = (a.min(b), a.max(b));
            let low_step = quota.decide(tat, now, low);
            let high_step = quota.decide(tat, now, high);
            // A higher cost is never allowed where a lower one is refused.
            prop_assert!(!high_step.decision.is_allowed() || low_step.decision.is_allowed());
            if let (Some(lr), Some(hr)) = (low_step.decision.retry_after(), high_step.decision.retry_after()) {
                prop_assert!(lr <= hr);
            }
        }

        #[test]
        fn monotone_in_time(quota in quota_strategy(), tat: u64, now in 0u64..u64::MAX / 2, later in 0u64..u64::MAX / 2, cost: u32) {
            // What is allowed now is still allowed later.
            let before = quota.decide(tat, now, cost);
            let after = quota.decide(tat, now + later, cost);
            prop_assert!(!before.decision.is_allowed() || after.decision.is_allowed());
            if before.decision.is_allowed() == after.decision.is_allowed() {
                prop_assert!(after.decision.remaining >= before.decision.remaining);
            }
        }

        #[test]
        fn never_more_than_burst_plus_rate(quota in quota_strategy(), steps in proptest::collection::vec((0u64..2_000_000_000, 0u32..5), 1..60)) {
            // Over any run, allowed units <= burst + elapsed / emission interval.
            let mut tat = 0u64;
            let mut now = 0u64;
            let mut taken = 0u128;
            for (advance, cost) in steps {
                now += advance;
                let step = quota.decide(tat, now, cost);
                if let Some(new_tat) = step.new_tat {
                    tat = new_tat;
                    taken += u128::from(cost);
                }
            }
            let earned = u128::from(now) / quota.emission_interval().as_nanos();
            prop_assert!(taken <= u128::from(quota.burst()) + earned);
        }
    }
}

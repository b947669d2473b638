use std::future::Future;

use super::StoreError;
use crate::ScopedKey;
use crate::gcra::{Quota, QuotaDecision};

/// Storage for `QuotaLayer`: one GCRA decision ([`Quota::decide`]) per call, atomically
/// against the key's stored TAT.
///
/// One call is one decision: a remote store answers it in one round trip (the Redis
/// store runs the GCRA step in one Lua script with Redis `TIME` as the clock, so that
/// instances with skewed clocks agree).
///
/// The future is an associated type rather than `impl Future` so that the layer's
/// response future can be a named type without boxing: the in-memory store decides
/// synchronously and returns [`std::future::Ready`]. It owns everything it needs
/// (`'static`), so it may be polled after the request's borrows end.
pub trait QuotaStore: Clone + Send + Sync + 'static {
    /// The future of one decision.
    type CheckFuture: Future<Output = Result<QuotaDecision, StoreError>> + Send + 'static;

    /// Takes `cost` units of `quota` from `key` if they are available, and reports what
    /// is left. Refused requests take nothing.
    fn check(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture;

    /// What [`check`](QuotaStore::check) would answer for `cost` units now, taking
    /// nothing: the admission of a quota priced by its response, whose charge comes later
    /// ([`charge`](QuotaStore::charge)). One round trip, and it writes nothing.
    fn peek(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture;

    /// Takes `cost` units whether or not they are available ([`Quota::charge`]): the key
    /// may go into debt, and then its next requests are limited until the debt is paid
    /// back at the quota's rate. Reports what is left after the charge. One round trip.
    fn charge(&self, key: &ScopedKey, quota: &Quota, cost: u32) -> Self::CheckFuture;

    /// [`charge`](QuotaStore::charge) from a destructor (a response body that ended or
    /// was dropped): must not block and must not need the caller to poll anything. A
    /// failure is logged; the units are then not charged.
    fn charge_detached(&self, key: ScopedKey, quota: Quota, cost: u32);
}

//! Small helpers shared by every store module.

use std::future::Future;
use std::time::Duration;

use keyward_core::FencingToken;
use keyward_core::store::StoreError;
use tokio::task::AbortHandle;

/// A fencing token read from a script reply.
pub(crate) fn token_of(n: i64) -> Result<FencingToken, StoreError> {
    u64::try_from(n)
        .map(FencingToken)
        .map_err(|_| StoreError::Corrupt(format!("negative fencing token {n}")))
}

/// A duration as a script argument in milliseconds; Redis rejects a zero expiry, so it is
/// at least 1 ms.
pub(crate) fn millis(duration: Duration) -> String {
    duration.as_millis().clamp(1, i64::MAX as u128).to_string()
}

/// Runs `task` on the caller's runtime, or on `fallback` when called outside any (a
/// destructor on a plain thread).
pub(crate) fn spawn(
    fallback: &tokio::runtime::Handle,
    task: impl Future<Output = ()> + Send + 'static,
) -> AbortHandle {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => handle.spawn(task).abort_handle(),
        Err(_) => fallback.spawn(task).abort_handle(),
    }
}

/// A random id per store (`RandomState`'s keys are random per process and per call), so
/// that nonces and waiter ids of two processes never collide.
pub(crate) fn instance_id() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id())
}

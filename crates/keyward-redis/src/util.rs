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

/// A number as a script argument, formatted on the stack: no allocation per call.
#[derive(Clone, Copy)]
pub(crate) struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub(crate) fn new(mut n: u64) -> Self {
        let mut digits = [b'0'; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Decimal { digits, start }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

/// [`millis`] without the allocation.
pub(crate) fn millis_arg(duration: Duration) -> Decimal {
    Decimal::new(duration.as_millis().clamp(1, i64::MAX as u128) as u64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_what_to_string_gives() {
        for n in [0, 1, 9, 10, 86_400_000, u64::MAX] {
            assert_eq!(Decimal::new(n).as_bytes(), n.to_string().as_bytes());
        }
        assert_eq!(millis_arg(Duration::ZERO).as_bytes(), b"1");
        assert_eq!(
            millis_arg(Duration::from_secs(5)).as_bytes(),
            millis(Duration::from_secs(5)).as_bytes()
        );
        assert_eq!(
            millis_arg(Duration::MAX).as_bytes(),
            millis(Duration::MAX).as_bytes()
        );
    }
}

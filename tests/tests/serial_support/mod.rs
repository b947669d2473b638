//! Shared by the serial test files.

use keyward_core::ScopedKey;
use keyward_core::store::{AcquireOutcome, SerialLimits, SerialPermit, SerialStore, StoreError};

/// A serial store whose every call fails, as an unreachable Redis would.
#[derive(Clone, Debug)]
pub struct DownStore;

impl SerialStore for DownStore {
    async fn acquire(
        &self,
        _key: &ScopedKey,
        _limits: SerialLimits,
    ) -> Result<AcquireOutcome, StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    async fn release(&self, _permit: SerialPermit) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("connection refused".into()))
    }

    fn release_detached(&self, _permit: SerialPermit) {}
}

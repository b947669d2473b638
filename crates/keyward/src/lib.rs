//! keyward: one coordinator per key.
#![forbid(unsafe_code)]

#[cfg(feature = "memory")]
mod memory;
pub mod quota;

#[cfg(feature = "memory")]
pub use memory::{MemoryStore, MemoryStoreBuilder};

pub use keyward_core::store::OnStoreError;
pub use keyward_core::{Key, KeyExtractor, KeySpec, KeywardBody};
pub use quota::QuotaLayer;

/// The core types, re-exported.
pub use keyward_core as core;

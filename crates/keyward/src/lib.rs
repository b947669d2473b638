//! keyward: one coordinator per key.
#![forbid(unsafe_code)]

#[cfg(feature = "memory")]
mod memory;
pub mod serial;

#[cfg(feature = "memory")]
pub use memory::{MemoryStore, MemoryStoreBuilder};
pub use serial::{PerKeySerial, PerKeySerialLayer};

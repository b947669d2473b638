//! keyward: one coordinator per key.
#![forbid(unsafe_code)]

#[cfg(feature = "memory")]
mod memory;

#[cfg(feature = "memory")]
pub use memory::{MemoryStore, MemoryStoreBuilder};

pub mod single_flight;
pub use single_flight::{LeaderFailure, SingleFlightLayer};

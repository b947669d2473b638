//! Runnable examples: the payments service (`payments/`), the demo upstream for the
//! sidecar configs (`upstream/`, built on [`upstream`]), and the guides in
//! `docs/guides/`, whose code runs as this crate's doc tests (`cargo test --doc -p
//! examples`), so a page cannot show code that does not work.

pub mod upstream;

/// The guides of `docs/guides/`, one module per page; their Rust blocks are doc tests.
pub mod guides {
    #[doc = include_str!("../../docs/guides/retried-payments.md")]
    pub mod retried_payments {}

    #[doc = include_str!("../../docs/guides/webhooks.md")]
    pub mod webhooks {}

    #[doc = include_str!("../../docs/guides/per-tenant-quotas.md")]
    pub mod per_tenant_quotas {}

    #[doc = include_str!("../../docs/guides/cache-stampedes.md")]
    pub mod cache_stampedes {}

    #[doc = include_str!("../../docs/guides/fencing-tokens.md")]
    pub mod fencing_tokens {}

    #[doc = include_str!("../../docs/guides/where-keyward-stops.md")]
    pub mod where_keyward_stops {}
}

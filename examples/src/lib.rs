//! Runnable examples: the payments service (`payments/`), the demo upstream for the
//! sidecar configs (`upstream/`, built on [`upstream`]), and the guides' examples.

pub mod upstream;

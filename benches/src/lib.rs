//! Criterion benches for keyward; see `*.rs` beside this crate manifest.

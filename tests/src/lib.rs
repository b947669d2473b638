//! Black-box integration tests for keyward; see `tests/*.rs`.

//! Runnable examples; see `payments/`.

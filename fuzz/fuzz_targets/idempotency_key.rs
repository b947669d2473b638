//! `parse_idempotency_key` on any string: never panics, and what it accepts is 1..=255
//! printable ASCII characters that survive a round trip through an sf-string.
#![no_main]

use keyward_core::ratelimit::sf_string;
use keyward_core::{MAX_IDEMPOTENCY_KEY_LEN, parse_idempotency_key};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(key) = parse_idempotency_key(value) else {
        return;
    };
    assert!(!key.is_empty());
    assert!(key.len() <= MAX_IDEMPOTENCY_KEY_LEN);
    assert!(key.chars().all(|c| (' '..='~').contains(&c)), "{key:?}");
    // Quoting the key as an sf-string gives back the same key.
    assert_eq!(parse_idempotency_key(&sf_string(&key)).as_deref(), Ok(key.as_str()));
});

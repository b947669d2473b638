//! RateLimit header round trip: `format_policy`/`format_ratelimit` then `parse_item`
//! give back the numbers and the (sf-string mapped) name, the formatted field is a valid
//! header value, and `parse_item` never panics on any input.
#![no_main]

use keyward_core::ratelimit::{format_policy, format_ratelimit, parse_item};
use libfuzzer_sys::fuzz_target;

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = data.get(at + i).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // Any input: parse_item must not panic.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_item(text);
    }
    let (count, seconds) = (u32_at(data, 0), u64_at(data, 4));
    let name = String::from_utf8_lossy(data.get(12..).unwrap_or_default()).into_owned();
    // What an sf-string can carry: printable ASCII, anything else becomes '?'.
    let carried: String = name
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();

    for (field, keys) in [
        (format_policy(&name, count, seconds), ["q", "w"]),
        (format_ratelimit(&name, count, seconds), ["r", "t"]),
    ] {
        assert!(http::HeaderValue::from_str(&field).is_ok(), "{field:?}");
        let item = parse_item(&field).unwrap_or_else(|| panic!("unparsable {field:?}"));
        assert_eq!(item.name, carried);
        assert_eq!(
            item.params,
            vec![
                (keys[0].to_owned(), u64::from(count)),
                (keys[1].to_owned(), seconds)
            ]
        );
    }
});

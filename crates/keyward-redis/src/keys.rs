//! Where records live in Redis.
//!
//! Every record of one [`ScopedKey`] is named `{prefix}{layer}:{route}:{<tag>}` plus an
//! optional suffix (`:n` for the fencing counter), where `<tag>` is the first 32 hex
//! digits (128 bits) of the SHA-256 of the scoped key's storage key. So:
//!
//! - the raw key and the principal's scope never appear in Redis (`SCAN`, `MONITOR`,
//!   slow log and RDB dumps show hashes only); the layer and route stay readable;
//! - all records of one key share a Redis Cluster hash tag, hence one slot, so one Lua
//!   script may touch all of them.
//!
//! A `{` in the prefix or route makes Redis take its hash tag from there instead; every
//! record of a key still shares that tag (they differ only after it), so one key's records
//! stay in one slot, only the spread over slots gets coarser.

use std::sync::Arc;

use keyward_core::ScopedKey;
use sha2::{Digest, Sha256};

/// Names of records and channels for one store prefix.
#[derive(Clone, Debug)]
pub(crate) struct KeyLayout {
    prefix: Arc<str>,
    channel: Arc<str>,
}

impl KeyLayout {
    pub(crate) fn new(prefix: &str) -> Self {
        KeyLayout {
            prefix: prefix.into(),
            channel: format!("{prefix}settled").into(),
        }
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{prefix}{layer}:{route}:{<tag>}`: the main record of `key`.
    pub(crate) fn record(&self, key: &ScopedKey) -> String {
        let mut name = String::with_capacity(self.record_len(key));
        self.push_record_of(key, &Self::digest(key), &mut name);
        name
    }

    /// An upper bound of the length of [`KeyLayout::record`] (for sizing buffers).
    pub(crate) fn record_len(&self, key: &ScopedKey) -> usize {
        self.prefix.len() + key.layer().len() + key.route().len() + 36
    }

    /// The SHA-256 of `key`'s storage key, for [`KeyLayout::push_record_of`].
    pub(crate) fn digest(key: &ScopedKey) -> [u8; 32] {
        Sha256::digest(key.storage_key().as_bytes()).into()
    }

    /// Appends [`KeyLayout::record`] of `key`, whose [`KeyLayout::digest`] is `digest`, to
    /// `name` (twice into one buffer: a record and its companions without hashing again).
    pub(crate) fn push_record_of(&self, key: &ScopedKey, digest: &[u8; 32], name: &mut String) {
        name.push_str(&self.prefix);
        name.push_str(key.layer());
        name.push(':');
        name.push_str(key.route());
        name.push_str(":{");
        for byte in &digest[..16] {
            name.push(HEX[usize::from(byte >> 4)]);
            name.push(HEX[usize::from(byte & 0x0f)]);
        }
        name.push('}');
    }

    /// A companion record of `record` (same hash tag, so same slot).
    pub(crate) fn companion(record: &str, suffix: &str) -> String {
        format!("{record}:{suffix}")
    }

    /// The one pub/sub channel of this prefix: every "a holder let go of a key" event is
    /// published here with the record name as payload, and the store's hub routes it to
    /// the local waiters of that record.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }
}

const HEX: [char; 16] = [
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
];

/// The hash slot Redis Cluster assigns to `name` (CRC16 of its hash tag, mod 16384).
#[cfg(test)]
fn slot(name: &str) -> u16 {
    let bytes = name.as_bytes();
    let tagged = bytes
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for byte in tagged {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyward_core::{Key, Scope};

    fn key(route: &str, raw: &str) -> ScopedKey {
        ScopedKey::new("idem", route, Scope::of(b"Bearer alice"), Key::from(raw))
    }

    #[test]
    fn record_names_hide_the_raw_key_and_scope() {
        let layout = KeyLayout::new("keyward:");
        let name = layout.record(&key("payments", "order-42"));
        assert!(name.starts_with("keyward:idem:payments:{"), "{name}");
        assert!(name.ends_with('}'));
        assert_eq!(name.len(), "keyward:idem:payments:{}".len() + 32);
        assert!(!name.contains("order-42"));
        assert!(!name.contains(keyward_core::KeyHash::of(b"Bearer alice").as_str()));
    }

    #[test]
    fn different_scopes_and_keys_get_different_records() {
        let layout = KeyLayout::new("k:");
        let alice = layout.record(&key("r", "k1"));
        let bob = layout.record(&ScopedKey::new(
            "idem",
            "r",
            Scope::of(b"Bearer bob"),
            Key::from("k1"),
        ));
        assert_ne!(alice, bob);
        assert_ne!(alice, layout.record(&key("r", "k2")));
    }

    #[test]
    fn companions_share_the_slot_even_with_braces_in_prefix_or_route() {
        for (prefix, route) in [("keyward:", "payments"), ("{app}:", "r"), ("p:", "a{b")] {
            let layout = KeyLayout::new(prefix);
            let record = layout.record(&key(route, "k"));
            let counter = KeyLayout::companion(&record, "n");
            assert_eq!(slot(&record), slot(&counter), "{record}");
        }
        // The known CRC16 test vector of the cluster spec.
        assert_eq!(slot("123456789"), 0x31c3);
    }
}

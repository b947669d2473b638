//! The process-wide key hash secret (its own test binary: the secret is set once per
//! process).
#![allow(clippy::unwrap_used)]

use keyward_core::{Key, KeyHash, Scope, ScopedKey, set_key_hash_secret};

#[test]
fn once_a_secret_is_set_every_outgoing_key_hash_is_keyed_and_storage_is_not() {
    let guessable = Key::from("203.0.113.7");
    let scoped = ScopedKey::new("quota", "r", Scope::of(b"Bearer a"), guessable.clone());
    let unkeyed = KeyHash::of(b"203.0.113.7");
    let storage_before = scoped.storage_key().to_owned();
    set_key_hash_secret(b"deployment secret").unwrap();
    set_key_hash_secret(b"deployment secret").unwrap();
    assert!(set_key_hash_secret(b"another").is_err());

    let keyed = KeyHash::keyed(b"deployment secret", b"203.0.113.7");
    assert_ne!(keyed, unkeyed);
    assert_eq!(guessable.hash(), keyed);
    let scoped = ScopedKey::new("quota", "r", Scope::of(b"Bearer a"), guessable);
    assert_eq!(scoped.key_hash(), keyed);
    // Coordination does not depend on the secret: instances with different secrets (or
    // none) still share records.
    assert_eq!(scoped.storage_key(), storage_before);
    assert_eq!(
        Scope::of(b"Bearer a"),
        Scope::Principal(KeyHash::of(b"Bearer a"))
    );
}

use std::fmt;
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

/// A coordination key taken from a request, e.g. an `Idempotency-Key` header value or a
/// tenant id.
///
/// The raw value is sensitive (it may be a customer id or a bearer-like token): its
/// `Debug` output is redacted and telemetry only ever sees its [`KeyHash`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// Wraps a raw key value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Key(value.into())
    }

    /// The raw key value. Do not log it; use [`Key::hash`].
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The telemetry-safe hash of this key: keyed with the process's
    /// [`set_key_hash_secret`] if one is set.
    pub fn hash(&self) -> KeyHash {
        KeyHash::for_telemetry(self.as_str().as_bytes())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.hash())
    }
}

impl From<&str> for Key {
    fn from(value: &str) -> Self {
        Key::new(value)
    }
}

impl From<String> for Key {
    fn from(value: String) -> Self {
        Key::new(value)
    }
}

/// The first 16 hex digits of the SHA-256 of a key: what spans, logs and metrics carry in
/// place of the raw key (`keyward.key_hash`). Once a process has called
/// [`set_key_hash_secret`] (the sidecar does at start-up), every key hash that leaves
/// it ([`Key::hash`], [`ScopedKey::key_hash`]) is [`KeyHash::keyed`] with that secret, so
/// guessable keys (IP addresses, tenant ids) cannot be recovered by hashing guesses.
///
/// ```
/// use keyward_core::Key;
/// let hash = Key::from("order-42").hash();
/// assert_eq!(hash.as_str().len(), 16);
/// assert_eq!(hash, Key::from("order-42").hash());
/// assert_ne!(hash, Key::from("order-43").hash());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 16]);

impl KeyHash {
    /// Hashes arbitrary bytes.
    pub fn of(bytes: &[u8]) -> Self {
        let digest = Sha256::digest(bytes);
        let mut hex = [0u8; 16];
        for (i, byte) in digest.iter().take(8).enumerate() {
            hex[2 * i] = HEX[(byte >> 4) as usize];
            hex[2 * i + 1] = HEX[(byte & 0x0f) as usize];
        }
        KeyHash(hex)
    }

    /// Hashes `bytes` keyed with `secret`, for deployments where keys are guessable
    /// (tenant ids, account numbers) and an unkeyed hash could be reversed by enumeration.
    pub fn keyed(secret: &[u8], bytes: &[u8]) -> Self {
        let mut input = Vec::with_capacity(secret.len() + bytes.len() + 8);
        input.extend_from_slice(&(secret.len() as u64).to_be_bytes());
        input.extend_from_slice(secret);
        input.extend_from_slice(bytes);
        Self::of(&input)
    }

    /// The hash telemetry shows for `bytes`: [`KeyHash::keyed`] with the process's
    /// [`set_key_hash_secret`], or [`KeyHash::of`] if none is set.
    pub fn for_telemetry(bytes: &[u8]) -> Self {
        match KEY_HASH_SECRET.get() {
            Some(secret) => Self::keyed(secret, bytes),
            None => Self::of(bytes),
        }
    }

    /// The 16 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        // The array only ever holds bytes from `HEX`.
        std::str::from_utf8(&self.0).unwrap_or("0000000000000000")
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

static KEY_HASH_SECRET: OnceLock<Box<[u8]>> = OnceLock::new();

/// [`set_key_hash_secret`] was called before, with another secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the key hash secret of this process is already set to another value")]
pub struct KeyHashSecretSet;

/// Sets the secret every key hash that leaves this process is keyed with (see
/// [`KeyHash`]). Once per process: hashes must not change while it runs. Setting the
/// same secret again is a no-op; another one is an error. Storage keys and principal
/// scopes do not depend on it, so processes with different secrets still coordinate.
pub fn set_key_hash_secret(secret: &[u8]) -> Result<(), KeyHashSecretSet> {
    let set = KEY_HASH_SECRET.get_or_init(|| secret.into());
    if **set == *secret {
        Ok(())
    } else {
        Err(KeyHashSecretSet)
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.as_str())
    }
}

/// Who a key belongs to: the hash of the principal (by default the `Authorization`
/// header), or [`Scope::Unscoped`] where a route shares keys between all callers.
///
/// Two principals that send the same `Idempotency-Key` get different scopes, so neither
/// can ever see the other's stored response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Keys are shared by every caller of the route (`scope = "none"`).
    Unscoped,
    /// Keys belong to the principal with this hash.
    Principal(KeyHash),
    /// The route is scoped but the request carries no principal: all anonymous callers
    /// share one scope, separate from every authenticated principal.
    Anonymous,
}

impl Scope {
    /// The scope of a principal value.
    pub fn of(principal: &[u8]) -> Self {
        Scope::Principal(KeyHash::of(principal))
    }

    fn as_str(&self) -> &str {
        match self {
            Scope::Unscoped => "-",
            Scope::Anonymous => "anon",
            Scope::Principal(hash) => hash.as_str(),
        }
    }
}

/// A key with everything that decides which requests it coordinates: the layer, the route
/// and the principal's scope. Its [`ScopedKey::storage_key`] is
/// `{layer}:{route}:{scope}:{key}`, where a `:` or `%` inside the layer or route name is
/// written `%3A` / `%25`: no two (layer, route, scope, key) share a storage key, whatever
/// the route is called (the scope never holds a `:`, and the key comes last).
///
/// ```
/// use keyward_core::{Key, Scope, ScopedKey};
/// let a = ScopedKey::new("idem", "payments", Scope::of(b"Bearer alice"), Key::from("k1"));
/// let b = ScopedKey::new("idem", "payments", Scope::of(b"Bearer bob"), Key::from("k1"));
/// assert_ne!(a.storage_key(), b.storage_key());
/// assert!(a.storage_key().starts_with("idem:payments:"));
/// assert!(a.storage_key().ends_with(":k1"));
/// ```
#[derive(Clone)]
pub struct ScopedKey {
    storage_key: Arc<str>,
    /// Computed on first use: most requests are never traced, and a SHA-256 per request
    /// is a large share of a layer's cost.
    key_hash: OnceLock<KeyHash>,
    layer_end: usize,
    route_end: usize,
    key_start: usize,
    /// The route as given, when the storage key had to escape it.
    escaped_route: Option<Arc<str>>,
}

impl PartialEq for ScopedKey {
    fn eq(&self, other: &Self) -> bool {
        self.storage_key == other.storage_key
    }
}

impl Eq for ScopedKey {}

impl std::hash::Hash for ScopedKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.storage_key.hash(state);
    }
}

impl ScopedKey {
    /// Builds the scoped key of `key` for `layer` on `route`.
    pub fn new(layer: &str, route: &str, scope: Scope, key: Key) -> Self {
        Self::build(layer, route, scope, &key, OnceLock::new())
    }

    /// Like [`ScopedKey::new`] with a precomputed (possibly keyed) telemetry hash.
    pub fn with_hash(layer: &str, route: &str, scope: Scope, key: &Key, key_hash: KeyHash) -> Self {
        Self::build(layer, route, scope, key, OnceLock::from(key_hash))
    }

    fn build(
        layer: &str,
        route: &str,
        scope: Scope,
        key: &Key,
        key_hash: OnceLock<KeyHash>,
    ) -> Self {
        // Built by hand: this runs on every keyed request, and `format!` costs several
        // times more than the copies.
        let (scope, key_str) = (scope.as_str(), key.as_str());
        let mut storage_key =
            String::with_capacity(layer.len() + route.len() + scope.len() + key_str.len() + 3);
        push_escaped(&mut storage_key, layer);
        let layer_end = storage_key.len();
        storage_key.push(':');
        push_escaped(&mut storage_key, route);
        let route_end = storage_key.len();
        storage_key.push(':');
        storage_key.push_str(scope);
        storage_key.push(':');
        storage_key.push_str(key_str);
        let escaped_route = (route_end - layer_end - 1 != route.len()).then(|| route.into());
        ScopedKey {
            key_start: storage_key.len() - key_str.len(),
            storage_key: storage_key.into(),
            key_hash,
            layer_end,
            route_end,
            escaped_route,
        }
    }

    /// `{layer}:{route}:{scope}:{key}`: the name the record has in the store.
    pub fn storage_key(&self) -> &str {
        &self.storage_key
    }

    /// The storage key as a shared string, for use as a map key without copying.
    pub fn shared_storage_key(&self) -> Arc<str> {
        self.storage_key.clone()
    }

    /// The telemetry-safe hash of the raw key (not of the scope).
    pub fn key_hash(&self) -> KeyHash {
        *self.key_hash.get_or_init(|| {
            let raw = self.storage_key.get(self.key_start..).unwrap_or_default();
            KeyHash::for_telemetry(raw.as_bytes())
        })
    }

    /// The layer's short name this key was built for (`idem`, `quota`, ...).
    ///
    /// ```
    /// use keyward_core::{Key, Scope, ScopedKey};
    /// let key = ScopedKey::new("idem", "pay:v2", Scope::Unscoped, Key::from("a:b"));
    /// assert_eq!((key.layer(), key.route()), ("idem", "pay:v2"));
    /// ```
    pub fn layer(&self) -> &str {
        self.storage_key.get(..self.layer_end).unwrap_or_default()
    }

    /// The route this key was built for; stores may show it in clear (it is configuration,
    /// not request data).
    pub fn route(&self) -> &str {
        if let Some(route) = &self.escaped_route {
            return route;
        }
        self.storage_key
            .get(self.layer_end + 1..self.route_end)
            .unwrap_or_default()
    }
}

/// `part` with `%` and `:` percent-encoded, so that it cannot end early.
fn push_escaped(out: &mut String, part: &str) {
    if !part.contains([':', '%']) {
        out.push_str(part);
        return;
    }
    for c in part.chars() {
        match c {
            ':' => out.push_str("%3A"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
}

impl fmt::Debug for ScopedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopedKey({})", self.key_hash())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_key_hash_is_the_hash_of_the_raw_key() {
        let key = ScopedKey::new("idem", "r:1", Scope::of(b"p"), Key::from("a:b"));
        assert_eq!(key.key_hash(), Key::from("a:b").hash());
        let keyed = KeyHash::keyed(b"s", b"a:b");
        let with = ScopedKey::with_hash("idem", "r:1", Scope::of(b"p"), &Key::from("a:b"), keyed);
        assert_eq!(with.key_hash(), keyed);
        assert_eq!(key, with, "equality is the storage key's");
    }

    #[test]
    fn route_names_with_colons_never_share_a_storage_key() {
        let key = |route: &str, scope: Scope, raw: &str| {
            ScopedKey::new("idem", route, scope, Key::from(raw))
        };
        // Before escaping, each pair had one storage key: `idem:r:-:-:k`, `idem:r:anon:x:k`.
        let pairs = [
            (
                key("r:-", Scope::Unscoped, "k"),
                key("r", Scope::Unscoped, "-:k"),
            ),
            (
                key("r:anon", Scope::Unscoped, "k"),
                key("r", Scope::Anonymous, "-:k"),
            ),
            (
                key("r:anon:x", Scope::Unscoped, "k"),
                key("r", Scope::Anonymous, "x:-:k"),
            ),
            (
                key("a%3Ab", Scope::Unscoped, "k"),
                key("a:b", Scope::Unscoped, "k"),
            ),
        ];
        for (a, b) in &pairs {
            assert_ne!(
                a.storage_key(),
                b.storage_key(),
                "{} / {}",
                a.route(),
                b.route()
            );
        }
        let odd = key("pay:v2%", Scope::Unscoped, "k");
        assert_eq!(odd.storage_key(), "idem:pay%3Av2%25:-:k");
        assert_eq!((odd.layer(), odd.route()), ("idem", "pay:v2%"));
        let plain = key("payments", Scope::Unscoped, "a:b");
        assert_eq!(plain.storage_key(), "idem:payments:-:a:b");
        assert_eq!(plain.route(), "payments");
    }
}

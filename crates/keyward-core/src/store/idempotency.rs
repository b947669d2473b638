use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::StoreError;
use crate::{FencingToken, ScopedKey};

/// What identifies "the same request" for an idempotency key: SHA-256 over method, path,
/// query, body and any configured headers. A key reused with another fingerprint is a
/// client bug and gets 422.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Starts a fingerprint; feed it parts with [`FingerprintBuilder::part`].
    pub fn builder() -> FingerprintBuilder {
        FingerprintBuilder(Sha256::new())
    }
}

/// Incremental [`Fingerprint`]; every part is length-prefixed so parts cannot run into
/// each other.
#[derive(Clone, Debug)]
pub struct FingerprintBuilder(Sha256);

impl FingerprintBuilder {
    /// Adds one part.
    pub fn part(mut self, bytes: &[u8]) -> Self {
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
        self
    }

    /// The fingerprint.
    pub fn finish(self) -> Fingerprint {
        Fingerprint(self.0.finalize().into())
    }
}

/// A completed response as stored for replay: status, the allow-listed headers, the
/// body and any trailers (gRPC puts its status there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// Status code.
    pub status: StatusCode,
    /// Headers that may be replayed (never `Set-Cookie`, `Authorization`, `Date` or
    /// hop-by-hop headers).
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if the response had any.
    pub trailers: Option<HeaderMap>,
}

impl StoredResponse {
    /// Approximate memory held by this record, for capacity accounting.
    pub fn weight(&self) -> usize {
        let header_bytes = |map: &HeaderMap| {
            map.iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 32)
                .sum::<usize>()
        };
        128 + self.body.len()
            + header_bytes(&self.headers)
            + self.trailers.as_ref().map_or(0, header_bytes)
    }
}

/// The answer to a claim: one round trip decides which of these holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key was free (or its previous holder's lease expired): the caller now holds it
    /// and must complete or release it with this token.
    Claimed(FencingToken),
    /// Another request holds the key with the same fingerprint.
    InFlight {
        /// The holder's token, to wait for its completion with
        /// [`IdempotencyStore::wait_settled`].
        holder: FencingToken,
        /// Time left on the holder's lease.
        lease_left: Duration,
    },
    /// A response is stored for this key and fingerprint: replay it.
    Completed(Arc<StoredResponse>),
    /// The key is held or completed with a different fingerprint.
    Mismatch,
}

/// The answer to a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The response is stored under the key.
    Stored,
    /// The caller's lease had expired and someone else holds (or completed) the key: the
    /// response was not stored. This is what fencing prevents: a stalled holder
    /// overwriting its successor.
    Fenced,
}

/// What a store holds for one key, as [`IdempotencyStore::inspect`] reports it: the
/// answer to a support engineer's "did it already happen?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordState {
    /// Nothing: never used, released (the request failed and may be retried), or expired.
    Absent,
    /// A request holds the key right now.
    InFlight {
        /// The holder's fencing token.
        holder: FencingToken,
        /// Time left on its lease.
        lease_left: Duration,
        /// The fingerprint of the holder's request.
        fingerprint: Fingerprint,
    },
    /// The request ran and its response is stored for replay.
    Completed {
        /// The stored response's status.
        status: StatusCode,
        /// The fingerprint of the request that ran.
        fingerprint: Fingerprint,
        /// Time until the record expires (its TTL minus its age).
        expires_in: Duration,
    },
}

/// Storage for `IdempotencyLayer`: claims with leases and fencing tokens, completed
/// responses with a TTL, and waiting for an in-flight claim to settle.
pub trait IdempotencyStore: Clone + Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint`, or reports why not.
    fn claim(
        &self,
        key: &ScopedKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;

    /// Stores `response` for `ttl` if `token` still holds the key.
    fn complete(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        fingerprint: &Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<Completion, StoreError>> + Send;

    /// Frees `key` if `token` still holds it, so that a retry executes again.
    fn release(
        &self,
        key: &ScopedKey,
        token: FencingToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Frees `key` from a destructor (a cancelled or panicked request): must not block and
    /// must not need the caller to poll anything.
    fn release_detached(&self, key: ScopedKey, token: FencingToken);

    /// Extends the lease of `token` on `key`; `false` if it no longer holds the key.
    fn renew(
        &self,
        key: &ScopedKey,
        token: FencingToken,
        lease: Duration,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Resolves once the claim of `holder` on `key` is completed or released (or already
    /// is), or after `max`, whichever is first. Wakes on a notification, never by polling
    /// the store in a loop. Callers claim again afterwards to learn the result.
    fn wait_settled(
        &self,
        key: &ScopedKey,
        holder: FencingToken,
        max: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reports what the store holds for `key`, changing nothing: for operators' tools
    /// (the sidecar's `GET /keys/{route}/{key}`), never on the request path. Stores that
    /// cannot tell keep this default, which answers [`StoreError::Unavailable`].
    fn inspect(
        &self,
        key: &ScopedKey,
    ) -> impl Future<Output = Result<RecordState, StoreError>> + Send {
        let _ = key;
        std::future::ready(Err(StoreError::Unavailable(
            "this store cannot inspect records".to_owned(),
        )))
    }

    /// Forgets what the store holds for `key` and answers what that was: a completed
    /// record is deleted (the next request with the key executes again), an in-flight
    /// claim is freed *and fenced*: its holder, if it comes back, can neither complete
    /// nor renew, and whoever claims next gets a higher fencing token. For operators'
    /// tools (the sidecar's `DELETE /keys/{route}/{key}`), never on the request path.
    /// Stores that cannot keep this default, which answers [`StoreError::Unavailable`].
    fn forget(
        &self,
        key: &ScopedKey,
    ) -> impl Future<Output = Result<RecordState, StoreError>> + Send {
        let _ = key;
        std::future::ready(Err(StoreError::Unavailable(
            "this store cannot forget records".to_owned(),
        )))
    }
}

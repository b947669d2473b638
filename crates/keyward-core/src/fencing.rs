use std::fmt;

/// A fencing token: strictly increasing per key across all holders of that key.
///
/// Layers insert it as a request extension (and `PerKeySerialLayer` also forwards it as
/// the `Keyward-Fencing-Token` header) so that a downstream resource can reject a write
/// that carries a token lower than the highest it has seen: a holder whose lease expired
/// while it was stalled can then no longer overwrite the work of its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token as a number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

//! Every script's reply, decoded in one place. Scripts answer arrays of integers and bulk
//! strings whose first element says which case it is (each script's Lua header lists
//! them); here each becomes an enum, so the modules match on names, not on numbers.

use std::time::Duration;

use keyward_core::FencingToken;
use keyward_core::store::StoreError;
use redis::Value;

use crate::util::token_of;

/// `idempotency/claim.lua`.
#[derive(Debug)]
pub(crate) enum Claim {
    Claimed(FencingToken),
    InFlight {
        holder: FencingToken,
        lease_left: Duration,
    },
    /// The stored response, in the form of `codec.rs`.
    Completed(Vec<u8>),
    Mismatch,
}

/// `idempotency/inspect.lua`.
#[derive(Debug)]
pub(crate) enum Inspect {
    Absent,
    Held {
        holder: FencingToken,
        lease_left: Duration,
        fingerprint: Vec<u8>,
    },
    Completed {
        response: Vec<u8>,
        expires_in: Duration,
        fingerprint: Vec<u8>,
    },
}

/// `serial/acquire.lua` and `serial/check.lua` (which never answers `QueueFull`).
#[derive(Debug)]
pub(crate) enum Turn {
    Acquired(FencingToken),
    /// Still queued behind a holder whose lease has this long left.
    Queued {
        lease_left: Duration,
    },
    QueueFull,
    /// Not queued any more (or `max_wait` was zero): out of time.
    TimedOut,
}

/// `serial/leave.lua`.
#[derive(Debug)]
pub(crate) enum Leave {
    /// The key had been handed over before the waiter left, and it keeps it.
    Kept(FencingToken),
    Left,
}

/// `flight/lead.lua`.
#[derive(Debug)]
pub(crate) enum Lead {
    Leader(FencingToken),
    Follower,
    /// A landed response kept for reuse (in the form of `single_flight.rs`), and how
    /// much longer it is kept.
    Reused {
        landing: Vec<u8>,
        kept_for: Duration,
    },
}

/// `flight/watch.lua`.
#[derive(Debug)]
pub(crate) enum Flight {
    Flying {
        token: FencingToken,
        lease_left: Duration,
    },
    Grounded,
}

/// `flight/landed.lua`.
#[derive(Debug)]
pub(crate) enum Landed {
    /// The landing, in the form of `single_flight.rs`.
    Down(Vec<u8>),
    Flying {
        lease_left: Duration,
    },
    /// Ended without a landing: failed, abandoned, or its lease ran out.
    Ended,
}

/// The fenced steps that answer 1 or 0 (complete, renew, release).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fenced {
    Done,
    /// The caller's token does not hold the key (any more).
    NotHolder,
}

/// `quota/check.lua`: the decision and the instants it was made on, as
/// `(seconds, nanoseconds)` pairs.
#[derive(Debug)]
pub(crate) struct QuotaCheck {
    pub(crate) allowed: bool,
    pub(crate) tat: (i64, i64),
    pub(crate) now: (i64, i64),
}

impl Claim {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        // The commonest answer, a replay, is the stored response alone (no array).
        let value = match value {
            Value::BulkString(response) => return Ok(Claim::Completed(response)),
            Value::Nil => {
                return Err(StoreError::Corrupt(
                    "claim: a completed record without a response".to_owned(),
                ));
            }
            array => array,
        };
        let mut reply = Reply::new(value, "claim")?;
        Ok(match reply.int()? {
            0 => Claim::Claimed(reply.token()?),
            1 => Claim::InFlight {
                holder: reply.token()?,
                lease_left: reply.millis()?,
            },
            3 => Claim::Mismatch,
            other => return Err(reply.unknown(other)),
        })
    }
}

impl Inspect {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        let mut reply = Reply::new(value, "inspect")?;
        Ok(match reply.int()? {
            0 => Inspect::Absent,
            1 => Inspect::Held {
                holder: reply.token()?,
                lease_left: reply.millis()?,
                fingerprint: reply.bytes()?,
            },
            2 => Inspect::Completed {
                response: reply.bytes()?,
                expires_in: reply.millis()?,
                fingerprint: reply.bytes()?,
            },
            other => return Err(reply.unknown(other)),
        })
    }
}

impl Turn {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        let mut reply = Reply::new(value, "serial")?;
        Ok(match reply.int()? {
            0 => Turn::Acquired(reply.token()?),
            1 => Turn::Queued {
                lease_left: reply.millis()?,
            },
            2 => Turn::QueueFull,
            3 => Turn::TimedOut,
            other => return Err(reply.unknown(other)),
        })
    }
}

impl Leave {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        let mut reply = Reply::new(value, "leave")?;
        Ok(match reply.int()? {
            0 => Leave::Kept(reply.token()?),
            1 => Leave::Left,
            other => return Err(reply.unknown(other)),
        })
    }
}

impl Lead {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        let mut reply = Reply::new(value, "lead")?;
        Ok(match reply.int()? {
            0 => Lead::Leader(reply.token()?),
            1 => Lead::Follower,
            2 => Lead::Reused {
                landing: reply.bytes()?,
                kept_for: reply.millis()?,
            },
            other => return Err(reply.unknown(other)),
        })
    }
}

impl Flight {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        let mut reply = Reply::new(value, "flight watch")?;
        Ok(match reply.int()? {
            -1 => Flight::Grounded,
            token => Flight::Flying {
                token: token_of(token)?,
                lease_left: reply.millis()?,
            },
        })
    }
}

impl Landed {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        let mut reply = Reply::new(value, "landed")?;
        Ok(match reply.int()? {
            0 => Landed::Down(reply.bytes()?),
            1 => Landed::Flying {
                lease_left: reply.millis()?,
            },
            2 => Landed::Ended,
            other => return Err(reply.unknown(other)),
        })
    }
}

impl Fenced {
    pub(crate) fn decode(n: i64, script: &str) -> Result<Self, StoreError> {
        match n {
            1 => Ok(Fenced::Done),
            0 => Ok(Fenced::NotHolder),
            other => Err(StoreError::Corrupt(format!(
                "unknown {script} reply {other}"
            ))),
        }
    }
}

impl QuotaCheck {
    pub(crate) fn decode(value: Value) -> Result<Self, StoreError> {
        let mut reply = Reply::new(value, "quota")?;
        Ok(QuotaCheck {
            allowed: reply.int()? == 1,
            tat: (reply.int()?, reply.int()?),
            now: (reply.int()?, reply.int()?),
        })
    }
}

/// Reads a script reply array element by element.
struct Reply {
    items: std::vec::IntoIter<Value>,
    script: &'static str,
}

impl Reply {
    fn new(value: Value, script: &'static str) -> Result<Self, StoreError> {
        match value {
            Value::Array(items) => Ok(Reply {
                items: items.into_iter(),
                script,
            }),
            other => Err(StoreError::Corrupt(format!(
                "{script}: expected a script reply array, got {other:?}"
            ))),
        }
    }

    fn unknown(&self, case: i64) -> StoreError {
        StoreError::Corrupt(format!("unknown {} reply {case}", self.script))
    }

    fn int(&mut self) -> Result<i64, StoreError> {
        match self.items.next() {
            Some(Value::Int(n)) => Ok(n),
            Some(Value::BulkString(bytes)) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("{}: expected an integer", self.script))
                }),
            other => Err(StoreError::Corrupt(format!(
                "{}: expected an integer, got {other:?}",
                self.script
            ))),
        }
    }

    fn token(&mut self) -> Result<FencingToken, StoreError> {
        token_of(self.int()?)
    }

    /// A `PTTL`-like number of milliseconds; gone or unknown (negative) counts as none.
    fn millis(&mut self) -> Result<Duration, StoreError> {
        Ok(Duration::from_millis(
            u64::try_from(self.int()?).unwrap_or(0),
        ))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, StoreError> {
        match self.items.next() {
            Some(Value::BulkString(bytes)) => Ok(bytes),
            _ => Err(StoreError::Corrupt(format!(
                "{}: expected a bulk string",
                self.script
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn reply(items: Vec<Value>) -> Value {
        Value::Array(items)
    }

    #[test]
    fn replies_decode_by_name_and_refuse_unknown_cases() {
        assert!(matches!(
            Claim::decode(reply(vec![Value::Int(1), Value::Int(7), Value::Int(-2)])).unwrap(),
            Claim::InFlight { holder, lease_left } if holder.get() == 7 && lease_left.is_zero()
        ));
        assert!(matches!(
            Turn::decode(reply(vec![Value::Int(0), Value::BulkString(b"42".to_vec())])).unwrap(),
            Turn::Acquired(token) if token.get() == 42
        ));
        assert!(matches!(
            Flight::decode(reply(vec![Value::Int(-1)])).unwrap(),
            Flight::Grounded
        ));
        let unknown = Lead::decode(reply(vec![Value::Int(9)])).unwrap_err();
        assert!(
            unknown.to_string().contains("unknown lead reply 9"),
            "{unknown}"
        );
        assert!(Landed::decode(Value::Int(0)).is_err());
        assert_eq!(Fenced::decode(1, "complete").unwrap(), Fenced::Done);
        assert!(Fenced::decode(2, "complete").is_err());
        assert!(Claim::decode(reply(vec![Value::Int(0), Value::Int(-5)])).is_err());
        assert!(matches!(
            Claim::decode(Value::BulkString(b"stored".to_vec())).unwrap(),
            Claim::Completed(response) if response == b"stored"
        ));
        assert!(matches!(
            Claim::decode(reply(vec![Value::Int(3)])).unwrap(),
            Claim::Mismatch
        ));
        // A completed record without its response is reported, not replayed as empty.
        assert!(matches!(
            Claim::decode(Value::Nil),
            Err(StoreError::Corrupt(_))
        ));
        assert!(
            Claim::decode(reply(vec![Value::Int(2), Value::BulkString(b"x".to_vec())])).is_err()
        );
    }
}

//! The binary form of a [`StoredResponse`] in Redis (hash field `r` of a completed
//! idempotency record).
//!
//! ```text
//! u8   version (1)
//! u16  status
//! u16  header count, then per header: u16 name length, name, u32 value length, value
//! u8   0 = no trailers, 1 = trailers follow (same header block)
//! ...  the body: every remaining byte
//! ```
//!
//! All integers are big-endian. Header names are stored lowercase as `http` keeps them.
//! Decoding checks every length, so a truncated or foreign value is reported as
//! [`StoreError::Corrupt`] rather than misread.

use bytes::{BufMut, Bytes};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use keyward_core::store::{StoreError, StoredResponse};

const VERSION: u8 = 1;

/// Encodes `response`; headers longer than the format allows are left out (HTTP servers
/// refuse such headers long before).
pub(crate) fn encode(response: &StoredResponse) -> Vec<u8> {
    let mut out = Vec::with_capacity(response.weight());
    out.put_u8(VERSION);
    out.put_u16(response.status.as_u16());
    put_headers(&mut out, &response.headers);
    match &response.trailers {
        None => out.put_u8(0),
        Some(trailers) => {
            out.put_u8(1);
            put_headers(&mut out, trailers);
        }
    }
    out.extend_from_slice(&response.body);
    out
}

fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    let fits = |name: &HeaderName, value: &HeaderValue| {
        u16::try_from(name.as_str().len()).is_ok() && u32::try_from(value.len()).is_ok()
    };
    let count = headers.iter().filter(|(n, v)| fits(n, v)).count();
    let count = u16::try_from(count).unwrap_or(u16::MAX);
    out.put_u16(count);
    for (name, value) in headers
        .iter()
        .filter(|(n, v)| fits(n, v))
        .take(count.into())
    {
        out.put_u16(name.as_str().len() as u16);
        out.extend_from_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.extend_from_slice(value.as_bytes());
    }
}

/// Decodes a value written by [`encode`]; the body shares `bytes`' allocation.
pub(crate) fn decode(bytes: Bytes) -> Result<StoredResponse, StoreError> {
    let mut reader = Reader {
        bytes: &bytes,
        whole: &bytes,
        at: 0,
    };
    let version = reader.u8()?;
    if version != VERSION {
        return Err(corrupt(format!(
            "unknown response format version {version}"
        )));
    }
    let status = StatusCode::from_u16(reader.u16()?)
        .map_err(|_| corrupt("invalid status code".to_owned()))?;
    let headers = reader.headers()?;
    let trailers = match reader.u8()? {
        0 => None,
        1 => Some(reader.headers()?),
        other => return Err(corrupt(format!("invalid trailer flag {other}"))),
    };
    let body = bytes.slice(reader.at..);
    Ok(StoredResponse {
        status,
        headers,
        body,
        trailers,
    })
}

fn corrupt(what: String) -> StoreError {
    StoreError::Corrupt(format!("stored response: {what}"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    /// The same bytes, for zero-copy slices.
    whole: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len());
        let end = end.ok_or_else(|| corrupt("truncated".to_owned()))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, StoreError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn headers(&mut self) -> Result<HeaderMap, StoreError> {
        let count = self.u16()?;
        let mut headers = HeaderMap::with_capacity(count.into());
        for _ in 0..count {
            let len = self.u16()?;
            let name = HeaderName::from_bytes(self.take(len.into())?)
                .map_err(|_| corrupt("invalid header name".to_owned()))?;
            let len = self.u32()? as usize;
            let start = self.at;
            self.take(len)?;
            // A slice of the record, not a copy: one allocation less per header.
            let value = HeaderValue::from_maybe_shared(self.whole.slice(start..self.at))
                .map_err(|_| corrupt("invalid header value".to_owned()))?;
            headers.append(name, value);
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample(trailers: bool) -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let trailers = trailers.then(|| {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            t
        });
        StoredResponse {
            status: StatusCode::CREATED,
            headers,
            body: Bytes::from_static(b"{\"id\":1}\x00\xff binary"),
            trailers,
        }
    }

    #[test]
    fn round_trips_with_and_without_trailers() {
        for trailers in [false, true] {
            let response = sample(trailers);
            assert_eq!(decode(Bytes::from(encode(&response))).unwrap(), response);
        }
    }

    #[test]
    fn empty_body_and_headers_round_trip() {
        let response = StoredResponse {
            status: StatusCode::NO_CONTENT,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            trailers: None,
        };
        let encoded = encode(&response);
        assert_eq!(encoded.len(), 6, "version, status, count, trailer flag");
        assert_eq!(decode(Bytes::from(encoded)).unwrap(), response);
    }

    #[test]
    fn every_truncation_of_the_header_part_is_reported_as_corrupt() {
        let encoded = encode(&sample(true));
        let body_len = sample(true).body.len();
        for len in 0..encoded.len() - body_len {
            let result = decode(Bytes::copy_from_slice(&encoded[..len]));
            assert!(
                matches!(result, Err(StoreError::Corrupt(_))),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn unknown_version_is_corrupt() {
        let mut encoded = encode(&sample(false));
        encoded[0] = 9;
        assert!(matches!(
            decode(Bytes::from(encoded)),
            Err(StoreError::Corrupt(message)) if message.contains("version 9")
        ));
    }
}

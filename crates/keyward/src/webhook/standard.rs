//! Standard Webhooks signatures: secrets, signing (for senders and tests) and checking.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::request::Parts;
use http::{HeaderName, StatusCode};
use keyward_core::Problem;
use keyward_core::problem::types;
use sha2::Sha256;

use crate::BufferedBodyLayer;
use crate::buffered_body::BodyCheck;

/// The `webhook-id` header: the event's id, the same on every delivery of it.
pub const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
/// The `webhook-timestamp` header: when the delivery was signed, in Unix seconds.
pub const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
/// The `webhook-signature` header: space-separated `v1,<base64>` signatures.
pub const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// How far a delivery's timestamp may be from the receiver's clock, either way: 5 min.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);

/// Signatures looked at in one header at most: a sender signs with one key per rotation
/// step, so a handful; more only costs comparisons.
const MAX_SIGNATURES: usize = 16;

/// A signing secret: `whsec_` followed by the base64 of the key bytes (the prefix may be
/// left out). Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct WebhookSecret {
    /// HMAC-SHA256 keyed with the secret, ready to be cloned for each delivery.
    keyed: Arc<Hmac<Sha256>>,
}

/// A secret that does not parse. The message never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Not base64 after the `whsec_` prefix.
    #[error("a webhook secret must be \"whsec_\" followed by base64 (the secret is not shown)")]
    NotBase64,
    /// Fewer than 16 key bytes: too weak to sign with.
    #[error("a webhook secret must hold at least 16 bytes of key, this one holds {0}")]
    TooShort(usize),
}

impl WebhookSecret {
    /// Parses `whsec_<base64>` (or the bare base64).
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let text = text.trim();
        let encoded = text.strip_prefix("whsec_").unwrap_or(text);
        let key = BASE64.decode(encoded).map_err(|_| SecretError::NotBase64)?;
        if key.len() < 16 {
            return Err(SecretError::TooShort(key.len()));
        }
        // HMAC takes keys of any length: this never fails.
        let keyed = <Hmac<Sha256> as Mac>::new_from_slice(&key)
            .map_err(|_| SecretError::TooShort(key.len()))?;
        Ok(WebhookSecret {
            keyed: Arc::new(keyed),
        })
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::clone(&self.keyed);
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` value a sender puts on a delivery: `v1,<base64>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, &timestamp.to_string(), body).finalize();
        format!("v1,{}", BASE64.encode(tag.into_bytes()))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

/// Verifies Standard Webhooks deliveries: see the [module docs](crate::webhook).
#[derive(Clone, Debug)]
pub struct StandardWebhooks {
    secrets: Arc<[WebhookSecret]>,
    tolerance: Duration,
}

/// Why a delivery was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Missing(&'static str),
    Timestamp,
    Signature,
}

impl StandardWebhooks {
    /// Accepts deliveries signed with any of `secrets` (several: key rotation), within
    /// [`DEFAULT_TOLERANCE`] of now. With no secret at all every delivery is refused.
    pub fn new(secrets: impl IntoIterator<Item = WebhookSecret>) -> Self {
        StandardWebhooks {
            secrets: secrets.into_iter().collect(),
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    /// How far a delivery's `webhook-timestamp` may be from now, either way.
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// A [`BufferedBodyLayer`] reading bodies up to `max_body` bytes and verifying them.
    pub fn layer(self, max_body: usize) -> BufferedBodyLayer<StandardWebhooks> {
        BufferedBodyLayer::new(max_body).check(self)
    }

    /// Checks a delivery against the clock reading `now` (Unix seconds).
    fn verify(&self, parts: &Parts, body: &[u8], now: i64) -> Result<(), Refusal> {
        let header = |name: &HeaderName, shown| {
            let mut values = parts.headers.get_all(name).iter();
            match (values.next(), values.next()) {
                (Some(value), None) => value.to_str().map_err(|_| Refusal::Missing(shown)),
                _ => Err(Refusal::Missing(shown)),
            }
        };
        let id = header(&WEBHOOK_ID, "webhook-id")?;
        let timestamp = header(&WEBHOOK_TIMESTAMP, "webhook-timestamp")?;
        let signatures = header(&WEBHOOK_SIGNATURE, "webhook-signature")?;
        let sent: i64 = timestamp.parse().map_err(|_| Refusal::Timestamp)?;
        let tolerance = i64::try_from(self.tolerance.as_secs()).unwrap_or(i64::MAX);
        if now.abs_diff(sent) > tolerance.unsigned_abs() {
            return Err(Refusal::Timestamp);
        }
        let candidates: Vec<Vec<u8>> = signatures
            .split(' ')
            .filter_map(|signature| signature.strip_prefix("v1,"))
            .take(MAX_SIGNATURES)
            .filter_map(|encoded| BASE64.decode(encoded).ok())
            .collect();
        // Every secret against every candidate, each comparison in constant time
        // (`verify_slice`), without stopping at the first match.
        let mut matched = false;
        for secret in self.secrets.iter() {
            let mac = secret.mac(id, timestamp, body);
            for candidate in &candidates {
                matched |= mac.clone().verify_slice(candidate).is_ok();
            }
        }
        if matched {
            Ok(())
        } else {
            Err(Refusal::Signature)
        }
    }

    /// Checks a delivery's headers and body against the clock reading `now` (Unix
    /// seconds): what the layer does with the system clock. `Err` is the problem the
    /// delivery is answered with.
    ///
    /// ```
    /// use keyward::webhook::{StandardWebhooks, WebhookSecret};
    /// let secret = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
    /// let body = br#"{"email":"test@example.com","username":"test_user"}"#;
    /// // The specification's test vector.
    /// let signature = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
    /// assert_eq!(secret.sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body), signature);
    /// let (parts, ()) = http::Request::post("/")
    ///     .header("webhook-id", "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk")
    ///     .header("webhook-timestamp", "1649367553")
    ///     .header("webhook-signature", signature)
    ///     .body(()).unwrap().into_parts();
    /// let verify = StandardWebhooks::new([secret]);
    /// assert!(verify.check_at(&parts, body, 1649367553 + 60).is_ok());
    /// assert_eq!(verify.check_at(&parts, body, 1649367553 + 301).unwrap_err().status(), 401);
    /// ```
    pub fn check_at(&self, parts: &Parts, body: &[u8], now: i64) -> Result<(), Problem> {
        self.verify(parts, body, now)
            .map_err(|refusal| match refusal {
                Refusal::Missing(header) => signature_invalid().detail(format!(
                    "the delivery has no single valid `{header}` header"
                )),
                Refusal::Timestamp => Problem::new(
                    StatusCode::UNAUTHORIZED,
                    types::WEBHOOK_TIMESTAMP_INVALID,
                    "Webhook timestamp out of tolerance",
                )
                .detail(format!(
                    "`webhook-timestamp` must be Unix seconds within {} s of the receiver's clock",
                    self.tolerance.as_secs()
                )),
                Refusal::Signature => {
                    signature_invalid().detail("no `v1` signature matches a secret of this route")
                }
            })
    }
}

fn signature_invalid() -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        types::WEBHOOK_SIGNATURE_INVALID,
        "Webhook signature invalid",
    )
}

impl BodyCheck for StandardWebhooks {
    fn check(&self, parts: &Parts, body: &Bytes) -> Result<(), Problem> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
            });
        self.check_at(parts, body, now)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1649367553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut req = http::Request::post("/");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap().into_parts().0
    }

    fn delivery(signature: &str) -> Parts {
        parts(&[
            ("webhook-id", ID),
            ("webhook-timestamp", "1649367553"),
            ("webhook-signature", signature),
        ])
    }

    fn secret(text: &str) -> WebhookSecret {
        WebhookSecret::parse(text).unwrap()
    }

    #[test]
    fn the_specification_test_vector() {
        let signature = secret(SECRET).sign(ID, TS, BODY);
        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
        let verify = StandardWebhooks::new([secret(SECRET)]);
        assert_eq!(verify.verify(&delivery(&signature), BODY, TS), Ok(()));
        // The bare base64 is the same secret.
        assert_eq!(
            secret("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").sign(ID, TS, BODY),
            signature
        );
    }

    #[test]
    fn any_signature_with_any_secret_passes_and_nothing_else() {
        let old = secret(SECRET);
        let new = secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let rotating = StandardWebhooks::new([new.clone(), old.clone()]);
        let both = format!("{} {}", new.sign(ID, TS, BODY), old.sign(ID, TS, BODY));
        let others = "v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1a,xyz v2,abc";
        for signature in [
            old.sign(ID, TS, BODY),
            both,
            format!("{others} {}", old.sign(ID, TS, BODY)),
        ] {
            assert_eq!(
                rotating.verify(&delivery(&signature), BODY, TS),
                Ok(()),
                "{signature}"
            );
        }
        let only_new = StandardWebhooks::new([new]);
        let signature = old.sign(ID, TS, BODY);
        assert_eq!(
            only_new.verify(&delivery(&signature), BODY, TS),
            Err(Refusal::Signature)
        );
        // Another body, id or timestamp under the same signature: refused.
        assert_eq!(
            rotating.verify(&delivery(&signature), b"{}", TS),
            Err(Refusal::Signature)
        );
        let other_id = parts(&[
            ("webhook-id", "msg_2"),
            ("webhook-timestamp", "1649367553"),
            ("webhook-signature", &signature),
        ]);
        assert_eq!(
            rotating.verify(&other_id, BODY, TS),
            Err(Refusal::Signature)
        );
        let other_ts = parts(&[
            ("webhook-id", ID),
            ("webhook-timestamp", "1649367554"),
            ("webhook-signature", &signature),
        ]);
        assert_eq!(
            rotating.verify(&other_ts, BODY, TS),
            Err(Refusal::Signature)
        );
        // The version prefix is required; garbage is not a match.
        let bare = signature.trim_start_matches("v1,").to_owned();
        for bad in [bare.as_str(), "v1,", "v1,!!!", ""] {
            assert_eq!(
                rotating.verify(&delivery(bad), BODY, TS),
                Err(Refusal::Signature),
                "{bad}"
            );
        }
        assert_eq!(
            StandardWebhooks::new([]).verify(&delivery(&signature), BODY, TS),
            Err(Refusal::Signature)
        );
    }

    #[test]
    fn timestamps_outside_the_tolerance_are_refused() {
        let verify = StandardWebhooks::new([secret(SECRET)]);
        let signature = secret(SECRET).sign(ID, TS, BODY);
        let signed = delivery(&signature);
        assert_eq!(verify.verify(&signed, BODY, TS + 300), Ok(()));
        assert_eq!(verify.verify(&signed, BODY, TS - 300), Ok(()));
        assert_eq!(
            verify.verify(&signed, BODY, TS + 301),
            Err(Refusal::Timestamp)
        );
        assert_eq!(
            verify.verify(&signed, BODY, TS - 301),
            Err(Refusal::Timestamp)
        );
        let tight = verify.clone().tolerance(Duration::from_secs(10));
        assert_eq!(
            tight.verify(&signed, BODY, TS + 11),
            Err(Refusal::Timestamp)
        );
        let words = parts(&[
            ("webhook-id", ID),
            ("webhook-timestamp", "soon"),
            ("webhook-signature", &signature),
        ]);
        assert_eq!(verify.verify(&words, BODY, TS), Err(Refusal::Timestamp));
        let problem = verify.check_at(&signed, BODY, TS + 301).unwrap_err();
        assert_eq!(problem.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn missing_or_repeated_headers_are_refused() {
        let verify = StandardWebhooks::new([secret(SECRET)]);
        let signature = secret(SECRET).sign(ID, TS, BODY);
        let all = [
            ("webhook-id", ID),
            ("webhook-timestamp", "1649367553"),
            ("webhook-signature", signature.as_str()),
        ];
        for left_out in 0..3 {
            let some: Vec<_> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != left_out)
                .map(|(_, h)| *h)
                .collect();
            assert!(matches!(
                verify.verify(&parts(&some), BODY, TS),
                Err(Refusal::Missing(_))
            ));
        }
        let mut twice = all.to_vec();
        twice.push(("webhook-id", "msg_other"));
        assert_eq!(
            verify.verify(&parts(&twice), BODY, TS),
            Err(Refusal::Missing("webhook-id"))
        );
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        assert_eq!(
            WebhookSecret::parse("whsec_not base64!").unwrap_err(),
            SecretError::NotBase64
        );
        assert_eq!(
            WebhookSecret::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretError::TooShort(5)
        );
        assert_eq!(format!("{:?}", secret(SECRET)), "WebhookSecret(***)");
        assert!(!format!("{:?}", StandardWebhooks::new([secret(SECRET)])).contains("C2FV"));
    }
}

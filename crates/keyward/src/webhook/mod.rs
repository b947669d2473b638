//! Webhook receivers: [`StandardWebhooks`], a [`BodyCheck`](crate::BodyCheck) that
//! verifies deliveries signed as the [Standard Webhooks](https://www.standardwebhooks.com/)
//! specification says, for a [`BufferedBodyLayer`](crate::BufferedBodyLayer) in front of
//! an [`IdempotencyLayer`](crate::IdempotencyLayer) keyed on `webhook-id`.
//!
//! A delivery carries `webhook-id`, `webhook-timestamp` (Unix seconds) and
//! `webhook-signature`: space-separated `v1,<base64>` HMAC-SHA256 signatures of
//! `{webhook-id}.{webhook-timestamp}.{body}`, one per key the sender signs with. The
//! delivery passes if any `v1` signature matches any configured secret (several secrets:
//! key rotation), compared in constant time, and its timestamp is within the tolerance
//! (default 5 minutes either way: a captured delivery cannot be replayed later).
//! Otherwise: **401** `webhook-signature-invalid` or `webhook-timestamp-invalid`, and the
//! request goes no further.
//!
//! **Verify before dedupe.** The check runs outside the idempotency layer, so a forged
//! delivery never reaches it: it cannot claim a real event's `webhook-id`, and the real
//! delivery is never answered as its "duplicate". A sender's retry of one event is
//! signed again (a new timestamp, a new signature) with the same id and body, so the
//! signature headers must not be part of the idempotency fingerprint (they are not by
//! default).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use keyward::webhook::{StandardWebhooks, WebhookSecret};
//! use keyward::{IdempotencyLayer, KeySpec, MemoryStore};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let secret = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
//! let verify = StandardWebhooks::new([secret.clone()]);
//! let service = ServiceBuilder::new()
//!     .layer(verify.layer(256 * 1024))
//!     .layer(IdempotencyLayer::new(MemoryStore::new()).route("hooks").unscoped()
//!         .key(KeySpec::parse("header:webhook-id").unwrap()).required(true))
//!     .service_fn(|_req: http::Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from("applied"))))
//!     });
//!
//! let body = r#"{"type":"invoice.paid"}"#;
//! let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
//! let delivery = |signature: String| {
//!     let req = http::Request::post("/hooks")
//!         .header("webhook-id", "msg_1")
//!         .header("webhook-timestamp", now.to_string())
//!         .header("webhook-signature", signature);
//!     service.clone().oneshot(req.body(Full::new(Bytes::from(body))).unwrap())
//! };
//! let forged = delivery("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()).await.unwrap();
//! assert_eq!(forged.status(), 401);
//! let real = delivery(secret.sign("msg_1", now, body.as_bytes())).await.unwrap();
//! assert_eq!(real.status(), 200);
//! assert!(real.headers().get("idempotent-replayed").is_none()); // the forgery claimed nothing
//! # }
//! ```

mod standard;

pub use standard::{
    DEFAULT_TOLERANCE, SecretError, StandardWebhooks, WEBHOOK_ID, WEBHOOK_SIGNATURE,
    WEBHOOK_TIMESTAMP, WebhookSecret,
};

/// A [`BufferedBodyLayer`](crate::BufferedBodyLayer) that verifies Standard Webhooks
/// signatures ([`StandardWebhooks::layer`]).
pub type StandardWebhooksLayer = crate::BufferedBodyLayer<StandardWebhooks>;

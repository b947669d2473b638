//! Admin `GET /keys/{route}/{key}`: "did it already happen?" for support staff, scoped
//! exactly like the requests, naming the key by its hash only.
#![allow(clippy::unwrap_used)]

mod support;

use keyward_tests::redis_kit::RedisServer;
use serde_json::Value;
use support::{HttpClient, Sidecar, Upstream, client, send};

const ROUTES: &str = r#"
[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]
key = "header:Idempotency-Key"
scope = "header:Authorization"

[[routes]]
name = "by-path"
path = "/orders/{id}"

[routes.idempotency]
key = "path:id"
"#;

/// `GET /keys/{route}/{key}` on `sidecar`'s admin listener as `principal`.
async fn look_up(
    http: &HttpClient,
    sidecar: &Sidecar,
    route: &str,
    key: &str,
    principal: &str,
) -> (u16, Value) {
    let url = format!("http://{}/keys/{route}/{key}", sidecar.admin);
    let reply = send(http, "GET", &url, &[("authorization", principal)], "").await;
    let body = serde_json::from_str(&reply.body).unwrap();
    (reply.status.as_u16(), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_can_see_whether_a_key_already_ran() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ROUTES).await;
    let http = client();

    let (status, before) = look_up(&http, &sidecar, "payments", "pay-77", "Bearer alice").await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(before["state"], "absent");

    let headers = [
        ("authorization", "Bearer alice"),
        ("idempotency-key", "pay-77"),
    ];
    let paid = send(
        &http,
        "POST",
        &sidecar.url("/payments/1"),
        &headers,
        "amount=5",
    )
    .await;
    assert_eq!(paid.status, 200);

    let (status, after) = look_up(&http, &sidecar, "payments", "pay-77", "Bearer alice").await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["state"], "completed", "{after}");
    assert_eq!(after["status"], 200);
    assert_eq!(after["route"], "payments");
    assert_eq!(after["fingerprint"].as_str().unwrap().len(), 64);
    assert!(after["age_seconds"].as_f64().unwrap() < 60.0, "{after}");
    assert!(after["completed_at_unix"].as_u64().unwrap() > 1_700_000_000);
    assert!(!after.to_string().contains("pay-77"), "raw key in {after}");
    assert!(after["key_hash"].as_str().is_some_and(|h| !h.is_empty()));

    // Scoped like the requests: another principal does not see Alice's record.
    let (_, bob) = look_up(&http, &sidecar, "payments", "pay-77", "Bearer bob").await;
    assert_eq!(bob["state"], "absent");
    // The sf-string form of the key is the same key.
    let (_, quoted) = look_up(&http, &sidecar, "payments", "%22pay-77%22", "Bearer alice").await;
    assert_eq!(quoted["state"], "completed", "{quoted}");

    let (status, unknown) = look_up(&http, &sidecar, "nope", "k", "x").await;
    assert_eq!(status, 404, "{unknown}");
    let (status, path_key) = look_up(&http, &sidecar, "by-path", "k", "x").await;
    assert_eq!(status, 400, "{path_key}");
    assert!(path_key["error"].as_str().unwrap().contains("path:id"));
    let (status, invalid) = look_up(&http, &sidecar, "payments", "a%20b", "x").await;
    assert_eq!(status, 400, "{invalid}");
    assert_eq!(upstream.hits(), 1, "look-ups never reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_any_instance_answers_for_a_key_another_ran() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\n{ROUTES}",
        redis.url()
    );
    let first = Sidecar::start(upstream.addr, &store).await;
    let second = Sidecar::start(upstream.addr, &store).await;
    let http = client();
    let headers = [
        ("authorization", "Bearer alice"),
        ("idempotency-key", "pay-9"),
    ];
    let paid = send(
        &http,
        "POST",
        &first.url("/payments/1"),
        &headers,
        "amount=5",
    )
    .await;
    assert_eq!(paid.status, 200);
    let (status, seen) = look_up(&http, &second, "payments", "pay-9", "Bearer alice").await;
    assert_eq!(status, 200, "{seen}");
    assert_eq!(seen["state"], "completed", "{seen}");
    assert_eq!(seen["status"], 200);
    let expires_in = seen["expires_in_seconds"].as_f64().unwrap();
    assert!(
        expires_in > 23.0 * 3600.0 && expires_in <= 24.0 * 3600.0,
        "{seen}"
    );
}

//! Every config in `examples/sidecar/` served as a newcomer serves it, against the demo
//! upstream (`cargo run -p examples --example upstream`), with the guarantee its comment
//! promises checked on what the upstream did. A new example config without a check here
//! fails the first test.
#![allow(clippy::unwrap_used)]

mod demo;
mod support;

use demo::{DemoUpstream, example_config};
use keyward_tests::redis_kit::RedisServer;
use serde_json::Value;
use support::{HttpClient, Reply, client, send, send_concurrently};

/// The configs checked below (payments.toml is the README walkthrough: try_sidecar.rs).
const CHECKED: [&str; 6] = [
    "all-layers.toml",
    "cache-stampede.toml",
    "payments-redis.toml",
    "payments.toml",
    "per-tenant-quota.toml",
    "webhooks.toml",
];

fn config(name: &str) -> String {
    std::fs::read_to_string(example_config(name)).unwrap()
}

fn json(reply: &Reply) -> Value {
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

async fn effects(http: &HttpClient, upstream: &DemoUpstream) -> Value {
    json(&send(http, "GET", &format!("{}/effects", upstream.url()), &[], "").await)
}

#[test]
fn every_example_config_has_a_check_here() {
    let dir = example_config("");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".toml"))
        .collect();
    found.sort();
    assert_eq!(found, CHECKED, "a config in {} has no check", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_layers_replays_a_retried_payment_with_a_fencing_token() {
    let upstream = DemoUpstream::start().await;
    let sidecar = demo::serve(&config("all-layers.toml"), upstream.addr, &[]).await;
    let http = client();
    let headers = [
        ("authorization", "Bearer sk_alice"),
        ("x-api-key", "key_alice"),
        ("idempotency-key", "pay-1"),
    ];
    let url = sidecar.url("/payments/42");
    let first = send(&http, "POST", &url, &headers, "amount=10").await;
    let retry = send(&http, "POST", &url, &headers, "amount=10").await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(
        retry.header("idempotent-replayed"),
        Some("true"),
        "{retry:?}"
    );
    assert_eq!(retry.body, first.body);
    assert!(first.header("ratelimit-policy").is_some(), "{first:?}");
    assert!(json(&first)["fencing_token"].is_string(), "{first:?}");
    assert_eq!(
        effects(&http, &upstream).await["by_idempotency_key"]["pay-1"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stampede_reaches_the_origin_once() {
    let upstream = DemoUpstream::start().await;
    let sidecar = demo::serve(&config("cache-stampede.toml"), upstream.addr, &[]).await;
    let http = client();
    let url = sidecar.url("/catalog/shoes?delay_ms=1000");
    let replies = send_concurrently(
        &http,
        8,
        "GET",
        &url,
        &[("authorization", "Bearer sk_alice")],
        "",
    )
    .await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    let copies = replies
        .iter()
        .filter(|r| r.header("keyward-coalesced") == Some("true"))
        .count();
    assert_eq!(copies, 7, "{replies:?}");
    assert_eq!(
        effects(&http, &upstream).await["by_route"]["GET /catalog/shoes"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_redis_replays_a_retry_that_lands_on_another_sidecar() {
    let redis = RedisServer::start();
    let upstream = DemoUpstream::start().await;
    let url = [(
        "url = \"redis://127.0.0.1:6379/0\"",
        format!("url = \"{}\"", redis.url()),
    )];
    let text = config("payments-redis.toml");
    let one = demo::serve(&text, upstream.addr, &url).await;
    let two = demo::serve(&text, upstream.addr, &url).await;
    let http = client();
    let headers = [
        ("authorization", "Bearer sk_alice"),
        ("idempotency-key", "order-7"),
        ("content-type", "application/json"),
    ];
    let body = r#"{"amount":700}"#;
    let first = send(&http, "POST", &one.url("/payments"), &headers, body).await;
    let retry = send(&http, "POST", &two.url("/payments"), &headers, body).await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(retry.status, 201, "{retry:?}");
    assert_eq!(
        retry.header("idempotent-replayed"),
        Some("true"),
        "{retry:?}"
    );
    assert_eq!(retry.body, first.body);
    let missing = send(&http, "POST", &two.url("/payments"), &headers[..1], body).await;
    assert_eq!(missing.status, 400, "required = true: {missing:?}");
    assert_eq!(
        effects(&http, &upstream).await["by_idempotency_key"]["order-7"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_charges_a_retried_payment_once() {
    let upstream = DemoUpstream::start().await;
    let sidecar = demo::serve(&config("payments.toml"), upstream.addr, &[]).await;
    let http = client();
    let headers = [
        ("authorization", "Bearer sk_alice"),
        ("x-api-key", "key_alice"),
        ("idempotency-key", "order-1"),
    ];
    let url = sidecar.url("/accounts/alice/payments");
    let first = send(&http, "POST", &url, &headers, "1000").await;
    let retry = send(&http, "POST", &url, &headers, "1000").await;
    assert_eq!(first.status, 201, "{first:?}");
    assert_eq!(
        retry.header("idempotent-replayed"),
        Some("true"),
        "{retry:?}"
    );
    assert_eq!(effects(&http, &upstream).await["total"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_quota_limits_one_tenant_not_the_others() {
    let upstream = DemoUpstream::start().await;
    let sidecar = demo::serve(&config("per-tenant-quota.toml"), upstream.addr, &[]).await;
    let http = client();
    let url = sidecar.url("/api/orders");
    let mut statuses = Vec::new();
    for _ in 0..21 {
        let reply = send(&http, "GET", &url, &[("x-api-key", "tenant-a")], "").await;
        statuses.push(reply.status.as_u16());
        if reply.status == 429 {
            assert!(reply.header("retry-after").is_some(), "{reply:?}");
            assert!(reply.header("ratelimit").is_some(), "{reply:?}");
        }
    }
    // burst = 20: twenty at once, then 429 (the refill is one every 0.6 s).
    assert_eq!(statuses[..20], [200; 20], "{statuses:?}");
    assert_eq!(statuses[20], 429, "{statuses:?}");
    let other = send(&http, "GET", &url, &[("x-api-key", "tenant-b")], "").await;
    assert_eq!(other.status, 200, "tenant-b is not starved: {other:?}");
    assert_eq!(
        other.header("ratelimit-policy"),
        Some("\"api\";q=100;w=60"),
        "{other:?}"
    );
}

/// The secret of `webhooks.toml`.
const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn unix_now() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.unwrap().as_secs() as i64
}

/// A Standard Webhooks delivery of `body` as event `id`, signed with `signature`
/// (`None`: with the config's secret) at `timestamp`.
async fn deliver(
    http: &HttpClient,
    url: &str,
    id: &str,
    body: &str,
    timestamp: i64,
    signature: Option<&str>,
) -> Reply {
    let secret = keyward::webhook::WebhookSecret::parse(WEBHOOK_SECRET).unwrap();
    let signed = secret.sign(id, timestamp, body.as_bytes());
    let timestamp = timestamp.to_string();
    let headers = [
        ("webhook-id", id),
        ("webhook-timestamp", timestamp.as_str()),
        ("webhook-signature", signature.unwrap_or(&signed)),
    ];
    send(http, "POST", url, &headers, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_apply_a_redelivery_once_and_one_delivery_per_account_at_a_time() {
    let upstream = DemoUpstream::start().await;
    let sidecar = demo::serve(&config("webhooks.toml"), upstream.addr, &[]).await;
    let http = client();
    let now = unix_now();
    // The provider delivers evt_1 twice at once (a retry that overlaps the first try),
    // each signed anew: with on_in_flight = "wait", the duplicate waits and gets the
    // first answer.
    let url = sidecar.url("/webhooks/acme?delay_ms=300");
    let twice = [0, 1].map(|i| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { deliver(&http, &url, "evt_1", "paid", now - i, None).await })
    });
    let mut answers = Vec::new();
    for delivery in twice {
        answers.push(delivery.await.unwrap());
    }
    assert!(answers.iter().all(|r| r.status == 201), "{answers:?}");
    assert_eq!(answers[0].body, answers[1].body, "{answers:?}");
    // Three other events for the same account at once: applied one at a time.
    let events = ["evt_2", "evt_3", "evt_4"].map(|id| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move { deliver(&http, &url, id, "x", now, None).await })
    });
    for event in events {
        assert_eq!(event.await.unwrap().status, 201);
    }
    let seen = effects(&http, &upstream).await;
    for id in ["evt_1", "evt_2", "evt_3", "evt_4"] {
        assert_eq!(seen["by_idempotency_key"][id], 1, "{id}: {seen}");
    }
    assert_eq!(seen["max_concurrent"]["/webhooks/acme"], 1, "{seen}");
    let unsigned = send(&http, "POST", &url, &[("webhook-id", "evt_9")], "x").await;
    assert_eq!(unsigned.status, 401, "an unsigned delivery: {unsigned:?}");
}

/// Verification before dedupe: a forged delivery that carries a real event's id (and a
/// replay of a real delivery signed too long ago) is refused, reaches nothing, and does
/// not make the real delivery, arriving next, a "duplicate".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_delivery_with_a_real_id_claims_nothing() {
    let upstream = DemoUpstream::start().await;
    let sidecar = demo::serve(&config("webhooks.toml"), upstream.addr, &[]).await;
    let http = client();
    let url = sidecar.url("/webhooks/acme");
    let now = unix_now();
    let body = r#"{"type":"invoice.paid","amount":1000}"#;
    // Signed with another secret, with no signature at all, over another body, too old.
    let stranger =
        keyward::webhook::WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
    let forged = stranger.sign("evt_real", now, body.as_bytes());
    let tampered = keyward::webhook::WebhookSecret::parse(WEBHOOK_SECRET)
        .unwrap()
        .sign("evt_real", now, br#"{"type":"invoice.paid","amount":1}"#);
    for signature in [forged.as_str(), "v1,", tampered.as_str()] {
        let refused = deliver(&http, &url, "evt_real", body, now, Some(signature)).await;
        assert_eq!(refused.status, 401, "{refused:?}");
        assert!(
            refused.body.contains("webhook-signature-invalid"),
            "{refused:?}"
        );
    }
    let stale = deliver(&http, &url, "evt_real", body, now - 3600, None).await;
    assert_eq!(stale.status, 401, "{stale:?}");
    assert!(
        stale.body.contains("webhook-timestamp-invalid"),
        "{stale:?}"
    );
    let seen = effects(&http, &upstream).await;
    assert!(
        seen["by_idempotency_key"].get("evt_real").is_none(),
        "{seen}"
    );

    let real = deliver(&http, &url, "evt_real", body, now, None).await;
    assert_eq!(real.status, 201, "{real:?}");
    assert_eq!(real.header("idempotent-replayed"), None, "{real:?}");
    // The upstream got the body as signed.
    assert!(real.body.contains("invoice.paid"), "{real:?}");
    let again = deliver(&http, &url, "evt_real", body, now + 1, None).await;
    assert_eq!(
        again.header("idempotent-replayed"),
        Some("true"),
        "{again:?}"
    );
    let seen = effects(&http, &upstream).await;
    assert_eq!(seen["by_idempotency_key"]["evt_real"], 1, "{seen}");
}

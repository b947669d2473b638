//! The `keyward` binary, started as a process in front of a counting upstream.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{Sidecar, Upstream, check, check_file, client, send, send_concurrently};

const PAYMENTS: &str = r#"
[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]
required = true
max_body = "1KiB"
"#;

#[tokio::test]
async fn idempotent_post_is_replayed_and_rejections_are_problems() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, PAYMENTS).await;
    let http = client();
    let url = sidecar.url("/payments/7");
    let key = [("idempotency-key", "k-1"), ("authorization", "Bearer a")];

    let first = send(&http, "POST", &url, &key, "10 EUR").await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(first.header("set-cookie").is_some());
    let retry = send(&http, "POST", &url, &key, "10 EUR").await;
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert!(retry.header("set-cookie").is_none());
    assert_eq!(upstream.hits(), 1);

    let mismatch = send(&http, "POST", &url, &key, "99 EUR").await;
    assert_eq!(mismatch.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        mismatch.header("content-type"),
        Some("application/problem+json")
    );
    let missing = send(&http, "POST", &url, &[], "1").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let too_big = send(
        &http,
        "POST",
        &url,
        &[("idempotency-key", "k-2")],
        &"x".repeat(2048),
    )
    .await;
    assert_eq!(too_big.status, StatusCode::PAYLOAD_TOO_LARGE);

    // A duplicate while the first is still at the upstream: 409.
    let slow = sidecar.url("/payments/8?delay_ms=500");
    let (a, b) = tokio::join!(
        send(&http, "POST", &slow, &[("idempotency-key", "k-3")], "1"),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send(&http, "POST", &slow, &[("idempotency-key", "k-3")], "1").await
        }
    );
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(b.status, StatusCode::CONFLICT);
    assert_eq!(b.header("retry-after"), Some("1"));

    // Unmatched requests are proxied untouched, with forwarding headers appended.
    let other = send(&http, "GET", &sidecar.url("/health"), &[], "").await;
    assert_eq!(other.status, StatusCode::OK);
    let headers = upstream
        .seen
        .headers
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert!(
        headers["forwarded"]
            .to_str()
            .unwrap()
            .starts_with("for=127.0.0.1")
    );

    // Metrics count the decisions under the contract's names.
    let metrics = sidecar.admin_get(&http, "/metrics").await;
    assert!(
        metrics.body.contains("keyward_decisions_total{layer=\"idempotency\",route=\"payments\",outcome=\"replayed\"} 1"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("outcome=\"mismatch\"} 1"));
    let healthz = sidecar.admin_get(&http, "/healthz").await;
    assert_eq!(healthz.status, StatusCode::OK);
    let readyz = sidecar.admin_get(&http, "/readyz").await;
    assert_eq!(readyz.status, StatusCode::OK);
}

#[tokio::test]
async fn upstream_down_is_502_and_releases_the_key() {
    let dead = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let sidecar = Sidecar::start(dead, PAYMENTS).await;
    let http = client();
    let url = sidecar.url("/payments/1");
    let key = [("idempotency-key", "k")];
    let first = send(&http, "POST", &url, &key, "1").await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY);
    assert!(first.body.contains("upstream-unreachable"));
    let again = send(&http, "POST", &url, &key, "1").await;
    assert_eq!(
        again.status,
        StatusCode::BAD_GATEWAY,
        "released, not 409 or a replay"
    );
    let metrics = sidecar.admin_get(&http, "/metrics").await;
    assert!(
        metrics.body.contains("outcome=\"ambiguous\"} 2"),
        "{}",
        metrics.body
    );
}

#[tokio::test]
async fn upstream_timeout_is_504() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, PAYMENTS).await;
    let http = client();
    let res = send(
        &http,
        "POST",
        &sidecar.url("/payments/1?delay_ms=3000"),
        &[("idempotency-key", "k")],
        "1",
    )
    .await;
    assert_eq!(res.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(res.body.contains("upstream-timeout"));
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, PAYMENTS).await;
    let http = client();
    let requests: Vec<_> = (0..5)
        .map(|i| {
            let http = http.clone();
            let url = sidecar.url(&format!("/payments/{i}?delay_ms=700"));
            let key = format!("drain-{i}");
            tokio::spawn(async move {
                send(
                    &http,
                    "POST",
                    &url,
                    &[("idempotency-key", key.as_str())],
                    "1",
                )
                .await
            })
        })
        .collect();
    upstream.wait_for_hits(5).await;
    let status = sidecar.terminate().await;
    assert!(status.success(), "{status:?}");
    for request in requests {
        assert_eq!(request.await.unwrap().status, StatusCode::OK);
    }
}

#[test]
fn check_accepts_every_example_config() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sidecar");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out) = check_file(&path);
            assert_eq!(code, 0, "{}: {out}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 1, "no example configs in {}", dir.display());
}

#[test]
fn check_rejects_broken_configs_with_64_and_names_the_field() {
    let server = "[server]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\n";
    let route = "[[routes]]\nname = \"r\"\npath = \"/r\"\n";
    let cases = [
        (
            format!("{server}{route}[routes.quota]\nlimit = 5\nper = \"5 minutes\"\n"),
            "routes[0].quota.per: \"5 minutes\" is not a duration",
        ),
        (
            format!("{server}{route}[routes.quota]\nlimit = -1\nper = \"1s\"\n"),
            "routes[0].quota.limit",
        ),
        (
            format!("{server}{route}[routes.idempotency]\nttl = \"forever\"\n"),
            "routes[0].idempotency.ttl: \"forever\"",
        ),
        (
            format!("{server}{route}[routes.idempotency]\nkey = \"body:id\"\n"),
            "routes[0].idempotency.key",
        ),
        (
            format!("{server}{route}[routes.serial]\nmax_queue = -3\n"),
            "routes[0].serial.max_queue: -3",
        ),
        (
            format!("{server}{route}[routes.single_flight]\nmax_body = \"huge\"\n"),
            "routes[0].single_flight.max_body: \"huge\"",
        ),
        (
            format!("{server}[store]\nbackend = \"etcd\"\n"),
            "store.backend: \"etcd\"",
        ),
        (
            format!("{server}[telemetry]\nlog_format = \"xml\"\n"),
            "telemetry.log_format: \"xml\"",
        ),
        (
            "[server]\nlisten = \"everywhere\"\nupstream = \"http://127.0.0.1:9000\"\n".to_owned(),
            "server.listen: \"everywhere\"",
        ),
        (format!("{server}{route}color = \"blue\"\n"), "color"),
        (
            "[server]\nupstream = \"http://127.0.0.1:9000\"\n".to_owned(),
            "listen",
        ),
        (
            format!("{server}[store]\nbackend = \"redis\"\nurl = \"tcp://user:hunter2@h\"\n"),
            "store.url",
        ),
    ];
    for (text, expected) in cases {
        let (code, out) = check(&text);
        assert_eq!(code, 64, "{text}\n{out}");
        assert!(out.contains(expected), "expected {expected:?} in:\n{out}");
        assert!(!out.contains("hunter2"), "password leaked: {out}");
    }
}

#[test]
fn version_and_help() {
    let out = std::process::Command::new(support::binary())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("keyward "));
    let help = std::process::Command::new(support::binary())
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("serve") && text.contains("check"), "{text}");
}

const QUOTA_AND_SERIAL: &str = r#"
[[routes]]
name = "search"
path = "/search"

[routes.quota]
key = "header:X-Api-Key"
limit = 2
per = "1m"

[[routes]]
name = "accounts"
methods = ["POST"]
path = "/accounts/{id}"

[routes.serial]
key = "path:id"
max_wait = "5s"
"#;

#[tokio::test]
async fn quota_answers_429_with_ratelimit_headers() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, QUOTA_AND_SERIAL).await;
    let http = client();
    let url = sidecar.url("/search");
    let key = [("x-api-key", "tenant-a")];
    let first = send(&http, "GET", &url, &key, "").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.header("ratelimit-policy"),
        Some("\"search\";q=2;w=60")
    );
    assert_eq!(first.header("ratelimit"), Some("\"search\";r=1;t=30"));
    assert_eq!(
        send(&http, "GET", &url, &key, "").await.status,
        StatusCode::OK
    );
    let limited = send(&http, "GET", &url, &key, "").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        limited.header("content-type"),
        Some("application/problem+json")
    );
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    assert!(
        limited
            .header("ratelimit")
            .unwrap()
            .starts_with("\"search\";r=0;")
    );
    // Another key has its own quota.
    assert_eq!(
        send(&http, "GET", &url, &[("x-api-key", "tenant-b")], "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn serial_requests_never_overlap_and_carry_rising_fencing_tokens() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, QUOTA_AND_SERIAL).await;
    let http = client();
    let replies = send_concurrently(
        &http,
        8,
        "POST",
        &sidecar.url("/accounts/42?delay_ms=50"),
        &[],
        "debit",
    )
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK));
    let max = upstream.seen.max_in_flight.lock().unwrap()["/accounts/42"];
    assert_eq!(max, 1, "requests for one account overlapped upstream");
    let tokens: Vec<u64> = upstream
        .seen
        .headers
        .lock()
        .unwrap()
        .iter()
        .map(|h| {
            h["keyward-fencing-token"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(tokens.len(), 8);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens not rising in arrival order at the upstream: {tokens:?}"
    );
}

const STAMPEDE: &str = r#"
[[routes]]
name = "catalog"
path = "/catalog/{*rest}"

[routes.single_flight]
key = "method_uri"
scope = "none"
max_body = "1MiB"
"#;

#[tokio::test]
async fn a_stampede_of_100_gets_reaches_the_upstream_once() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, STAMPEDE).await;
    let http = client();
    // The upstream answers after 1 s; all 100 arrive well within that window.
    let replies = send_concurrently(
        &http,
        100,
        "GET",
        &sidecar.url("/catalog/shoes?delay_ms=1000"),
        &[],
        "",
    )
    .await;
    assert_eq!(
        upstream.hits(),
        1,
        "the stampede reached the upstream more than once"
    );
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::OK && r.body == replies[0].body)
    );
    let coalesced = replies
        .iter()
        .filter(|r| r.header("keyward-coalesced") == Some("true"))
        .count();
    assert_eq!(coalesced, 99);
}

#[tokio::test]
async fn two_sidecars_on_one_redis_replay_each_others_responses() {
    let mut redis = keyward_tests::redis_kit::RedisServer::start();
    let upstream = Upstream::start().await;
    let store = format!(
        "[store]\nbackend = \"redis\"\nurl = \"{}\"\ntimeout = \"500ms\"\non_error = \"closed\"\n{PAYMENTS}",
        redis.url()
    );
    let a = Sidecar::start(upstream.addr, &store).await;
    let b = Sidecar::start(upstream.addr, &store).await;
    let http = client();
    let key = [
        ("idempotency-key", "order-9"),
        ("authorization", "Bearer a"),
    ];
    let first = send(&http, "POST", &a.url("/payments/9"), &key, "10 EUR").await;
    assert_eq!(first.status, StatusCode::OK);
    let retry = send(&http, "POST", &b.url("/payments/9"), &key, "10 EUR").await;
    assert_eq!(
        retry.header("idempotent-replayed"),
        Some("true"),
        "{retry:?}"
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.hits(), 1);

    assert_eq!(b.admin_get(&http, "/readyz").await.status, StatusCode::OK);
    redis.kill_9();
    assert_eq!(
        b.admin_get(&http, "/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let closed = send(
        &http,
        "POST",
        &b.url("/payments/10"),
        &[("idempotency-key", "k-10")],
        "1",
    )
    .await;
    assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(closed.body.contains("store-unavailable"));
    assert_eq!(
        upstream.hits(),
        1,
        "fails closed: nothing reaches the upstream uncoordinated"
    );
}

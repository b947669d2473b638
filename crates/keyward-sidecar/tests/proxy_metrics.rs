//! The proxy's own metrics on `/metrics`: `http.server.request.duration` and
//! `http.client.request.duration` per route (OpenTelemetry HTTP semantic conventions,
//! Prometheus names), upstream failures by kind, the memory store's table sizes;
//! `promtool check metrics` finds nothing to complain about, and the OpenMetrics a
//! scrape asks for parses with the reference parser, with the same samples.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::openmetrics::{ACCEPT_OPENMETRICS, parse_openmetrics};
use support::{Sidecar, Upstream, client, free_port, send};

const ROUTES: &str = r#"
[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]

[[routes]]
name = "search"
path = "/search"

[routes.quota]
key = "header:X-Api-Key"
limit = 1
per = "1m"
"#;

/// `promtool`, or a failure that says how to install it.
fn promtool() -> &'static str {
    let found = Command::new("promtool").arg("--version").output();
    assert!(
        found.is_ok_and(|out| out.status.success()),
        "promtool is missing: install it with `apt-get install prometheus` (or run .ci/install-deps.sh)"
    );
    "promtool"
}

fn sample<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_reports_requests_upstream_calls_failures_and_table_sizes() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ROUTES).await;
    let http = client();
    let key = [("idempotency-key", "k-1")];
    assert_eq!(
        send(&http, "POST", &sidecar.url("/payments/1"), &key, "a")
            .await
            .status,
        200
    );
    assert_eq!(
        send(&http, "POST", &sidecar.url("/payments/1"), &key, "a")
            .await
            .status,
        200
    );
    let api = [("x-api-key", "a")];
    assert_eq!(
        send(&http, "GET", &sidecar.url("/search"), &api, "")
            .await
            .status,
        200
    );
    assert_eq!(
        send(&http, "GET", &sidecar.url("/search"), &api, "")
            .await
            .status,
        429
    );
    assert_eq!(
        send(&http, "GET", &sidecar.url("/other?status=404"), &[], "")
            .await
            .status,
        404
    );
    let timed_out = send(&http, "GET", &sidecar.url("/other?delay_ms=2500"), &[], "").await;
    assert_eq!(timed_out.status, 504);

    // A sidecar whose upstream refuses connections.
    let dead = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let orphan = Sidecar::start(dead, "").await;
    assert_eq!(
        send(&http, "GET", &orphan.url("/x"), &[], "").await.status,
        502
    );

    let metrics = sidecar.admin_get(&http, "/metrics").await.body;
    let server = "http_server_request_duration_seconds";
    for (route, method, status, count) in [
        ("payments", "POST", 200, 2),
        ("search", "GET", 200, 1),
        ("search", "GET", 429, 1),
        ("-", "GET", 404, 1),
        ("-", "GET", 504, 1),
    ] {
        let line = format!(
            "{server}_count{{http_request_method=\"{method}\",http_response_status_code=\"{status}\",http_route=\"{route}\"}} {count}"
        );
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains("# TYPE http_server_request_duration_seconds histogram"));
    // The upstream saw one payment (the retry was replayed) and one search (the second
    // was refused by the quota); the timed-out call has no status.
    let client = "http_client_request_duration_seconds_count";
    for line in [
        format!(
            "{client}{{http_request_method=\"POST\",http_response_status_code=\"200\",http_route=\"payments\"}} 1"
        ),
        format!(
            "{client}{{http_request_method=\"GET\",http_response_status_code=\"200\",http_route=\"search\"}} 1"
        ),
        format!(
            "{client}{{http_request_method=\"GET\",http_response_status_code=\"0\",http_route=\"-\"}} 1"
        ),
        "keyward_upstream_failures_total{error_type=\"timeout\",http_route=\"-\"} 1".to_owned(),
        "keyward_memory_entries{table=\"idempotency_records\"} 1".to_owned(),
        "keyward_memory_entries{table=\"quota_keys\"} 1".to_owned(),
    ] {
        assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    }
    let bytes = sample(
        &metrics,
        "keyward_memory_bytes{table=\"idempotency_records\"}",
    )
    .unwrap();
    assert!(!bytes.ends_with(" 0"), "{bytes}");
    let refused = orphan.admin_get(&http, "/metrics").await.body;
    let line = "keyward_upstream_failures_total{error_type=\"connect_refused\",http_route=\"-\"} 1";
    assert!(refused.contains(line), "{line} not in\n{refused}");

    for text in [&metrics, &refused] {
        let mut check = Command::new(promtool())
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics:\n{said}\non\n{text}"
        );
    }

    // Asked for OpenMetrics: the reference parser takes it, and its samples are the
    // Prometheus text's, line for line (no exemplars without trace export).
    for (scraped, text) in [(&sidecar, &metrics), (&orphan, &refused)] {
        let url = format!("http://{}/metrics", scraped.admin);
        let reply = send(&http, "GET", &url, &[("accept", ACCEPT_OPENMETRICS)], "").await;
        assert_eq!(
            reply.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
        );
        let parsed = parse_openmetrics(&reply.body);
        let samples = |text: &str| -> Vec<String> {
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            lines.sort();
            lines
        };
        assert_eq!(samples(&reply.body), samples(text));
        assert_eq!(parsed.len(), samples(text).len());
        assert!(
            reply
                .body
                .contains("# TYPE keyward_upstream_failures counter\n"),
            "{}",
            reply.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_are_counted_by_operation_and_fail_open_passes_by_route() {
    let upstream = Upstream::start().await;
    let config = r#"
[store]
max_quota_keys = 1
on_error = "open"

[[routes]]
name = "search"
path = "/search"

[routes.quota]
key = "header:X-Api-Key"
limit = 1
per = "1h"
"#;
    let sidecar = Sidecar::start(upstream.addr, config).await;
    let http = client();
    // 80 fresh keys on a table of one key per shard (64 shards): some are refused.
    for n in 0..80 {
        let tenant = format!("t-{n}");
        let res = send(
            &http,
            "GET",
            &sidecar.url("/search"),
            &[("x-api-key", tenant.as_str())],
            "",
        )
        .await;
        assert_eq!(res.status, 200, "fail open: every request goes through");
    }
    assert_eq!(upstream.hits(), 80);
    let metrics = sidecar.admin_get(&http, "/metrics").await.body;
    let count = |prefix: &str| -> u64 {
        let line = sample(&metrics, prefix).unwrap_or_else(|| panic!("{prefix} not in\n{metrics}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let errors = count("keyward_store_errors_total{op=\"check\",error=\"unavailable\"}");
    let passes = count("keyward_fail_open_total{layer=\"quota\",route=\"search\"}");
    let decided =
        count("keyward_decisions_total{layer=\"quota\",route=\"search\",outcome=\"store_error\"}");
    assert!(errors >= 16, "at least 80 - 64 refused: {errors}");
    assert_eq!((passes, decided), (errors, errors));
}

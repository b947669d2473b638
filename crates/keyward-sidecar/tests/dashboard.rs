//! `deploy/grafana/keyward.json` only queries metrics a running `keyward` exports.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use http::StatusCode;
use support::{Sidecar, Upstream, check_file, client, send};

/// One route per layer, so every layer makes decisions; and a quota route with a 1 s
/// window on a quota table of one key per shard, for store errors (let through).
const ALL_LAYERS: &str = r#"
[store]
max_quota_keys = 1
on_error = "open"

[[routes]]
name = "flood"
path = "/flood"

[routes.quota]
key = "header:X-Api-Key"
limit = 1
per = "1s"

[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]
required = true

[[routes]]
name = "search"
path = "/search"

[routes.quota]
key = "header:X-Api-Key"
limit = 1
per = "1m"

[[routes]]
name = "accounts"
methods = ["POST"]
path = "/accounts/{id}"

[routes.serial]
key = "path:id"
max_wait = "5s"

[[routes]]
name = "catalog"
path = "/catalog/{*rest}"

[routes.single_flight]
key = "method_uri"
scope = "none"
"#;

const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Keywords, and aggregation operators (written `sum by (l) (x)` as well as `sum(x)`).
const KEYWORDS: [&str; 18] = [
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// The metric names a PromQL expression selects: identifiers outside label matchers,
/// ranges and strings that are neither function calls, keywords nor grouping labels.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: char| {
        let mut quoted = false;
        while *i < chars.len() {
            let c = chars[*i];
            *i += 1;
            match c {
                '"' => quoted = !quoted,
                '\\' if quoted => *i += 1,
                c if c == close && !quoted => return,
                _ => {}
            }
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            i += 1;
            skip_to(&mut i, '}');
        } else if c == '[' {
            i += 1;
            skip_to(&mut i, ']');
        } else if c == '"' {
            i += 1;
            skip_to(&mut i, '"');
        } else if c.is_ascii_digit() {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let followed_by_paren = chars.get(next) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if followed_by_paren {
                    i = next + 1;
                    skip_to(&mut i, ')');
                }
            } else if !followed_by_paren && !KEYWORDS.contains(&word.as_str()) {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_skips_functions_labels_and_ranges() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{layer="x",route=~"$route"}[$__rate_interval]))) / on (route) b"#
        ),
        ["a_bucket", "b"]
    );
}

#[tokio::test]
async fn every_dashboard_query_uses_metrics_the_sidecar_exports() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ALL_LAYERS).await;
    let http = client();
    let pay = sidecar.url("/payments/1");
    let key = [("idempotency-key", "k-1")];
    assert_eq!(
        send(&http, "POST", &pay, &key, "1").await.status,
        StatusCode::OK
    );
    let replay = send(&http, "POST", &pay, &key, "1").await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let search = sidecar.url("/search");
    let tenant = [("x-api-key", "t")];
    assert_eq!(
        send(&http, "GET", &search, &tenant, "").await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&http, "GET", &search, &tenant, "").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Two at once: one waits for its turn (the queue depth goes up, then back to 0).
    let accounts = sidecar.url("/accounts/9?delay_ms=200");
    for account in support::send_concurrently(&http, 2, "POST", &accounts, &[], "x").await {
        assert_eq!(account.status, StatusCode::OK);
    }
    let catalog = send(&http, "GET", &sidecar.url("/catalog/a"), &[], "").await;
    assert_eq!(catalog.status, StatusCode::OK);
    // Store errors: more fresh quota keys than the table's 64 shards hold one each.
    for n in 0..80 {
        let tenant = format!("flood-{n}");
        send(
            &http,
            "GET",
            &sidecar.url("/flood"),
            &[("x-api-key", tenant.as_str())],
            "",
        )
        .await;
    }
    // An upstream failure (a timeout: the kit's request_timeout is 2 s), for its counter.
    let slow = send(&http, "GET", &sidecar.url("/slow?delay_ms=2500"), &[], "").await;
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);

    // Decision spans close as responses finish: wait (bounded) until all are counted.
    let mut scrape = String::new();
    for _ in 0..80 {
        let reply = sidecar.admin_get(&http, "/metrics").await;
        scrape = reply.body;
        let all = [
            "outcome=\"replayed\"",
            "outcome=\"limited\"",
            "layer=\"serial\",route=\"accounts\",outcome=\"acquired\"",
            "layer=\"single_flight\"",
            "keyward_wait_seconds_bucket{layer=\"serial\"",
        ];
        if all.iter().all(|s| scrape.contains(s)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut types = BTreeMap::new();
    let mut samples = BTreeSet::new();
    for line in scrape.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap();
            samples.insert(line[..end].to_owned());
        }
    }
    assert_eq!(
        types.get("keyward_wait_seconds").map(String::as_str),
        Some("histogram"),
        "{scrape}"
    );
    assert!(
        scrape.contains("keyward_waiting{layer=\"serial\",route=\"accounts\"} 0"),
        "a wait was counted and uncounted:\n{scrape}"
    );

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/keyward.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel without queries: {panel}");
        for target in targets {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    // Template variables query metrics too: `label_values(metric, label)`.
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["query"]["query"].as_str() {
            let inner = query.strip_prefix("label_values(").unwrap();
            exprs.push(inner.split_once(',').unwrap().0.to_owned());
        }
    }
    assert!(exprs.len() >= 7, "{exprs:?}");
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for name in names {
            let exported = match types.get(&name).map(String::as_str) {
                Some("counter" | "gauge" | "untyped") => true,
                _ => ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                    name.strip_suffix(suffix)
                        .is_some_and(|base| types.get(base).is_some_and(|t| t == "histogram"))
                }),
            };
            assert!(exported, "{name} in {expr} is not exported:\n{scrape}");
            assert!(samples.contains(&name), "no samples of {name}:\n{scrape}");
        }
    }
}

#[test]
fn the_compose_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/keyward.toml");
    let (code, out) = check_file(&path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("store redis"), "{out}");
}

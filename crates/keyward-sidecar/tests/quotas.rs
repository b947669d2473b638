//! Black-box: quotas priced by the upstream's `x-tokens-used`, quotas that count only
//! failed logins, and several quotas on one route (`[[routes.quota]]`), through the
//! built binary.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::Request;
use axum::response::IntoResponse;
use http::StatusCode;
use support::{Sidecar, client, send};

/// An upstream answering `?status=N` with `x-tokens-used: ?tokens=N`.
async fn token_upstream() -> std::net::SocketAddr {
    async fn handler(req: Request) -> impl IntoResponse {
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect();
        let status = query
            .get("status")
            .and_then(|s| s.parse().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        let tokens = query.get("tokens").cloned().unwrap_or_default();
        (status, [("x-tokens-used", tokens)], "answer")
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(handler);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

const ROUTES: &str = r#"
[[routes]]
name = "llm"
path = "/v1/chat"
[routes.quota]
key = "header:X-Api-Key"
limit = 100
per = "1h"
cost_header = "x-tokens-used"

[[routes]]
name = "login"
path = "/login"
[routes.quota]
key = "header:X-User"
limit = 3
per = "10m"
count_statuses = ["401", "403"]

[[routes]]
name = "search"
path = "/search"
[[routes.quota]]
name = "per-second"
key = "header:X-Api-Key"
limit = 3
per = "1s"
[[routes.quota]]
name = "per-day"
key = "header:X-Api-Key"
limit = 5
per = "1d"
"#;

#[tokio::test]
async fn response_priced_counted_and_several_quotas() {
    let upstream = token_upstream().await;
    let sidecar = Sidecar::start(upstream, ROUTES).await;
    let http = client();
    let key = [("x-api-key", "tenant-a")];

    // Priced by the response: 120 tokens on a 100-token quota go 20 into debt.
    let first = send(&http, "POST", &sidecar.url("/v1/chat?tokens=120"), &key, "").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("ratelimit"), Some(r#""llm";r=99;t=36"#));
    // The charge lands as the body ends; free probes (0 tokens) wait for it.
    let mut limited = None;
    for _ in 0..100 {
        let probe = send(&http, "POST", &sidecar.url("/v1/chat?tokens=0"), &key, "").await;
        if probe.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(probe);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let limited = limited.expect("the debt stops requests within 1 s");
    // 21 units of 36 s: 756 s, less the time the test took.
    let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((750..=756).contains(&retry), "{retry}");
    assert_eq!(
        limited.header("content-type"),
        Some("application/problem+json")
    );

    // Only failed logins count.
    let user = [("x-user", "alice")];
    for _ in 0..5 {
        let ok = send(&http, "POST", &sidecar.url("/login?status=200"), &user, "").await;
        assert_eq!(ok.status, StatusCode::OK);
    }
    for _ in 0..3 {
        let failed = send(&http, "POST", &sidecar.url("/login?status=401"), &user, "").await;
        assert_eq!(failed.status, StatusCode::UNAUTHORIZED);
    }
    let mut refused = None;
    for _ in 0..100 {
        let attempt = send(&http, "POST", &sidecar.url("/login?status=200"), &user, "").await;
        if attempt.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(attempt);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("three failures stop the next login");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((199..=200).contains(&retry), "{retry}");

    // Two quotas on one route: both policies listed (innermost, i.e. the last table,
    // first), the closest reported.
    let res = send(&http, "GET", &sidecar.url("/search"), &key, "").await;
    let policies: Vec<_> = res.headers.get_all("ratelimit-policy").iter().collect();
    assert_eq!(
        policies,
        [r#""per-day";q=5;w=86400"#, r#""per-second";q=3;w=1"#]
    );
    let limits: Vec<_> = res.headers.get_all("ratelimit").iter().collect();
    assert_eq!(limits.len(), 1, "{limits:?}");
    assert!(
        limits[0]
            .to_str()
            .unwrap()
            .starts_with(r#""per-second";r=2;"#),
        "{limits:?}"
    );
    sidecar.terminate().await;
}

#[test]
fn several_quotas_need_distinct_names() {
    let server = "[server]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\n";
    let route = "[[routes]]\nname = \"a\"\npath = \"/a\"\n";
    let table = |name: &str| format!("[[routes.quota]]\n{name}limit = 1\nper = \"1s\"\n");
    let (code, out) = support::check(&format!("{server}{route}{}{}", table(""), table("")));
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("routes[0].quota[0].name: missing"), "{out}");
    let named = table("name = \"x\"\n");
    let (code, out) = support::check(&format!("{server}{route}{named}{named}"));
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("routes[0].quota[1].name: \"x\" names another quota"),
        "{out}"
    );
    let (code, out) = support::check(&format!(
        "{server}{route}[routes.quota]\nlimit = 1\nper = \"1s\"\ncount_statuses = [\"2xx\", \"7xx\"]\n"
    ));
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("routes[0].quota.count_statuses: \"7xx\""),
        "{out}"
    );
    let (code, out) = support::check(&format!(
        "{server}{route}[[routes.quota]]\nname = \"x\"\nlimit = 1\nper = \"1s\"\n[[routes.quota]]\nname = \"y\"\nlimit = 1\nper = \"1d\"\ncost_header = \"x-tokens-used\"\n"
    ));
    assert_eq!(code, 0, "{out}");
}

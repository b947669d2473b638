//! `GET /hotkeys` on the admin listener of a running `keyward`.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{Sidecar, Upstream, client, send};

/// Two layers keyed on the same header: a request counts once, not once per layer.
const SEARCH: &str = r#"
[[routes]]
name = "search"
path = "/search"

[routes.quota]
key = "header:X-Api-Key"
limit = 100000
per = "1m"

[routes.serial]
key = "header:X-Api-Key"
max_wait = "5s"
"#;

const SECRET: &str = "test-deployment-secret";

/// What `keyward hash KEY` prints with the deployment's secret.
fn keyward_hash(key: &str) -> String {
    let out = std::process::Command::new(support::binary())
        .args(["hash", key])
        .env("KEYWARD_KEY_HASH_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn hotkeys_lists_the_hash_of_the_hottest_key_first_and_never_the_raw_key() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start_configured(upstream.addr, "", SEARCH, |cmd| {
        cmd.env("KEYWARD_KEY_HASH_SECRET", SECRET);
    })
    .await;
    let http = client();
    let url = sidecar.url("/search");
    // 200 requests: every tenth from one of 20 cold tenants, the rest from the hot one.
    for i in 0..200 {
        let tenant = if i % 10 == 9 {
            format!("cold-tenant-{}", i / 10)
        } else {
            "hot-tenant-secret".to_owned()
        };
        let reply = send(&http, "GET", &url, &[("x-api-key", tenant.as_str())], "").await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(upstream.hits(), 200);

    // Keyed with the deployment's secret: the operator maps a known key with
    // `keyward hash`; nobody without the secret can test guesses against the hashes.
    let hot_hash = keyward_hash("hot-tenant-secret");
    assert_eq!(
        hot_hash,
        keyward_core::KeyHash::keyed(SECRET.as_bytes(), b"hot-tenant-secret").to_string()
    );
    let unkeyed = keyward_core::KeyHash::of(b"hot-tenant-secret").to_string();
    // The decision spans close as the responses finish; allow them a bounded moment.
    let mut json = serde_json::Value::Null;
    for _ in 0..80 {
        let reply = sidecar.admin_get(&http, "/hotkeys").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert!(!reply.body.contains("tenant"), "raw key in {}", reply.body);
        assert!(
            !reply.body.contains(&unkeyed),
            "unkeyed hash in {}",
            reply.body
        );
        json = serde_json::from_str(&reply.body).unwrap();
        let total: u64 = json["routes"]["search"]
            .as_array()
            .map(|keys| keys.iter().map(|k| k["count"].as_u64().unwrap()).sum())
            .unwrap_or(0);
        if total >= 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let keys = json["routes"]["search"].as_array().unwrap();
    assert_eq!(keys.len(), 21, "{json}");
    assert_eq!(keys[0]["key_hash"], hot_hash.as_str(), "{json}");
    // Counted once per request although quota and serial both saw the key.
    assert_eq!(keys[0]["count"], 180, "{json}");
    assert_eq!(keys[0]["error"], 0);
    assert!(keys.iter().skip(1).all(|k| k["count"] == 1), "{json}");
    let cold = keyward_hash("cold-tenant-3");
    assert!(keys.iter().any(|k| k["key_hash"] == cold.as_str()));
}

#[tokio::test]
async fn without_a_configured_secret_hashes_are_keyed_with_a_random_one() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, SEARCH).await;
    let http = client();
    let url = sidecar.url("/search");
    for _ in 0..3 {
        let reply = send(&http, "GET", &url, &[("x-api-key", "203.0.113.7")], "").await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let unkeyed = keyward_core::KeyHash::of(b"203.0.113.7").to_string();
    let mut body = String::new();
    for _ in 0..80 {
        body = sidecar.admin_get(&http, "/hotkeys").await.body;
        if body.contains("\"count\":3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(body.contains("\"count\":3"), "{body}");
    assert!(
        !body.contains(&unkeyed),
        "a guessable key's unkeyed hash: {body}"
    );
    // And `keyward hash` refuses to guess without the secret.
    let out = std::process::Command::new(support::binary())
        .args(["hash", "203.0.113.7"])
        .env_remove("KEYWARD_KEY_HASH_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYWARD_KEY_HASH_SECRET"));
}

//! Request identity by meaning, black-box: idempotency fingerprints of canonical JSON
//! (with a member excluded), and keys taken from the JSON body, through the built binary.
#![allow(clippy::unwrap_used)]

mod support;

use support::{Sidecar, Upstream, client, send};

const ROUTES: &str = r#"
[[routes]]
name = "transfers"
methods = ["POST"]
path = "/transfers"

[routes.idempotency]
fingerprint_body = "json"
fingerprint_exclude = ["/sent_at"]

[[routes]]
name = "events"
methods = ["POST"]
path = "/events"
max_body = "1KiB"

[routes.idempotency]
key = "json:/event/id"
scope = "none"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserialized_retry_is_the_same_request() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ROUTES).await;
    let http = client();
    let url = sidecar.url("/transfers");
    let key = [
        ("idempotency-key", "t-1"),
        ("content-type", "application/json"),
    ];
    let first = send(
        &http,
        "POST",
        &url,
        &key,
        r#"{"amount": 10.50, "to": "bob", "sent_at": 1}"#,
    )
    .await;
    assert_eq!(first.status, 200, "{first:?}");
    // Members reordered, other whitespace, another spelling of the number, another
    // client timestamp: the same transfer.
    let retry = send(
        &http,
        "POST",
        &url,
        &key,
        "{\"sent_at\":2,\n \"to\":\"bob\",\"amount\":1.05E1}",
    )
    .await;
    assert_eq!(
        retry.header("idempotent-replayed"),
        Some("true"),
        "{retry:?}"
    );
    assert_eq!(retry.body, first.body);
    assert_eq!(upstream.hits(), 1);
    // Another amount is another request: 422.
    let other = send(&http, "POST", &url, &key, r#"{"amount":11,"to":"bob"}"#).await;
    assert_eq!(other.status, 422, "{other:?}");
    // A duplicate member is refused, not resolved: parsers disagree on which one counts.
    let twice = [("idempotency-key", "t-2")];
    for body in [r#"{"amount":1,"amount":1000}"#, "{oops"] {
        let refused = send(&http, "POST", &url, &twice, body).await;
        assert_eq!(refused.status, 400, "{refused:?}");
        assert!(
            refused.body.contains("request-body-not-json"),
            "{refused:?}"
        );
    }
    assert_eq!(
        upstream.hits(),
        1,
        "refused bodies never reach the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_the_body_and_the_body_intact() {
    let upstream = Upstream::start().await;
    let sidecar = Sidecar::start(upstream.addr, ROUTES).await;
    let http = client();
    let url = sidecar.url("/events");
    let body = r#"{"event": {"id": "evt_1", "type": "paid"}}"#;
    let first = send(&http, "POST", &url, &[], body).await;
    assert_eq!(first.status, 200, "{first:?}");
    // The upstream received the body byte for byte.
    assert!(first.body.ends_with(&format!("body={body}")), "{first:?}");
    let again = send(&http, "POST", &url, &[], body).await;
    assert_eq!(
        again.header("idempotent-replayed"),
        Some("true"),
        "{again:?}"
    );
    assert_eq!(upstream.hits(), 1);
    // No id, or not a string: no key, passed through as a request without a header key.
    for keyless in [r#"{"event":{"type":"paid"}}"#, r#"{"event":{"id":7}}"#] {
        let passed = send(&http, "POST", &url, &[], keyless).await;
        assert_eq!(passed.status, 200, "{passed:?}");
        assert_eq!(passed.header("idempotent-replayed"), None);
    }
    assert_eq!(upstream.hits(), 3);
    // Not JSON: the key is unusable (400); over max_body: 413 before any layer.
    let garbled = send(&http, "POST", &url, &[], "{not json").await;
    assert_eq!(garbled.status, 400, "{garbled:?}");
    assert!(garbled.body.contains("key-invalid"), "{garbled:?}");
    let big = format!(
        r#"{{"event":{{"id":"evt_2"}},"pad":"{}"}}"#,
        "x".repeat(2048)
    );
    let refused = send(&http, "POST", &url, &[], &big).await;
    assert_eq!(refused.status, 413, "{refused:?}");
    assert_eq!(upstream.hits(), 3);
}

#[test]
fn bad_identity_settings_are_named() {
    let config = r#"
[server]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:9000"

[[routes]]
name = "a"
path = "/a"
[routes.idempotency]
fingerprint_body = "yaml"
fingerprint_exclude = ["no-slash"]
key = "json:/a~9"

[[routes]]
name = "b"
path = "/b"
[routes.idempotency]
fingerprint_exclude = ["/x"]

[[routes]]
name = "c"
path = "/c"
[routes.webhook]
secrets_env = "KEYWARD_TEST_UNSET_VARIABLE"

[[routes]]
name = "d"
path = "/d"
[routes.webhook]
secrets = ["whsec_c2hvcnQ="]
"#;
    let (code, out) = support::check(config);
    assert_eq!(code, 64, "{out}");
    for expected in [
        "routes[0].idempotency.fingerprint_body: \"yaml\"",
        "routes[0].idempotency.fingerprint_exclude",
        "routes[0].idempotency.key",
        "routes[1].idempotency.fingerprint_exclude: needs fingerprint_body = \"json\"",
        "routes[2].webhook.secrets_env: the environment variable \"KEYWARD_TEST_UNSET_VARIABLE\"",
        "routes[3].webhook.secrets[0]: a webhook secret must hold at least 16 bytes",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in\n{out}");
    }
    assert!(!out.contains("c2hvcnQ"), "a secret was shown:\n{out}");
}

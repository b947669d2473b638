//! README "Try the sidecar": runs `examples/sidecar/try.sh` (the README quotes it
//! verbatim) against the demo upstream and `keyward serve -c examples/sidecar/payments.toml`
//! on free ports, and checks every answer the README promises. The README cannot drift
//! from what the sidecar does: a changed answer fails here.
#![allow(clippy::unwrap_used)]

mod demo;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use demo::{DemoUpstream, example_config, require_tool};
use serde_json::Value;

/// The script's first line quoted by the README: everything from here on is in the README.
const QUOTED_FROM: &str = "KEYWARD=${KEYWARD:-";

/// The script's bound: its waits add up to ~6 s; the rest is process starts.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(25);

fn repo_file(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The script's output by section: `## 4. ...` -> the lines after it.
fn sections(output: &str) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    let mut current = None;
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("## ") {
            let number = rest.split('.').next().and_then(|n| n.parse().ok());
            current = number;
            if let Some(n) = number {
                out.insert(n, String::new());
            }
            continue;
        }
        if let Some(text) = current.and_then(|n| out.get_mut(&n)) {
            text.push_str(line.trim_end_matches('\r'));
            text.push('\n');
        }
    }
    out
}

/// The JSON objects among a section's lines.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| l.starts_with('{') && l.ends_with('}'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn has_header(text: &str, name: &str, value: Option<&str>) -> bool {
    text.lines().any(|line| {
        line.split_once(':').is_some_and(|(n, v)| {
            n.eq_ignore_ascii_case(name) && value.is_none_or(|want| v.trim() == want)
        })
    })
}

fn status_line(text: &str) -> &str {
    text.lines()
        .find(|l| l.starts_with("HTTP/"))
        .unwrap_or_else(|| panic!("no status line in:\n{text}"))
}

#[test]
fn the_readme_quotes_the_script_verbatim() {
    let script = repo_file("examples/sidecar/try.sh");
    let readme = repo_file("README.md");
    let start = script.find(QUOTED_FROM).unwrap();
    let quoted = &script[start..];
    assert!(
        readme.contains(quoted),
        "README.md must quote examples/sidecar/try.sh from {QUOTED_FROM:?} to its end, verbatim"
    );
    for command in [
        "cargo run -p examples --example upstream",
        "serve -c examples/sidecar/payments.toml",
    ] {
        assert!(readme.contains(command), "README lacks {command:?}");
        assert!(script.contains(command), "try.sh lacks {command:?}");
    }
    for default in [
        "http://127.0.0.1:8080",
        "http://127.0.0.1:9901",
        "http://127.0.0.1:9000",
    ] {
        assert!(quoted.contains(default), "try.sh defaults lack {default}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_answers_as_documented() {
    require_tool("curl", "curl");
    let upstream = DemoUpstream::start().await;
    let config = std::fs::read_to_string(example_config("payments.toml")).unwrap();
    let sidecar = demo::serve(&config, upstream.addr, &[]).await;
    let script = example_config("try.sh");

    let run = tokio::process::Command::new("bash")
        .arg(&script)
        .env("KEYWARD", format!("http://{}", sidecar.addr))
        .env("ADMIN", format!("http://{}", sidecar.admin))
        .env("UPSTREAM", upstream.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SCRIPT_TIMEOUT, run)
        .await
        .expect("try.sh did not finish within 25 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "try.sh: {}\n{stdout}\n{stderr}",
        out.status
    );
    let s = sections(&stdout);
    assert_eq!(
        s.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>(),
        "{stdout}"
    );
    let all = format!("\n--- output:\n{stdout}");

    // 1. The first payment executes: 201, the upstream's first effect.
    assert!(status_line(&s[&1]).contains(" 201"), "{all}");
    let first = json_lines(&s[&1]);
    assert_eq!(first.len(), 1, "{all}");
    assert_eq!(first[0]["effect"], 1, "{all}");
    assert_eq!(first[0]["idempotency_key"], "order-1", "{all}");
    assert!(!has_header(&s[&1], "idempotent-replayed", None), "{all}");

    // 2. Its retry: the stored response, marked replayed.
    assert!(status_line(&s[&2]).contains(" 201"), "{all}");
    assert!(
        has_header(&s[&2], "idempotent-replayed", Some("true")),
        "{all}"
    );
    assert_eq!(json_lines(&s[&2]), first, "{all}");

    // 3. The key reused for another body.
    assert!(status_line(&s[&3]).contains(" 422"), "{all}");
    assert!(s[&3].contains("idempotency-key-reused"), "{all}");

    // 4. A duplicate in flight.
    assert!(status_line(&s[&4]).contains(" 409"), "{all}");
    assert!(has_header(&s[&4], "retry-after", None), "{all}");
    assert!(s[&4].contains("idempotency-request-in-flight"), "{all}");

    // 5. Two payments of one account: one at a time, distinct fencing tokens upstream.
    let pair = json_lines(&s[&5]);
    assert_eq!(pair.len(), 2, "{all}");
    let mut tokens: Vec<u64> = pair
        .iter()
        .map(|p| {
            assert_eq!(p["concurrent"], 1, "{all}");
            p["fencing_token"].as_str().unwrap().parse().unwrap()
        })
        .collect();
    tokens.dedup();
    assert_eq!(tokens.len(), 2, "fencing tokens must differ: {all}");

    // 6. The quota: ten allowed, the eleventh 429 with Retry-After and RateLimit headers.
    let allowed = s[&6].lines().next().unwrap_or("");
    assert_eq!(
        allowed.split_whitespace().collect::<Vec<_>>(),
        ["201"; 10],
        "{all}"
    );
    assert!(status_line(&s[&6]).contains(" 429"), "{all}");
    assert!(has_header(&s[&6], "retry-after", None), "{all}");
    assert!(
        has_header(&s[&6], "ratelimit-policy", Some("\"payments\";q=10;w=60")),
        "{all}"
    );
    assert!(has_header(&s[&6], "ratelimit", None), "{all}");
    assert!(s[&6].contains("r=0"), "{all}");

    // 7. The stampede: five answers, four of them copies of the one upstream call.
    let reads: Vec<&str> = s[&7].lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(reads.len(), 5, "{all}");
    assert!(reads.iter().all(|l| l.starts_with("200 ")), "{all}");
    let copies = reads
        .iter()
        .filter(|l| l.ends_with("Keyward-Coalesced: true"))
        .count();
    assert_eq!(copies, 4, "{all}");

    // 8. "Did it already happen?"
    let looked_up = json_lines(&s[&8]);
    assert_eq!(looked_up.len(), 2, "{all}");
    assert_eq!(looked_up[0]["state"], "completed", "{all}");
    assert_eq!(looked_up[0]["status"], 201, "{all}");
    assert_eq!(looked_up[1]["state"], "absent", "{all}");
    assert!(
        !s[&8].contains("order-"),
        "raw keys in the admin answers: {all}"
    );

    // 9. /metrics counts every kind of decision the walkthrough made.
    for outcome in [
        "layer=\"idempotency\",route=\"payments\",outcome=\"executed\"",
        "layer=\"idempotency\",route=\"payments\",outcome=\"replayed\"",
        "layer=\"idempotency\",route=\"payments\",outcome=\"mismatch\"",
        "layer=\"idempotency\",route=\"payments\",outcome=\"in_flight\"",
        "layer=\"quota\",route=\"payments\",outcome=\"limited\"",
        "layer=\"serial\",route=\"payments\",outcome=\"acquired\"",
        "layer=\"single_flight\",route=\"balance\",outcome=\"leader\"",
        "layer=\"single_flight\",route=\"balance\",outcome=\"follower\"",
    ] {
        assert!(s[&9].contains(outcome), "no {outcome} in /metrics: {all}");
    }

    // 10. The upstream's own account: charged once, never two at a time, one read.
    let effects: Value = serde_json::from_str(&s[&10]).unwrap_or_else(|e| panic!("{e}{all}"));
    assert_eq!(effects, upstream.state.report(), "{all}");
    for (key, n) in effects["by_idempotency_key"].as_object().unwrap() {
        assert_eq!(n, 1, "{key} took effect {n} times: {all}");
    }
    assert_eq!(effects["by_idempotency_key"]["order-1"], 1, "{all}");
    assert_eq!(
        effects["by_route"]["GET /accounts/alice/balance"], 1,
        "{all}"
    );
    assert_eq!(
        effects["by_route"]["POST /accounts/alice/payments"], 4,
        "{all}"
    );
    assert_eq!(
        effects["by_route"]["POST /accounts/bob/payments"], 10,
        "{all}"
    );
    assert_eq!(
        effects["max_concurrent"]["/accounts/alice/payments"], 1,
        "{all}"
    );
    assert_eq!(effects["stale_fencing_tokens"], 0, "{all}");
}

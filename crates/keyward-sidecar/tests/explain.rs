//! `keyward check` explains each route in one line; every `--help` names the config file
//! format page.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;

use support::{binary, check, check_file};

fn example(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/sidecar")
        .join(name)
}

#[test]
fn check_explains_what_each_route_does_to_a_request() {
    let (code, out) = check_file(&example("payments.toml"));
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "ok: listen 127.0.0.1:8080 -> upstream http://127.0.0.1:9000/, admin 127.0.0.1:9901, store memory, 2 route(s)",
            "  payments POST /accounts/{id}/payments: quota 10/min per header:x-api-key (else 429) → idempotency (required, header:idempotency-key, scope header:authorization; replays for 24h; duplicate in flight: 409) → serial per path:id (FIFO; waits up to 10s, 64 queued, then 503) → upstream",
            "  balance GET,HEAD /accounts/{id}/balance: single flight for GET,HEAD per method_uri (scope header:authorization; concurrent duplicates share one call) → upstream",
        ],
        "{out}"
    );
}

#[test]
fn check_explains_waiting_duplicates_shadow_quotas_and_bare_routes() {
    let (code, out) = check(
        r#"
[server]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:9000"
admin = "off"

[[routes]]
name = "hooks"
methods = ["POST"]
path = "/webhooks/{account}"
[routes.idempotency]
key = "header:Webhook-Id"
scope = "none"
ttl = "72h"
on_in_flight = "wait"
wait = "15s"
[routes.quota]
key = "header:X-Api-Key"
limit = 100
per = "1m"
burst = 20
shadow = true

[[routes]]
name = "rest"
path = "/{*rest}"
"#,
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("\n  hooks POST /webhooks/{account}: quota 100/min (burst 20) per header:x-api-key (shadow: counted, never rejected) → idempotency (optional, header:webhook-id, unscoped; replays for 3d; duplicate in flight: waits up to 15s) → upstream\n"),
        "{out}"
    );
    assert!(
        out.ends_with("\n  rest ANY /{*rest}: proxied untouched → upstream\n"),
        "{out}"
    );
}

#[test]
fn every_help_names_the_config_file_format_page() {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/config.md");
    assert!(page.is_file(), "{} is missing", page.display());
    for args in [
        &["--help"][..],
        &["help"],
        &["serve", "--help"],
        &["check", "--help"],
        &["help", "check"],
    ] {
        let out = Command::new(binary()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Config file format: docs/config.md"),
            "keyward {args:?} does not name the format page:\n{text}"
        );
    }
}

/// The format page names every key the config accepts (the fields of `config/raw.rs`,
/// where serde rejects any other), so a new key cannot go undocumented.
#[test]
fn the_format_page_documents_every_key() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let raw = std::fs::read_to_string(root.join("src/config/raw.rs")).unwrap();
    let page = std::fs::read_to_string(root.join("../../docs/config.md")).unwrap();
    let keys: Vec<&str> = raw
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(':').map(|(name, _)| name))
        .filter(|name| !name.contains(' '))
        .collect();
    assert!(keys.len() > 30, "{keys:?}");
    let missing: Vec<&&str> = keys
        .iter()
        .filter(|key| !page.contains(&format!("| `{key}` |")) && **key != "routes")
        .filter(|key| {
            ![
                "server",
                "store",
                "telemetry",
                "idempotency",
                "quota",
                "serial",
                "single_flight",
                "webhook",
            ]
            .contains(key)
        })
        .collect();
    assert!(missing.is_empty(), "docs/config.md lacks {missing:?}");
}

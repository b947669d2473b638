use super::*;

const CONTRACT_EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:9000"
admin = "127.0.0.1:9901"
request_timeout = "30s"
shutdown_grace = "10s"

[store]
backend = "memory"
url = "redis://127.0.0.1:6379"
prefix = "keyward:"
timeout = "50ms"
on_error = "closed"

[telemetry]
service_name = "keyward"
otlp_endpoint = "http://127.0.0.1:4317"
log_format = "text"

[[routes]]
name = "payments"
methods = ["POST"]
path = "/payments/{id}"

[routes.idempotency]
key = "header:Idempotency-Key"
required = true
scope = "header:Authorization"
ttl = "24h"
lease = "30s"
on_in_flight = "reject"
wait = "10s"
max_body = "1MiB"

[routes.quota]
key = "header:X-Api-Key"
limit = 100
per = "1m"
burst = 100
shadow = false

[routes.serial]
key = "path:id"
max_wait = "5s"
max_queue = 64

[routes.single_flight]
key = "method_uri"
max_body = "8MiB"
"#;

#[test]
fn the_contract_example_parses() {
    let config = Config::from_toml(CONTRACT_EXAMPLE).unwrap();
    assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(config.store.timeout, Duration::from_millis(50));
    let route = &config.routes[0];
    assert_eq!(route.methods.as_deref(), Some(&[Method::POST][..]));
    let idem = route.idempotency.as_ref().unwrap();
    assert!(idem.required);
    assert_eq!(idem.max_body, 1 << 20);
    assert_eq!(route.quotas.len(), 1);
    assert_eq!(route.quotas[0].quota.per(), Duration::from_secs(60));
    assert_eq!(route.quotas[0].name, None);
    assert!(route.quotas[0].charge_after.is_none());
    assert_eq!(route.serial.as_ref().unwrap().max_queue, 64);
    assert_eq!(route.single_flight.as_ref().unwrap().max_body, 8 << 20);
}

fn errors(toml: &str) -> Vec<String> {
    match Config::from_toml(toml) {
        Err(ConfigError::Invalid { errors, .. }) => errors.iter().map(|e| e.to_string()).collect(),
        Err(other) => vec![other.to_string()],
        Ok(_) => vec![],
    }
}

const SERVER: &str =
    "[server]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\n";

#[test]
fn every_error_names_the_field_and_the_value() {
    let cases = [
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[[routes]]\nname = \"b\"\npath = \"/b\"\n[routes.quota]\nlimit = 5\nper = \"5 minutes\"\n"
            ),
            "routes[1].quota.per: \"5 minutes\" is not a duration",
        ),
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.quota]\nlimit = 0\nper = \"1s\"\n"
            ),
            "routes[0].quota.limit: 0",
        ),
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.idempotency]\nkey = \"cookie:x\"\n"
            ),
            "routes[0].idempotency.key: unknown key spec \"cookie:x\"",
        ),
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.idempotency]\non_in_flight = \"queue\"\n"
            ),
            "routes[0].idempotency.on_in_flight: \"queue\"",
        ),
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.idempotency]\nmax_body = \"lots\"\n"
            ),
            "routes[0].idempotency.max_body: \"lots\"",
        ),
        (
            format!("{SERVER}[[routes]]\nname = \"a\"\npath = \"a\"\n"),
            "routes[0].path: \"a\" must start with '/'",
        ),
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[[routes]]\nname = \"a\"\npath = \"/b\"\n"
            ),
            "routes[1].name: \"a\" is used by an earlier route",
        ),
        (
            format!("{SERVER}[store]\non_error = \"maybe\"\n"),
            "store.on_error: \"maybe\"",
        ),
        (
            "[server]\nlisten = \"localhost\"\nupstream = \"http://127.0.0.1:9000\"\n".to_owned(),
            "server.listen: \"localhost\"",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:1\"\nupstream = \"ftp://x\"\n".to_owned(),
            "server.upstream: \"ftp://x\"",
        ),
        (
            format!("{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\nmethods = [\"G E T\"]\n"),
            "routes[0].methods: \"G E T\"",
        ),
        (
            format!("{SERVER}[store]\nbackend = \"etcd\"\n"),
            "store.backend: \"etcd\"",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:1\"\nupstream = \"http://127.0.0.1:2\"\nupstream_protocol = \"h3\"\n".to_owned(),
            "server.upstream_protocol: \"h3\" is not one of",
        ),
        (
            format!("{SERVER}[telemetry]\notlp_endpoint = \"collector:4317\"\n"),
            "telemetry.otlp_endpoint: \"collector:4317\"",
        ),
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.idempotency]\nscope_missing = \"allow\"\n"
            ),
            "routes[0].idempotency.scope_missing: \"allow\" is not \"anonymous\" or \"reject\"",
        ),
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.idempotency]\nrecord_retry = \"soon\"\n"
            ),
            "routes[0].idempotency.record_retry: \"soon\" is not a duration",
        ),
        (
            format!(
                "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.single_flight]\nvary = [\"Accept\", \"bad header\"]\n"
            ),
            "routes[0].single_flight.vary: \"bad header\" is not a header name",
        ),
    ];
    for (toml, expected) in cases {
        let errors = errors(&toml);
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "expected {expected:?} in {errors:?}"
        );
    }
}

#[test]
fn unknown_fields_are_rejected_with_their_name() {
    let errors = errors(&format!(
        "{SERVER}[[routes]]\nname = \"a\"\npath = \"/a\"\n[routes.quota]\nlimit = 1\nper = \"1s\"\nburts = 3\n"
    ));
    assert!(errors[0].contains("burts"), "{errors:?}");
}

#[test]
fn all_errors_are_reported_at_once() {
    let errors = errors(&format!(
        "{SERVER}[store]\non_error = \"x\"\ntimeout = \"y\"\n"
    ));
    assert_eq!(errors.len(), 2, "{errors:?}");
}

#[test]
fn passwords_are_redacted() {
    assert_eq!(
        redact_url("redis://:s3cret@host:6379"),
        "redis://:***@host:6379"
    );
    assert_eq!(
        redact_url("rediss://user:s3cret@host"),
        "rediss://user:***@host"
    );
    assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    let errors = errors(&format!(
        "{SERVER}[store]\nbackend = \"redis\"\nurl = \"http://u:s3cret@h\"\n"
    ));
    assert!(errors.iter().all(|e| !e.contains("s3cret")), "{errors:?}");
}

#[test]
fn store_serial_lease_defaults_to_10s_and_is_configurable() {
    let config = Config::from_toml(SERVER).unwrap();
    assert_eq!(config.store.serial_lease, Duration::from_secs(10));
    let config = Config::from_toml(&format!(
        "{SERVER}[store]\nbackend = \"redis\"\nserial_lease = \"1500ms\"\n"
    ))
    .unwrap();
    assert_eq!(config.store.serial_lease, Duration::from_millis(1500));
    let errs = errors(&format!("{SERVER}[store]\nserial_lease = \"soon\"\n"));
    assert!(
        errs.iter()
            .any(|e| e.contains("store.serial_lease: \"soon\"")),
        "{errs:?}"
    );
}

#[test]
fn store_urls_are_a_clusters_seed_nodes() {
    let config = Config::from_toml(&format!(
        "{SERVER}[store]\nbackend = \"redis\"\ncluster = true\nurls = [\"redis://a:7000\", \"redis://:pw@b:7001\"]\n"
    ))
    .unwrap();
    assert_eq!(
        config.store.backend,
        Backend::Redis {
            urls: vec!["redis://a:7000".to_owned(), "redis://:pw@b:7001".to_owned()],
            cluster: true,
        }
    );
    assert!(!format!("{:?}", config.store.backend).contains("pw"));
    // One url stays one url; the default is the local Redis.
    let config = Config::from_toml(&format!("{SERVER}[store]\nbackend = \"redis\"\n")).unwrap();
    assert_eq!(
        config.store.backend,
        Backend::Redis {
            urls: vec!["redis://127.0.0.1:6379".to_owned()],
            cluster: false,
        }
    );
    for (store, expected) in [
        (
            "urls = [\"redis://a:1\", \"redis://b:2\"]",
            "store.urls: 2 URLs for a standalone Redis",
        ),
        (
            "cluster = true\nurl = \"redis://a:1\"\nurls = [\"redis://b:2\"]",
            "store.urls: give either store.url or store.urls",
        ),
        ("cluster = true\nurls = []", "store.urls: an empty list"),
        (
            "cluster = true\nurls = [\"redis://a:1\", \"http://b:2\"]",
            "store.urls: \"http://b:2\" is not a redis://",
        ),
    ] {
        let errs = errors(&format!("{SERVER}[store]\nbackend = \"redis\"\n{store}\n"));
        assert!(
            errs.iter().any(|e| e.contains(expected)),
            "{store}: {errs:?}"
        );
    }
}

#[test]
fn memory_table_bounds_default_to_the_store_defaults_and_are_configurable() {
    let config = Config::from_toml(SERVER).unwrap();
    assert_eq!(
        config.store.max_quota_keys,
        keyward::defaults::DEFAULT_MEMORY_MAX_QUOTA_KEYS
    );
    assert_eq!(
        config.store.max_claims,
        keyward::defaults::DEFAULT_MEMORY_MAX_CLAIMS
    );
    assert_eq!(
        config.store.max_serial_keys,
        keyward::defaults::DEFAULT_MEMORY_MAX_SERIAL_KEYS
    );
    let config = Config::from_toml(&format!(
        "{SERVER}[store]\nmax_quota_keys = 5000\nmax_claims = 100\nmax_serial_keys = 200\n"
    ))
    .unwrap();
    assert_eq!(
        (
            config.store.max_quota_keys,
            config.store.max_claims,
            config.store.max_serial_keys
        ),
        (5000, 100, 200)
    );
    let errs = errors(&format!(
        "{SERVER}[store]\nmax_claims = 0\nmax_serial_keys = -3\n"
    ));
    assert!(
        errs.iter()
            .any(|e| e.contains("store.max_claims: 0 must be 1 or more")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("store.max_serial_keys: -3 must be 1 or more")),
        "{errs:?}"
    );
}

#[test]
fn ingress_settings_default_like_a_production_proxy_and_are_checked() {
    let config = Config::from_toml(SERVER).unwrap();
    assert_eq!(config.server.body_read_timeout, Duration::from_secs(60));
    assert_eq!(config.server.idle_write_timeout, Duration::from_secs(60));
    assert!(config.server.trusted_proxies.is_empty());
    let text = format!(
        "{SERVER}body_read_timeout = \"5s\"\nidle_write_timeout = \"2s\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n"
    );
    let config = Config::from_toml(&text).unwrap();
    assert_eq!(config.server.body_read_timeout, Duration::from_secs(5));
    assert_eq!(config.server.idle_write_timeout, Duration::from_secs(2));
    assert_eq!(config.server.trusted_proxies.len(), 2);
    let bad = format!("{SERVER}trusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/40\", \"proxy\"]\n");
    let err = Config::from_toml(&bad).unwrap_err().to_string();
    assert!(
        err.contains("server.trusted_proxies[1]: \"10.0.0.0/40\""),
        "{err}"
    );
    assert!(
        err.contains("server.trusted_proxies[2]: \"proxy\""),
        "{err}"
    );
}

#[test]
fn route_paths_must_be_canonical() {
    for (path, ok) in [
        ("/payments/{id}", true),
        ("/files/{*rest}", true),
        ("/", true),
        ("/a:b/{id}/x", true),
        ("/payments/", false),
        ("/a//b", false),
        ("/a/./b", false),
        ("/a/../b", false),
        ("/a%2Fb", false),
        ("/caf%c3%a9", false),
        ("/a b", false),
    ] {
        let text = format!("{SERVER}[[routes]]\nname = \"r\"\npath = \"{path}\"\n");
        match Config::from_toml(&text) {
            Ok(_) => assert!(ok, "{path} accepted"),
            Err(err) => {
                assert!(!ok, "{path}: {err}");
                let err = err.to_string();
                assert!(
                    err.contains("routes[0].path") && err.contains("canonical"),
                    "{err}"
                );
            }
        }
    }
}

#[test]
fn a_route_takes_one_quota_table_or_several() {
    let route = "[[routes]]\nname = \"a\"\npath = \"/a\"\n";
    let config = Config::from_toml(&format!(
        "{SERVER}{route}[[routes.quota]]\nname = \"fast\"\nlimit = 5\nper = \"1s\"\n[[routes.quota]]\nname = \"slow\"\nkey = \"header:X-Api-Key\"\nlimit = 100\nper = \"1d\"\ncost_header = \"x-tokens-used\"\ncost_missing = 2\ncount_statuses = [\"2xx\"]\n"
    ))
    .unwrap();
    let quotas = &config.routes[0].quotas;
    assert_eq!(quotas.len(), 2);
    assert_eq!(quotas[0].name.as_deref(), Some("fast"));
    assert!(quotas[0].charge_after.is_none());
    assert_eq!(quotas[1].quota.limit(), 100);
    assert_eq!(
        quotas[1].charge_after.as_ref().unwrap().to_string(),
        "x-tokens-used header (or trailer; 2 if absent) for 2xx"
    );
    // One table in an array needs no name; counted statuses alone charge 1 each.
    let config = Config::from_toml(&format!(
        "{SERVER}{route}[[routes.quota]]\nlimit = 5\nper = \"1s\"\ncount_statuses = [\"401\", \"403\"]\n"
    ))
    .unwrap();
    let quota = &config.routes[0].quotas[0];
    assert_eq!(
        quota.charge_after.as_ref().unwrap().to_string(),
        "1 per response for 401,403"
    );
}

#[test]
fn quota_table_errors_name_the_field() {
    let route = "[[routes]]\nname = \"a\"\npath = \"/a\"\n";
    let cases = [
        (
            "[routes.quota]\nlimit = 1\nper = \"1s\"\ncost_missing = 3\n",
            "routes[0].quota.cost_missing: only means something with cost_header",
        ),
        (
            "[routes.quota]\nlimit = 1\nper = \"1s\"\ncost_header = \"bad header\"\n",
            "routes[0].quota.cost_header: \"bad header\" is not a header name",
        ),
        (
            "[routes.quota]\nlimit = 1\nper = \"1s\"\ncount_statuses = []\n",
            "routes[0].quota.count_statuses: [] would count nothing",
        ),
        (
            "[routes.quota]\nname = \"a b\"\nlimit = 1\nper = \"1s\"\n",
            "routes[0].quota.name: \"a b\" must be letters",
        ),
        (
            "[[routes.quota]]\nname = \"x\"\nlimit = 1\nper = \"1s\"\n[[routes.quota]]\nname = \"y\"\nlimit = 0\nper = \"1s\"\n",
            "routes[0].quota[1].limit: 0",
        ),
    ];
    for (table, expected) in cases {
        let got = errors(&format!("{SERVER}{route}{table}"));
        assert!(
            got.iter().any(|e| e.starts_with(expected)),
            "{table}: {got:?}"
        );
    }
    // Unknown fields inside an array's table are still named by the parser.
    let got = errors(&format!(
        "{SERVER}{route}[[routes.quota]]\nlimit = 1\nper = \"1s\"\ncost_headr = \"x\"\n"
    ));
    assert!(got.iter().any(|e| e.contains("cost_headr")), "{got:?}");
}

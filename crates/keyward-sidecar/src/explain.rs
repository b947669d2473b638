//! What `keyward check` says about each route: one line naming what its stack will do to
//! a request, layer by layer in the order they run (quota -> idempotency -> serial ->
//! single_flight -> upstream), e.g.
//!
//! ```text
//! payments POST /accounts/{id}/payments: quota 10/min per header:x-api-key (else 429) → idempotency (required, header:idempotency-key, scope header:authorization; replays for 24h; duplicate in flight: 409) → serial per path:id (FIFO; waits up to 10s, 64 queued, then 503) → upstream
//! ```

use std::time::Duration;

use keyward::{KeySpec, OnInFlight};

use crate::config::{
    IdempotencyConfig, QuotaConfig, RouteConfig, SerialConfig, SingleFlightConfig,
};

/// The line for `route`.
pub fn route(route: &RouteConfig) -> String {
    let methods = match &route.methods {
        None => "ANY".to_owned(),
        Some(methods) => methods
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(","),
    };
    let steps: Vec<String> = std::iter::once(body(route))
        .chain(route.quotas.iter().map(|q| Some(quota(q))))
        .chain([
            route.idempotency.as_ref().map(idempotency),
            route.serial.as_ref().map(serial),
            route.single_flight.as_ref().map(single_flight),
        ])
        .flatten()
        .collect();
    let stack = if steps.is_empty() {
        "proxied untouched → upstream".to_owned()
    } else {
        format!("{} → upstream", steps.join(" → "))
    };
    format!("{} {methods} {}: {stack}", route.name, route.path)
}

fn body(route: &RouteConfig) -> Option<String> {
    let max_body = route.body?;
    Some(match &route.webhook {
        Some(webhook) => format!(
            "verify Standard Webhooks signature ({} secret{}, timestamps within {}; else 401; bodies up to {max_body} bytes)",
            webhook.secrets.len(),
            if webhook.secrets.len() == 1 { "" } else { "s" },
            duration(webhook.tolerance)
        ),
        None => format!("read body for json: keys (up to {max_body} bytes, else 413)"),
    })
}

fn quota(quota: &QuotaConfig) -> String {
    let q = &quota.quota;
    let mut out = match &quota.name {
        Some(name) => format!("quota {name:?} {}/{}", q.limit(), per(q.per())),
        None => format!("quota {}/{}", q.limit(), per(q.per())),
    };
    if q.burst() != q.limit() {
        out.push_str(&format!(" (burst {})", q.burst()));
    }
    out.push_str(&format!(" per {}", spec(&quota.key)));
    if let Some(scope) = &quota.scope {
        out.push_str(&format!(" scope {}", spec(scope)));
    }
    if let Some(cost) = &quota.charge_after {
        out.push_str(&format!(", charged after the response: {cost}"));
    }
    if !quota.overrides.is_empty() {
        // Keys are tenants' identifiers: counted, not printed.
        out.push_str(&format!(
            ", {} key(s) with their own quota",
            quota.overrides.len()
        ));
    }
    out.push_str(if quota.shadow {
        " (shadow: counted, never rejected)"
    } else {
        " (else 429)"
    });
    out
}

fn idempotency(idem: &IdempotencyConfig) -> String {
    let required = if idem.required {
        "required"
    } else {
        "optional"
    };
    let scope = match &idem.scope {
        Some(scope) => format!("scope {}", spec(scope)),
        None => "unscoped".to_owned(),
    };
    let in_flight = match idem.on_in_flight {
        OnInFlight::Reject => "409".to_owned(),
        OnInFlight::Wait(wait) => format!("waits up to {}", duration(wait)),
    };
    let fingerprint = match &idem.fingerprint_json {
        None => String::new(),
        Some(identity) => {
            let mut out = "; body fingerprinted as canonical JSON".to_owned();
            let list = |pointers: &[keyward::core::json::JsonPointer]| {
                pointers
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !identity.included().is_empty() {
                out.push_str(&format!(" of {}", list(identity.included())));
            }
            if !identity.excluded().is_empty() {
                out.push_str(&format!(" without {}", list(identity.excluded())));
            }
            out
        }
    };
    format!(
        "idempotency ({required}, {}, {scope}; replays for {}; duplicate in flight: {in_flight}{fingerprint})",
        spec(&idem.key),
        duration(idem.ttl)
    )
}

fn serial(serial: &SerialConfig) -> String {
    let at_once = match serial.permits {
        1 => String::new(),
        n => format!(", {n} at once"),
    };
    format!(
        "serial per {}{at_once} (FIFO; waits up to {}, {} queued, then 503)",
        spec(&serial.key),
        duration(serial.max_wait),
        serial.max_queue
    )
}

fn single_flight(flight: &SingleFlightConfig) -> String {
    let methods: Vec<&str> = flight.methods.iter().map(|m| m.as_str()).collect();
    let scope = match &flight.scope {
        Some(scope) => format!("scope {}", spec(scope)),
        None => "unscoped".to_owned(),
    };
    let reuse = if flight.reuse_for.is_zero() {
        String::new()
    } else {
        format!(", and for {} after it lands", duration(flight.reuse_for))
    };
    format!(
        "single flight for {} per {} ({scope}; concurrent duplicates share one call{reuse})",
        methods.join(","),
        spec(&flight.key)
    )
}

/// A key spec as the config spells it (header names lower-case), composites in brackets.
fn spec(spec: &KeySpec) -> String {
    match spec {
        KeySpec::Composite(_) => format!("[{spec}]"),
        _ => spec.to_string(),
    }
}

/// A quota's window: `min` for a minute, `s`, `h`, `day`, else the duration (`10s`).
fn per(per: Duration) -> String {
    match per.as_millis() {
        1_000 => "s".to_owned(),
        60_000 => "min".to_owned(),
        3_600_000 => "h".to_owned(),
        86_400_000 => "day".to_owned(),
        _ => duration(per),
    }
}

/// A duration in the largest unit the config syntax has that states it exactly.
fn duration(d: Duration) -> String {
    const DAY: u128 = 86_400_000;
    let ms = d.as_millis();
    // "24h" reads better than "1d"; "3d" better than "72h".
    if ms > DAY && ms % DAY == 0 {
        return format!("{}d", ms / DAY);
    }
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn lines(routes: &str) -> Vec<String> {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\nupstream = \"http://127.0.0.1:9000\"\n{routes}"
        );
        let config = Config::from_toml(&text).unwrap();
        config.routes.iter().map(route).collect()
    }

    #[test]
    fn names_the_webhook_check_body_keys_fingerprints_and_reuse() {
        let got = lines(
            r#"
[[routes]]
name = "hooks"
path = "/hooks"
max_body = "64KiB"
[routes.webhook]
secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"]

[[routes]]
name = "events"
path = "/events"
[routes.idempotency]
key = "json:/event/id"
fingerprint_body = "json"
fingerprint_exclude = ["/sent_at"]

[[routes]]
name = "prices"
path = "/prices"
[routes.single_flight]
reuse_for = "1s"
"#,
        );
        assert_eq!(
            got,
            [
                "hooks ANY /hooks: verify Standard Webhooks signature (2 secrets, timestamps within 5m; else 401; bodies up to 65536 bytes) → idempotency (required, header:webhook-id, unscoped; replays for 24h; duplicate in flight: 409) → upstream",
                "events ANY /events: read body for json: keys (up to 1048576 bytes, else 413) → idempotency (optional, json:/event/id, scope header:authorization; replays for 24h; duplicate in flight: 409; body fingerprinted as canonical JSON without /sent_at) → upstream",
                "prices ANY /prices: single flight for GET,HEAD per method_uri (scope header:authorization; concurrent duplicates share one call, and for 1s after it lands) → upstream",
            ]
        );
    }

    #[test]
    fn names_every_layer_in_the_order_it_runs() {
        let got = lines(
            r#"
[[routes]]
name = "payments"
methods = ["POST"]
path = "/accounts/{id}/payments"
[routes.serial]
key = "path:id"
[routes.idempotency]
required = true
[routes.quota]
key = "header:X-Api-Key"
limit = 100
per = "1m"
"#,
        );
        assert_eq!(
            got,
            [
                "payments POST /accounts/{id}/payments: quota 100/min per header:x-api-key (else 429) → idempotency (required, header:idempotency-key, scope header:authorization; replays for 24h; duplicate in flight: 409) → serial per path:id (FIFO; waits up to 5s, 64 queued, then 503) → upstream"
            ]
        );
    }

    #[test]
    fn says_what_each_setting_changes() {
        let got = lines(
            r#"
[[routes]]
name = "hooks"
path = "/hooks/{a}"
[routes.idempotency]
key = ["header:Webhook-Id", "path:a"]
scope = "none"
ttl = "72h"
on_in_flight = "wait"
wait = "1500ms"
[routes.quota]
limit = 5
per = "10s"
burst = 2
shadow = true

[[routes]]
name = "catalog"
methods = ["get", "head"]
path = "/catalog/{*rest}"
[routes.single_flight]
scope = "none"

[[routes]]
name = "plain"
path = "/plain"
"#,
        );
        assert_eq!(
            got,
            [
                "hooks ANY /hooks/{a}: quota 5/10s (burst 2) per peer_ip (shadow: counted, never rejected) → idempotency (optional, [header:webhook-id, path:a], unscoped; replays for 3d; duplicate in flight: waits up to 1500ms) → upstream",
                "catalog GET,HEAD /catalog/{*rest}: single flight for GET,HEAD per method_uri (unscoped; concurrent duplicates share one call) → upstream",
                "plain ANY /plain: proxied untouched → upstream",
            ]
        );
    }

    #[test]
    fn durations_use_the_largest_exact_unit() {
        assert_eq!(duration(Duration::from_millis(500)), "500ms");
        assert_eq!(duration(Duration::from_secs(90)), "90s");
        assert_eq!(duration(Duration::from_secs(120)), "2m");
        assert_eq!(duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(duration(Duration::from_secs(7 * 86_400)), "7d");
        assert_eq!(per(Duration::from_secs(60)), "min");
        assert_eq!(per(Duration::from_secs(300)), "5m");
    }
}

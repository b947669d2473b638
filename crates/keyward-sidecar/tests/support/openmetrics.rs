//! OpenMetrics checked by the reference parser, `prometheus_client.openmetrics.parser`
//! (Debian `python3-prometheus-client`): strict about `# EOF`, family names and units,
//! histogram buckets and exemplar syntax.

use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::Value;

/// The `Accept` header Prometheus (2.x) scrapes with, exemplar storage on or off.
pub const ACCEPT_OPENMETRICS: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// A Python that has the reference OpenMetrics parser, or a failure that says how to
/// install it.
pub fn python() -> &'static str {
    for python in ["python3", "/usr/bin/python3"] {
        let found = Command::new(python)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .output();
        if found.is_ok_and(|out| out.status.success()) {
            return python;
        }
    }
    panic!(
        "the OpenMetrics reference parser is missing: install it with `apt-get install python3-prometheus-client` (or run .ci/install-deps.sh)"
    );
}

/// Parses `text` with `prometheus_client.openmetrics.parser` (strict: `# EOF`, family
/// names, units, histogram buckets, exemplar syntax); fails on anything it refuses.
/// Answers every sample: `{"name", "labels", "value", "exemplar"}`.
pub fn parse_openmetrics(text: &str) -> Vec<Value> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        e = s.exemplar
        out.append({"family": family.name, "type": family.type, "unit": family.unit,
                    "name": s.name, "labels": s.labels, "value": s.value,
                    "exemplar": None if e is None else
                        {"labels": e.labels, "value": e.value,
                         "timestamp": None if e.timestamp is None else float(e.timestamp)}})
print(json.dumps(out))
"#;
    let mut child = Command::new(python())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the output: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

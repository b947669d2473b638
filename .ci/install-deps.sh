#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: redis-server and redis-cli
# (Redis tests, incl. a 3-node cluster) and the openssl command (the TLS test makes a
# self-signed certificate) and curl (the README's "Try the sidecar" lines, run by the
# try_sidecar test) and prometheus (promtool and a real Prometheus for the metrics tests)
# and python3-prometheus-client (the reference OpenMetrics parser). Idempotent: installs nothing that is already there. The Redis
# tests start their own servers on free loopback ports; no system service is needed.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# promtool (`promtool check metrics` on /metrics) and a real Prometheus (the dashboard test).
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# The reference OpenMetrics parser (the exemplars test checks /metrics' OpenMetrics with it).
python3 -c 'import prometheus_client.openmetrics.parser' >/dev/null 2>&1 \
    || /usr/bin/python3 -c 'import prometheus_client.openmetrics.parser' >/dev/null 2>&1 \
    || missing+=(python3-prometheus-client)

if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    # Debian starts a service on 6379 where an init system runs; tests do not use it.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
        $SUDO systemctl stop redis-server || true
        $SUDO systemctl disable redis-server || true
    fi
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
        $SUDO systemctl stop prometheus || true
        $SUDO systemctl disable prometheus || true
    fi
fi
redis-server --version

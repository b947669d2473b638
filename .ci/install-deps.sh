#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain. Idempotent: installs
# nothing that is already there. The Redis tests start their own redis-server on free
# loopback ports, so no system service is started or needed.
set -euo pipefail

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends redis-server
    # Debian starts a service on 6379 where an init system runs; tests do not use it.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
        $SUDO systemctl stop redis-server || true
        $SUDO systemctl disable redis-server || true
    fi
fi
redis-server --version

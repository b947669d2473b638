#!/usr/bin/env bash
# keyward sidecar vs nginx proxy_pass in front of the same upstream, in one run.
#
#   bash benches/load/run.sh            # DURATION=10s CONNS=64 by default
#
# Everything listens on 127.0.0.1; every wrk run is bounded by DURATION. Installs nginx
# and wrk with apt-get if missing (needs root). Prints a Markdown table for BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
BASE_PORT=${BASE_PORT:-19100}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; }; }
need nginx nginx-light
need wrk wrk

cargo build --release -q -p keyward-sidecar
KEYWARD=target/release/keyward

UPSTREAM=$BASE_PORT; NGINX=$((BASE_PORT + 1)); BARE=$((BASE_PORT + 2)); LAYERED=$((BASE_PORT + 3))
ADMIN1=$((BASE_PORT + 4)); ADMIN2=$((BASE_PORT + 5))
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$WORK/upstream.pid" ] && kill "$(cat "$WORK/upstream.pid")" 2>/dev/null || true
    [ -f "$WORK/proxy.pid" ] && kill "$(cat "$WORK/proxy.pid")" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

nginx_conf() { # name workers server-block
    cat > "$WORK/$1.conf" <<CONF
worker_processes $2;
pid $WORK/$1.pid;
error_log $WORK/$1.error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/$1.body; proxy_temp_path $WORK/$1.proxy;
    fastcgi_temp_path $WORK/$1.fcgi; uwsgi_temp_path $WORK/$1.uwsgi; scgi_temp_path $WORK/$1.scgi;
    keepalive_requests 1000000;
    $3
}
CONF
    nginx -c "$WORK/$1.conf" -p "$WORK"
}

# The upstream: a fixed small answer, as cheap as an upstream gets.
nginx_conf upstream 1 "server { listen 127.0.0.1:$UPSTREAM; location / { return 200 'ok\n'; } }"
# The baseline proxy: nginx proxy_pass with a keepalive upstream pool.
nginx_conf proxy auto "upstream backend { server 127.0.0.1:$UPSTREAM; keepalive 256; }
    server { listen 127.0.0.1:$NGINX; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"

cat > "$WORK/bare.toml" <<TOML
[server]
listen = "127.0.0.1:$BARE"
upstream = "http://127.0.0.1:$UPSTREAM"
admin = "127.0.0.1:$ADMIN1"
TOML
cat > "$WORK/layered.toml" <<TOML
[server]
listen = "127.0.0.1:$LAYERED"
upstream = "http://127.0.0.1:$UPSTREAM"
admin = "127.0.0.1:$ADMIN2"

[[routes]]
name = "pay"
methods = ["POST"]
path = "/pay"

[routes.quota]
key = "peer_ip"
limit = 1000000000
per = "1s"

[routes.idempotency]
scope = "none"
TOML
KEYWARD_LOG=error "$KEYWARD" serve -c "$WORK/bare.toml" & PIDS+=($!)
KEYWARD_LOG=error "$KEYWARD" serve -c "$WORK/layered.toml" & PIDS+=($!)
for port in $UPSTREAM $NGINX $BARE $LAYERED; do
    for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.05; done
done

# POSTs with a fresh Idempotency-Key each (first executions), or one key (replays).
cat > "$WORK/fresh.lua" <<'LUA'
-- Each wrk thread has its own Lua state: give each its own key prefix.
local threads = 0
setup = function(thread)
    threads = threads + 1
    thread:set("prefix", "t" .. threads .. "-" .. os.time())
end
local counter = 0
request = function()
    counter = counter + 1
    return wrk.format("POST", "/pay", { ["Idempotency-Key"] = prefix .. "-" .. counter }, "amount=1")
end
LUA
cat > "$WORK/replay.lua" <<'LUA'
request = function()
    return wrk.format("POST", "/pay", { ["Idempotency-Key"] = "same-key" }, "amount=1")
end
LUA

run() { # label url [script]
    local out
    if [ -n "${3:-}" ]; then out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$3" "$2"); else out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$2"); fi
    local rps p99 errors
    rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
    errors=$(echo "$out" | awk '/Non-2xx/ {print $5}')
    echo "$1|$rps|$p99|${errors:-0}"
}

echo "wrk -t$THREADS -c$CONNS -d$DURATION, $(nproc) cores, $(date -u +%FT%TZ)"
RESULTS=()
RESULTS+=("$(run "upstream direct" "http://127.0.0.1:$UPSTREAM/")")
RESULTS+=("$(run "nginx proxy_pass" "http://127.0.0.1:$NGINX/")")
RESULTS+=("$(run "keyward, no layers" "http://127.0.0.1:$BARE/")")
RESULTS+=("$(run "nginx proxy_pass, POST" "http://127.0.0.1:$NGINX/pay" "$WORK/fresh.lua")")
RESULTS+=("$(run "keyward quota+idempotency, fresh keys" "http://127.0.0.1:$LAYERED/pay" "$WORK/fresh.lua")")
RESULTS+=("$(run "keyward quota+idempotency, replays" "http://127.0.0.1:$LAYERED/pay" "$WORK/replay.lua")")

nginx_rps=$(echo "${RESULTS[1]}" | cut -d'|' -f2)
echo
echo "| setup | requests/s | p99 | non-2xx | vs nginx |"
echo "|---|---|---|---|---|"
for row in "${RESULTS[@]}"; do
    IFS='|' read -r label rps p99 errors <<<"$row"
    ratio=$(awk -v a="$rps" -v b="$nginx_rps" 'BEGIN { printf "%.2f", a / b }')
    echo "| $label | $rps | $p99 | $errors | ${ratio}x |"
done

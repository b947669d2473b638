#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a measure of the
# sidecar's own work that a shared, noisy machine does not disturb (wall-clock A/B runs
# there move by ±20 % between rounds; this moves by ~1 %).
#
#   bash benches/load/instructions.sh [BINARY] [bare|fresh|replay|serial]
#
# Starts an nginx `return 200` upstream and BINARY (default target/release/keyward)
# under `valgrind --tool=callgrind` with counting off, warms it up with wrk for 3 s,
# counts instructions over a 6 s wrk run (-t2 -c64), and prints instructions per
# request. The profile stays in CALLGRIND_OUT (default /tmp/keyward-$CASE.callgrind)
# for `callgrind_annotate --inclusive=yes`. Needs nginx, wrk and valgrind (apt-get
# install nginx-light wrk valgrind). Everything listens on 127.0.0.1.
#
# Under valgrind, sha2 runs its portable code (no SHA extensions): key hashing counts for
# more than it costs on hardware with them.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/keyward}
CASE=${2:-bare}
OUT=${CALLGRIND_OUT:-/tmp/keyward-$CASE.callgrind}
need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; }; }
need nginx nginx-light
need wrk wrk
need valgrind valgrind
W=$(mktemp -d)
chmod 755 "$W"
PORT=${BASE_PORT:-19700}
trap 'kill "${KP:-}" 2>/dev/null || true; [ -f "$W/up.pid" ] && kill "$(cat "$W/up.pid")" 2>/dev/null || true; rm -rf "$W"' EXIT
cat > "$W/up.conf" <<CONF
worker_processes 1; pid $W/up.pid; error_log $W/err.log warn; events { worker_connections 4096; }
http { access_log off; client_body_temp_path $W/b; proxy_temp_path $W/p; fastcgi_temp_path $W/f;
 uwsgi_temp_path $W/u; scgi_temp_path $W/s; keepalive_requests 1000000;
 server { listen 127.0.0.1:$PORT; location / { return 200 'ok\n'; } } }
CONF
nginx -c "$W/up.conf" -p "$W"
cat > "$W/kw.toml" <<TOML
[server]
listen = "127.0.0.1:$((PORT + 1))"
upstream = "http://127.0.0.1:$PORT"
admin = "127.0.0.1:$((PORT + 2))"
TOML
case $CASE in
    bare) ;;
    fresh | replay) cat >> "$W/kw.toml" <<TOML
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
    ;;
    serial) cat >> "$W/kw.toml" <<TOML
[[routes]]
name = "pay"
methods = ["POST"]
path = "/pay"
[routes.serial]
key = "header:account"
TOML
    ;;
    *) echo "case: bare, fresh, replay or serial" >&2; exit 64 ;;
esac
cat > "$W/fresh.lua" <<'LUA'
local threads = 0
setup = function(thread) threads = threads + 1; thread:set("prefix", "t" .. threads .. "-" .. os.time() .. math.random(1000000)) end
local counter = 0
request = function() counter = counter + 1; return wrk.format("POST", "/pay", { ["Idempotency-Key"] = prefix .. "-" .. counter, ["Account"] = prefix .. "-" .. counter }, "amount=1") end
LUA
cat > "$W/replay.lua" <<'LUA'
request = function() return wrk.format("POST", "/pay", { ["Idempotency-Key"] = "same-key" }, "amount=1") end
LUA
rm -f "$OUT" "$OUT".*
KEYWARD_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" "$BIN" serve -c "$W/kw.toml" >"$W/kw.log" 2>&1 &
KP=$!
up=no
for _ in $(seq 1 100); do
    if curl -s -o /dev/null "http://127.0.0.1:$((PORT + 1))/"; then up=yes; break; fi
    sleep 0.3
done
[ "$up" = yes ] || { echo "keyward did not come up on 127.0.0.1:$((PORT + 1)):" >&2; cat "$W/kw.log" >&2; exit 1; }
URL="http://127.0.0.1:$((PORT + 1))/"
ARGS=()
case $CASE in
    fresh | serial) ARGS=(-s "$W/fresh.lua"); URL="${URL}pay" ;;
    replay) ARGS=(-s "$W/replay.lua"); URL="${URL}pay" ;;
esac
wrk -t2 -c64 -d3s "${ARGS[@]}" "$URL" >/dev/null
callgrind_control -i on "$KP" >/dev/null 2>&1
out=$(wrk -t2 -c64 -d6s "${ARGS[@]}" "$URL")
callgrind_control -i off "$KP" >/dev/null 2>&1
callgrind_control -d "$KP" >/dev/null 2>&1
n=$(echo "$out" | awk '/requests in/ {print $1}')
sleep 1
kill "$KP"
wait "$KP" 2>/dev/null || true
ir=$(callgrind_annotate "$OUT".1 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$CASE: $n requests, $ir instructions, $(awk -v a="$ir" -v b="$n" 'BEGIN { printf "%.0f", a / b }') per request (profile: $OUT.1)"

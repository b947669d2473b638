#!/usr/bin/env bash
# Where a keyward process spends its time under load, grouped by area.
#
#   bash benches/load/profile.sh [BINARY] [bare|post|fresh|replay|serial]
#
# Starts an nginx `return 200` upstream and BINARY (default target/release/keyward) on
# 127.0.0.1, drives it with wrk (-t2 -c64, 9 s), records 5 s of it with
# `perf record -F 1999 -g -p PID`, and prints the samples grouped by area (kernel,
# allocator, tokio, hyper, tracing, keyward, ...) and the top user-space symbols.
# Needs nginx, wrk and perf (apt-get install nginx-light wrk linux-perf).
#
# FLAME=out.svg also writes a flame graph of the recording (needs inferno:
# `cargo install inferno`). Call stacks need frame pointers; build the binary for it:
#   RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
#     cargo build --release -p keyward-sidecar --target-dir target/prof
#   FLAME=/tmp/bare.svg bash benches/load/profile.sh target/prof/release/keyward bare
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/keyward}
CASE=${2:-bare}
. benches/load/common.sh
WORK=$(mktemp -d)
chmod 755 "$WORK"
trap 'kill "${KP:-}" 2>/dev/null || true; stop_servers; rm -rf "$WORK"' EXIT
upstream_nginx 19200
cat > "$WORK/kw.toml" <<TOML
[server]
listen = "127.0.0.1:19201"
upstream = "http://127.0.0.1:19200"
admin = "127.0.0.1:19202"
TOML
case $CASE in
    fresh | replay) echo "$ROUTE_LAYERED" >> "$WORK/kw.toml" ;;
    serial) echo "$ROUTE_SERIAL" >> "$WORK/kw.toml" ;;
esac
wrk_scripts
KEYWARD_LOG=warn "$BIN" serve -c "$WORK/kw.toml" >"$WORK/kw.log" 2>&1 & KP=$!
sleep 0.5
case $CASE in
    bare) ARGS=(http://127.0.0.1:19201/) ;;
    post) ARGS=(-s "$WORK/post.lua" http://127.0.0.1:19201/pay) ;;
    fresh | serial) ARGS=(-s "$WORK/fresh.lua" http://127.0.0.1:19201/pay) ;;
    replay) ARGS=(-s "$WORK/replay.lua" http://127.0.0.1:19201/pay) ;;
    *) echo "case: bare, post, fresh, replay or serial" >&2; exit 64 ;;
esac
wrk -t2 -c64 -d9s "${ARGS[@]}" >"$WORK/wrk.txt" &
WP=$!
sleep 2
perf record -F 1999 --call-graph fp -p "$KP" -o "$WORK/perf.data" -- sleep 5 >/dev/null 2>&1
wait "$WP"
grep -E "Requests/sec" "$WORK/wrk.txt"
echo "-- samples by area"
perf report -i "$WORK/perf.data" --no-children --sort dso,symbol -g none --stdio 2>/dev/null | grep -v "^#" | grep "%" | awk '
{ pct = $1; sub("%", "", pct); $1 = ""; line = $0; area = "other user space"
  if (line ~ /\[k\]/) area = "kernel"
  else if (line ~ /malloc|free|realloc|calloc|memmove|memcpy|memset|mi_/) area = "allocator and memcpy"
  else if (line ~ /tracing_subscriber|tracing_core|tracing::|tracing_opentelemetry/) area = "tracing"
  else if (line ~ /opentelemetry/) area = "opentelemetry"
  else if (line ~ /hyper_util::client::legacy/) area = "hyper-util legacy client"
  else if (line ~ /hyper|httparse|http::/) area = "hyper, httparse, http"
  else if (line ~ /tokio::/) area = "tokio"
  else if (line ~ /keyward/) area = "keyward"
  sum[area] += pct }
END { for (a in sum) printf "%6.2f%%  %s\n", sum[a], a | "sort -rn" }'
echo "-- top user-space symbols"
perf report -i "$WORK/perf.data" --no-children --sort symbol -g none --stdio 2>/dev/null | grep -v "^#" | grep "%" | grep -v "\[k\]" | sed 's/  */ /g' | cut -c1-150 | head -25
if [ -n "${FLAME:-}" ]; then
    command -v inferno-flamegraph >/dev/null || { echo "FLAME needs inferno: cargo install inferno" >&2; exit 1; }
    perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --title "keyward $CASE" > "$FLAME"
    echo "-- flame graph: $FLAME"
fi

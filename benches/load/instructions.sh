#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a measure of the
# sidecar's own work that a shared, noisy machine does not disturb (wall-clock A/B runs
# there move by ±20 % between rounds; this moves by ~1 %).
#
#   bash benches/load/instructions.sh [BINARY] [bare|post|fresh|replay|serial]
#
# `post` is `bare` with the POST of the layered cases (no layers): the baseline their
# layers add to.
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
. benches/load/common.sh
WORK=$(mktemp -d)
chmod 755 "$WORK"
PORT=${BASE_PORT:-19700}
trap 'kill "${KP:-}" 2>/dev/null || true; stop_servers; rm -rf "$WORK"' EXIT
upstream_nginx "$PORT"
cat > "$WORK/kw.toml" <<TOML
[server]
listen = "127.0.0.1:$((PORT + 1))"
upstream = "http://127.0.0.1:$PORT"
admin = "127.0.0.1:$((PORT + 2))"
TOML
case $CASE in
    bare | post) ;;
    fresh | replay) echo "$ROUTE_LAYERED" >> "$WORK/kw.toml" ;;
    serial) echo "$ROUTE_SERIAL" >> "$WORK/kw.toml" ;;
    *) echo "case: bare, post, fresh, replay or serial" >&2; exit 64 ;;
esac
wrk_scripts
rm -f "$OUT" "$OUT".*
KEYWARD_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" "$BIN" serve -c "$WORK/kw.toml" >"$WORK/kw.log" 2>&1 &
KP=$!
up=no
for _ in $(seq 1 100); do
    if curl -s -o /dev/null "http://127.0.0.1:$((PORT + 1))/"; then up=yes; break; fi
    sleep 0.3
done
[ "$up" = yes ] || { echo "keyward did not come up on 127.0.0.1:$((PORT + 1)):" >&2; cat "$WORK/kw.log" >&2; exit 1; }
URL="http://127.0.0.1:$((PORT + 1))/"
ARGS=()
case $CASE in
    fresh | serial) ARGS=(-s "$WORK/fresh.lua"); URL="${URL}pay" ;;
    replay) ARGS=(-s "$WORK/replay.lua"); URL="${URL}pay" ;;
    post) ARGS=(-s "$WORK/post.lua"); URL="${URL}pay" ;;
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

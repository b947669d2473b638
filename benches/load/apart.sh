#!/usr/bin/env bash
# What the state a sidecar's workers share costs: one keyward with 2 workers against two
# keyward processes that share nothing (each with its own store, metrics, hot keys and
# routing table), under the same total load.
#
#   ROUNDS=4 D=4s [CASE=bare|fresh|serial] [APART_WORKERS=1] bash benches/load/apart.sh [BINARY]
#
# Each round runs two `wrk -t1 -c32` at once: both against the one process, then one
# against each of the two. It prints requests/s and user µs per request (from
# /proc/PID/stat, summed over the processes). If sharing cost much (reference counts and
# locks bouncing between the cores), the processes apart would use less CPU per request.
# The order alternates between rounds. Everything listens on 127.0.0.1; needs nginx and
# wrk (apt-get install nginx-light wrk).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-target/release/keyward}
CASE=${CASE:-bare}
D=${D:-4s}
. benches/load/common.sh
WORK=$(mktemp -d)
chmod 755 "$WORK"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; stop_servers; rm -rf "$WORK"' EXIT
upstream_nginx 19870
wrk_scripts
# start NAME PORT WORKERS: a sidecar on 127.0.0.1:PORT, its admin on PORT + 100.
start() {
    cat > "$WORK/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
upstream = "http://127.0.0.1:19870"
admin = "127.0.0.1:$(($2 + 100))"
workers = $3
TOML
    case $CASE in
        bare) ;;
        fresh) echo "$ROUTE_LAYERED" >> "$WORK/$1.toml" ;;
        serial) echo "$ROUTE_SERIAL" >> "$WORK/$1.toml" ;;
        *) echo "case: bare, fresh or serial" >&2; exit 64 ;;
    esac
    KEYWARD_LOG=warn "$BIN" serve -c "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
    pids+=($!)
}
start shared 19871 2; SHARED=${pids[-1]}
start a 19872 "${APART_WORKERS:-1}"; A=${pids[-1]}
start b 19873 "${APART_WORKERS:-1}"; B=${pids[-1]}
sleep 1
target() {
    if [ "$CASE" = bare ]; then echo "http://127.0.0.1:$1/"; else echo "-s $WORK/fresh.lua http://127.0.0.1:$1/pay"; fi
}
user_ticks() { local s=0 p; for p in "$@"; do s=$((s + $(awk '{print $14}' "/proc/$p/stat"))); done; echo "$s"; }
# load PORT1 PORT2 PID...: two wrk at once; requests/s and user µs per request of PIDs.
load() {
    local p1=$1 p2=$2; shift 2
    local u0; u0=$(user_ticks "$@")
    # shellcheck disable=SC2046
    wrk -t1 -c32 -d"$D" $(target "$p1") > "$WORK/w1" & local w1=$!
    # shellcheck disable=SC2046
    wrk -t1 -c32 -d"$D" $(target "$p2") > "$WORK/w2" & local w2=$!
    wait "$w1" "$w2"
    local u1; u1=$(user_ticks "$@")
    local n=$(( $(awk '/requests in/ {print $1}' "$WORK/w1") + $(awk '/requests in/ {print $1}' "$WORK/w2") ))
    awk -v n="$n" -v u=$((u1 - u0)) -v t="$(getconf CLK_TCK)" -v d="$D" \
        'BEGIN { sub("s", "", d); printf "%7.0f req/s %6.2f user µs/req", n / d, u / t * 1e6 / n }'
}
for r in $(seq 1 "${ROUNDS:-4}"); do
    if [ $((r % 2)) = 1 ]; then
        shared=$(load 19871 19871 "$SHARED"); apart=$(load 19872 19873 "$A" "$B")
    else
        apart=$(load 19872 19873 "$A" "$B"); shared=$(load 19871 19871 "$SHARED")
    fi
    echo "round $r  one process, 2 workers: $shared  |  two processes: $apart  load $(cut -d' ' -f1 /proc/loadavg)"
done

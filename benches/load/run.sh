#!/usr/bin/env bash
# keyward sidecar vs nginx (and HAProxy) in front of the same upstreams, in one run.
#
#   bash benches/load/run.sh                 # ROUNDS=3 DURATION=5s CONNS=64
#   CASES="bare fresh" bash benches/load/run.sh
#
# Cases (each against its baseline in the same round, rounds interleaved):
#   bare     GET, no layers                      vs nginx proxy_pass (keepalive pool), HAProxy
#   fresh    POST, quota + idempotency, a fresh Idempotency-Key per request  vs nginx POST
#   replay   POST, quota + idempotency, one key (replays)                    vs nginx POST
#   serial   POST, serial on a fresh account key per request (uncontended)   vs nginx POST
#   flight   64 concurrent identical GETs on a 50 ms upstream: single flight, and single
#            flight with reuse_for = 1s, vs nginx proxy_cache_lock with a 1 s cache (nginx
#            also serves what landed for 1 s, as reuse_for does)
#   otlp     GET, no layers, OTLP traces+metrics exported, 1 % of traces sampled
#            vs the same sidecar without OTLP
#
# Beside every row: CPU per request (user and kernel µs, from /proc/PID/stat of the
# proxy's processes over the run) and context switches per request (from
# /proc/PID/task/*/status). Ratios are per round against the baseline of that round;
# the table shows medians over the rounds.
#
# Everything listens on 127.0.0.1; every wrk run is bounded by DURATION. Installs nginx,
# wrk and haproxy with apt-get if missing (needs root). Prints a Markdown table for
# BENCHMARKS.md; logs go to a temporary directory that is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/load/common.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
BASE_PORT=${BASE_PORT:-19100}
CASES=${CASES:-bare fresh replay serial flight otlp}
KEYWARD=${KEYWARD:-target/release/keyward}

need() { command -v "$1" >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2"; }; }
need nginx nginx-light
need wrk wrk
need haproxy haproxy

if [ "$KEYWARD" = target/release/keyward ]; then
    cargo build --release -q -p keyward-sidecar --bin keyward --example otlp-sink
fi
cargo build --release -q -p examples --example upstream
OTLP_SINK=target/release/examples/otlp-sink
SLOW_UPSTREAM=target/release/examples/upstream

port() { echo $((BASE_PORT + $1)); }
UPSTREAM=$(port 0); NGINX=$(port 1); HAPROXY=$(port 2); SLOW=$(port 3); NGINX_CACHE=$(port 4)
OTLP=$(port 5)
WORK=$(mktemp -d)
# nginx's workers run as an unprivileged user: they must reach their temp and cache dirs.
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    stop_servers
    rm -rf "$WORK"
}
trap cleanup EXIT

# The upstream: a fixed small answer, as cheap as an upstream gets.
upstream_nginx "$UPSTREAM"
# The baseline proxy: nginx proxy_pass with a keepalive upstream pool, one worker per core.
proxy_nginx "$NGINX" "$UPSTREAM"
# The stampede baseline: nginx in front of the slow upstream, proxy_cache_lock on.
nginx_conf cache auto "proxy_cache_path $WORK/cache.cache keys_zone=stampede:1m;
    upstream slow { server 127.0.0.1:$SLOW; keepalive 64; }
    server { listen 127.0.0.1:$NGINX_CACHE; location / { proxy_pass http://slow; proxy_http_version 1.1; proxy_set_header Connection \"\";
        proxy_cache stampede; proxy_cache_lock on; proxy_cache_lock_timeout 5s; proxy_cache_valid 200 1s; } }"
# The second baseline: HAProxy, one thread per core, HTTP keep-alive to the upstream.
cat > "$WORK/haproxy.cfg" <<CFG
global
    nbthread $(nproc)
    pidfile $WORK/haproxy.pid
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend front
    bind 127.0.0.1:$HAPROXY
    default_backend up
backend up
    server up1 127.0.0.1:$UPSTREAM
CFG
haproxy -D -f "$WORK/haproxy.cfg"
PORT=$SLOW "$SLOW_UPSTREAM" >"$WORK/slow.log" 2>&1 & PIDS+=($!)
"$OTLP_SINK" "127.0.0.1:$OTLP" >"$WORK/otlp.log" 2>&1 & PIDS+=($!)

# keyward instances: name -> port; each its own process so that its CPU is its own.
declare -A KW_PORT KW_PID
next=10
wanted() { [[ " $CASES " == *" $1 "* ]]; }
keyward_start() { # name toml-routes [env...]
    local name=$1 routes=$2; shift 2
    local listen; listen=$(port $next); local admin; admin=$(port $((next + 1))); next=$((next + 2))
    local upstream="http://127.0.0.1:$UPSTREAM"
    case $name in flight | reuse) upstream="http://127.0.0.1:$SLOW" ;; esac
    cat > "$WORK/$name.toml" <<TOML
[server]
listen = "127.0.0.1:$listen"
upstream = "$upstream"
admin = "127.0.0.1:$admin"
$routes
TOML
    env KEYWARD_LOG=warn "$@" "$KEYWARD" serve -c "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
    KW_PID[$name]=$!; PIDS+=($!); KW_PORT[$name]=$listen
}
keyward_start bare ""
keyward_start layered "$ROUTE_LAYERED"
keyward_start serial "$ROUTE_SERIAL"
wanted flight && keyward_start flight '
[[routes]]
name = "slow"
methods = ["GET"]
path = "/slow"
[routes.single_flight]
scope = "none"'
wanted flight && keyward_start reuse '
[[routes]]
name = "slow"
methods = ["GET"]
path = "/slow"
[routes.single_flight]
scope = "none"
reuse_for = "1s"'
wanted otlp && keyward_start otlp "
[telemetry]
otlp_endpoint = \"http://127.0.0.1:$OTLP\"" OTEL_TRACES_SAMPLER=traceidratio OTEL_TRACES_SAMPLER_ARG=0.01

wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing listens on $1" >&2; exit 1; }
for p in $UPSTREAM $NGINX $HAPROXY $SLOW $NGINX_CACHE "${KW_PORT[@]}"; do wait_port "$p"; done

# Request scripts (fresh keys, one key, plain POST).
wrk_scripts

# The processes of a server: nginx/haproxy master and workers, or one keyward.
pids_of() {
    case $1 in
        nginx) echo "$(cat "$WORK/proxy.pid") $(pgrep -P "$(cat "$WORK/proxy.pid")" | tr '\n' ' ')" ;;
        nginx-cache) echo "$(cat "$WORK/cache.pid") $(pgrep -P "$(cat "$WORK/cache.pid")" | tr '\n' ' ')" ;;
        haproxy) cat "$WORK/haproxy.pid" ;;
        *) echo "${KW_PID[$1]}" ;;
    esac
}
# "utime stime ctxt" summed over processes (ticks, ticks, switches).
cpu_of() {
    local u=0 s=0 c=0 pid
    for pid in $1; do
        read -r pu ps < <(awk '{ sub(/.*\) /, ""); print $12, $13 }' "/proc/$pid/stat")
        u=$((u + pu)); s=$((s + ps))
        c=$((c + $(cat /proc/"$pid"/task/*/status | awk '/ctxt_switches/ { n += $2 } END { print n }')))
    done
    echo "$u $s $c"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))

run() { # label server url [script] -> "label|rps|p99|non2xx|user_us|sys_us|ctx"
    local label=$1 server=$2 url=$3 script=${4:-} out pids before after
    pids=$(pids_of "$server")
    before=$(cpu_of "$pids")
    if [ -n "$script" ]; then
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$script" "$url")
    else
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$url")
    fi
    after=$(cpu_of "$pids")
    local requests rps p99 errors
    requests=$(echo "$out" | awk '/requests in/ { print $1 }')
    rps=$(echo "$out" | awk '/Requests\/sec/ { print $2 }')
    p99=$(echo "$out" | awk '$1 == "99%" { print $2 }')
    errors=$(echo "$out" | awk '/Non-2xx/ { print $5 }')
    read -r u0 s0 c0 <<<"$before"; read -r u1 s1 c1 <<<"$after"
    awk -v l="$label" -v rps="$rps" -v p99="$p99" -v e="${errors:-0}" -v n="$requests" \
        -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v c=$((c1 - c0)) -v t="$TICK_US" \
        'BEGIN { printf "%s|%s|%s|%s|%.1f|%.1f|%.2f\n", l, rps, p99, e, u * t / n, s * t / n, c / n }'
}

# Upstream calls of the slow demo upstream so far (for "1 upstream call per flight").
slow_effects() { curl -s "http://127.0.0.1:$SLOW/effects" | grep -o '"total": *[0-9]*' | grep -o '[0-9]*$'; }

echo "wrk -t$THREADS -c$CONNS -d$DURATION, $ROUNDS rounds, $(nproc) cores, $(date -u +%FT%TZ), cases: $CASES"
ROWS="$WORK/rows"
: >"$ROWS"
# Every row is "case|round|label|rps|p99|non2xx|user|sys|ctx"; the first row of a case in
# a round is that case's baseline.
row() { echo "$case|$round|$(run "$@")" >>"$ROWS"; }
for round in $(seq 1 "$ROUNDS"); do
    for case in $CASES; do
        case $case in
            bare)
                row "nginx proxy_pass, GET" nginx "http://127.0.0.1:$NGINX/"
                row "HAProxy, GET" haproxy "http://127.0.0.1:$HAPROXY/"
                row "keyward, no layers, GET" bare "http://127.0.0.1:${KW_PORT[bare]}/" ;;
            fresh)
                row "nginx proxy_pass, POST" nginx "http://127.0.0.1:$NGINX/pay" "$WORK/post.lua"
                row "keyward quota+idempotency, fresh keys" layered "http://127.0.0.1:${KW_PORT[layered]}/pay" "$WORK/fresh.lua" ;;
            replay)
                row "nginx proxy_pass, POST" nginx "http://127.0.0.1:$NGINX/pay" "$WORK/post.lua"
                row "keyward quota+idempotency, replays" layered "http://127.0.0.1:${KW_PORT[layered]}/pay" "$WORK/replay.lua" ;;
            serial)
                row "nginx proxy_pass, POST" nginx "http://127.0.0.1:$NGINX/pay" "$WORK/post.lua"
                row "keyward serial, uncontended keys" serial "http://127.0.0.1:${KW_PORT[serial]}/pay" "$WORK/fresh.lua" ;;
            flight)
                row "nginx proxy_cache_lock (1 s cache), 50 ms upstream" nginx-cache "http://127.0.0.1:$NGINX_CACHE/slow?delay_ms=50"
                before=$(slow_effects)
                row "keyward single flight, 50 ms upstream" flight "http://127.0.0.1:${KW_PORT[flight]}/slow?delay_ms=50"
                echo "round $round: keyward single flight made $(( $(slow_effects) - before )) upstream calls in $DURATION (about one per 50 ms flight is $(awk -v d="${DURATION%s}" 'BEGIN { print int(d / 0.05) }'))"
                before=$(slow_effects)
                row "keyward single flight, reuse_for = 1s, 50 ms upstream" reuse "http://127.0.0.1:${KW_PORT[reuse]}/slow?delay_ms=50"
                echo "round $round: with reuse_for = 1s, $(( $(slow_effects) - before )) upstream calls in $DURATION" ;;
            otlp)
                row "keyward, no layers, GET (OTLP off)" bare "http://127.0.0.1:${KW_PORT[bare]}/"
                row "keyward, no layers, GET, OTLP on, 1 % sampled" otlp "http://127.0.0.1:${KW_PORT[otlp]}/" ;;
        esac
    done
done

echo
echo "| case | setup | requests/s | vs baseline | p99 | non-2xx | user µs/req | vs baseline | kernel µs/req | ctx switches/req |"
echo "|---|---|---|---|---|---|---|---|---|---|"
# Medians over the rounds, per row; ratios are medians of each round's ratio.
awk -F'|' '
    function median(list,    n, a, i, j, t) {
        n = split(list, a, " ")
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
        return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
        k = $1 "|" $3; cr = $1 "|" $2
        if (!(cr in base)) { base[cr] = $4; baseu[cr] = $7 }
        if (!(k in seen)) { seen[k] = 1; order[++count] = k }
        rps[k] = rps[k] " " $4; p99[k] = p99[k] " " $5; err[k] += $6
        u[k] = u[k] " " $7; s[k] = s[k] " " $8; c[k] = c[k] " " $9
        ratio[k] = ratio[k] " " ($4 / base[cr]); uratio[k] = uratio[k] " " (baseu[cr] > 0 ? $7 / baseu[cr] : 0)
    }
    END {
        for (i = 1; i <= count; i++) { k = order[i]; split(k, kl, "|")
            printf "| %s | %s | %.0f | %.2fx | %s | %d | %.1f | %.2fx | %.1f | %.2f |\n", kl[1], kl[2], median(rps[k]), median(ratio[k]), p99[k], err[k], median(u[k]), median(uratio[k]), median(s[k]), median(c[k]) }
    }' "$ROWS"

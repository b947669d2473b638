#!/usr/bin/env bash
# A/B of keyward binaries, interleaved, each against nginx proxy_pass in the same round.
#
#   ROUNDS=4 D=4s [CASE=bare|fresh|serial] [WORKERS=2,1] bash benches/load/ab.sh BIN_A BIN_B ...
#
# An nginx `return 200` upstream, nginx `proxy_pass` (2 workers, keepalive 64) as the
# baseline, and each binary as a sidecar with no layers (CASE=bare, GET /) or quota +
# idempotency on fresh keys (CASE=fresh, POST /pay) or serial on fresh keys (CASE=serial,
# POST /pay, uncontended); WORKERS gives each binary's
# `[server] workers` (default 2). Each round runs wrk -t2 -c64 for D against the
# baseline, then against each binary, and prints requests/s, user and kernel µs per
# request (from /proc/PID/stat) and the ratio to the baseline of the round. Everything
# listens on 127.0.0.1; needs nginx and wrk.
set -euo pipefail
ROUNDS=${ROUNDS:-5}; D=${D:-4s}; CASE=${CASE:-bare}
cd "$(dirname "$0")/../.."
. benches/load/common.sh
WORK=$(mktemp -d); chmod 755 "$WORK"
pids=()
cleanup() { for p in "${pids[@]}"; do kill $p 2>/dev/null || true; done; stop_servers; rm -rf "$WORK"; }
trap cleanup EXIT
upstream_nginx 19400
NGINX_WORKERS=2 proxy_nginx 19401 19400
wrk_scripts
IFS=, read -ra WORKERS_LIST <<< "${WORKERS:-2,2}"
i=0
for bin in "$@"; do
  i=$((i+1)); port=$((19410+i*3))
  cat > $WORK/kw$i.toml <<TOML
[server]
listen = "127.0.0.1:$port"
upstream = "http://127.0.0.1:19400"
admin = "127.0.0.1:$((port+1))"
workers = ${WORKERS_LIST[$((i-1))]:-2}
TOML
  case $CASE in
    fresh) echo "$ROUTE_LAYERED" >> "$WORK/kw$i.toml" ;;
    serial) echo "$ROUTE_SERIAL" >> "$WORK/kw$i.toml" ;;
  esac
  KEYWARD_LOG=warn $bin serve -c $WORK/kw$i.toml > $WORK/kw$i.log 2>&1 & pids+=($!)
done
sleep 0.7
ut() { awk '{print $14+$15}' /proc/$1/stat; }
nginxpids() { pgrep -P $(cat "$WORK/proxy.pid") | tr '\n' ' '; }
run() { # port pidlist -> "rps user_us_per_req"
  local port=$1; shift
  local u0=0; for p in $@; do u0=$((u0+$(awk '{print $14}' /proc/$p/stat))); done
  local s0=0; for p in $@; do s0=$((s0+$(awk '{print $15}' /proc/$p/stat))); done
  if [ "$CASE" = fresh ] || [ "$CASE" = serial ]; then out=$(wrk -t2 -c64 -d$D -s $WORK/fresh.lua http://127.0.0.1:$port/pay)
  elif [ "$CASE" = post ]; then out=$(wrk -t2 -c64 -d$D -s $WORK/post.lua http://127.0.0.1:$port/pay)
  else out=$(wrk -t2 -c64 -d$D http://127.0.0.1:$port/); fi
  local u1=0; for p in $@; do u1=$((u1+$(awk '{print $14}' /proc/$p/stat))); done
  local s1=0; for p in $@; do s1=$((s1+$(awk '{print $15}' /proc/$p/stat))); done
  local n=$(echo "$out" | awk '/requests in/ {print $1}')
  local rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  local tck=$(getconf CLK_TCK)
  awk -v n=$n -v r=$rps -v u=$((u1-u0)) -v s=$((s1-s0)) -v t=$tck 'BEGIN{printf "%8.0f %6.2f %6.2f", r, u/t*1e6/n, s/t*1e6/n}'
}
npx=$(nginxpids)
FRESHCASE=$CASE
for r in $(seq 1 $ROUNDS); do
  if [ "$CASE" = bare ]; then CASE=bare; else CASE=post; fi
  base=$(run 19401 $npx); CASE=$FRESHCASE
  line="round $r nginx: $base |"
  brps=$(echo $base | awk '{print $1}')
  i=0
  for p in "${pids[@]}"; do i=$((i+1)); port=$((19410+i*3))
    res=$(run $port $p); rps=$(echo $res | awk '{print $1}')
    line="$line kw$i: $res ($(awk -v a=$rps -v b=$brps 'BEGIN{printf "%.2fx", a/b}')) |"
  done
  echo "$line  load $(cut -d' ' -f1 /proc/loadavg)"
done

# Shared by the scripts of benches/load (sourced, not run): the nginx servers, the
# sidecar routes of each case and the wrk request scripts. Callers set WORK (a
# temporary directory, chmod 755: nginx's workers run as nobody).

# nginx_conf NAME WORKERS HTTP-BLOCK: writes $WORK/NAME.conf and starts that nginx.
nginx_conf() {
    mkdir -p "$WORK/$1.cache" && chmod 777 "$WORK/$1.cache"
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

# upstream_nginx PORT: the upstream of every case, a fixed small answer (one worker).
upstream_nginx() {
    nginx_conf upstream 1 "server { listen 127.0.0.1:$1; location / { return 200 'ok\n'; } }"
}

# proxy_nginx PORT UPSTREAM-PORT: the baseline, nginx proxy_pass with a keepalive pool.
proxy_nginx() {
    nginx_conf proxy "${NGINX_WORKERS:-auto}" "upstream backend { server 127.0.0.1:$2; keepalive 64; }
    server { listen 127.0.0.1:$1; location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
}

# stop_servers: stops every server that wrote a pid file in $WORK (nginx, HAProxy).
stop_servers() {
    local pid
    for pid in "$WORK"/*.pid; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
    done
    return 0
}

# The sidecar's routes per case: quota + idempotency on POST /pay, serial on POST /pay.
ROUTE_LAYERED='
[[routes]]
name = "pay"
methods = ["POST"]
path = "/pay"
[routes.quota]
key = "peer_ip"
limit = 1000000000
per = "1s"
[routes.idempotency]
scope = "none"'
ROUTE_SERIAL='
[[routes]]
name = "pay"
methods = ["POST"]
path = "/pay"
[routes.serial]
key = "header:X-Account"'

# wrk_scripts: $WORK/fresh.lua (a new key and account per request; each wrk thread has
# its own Lua state, so each gets its own prefix), replay.lua (one key), post.lua.
wrk_scripts() {
    cat > "$WORK/fresh.lua" <<'LUA'
local threads = 0
setup = function(thread) threads = threads + 1; thread:set("prefix", "t" .. threads .. "-" .. os.time() .. "-" .. math.random(1000000)) end
local counter = 0
request = function()
    counter = counter + 1
    return wrk.format("POST", "/pay", { ["Idempotency-Key"] = prefix .. "-" .. counter, ["X-Account"] = prefix .. "-" .. counter }, "amount=1")
end
LUA
    cat > "$WORK/replay.lua" <<'LUA'
request = function() return wrk.format("POST", "/pay", { ["Idempotency-Key"] = "same-key" }, "amount=1") end
LUA
    cat > "$WORK/post.lua" <<'LUA'
request = function() return wrk.format("POST", "/pay", nil, "amount=1") end
LUA
}

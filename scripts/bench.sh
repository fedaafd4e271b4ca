#!/usr/bin/env bash
# Benchmark: small keep-alive GETs against the same upstream, in one run: direct to the
# upstream, through rampart, through nginx set up as an equivalent keep-alive reverse proxy,
# and through rampart with a rate-limit policy on every request (memory store, then Redis
# store against a redis-server started here). Prints a markdown table and writes it to
# target/bench/results.md.
#
#   scripts/bench.sh                          # defaults
#   WORKERS=1 DURATION=20s scripts/bench.sh   # knobs, all optional:
#
#   WORKERS      rampart --workers and nginx worker_processes     (2)
#   DURATION     measured wrk run per case                         (10s)
#   WARMUP       wrk run before each measured run                  (2s)
#   CONNECTIONS  wrk -c                                            (64)
#   THREADS      wrk -t                                            (1)
#   PAIRS        interleaved rampart/nginx pairs after the table    (8)
#   PAIR_RUN     wrk run per side of a pair                        (3s)
#   BUILD        1: cargo build --release first; 0: use the binary as it is (1)
#   RAMPART_BIN  binary to run (${CARGO_TARGET_DIR:-target}/release/rampart)
#   OUT_DIR      results, raw wrk output and logs                  (target/bench)
#   PIN          1: pinned one-worker mode: each proxy alone on CPU 1 with one worker,
#                wrk, the upstream and redis on CPU 0 (taskset); WORKERS defaults to 1  (0)
#   MODE         rps: the GET benchmark above; sse: long-lived SSE streams (below); tls:
#                handshakes (full, resumed) and keep-alive h1/h2 over TLS (scripts/bench/tls.sh);
#                scale: issue 18's scenarios, rampart vs nginx: plain, every feature on, a
#                fixed rate, 64 KiB bodies, 1,000 connections, h2c (scripts/bench/scale.sh)  (rps)
#
# MODE=sse: STREAMS concurrent SSE streams through each target (direct, rampart, nginx with
# `proxy_buffering off`) from one upstream that sends each stream an EVENT_BYTES event every
# EVENT_MS; held HOLD seconds after SETTLE; memory per stream (RSS with the streams open minus
# RSS idle after one warm-up stream, / STREAMS) and CPU µs per event received. Each case gets
# a freshly started proxy; ROUNDS rounds, rampart and nginx in turn. Load client and upstream:
# examples/sse_load.rs (built with BUILD=1). Results in $OUT_DIR/results-sse[-pin].md.
#
#   MODE=sse scripts/bench.sh                 # 2 workers, nothing pinned
#   MODE=sse PIN=1 BUILD=0 scripts/bench.sh   # 1 worker, proxy alone on CPU 1
#
#   STREAMS (1000)  EVENT_MS (100)  EVENT_BYTES (100)  SETTLE (5, s)  HOLD (20, s)  ROUNDS (2)
#   TOGETHER (0)    1: rampart and nginx at once in each round, a load client each (the
#                   machine's drift falls on both alike); 0: one after the other. MODE=scale
#                   takes it too (scripts/bench/scale.sh)
#   SSE_BIN         load client/upstream (${CARGO_TARGET_DIR:-target}/release/examples/sse_load)
#
# Everything listens on and is sent to 127.0.0.1 only; every load run has a fixed duration;
# every process started here is stopped on exit, failure included.
#
# Adding a scenario = one more `run_case NAME URL PIDS [EXPECT]` line in main() (plus, if it
# needs one, a listener or route in scripts/bench/rampart.yaml.tmpl).

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/scripts/bench

PIN=${PIN:-0}
if [[ $PIN == 1 ]]; then
    WORKERS=${WORKERS:-1}
    # The proxy measured alone on one core; what drives it on the other.
    PROXY_ON=(taskset -c 1)
    LOAD_ON=(taskset -c 0)
else
    WORKERS=${WORKERS:-2}
    PROXY_ON=()
    LOAD_ON=()
fi
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
PAIRS=${PAIRS:-8}
PAIR_RUN=${PAIR_RUN:-3s}
BUILD=${BUILD:-1}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RAMPART_BIN=${RAMPART_BIN:-$TARGET_DIR/release/rampart}
OUT_DIR=${OUT_DIR:-$ROOT/target/bench}
MODE=${MODE:-rps}
STREAMS=${STREAMS:-1000}
EVENT_MS=${EVENT_MS:-100}
EVENT_BYTES=${EVENT_BYTES:-100}
SETTLE=${SETTLE:-5}
HOLD=${HOLD:-20}
ROUNDS=${ROUNDS:-2}
TOGETHER=${TOGETHER:-0}
SSE_BIN=${SSE_BIN:-$TARGET_DIR/release/examples/sse_load}

HOST=127.0.0.1
UPSTREAM_PORT=3001     # fixed by `rampart demo --upstreams-only` (JSON backend)
LLM_PORT=3000          # fixed by `rampart demo --upstreams-only` (SSE stand-in)
RAMPART_PORT=18080
RAMPART_ADMIN_PORT=19901
NGINX_PORT=18081
RAMPART_RL_MEMORY_PORT=18082
RAMPART_RL_REDIS_PORT=18083
RAMPART_FEATURES_PORT=18084
RAMPART_CACHE_MEMORY_PORT=18086
RAMPART_CACHE_REDIS_PORT=18087
RAMPART_CACHE_REDIS_ONLY_PORT=18088
NGINX_H2C_PORT=18085
REDIS_PORT=16379
SSE_UPSTREAM_PORT=13002
SSE_PATH=/v1/stream
BENCH_PATH=/api/agents

CLK_TCK=$(getconf CLK_TCK)
WORK=""                # temp dir, made in main
STARTED_PIDS=()        # everything we started, stopped by cleanup()
UPSTREAM_PID=""
RAMPART_PID=""
NGINX_PID=""
REDIS_PID=""
WRK_PID=""
BUSY_START="?"
REDIS_NOTE=""
CACHE_NOTE=""
NGINX_BIN=nginx

# Results, one entry per run_case, in order.
R_NAME=() R_RPS=() R_P50=() R_P99=() R_CPU=() R_ERR=() R_NOTE=()
# Interleaved pairs: rampart/nginx ratios of req/s and of CPU µs/req, one per pair.
P_RPS=() P_CPU=()

log() { printf '[bench] %s\n' "$*" >&2; }
die() {
    printf '[bench] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------
# Processes

# PIDs whose parent is $1 (from /proc, no procps needed).
children_of() {
    local parent=$1 stat rest pid ppid
    for stat in /proc/[0-9]*/stat; do
        rest=$(cat "$stat" 2>/dev/null) || continue
        pid=${rest%% *}
        rest=${rest##*) }
        # rest: state ppid ...
        read -r _ ppid _ <<<"$rest"
        if [[ $ppid == "$parent" ]]; then
            echo "$pid"
        fi
    done
}

alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }

stop_pid() {
    local pid=$1 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for 5s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid kids=()
    trap - EXIT INT TERM
    # nginx workers are children of the master: remember them in case the master has to be
    # killed hard and leaves them behind.
    if alive "$NGINX_PID"; then
        mapfile -t kids < <(children_of "$NGINX_PID")
    fi
    for pid in $WRK_PID "${STARTED_PIDS[@]}"; do
        stop_pid "$pid"
    done
    for pid in "${kids[@]}"; do
        stop_pid "$pid"
    done
    # Reap.
    wait 2>/dev/null || true
    if [[ -n $WORK && -d $WORK ]]; then
        rm -rf "$WORK"
    fi
    if ((rc != 0)) && [[ -n $WORK ]]; then
        log "failed (exit $rc); logs in $OUT_DIR/logs/"
    fi
    exit "$rc"
}

# Is something listening on TCP port $1 (any address, v4 or v6)?
port_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    # local_address is ADDR:PORT in hex; state 0A is LISTEN.
    awk -v p=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { found = 1 }
        END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

check_ports_free() {
    local port busy=()
    for port in "$@"; do
        if port_listening "$port"; then
            busy+=("$port")
        fi
    done
    if ((${#busy[@]})); then
        die "port(s) ${busy[*]} already in use on this machine (another rampart demo, nginx or" \
            "an earlier bench still running?); free them and retry"
    fi
}

# wait_listening NAME PID PORT LOG: until PORT listens, or fail if PID dies / 15 s pass.
wait_listening() {
    local name=$1 pid=$2 port=$3 logfile=$4 i
    for ((i = 0; i < 150; i++)); do
        if ! alive "$pid"; then
            log "$name exited before listening on $port; last lines of $logfile:"
            tail -n 20 "$logfile" >&2 || true
            die "$name did not start"
        fi
        if port_listening "$port"; then
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$logfile" >&2 || true
    die "$name (pid $pid) not listening on $port after 15s"
}

# http_status URL: the status code of one GET (Connection: close), via bash's /dev/tcp so
# that curl is not needed. Empty on failure.
http_status() {
    local url=$1 host port path fd line=""
    [[ $url =~ ^http://([^:/]+):([0-9]+)(/.*)?$ ]] || return 1
    host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]} path=${BASH_REMATCH[3]:-/}
    exec {fd}<>"/dev/tcp/$host/$port" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$path" "$host" "$port" >&"$fd"
    IFS= read -r -t 5 line <&"$fd" || true
    exec {fd}>&-
    line=${line%$'\r'}
    echo "${line#* }" | cut -d' ' -f1
}

# ---------------------------------------------------------------------------------------
# Setup

install_tools() {
    command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk) ||
        die "wrk is missing and could not be installed (apt-get install -y wrk)"
    # Debian's package puts nginx in /usr/sbin, which may not be on a non-root PATH.
    command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] ||
        (apt-get update && apt-get install -y nginx) ||
        die "nginx is missing and could not be installed (apt-get install -y nginx)"
    NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
    [[ $MODE == sse ]] || command -v redis-server >/dev/null ||
        (apt-get update && apt-get install -y redis-server) ||
        die "redis-server is missing and could not be installed (apt-get install -y redis-server)"
}

build_rampart() {
    if [[ $BUILD == 1 ]]; then
        log "cargo build --release (target dir $TARGET_DIR)"
        (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet) ||
            die "cargo build --release failed"
        if [[ $MODE == sse ]]; then
            (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet --example sse_load) ||
                die "cargo build --release --example sse_load failed"
        fi
    fi
    [[ -x $RAMPART_BIN ]] || die "no rampart binary at $RAMPART_BIN (build it or set RAMPART_BIN)"
    [[ $MODE != sse || -x $SSE_BIN ]] ||
        die "no sse_load binary at $SSE_BIN (BUILD=1, or cargo build --release --example sse_load)"
}

render() { # render TEMPLATE OUT KEY=VALUE...
    local template=$1 out=$2 kv text
    shift 2
    text=$(<"$template")
    for kv in "$@"; do
        text=${text//@${kv%%=*}@/${kv#*=}}
    done
    printf '%s\n' "$text" >"$out"
}

# The GET modes' rampart config (rps, scale) in $WORK/rampart.yaml, checked.
render_rampart_config() {
    render "$BENCH_DIR/rampart.yaml.tmpl" "$WORK/rampart.yaml" \
        ADMIN="$HOST:$RAMPART_ADMIN_PORT" LISTEN="$HOST:$RAMPART_PORT" \
        LISTEN_RL_MEMORY="$HOST:$RAMPART_RL_MEMORY_PORT" \
        LISTEN_RL_REDIS="$HOST:$RAMPART_RL_REDIS_PORT" \
        LISTEN_FEATURES="$HOST:$RAMPART_FEATURES_PORT" \
        LISTEN_CACHE_MEMORY="$HOST:$RAMPART_CACHE_MEMORY_PORT" \
        LISTEN_CACHE_REDIS="$HOST:$RAMPART_CACHE_REDIS_PORT" \
        LISTEN_CACHE_REDIS_ONLY="$HOST:$RAMPART_CACHE_REDIS_ONLY_PORT" \
        UPSTREAM="$HOST:$UPSTREAM_PORT" REDIS="$HOST:$REDIS_PORT"
    "$RAMPART_BIN" check --config "$WORK/rampart.yaml" >"$OUT_DIR/logs/check.log" 2>&1 || {
        cat "$OUT_DIR/logs/check.log" >&2
        die "rampart check rejected the bench config"
    }
}

start_upstream() {
    local logfile=$OUT_DIR/logs/upstream.log
    log "starting upstream: rampart demo --upstreams-only --workers 1"
    "${LOAD_ON[@]}" "$RAMPART_BIN" demo --config "$WORK/rampart.yaml" --upstreams-only --workers 1 \
        >"$logfile" 2>&1 &
    UPSTREAM_PID=$!
    STARTED_PIDS+=("$UPSTREAM_PID")
    wait_listening upstream "$UPSTREAM_PID" "$UPSTREAM_PORT" "$logfile"
}

# A redis-server of the bench's own (no persistence), for the Redis-store case.
start_redis() {
    local logfile=$OUT_DIR/logs/redis.log
    mkdir -p "$WORK/redis"
    log "starting redis-server on $HOST:$REDIS_PORT"
    "${LOAD_ON[@]}" redis-server --port "$REDIS_PORT" --bind "$HOST" --save "" --appendonly no \
        --dir "$WORK/redis" >"$logfile" 2>&1 &
    REDIS_PID=$!
    STARTED_PIDS+=("$REDIS_PID")
    wait_listening redis-server "$REDIS_PID" "$REDIS_PORT" "$logfile"
}

start_rampart() { # [CONFIG]: $WORK/rampart.yaml unless given
    local logfile=$OUT_DIR/logs/rampart.log config=${1:-$WORK/rampart.yaml}
    log "starting rampart: rampart run --workers $WORKERS"
    "${PROXY_ON[@]}" "$RAMPART_BIN" run --config "$config" --workers "$WORKERS" >"$logfile" 2>&1 &
    RAMPART_PID=$!
    STARTED_PIDS+=("$RAMPART_PID")
    wait_listening rampart "$RAMPART_PID" "$RAMPART_PORT" "$logfile"
}

start_nginx() { # [TEMPLATE UPSTREAM [KEY=VALUE...]]: nginx.conf.tmpl and the JSON upstream unless given
    local prefix=$WORK/nginx logfile=$OUT_DIR/logs/nginx.log
    local template=${1:-$BENCH_DIR/nginx.conf.tmpl} upstream=${2:-$HOST:$UPSTREAM_PORT}
    shift $(($# < 2 ? $# : 2))
    mkdir -p "$prefix"
    # Workers run as an unprivileged user when started as root: let them into the prefix.
    chmod 755 "$WORK" "$prefix"
    render "$template" "$prefix/nginx.conf" \
        WORKERS="$WORKERS" PREFIX="$prefix" LISTEN="$HOST:$NGINX_PORT" \
        UPSTREAM="$upstream" "$@"
    "$NGINX_BIN" -t -q -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
        >"$logfile" 2>&1 || {
        cat "$logfile" >&2
        die "nginx rejected $prefix/nginx.conf"
    }
    log "starting nginx: worker_processes $WORKERS"
    "${PROXY_ON[@]}" "$NGINX_BIN" -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" >>"$logfile" 2>&1 &
    NGINX_PID=$!
    STARTED_PIDS+=("$NGINX_PID")
    wait_listening nginx "$NGINX_PID" "$NGINX_PORT" "$prefix/error.log"
}

# The processes whose CPU time counts as nginx's: the master and its workers.
nginx_pids() {
    echo "$NGINX_PID"
    children_of "$NGINX_PID"
}

# ---------------------------------------------------------------------------------------
# Measuring

# Sum of utime+stime, in clock ticks, over the given PIDs (whole processes, all threads).
cpu_ticks() {
    local total=0 pid rest f
    for pid in "$@"; do
        rest=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        rest=${rest##*) }          # after "pid (comm) "; comm may contain spaces
        read -r -a f <<<"$rest"    # f[0] is field 3 (state); utime is 14, stime 15
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# Busy and total jiffies of the whole machine, from /proc/stat.
box_ticks() {
    awk '$1 == "cpu" { busy = $2 + $3 + $4 + $7 + $8 + $9; total = busy + $5 + $6;
        print busy, total; exit }' /proc/stat
}

busy_pct() { # busy_pct "BUSY TOTAL" "BUSY TOTAL" -> integer percent between two box_ticks
    awk -v a="$1" -v b="$2" 'BEGIN {
        split(a, x, " "); split(b, y, " ")
        if (y[2] > x[2]) printf "%.0f", (y[1] - x[1]) / (y[2] - x[2]) * 100; else print "?" }'
}

# Latency like "512.34us", "1.20ms", "2.01s" -> milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000
        printf "%.3f", n }'
}

# load DURATION URL OUT [WRK_ARGS...]: one bounded wrk run. In the background and waited
# for, so that a signal reaches cleanup() at once instead of after wrk finishes.
load() {
    local duration=$1 url=$2 out=$3 rc=0
    shift 3
    "${LOAD_ON[@]}" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" "$@" "$url" >"$out" &
    WRK_PID=$!
    wait "$WRK_PID" || rc=$?
    WRK_PID=""
    ((rc == 0)) || die "wrk exited with $rc against $url"
}

# run_case NAME URL PIDS [EXPECT]
#   NAME    row label in the table (also the raw output file name)
#   URL     http://127.0.0.1:PORT/path, loaded with GETs
#   PIDS    space-separated PIDs whose CPU time is charged to this case, or "-" for none
#   EXPECT  status a single probe GET must return before loading (default 200); a scenario
#           that measures rejections (429, 503) passes its status here. Non-2xx responses
#           under load are counted in the errors column either way.
run_case() {
    local name=$1 url=$2 pids_arg=$3 expect=${4:-200}
    local status raw=$OUT_DIR/wrk-$name.txt pids=() cpu0 cpu1 box0 box1
    [[ $url =~ ^http://(127\.[0-9.]+|localhost):[0-9]+/ ]] ||
        die "run_case $name: $url is not a loopback URL"
    [[ $pids_arg == - ]] || read -r -a pids <<<"$pids_arg"

    status=$(http_status "$url" || true)
    [[ $status == "$expect" ]] ||
        die "run_case $name: GET $url answered '${status:-nothing}', expected $expect"

    log "$name: warm-up $WARMUP, then $DURATION measured ($THREADS thread(s), $CONNECTIONS connections)"
    load "$WARMUP" "$url" /dev/null

    cpu0=$(cpu_ticks "${pids[@]}")
    box0=$(box_ticks)
    load "$DURATION" "$url" "$raw" --latency
    cpu1=$(cpu_ticks "${pids[@]}")
    box1=$(box_ticks)
    sed 's/^/    /' "$raw" >&2

    # Parse wrk's report.
    local rps p50 p99 reqs errors cpu_us box_busy
    rps=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$raw")
    p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$raw")")
    p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$raw")")
    reqs=$(awk '/ requests in / { print $1 }' "$raw")
    [[ -n $rps && -n $reqs ]] || die "run_case $name: could not parse wrk output ($raw)"
    # "Socket errors: connect 0, read 0, write 0, timeout 0" and "Non-2xx or 3xx responses: N"
    # appear only when non-zero.
    errors=$(awk '
        /Socket errors:/ { gsub(",", ""); c = $4; r = $6; w = $8; t = $10
            s = s sprintf("%s%s", s ? ", " : "", "connect " c ", read " r ", write " w ", timeout " t)
            n += c + r + w + t }
        /Non-2xx or 3xx responses:/ { n += $NF; s = s sprintf("%snon-2xx/3xx %s", s ? ", " : "", $NF) }
        END { if (n) printf "%d (%s)", n, s; else printf "0" }' "$raw")
    if ((${#pids[@]})) && ((reqs > 0)); then
        cpu_us=$(awk -v d="$((cpu1 - cpu0))" -v hz="$CLK_TCK" -v n="$reqs" \
            'BEGIN { printf "%.1f", d / hz / n * 1e6 }')
    else
        cpu_us=""
    fi
    box_busy=$(busy_pct "$box0" "$box1")

    R_NAME+=("$name") R_RPS+=("$rps") R_P50+=("$p50") R_P99+=("$p99") R_CPU+=("$cpu_us")
    R_ERR+=("$errors") R_NOTE+=("machine CPU busy ${box_busy}% during the run")
    log "$name: $rps req/s, p50 ${p50} ms, p99 ${p99} ms, CPU ${cpu_us:-n/a} µs/req, errors $errors, machine busy ${box_busy}%"
}

# The Redis case means nothing if its decisions fell back to memory: check the metric. A
# few may, on a machine this loaded (a call over redis.timeout is decided in memory, as
# designed); more than 1% means Redis was not really in the loop.
# rampart's /metrics, from its admin listener (bash's /dev/tcp: no curl needed).
admin_metrics() {
    local fd
    exec {fd}<>"/dev/tcp/$HOST/$RAMPART_ADMIN_PORT" || die "admin listener unreachable"
    printf 'GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$HOST" >&"$fd"
    timeout 5 cat <&"$fd" || true
    exec {fd}>&-
}

check_redis_decisions() {
    local text mem red
    text=$(admin_metrics)
    mem=$(awk '/^rampart_ratelimit_decisions_total\{policy="bench-redis",result="allowed",source="memory"\}/ { print $2 }' <<<"$text")
    red=$(awk '/^rampart_ratelimit_decisions_total\{policy="bench-redis",result="allowed",source="redis"\}/ { print $2 }' <<<"$text")
    mem=${mem:-0} red=${red:-0}
    log "bench-redis: $red decisions taken by Redis, $mem in memory (calls over the 50ms timeout)"
    ((mem * 100 <= red)) || die "the Redis case decided $mem request(s) in memory, $red in Redis: was redis-server up?"
    REDIS_NOTE="decided by Redis: $red, by the memory fallback: $mem"
}

# The cache cases mean nothing unless their hits came from where they say: the memory
# cases from memory (one store each), the Redis-only case from Redis on every request.
check_cache_sources() {
    local text hits stored gets
    text=$(admin_metrics)
    hits=$(awk '/^rampart_cache_lookups_total\{cache="bench-redis-only",result="hit"\}/ { print $2 }' <<<"$text")
    stored=$(awk '/^rampart_cache_memory_entries\{cache="bench-redis-only"\}/ { print $2 }' <<<"$text")
    gets=$(redis-cli -h "$HOST" -p "$REDIS_PORT" info commandstats | awk -F'[=,:]' '/^cmdstat_get:/ { print $3 }')
    hits=${hits:-0} stored=${stored:-0} gets=${gets:-0}
    log "bench-redis-only: $hits hits, $stored entries in its memory tier, $gets GETs in Redis"
    ((stored == 0 && gets >= hits)) || die "the Redis-only cache case did not read Redis on every hit"
    CACHE_NOTE="Redis-only case: $hits hits, $gets Redis GETs, nothing in its memory tier"
}

# One short bounded run against URL: prints "REQ/S CPU_US_PER_REQ" (CPU of PIDS).
short_run() {
    local url=$1 out=$WORK/pair.txt cpu0 cpu1 reqs
    shift
    cpu0=$(cpu_ticks "$@")
    load "$PAIR_RUN" "$url" "$out"
    cpu1=$(cpu_ticks "$@")
    reqs=$(awk '/ requests in / { print $1 }' "$out")
    [[ -n $reqs ]] && ((reqs > 0)) || die "short run against $url: no requests counted ($out)"
    awk -v d="$((cpu1 - cpu0))" -v hz="$CLK_TCK" -v n="$reqs" \
        '/^Requests\/sec:/ { printf "%s %.3f\n", $2, d / hz / n * 1e6 }' "$out"
}

# rampart against nginx in alternating short runs (rampart first in odd pairs, nginx first
# in even ones), so that drift in what the machine gives (other guests, frequency) falls
# on both alike: on a shared 2-core VM it moves single long runs by 10-30%.
run_pairs() {
    local i r_url=$1 n_url=$2 r n
    local -a r_pids n_pids
    read -r -a r_pids <<<"$3"
    read -r -a n_pids <<<"$4"
    ((PAIRS > 0)) || return 0
    log "interleaved: $PAIRS pairs of $PAIR_RUN runs, rampart and nginx in turn"
    for ((i = 1; i <= PAIRS; i++)); do
        if ((i % 2)); then
            r=$(short_run "$r_url" "${r_pids[@]}")
            n=$(short_run "$n_url" "${n_pids[@]}")
        else
            n=$(short_run "$n_url" "${n_pids[@]}")
            r=$(short_run "$r_url" "${r_pids[@]}")
        fi
        P_RPS+=("$(awk -v a="${r% *}" -v b="${n% *}" 'BEGIN { printf "%.3f", a / b }')")
        P_CPU+=("$(awk -v a="${r#* }" -v b="${n#* }" 'BEGIN { printf "%.3f", a / b }')")
        log "pair $i: rampart ${r% *} req/s ${r#* } µs/req, nginx ${n% *} req/s ${n#* } µs/req"
    done
}

# "median (min-max)" of the numbers given.
spread() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.2f× (%.2f-%.2f×)", m, v[1], v[NR] }'
}

# ---------------------------------------------------------------------------------------
# Report

row_of() { # index of the row named $1, or empty
    local i
    for i in "${!R_NAME[@]}"; do
        if [[ ${R_NAME[$i]} == "$1" ]]; then
            echo "$i"
            return
        fi
    done
}

ratio() { # ratio A B -> "0.87×", or "—" when either is missing
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b + 0 == 0) print "—";
        else printf "%.2f×", a / b }'
}

report() {
    local d n i out=$OUT_DIR/results.md
    d=$(row_of direct)
    n=$(row_of nginx)
    {
        echo "# rampart benchmark"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "- machine: $(nproc) CPU(s), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r); CPU ${BUSY_START}% busy in the second before the run"
        echo "- rampart: $("$RAMPART_BIN" --version 2>/dev/null) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ', dirty'))"
        echo "- nginx: $("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //'); wrk: $(wrk -v 2>&1 | head -n1 | awk '{ print $2 }')"
        echo "- load: \`wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency\` GET $BENCH_PATH after a $WARMUP warm-up;" \
            "proxies with $WORKERS worker(s)$([[ $PIN == 1 ]] && echo ", pinned alone on CPU 1 (load, upstream, redis on CPU 0)"); upstream \`rampart demo --upstreams-only --workers 1\`;" \
            "wrk, upstream and proxy share the machine"
        echo "- CPU µs/req: utime+stime of the proxy's process(es) (nginx: master + workers) over the measured run / requests completed"
        echo
        echo "| target | req/s | p50 | p99 | CPU µs/req | req/s vs direct | req/s vs nginx | CPU vs nginx | errors |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---|"
        for i in "${!R_NAME[@]}"; do
            printf '| %s | %s | %s ms | %s ms | %s | %s | %s | %s | %s |\n' \
                "${R_NAME[$i]}" "${R_RPS[$i]}" "${R_P50[$i]}" "${R_P99[$i]}" "${R_CPU[$i]:-—}" \
                "$(ratio "${R_RPS[$i]}" "${d:+${R_RPS[$d]}}")" \
                "$(ratio "${R_RPS[$i]}" "${n:+${R_RPS[$n]}}")" \
                "$(ratio "${R_CPU[$i]}" "${n:+${R_CPU[$n]}}")" \
                "${R_ERR[$i]}"
        done
        echo
        local r m x
        r=$(row_of rampart)
        m=$(row_of rampart-ratelimit-memory)
        x=$(row_of rampart-ratelimit-redis)
        if [[ -n $r && -n $m && -n $x ]]; then
            echo "Rate limiting, CPU µs/req against rampart without limits (target for Redis: ≤ 1.50×):" \
                "memory store $(ratio "${R_CPU[$m]}" "${R_CPU[$r]}"), Redis store $(ratio "${R_CPU[$x]}" "${R_CPU[$r]}")" \
                "(${REDIS_NOTE:-decisions not checked})."
            echo
        fi
        local cm cr bo ro
        cm=$(row_of rampart-cache-memory)
        cr=$(row_of rampart-cache-redis)
        bo=$(row_of rampart-bytes-1000)
        ro=$(row_of rampart-cache-redis-only)
        if [[ -n $r && -n $cm && -n $cr && -n $bo && -n $ro ]]; then
            echo "Cache, req/s and CPU µs/req against the same GET uncached: memory tier" \
                "$(ratio "${R_RPS[$cm]}" "${R_RPS[$r]}") req/s, $(ratio "${R_CPU[$cm]}" "${R_CPU[$r]}") CPU;" \
                "Redis store (its memory tier answers) $(ratio "${R_RPS[$cr]}" "${R_RPS[$r]}"), $(ratio "${R_CPU[$cr]}" "${R_CPU[$r]}");" \
                "a Redis GET per request (1,000-byte answer) $(ratio "${R_RPS[$ro]}" "${R_RPS[$bo]}"), $(ratio "${R_CPU[$ro]}" "${R_CPU[$bo]}")" \
                "(${CACHE_NOTE:-sources not checked})."
            echo
        fi
        if ((${#P_RPS[@]})); then
            echo "Interleaved, ${#P_RPS[@]} pairs of \`wrk -d$PAIR_RUN\` runs, rampart vs nginx, median (min-max):" \
                "req/s $(spread "${P_RPS[@]}"), CPU µs/req $(spread "${P_CPU[@]}")."
            echo
        fi
        for i in "${!R_NAME[@]}"; do
            echo "- ${R_NAME[$i]}: ${R_NOTE[$i]}; raw wrk output in $OUT_DIR/wrk-${R_NAME[$i]}.txt"
        done
    } >"$out"
    echo
    cat "$out"
    log "written to $out"
}

# ---------------------------------------------------------------------------------------
# Helpers the other modes share (scripts/bench/sse.sh, scale.sh)


# Stops one process started here and forgets it (a case's proxy, between cases).
stop_started() {
    local pid=$1 i
    stop_pid "$pid"
    wait "$pid" 2>/dev/null || true
    for i in "${!STARTED_PIDS[@]}"; do
        if [[ ${STARTED_PIDS[$i]} == "$pid" ]]; then
            unset 'STARTED_PIDS[i]'
        fi
    done
}

# Each stream is a descriptor in the client and in the upstream, and two in a proxy.
raise_nofile() {
    local need=$((2 * STREAMS + 1024)) hard
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((hard < need)); then
        die "$STREAMS streams need $need open files per process; the hard limit is $hard (ulimit -Hn)"
    fi
    if (($(ulimit -n) < need)); then
        ulimit -n "$need"
    fi
}

kv_get() { # kv_get KEY "k=v k=v ...": the value of KEY, empty when absent
    awk -v k="$1" '{ for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) { print substr($i, length(k) + 2); exit } }' <<<"$2"
}

med_range_digits() { # med_range_digits DIGITS N...: "median (min-max)"; "—" for none
    local digits=$1
    shift
    (($#)) || {
        echo "—"
        return
    }
    printf '%s\n' "$@" | sort -g | awk -v d="$digits" '{ v[NR] = $1 } END {
        f = "%." d "f"
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        if (NR == 1) printf f, m; else printf f " (" f "-" f ")", m, v[1], v[NR] }'
}

med_range() { med_range_digits 2 "$@"; } # 2 decimals

# ---------------------------------------------------------------------------------------

main() {
    [[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "WORKERS must be a positive integer, got '$WORKERS'"
    case $MODE in
    rps) ;;
    sse)
        # shellcheck source=bench/sse.sh
        source "$BENCH_DIR/sse.sh"
        main_sse
        return
        ;;
    tls)
        # shellcheck source=bench/tls.sh
        source "$BENCH_DIR/tls.sh"
        main_tls
        return
        ;;
    scale)
        # shellcheck source=bench/scale.sh
        source "$BENCH_DIR/scale.sh"
        main_scale
        return
        ;;
    *) die "MODE must be rps, sse, tls or scale, got '$MODE'" ;;
    esac
    install_tools
    build_rampart
    # Other work on the machine skews everything here (its cores are already shared by wrk,
    # the upstream and the proxy): sample how busy it is before starting anything.
    local b0 b1
    b0=$(box_ticks)
    sleep 1
    b1=$(box_ticks)
    BUSY_START=$(busy_pct "$b0" "$b1")
    if [[ $BUSY_START == "?" ]] || ((BUSY_START > 20)); then
        log "warning: machine ${BUSY_START}% busy before starting: other work is running, expect noisy numbers"
    fi
    check_ports_free "$LLM_PORT" "$UPSTREAM_PORT" "$RAMPART_PORT" "$RAMPART_ADMIN_PORT" "$NGINX_PORT" \
        "$RAMPART_RL_MEMORY_PORT" "$RAMPART_RL_REDIS_PORT" "$RAMPART_FEATURES_PORT" "$REDIS_PORT" \
        "$RAMPART_CACHE_MEMORY_PORT" "$RAMPART_CACHE_REDIS_PORT" "$RAMPART_CACHE_REDIS_ONLY_PORT"

    mkdir -p "$OUT_DIR/logs"
    rm -f "$OUT_DIR"/wrk-*.txt
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/rampart-bench.XXXXXX")
    render_rampart_config

    start_upstream
    start_redis
    start_rampart
    start_nginx

    local up="http://$HOST:$UPSTREAM_PORT$BENCH_PATH"
    run_case direct "$up" -
    run_case rampart "http://$HOST:$RAMPART_PORT$BENCH_PATH" "$RAMPART_PID"
    run_case nginx "http://$HOST:$NGINX_PORT$BENCH_PATH" "$(nginx_pids | tr '\n' ' ')"
    # The breaker's fast-fail path: one refused request opens it, then every answer is a
    # 503 CIRCUIT_OPEN made without touching the network.
    http_status "http://$HOST:$RAMPART_PORT/dead$BENCH_PATH" >/dev/null || true
    run_case rampart-circuit-open "http://$HOST:$RAMPART_PORT/dead$BENCH_PATH" "$RAMPART_PID" 503
    # A policy on every request, never exceeded: the cost of deciding, per store.
    run_case rampart-ratelimit-memory "http://$HOST:$RAMPART_RL_MEMORY_PORT$BENCH_PATH" "$RAMPART_PID"
    run_case rampart-ratelimit-redis "http://$HOST:$RAMPART_RL_REDIS_PORT$BENCH_PATH" "$RAMPART_PID"
    check_redis_decisions
    # Everything on at once: rate limit (memory), breaker with failure rate, retries, metrics.
    run_case rampart-all-features "http://$HOST:$RAMPART_FEATURES_PORT$BENCH_PATH" "$RAMPART_PID"
    # Cached GETs: hits from the memory tier, from the Redis store's memory tier, and from
    # Redis itself: a 1,000-byte answer (`/bytes/1000`) on a route whose memory tier (1 KiB)
    # is too small for it, so every hit is a GET to Redis; `rampart-bytes-1000` is the same
    # answer uncached.
    run_case rampart-cache-memory "http://$HOST:$RAMPART_CACHE_MEMORY_PORT$BENCH_PATH" "$RAMPART_PID"
    run_case rampart-cache-redis "http://$HOST:$RAMPART_CACHE_REDIS_PORT$BENCH_PATH" "$RAMPART_PID"
    run_case rampart-bytes-1000 "http://$HOST:$RAMPART_PORT/bytes/1000" "$RAMPART_PID"
    run_case rampart-cache-redis-only "http://$HOST:$RAMPART_CACHE_REDIS_ONLY_PORT/bytes/1000" "$RAMPART_PID"
    check_cache_sources
    # More scenarios go here, one line each.
    run_pairs "http://$HOST:$RAMPART_PORT$BENCH_PATH" "http://$HOST:$NGINX_PORT$BENCH_PATH" \
        "$RAMPART_PID" "$(nginx_pids | tr '\n' ' ')"

    report
}

trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
main "$@"

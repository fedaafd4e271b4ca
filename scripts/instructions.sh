#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: deterministic, so it
# shows what a change saves even on a busy machine (wall-clock figures come from
# scripts/bench.sh on a quiet one). Same route and load shape as the benchmark: small
# keep-alive GETs through rampart to the stand-in upstream.
#
#   scripts/instructions.sh                 # target/release/rampart, 2 workers
#   RAMPART_BIN=/path/rampart WORKERS=1 PORT=18080 scripts/instructions.sh
#   CASE=rl-memory scripts/instructions.sh  # the route with a memory rate limit (or rl-redis,
#                                           # against the redis-server on 127.0.0.1:6379, or
#                                           # features: every feature on, or cache: hits
#                                           # from a memory cache)
#   CONNS=1000 DURATION=20s scripts/instructions.sh  # wrk's connections and counted run
#                                           # (16, 4s); the run opens its connections, so
#                                           # a longer one weighs their setup less
#   CASE=sse scripts/instructions.sh        # instructions per SSE EVENT: long-lived streams
#                                           # (bench.sh MODE=sse's shape and config)
#
# CASE=sse: STREAMS (100) streams from examples/sse_load's upstream (on 127.0.0.1:13002),
# an EVENT_BYTES (100) event every EVENT_MS (100) ms on each, held open by sse_load's load
# client through rampart; once all are open and SETTLE (3) s have passed, WINDOW (6) s are
# counted, and divided by the events rampart received in them: the calls, in the profile,
# of RouteMetrics::stream_events_arrived (once per chunk that completes events; the upstream
# writes one event per chunk), checked against rampart's /metrics (its event counts read
# just outside the window, so a little more). Fewer streams than the bench's 1,000: rampart
# runs ~50x slower under callgrind, and must keep up (the script warns when it did not).
# Needs target/release/examples/sse_load (cargo build --release --example sse_load).
#
# TARGET=nginx counts nginx instead (one process, `master_process off`), in the bench's
# configuration for the case (scripts/bench/nginx.conf.tmpl, or nginx-sse.conf.tmpl for
# CASE=sse; CASE=features has no nginx equivalent, so it is nginx's plain proxy, the
# benchmark's comparison). The same load and counting: the user-space side of "CPU per
# request <= nginx's" without the machine's noise. System calls per request are the other
# side: `strace -c -f -p PID` over the same load (rampart and nginx make the same reads and
# writes; see docs/benchmarks.md). nginx's SSE events: its calls to recv() (one per event).
#
# Needs valgrind and wrk (apt-get install -y valgrind wrk). Uses 127.0.0.1 only: the
# stand-in upstream on its fixed port 3001, rampart on PORT, its admin on PORT+1821.
# Prints the count and the callgrind profile's path; `callgrind_annotate --inclusive=yes
# FILE | head -80` shows where the instructions go.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${RAMPART_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/rampart}
WORKERS=${WORKERS:-2}
PORT=${PORT:-18080}
CASE=${CASE:-plain}
CONNS=${CONNS:-16}
TARGET=${TARGET:-rampart}
case $TARGET in
rampart | nginx) ;;
*) echo "TARGET must be rampart or nginx, got '$TARGET'" >&2; exit 1 ;;
esac
case $CASE in
plain) LOAD_PORT=$PORT ;;
rl-memory) LOAD_PORT=$((PORT + 2)) ;;
rl-redis) LOAD_PORT=$((PORT + 3)) ;;
features) LOAD_PORT=$((PORT + 4)) ;;
cache) LOAD_PORT=$((PORT + 5)) ;;
sse) LOAD_PORT=$PORT ;;
*) echo "CASE must be plain, rl-memory, rl-redis, features, cache or sse, got '$CASE'" >&2; exit 1 ;;
esac
OUT=$(mktemp -d /tmp/rampart-instr.XXXXXX)
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT INT TERM

command -v valgrind >/dev/null || { echo "valgrind missing (apt-get install -y valgrind)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk missing (apt-get install -y wrk)" >&2; exit 1; }
[[ -x $BIN ]] || { echo "no binary at $BIN (cargo build --release)" >&2; exit 1; }
if [[ $TARGET == nginx ]]; then
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    [[ -x $NGINX ]] || { echo "nginx missing (apt-get install -y nginx)" >&2; exit 1; }
fi

# The target under callgrind, counting nothing until told (`callgrind_control -i on`).
# rampart: CONFIG its config; nginx: TEMPLATE rendered with LISTEN and UPSTREAM, one process.
start_counted() { # CONFIG TEMPLATE LISTEN UPSTREAM
    local run
    if [[ $TARGET == nginx ]]; then
        mkdir -p "$OUT/nginx"
        sed -e "s#@WORKERS@#1#; s#@PREFIX@#$OUT/nginx#g; s#@LISTEN@#$3#; s#@UPSTREAM@#$4#g" \
            -e "s#@CONNECTIONS@#4096#g; s#^master_process on;#master_process off;#" \
            "$2" >"$OUT/nginx/nginx.conf"
        run=("$NGINX" -p "$OUT/nginx" -e "$OUT/nginx/error.log" -c "$OUT/nginx/nginx.conf")
    else
        run=("$BIN" run --config "$1" --workers "$WORKERS")
    fi
    # shellcheck disable=SC2086 # VG_ARGS: extra valgrind options, word-split on purpose
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out.%p" \
        ${VG_ARGS:-} "${run[@]}" >"$OUT/target.log" 2>&1 &
    VG=$!
    PIDS+=("$VG")
}

# Calls made to function NAME in callgrind profile FILE (its id in the compressed profile,
# then the calls recorded against it).
calls_to() { # FILE NAME
    local id
    id=$(grep -o "^c\?fn=([0-9]*) $2\$" "$1" | head -1 | sed 's/.*(\([0-9]*\)).*/\1/')
    [[ -n $id ]] || { echo "$2 not in $1" >&2; return 1; }
    awk -v c="cfn=($id)" '$1 == c { getline; sub(/^calls=/, "", $1); s += $1 } END { printf "%d", s }' "$1"
}

# With VG_ARGS="--cache-sim=yes [--LL=SIZE,WAYS,LINE]": data reads and writes per request
# (or event) that missed the simulated first level and last level. `--LL=1048576,16,64`
# models a core's L2: what a working set larger than that costs shows as DLmr/DLmw.
misses() { # FILE COUNT UNIT
    grep -q "^events:.*D1mr" "$1" || return 0
    awk -v n="$2" -v unit="$3" '/^events:/ { for (i = 2; i <= NF; i++) name[i] = $i }
        /^totals:/ { for (i = 2; i <= NF; i++) if (name[i] ~ /^(D1mr|D1mw|DLmr|DLmw)$/)
            printf "%s per %s %.1f\n", name[i], unit, $i / (n > 0 ? n : 1) }' "$1"
}

if [[ $CASE == sse ]]; then
    SSE_BIN=${SSE_BIN:-$(dirname "$BIN")/examples/sse_load}
    STREAMS=${STREAMS:-100}
    EVENT_MS=${EVENT_MS:-100}
    EVENT_BYTES=${EVENT_BYTES:-100}
    SETTLE=${SETTLE:-3}
    WINDOW=${WINDOW:-6}
    SSE_PORT=13002
    [[ -x $SSE_BIN ]] || { echo "no sse_load at $SSE_BIN (cargo build --release --example sse_load)" >&2; exit 1; }
    if (($(ulimit -n) < 2 * STREAMS + 1024)); then
        ulimit -n $((2 * STREAMS + 1024))
    fi
    sed -e "s/@ADMIN@/127.0.0.1:$((PORT + 1821))/; s/@LISTEN@/127.0.0.1:$PORT/" \
        -e "s/@UPSTREAM@/127.0.0.1:$SSE_PORT/" \
        "$ROOT/scripts/bench/rampart-sse.yaml.tmpl" >"$OUT/rampart.yaml"
    # Events rampart forwarded: the streams' first events plus the gaps after them (nginx
    # has no such count: the calls to recv() in the window are its events).
    events_forwarded() {
        [[ $TARGET == rampart ]] || { printf 0; return; }
        curl -s "http://127.0.0.1:$((PORT + 1821))/metrics" | awk '
            /^rampart_http_stream_(first_event|event_gap)_seconds_count/ { n += $2 }
            END { printf "%d", n }'
    }
    "$SSE_BIN" upstream "127.0.0.1:$SSE_PORT" "$EVENT_MS" "$EVENT_BYTES" >"$OUT/upstream.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 50); do
        curl -s -o /dev/null -m 1 "http://127.0.0.1:$SSE_PORT/?count=1" && break
        sleep 0.1
    done
    start_counted "$OUT/rampart.yaml" "$ROOT/scripts/bench/nginx-sse.conf.tmpl" \
        "127.0.0.1:$PORT" "127.0.0.1:$SSE_PORT"
    for _ in $(seq 1 150); do
        curl -s -o /dev/null -m 5 "http://127.0.0.1:$PORT/v1/stream?count=1" && break
        sleep 0.2
    done
    # The load client holds the streams far longer than needed; it is stopped at the end.
    "$SSE_BIN" load "http://127.0.0.1:$PORT/v1/stream" "$STREAMS" 600 1 "$(getconf CLK_TCK)" \
        >"$OUT/load.out" 2>"$OUT/load.log" &
    PIDS+=($!)
    for _ in $(seq 1 600); do
        grep -q "streams open" "$OUT/load.log" && break
        sleep 0.2
    done
    grep -q "streams open" "$OUT/load.log" || { echo "the streams did not open" >&2; cat "$OUT/load.log" >&2; exit 1; }
    sleep "$SETTLE"
    e0=$(events_forwarded)
    callgrind_control -i on "$VG" >/dev/null 2>&1
    sleep "$WINDOW"
    callgrind_control -i off "$VG" >/dev/null 2>&1
    e1=$(events_forwarded)
    callgrind_control -d "$VG" >/dev/null 2>&1
    sleep 0.5
    file=$(grep -l "^totals: [1-9]" "$OUT"/callgrind.out.* | head -1)
    ir=$(awk '/^totals:/ { print $2 }' "$file")
    if [[ $TARGET == nginx ]]; then
        n=$(calls_to "$file" recv) || exit 1
        e0=0 e1=$n
    else
        n=$(calls_to "$file" rampart::observe::http::RouteMetrics::stream_events_arrived) || exit 1
    fi
    expected=$((STREAMS * WINDOW * 1000 / EVENT_MS))
    if ((n * 100 < expected * 95)) || (((e1 - e0) * 100 > n * 110)); then
        echo "warning: $n event chunks in the window, $((e1 - e0)) events around it, $expected sent:" \
            "rampart under callgrind fell behind (events then share chunks); use fewer STREAMS" >&2
    fi
    if grep -qE "a stream (failed|had no)" "$OUT/load.log"; then
        echo "warning: the load client reported failures:" >&2
        grep -E "a stream (failed|had no)" "$OUT/load.log" >&2
    fi
    if [[ $TARGET == nginx ]]; then
        around="nginx's reads of the upstream"
    else
        around="/metrics around the window: $((e1 - e0))"
    fi
    echo "$TARGET: events $n ($around; $expected sent), instructions $ir, per event $((ir / (n > 0 ? n : 1)))"
    misses "$file" "$n" event
    echo "profile: $file"
    exit 0
fi

sed -e "s/@ADMIN@/127.0.0.1:$((PORT + 1821))/; s/@LISTEN@/127.0.0.1:$PORT/" \
    -e "s/@LISTEN_RL_MEMORY@/127.0.0.1:$((PORT + 2))/; s/@LISTEN_RL_REDIS@/127.0.0.1:$((PORT + 3))/" \
    -e "s/@LISTEN_FEATURES@/127.0.0.1:$((PORT + 4))/" \
    -e "s/@LISTEN_CACHE_MEMORY@/127.0.0.1:$((PORT + 5))/; s/@LISTEN_CACHE_REDIS@/127.0.0.1:$((PORT + 6))/" \
    -e "s/@LISTEN_CACHE_REDIS_ONLY@/127.0.0.1:$((PORT + 7))/" \
    -e "s/@UPSTREAM@/127.0.0.1:3001/; s/@REDIS@/127.0.0.1:6379/" \
    "$ROOT/scripts/bench/rampart.yaml.tmpl" >"$OUT/rampart.yaml"

if ! curl -s -o /dev/null http://127.0.0.1:3001/; then
    "$BIN" demo --config "$OUT/rampart.yaml" --upstreams-only --workers 1 >"$OUT/upstream.log" 2>&1 &
    PIDS+=($!)
fi
if [[ $TARGET == nginx ]]; then
    # nginx's proxy listens on PORT for every case (no limiter: the benchmark's comparison).
    LOAD_PORT=$PORT
fi
start_counted "$OUT/rampart.yaml" "$ROOT/scripts/bench/nginx.conf.tmpl" \
    "127.0.0.1:$PORT" "127.0.0.1:3001"
for _ in $(seq 1 150); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT/api/agents" && break
    sleep 0.2
done
# Warm up (pools filled, code paths touched), then count a fixed-length run only.
wrk -t1 -c"$CONNS" --timeout 30s -d2s "http://127.0.0.1:$LOAD_PORT/api/agents" >/dev/null
callgrind_control -i on "$VG" >/dev/null
out=$(wrk -t1 -c"$CONNS" --timeout 30s -d"${DURATION:-4s}" "http://127.0.0.1:$LOAD_PORT/api/agents")
callgrind_control -i off "$VG" >/dev/null
callgrind_control -d "$VG" >/dev/null
sleep 0.5
n=$(awk '/requests in/ { print $1 }' <<<"$out")
if grep -qE "Non-2xx|Socket errors" <<<"$out"; then
    echo "warning: errors during the counted run:" >&2
    grep -E "Non-2xx|Socket errors" <<<"$out" >&2
fi
file=$(grep -l "^totals: [1-9]" "$OUT"/callgrind.out.* | head -1)
ir=$(awk '/^totals:/ { print $2 }' "$file")
echo "$TARGET: requests $n, instructions $ir, per request $((ir / n))"
misses "$file" "$n" request
echo "profile: $file"

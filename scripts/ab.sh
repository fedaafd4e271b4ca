#!/usr/bin/env bash
# A/B of rampart builds: CPU per request and req/s of two or more binaries, each a fresh
# process started at the same time, measured in interleaved rounds. On a shared VM the
# same setup drifts by ±10% within minutes, and a rampart that has served for an hour
# measures a few per cent better than a fresh one (docs/benchmarks.md); only this shape
# resolves a change of a few per cent. scripts/bench.sh gives the figures against nginx.
#
#   cp target/release/rampart /tmp/rampart.before     # before the change
#   ... change, cargo build --release ...
#   scripts/ab.sh before=/tmp/rampart.before after=target/release/rampart
#   CONNS=64 CASE=features ROUNDS=4 scripts/ab.sh before=... after=...
#
# Knobs: ROUNDS (5), CONNS (1000), DURATION (8, seconds per measurement), CASE (plain, or
# features: a memory rate limit, the breaker, retries, ejection and an in-flight cap, as
# bench.sh's). Pinned as bench.sh PIN=1: each proxy with one worker on CPU 1, wrk and the
# stand-in upstream (`rampart demo --upstreams-only`, fixed port 3001) on CPU 0. Loopback
# only; proxies on 127.0.0.1:18300 and up. Needs wrk and bc.

set -euo pipefail

ROUNDS=${ROUNDS:-5}
CONNS=${CONNS:-1000}
DURATION=${DURATION:-8}
CASE=${CASE:-plain}
BASE_PORT=18300
OUT=$(mktemp -d /tmp/rampart-ab.XXXXXX)
PIDS=()

die() {
    echo "ab: $*" >&2
    exit 1
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

(($# >= 2)) || die "usage: scripts/ab.sh NAME=BINARY NAME=BINARY [...]"
command -v wrk >/dev/null || die "wrk missing (apt-get install -y wrk)"
command -v bc >/dev/null || die "bc missing (apt-get install -y bc)"
case $CASE in plain | features) ;; *) die "CASE must be plain or features, got '$CASE'" ;; esac
if (($(nproc) >= 2)); then
    PROXY_ON=(taskset -c 1)
    LOAD_ON=(taskset -c 0)
else
    PROXY_ON=()
    LOAD_ON=()
fi
if (($(ulimit -n) < 2 * CONNS + 256)); then
    ulimit -n $((2 * CONNS + 256)) || die "$CONNS connections need more open files (ulimit -n)"
fi

# config PORT ADMIN_PORT: one listener on PORT to the stand-in upstream.
config() {
    local route upstream
    if [[ $CASE == features ]]; then
        route="upstream: backend, rate_limits: [ab-memory]"
        upstream='{ endpoints: ["http://127.0.0.1:3001"], circuit_breaker: { failures: 5, failure_rate: { threshold: 50%, window: 30s, min_calls: 20 } }, ejection: { consecutive_failures: 3 }, retry: { attempts: 2, on: [connect_error, timeout, reset, 502, 503, 504], budget: { ratio: 0.2, min_per_s: 3 } }, max_in_flight: 100000 }'
    else
        route="upstream: backend"
        upstream='{ endpoints: ["http://127.0.0.1:3001"] }'
    fi
    cat <<EOF
admin: { listen: "127.0.0.1:$2" }
logging: { level: warn, access_log: false }
drain: { accept_grace: 0s }
listeners:
  - name: ab
    listen: "127.0.0.1:$1"
    routes:
      - { match: { path_prefix: / }, $route }
upstreams:
  backend: $upstream
rate_limits:
  ab-memory: { points: 1000000000, per: 60s, store: memory }
EOF
}

# wait_port PORT: until something listens there (10 s at most).
wait_port() {
    local i
    for i in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$1 after 10 s (logs in $OUT)"
}

# cpu_ticks PID: utime + stime of the process, all threads, in clock ticks.
cpu_ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat"
}

NAMES=() BINS=() PORTS=() PROXY_PIDS=()
for spec in "$@"; do
    [[ $spec == *=* ]] || die "'$spec' is not NAME=BINARY"
    NAMES+=("${spec%%=*}")
    BINS+=("${spec#*=}")
    [[ -x ${spec#*=} ]] || die "${spec#*=} is not an executable"
done

# The stand-in upstream ignores the listener; it only needs a valid file.
config $((BASE_PORT + 99)) $((BASE_PORT + 199)) >"$OUT/upstream.yaml"
"${LOAD_ON[@]}" "${BINS[0]}" demo --config "$OUT/upstream.yaml" --upstreams-only --workers 1 \
    >"$OUT/upstream.log" 2>&1 &
PIDS+=($!)
wait_port 3001

for i in "${!NAMES[@]}"; do
    port=$((BASE_PORT + i))
    config "$port" $((BASE_PORT + 100 + i)) >"$OUT/${NAMES[$i]}.yaml"
    "${BINS[$i]}" check --config "$OUT/${NAMES[$i]}.yaml" >/dev/null ||
        die "${BINS[$i]} refused $OUT/${NAMES[$i]}.yaml"
    "${PROXY_ON[@]}" "${BINS[$i]}" run --config "$OUT/${NAMES[$i]}.yaml" --workers 1 \
        >"$OUT/${NAMES[$i]}.log" 2>&1 &
    PIDS+=($!)
    PROXY_PIDS+=($!)
    PORTS+=("$port")
done
for port in "${PORTS[@]}"; do
    wait_port "$port"
done

echo "case $CASE, $CONNS connections, ${DURATION}s per measurement, $ROUNDS rounds; CPU µs/req = utime+stime / requests"
declare -A SUM_CPU SUM_RPS
for r in $(seq 1 "$ROUNDS"); do
    for i in "${!NAMES[@]}"; do
        url="http://127.0.0.1:${PORTS[$i]}/"
        "${LOAD_ON[@]}" wrk -t1 -c"$CONNS" -d2s "$url" >/dev/null
        t0=$(cpu_ticks "${PROXY_PIDS[$i]}")
        "${LOAD_ON[@]}" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$url" >"$OUT/wrk.txt"
        t1=$(cpu_ticks "${PROXY_PIDS[$i]}")
        requests=$(awk '/requests in/ {print $1}' "$OUT/wrk.txt")
        rps=$(awk '/Requests\/sec/ {print $2}' "$OUT/wrk.txt")
        p99=$(awk '$1 == "99%" {print $2}' "$OUT/wrk.txt")
        ((requests > 0)) || die "no request answered by ${NAMES[$i]} (logs in $OUT)"
        cpu=$(echo "scale=2; ($t1 - $t0) * 1000000 / $(getconf CLK_TCK) / $requests" | bc)
        printf 'round %d  %-12s %10s req/s  %6s µs/req  p99 %s\n' "$r" "${NAMES[$i]}" "$rps" "$cpu" "$p99"
        SUM_CPU[${NAMES[$i]}]=$(echo "${SUM_CPU[${NAMES[$i]}]:-0} + $cpu" | bc)
        SUM_RPS[${NAMES[$i]}]=$(echo "${SUM_RPS[${NAMES[$i]}]:-0} + $rps" | bc)
    done
done
for name in "${NAMES[@]}"; do
    printf 'mean   %-12s %10.0f req/s  %6.2f µs/req\n' "$name" \
        "$(echo "${SUM_RPS[$name]} / $ROUNDS" | bc -l)" "$(echo "${SUM_CPU[$name]} / $ROUNDS" | bc -l)"
done

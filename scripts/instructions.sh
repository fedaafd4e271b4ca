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
case $CASE in
plain) LOAD_PORT=$PORT ;;
rl-memory) LOAD_PORT=$((PORT + 2)) ;;
rl-redis) LOAD_PORT=$((PORT + 3)) ;;
features) LOAD_PORT=$((PORT + 4)) ;;
cache) LOAD_PORT=$((PORT + 5)) ;;
*) echo "CASE must be plain, rl-memory, rl-redis, features or cache, got '$CASE'" >&2; exit 1 ;;
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
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out.%p" \
    "$BIN" run --config "$OUT/rampart.yaml" --workers "$WORKERS" >"$OUT/rampart.log" 2>&1 &
VG=$!
PIDS+=("$VG")
for _ in $(seq 1 150); do
    curl -s -o /dev/null "http://127.0.0.1:$PORT/api/agents" && break
    sleep 0.2
done
# Warm up (pools filled, code paths touched), then count a fixed-length run only.
wrk -t1 -c16 -d2s "http://127.0.0.1:$LOAD_PORT/api/agents" >/dev/null
callgrind_control -i on "$VG" >/dev/null
out=$(wrk -t1 -c16 -d4s "http://127.0.0.1:$LOAD_PORT/api/agents")
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
echo "requests $n, instructions $ir, per request $((ir / n))"
echo "profile: $file"

# shellcheck shell=bash
# MODE=sse of scripts/bench.sh (sourced by it): long-lived SSE streams through each target,
# memory per stream and CPU per event. The knobs are in bench.sh's header.

SSE_UPSTREAM_PID=""
ROUND=0
LOST=0                 # streams that failed to open, ended early or failed, over all cases
SLOW=()                # cases that received under 95% of the events sent: something saturated
# Results, one entry per SSE case, in order: round, target, load average before, and the
# load client's key=value line.
S_ROUND=() S_NAME=() S_LOAD=() S_KV=()

start_sse_upstream() {
    local logfile=$OUT_DIR/logs/sse-upstream.log
    log "starting SSE upstream: sse_load upstream, a ${EVENT_BYTES}-byte event every ${EVENT_MS} ms per stream"
    "${LOAD_ON[@]}" "$SSE_BIN" upstream "$HOST:$SSE_UPSTREAM_PORT" "$EVENT_MS" "$EVENT_BYTES" \
        >"$logfile" 2>&1 &
    SSE_UPSTREAM_PID=$!
    STARTED_PIDS+=("$SSE_UPSTREAM_PID")
    wait_listening sse-upstream "$SSE_UPSTREAM_PID" "$SSE_UPSTREAM_PORT" "$logfile"
}

# Load clients running in the background, by case name (`sse_start`, `sse_finish`).
declare -A SSE_CLIENT=() SSE_LA=()

# sse_case NAME URL PIDS: STREAMS streams against URL; PIDS ("-": none) are the proxy's
# processes, whose RSS and CPU the load client reads.
sse_case() {
    sse_start "$@"
    sse_finish "$1"
}

# sse_start NAME URL PIDS: sse_case's load client, started in the background.
sse_start() {
    local name=$1 url=$2 pids=() la
    local raw=$OUT_DIR/sse-$name-r$ROUND.txt errlog=$OUT_DIR/logs/sse-$name-r$ROUND.log
    [[ $url =~ ^http://127\.[0-9.]+:[0-9]+/ ]] || die "sse_case $name: $url is not a loopback URL"
    [[ $3 == - ]] || read -r -a pids <<<"$3"
    la=$(cut -d' ' -f1-3 /proc/loadavg)
    log "round $ROUND, $name: $STREAMS streams, settle ${SETTLE}s, hold ${HOLD}s (load average $la)"
    # The client's own waits are bounded (open 60 s, close 10 s); this bounds the whole.
    timeout $((SETTLE + HOLD + 120)) "${LOAD_ON[@]}" "$SSE_BIN" load "$url" "$STREAMS" "$SETTLE" \
        "$HOLD" "$CLK_TCK" "${pids[@]}" -- "$SSE_UPSTREAM_PID" >"$raw" 2>"$errlog" &
    SSE_CLIENT[$name]=$!
    SSE_LA[$name]=$la
    STARTED_PIDS+=("${SSE_CLIENT[$name]}")
}

# sse_finish NAME: waits for NAME's load client and records its figures.
sse_finish() {
    local name=$1 rc=0 kv lost pid=${SSE_CLIENT[$1]}
    local raw=$OUT_DIR/sse-$name-r$ROUND.txt errlog=$OUT_DIR/logs/sse-$name-r$ROUND.log
    wait "$pid" || rc=$?
    stop_started "$pid"
    if ((rc != 0)); then
        tail -n 20 "$errlog" >&2 || true
        die "sse_load exited with $rc against $name"
    fi
    kv=$(tail -n 1 "$raw")
    lost=$(($(kv_get failed_open "$kv") + $(kv_get ended_early "$kv") + $(kv_get errors "$kv")))
    LOST=$((LOST + lost))
    if (($(kv_get events_per_s "$kv") * 100 < STREAMS * 1000 / EVENT_MS * 95)); then
        SLOW+=("$name (round $ROUND)")
        log "warning: $name received under 95% of the events sent: the proxy, the client or the upstream saturated"
    fi
    S_ROUND+=("$ROUND") S_NAME+=("$name") S_LOAD+=("${SSE_LA[$name]}") S_KV+=("$kv")
    log "$name: $kv"
}

sse_rampart() {
    start_rampart "$WORK/rampart-sse.yaml"
    sse_case rampart "http://$HOST:$RAMPART_PORT$SSE_PATH" "$RAMPART_PID"
    stop_started "$RAMPART_PID"
}

# A fresh nginx for the SSE cases, its workers forked (SSE_NGINX_KIDS).
SSE_NGINX_KIDS=()
sse_nginx_up() {
    local i
    start_nginx "$BENCH_DIR/nginx-sse.conf.tmpl" "$HOST:$SSE_UPSTREAM_PORT" \
        CONNECTIONS=$((2 * STREAMS + 1024))
    # The master listens before it forks the workers: wait for them, or they go uncounted.
    for ((i = 0; i < 50; i++)); do
        mapfile -t SSE_NGINX_KIDS < <(children_of "$NGINX_PID")
        ((${#SSE_NGINX_KIDS[@]} < WORKERS)) || break
        sleep 0.1
    done
    ((${#SSE_NGINX_KIDS[@]} >= WORKERS)) || die "nginx has ${#SSE_NGINX_KIDS[@]} worker(s) after 5 s, not $WORKERS"
}

sse_nginx_down() {
    local i
    stop_started "$NGINX_PID"
    for i in "${SSE_NGINX_KIDS[@]}"; do
        stop_pid "$i"
    done
}

sse_nginx() {
    sse_nginx_up
    sse_case nginx "http://$HOST:$NGINX_PORT$SSE_PATH" "$(nginx_pids | tr '\n' ' ')"
    sse_nginx_down
}

# One round: direct, then a fresh rampart and a fresh nginx, in turn (rampart first in odd
# rounds) so that drift in what the machine gives falls on both alike; with TOGETHER=1, both
# at once, each with its own load client (on the same CPU with PIN=1): the VM's drift then
# falls on both within the same seconds (rounds spread ±5 % that way, ±15 % in turn, on the
# machine of 2026-12-07).
sse_round() {
    sse_case direct "http://$HOST:$SSE_UPSTREAM_PORT$SSE_PATH" -
    if ((TOGETHER)); then
        start_rampart "$WORK/rampart-sse.yaml"
        sse_nginx_up
        sse_start rampart "http://$HOST:$RAMPART_PORT$SSE_PATH" "$RAMPART_PID"
        sse_start nginx "http://$HOST:$NGINX_PORT$SSE_PATH" "$(nginx_pids | tr '\n' ' ')"
        sse_finish rampart
        sse_finish nginx
        stop_started "$RAMPART_PID"
        sse_nginx_down
    elif ((ROUND % 2)); then
        sse_rampart
        sse_nginx
    else
        sse_nginx
        sse_rampart
    fi
}

sse_report() {
    local out=$OUT_DIR/results-sse$([[ $PIN == 1 ]] && echo -pin).md i kv name r expected
    local -a mem cpu rm rc
    expected=$((STREAMS * 1000 / EVENT_MS))
    {
        echo "# rampart SSE benchmark"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "- machine: $(nproc) CPU(s), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
        echo "- rampart: $("$RAMPART_BIN" --version 2>/dev/null) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ', dirty'))"
        echo "- nginx: $("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //'), \`proxy_buffering off\`"
        echo "- load: $STREAMS concurrent SSE streams per target, a ${EVENT_BYTES}-byte event every ${EVENT_MS} ms on each (expected $expected events/s), ${SETTLE} s to settle then ${HOLD} s measured; a fresh proxy per case$( ((TOGETHER)) && echo ", rampart and nginx at once, a load client each");" \
            "proxies with $WORKERS worker(s)$([[ $PIN == 1 ]] && echo ", pinned $( ((TOGETHER)) && echo together || echo alone) on CPU 1 (load clients and upstream on CPU 0)")"
        echo "- memory/stream: (mean RSS over the measured interval − RSS idle after one warm-up stream) / streams (nginx: master + workers)"
        echo "- CPU µs/event: utime+stime of the proxy's process(es) over the measured interval / events the client received in it"
        echo
        echo "| round | target | load avg before | streams open | events/s | lost | RSS idle MiB | RSS streams MiB | memory/stream KiB | CPU µs/event | proxy CPU % | upstream CPU % | client CPU % |"
        echo "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for i in "${!S_KV[@]}"; do
            kv=${S_KV[$i]}
            local proxy=1
            [[ ${S_NAME[$i]} != direct ]] || proxy=0
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "${S_ROUND[$i]}" "${S_NAME[$i]}" "${S_LOAD[$i]}" "$(kv_get opened "$kv")" \
                "$(kv_get events_per_s "$kv")" \
                "$(($(kv_get failed_open "$kv") + $(kv_get ended_early "$kv") + $(kv_get errors "$kv")))" \
                "$( ((proxy)) && awk -v k="$(kv_get rss_idle_kib "$kv")" 'BEGIN { printf "%.1f", k / 1024 }' || echo —)" \
                "$( ((proxy)) && awk -v k="$(kv_get rss_streams_kib "$kv")" 'BEGIN { printf "%.1f", k / 1024 }' || echo —)" \
                "$( ((proxy)) && kv_get mem_per_stream_kib "$kv" || echo —)" \
                "$( ((proxy)) && kv_get cpu_us_per_event "$kv" || echo —)" \
                "$( ((proxy)) && kv_get proxy_cpu_pct "$kv" || echo —)" \
                "$(kv_get upstream_cpu_pct "$kv")" "$(kv_get client_cpu_pct "$kv")"
        done
        echo
        echo "| target | memory/stream KiB, median (range) | CPU µs/event, median (range) |"
        echo "|---|---:|---:|"
        for name in rampart nginx; do
            mem=() cpu=()
            for i in "${!S_KV[@]}"; do
                [[ ${S_NAME[$i]} == "$name" ]] || continue
                mem+=("$(kv_get mem_per_stream_kib "${S_KV[$i]}")")
                cpu+=("$(kv_get cpu_us_per_event "${S_KV[$i]}")")
            done
            echo "| $name | $(med_range "${mem[@]}") | $(med_range "${cpu[@]}") |"
        done
        rm=() rc=()
        for ((r = 1; r <= ROUNDS; r++)); do
            local a="" b=""
            for i in "${!S_KV[@]}"; do
                ((S_ROUND[i] == r)) || continue
                [[ ${S_NAME[$i]} == rampart ]] && a=${S_KV[$i]}
                [[ ${S_NAME[$i]} == nginx ]] && b=${S_KV[$i]}
            done
            [[ -n $a && -n $b ]] || continue
            rm+=("$(awk -v a="$(kv_get mem_per_stream_kib "$a")" -v b="$(kv_get mem_per_stream_kib "$b")" 'BEGIN { printf "%.3f", b ? a / b : 0 }')")
            rc+=("$(awk -v a="$(kv_get cpu_us_per_event "$a")" -v b="$(kv_get cpu_us_per_event "$b")" 'BEGIN { printf "%.3f", b ? a / b : 0 }')")
        done
        echo "| rampart / nginx, per round | $(med_range "${rm[@]}")× | $(med_range "${rc[@]}")× |"
        echo
        if ((${#SLOW[@]})); then
            echo "Under 95 % of the events sent (expected $expected/s): ${SLOW[*]}: something saturated; figures suspect."
            echo
        fi
        echo "Lost streams (failed to open, ended early or failed), all cases: $LOST (must be 0)." \
            "Raw client output: $OUT_DIR/sse-TARGET-rROUND.txt."
    } >"$out"
    echo
    cat "$out"
    log "written to $out"
}

main_sse() {
    local n
    for n in STREAMS EVENT_MS EVENT_BYTES SETTLE HOLD ROUNDS; do
        [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer, got '${!n}'"
    done
    [[ $TOGETHER == [01] ]] || die "TOGETHER must be 0 or 1, got '$TOGETHER'"
    install_tools
    build_rampart
    raise_nofile
    check_ports_free "$SSE_UPSTREAM_PORT" "$RAMPART_PORT" "$RAMPART_ADMIN_PORT" "$NGINX_PORT"
    mkdir -p "$OUT_DIR/logs"
    rm -f "$OUT_DIR"/sse-*.txt
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/rampart-bench.XXXXXX")
    render "$BENCH_DIR/rampart-sse.yaml.tmpl" "$WORK/rampart-sse.yaml" \
        ADMIN="$HOST:$RAMPART_ADMIN_PORT" LISTEN="$HOST:$RAMPART_PORT" \
        UPSTREAM="$HOST:$SSE_UPSTREAM_PORT"
    "$RAMPART_BIN" check --config "$WORK/rampart-sse.yaml" >"$OUT_DIR/logs/check.log" 2>&1 || {
        cat "$OUT_DIR/logs/check.log" >&2
        die "rampart check rejected the SSE bench config"
    }
    start_sse_upstream
    for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
        sse_round
    done
    sse_report
    ((LOST == 0)) || die "$LOST stream(s) failed to open, ended early or failed: see $OUT_DIR/logs/sse-*.log"
}

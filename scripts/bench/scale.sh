# shellcheck shell=bash
# MODE=scale of scripts/bench.sh (sourced by it; uses its helpers): rampart against nginx,
# in front of the same JSON upstream (`rampart demo --upstreams-only`), in the scenarios of
# issue 18. Each case gets a freshly started proxy; ROUNDS rounds, rampart and nginx in turn
# (rampart first in odd rounds); the report gives medians and per-round ratios.
#
#   plain     small keep-alive GETs, wrk -c$CONNECTIONS                     (also: direct)
#   features  the same through rampart's bench-features listener: memory rate limit on
#             every request, breaker with a failure-rate window, retries, ejection,
#             metrics; against plain nginx again (a run of its own, next to rampart's)
#   rate      a fixed $RATE req/s over $RATE_CONNECTIONS connections, open loop
#             (examples/rate_load.rs): latency from the intended send time (also: direct)
#   big       the same GETs answered with a $BIG_BYTES-byte body (the upstream's /bytes/N)
#   many      $MANY keep-alive connections, wrk -c$MANY (ulimit -n raised here)  (also: direct)
#   h2c       HTTP/2 without TLS, prior knowledge: h2load -c$H2C_CONNECTIONS -m$H2C_STREAMS
#             (rampart: the plain listener, which tells h2c by its preface; nginx: a
#             `listen ... http2` server)
#
# Every case: requests/s, latency (wrk and rate_load: p50/p99/max; h2load: mean/max), CPU µs
# per request (utime+stime of the proxy's processes over the measured run / requests), the
# proxy's RSS near the end of the measured run, connections still open (VmRSS sampled once
# a second; nginx: master + workers; rate: just after its run), and the new upstream
# connections opened during the measured run (the upstream counts the connections it
# accepts: GET /_demo/connections before, once a second during, and after), as a % of
# requests, split into the first second (the ramp-up) and per second after it.
#
#   SCALE_CASES ("plain features rate big many h2c")  RATE (2000)  RATE_CONNECTIONS (50)
#   BIG_BYTES (65536)  MANY (1000)  H2C_CONNECTIONS (64)  H2C_STREAMS (10)  DIRECT (1)
#   RATE_BIN (${CARGO_TARGET_DIR:-target}/release/examples/rate_load)
#   TOGETHER (0): 1 runs rampart and nginx at once in each round, a load client each (the
#   direct reference stays alone); the machine's drift then falls on both alike. CPU per
#   request is the figure to read then: the two share the machine, so req/s and latency are
#   each proxy's under the other's load.
# DURATION and WARMUP as for MODE=rps. Results in $OUT_DIR/results-scale[-pin].md.

SCALE_CASES=${SCALE_CASES:-plain features rate big many h2c}
RATE=${RATE:-2000}
RATE_CONNECTIONS=${RATE_CONNECTIONS:-50}
BIG_BYTES=${BIG_BYTES:-65536}
MANY=${MANY:-1000}
H2C_CONNECTIONS=${H2C_CONNECTIONS:-64}
H2C_STREAMS=${H2C_STREAMS:-10}
DIRECT=${DIRECT:-1}
RATE_BIN=${RATE_BIN:-$TARGET_DIR/release/examples/rate_load}

# Results, one per measured run: round, case, target and a key=value line (rps p50 p99 max
# cpu rss newconn reqs errors note).
X_ROUND=() X_CASE=() X_TARGET=() X_KV=() X_NOTE=()
X_WARN=()              # what went wrong in a run (errors, a rate not kept), for the report

scale_tools() {
    command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client) ||
        die "h2load is missing and could not be installed (apt-get install -y nghttp2-client)"
    if [[ $BUILD == 1 ]]; then
        (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet --example rate_load) ||
            die "cargo build --release --example rate_load failed"
    fi
    [[ -x $RATE_BIN ]] || die "no rate_load binary at $RATE_BIN (BUILD=1, or cargo build --release --example rate_load)"
}

# wrk -c$MANY: a descriptor per connection in wrk, two in a proxy (client and upstream).
# Processes started after this inherit it.
scale_nofile() {
    local need=$((2 * MANY + 1024)) hard
    hard=$(ulimit -Hn)
    if [[ $hard != unlimited ]] && ((hard < need)); then
        die "$MANY connections need $need open files per process; the hard limit is $hard (ulimit -Hn)"
    fi
    if (($(ulimit -n) < need)); then
        ulimit -n "$need"
    fi
}

# The body of GET URL (Connection: close), via /dev/tcp. Empty on failure.
http_body() {
    local url=$1 h port path fd text=""
    [[ $url =~ ^http://([^:/]+):([0-9]+)(/.*)?$ ]] || return 1
    h=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]} path=${BASH_REMATCH[3]:-/}
    exec {fd}<>"/dev/tcp/$h/$port" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$path" "$h" "$port" >&"$fd"
    text=$(timeout 5 cat <&"$fd" || true)
    exec {fd}>&-
    # After the blank line that ends the head.
    printf '%s' "${text#*$'\r\n\r\n'}"
}

# Connections the upstream has accepted so far, this question's own included.
upstream_accepted() {
    local n
    n=$(http_body "http://$HOST:$UPSTREAM_PORT/_demo/connections" | tr -dc '0-9')
    [[ -n $n ]] || die "the upstream did not answer GET /_demo/connections (a rampart built before it had it?)"
    echo "$n"
}

# sampler OUT SECONDS "PIDS"...: once a second, the upstream's count of accepted connections
# (each question opens one) and the RSS of each group of PIDs (a column each: one proxy's
# processes per group), so that the report can tell connections opened as the load ramps
# up from those opened all along, and give the RSS with the connections still open.
# Bounded by SECONDS.
sampler() {
    local i out=$1 n=$2 group line
    shift 2
    for ((i = 0; i < n; i++)); do
        sleep 1
        line=$(upstream_accepted)
        for group in "$@"; do
            # shellcheck disable=SC2086 # a group is a space-separated PID list
            line+=" $(rss_kib $group)"
        done
        echo "$line"
    done >"$out"
}

# "FIRST_S in the 1st s, then PER_S/s": new upstream connections in the first second of the
# measured run and per second after it, from sampler's file and the count before the run.
churn_split() {
    awk -v up0="$2" '{ v[NR] = $1 } END {
        if (NR < 2) { print "?"; exit }
        # Every sample is one connection of its own: less one per sample.
        printf "%d in the 1st s, then %.0f/s", v[1] - up0 - 1, (v[NR] - v[1] - (NR - 1)) / (NR - 1) }' "$1"
}

# The RSS in column COLUMN of sampler's file OUT, from its last sample certainly taken while
# the load ran (the last one may be just after).
sampled_rss() { # OUT COLUMN
    awk -v c="$2" '{ v[NR] = $c } END { print v[NR - 1] }' "$1"
}

rss_kib() { # sum of VmRSS over the PIDs, KiB
    local total=0 pid v
    for pid in "$@"; do
        v=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# Starts the proxy of TARGET (rampart, rampart-features or nginx) and sets PROXY_PIDS.
PROXY_PIDS=""
scale_start() {
    local i kids=()
    case $1 in
    direct) PROXY_PIDS="" ;;
    rampart | rampart-features)
        start_rampart
        PROXY_PIDS=$RAMPART_PID
        ;;
    nginx)
        start_nginx "$BENCH_DIR/nginx-scale.conf.tmpl" "$HOST:$UPSTREAM_PORT" \
            LISTEN_H2C="$HOST:$NGINX_H2C_PORT"
        # The master listens before it forks the workers: wait for them, or they go uncounted.
        for ((i = 0; i < 50; i++)); do
            mapfile -t kids < <(children_of "$NGINX_PID")
            ((${#kids[@]} < WORKERS)) || break
            sleep 0.1
        done
        ((${#kids[@]} >= WORKERS)) || die "nginx has ${#kids[@]} worker(s) after 5 s, not $WORKERS"
        PROXY_PIDS=$(nginx_pids | tr '\n' ' ')
        ;;
    esac
}

scale_stop() {
    local pid kids=()
    case $1 in
    rampart | rampart-features) stop_started "$RAMPART_PID" ;;
    nginx)
        mapfile -t kids < <(children_of "$NGINX_PID")
        stop_started "$NGINX_PID"
        for pid in "${kids[@]}"; do
            stop_pid "$pid"
        done
        ;;
    esac
}

# The URL of CASE through TARGET.
scale_url() {
    local case=$1 target=$2 port path=$BENCH_PATH
    case $target in
    direct) port=$UPSTREAM_PORT ;;
    rampart) port=$RAMPART_PORT ;;
    rampart-features) port=$RAMPART_FEATURES_PORT ;;
    nginx) port=$NGINX_PORT ;;
    esac
    [[ $case != h2c || $target != nginx ]] || port=$NGINX_H2C_PORT
    [[ $case != big ]] || path=/bytes/$BIG_BYTES
    echo "http://$HOST:$port$path"
}

# scale_warm CASE URL: the warm-up, not counted: connections, the upstream pool, allocator
# caches. rate_load warms up itself, on its own connections.
scale_warm() {
    local case=$1 url=$2 c=$CONNECTIONS
    case $case in
    plain | features | big | many)
        [[ $case != many ]] || c=$MANY
        "${LOAD_ON[@]}" wrk -t"$THREADS" -c"$c" -d"$WARMUP" "$url" >/dev/null || die "wrk warm-up against $url failed"
        ;;
    h2c)
        "${LOAD_ON[@]}" timeout 60 h2load -c "$H2C_CONNECTIONS" -m "$H2C_STREAMS" -D "${WARMUP%s}" \
            "$url" >/dev/null || die "h2load warm-up against $url failed"
        ;;
    esac
}

# scale_load ROUND CASE TARGET URL PIDS...: the measured load, its output in the run's raw
# file (rate_load reads the CPU of PIDS itself, over exactly its measured interval).
scale_load() {
    local round=$1 case=$2 target=$3 url=$4 c=$CONNECTIONS extra=()
    local raw=$OUT_DIR/scale-$case-$target-r$round.txt errlog=$OUT_DIR/logs/scale-$case-$target-r$round.log
    shift 4
    case $case in
    plain | features | big | many)
        # wrk's 2 s default timeout drops the slowest answers from the latency figures (as
        # socket errors) when 1,000 connections queue on a busy machine: let them count.
        [[ $case != many ]] || c=$MANY extra=(--timeout 10s)
        "${LOAD_ON[@]}" wrk -t"$THREADS" -c"$c" -d"$DURATION" --latency "${extra[@]}" "$url" >"$raw" ||
            die "wrk against $target failed"
        ;;
    rate)
        # Bounded: warm-up + measured + the client's own 10 s deadline for stragglers.
        timeout $((${WARMUP%s} + ${DURATION%s} + 60)) "${LOAD_ON[@]}" "$RATE_BIN" "$url" \
            "$RATE_CONNECTIONS" "$RATE" "${WARMUP%s}" "${DURATION%s}" "$CLK_TCK" "$@" \
            >"$raw" 2>"$errlog" || die "rate_load against $target failed: $(tail -n 3 "$errlog")"
        ;;
    h2c)
        "${LOAD_ON[@]}" timeout $((${DURATION%s} + 60)) h2load -c "$H2C_CONNECTIONS" -m "$H2C_STREAMS" \
            -D "${DURATION%s}" "$url" >"$raw" || die "h2load against $target failed ($raw)"
        ;;
    esac
}

# scale_parse ROUND CASE TARGET: reads the run's raw file into the caller's rps reqs p50 p99
# max errors note kv (bash's locals are seen by the functions a function calls).
scale_parse() {
    local round=$1 case=$2 target=$3
    local raw=$OUT_DIR/scale-$case-$target-r$round.txt
    case $case in
    plain | features | big | many)
        rps=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$raw")
        reqs=$(awk '/ requests in / { print $1 }' "$raw")
        p50=$(to_ms "$(awk '$1 == "50%" { print $2 }' "$raw")")
        p99=$(to_ms "$(awk '$1 == "99%" { print $2 }' "$raw")")
        max=$(to_ms "$(awk '$1 == "Latency" { print $4; exit }' "$raw")")
        errors=$(awk '/Socket errors:/ { gsub(",", ""); n += $4 + $6 + $8 + $10 }
            /Non-2xx or 3xx responses:/ { n += $NF } END { print n + 0 }' "$raw")
        ;;
    rate)
        kv=$(tail -n 1 "$raw")
        rps=$(kv_get rate "$kv") reqs=$(kv_get requests "$kv")
        p50=$(kv_get p50_ms "$kv") p99=$(kv_get p99_ms "$kv") max=$(kv_get max_ms "$kv")
        errors=$(($(kv_get errors "$kv") + $(kv_get missed "$kv")))
        note="p90 $(kv_get p90_ms "$kv") ms, missed $(kv_get missed "$kv"), reconnects $(kv_get reconnects "$kv")"
        if (($(kv_get missed "$kv") > 0)) || ((rps * 100 < RATE * 95)); then
            X_WARN+=("rate through $target (round $round): $rps req/s of $RATE, $(kv_get missed "$kv") never sent: it did not keep up")
        fi
        ;;
    h2c)
        rps=$(awk '/^finished in/ { gsub(",", ""); printf "%.0f", $4 }' "$raw")
        reqs=$(awk '/^requests:/ { print $8 }' "$raw")
        # "time for request:  MIN  MAX  MEAN  SD  +/-SD": mean in the p50 column, max.
        p50=$(to_ms "$(awk '/^time for request:/ { print $6 }' "$raw")")
        max=$(to_ms "$(awk '/^time for request:/ { print $5 }' "$raw")")
        p99="—"
        errors=$(awk '/^requests:/ { print $10 + $12 + $14 }' "$raw")
        note="mean (not p50) $p50 ms; $(awk '/^status codes:/ { sub(/^status codes: /, ""); print }' "$raw")"
        grep -q '^Application protocol: h2c' "$raw" ||
            X_WARN+=("h2c through $target (round $round): h2load did not speak h2c ($raw)")
        ;;
    esac
    if [[ -z $rps || -z $reqs ]] || ((reqs == 0)); then
        die "scale $case $target: nothing counted ($raw)"
    fi
}

# scale_record ROUND CASE TARGET CPU0 CPU1 PIDS...: the run's CPU µs per request (ticks CPU0
# to CPU1 of PIDS; rate_load's own figure for rate), warnings and its row of results, from
# the caller's figures (scale_parse's, with rss newconn note).
scale_record() {
    local round=$1 case=$2 target=$3 cpu0=$4 cpu1=$5 cpu="" raw
    raw=$OUT_DIR/scale-$case-$target-r$round.txt
    shift 5
    if (($#)); then
        if [[ $case == rate ]]; then
            cpu=$(kv_get cpu_us_per_req "$kv")
        else
            cpu=$(awk -v d="$((cpu1 - cpu0))" -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.1f", d / hz / n * 1e6 }')
        fi
        if [[ $target == nginx && $case == big ]]; then
            local spilled
            spilled=$(grep -c 'buffered to a temporary file' "$WORK/nginx/error.log" || true)
            note+="; responses buffered to a temporary file (nginx warnings): ${spilled:-0}"
        fi
    else
        rss=""
    fi
    if ((errors > 0)); then
        X_WARN+=("$case through $target (round $round): $errors errors ($raw)")
    fi
    X_ROUND+=("$round") X_CASE+=("$case") X_TARGET+=("$target")
    X_KV+=("rps=$rps p50=$p50 p99=$p99 max=$max cpu=${cpu:-—} rss=${rss:-—} newconn=$newconn reqs=$reqs errors=$errors")
    log "round $round, $case, $target: $rps req/s, p50 $p50 ms, p99 $p99 ms, max $max ms, CPU ${cpu:-—} µs/req," \
        "RSS ${rss:-—} KiB, new upstream connections $newconn, errors $errors${note:+; $note}"
    X_NOTE+=("$note")
}

# scale_probe CASE TARGET URL: the target answers a GET (h2c: h2load checks its own).
scale_probe() {
    local status
    [[ $1 != h2c ]] || return 0
    status=$(http_status "$3" || true)
    [[ $status == 200 ]] || die "scale $1 $2: GET $3 answered '${status:-nothing}', expected 200"
}

# scale_case ROUND CASE TARGET: one measured run against a freshly started proxy.
scale_case() {
    local round=$1 case=$2 target=$3 url pids=() cpu0 cpu1 up0 up1 kv=""
    local rps="" p50="" p99="" max="" reqs="" errors="" note="" newconn="—" rss=""
    url=$(scale_url "$case" "$target")
    scale_start "$target"
    [[ -z $PROXY_PIDS ]] || read -r -a pids <<<"$PROXY_PIDS"
    scale_probe "$case" "$target" "$url"
    log "round $round, $case, $target: warm-up $WARMUP, then $DURATION measured ($url)"
    scale_warm "$case" "$url"
    up0=$(upstream_accepted)
    local sampler_pid="" samples=$WORK/churn.txt
    if ((${#pids[@]})) && [[ $case != rate ]]; then
        sampler "$samples" "${DURATION%s}" "${pids[*]}" &
        sampler_pid=$!
        STARTED_PIDS+=("$sampler_pid")
    fi
    cpu0=$(cpu_ticks "${pids[@]}")
    # In the background and waited for, so that a signal reaches cleanup() at once.
    scale_load "$round" "$case" "$target" "$url" "${pids[@]}" &
    local load_pid=$!
    STARTED_PIDS+=("$load_pid")
    wait "$load_pid" || die "the load against $target failed"
    cpu1=$(cpu_ticks "${pids[@]}")
    scale_parse "$round" "$case" "$target"
    local churn=""
    if [[ -n $sampler_pid ]]; then
        wait "$sampler_pid" || true
        stop_started "$sampler_pid"
        churn=$(churn_split "$samples" "$up0")
        # The sampler's questions were connections too.
        up0=$((up0 + $(wc -l <"$samples")))
    fi
    up1=$(upstream_accepted)
    rss=$(rss_kib "${pids[@]}")
    if [[ -n $sampler_pid ]] && (($(wc -l <"$samples") >= 2)); then
        rss=$(sampled_rss "$samples" 2)
    fi
    if ((${#pids[@]})); then
        # The second question opened one of its own.
        newconn=$((up1 - up0 - 1))
        [[ -z $churn ]] || note="new upstream conns $churn${note:+; $note}"
    fi
    scale_record "$round" "$case" "$target" "$cpu0" "$cpu1" "${pids[@]}"
    scale_stop "$target"
}

# rampart's upstream connections opened so far (its own count: with TOGETHER=1 the
# upstream's count is both proxies').
rampart_opened() {
    admin_metrics | awk '/^rampart_upstream_connections_opened_total/ { n += $2 } END { printf "%d", n }'
}

# scale_pair ROUND CASE: rampart's side and nginx at once, freshly started, a load client
# each (TOGETHER=1; with PIN=1 both proxies on CPU 1, the loads and the upstream on CPU 0):
# the machine's drift falls on both within the same seconds. New upstream connections:
# rampart's from its own metric, nginx's the rest of what the upstream accepted.
scale_pair() {
    local round=$1 case=$2 r=rampart t
    [[ $case != features ]] || r=rampart-features
    local -A url=() pids=() cpu0=() cpu1=() lpid=() rss_of=()
    for t in "$r" nginx; do
        url[$t]=$(scale_url "$case" "$t")
        scale_start "$t"
        pids[$t]=$PROXY_PIDS
        scale_probe "$case" "$t" "${url[$t]}"
    done
    log "round $round, $case, $r and nginx at once: warm-up $WARMUP, then $DURATION measured"
    for t in "$r" nginx; do
        scale_warm "$case" "${url[$t]}" &
        lpid[$t]=$!
        STARTED_PIDS+=("${lpid[$t]}")
    done
    for t in "$r" nginx; do
        wait "${lpid[$t]}" || die "the warm-up against $t failed"
    done
    local up0 up1 ram0 ram1 samples=$WORK/churn.txt sampler_pid="" n=0
    up0=$(upstream_accepted)
    ram0=$(rampart_opened)
    if [[ $case != rate ]]; then
        # The RSS of each, once a second (the first column, the upstream's count, unused).
        sampler "$samples" "${DURATION%s}" "${pids[$r]}" "${pids[nginx]}" &
        sampler_pid=$!
        STARTED_PIDS+=("$sampler_pid")
    fi
    for t in "$r" nginx; do
        # shellcheck disable=SC2086 # the PID lists split into words
        cpu0[$t]=$(cpu_ticks ${pids[$t]})
        # shellcheck disable=SC2086
        scale_load "$round" "$case" "$t" "${url[$t]}" ${pids[$t]} &
        lpid[$t]=$!
        STARTED_PIDS+=("${lpid[$t]}")
    done
    for t in "$r" nginx; do
        wait "${lpid[$t]}" || die "the load against $t failed"
        # shellcheck disable=SC2086
        cpu1[$t]=$(cpu_ticks ${pids[$t]})
    done
    if [[ -n $sampler_pid ]]; then
        wait "$sampler_pid" || true
        stop_started "$sampler_pid"
        n=$(wc -l <"$samples")
    fi
    up1=$(upstream_accepted)
    ram1=$(rampart_opened)
    # shellcheck disable=SC2086
    rss_of[$r]=$(rss_kib ${pids[$r]}) rss_of[nginx]=$(rss_kib ${pids[nginx]})
    if ((n >= 2)); then
        rss_of[$r]=$(sampled_rss "$samples" 2) rss_of[nginx]=$(sampled_rss "$samples" 3)
    fi
    for t in "$r" nginx; do
        local rps="" p50="" p99="" max="" reqs="" errors="" note="" newconn="—" rss=${rss_of[$t]} kv=""
        scale_parse "$round" "$case" "$t"
        if [[ $t == nginx ]]; then
            # The sampler's questions and the second count's own were connections too.
            newconn=$((up1 - up0 - n - 1 - (ram1 - ram0)))
        else
            newconn=$((ram1 - ram0))
        fi
        # shellcheck disable=SC2086
        scale_record "$round" "$case" "$t" "${cpu0[$t]}" "${cpu1[$t]}" ${pids[$t]}
    done
    scale_stop "$r"
    scale_stop nginx
}

# The targets of CASE in ROUND, rampart's side first in odd rounds.
scale_targets() {
    local case=$1 round=$2 r=rampart d=""
    [[ $case != features ]] || r=rampart-features
    [[ $DIRECT != 1 || ! $case =~ ^(plain|rate|many)$ ]] || d=direct
    if ((round % 2)); then
        echo $d $r nginx
    else
        echo $d nginx $r
    fi
}

# The value of KEY of the run (ROUND, CASE, TARGET), empty when there is none.
x_get() {
    local i
    for i in "${!X_KV[@]}"; do
        if [[ ${X_ROUND[$i]} == "$1" && ${X_CASE[$i]} == "$2" && ${X_TARGET[$i]} == "$3" ]]; then
            kv_get "$4" "${X_KV[$i]}"
            return
        fi
    done
}

med_range0() { med_range_digits 0 "$@"; } # whole numbers

scale_report() {
    local out=$OUT_DIR/results-scale i case target r key
    [[ $PIN != 1 ]] || out+=-pin
    out+=.md
    local -a vals ratios
    {
        echo "# rampart scale benchmark"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "- machine: $(nproc) CPU(s), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r); busy before start: ${BUSY_START}%"
        echo "- rampart: $("$RAMPART_BIN" --version 2>/dev/null) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ', dirty'))"
        echo "- nginx: $("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //') (scripts/bench/nginx-scale.conf.tmpl: upstream \`keepalive 256\` as rampart's idle pool)"
        if ((TOGETHER)); then
            echo "- proxies with $WORKERS worker(s)$([[ $PIN == 1 ]] && echo ", pinned together on CPU 1 (loads and upstream on CPU 0)"); rampart and nginx started fresh and loaded at once in each round, a load client each; $ROUNDS round(s); warm-up $WARMUP, measured $DURATION; new upstream conns: rampart's from its metric, nginx's the rest of the upstream's count"
        else
            echo "- proxies with $WORKERS worker(s)$([[ $PIN == 1 ]] && echo ", pinned alone on CPU 1 (load and upstream on CPU 0)"); a fresh proxy per run; $ROUNDS round(s), rampart first in odd rounds; warm-up $WARMUP, measured $DURATION"
        fi
        echo "- plain/features/big: \`wrk -t$THREADS -c$CONNECTIONS\`; many: \`wrk -t$THREADS -c$MANY\`; rate: examples/rate_load.rs, $RATE req/s on $RATE_CONNECTIONS connections, open loop, latency from the intended send time; h2c: \`h2load -c$H2C_CONNECTIONS -m$H2C_STREAMS\` (its mean where others have p50, no p99); big: $BIG_BYTES-byte bodies"
        echo "- CPU µs/req: utime+stime of the proxy's process(es) over the measured run / requests; RSS: VmRSS in the last second of the measured run, connections open (nginx: master + workers; rate: just after the run); new upstream conns: connections the upstream accepted during the measured run, % of requests (notes: in the first second, then per second)"
        echo
        echo "| round | case | target | req/s | p50 ms | p99 ms | max ms | CPU µs/req | RSS MiB | new upstream conns | errors | notes |"
        echo "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        for i in "${!X_KV[@]}"; do
            local kv=${X_KV[$i]} nc rss
            nc=$(kv_get newconn "$kv")
            [[ $nc == — ]] || nc="$nc ($(awk -v a="$nc" -v b="$(kv_get reqs "$kv")" 'BEGIN { printf "%.2f%%", b ? a / b * 100 : 0 }'))"
            rss=$(kv_get rss "$kv")
            [[ $rss == — ]] || rss=$(awk -v k="$rss" 'BEGIN { printf "%.1f", k / 1024 }')
            printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' \
                "${X_ROUND[$i]}" "${X_CASE[$i]}" "${X_TARGET[$i]}" "$(kv_get rps "$kv")" \
                "$(kv_get p50 "$kv")" "$(kv_get p99 "$kv")" "$(kv_get max "$kv")" "$(kv_get cpu "$kv")" \
                "$rss" "$nc" "$(kv_get errors "$kv")" "${X_NOTE[$i]}"
        done
        echo
        echo "Medians over the rounds (range), and rampart / nginx per round, median (range) (the features case: against plain nginx, run next to it):"
        echo
        echo "| case | target | req/s | p50 ms | p99 ms | CPU µs/req | RSS MiB | new upstream conns % | req/s ÷ nginx | p99 ÷ nginx | CPU ÷ nginx | RSS ÷ nginx |"
        echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for case in $SCALE_CASES; do
            for target in direct rampart rampart-features nginx; do
                vals=()
                for i in "${!X_KV[@]}"; do
                    [[ ${X_CASE[$i]} == "$case" && ${X_TARGET[$i]} == "$target" ]] && vals+=("$i")
                done
                ((${#vals[@]})) || continue
                local row="| $case | $target |"
                for key in rps p50 p99 cpu rss newconn; do
                    local xs=()
                    for i in "${vals[@]}"; do
                        local v
                        v=$(kv_get "$key" "${X_KV[$i]}")
                        [[ $v == — || -z $v ]] && continue
                        case $key in
                        rss) v=$(awk -v k="$v" 'BEGIN { printf "%.2f", k / 1024 }') ;;
                        newconn) v=$(awk -v a="$v" -v b="$(kv_get reqs "${X_KV[$i]}")" 'BEGIN { printf "%.4f", b ? a / b * 100 : 0 }') ;;
                        esac
                        xs+=("$v")
                    done
                    if [[ $key == rps ]]; then
                        row+=" $(med_range0 "${xs[@]}") |"
                    else
                        row+=" $(med_range "${xs[@]}") |"
                    fi
                done
                for key in rps p99 cpu rss; do
                    ratios=()
                    if [[ $target == rampart* ]]; then
                        for ((r = 1; r <= ROUNDS; r++)); do
                            local a b
                            a=$(x_get "$r" "$case" "$target" "$key")
                            b=$(x_get "$r" "$case" nginx "$key")
                            [[ -n $a && -n $b && $a != — && $b != — ]] || continue
                            ratios+=("$(awk -v x="$a" -v y="$b" 'BEGIN { printf "%.3f", y ? x / y : 0 }')")
                        done
                    fi
                    if ((${#ratios[@]})); then
                        row+=" $(med_range "${ratios[@]}")× |"
                    else
                        row+=" — |"
                    fi
                done
                echo "$row"
            done
        done
        echo
        if ((${#X_WARN[@]})); then
            echo "Warnings:"
            echo
            printf -- '- %s\n' "${X_WARN[@]}"
            echo
        fi
        echo "Raw output: $OUT_DIR/scale-CASE-TARGET-rROUND.txt."
    } >"$out"
    echo
    cat "$out"
    log "written to $out"
}

main_scale() {
    local n case target round
    for n in ROUNDS RATE RATE_CONNECTIONS BIG_BYTES MANY H2C_CONNECTIONS H2C_STREAMS; do
        [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer, got '${!n}'"
    done
    for n in DURATION WARMUP; do
        [[ ${!n} =~ ^[1-9][0-9]*s$ ]] || die "$n must be whole seconds like 10s in MODE=scale, got '${!n}'"
    done
    for case in $SCALE_CASES; do
        [[ $case =~ ^(plain|features|rate|big|many|h2c)$ ]] ||
            die "SCALE_CASES: unknown case '$case' (plain features rate big many h2c)"
    done
    [[ $TOGETHER == [01] ]] || die "TOGETHER must be 0 or 1, got '$TOGETHER'"
    ((BIG_BYTES <= 16777216)) || die "BIG_BYTES at most 16 MiB (the upstream's /bytes/N limit)"
    install_tools
    build_rampart
    scale_tools
    scale_nofile
    local b0 b1
    b0=$(box_ticks)
    sleep 1
    b1=$(box_ticks)
    BUSY_START=$(busy_pct "$b0" "$b1")
    if [[ $BUSY_START == "?" ]] || ((BUSY_START > 20)); then
        log "warning: machine ${BUSY_START}% busy before starting: other work is running, expect noisy numbers"
    fi
    check_ports_free "$LLM_PORT" "$UPSTREAM_PORT" "$RAMPART_PORT" "$RAMPART_ADMIN_PORT" "$NGINX_PORT" \
        "$NGINX_H2C_PORT" "$RAMPART_RL_MEMORY_PORT" "$RAMPART_RL_REDIS_PORT" "$RAMPART_FEATURES_PORT" "$REDIS_PORT"
    mkdir -p "$OUT_DIR/logs"
    rm -f "$OUT_DIR"/scale-*.txt
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/rampart-bench.XXXXXX")
    # The rps config: its `bench` listener is the plain case, `bench-features` the features
    # one; its Redis-store policy needs the redis-server (unused here, but configured).
    render_rampart_config
    start_upstream
    start_redis
    local big
    big=$(http_body "http://$HOST:$UPSTREAM_PORT/bytes/$BIG_BYTES" | wc -c)
    ((big == BIG_BYTES)) || die "the upstream's /bytes/$BIG_BYTES answered $big bytes (a rampart built before it had the path?)"
    for ((round = 1; round <= ROUNDS; round++)); do
        for case in $SCALE_CASES; do
            for target in $(scale_targets "$case" "$round"); do
                if ((TOGETHER)) && [[ $target != direct ]]; then
                    [[ $target == nginx ]] || scale_pair "$round" "$case"
                else
                    scale_case "$round" "$case" "$target"
                fi
            done
        done
    done
    scale_report
}

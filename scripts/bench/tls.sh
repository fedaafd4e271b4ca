# MODE=tls of scripts/bench.sh (sourced by it; uses its helpers): rampart and nginx
# terminating TLS with the same certificate (ECDSA P-256, made here with openssl) in front of
# the same JSON upstream, in one run:
#   full     new connection, full handshake, one GET, close     (examples/tls_load.rs)
#   resumed  the same, offering the session of the last connection (TLS 1.3 ticket / 1.2 ID)
#   h1       keep-alive GETs over TLS, HTTP/1.1                 (wrk)
#   h2       keep-alive GETs over TLS, HTTP/2 by ALPN            (h2load, -m streams a connection)
# Rates and CPU µs per operation (utime+stime of the proxy's processes over the measured run /
# operations completed), ROUNDS rounds with rampart and nginx in turn.
#   TLS_SECONDS (10) measured seconds per case   TLS_CONCURRENCY (32) handshake loops
#   H2_STREAMS (10) h2load -m                     CONNECTIONS (64) wrk -c and h2load -c
# Results in $OUT_DIR/results-tls[-pin].md.

TLS_SECONDS=${TLS_SECONDS:-10}
TLS_CONCURRENCY=${TLS_CONCURRENCY:-32}
H2_STREAMS=${H2_STREAMS:-10}
TLS_BIN=${TLS_BIN:-$TARGET_DIR/release/examples/tls_load}
TLS_NAME=bench.local
# Results, one per case: round, target, kind, ops/s, CPU µs/op, note.
T_ROUND=() T_NAME=() T_KIND=() T_RATE=() T_CPU=() T_NOTE=()

tls_tools() {
    command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client) ||
        die "h2load is missing and could not be installed (apt-get install -y nghttp2-client)"
    command -v openssl >/dev/null || (apt-get update && apt-get install -y openssl) ||
        die "openssl is missing and could not be installed"
    if [[ $BUILD == 1 ]]; then
        (cd "$ROOT" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --quiet --example tls_load) ||
            die "cargo build --release --example tls_load failed"
    fi
    [[ -x $TLS_BIN ]] || die "no tls_load binary at $TLS_BIN (BUILD=1, or cargo build --release --example tls_load)"
}

# A private CA and a server certificate for $TLS_NAME and 127.0.0.1, in $WORK/tls.
make_certs() {
    local d=$WORK/tls
    mkdir -p "$d"
    chmod 755 "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj "/CN=rampart bench CA" -keyout "$d/ca.key" -out "$d/ca.pem" >/dev/null 2>&1 ||
        die "openssl could not make the CA"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$TLS_NAME" \
        -keyout "$d/server.key" -out "$d/server.csr" >/dev/null 2>&1 ||
        die "openssl could not make the server key"
    printf 'subjectAltName=DNS:%s,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' \
        "$TLS_NAME" >"$d/ext.cnf"
    openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
        -days 2 -extfile "$d/ext.cnf" -out "$d/server.pem" >/dev/null 2>&1 ||
        die "openssl could not sign the server certificate"
    # nginx's workers run unprivileged: they read the files after the master did.
    chmod 644 "$d"/*
}

# tls_case ROUND NAME KIND PORT PIDS
tls_case() {
    local round=$1 name=$2 kind=$3 port=$4 pids=() raw out rate ops cpu0 cpu1 note=""
    read -r -a pids <<<"$5"
    raw=$OUT_DIR/tls-$name-$kind-r$round.txt
    # Warm-up, not counted: connections, sessions and the upstream pool.
    case $kind in
    full | resumed)
        "${LOAD_ON[@]}" "$TLS_BIN" "$HOST:$port" "$TLS_NAME" "$WORK/tls/ca.pem" "$BENCH_PATH" \
            "$TLS_CONCURRENCY" 1 "${kind/resumed/resume}" >/dev/null ||
            die "tls_load warm-up against $name failed"
        ;;
    h1) load 2s "https://$HOST:$port$BENCH_PATH" /dev/null ;;
    h2)
        "${LOAD_ON[@]}" h2load -c "$CONNECTIONS" -m "$H2_STREAMS" -D 2 \
            "https://$HOST:$port$BENCH_PATH" >/dev/null || die "h2load warm-up against $name failed"
        ;;
    esac
    cpu0=$(cpu_ticks "${pids[@]}")
    case $kind in
    full | resumed)
        "${LOAD_ON[@]}" "$TLS_BIN" "$HOST:$port" "$TLS_NAME" "$WORK/tls/ca.pem" "$BENCH_PATH" \
            "$TLS_CONCURRENCY" "$TLS_SECONDS" "${kind/resumed/resume}" >"$raw" ||
            die "tls_load against $name failed"
        out=$(tail -n 1 "$raw")
        rate=$(kv_get per_s "$out")
        ops=$(kv_get connections "$out")
        local resumed errors
        resumed=$(kv_get resumed "$out")
        errors=$(kv_get errors "$out")
        note="resumed $resumed of $ops, errors $errors"
        ((errors == 0)) || log "warning: $name $kind: $errors failed connections"
        if [[ $kind == resumed ]] && ((resumed * 100 < ops * 95)); then
            log "warning: $name resumed only $resumed of $ops handshakes"
        fi
        ;;
    h1)
        load "${TLS_SECONDS}s" "https://$HOST:$port$BENCH_PATH" "$raw"
        rate=$(awk '/^Requests\/sec:/ { printf "%.0f", $2 }' "$raw")
        ops=$(awk '/ requests in / { print $1 }' "$raw")
        note=$(awk '/Socket errors:|Non-2xx/ { printf "%s ", $0 }' "$raw")
        ;;
    h2)
        "${LOAD_ON[@]}" h2load -c "$CONNECTIONS" -m "$H2_STREAMS" -D "$TLS_SECONDS" \
            "https://$HOST:$port$BENCH_PATH" >"$raw" || die "h2load against $name failed"
        rate=$(awk '/^finished in/ { gsub(",", ""); printf "%.0f", $4 }' "$raw")
        ops=$(awk '/^requests:/ { print $8 }' "$raw")
        note="$(awk '/^requests:/ { print $10, "failed,", $12, "errored" }' "$raw"); $(awk '/^Application protocol:/ { print "ALPN", $3 }' "$raw")"
        ;;
    esac
    cpu1=$(cpu_ticks "${pids[@]}")
    [[ -n $rate && -n $ops ]] && ((ops > 0)) || die "tls_case $name $kind: nothing counted ($raw)"
    T_ROUND+=("$round") T_NAME+=("$name") T_KIND+=("$kind") T_RATE+=("$rate") T_NOTE+=("$note")
    T_CPU+=("$(awk -v d="$((cpu1 - cpu0))" -v hz="$CLK_TCK" -v n="$ops" 'BEGIN { printf "%.1f", d / hz / n * 1e6 }')")
    log "round $round, $name $kind: $rate/s, ${T_CPU[-1]} µs CPU each ($note)"
}

tls_report() {
    local out=$OUT_DIR/results-tls$([[ $PIN == 1 ]] && echo -pin).md i kind r a b
    local -a rr rc
    {
        echo "# rampart TLS benchmark"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "- machine: $(nproc) CPU(s), $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), kernel $(uname -r)"
        echo "- rampart: $("$RAMPART_BIN" --version 2>/dev/null) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ', dirty'))"
        echo "- nginx: $("$NGINX_BIN" -V 2>&1 | awk '/^nginx version/ { sub(/^nginx version: /, ""); v = $0 } /built with/ { sub(/^built with /, ""); o = $0 } END { print v ", " o }')"
        echo "- the same ECDSA P-256 certificate for both; upstream \`rampart demo --upstreams-only\` over plain HTTP; proxies with $WORKERS worker(s)$([[ $PIN == 1 ]] && echo ", pinned alone on CPU 1 (load and upstream on CPU 0)")"
        echo "- full/resumed: examples/tls_load.rs, $TLS_CONCURRENCY loops each doing connect + handshake + one GET + close for ${TLS_SECONDS} s (resumed: offering the previous session); h1: \`wrk -t$THREADS -c$CONNECTIONS\` over TLS; h2: \`h2load -c$CONNECTIONS -m$H2_STREAMS\`; each after a warm-up"
        echo "- CPU µs/op: utime+stime of the proxy's process(es) (nginx: master + workers) over the measured run / operations completed"
        echo
        echo "| round | target | case | per s | CPU µs/op | notes |"
        echo "|---:|---|---|---:|---:|---|"
        for i in "${!T_NAME[@]}"; do
            printf '| %s | %s | %s | %s | %s | %s |\n' "${T_ROUND[$i]}" "${T_NAME[$i]}" "${T_KIND[$i]}" \
                "${T_RATE[$i]}" "${T_CPU[$i]}" "${T_NOTE[$i]}"
        done
        echo
        echo "| case | rampart / nginx, per s, median (range) | rampart / nginx, CPU µs/op, median (range) |"
        echo "|---|---:|---:|"
        for kind in full resumed h1 h2; do
            rr=() rc=()
            for ((r = 1; r <= ROUNDS; r++)); do
                a="" b=""
                for i in "${!T_NAME[@]}"; do
                    [[ ${T_ROUND[$i]} == "$r" && ${T_KIND[$i]} == "$kind" ]] || continue
                    [[ ${T_NAME[$i]} == rampart ]] && a=$i
                    [[ ${T_NAME[$i]} == nginx ]] && b=$i
                done
                [[ -n $a && -n $b ]] || continue
                rr+=("$(awk -v x="${T_RATE[$a]}" -v y="${T_RATE[$b]}" 'BEGIN { printf "%.3f", y ? x / y : 0 }')")
                rc+=("$(awk -v x="${T_CPU[$a]}" -v y="${T_CPU[$b]}" 'BEGIN { printf "%.3f", y ? x / y : 0 }')")
            done
            echo "| $kind | $(med_range "${rr[@]}")× | $(med_range "${rc[@]}")× |"
        done
        echo
        echo "Raw output: $OUT_DIR/tls-TARGET-CASE-rROUND.txt."
    } >"$out"
    echo
    cat "$out"
    log "written to $out"
}

main_tls() {
    local n kind round
    for n in TLS_SECONDS TLS_CONCURRENCY H2_STREAMS ROUNDS; do
        [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer, got '${!n}'"
    done
    install_tools
    build_rampart
    tls_tools
    check_ports_free "$LLM_PORT" "$UPSTREAM_PORT" "$RAMPART_PORT" "$RAMPART_ADMIN_PORT" "$NGINX_PORT"
    mkdir -p "$OUT_DIR/logs"
    rm -f "$OUT_DIR"/tls-*.txt
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/rampart-bench.XXXXXX")
    make_certs
    # The JSON upstream comes from the rps config (`rampart demo --upstreams-only` reads it).
    render_rampart_config
    render "$BENCH_DIR/rampart-tls.yaml.tmpl" "$WORK/rampart-tls.yaml" \
        ADMIN="$HOST:$RAMPART_ADMIN_PORT" LISTEN="$HOST:$RAMPART_PORT" \
        UPSTREAM="$HOST:$UPSTREAM_PORT" CERT="$WORK/tls/server.pem" KEY="$WORK/tls/server.key"
    "$RAMPART_BIN" check --config "$WORK/rampart-tls.yaml" >"$OUT_DIR/logs/check.log" 2>&1 || {
        cat "$OUT_DIR/logs/check.log" >&2
        die "rampart check rejected the TLS bench config"
    }
    start_upstream
    start_rampart "$WORK/rampart-tls.yaml"
    start_nginx "$BENCH_DIR/nginx-tls.conf.tmpl" "$HOST:$UPSTREAM_PORT" \
        CERT="$WORK/tls/server.pem" KEY="$WORK/tls/server.key"
    local r_pids n_pids i kids=()
    # The master listens before it forks the workers: wait for them, or they go uncounted.
    for ((i = 0; i < 50; i++)); do
        mapfile -t kids < <(children_of "$NGINX_PID")
        ((${#kids[@]} < WORKERS)) || break
        sleep 0.1
    done
    ((${#kids[@]} >= WORKERS)) || die "nginx has ${#kids[@]} worker(s) after 5 s, not $WORKERS"
    r_pids=$RAMPART_PID
    n_pids=$(nginx_pids | tr '\n' ' ')
    for ((round = 1; round <= ROUNDS; round++)); do
        for kind in full resumed h1 h2; do
            # rampart first in odd rounds: drift in what the machine gives falls on both.
            if ((round % 2)); then
                tls_case "$round" rampart "$kind" "$RAMPART_PORT" "$r_pids"
                tls_case "$round" nginx "$kind" "$NGINX_PORT" "$n_pids"
            else
                tls_case "$round" nginx "$kind" "$NGINX_PORT" "$n_pids"
                tls_case "$round" rampart "$kind" "$RAMPART_PORT" "$r_pids"
            fi
        done
    done
    tls_report
}

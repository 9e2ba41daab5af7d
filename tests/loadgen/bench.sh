#!/usr/bin/env bash
# Proxy benchmark with novacron-loadgen: the same open-loop and closed-loop
# loads against each "arm" (a target URL), runs interleaved across arms, medians
# reported. See tests/loadgen/README.md.
#
# Arms:
#   direct   loadgen -> backend a
#   haproxy  loadgen -> HAProxy (mode http, leastconn, nbthread 2) -> backends a, b
#   ingress  loadgen -> INGRESS_URL (only when set; whatever is listening there,
#            normally an L7 proxy in front of backends a and b; this script
#            starts the backends, the proxy is yours to start)
#
# Usage: tests/loadgen/bench.sh [--ingress URL] [--ingress-name NAME] [--no-haproxy]
#        tests/loadgen/bench.sh --summarize DIR   (the table again, from a results dir)
#
# Environment (defaults in brackets):
#   RUNS [5]  RATES ["2000 5000"]  DURATION [10s]  WARMUP [2s]  CONNECTIONS [64]
#   MAX_DURATION [5s]  MAX_WARMUP [1s]  MAX_RUNS [$RUNS]
#   BACKEND_A_PORT [18081]  BACKEND_B_PORT [18082]  HAPROXY_PORT [18080]
#   HAPROXY [/usr/sbin/haproxy]  HAPROXY_THREADS [2]
#   INGRESS_URL []  INGRESS_NAME [ingress]
#   LOADGEN_BIN [built here with cargo build --release]
#   LOADGEN_THREADS, BACKEND_THREADS [one per CPU]
#   RESULTS_DIR [a new temporary directory; every run's JSON line is kept there]
set -euo pipefail

RUNS=${RUNS:-5}
MAX_RUNS=${MAX_RUNS:-$RUNS}
RATES=${RATES:-"2000 5000"}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64}
MAX_DURATION=${MAX_DURATION:-5s}
MAX_WARMUP=${MAX_WARMUP:-1s}
BACKEND_A_PORT=${BACKEND_A_PORT:-18081}
BACKEND_B_PORT=${BACKEND_B_PORT:-18082}
HAPROXY_PORT=${HAPROXY_PORT:-18080}
HAPROXY=${HAPROXY:-/usr/sbin/haproxy}
HAPROXY_THREADS=${HAPROXY_THREADS:-2}
INGRESS_URL=${INGRESS_URL:-}
INGRESS_NAME=${INGRESS_NAME:-ingress}
WITH_HAPROXY=1

# One number out of a JSON line: `num LINE KEY` for a top-level key,
# `num LINE OBJECT KEY` for a key of a nested object (the report nests one level).
num() {
    local line=$1
    if [ $# -eq 3 ]; then
        line=$(sed -nE "s/.*\"$2\":\\{([^}]*)\\}.*/\\1/p" <<<"$line")
        set -- "$line" "$3"
    else
        line=$(sed -E 's/:\{[^{}]*\}/:null/g' <<<"$line")
    fi
    grep -oE "\"$2\":-?[0-9.]+" <<<"$line" | head -n1 | cut -d: -f2
}

# The median of the numbers on stdin, one a line.
median() {
    sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) print "-";
        else if (NR % 2) printf "%.10g\n", v[(NR + 1) / 2];
        else printf "%.10g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# The sum of the numbers on stdin.
total() {
    awk '{ s += $1 } END { print s + 0 }'
}

# `summarize FILE`: medians over the runs in FILE of p50, p99, p99.9, ok/s and
# the scheduler lag's p50 and p99, and the errors, non-2xx and drops of all of
# them together.
summarize() {
    local file=$1 line
    local p50=() p99=() p999=() tput=() lag50=() lag99=() err=() bad=() drop=()
    while IFS= read -r line; do
        p50+=("$(num "$line" latency_us p50)")
        p99+=("$(num "$line" latency_us p99)")
        p999+=("$(num "$line" latency_us p99_9)")
        tput+=("$(num "$line" throughput_ok_per_s)")
        lag50+=("$(num "$line" schedule_lag_us p50 || true)")
        lag99+=("$(num "$line" schedule_lag_us p99 || true)")
        err+=("$(num "$line" errors)")
        bad+=("$(num "$line" non_2xx)")
        drop+=("$(num "$line" dropped)")
    done <"$file"
    printf '%-4s %7s %7s %7s %9s %7s %7s %6s %6s %7s\n' \
        "${#p50[@]}" \
        "$(printf '%s\n' "${p50[@]}" | median)" \
        "$(printf '%s\n' "${p99[@]}" | median)" \
        "$(printf '%s\n' "${p999[@]}" | median)" \
        "$(printf '%s\n' "${tput[@]}" | median)" \
        "$(printf '%s\n' "${lag50[@]}" | grep . | median)" \
        "$(printf '%s\n' "${lag99[@]}" | grep . | median)" \
        "$(printf '%s\n' "${err[@]}" | total)" \
        "$(printf '%s\n' "${bad[@]}" | total)" \
        "$(printf '%s\n' "${drop[@]}" | total)"
}

# `table DIR`: the table of medians of every arm and load in DIR (files
# ARM-open-RATE.jsonl and ARM-max.jsonl), direct and haproxy first.
table() {
    local dir=$1 arms=() name file rate
    for file in "$dir"/*-max.jsonl "$dir"/*-open-*.jsonl; do
        [ -e "$file" ] || continue
        name=$(basename "$file")
        name=${name%-max.jsonl}
        name=${name%-open-*.jsonl}
        arms+=("$name")
    done
    echo "Medians over runs (latencies in us; errors, non-2xx and dropped summed over runs)"
    printf '%-10s %-10s %-4s %7s %7s %7s %9s %7s %7s %6s %6s %7s\n' \
        arm load runs p50 p99 p99.9 ok/s lag_p50 lag_p99 errors non2xx dropped
    for name in $(printf '%s\n' "${arms[@]}" | awk '{ print ($1 == "direct" ? 0 : $1 == "haproxy" ? 1 : 2), $1 }' | sort -u | cut -d' ' -f2); do
        for file in "$dir/$name"-open-*.jsonl; do
            [ -e "$file" ] || continue
            rate=${file##*-open-}
            rate=${rate%.jsonl}
            printf '%s %-10s %-10s ' "$rate" "$name" "open $rate"
            summarize "$file"
        done | sort -n | cut -d' ' -f2-
        if [ -e "$dir/$name-max.jsonl" ]; then
            printf '%-10s %-10s ' "$name" "max"
            summarize "$dir/$name-max.jsonl"
        fi
    done
}

while [ $# -gt 0 ]; do
    case "$1" in
        --ingress) INGRESS_URL=$2; shift 2 ;;
        --ingress-name) INGRESS_NAME=$2; shift 2 ;;
        --no-haproxy) WITH_HAPROXY=0; shift ;;
        --summarize) table "$2"; exit 0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

if [ -z "${LOADGEN_BIN:-}" ]; then
    cargo build --release -p novacron-loadgen >&2
    LOADGEN_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/novacron-loadgen
fi
loadgen_threads=()
[ -n "${LOADGEN_THREADS:-}" ] && loadgen_threads=(--threads "$LOADGEN_THREADS")
backend_threads=()
[ -n "${BACKEND_THREADS:-}" ] && backend_threads=(--threads "$BACKEND_THREADS")

WORK=$(mktemp -d "${TMPDIR:-/tmp}/novacron-bench.XXXXXX")
RESULTS_DIR=${RESULTS_DIR:-$WORK/results}
mkdir -p "$RESULTS_DIR"

# Everything started here is stopped on the way out, by its pid.
PIDS=()
CURRENT=
cleanup() {
    local pid
    for pid in $CURRENT "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$RESULTS_DIR" != "$WORK/results" ]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a measurement in the background and waits for it, so that an interrupt
# is handled at once (bash runs traps only between foreground commands).
measure() {
    "$LOADGEN_BIN" "$@" &
    CURRENT=$!
    wait "$CURRENT"
    CURRENT=
}

# `wait_port PORT LOG`: waits until something accepts TCP connections on
# 127.0.0.1:PORT; if nothing does within 5 s, shows LOG (the output of what
# should be listening) and fails.
wait_port() {
    local i
    for i in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    echo "bench.sh: nothing listens on 127.0.0.1:$1 after 5 s; $2 says:" >&2
    cat "$2" >&2
    return 1
}

"$LOADGEN_BIN" serve "${backend_threads[@]}" --listen "127.0.0.1:$BACKEND_A_PORT" --id a 2>"$WORK/backend-a.log" &
PIDS+=($!)
"$LOADGEN_BIN" serve "${backend_threads[@]}" --listen "127.0.0.1:$BACKEND_B_PORT" --id b 2>"$WORK/backend-b.log" &
PIDS+=($!)
wait_port "$BACKEND_A_PORT" "$WORK/backend-a.log"
wait_port "$BACKEND_B_PORT" "$WORK/backend-b.log"

ARMS=("direct http://127.0.0.1:$BACKEND_A_PORT/")

if [ "$WITH_HAPROXY" = 1 ]; then
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread $HAPROXY_THREADS
    # Far above the load here, and within a default 20000-descriptor limit.
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend bench
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend backends

backend backends
    balance leastconn
    server a 127.0.0.1:$BACKEND_A_PORT
    server b 127.0.0.1:$BACKEND_B_PORT
EOF
    "$HAPROXY" -c -q -f "$WORK/haproxy.cfg"
    "$HAPROXY" -f "$WORK/haproxy.cfg" -db 2>"$WORK/haproxy.log" &
    PIDS+=($!)
    wait_port "$HAPROXY_PORT" "$WORK/haproxy.log"
    ARMS+=("haproxy http://127.0.0.1:$HAPROXY_PORT/")
fi

if [ -n "$INGRESS_URL" ]; then
    ARMS+=("$INGRESS_NAME $INGRESS_URL")
fi

echo "# $(date -u +%Y-%m-%dT%H:%MZ)  $(nproc) CPUs  load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "# results: $RESULTS_DIR" >&2

# Runs are interleaved (run 1 of every arm, then run 2 ...) so that a change in
# the machine's background load falls on every arm alike.
for rate in $RATES; do
    for i in $(seq "$RUNS"); do
        for arm in "${ARMS[@]}"; do
            name=${arm%% *}
            url=${arm#* }
            echo "# open $rate/s  $name  run $i/$RUNS" >&2
            measure run "${loadgen_threads[@]}" --url "$url" --rate "$rate" \
                --duration "$DURATION" --warmup "$WARMUP" --connections "$CONNECTIONS" --json \
                >>"$RESULTS_DIR/$name-open-$rate.jsonl"
        done
    done
done
for i in $(seq "$MAX_RUNS"); do
    for arm in "${ARMS[@]}"; do
        name=${arm%% *}
        url=${arm#* }
        echo "# max  $name  run $i/$MAX_RUNS" >&2
        measure max "${loadgen_threads[@]}" --url "$url" \
            --duration "$MAX_DURATION" --warmup "$MAX_WARMUP" --connections "$CONNECTIONS" --json \
            >>"$RESULTS_DIR/$name-max.jsonl"
    done
done

echo "# done $(date -u +%Y-%m-%dT%H:%MZ)  load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo
table "$RESULTS_DIR"

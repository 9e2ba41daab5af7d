#!/usr/bin/env bash
# Live migration anchor: Podman 4.3's own checkpoint/restore of the SAME counter
# image NovaCron's migration bench moves (`novacron-counter:<hex>`, see
# tests/src/counter_image.rs and tests/src/bin/counter.rs), with downtime measured
# the way tests/src/bin/migrate_bench.rs measures it. The NovaCron side is
# `target/release/novacron-migrate-bench` (BENCHMARKS.md, "Live migration").
#
# What it does, all on this host, with root's Podman (`apt-get install -y podman`,
# Debian 12: 4.3.1, OCI runtime runc):
#   1. Takes the newest `novacron-counter:<16 hex>` image from Docker daemon A
#      (DOCKER_HOST=$NOVACRON_CKPT_DOCKER_A; or --image TAG) and moves it with
#      `docker save` | `podman load` (skipped, and the image kept at the end, when
#      Podman already has it). It never builds the image: when daemon A has none it
#      says to run `cargo nextest run -p novacron-tests --test migrate` once.
#   2. Puts the directory of $NOVACRON_CKPT_CRIU (the CRIU 4.2.1 wrapper) first on
#      PATH: runc (and Podman's CRIU version check) run `criu` from PATH, and
#      Debian's criu 3.17 does not work on this kernel. Checks that Podman's OCI
#      runtime is runc.
#   3. Per size (--sizes, MiB of BALLAST_MB: incompressible in-memory ballast):
#      `podman run -d` the image (BALLAST_MB=size, 127.0.0.1:<free port> -> 8080,
#      `--ulimit nofile=4096:4096 --ulimit nproc=4096:4096`: Podman's default
#      rlimits are refused in this sandbox, "error setting rlimit type 7"), waits
#      for /health (120 s), `GET /` 5 times (answers 1..5), reads /ballast. Then
#      --runs times, on the same container (as the NovaCron bench migrates one
#      allocation a->b->a...):
#      - a poller (inline python3) GETs /count every 5 ms, 250 ms timeout per
#        request, a new connection each (as migrate_bench.rs does), and records the
#        time of every successful answer; it starts, answers once, then 300 ms pass;
#      - t0; `podman container checkpoint --export=TAR --print-stats CTR` (CRIU
#        dumps, the container stops); `podman rm CTR`; `podman container restore
#        --import=TAR --print-stats` (the container comes back under its name with
#        its port publishing, from the archive); done;
#      - waits for /health (120 s) and for a poller answer after `done` (30 s),
#        100 ms more, stops the poller;
#      - downtime = the largest gap between consecutive successful /count answers
#        with the later one after t0 and the earlier one before done + 1 s (the
#        NovaCron bench's rule, its t0 being the migrate request and its done the
#        phase `completed`);
#      - checks: every poller answer was the count of before (5); /count after ==
#        before (the counter did not restart); /ballast unchanged; the data file
#        /data/count.log inside the container still reads 1..5 (rootfs diff).
#      One line per run: downtime, checkpoint/rm/restore wall times (with the OCI
#      runtime's share from --print-stats), restore-to-health, export size, polls.
#   4. A markdown table per size of the medians over the runs.
# Cleanup (at the end, on error and on Ctrl-C): the bench's containers, the image
# if this script loaded it, the archives and its work directory (under /var/tmp).
#
# Choices, and why:
#   - A polled container's dump fails without CRIU's `skip-in-flight`: the poller's
#     connections sit in the listener's accept queue at the freeze ("inet:
#     In-flight connection (l) ... can be ignored with the --skip-in-flight
#     option"; reproduced 3/3, checkpoint rc 125). `podman container checkpoint
#     --tcp-established` does not help (same error, 3/3), so this script does not
#     use it. What works is runc's CRIU configuration file /etc/criu/runc.conf with
#     the lines `tcp-close` and `skip-in-flight` (what NovaCron's CI and
#     packaging/checkpoint/setup-criu-docker.sh set): dump.log then says "Parsing
#     config file /etc/criu/runc.conf", "Will skip in-flight TCP connections",
#     "Will drop all TCP connections on restore". The script checks the file and
#     creates it, or appends the missing lines, saying so (and leaves it: the
#     NovaCron side needs it too). Without a poller no option is needed.
#   - No volume: the image declares VOLUME /data; `--image-volume ignore` keeps
#     /data in the container's rootfs, so the archive carries it as rootfs diff
#     (a few bytes) and no anonymous volume is created or exported. NovaCron's job
#     has a named volume that it copies; it holds a few bytes here too.
#   - Archive compression: Podman's default, zstd (`--compress`), as NovaCron's
#     bundle is zstd; the ballast is pseudo-random, so it does not shrink.
#   - Podman's whole checkpoint and restore run on this one host from one local
#     archive: no transfer, no second copy. It is the floor of "checkpoint to a
#     file, restore from it" through a container engine.
#
# Usage: bash tests/bench/migrate-podman.sh [--sizes 64,256] [--runs 3]
#          [--image novacron-counter:TAG] [--compress zstd|gzip|none]
#   --sizes LIST   ballast sizes in MiB, comma-separated (default 64,256)
#   --dirty-mb N   a region of N MiB the counter rewrites at 4 MiB/s (default 0)
#   --disk-mb N    a file of N MiB the counter writes into its writable layer at
#                  start (DISK_MB; default 0); /disk (length, sum) is checked
#   --runs N       checkpoint/restore rounds per size (default 3)
#   --image REF    the counter image on daemon A (default: the newest
#                  novacron-counter:<16 hex> there)
#   --compress C   archive compression (default zstd, Podman's default)
# Needs root, podman (apt-get install -y podman), docker, python3, curl, and
# /var/tmp/novacron-ckpt/env (packaging/checkpoint/setup-criu-docker.sh).
set -euo pipefail

SIZES=64,256
RUNS=3
IMAGE=
COMPRESS=zstd
DIRTY_MB=0
DISK_MB=0
POLL_MS=5
HEALTH_S=120
while [ $# -gt 0 ]; do
  case $1 in
    --sizes) SIZES=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --image) IMAGE=$2; shift 2 ;;
    --compress) COMPRESS=$2; shift 2 ;;
    --dirty-mb) DIRTY_MB=$2; shift 2 ;;
    --disk-mb) DISK_MB=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
die() { echo "migrate-podman: $*" >&2; exit 1; }
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer, got '$RUNS'"
[[ $SIZES =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--sizes must be MiB, comma-separated, got '$SIZES'"
[[ $DIRTY_MB =~ ^[0-9]+$ ]] || die "--dirty-mb must be MiB, got '$DIRTY_MB'"
[[ $DISK_MB =~ ^[0-9]+$ ]] || die "--disk-mb must be MiB, got '$DISK_MB'"
case $COMPRESS in zstd|gzip|none) ;; *) die "--compress: zstd, gzip or none" ;; esac
IFS=, read -r -a SIZE_LIST <<<"$SIZES"

[ "$(id -u)" = 0 ] || die "needs root (CRIU)"
for tool in podman docker python3 curl; do
  command -v "$tool" >/dev/null || die "$tool is missing$([ "$tool" = podman ] && echo ' (apt-get install -y podman)')"
done
if [ -z "${NOVACRON_CKPT_DOCKER_A:-}" ] || [ -z "${NOVACRON_CKPT_CRIU:-}" ]; then
  [ -r /var/tmp/novacron-ckpt/env ] || die "NOVACRON_CKPT_DOCKER_A/NOVACRON_CKPT_CRIU unset and no /var/tmp/novacron-ckpt/env (run packaging/checkpoint/setup-criu-docker.sh)"
  set -a; . /var/tmp/novacron-ckpt/env; set +a
fi
[ -x "$NOVACRON_CKPT_CRIU" ] || die "no CRIU at $NOVACRON_CKPT_CRIU"
# runc and go-criu run `criu` from PATH: the wrapper's directory goes first.
CRIU_DIR=$(dirname "$NOVACRON_CKPT_CRIU")
export PATH="$CRIU_DIR:$PATH"
[ "$(command -v criu)" = "$CRIU_DIR/criu" ] || die "criu on PATH is $(command -v criu), not $CRIU_DIR/criu"

now_us() { local t=${EPOCHREALTIME/[.,]/}; echo "${t}"; }
ms_since() { echo $(( ($(now_us) - $1) / 1000 )); }

# --- State for cleanup -------------------------------------------------------
WORK=$(mktemp -d /var/tmp/novacron-podbench.XXXXXX)
CONTAINERS=()
LOADED_IMAGE=
POLLER_PID=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$POLLER_PID" ]; then
    kill "$POLLER_PID" 2>/dev/null || true
    wait "$POLLER_PID" 2>/dev/null || true
  fi
  for c in "${CONTAINERS[@]}"; do
    timeout 60 podman rm -f -t 0 "$c" >/dev/null 2>&1 || true
  done
  if [ -n "$LOADED_IMAGE" ]; then
    timeout 60 podman rmi -f "$LOADED_IMAGE" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  [ $rc = 0 ] || echo "migrate-podman: failed (rc $rc); cleaned up containers, image and archives" >&2
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "# migrate-podman: $(date -u +%FT%TZ) on $(hostname), $(nproc) CPUs"
echo "# uptime before: $(uptime)"

# --- Podman, runtime, CRIU -----------------------------------------------------
RUNTIME=$(podman info --format '{{.Host.OCIRuntime.Name}}')
[ "$RUNTIME" = runc ] || die "Podman's OCI runtime is $RUNTIME; this bench relies on runc (and /etc/criu/runc.conf)"
NETBACKEND=$(podman info --format '{{.Host.NetworkBackend}}' 2>/dev/null || echo '?')
echo "# $(podman --version), runtime $RUNTIME ($(runc --version | head -n1)), network $NETBACKEND"
echo "# criu: $(command -v criu) -> $(criu --version | head -n1)"

CONF=/etc/criu/runc.conf
if [ ! -e "$CONF" ]; then
  mkdir -p /etc/criu
  printf 'tcp-close\nskip-in-flight\n' >"$CONF"
  echo "# $CONF did not exist: created it with tcp-close and skip-in-flight (left in place)"
else
  added=
  for opt in tcp-close skip-in-flight; do
    if ! grep -qE "^[[:space:]]*(--)?$opt[[:space:]]*$" "$CONF"; then
      echo "$opt" >>"$CONF"
      added="$added $opt"
    fi
  done
  if [ -n "$added" ]; then
    echo "# $CONF existed without:$added; appended (left in place)"
  else
    echo "# $CONF exists already with tcp-close and skip-in-flight (unchanged)"
  fi
fi

# --- The image ---------------------------------------------------------------------
if [ -z "$IMAGE" ]; then
  # `docker images` lists the newest first.
  IMAGE=$(DOCKER_HOST=$NOVACRON_CKPT_DOCKER_A docker images --format '{{.Repository}}:{{.Tag}}' novacron-counter \
    | grep -E '^novacron-counter:[0-9a-f]{16}$' | head -n1 || true)
  [ -n "$IMAGE" ] || die "no novacron-counter:<hex> image on daemon A ($NOVACRON_CKPT_DOCKER_A): run \`cargo nextest run -p novacron-tests --test migrate\` once (it builds the image there), then run this again"
fi
IMAGE_ID=$(DOCKER_HOST=$NOVACRON_CKPT_DOCKER_A docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null) \
  || die "no image $IMAGE on daemon A ($NOVACRON_CKPT_DOCKER_A): run \`cargo nextest run -p novacron-tests --test migrate\` once"
PIMAGE=localhost/$IMAGE
if podman image exists "$PIMAGE"; then
  echo "# image: $IMAGE (${IMAGE_ID:7:12}), already in Podman's storage (kept)"
else
  t=$(now_us)
  DOCKER_HOST=$NOVACRON_CKPT_DOCKER_A timeout 300 docker save -o "$WORK/image.tar" "$IMAGE"
  timeout 300 podman load -q -i "$WORK/image.tar" >/dev/null
  rm -f "$WORK/image.tar"
  LOADED_IMAGE=$PIMAGE
  podman image exists "$PIMAGE" || die "podman load did not give $PIMAGE"
  echo "# image: $IMAGE (${IMAGE_ID:7:12}), docker save | podman load in $(ms_since "$t") ms (removed at the end)"
fi
echo "# compression $COMPRESS, poller every ${POLL_MS} ms (250 ms timeout), no volume (--image-volume ignore)"

# --- Helpers -----------------------------------------------------------------------
cat >"$WORK/poller.py" <<'EOF'
# GET /count every PERIOD (a new connection each, 250 ms per request), like
# migrate_bench.rs's poller; one line "<unix us> <body>" per successful answer,
# flushed at once; stops when STOPFILE exists or after CAP s.
import os, socket, sys, time
port, want, out, stopf, period_ms, cap = sys.argv[1:7]
port, period, cap = int(port), int(period_ms) / 1000.0, float(cap)
timeout = 0.25
req = b"GET /count HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
def get():
    deadline = time.monotonic() + timeout
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(req)
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            s.settimeout(left)
            d = s.recv(4096)
            if not d:
                break
            buf += d
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(head[:40])
    return body.decode(errors="replace")
failed = wrong = 0
start = time.monotonic()
nxt = start
with open(out, "w", buffering=1) as f:
    while not os.path.exists(stopf) and time.monotonic() - start < cap:
        now = time.monotonic()
        if now < nxt:
            time.sleep(nxt - now)
            now = nxt
        nxt = now + period  # a late tick fires at once, the next one a period later
        try:
            body = get()
        except Exception:
            failed += 1
            continue
        t = time.time_ns() // 1000
        if body != want:
            wrong += 1
        f.write(f"{t} {body}\n")
    f.write(f"# failed {failed} wrong {wrong}\n")
EOF
cat >"$WORK/gap.py" <<'EOF'
# Downtime as migrate_bench.rs computes it: the largest gap between consecutive
# successful answers whose later one is after t0 and earlier one before done + 1 s.
# Prints: downtime_ms oks failed wrong answered_after_done(0/1)
import sys
path, t0, done = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
oks, failed, wrong, bad = [], -1, -1, []
want = sys.argv[4]
for line in open(path):
    if line.startswith("# failed"):
        p = line.split()
        failed, wrong = int(p[2]), int(p[4])
        continue
    t, _, body = line.rstrip("\n").partition(" ")
    oks.append(int(t))
    if body != want:
        bad.append(body)
gap = 0
for a, b in zip(oks, oks[1:]):
    if b > t0 and a < done + 1_000_000:
        gap = max(gap, b - a)
after = int(any(t > done for t in oks))
print(f"{gap / 1000:.1f} {len(oks)} {failed} {len(bad)} {after}")
EOF

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
get() { # get PORT PATH [TIMEOUT_S]
  curl -fsS --max-time "${3:-5}" "http://127.0.0.1:$1$2"
}
wait_health() { # wait_health CTR PORT: ms until /health says ok; fails after HEALTH_S
  local start deadline
  start=$(now_us); deadline=$(( start + HEALTH_S * 1000000 ))
  while [ "$(now_us)" -lt "$deadline" ]; do
    if [ "$(get "$2" /health 2 2>/dev/null || true)" = ok ]; then
      ms_since "$start"; return 0
    fi
    if [ "$(podman inspect -f '{{.State.Status}}' "$1" 2>/dev/null || echo gone)" != running ]; then
      podman logs --tail 20 "$1" >&2 2>/dev/null || true
      die "container $1 is not running while waiting for /health"
    fi
    sleep 0.05
  done
  die "no /health from $1 on port $2 after ${HEALTH_S} s"
}
stop_poller() {
  touch "$WORK/stop"
  local i
  for i in $(seq 1 100); do   # the poller checks the stop file at least every 255 ms
    kill -0 "$POLLER_PID" 2>/dev/null || break
    sleep 0.05
  done
  kill "$POLLER_PID" 2>/dev/null || true
  wait "$POLLER_PID" 2>/dev/null || true
  POLLER_PID=
}
json_field() { # json_field FILE KEY: first numeric value of KEY anywhere in FILE's JSON
  python3 - "$1" "$2" <<'EOF'
import json, sys
def find(o, k):
    if isinstance(o, dict):
        if k in o: return o[k]
        o = list(o.values())
    if isinstance(o, list):
        for v in o:
            r = find(v, k)
            if r is not None: return r
    return None
try:
    v = find(json.load(open(sys.argv[1])), sys.argv[2])
except Exception:
    v = None
print("?" if v is None else v)
EOF
}
median() { # median of the arguments
  printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {if (NR==0) {print "?"} else if (NR%2) {print v[(NR+1)/2]} else {printf "%.1f\n", (v[NR/2]+v[NR/2+1])/2}}'
}
us_to_ms() { awk -v u="$1" 'BEGIN { if (u ~ /^[0-9]+$/) printf "%d", u/1000; else print "?" }'; }

GRAPHROOT=$(podman info --format '{{.Store.GraphRoot}}')
case $COMPRESS in zstd) EXT=tar.zst ;; gzip) EXT=tar.gz ;; none) EXT=tar ;; esac
SUMMARY=()

# --- The runs ------------------------------------------------------------------
for size in "${SIZE_LIST[@]}"; do
  name=novacron-podbench-$$-$size
  port=$(free_port)
  CONTAINERS+=("$name")
  timeout 120 podman run -d --name "$name" --label novacron.podbench=1 \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    --image-volume ignore -e BALLAST_MB="$size" -e DIRTY_MB="$DIRTY_MB" -e DISK_MB="$DISK_MB" \
    -p "127.0.0.1:$port:8080" "$PIMAGE" >/dev/null
  health_ms=$(wait_health "$name" "$port")
  for n in 1 2 3 4 5; do
    got=$(get "$port" /)
    [ "$got" = "$n" ] || die "GET / answered '$got', want $n (a fresh container)"
  done
  before=$(get "$port" /count)
  ballast=$(get "$port" /ballast 30)
  disk=$(get "$port" /disk 60)
  echo "## $size MiB: container $name on 127.0.0.1:$port, healthy after $health_ms ms, count $before, ballast checksum $ballast"
  downs=(); ckpts=(); rests=(); mbs=()
  for run in $(seq 1 "$RUNS"); do
    tar=$WORK/ckpt-$size-$run.$EXT
    id=$(podman inspect -f '{{.Id}}' "$name")
    rm -f "$WORK/stop" "$WORK/polls"
    python3 "$WORK/poller.py" "$port" "$before" "$WORK/polls" "$WORK/stop" "$POLL_MS" 900 &
    POLLER_PID=$!
    # The poller answers once, then 300 ms pass (as migrate_bench.rs waits).
    for i in $(seq 1 200); do [ -s "$WORK/polls" ] && break; sleep 0.05; done
    [ -s "$WORK/polls" ] || die "the poller got no answer in 10 s"
    sleep 0.3

    t0=$(now_us)
    if ! timeout 600 podman container checkpoint --export="$tar" --compress "$COMPRESS" --print-stats "$name" >"$WORK/ckpt.json" 2>"$WORK/ckpt.err"; then
      cat "$WORK/ckpt.err" >&2
      grep 'Error (' "$GRAPHROOT/overlay-containers/$id/userdata/dump.log" 2>/dev/null | grep -v RLIMIT >&2 || true
      die "checkpoint of $name failed"
    fi
    t1=$(now_us)
    timeout 120 podman rm "$name" >/dev/null
    t2=$(now_us)
    if ! timeout 600 podman container restore --import="$tar" --print-stats >"$WORK/rest.json" 2>"$WORK/rest.err"; then
      cat "$WORK/rest.err" >&2
      die "restore of $name from $tar failed"
    fi
    done_at=$(now_us)
    ckpt_ms=$(( (t1 - t0) / 1000 )); rm_ms=$(( (t2 - t1) / 1000 )); rest_ms=$(( (done_at - t2) / 1000 ))
    to_health=$(wait_health "$name" "$port")
    # A poller answer after the restore closes the gap (30 s), then 100 ms more.
    for i in $(seq 1 600); do
      last=$(grep -v "^#" "$WORK/polls" | tail -n1 | cut -d" " -f1 || true)
      [ -n "$last" ] && [ "$last" -gt "$done_at" ] && break
      sleep 0.05
    done
    sleep 0.1
    stop_poller
    read -r down oks failed wrong after < <(python3 "$WORK/gap.py" "$WORK/polls" "$t0" "$done_at" "$before")
    [ "$after" = 1 ] || die "run $run: the poller got no answer in 30 s after the restore"
    [ "$wrong" = 0 ] || die "run $run: $wrong poller answers were not $before (the counter restarted?)"
    count=$(get "$port" /count)
    [ "$count" = "$before" ] || die "run $run: /count is $count after the restore, $before before"
    ballast_after=$(get "$port" /ballast 30)
    [ "$ballast_after" = "$ballast" ] || die "run $run: /ballast is $ballast_after after the restore, $ballast before"
    disk_after=$(get "$port" /disk 60)
    [ "$disk_after" = "$disk" ] || die "run $run: /disk is $disk_after after the restore, $disk before"
    log=$(timeout 30 podman exec "$name" cat /data/count.log | tr '\n' ' ')
    [ "$log" = "1 2 3 4 5 " ] || die "run $run: /data/count.log reads '$log', want 1..5"
    bytes=$(stat -c %s "$tar")
    mb=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1e6 }')
    ck_rt=$(us_to_ms "$(json_field "$WORK/ckpt.json" runtime_checkpoint_duration)")
    frozen=$(us_to_ms "$(json_field "$WORK/ckpt.json" frozen_time)")
    rs_rt=$(us_to_ms "$(json_field "$WORK/rest.json" runtime_restore_duration)")
    echo "run $run/$RUNS size $size MiB: downtime $down ms | checkpoint $ckpt_ms ms (runc $ck_rt, CRIU frozen $frozen) | rm $rm_ms ms | restore $rest_ms ms (runc $rs_rt) | restore->health $to_health ms | export $mb MB | polls ok $oks failed $failed | count $before->$count, ballast same, count.log 1..5"
    downs+=("$down"); ckpts+=("$ckpt_ms"); rests+=("$rest_ms"); mbs+=("$mb")
    rm -f "$tar"
  done
  timeout 60 podman rm -f -t 0 "$name" >/dev/null
  SUMMARY+=("| $size MiB | $RUNS | $(median "${downs[@]}") ms | $(median "${ckpts[@]}") ms | $(median "${rests[@]}") ms | $(median "${mbs[@]}") |")
done

echo
echo "Podman $(podman version --format '{{.Client.Version}}') checkpoint --export / rm / restore --import, runc + CRIU $(criu --version | sed -n 's/^Version: //p' | head -n1), compression $COMPRESS, $(nproc) CPUs"
echo
echo "| size | runs | downtime median | checkpoint median | restore median | export MB |"
echo "|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "# uptime after: $(uptime)"

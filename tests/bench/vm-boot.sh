#!/usr/bin/env bash
# Virtual machines (issue 21): how long a NovaCron VM job takes to answer, how long
# it takes to stop, and what its QEMU costs in memory, against the same guest
# booted by hand with plain QEMU (packaging/vm/boot-test.sh, the anchor).
#
# What it does, all on this host:
#   1. Anchor: `packaging/vm/boot-test.sh` N times (plain QEMU launch -> /health,
#      its own 50 ms poll), then N plain launches with boot-test.sh's command line
#      from this script (the same poll as the NovaCron runs below), each held for
#      --settle seconds after /health to read QEMU's memory, then quit over QMP.
#   2. NovaCron: a private controller (`novacron-controller init` + `serve` on a
#      free loopback port, embedded store) and one agent (`novacron-agent join` +
#      `run`), from copies of the binaries taken at the start. Then 1 + N times:
#      `novacron apply -f` a one-replica VM job (256 MiB, 1 vCPU, the tiny guest
#      `novacron/guest-tiny:1`), time apply-returned -> `curl /health` says `ok`
#      (and apply-returned -> QEMU's pid file), hold --settle seconds, read QEMU's
#      and the agent's memory, then `novacron job stop` and time it until the QEMU
#      process is gone. Run 1 is the cold one (the agent probes KVM and copies the
#      kernel and initrd out of the image); runs 2..N+1 are the warm ones that
#      the medians are taken over.
# Memory: VmRSS (/proc/PID/status) and Pss (/proc/PID/smaps_rollup); from
# /proc/PID/smaps, the guest-RAM mapping (the anonymous mapping of exactly the
# guest's memory size) and TCG's translation buffer (the anonymous executable
# mapping) are split out; "rest" is what is left: QEMU's own heap, the loaded
# kernel/initrd copies, its binary and libraries.
#
# Before each timed run it waits (at most --idle-wait s) for the host to be idle
# (< 15 % busy over 3 s) and records how busy it was and whether a compiler
# (rustc, cargo, cc1, ld) was running at the start or end of the run.
#
# Usage: bash tests/bench/vm-boot.sh [--runs N] [--settle S] [--idle-wait S]
#                                    [--bin-dir DIR] [--keep DIR]
#   --runs N       timed runs of each kind (default 5; NovaCron does 1 cold + N warm)
#   --settle S     seconds to hold a booted guest before reading memory (default 5)
#   --idle-wait S  how long to wait for an idle host before each run (default 120)
#   --bin-dir DIR  where novacron, novacron-controller, novacron-agent are
#                  (default target/debug; copied to a private directory first)
#   --keep DIR     work in DIR and keep it (logs, state) instead of a temp dir
# Prints a table and one JSON line. Guests run under TCG here (nested KVM cannot
# boot them; the agent's probe finds that out).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=5
SETTLE=5
IDLE_WAIT=120
BIN_DIR=$ROOT/target/debug
KEEP=
IMAGE=novacron/guest-tiny:1
MEM_MIB=256
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --settle) SETTLE=$2; shift 2 ;;
    --idle-wait) IDLE_WAIT=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 64 ;;
  esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "error: --runs needs a positive integer" >&2; exit 64; }

die() { echo "error: $*" >&2; exit 1; }

# ---- preflight: fail with what to run --------------------------------------
command -v qemu-system-x86_64 >/dev/null ||
  die "qemu-system-x86_64 is missing: run \`bash .ci/setup vm\`"
for tool in socat curl docker ss awk; do
  command -v "$tool" >/dev/null || die "$tool is missing: run \`bash .ci/setup vm\`"
done
docker image inspect "$IMAGE" >/dev/null 2>&1 ||
  die "the guest image $IMAGE is missing (or Docker does not answer): run \`bash .ci/setup vm\`"
VMCACHE=${NOVACRON_VM_CACHE:-/var/tmp/novacron-vm}
GUEST=$(readlink -f "$VMCACHE/current" 2>/dev/null || true)
{ [ -n "$GUEST" ] && [ -f "$GUEST/vmlinuz" ] && [ -f "$GUEST/initrd.img" ]; } ||
  die "no guest build in $VMCACHE (the plain-QEMU anchor boots it): run \`bash .ci/setup vm\`"
for b in novacron novacron-controller novacron-agent; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing: run \`cargo build --workspace --bins\`"
done

# ---- work directory, copies of the binaries, cleanup -------------------------
if [ -n "$KEEP" ]; then mkdir -p "$KEEP"; W=$(cd "$KEEP" && pwd); else W=$(mktemp -d /tmp/vmbench.XXXXXX); fi
BIN=$W/bin
mkdir -p "$BIN"
for b in novacron novacron-controller novacron-agent; do cp "$BIN_DIR/$b" "$BIN/$b"; done

CTL_PID=
AGENT_PID=
PLAIN_PID=
STATE=$W/agent
CLI_CFG=$W/cli-config.toml
cleanup() {
  local rc=$?
  set +e
  # VMs the agent started outlive it (QEMU daemonizes): quit them by their pid files.
  local p
  for f in "$STATE"/vms/vm-*/qemu.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f" 2>/dev/null)
    [ -n "$p" ] && grep -q qemu "/proc/$p/comm" 2>/dev/null && kill "$p"
  done
  [ -n "$PLAIN_PID" ] && grep -q qemu "/proc/$PLAIN_PID/comm" 2>/dev/null && kill "$PLAIN_PID"
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null
  [ -n "$CTL_PID" ] && kill "$CTL_PID" 2>/dev/null
  for p in $AGENT_PID $CTL_PID; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  wait 2>/dev/null
  if [ -z "$KEEP" ]; then
    if [ "$rc" -ne 0 ]; then echo "work directory kept for inspection: $W" >&2; else rm -rf "$W"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- helpers -----------------------------------------------------------------
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a - b}'; }
alive() { # a process that exists and is not a zombie
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
free_port() { # a port free on loopback for both TCP and UDP
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 30000))
    if [ -z "$(ss -Htaun "( sport = :$p )" 2>/dev/null)" ]; then echo "$p"; return; fi
  done
  die "no free port found"
}
cpu_jiffies() { awk '/^cpu /{b=$2+$3+$4+$7+$8+$9; t=b+$5+$6; print b, t}' /proc/stat; }
host_busy() { # host busy %, both cores, over $1 seconds
  local b1 t1 b2 t2
  read -r b1 t1 < <(cpu_jiffies); sleep "$1"; read -r b2 t2 < <(cpu_jiffies)
  awk -v b="$((b2 - b1))" -v t="$((t2 - t1))" 'BEGIN{printf "%.0f", t ? 100 * b / t : 0}'
}
compiling() { # 1 when a compiler or cargo runs on this host
  local c
  for c in rustc cargo cc1 ld ld.lld; do pgrep -x "$c" >/dev/null && { echo 1; return; }; done
  echo 0
}
BUSY_BEFORE=0
wait_idle() { # sets BUSY_BEFORE; waits at most IDLE_WAIT s for < 15 % over 3 s
  local start
  start=$(date +%s)
  while :; do
    BUSY_BEFORE=$(host_busy 3)
    [ "$BUSY_BEFORE" -lt 15 ] && return
    if [ $(($(date +%s) - start)) -ge "$IDLE_WAIT" ]; then
      echo "  (host still ${BUSY_BEFORE}% busy after ${IDLE_WAIT}s; running anyway)" >&2
      return
    fi
  done
}
kb_of() { awk -v k="$2:" '$1 == k {print $2; exit}' "$1" 2>/dev/null || true; }
mem_of() { # PID -> "rss pss ram_rss tcg_rss rest_rss rest_pss" in kB
  local pid=$1 rss pss
  rss=$(kb_of "/proc/$pid/status" VmRSS)
  pss=$(kb_of "/proc/$pid/smaps_rollup" Pss)
  awk -v mem_kb="$((MEM_MIB * 1024))" -v rss="$rss" -v pss="$pss" '
    /^[0-9a-f]+-[0-9a-f]+ / { anon = (NF == 5); perms = $2; kind = ""; next }
    /^Size:/ { kind = "";
               if (anon && $2 == mem_kb) kind = "ram";
               else if (anon && perms ~ /x/ && $2 >= 65536) kind = "tcg"; next }
    /^Rss:/ { if (kind == "ram") rr += $2; if (kind == "tcg") tr += $2; next }
    /^Pss:/ { if (kind == "ram") rp += $2; if (kind == "tcg") tp += $2; next }
    END { printf "%d %d %d %d %d %d\n", rss, pss, rr, tr, rss - rr - tr, pss - rp - tp }
  ' "/proc/$pid/smaps"
}
proc_jiffies() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
qmp() { # SOCKET JSON
  printf '{"execute":"qmp_capabilities"}\n%s\n' "$2" | socat -t 1 - "UNIX-CONNECT:$1" >/dev/null 2>&1 || true
}
median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{a[NR]=$1} END{ if (!NR) {print "-"; exit}
  if (NR % 2) print a[(NR+1)/2]; else printf "%.2f\n", (a[NR/2] + a[NR/2+1]) / 2 }'; }
minmax() { tr ' ' '\n' | awk 'NF' | sort -g | awk 'NR==1{lo=$1} {hi=$1} END{ if (NR) printf "%s-%s", lo, hi; else print "-" }'; }
mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k / 1024}'; }

echo "== vm-boot bench: $RUNS runs, settle ${SETTLE}s, work dir $W"
echo "   $(date -u '+%Y-%m-%d %H:%M:%S UTC'), nproc $(nproc), kernel $(uname -r), $(qemu-system-x86_64 --version | head -1)"
echo "   binaries from $BIN_DIR: $("$BIN/novacron" --version 2>/dev/null | head -1)"

# ---- 1a. anchor: packaging/vm/boot-test.sh -----------------------------------
declare -a BT_HEALTH=() BT_READY=() BT_BUSY=() BT_CC=()
for i in $(seq "$RUNS"); do
  wait_idle
  cc0=$(compiling)
  port=$(free_port)
  out=$(bash "$ROOT/packaging/vm/boot-test.sh" --port "$port" 2>&1) ||
    { echo "$out" >&2; die "packaging/vm/boot-test.sh failed (run $i)"; }
  line=$(echo "$out" | grep '^OK ' | tail -1)
  h=$(echo "$line" | sed -n 's/.* health_s=\([0-9.]*\).*/\1/p')
  r=$(echo "$line" | sed -n 's/.* ready_s=\([0-9.]*\).*/\1/p')
  cc=$(( cc0 | $(compiling) ))
  BT_HEALTH+=("$h"); BT_READY+=("$r"); BT_BUSY+=("$BUSY_BEFORE"); BT_CC+=("$cc")
  echo "boot-test.sh $i: launch->ready ${r}s, launch->/health ${h}s (host ${BUSY_BEFORE}% busy before, compiler running: $cc)"
done

# ---- 1b. plain QEMU with boot-test.sh's command line, held for memory ---------
declare -a PL_HEALTH=() PL_MEM=() PL_BUSY=() PL_CC=()
APPEND=$(sed -n 's/.*"cmdline":"\([^"]*\)".*/\1/p' "$GUEST/novacron-vm.json")
for i in $(seq "$RUNS"); do
  wait_idle
  cc0=$(compiling)
  d=$W/plain-$i
  mkdir -p "$d"
  port=$(free_port)
  start=$(now)
  qemu-system-x86_64 -accel tcg -M q35 -m "$MEM_MIB" -smp 1 \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.img" -append "$APPEND novacron.hostname=plain-$i" \
    -nodefaults -no-user-config -display none -serial "file:$d/console.log" \
    -qmp "unix:$d/qmp.sock,server=on,wait=off" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:8080" -device virtio-net-pci,netdev=n0 \
    -daemonize -pidfile "$d/qemu.pid"
  PLAIN_PID=$(cat "$d/qemu.pid")
  h=
  deadline=$(($(date +%s) + 90))
  while [ -z "$h" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "plain QEMU $i: no /health within 90 s (console: $d/console.log)"
    alive "$PLAIN_PID" || die "plain QEMU $i exited (console: $d/console.log)"
    [ "$(curl -s -m 1 "http://127.0.0.1:$port/health" 2>/dev/null)" = ok ] && h=$(sub "$(now)" "$start")
    [ -n "$h" ] || sleep 0.05
  done
  sleep "$SETTLE"
  m=$(mem_of "$PLAIN_PID")
  qmp "$d/qmp.sock" '{"execute":"quit"}'
  for _ in $(seq 100); do alive "$PLAIN_PID" || break; sleep 0.05; done
  alive "$PLAIN_PID" && { kill "$PLAIN_PID"; sleep 0.5; }
  PLAIN_PID=
  cc=$(( cc0 | $(compiling) ))
  PL_HEALTH+=("$h"); PL_MEM+=("$m"); PL_BUSY+=("$BUSY_BEFORE"); PL_CC+=("$cc")
  read -r rss pss rr tr rest _ <<<"$m"
  echo "plain qemu $i: launch->/health ${h}s; after ${SETTLE}s: RSS $(mib "$rss") MiB, PSS $(mib "$pss") MiB (guest RAM $(mib "$rr"), TCG buffer $(mib "$tr"), rest $(mib "$rest") MiB)"
done

# ---- 2. NovaCron: controller + agent -----------------------------------------
CPORT=$(free_port)
"$BIN/novacron-controller" --data-dir "$W/controller" init --server-name localhost --server-name 127.0.0.1 >"$W/init.out" 2>&1 ||
  { cat "$W/init.out" >&2; die "novacron-controller init failed"; }
FP=$(grep -o 'sha256:[0-9a-f]*' "$W/init.out" | head -1)
[ -n "$FP" ] || die "novacron-controller init printed no fingerprint: $(cat "$W/init.out")"
RUST_LOG=info "$BIN/novacron-controller" --data-dir "$W/controller" serve \
  --api-listen "127.0.0.1:$CPORT" --quic-listen "127.0.0.1:$CPORT" --server-name 127.0.0.1 \
  >/dev/null 2>"$W/controller.log" &
CTL_PID=$!
PKI=$W/controller/pki
cat >"$CLI_CFG" <<EOF
current = "bench"

[contexts.bench]
api = "https://127.0.0.1:$CPORT"
ca = "$PKI/ca.pem"
cert = "$PKI/admin.pem"
key = "$PKI/admin-key.pem"
EOF
cli() { "$BIN/novacron" --config "$CLI_CFG" "$@"; }
api() { curl -sf -m 5 --cacert "$PKI/ca.pem" --cert "$PKI/admin.pem" --key "$PKI/admin-key.pem" "https://127.0.0.1:$CPORT$1"; }
for _ in $(seq 200); do api /healthz >/dev/null 2>&1 && break; kill -0 "$CTL_PID" 2>/dev/null || break; sleep 0.1; done
api /healthz >/dev/null 2>&1 || { tail -n 30 "$W/controller.log" >&2; die "the controller's API did not answer within 20 s"; }

TOKEN=$("$BIN/novacron-controller" --data-dir "$W/controller" token create --quiet --uses 1) ||
  die "token create failed"
"$BIN/novacron-agent" join --controller "https://127.0.0.1:$CPORT" --token "$TOKEN" \
  --ca-fingerprint "$FP" --name vmbench --state-dir "$STATE" >"$W/join.out" 2>&1 ||
  { cat "$W/join.out" >&2; die "novacron-agent join failed"; }
RUST_LOG=info "$BIN/novacron-agent" run --state-dir "$STATE" --publish-address 127.0.0.1 \
  >/dev/null 2>"$W/agent.log" &
AGENT_PID=$!
ready=0
for _ in $(seq 300); do
  if api /v1/nodes/vmbench 2>/dev/null | grep -q '"status": *"ready"'; then ready=1; break; fi
  kill -0 "$AGENT_PID" 2>/dev/null || break
  sleep 0.1
done
[ "$ready" = 1 ] || { tail -n 30 "$W/agent.log" >&2; die "node vmbench not ready within 30 s"; }
api /v1/nodes/vmbench | grep -q '"vm"' || die "the node reports no VM capability (see $W/agent.log)"
sleep "$SETTLE"
AGENT_RSS0=$(kb_of "/proc/$AGENT_PID/status" VmRSS)
echo "controller :$CPORT and agent up; agent RSS before any VM: $(mib "$AGENT_RSS0") MiB"

vm_pid() { # the pid of the live QEMU of the agent's VM, if any
  local f p
  for f in "$STATE"/vms/vm-*/qemu.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f" 2>/dev/null) || continue
    [ -n "$p" ] && alive "$p" && { echo "$p"; return; }
  done
  return 0
}

declare -a NC_APPLY=() NC_PID=() NC_HEALTH=() NC_STOP=() NC_MEM=() NC_AGENT=() NC_AGENT_AFTER=() NC_BUSY=() NC_CC=() NC_OTHER=()
TOTAL=$((RUNS + 1))
QEMU_CMDLINE=
ACCEL=
for i in $(seq "$TOTAL"); do
  wait_idle
  cc0=$(compiling)
  port=$(free_port)
  cat >"$W/bench-vm.yaml" <<EOF
apiVersion: novacron.io/v1
kind: Job
metadata: {name: bench-vm}
spec:
  type: service
  replicas: 1
  task:
    image: $IMAGE
    pullPolicy: never
    ports:
      - {name: http, containerPort: 8080, hostPort: $port}
    vm:
      vcpus: 1
      memory: ${MEM_MIB}Mi
      kernel: /boot/vmlinuz
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 quiet panic=-1
  resources: {cpu: 500m, memory: 320Mi}
EOF
  aj0=$(proc_jiffies "$AGENT_PID")
  cj0=$(proc_jiffies "$CTL_PID")
  read -r hb0 _ < <(cpu_jiffies)
  a0=$(now)
  cli apply -f "$W/bench-vm.yaml" >"$W/apply-$i.out" 2>&1 || { cat "$W/apply-$i.out" >&2; die "novacron apply failed (run $i)"; }
  t0=$(now)
  apply_s=$(sub "$t0" "$a0")
  pid=
  pid_s=
  h=
  deadline=$(($(date +%s) + 180))
  while [ -z "$h" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 30 "$W/agent.log" >&2
      die "run $i: /health did not answer within 180 s of apply"
    fi
    if [ -z "$pid" ]; then
      pid=$(vm_pid)
      [ -z "$pid" ] || pid_s=$(sub "$(now)" "$t0")
    fi
    [ "$(curl -s -m 1 "http://127.0.0.1:$port/health" 2>/dev/null)" = ok ] && h=$(sub "$(now)" "$t0")
    [ -n "$h" ] || sleep 0.05
  done
  read -r hb1 _ < <(cpu_jiffies)
  [ -n "$pid" ] || pid=$(vm_pid)
  [ -n "$pid" ] || die "run $i: /health answers but no live QEMU in $STATE/vms"
  [ -n "$pid_s" ] || pid_s=$h
  # Other processes' CPU from apply to /health, % of one core: the host's busy
  # time minus QEMU's, the agent's and the controller's (dockerd, the KVM probe's
  # QEMU in run 1 and this script's curl polls count as other).
  other=$(awk -v hb="$((hb1 - hb0))" -v q="$(proc_jiffies "$pid")" \
    -v a="$(( $(proc_jiffies "$AGENT_PID") - aj0 ))" -v c="$(( $(proc_jiffies "$CTL_PID") - cj0 ))" \
    -v w="$(sub "$(now)" "$a0")" -v hz="$(getconf CLK_TCK)" \
    'BEGIN{ o = 100 * (hb - q - a - c) / (w * hz); printf "%.0f", o < 0 ? 0 : o }')
  if [ -z "$QEMU_CMDLINE" ]; then
    QEMU_CMDLINE=$(tr '\0' ' ' <"/proc/$pid/cmdline")
    ACCEL=$(sed -n 's/.*"accel": *"\([a-z]*\)".*/\1/p' "$(dirname "$(grep -l "^$pid\$" "$STATE"/vms/vm-*/qemu.pid | head -1)")/meta.json" 2>/dev/null || true)
  fi
  sleep "$SETTLE"
  m=$(mem_of "$pid")
  agent_rss=$(kb_of "/proc/$AGENT_PID/status" VmRSS)
  s0=$(now)
  cli job stop bench-vm >"$W/stop-$i.out" 2>&1 || { cat "$W/stop-$i.out" >&2; die "novacron job stop failed (run $i)"; }
  st=
  deadline=$(($(date +%s) + 90))
  while [ -z "$st" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "run $i: QEMU $pid still running 90 s after job stop"
    alive "$pid" || st=$(sub "$(now)" "$s0")
    [ -n "$st" ] || sleep 0.02
  done
  # The VM's directory goes after QEMU; wait for it so the next run starts clean.
  for _ in $(seq 300); do compgen -G "$STATE/vms/vm-*" >/dev/null || break; sleep 0.1; done
  sleep 1
  agent_after=$(kb_of "/proc/$AGENT_PID/status" VmRSS)
  cc=$(( cc0 | $(compiling) ))
  NC_APPLY+=("$apply_s"); NC_PID+=("$pid_s"); NC_HEALTH+=("$h"); NC_STOP+=("$st"); NC_MEM+=("$m")
  NC_AGENT+=("$agent_rss"); NC_AGENT_AFTER+=("$agent_after"); NC_BUSY+=("$BUSY_BEFORE"); NC_CC+=("$cc"); NC_OTHER+=("$other")
  read -r rss pss rr tr rest _ <<<"$m"
  echo "novacron $i$([ "$i" = 1 ] && echo ' (cold)'): apply ${apply_s}s; apply->qemu pid ${pid_s}s, apply->/health ${h}s; stop->qemu gone ${st}s; QEMU RSS $(mib "$rss") MiB, PSS $(mib "$pss") MiB (guest RAM $(mib "$rr"), TCG $(mib "$tr"), rest $(mib "$rest")); agent RSS $(mib "$agent_rss") -> $(mib "$agent_after") MiB after stop (host ${BUSY_BEFORE}% busy before, others ${other}% of a core during boot, compiler: $cc)"
done

# ---- results -------------------------------------------------------------------
col() { # ARRAY-OF-"a b c" FIELD(1-based) -> the field of each, space separated
  local f=$1; shift
  local x
  for x in "$@"; do echo "$x" | awk -v f="$f" '{print $f}'; done | tr '\n' ' '
}
warm() { shift; echo "$@"; } # drop the first (cold) element
diffs() { # "a1 a2 ..." "b1 b2 ..." -> b - a each
  paste <(echo "$1" | tr ' ' '\n' | awk 'NF') <(echo "$2" | tr ' ' '\n' | awk 'NF') |
    awk '{printf "%.2f ", $2 - $1}'
}
kbcol_mib() { local v; for v in $1; do mib "$v"; echo -n " "; done; }
stat_s() { echo "$(echo "$1" | median) s ($(echo "$1" | minmax))"; }
stat_mib() { local m; m=$(kbcol_mib "$1"); echo "$(echo "$m" | median) MiB ($(echo "$m" | minmax))"; }

bt_h="${BT_HEALTH[*]}"
pl_h="${PL_HEALTH[*]}"
nc_h_w=$(warm "${NC_HEALTH[@]}")
nc_p_w=$(warm "${NC_PID[@]}")
nc_s_w=$(warm "${NC_STOP[@]}")
nc_a_w=$(warm "${NC_APPLY[@]}")
nc_launch_w=$(diffs "$nc_p_w" "$nc_h_w")
ratio_bt=$(awk -v a="$(echo "$nc_h_w" | median)" -v b="$(echo "$bt_h" | median)" 'BEGIN{printf "%.2f", a / b}')
ratio_pl=$(awk -v a="$(echo "$nc_h_w" | median)" -v b="$(echo "$pl_h" | median)" 'BEGIN{printf "%.2f", a / b}')
nc_mem_w=("${NC_MEM[@]:1}")

echo
echo "== results ($RUNS runs each; NovaCron: 1 cold + $RUNS warm; accelerator: ${ACCEL:-?}, TCG here)"
printf '%-58s | %s\n' "time" "median (min-max)"
printf '%-58s | %s\n' "plain QEMU, boot-test.sh: launch -> /health ok" "$(stat_s "$bt_h")"
printf '%-58s | %s\n' "plain QEMU, boot-test.sh: launch -> console ready" "$(stat_s "${BT_READY[*]}")"
printf '%-58s | %s\n' "plain QEMU, this script: launch -> /health ok" "$(stat_s "$pl_h")"
printf '%-58s | %s\n' "NovaCron warm: apply returned -> /health ok" "$(stat_s "$nc_h_w")"
printf '%-58s | %s\n' "NovaCron warm: apply returned -> QEMU pid file" "$(stat_s "$nc_p_w")"
printf '%-58s | %s\n' "NovaCron warm: QEMU pid file seen -> /health ok" "$(stat_s "$nc_launch_w")"
printf '%-58s | %s\n' "NovaCron warm: novacron apply (the command itself)" "$(stat_s "$nc_a_w")"
printf '%-58s | %s\n' "NovaCron warm: job stop -> QEMU gone" "$(stat_s "$nc_s_w")"
printf '%-58s | %s s (QEMU pid %s s), stop %s s, apply %s s\n' "NovaCron run 1 (cold): apply returned -> /health ok" \
  "${NC_HEALTH[0]}" "${NC_PID[0]}" "${NC_STOP[0]}" "${NC_APPLY[0]}"
printf '%-58s | %s\n' "ratio NovaCron warm / boot-test.sh (medians)" "$ratio_bt"
printf '%-58s | %s\n' "ratio NovaCron warm / plain QEMU same poll (medians)" "$ratio_pl"
echo
printf '%-40s | %-26s | %s\n' "QEMU memory ${SETTLE}s after /health" "NovaCron VM (warm runs)" "plain QEMU"
for f in "1 VmRSS" "2 Pss" "3 guest-RAM mapping RSS" "4 TCG buffer RSS" "5 rest RSS" "6 rest PSS"; do
  n=${f%% *}; name=${f#* }
  printf '%-40s | %-26s | %s\n' "$name" "$(stat_mib "$(col "$n" "${nc_mem_w[@]}")")" "$(stat_mib "$(col "$n" "${PL_MEM[@]}")")"
done
echo
printf '%-40s | %s\n' "agent VmRSS before any VM" "$(mib "$AGENT_RSS0") MiB"
printf '%-40s | %s\n' "agent VmRSS with the VM running (warm)" "$(stat_mib "$(warm "${NC_AGENT[@]}")")"
printf '%-40s | %s\n' "agent VmRSS with the VM running (run 1)" "$(mib "${NC_AGENT[0]}") MiB"
printf '%-40s | %s\n' "agent VmRSS after each stop" "$(stat_mib "${NC_AGENT_AFTER[*]}")"
echo
echo "host busy % over 3 s before each run (both cores): boot-test ${BT_BUSY[*]}; plain ${PL_BUSY[*]}; novacron ${NC_BUSY[*]}"
echo "other processes' CPU during each NovaCron boot (% of one core): ${NC_OTHER[*]}"
echo "compiler running (1) at the start or end of each run: boot-test ${BT_CC[*]}; plain ${PL_CC[*]}; novacron ${NC_CC[*]}"
echo "NovaCron's QEMU: $QEMU_CMDLINE"

js_arr() { echo "$*" | awk '{printf "["; for (i = 1; i <= NF; i++) printf "%s%s", (i > 1 ? "," : ""), $i; printf "]"}'; }
printf '{"bench":"vm-boot","runs":%d,"settle_s":%s,"accel":"%s","cores":%d,"qemu":"%s","boot_test_health_s":%s,"boot_test_ready_s":%s,"plain_health_s":%s,"novacron_apply_s":%s,"novacron_qemu_pid_s":%s,"novacron_health_s":%s,"novacron_stop_s":%s,"novacron_ratio_boot_test":%s,"novacron_ratio_plain":%s,"novacron_qemu_mem_kb":%s,"plain_qemu_mem_kb":%s,"mem_fields":"rss pss ram_rss tcg_rss rest_rss rest_pss","agent_rss_kb_idle":%s,"agent_rss_kb_with_vm":%s,"agent_rss_kb_after_stop":%s,"busy_before_pct":{"boot_test":%s,"plain":%s,"novacron":%s},"novacron_other_cpu_pct":%s,"compiler_running":{"boot_test":%s,"plain":%s,"novacron":%s}}\n' \
  "$RUNS" "$SETTLE" "${ACCEL:-unknown}" "$(nproc)" "$(qemu-system-x86_64 --version | head -1 | awk '{print $4}')" \
  "$(js_arr "$bt_h")" "$(js_arr "${BT_READY[*]}")" "$(js_arr "$pl_h")" \
  "$(js_arr "${NC_APPLY[*]}")" "$(js_arr "${NC_PID[*]}")" "$(js_arr "${NC_HEALTH[*]}")" "$(js_arr "${NC_STOP[*]}")" \
  "$ratio_bt" "$ratio_pl" \
  "[$(for m in "${NC_MEM[@]}"; do js_arr "$m"; echo -n ,; done | sed 's/,$//')]" \
  "[$(for m in "${PL_MEM[@]}"; do js_arr "$m"; echo -n ,; done | sed 's/,$//')]" \
  "$AGENT_RSS0" "$(js_arr "${NC_AGENT[*]}")" "$(js_arr "${NC_AGENT_AFTER[*]}")" \
  "$(js_arr "${BT_BUSY[*]}")" "$(js_arr "${PL_BUSY[*]}")" "$(js_arr "${NC_BUSY[*]}")" "$(js_arr "${NC_OTHER[*]}")" \
  "$(js_arr "${BT_CC[*]}")" "$(js_arr "${PL_CC[*]}")" "$(js_arr "${NC_CC[*]}")"

#!/usr/bin/env bash
# Boots the tiny guest (packaging/vm/build-guest-image.sh) the way the agent does
# and checks what the guest promises, printing wall-clock timings:
#   ready_s     launch -> "novacron-guest: ready" on the serial console
#   health_s    launch -> `curl http://127.0.0.1:PORT/health` answers "ok"
#   powerdown_s QMP system_powerdown -> QEMU process gone (run without -no-shutdown)
#               or -> query-status "shutdown" (with --no-shutdown)
# It also checks index.html (names the hostname given on the command line) and the
# CGI counter (1 then 2), and with --seed a NoCloud seed whose user-data runs.
#
# Usage: boot-test.sh [--machine M] [--nic NIC] [--append CMDLINE] [--accel A]
#                     [--cpu CPU] [--mem MIB] [--smp N] [--port N] [--no-shutdown]
#                     [--seed] [--keep DIR]
# Defaults come from the built image's novacron-vm.json. Needs socat and curl.
set -euo pipefail

CACHE=${NOVACRON_VM_CACHE:-/var/tmp/novacron-vm}
B=$(readlink -f "$CACHE/current" 2>/dev/null || true)
[ -n "$B" ] && [ -f "$B/novacron-vm.json" ] || { echo "error: no build in $CACHE: run packaging/vm/build-guest-image.sh" >&2; exit 1; }
json=$B/novacron-vm.json
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" "$json"; }
MACHINE=$(field machine)
NIC=$(field nic)
APPEND=$(field cmdline)
ACCEL=tcg
CPU=
MEM=256
SMP=1
PORT=18080
NO_SHUTDOWN=0
SEED=0
KEEP=
while [ $# -gt 0 ]; do
  case $1 in
    --machine) MACHINE=$2; shift 2 ;;
    --nic) NIC=$2; shift 2 ;;
    --append) APPEND=$2; shift 2 ;;
    --accel) ACCEL=$2; shift 2 ;;
    --cpu) CPU=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --smp) SMP=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --no-shutdown) NO_SHUTDOWN=1; shift ;;
    --seed) SEED=1; shift ;;
    --keep) KEEP=$2; shift 2 ;;
    *) echo "error: unknown argument '$1'" >&2; exit 64 ;;
  esac
done
for tool in qemu-system-x86_64 socat curl; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing" >&2; exit 1; }
done

dir=${KEEP:-$(mktemp -d)}
mkdir -p "$dir"
HOST=nc-boot-test-$$
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
  [ -n "$KEEP" ] || rm -rf "$dir"
}
trap cleanup EXIT
now() { date +%s.%N; }
since() { echo "$(now) $1" | awk '{printf "%.2f", $1 - $2}'; }
qmp() { # qmp COMMAND-JSON: prints the replies (after the greeting)
  printf '{"execute":"qmp_capabilities"}\n%s\n' "$1" |
    socat -t 1 - "UNIX-CONNECT:$dir/qmp.sock" | tail -n +2
}
alive() { # the QEMU process exists and is not a zombie
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$st" != Z ]
}

extra=()
[ -z "$CPU" ] || extra+=(-cpu "$CPU")
[ "$NO_SHUTDOWN" -eq 0 ] || extra+=(-no-shutdown)
if [ "$SEED" -eq 1 ]; then
  # A vfat NoCloud seed, made without mounting (mkdosfs + a FAT writer would need
  # mtools): QEMU's vvfat driver presents a directory as a FAT disk.
  mkdir -p "$dir/seed"
  printf '#!/bin/sh\necho "user-data says hello from $(hostname)"\nexit 3\n' >"$dir/seed/user-data"
  printf 'instance-id: %s\n' "$HOST" >"$dir/seed/meta-data"
  case $MACHINE in microvm*) blk=virtio-blk-device ;; *) blk=virtio-blk-pci ;; esac
  extra+=(-drive "if=none,id=seed,format=raw,read-only=on,file.driver=vvfat,file.dir=$dir/seed,file.label=cidata"
    -device "$blk,drive=seed")
fi

set -x
start=$(now)
qemu-system-x86_64 -accel "$ACCEL" -M "$MACHINE" -m "$MEM" -smp "$SMP" \
  -kernel "$B/vmlinuz" -initrd "$B/initrd.img" -append "$APPEND novacron.hostname=$HOST" \
  -nodefaults -no-user-config -display none -serial "file:$dir/console.log" \
  -qmp "unix:$dir/qmp.sock,server=on,wait=off" \
  -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$PORT-:8080" -device "$NIC,netdev=n0" \
  "${extra[@]}" -daemonize -pidfile "$dir/qemu.pid"
{ set +x; } 2>/dev/null
launched=$(since "$start")
pid=$(cat "$dir/qemu.pid")

fail() {
  echo "FAIL: $*" >&2
  echo "--- console (last 30 lines)" >&2
  tail -n 30 "$dir/console.log" >&2 || true
  exit 1
}

ready=
health=
deadline=$(($(date +%s) + 90))
while [ -z "$ready" ] || [ -z "$health" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "no ready/health within 90 s"
  alive "$pid" || fail "QEMU exited"
  if [ -z "$ready" ] && grep -q 'novacron-guest: ready' "$dir/console.log" 2>/dev/null; then
    ready=$(since "$start")
  fi
  if [ -z "$health" ] && [ "$(curl -s -m 1 "http://127.0.0.1:$PORT/health" 2>/dev/null)" = ok ]; then
    health=$(since "$start")
  fi
  sleep 0.05
done

index=$(curl -s -m 5 "http://127.0.0.1:$PORT/")
[ "$index" = "novacron guest $HOST" ] || fail "index.html says '$index'"
c1=$(curl -s -m 5 "http://127.0.0.1:$PORT/cgi-bin/count")
c2=$(curl -s -m 5 "http://127.0.0.1:$PORT/cgi-bin/count")
[ "$c1" = 1 ] && [ "$c2" = 2 ] || fail "counter answered '$c1' then '$c2'"
if [ "$SEED" -eq 1 ]; then
  for _ in $(seq 100); do grep -q 'user-data ran' "$dir/console.log" && break; sleep 0.1; done
  grep -q "user-data says hello from $HOST" "$dir/console.log" || fail "user-data did not run"
  grep -q 'novacron-guest: user-data ran (exit 3)' "$dir/console.log" || fail "no 'user-data ran (exit 3)'"
fi

status=$(qmp '{"execute":"query-status"}')
echo "$status" | grep -q '"status": *"running"' || fail "query-status: $status"
pd_start=$(now)
qmp '{"execute":"system_powerdown"}' >/dev/null
powerdown=
while [ -z "$powerdown" ]; do
  if [ "$NO_SHUTDOWN" -eq 1 ]; then
    qmp '{"execute":"query-status"}' | grep -q '"status": *"shutdown"' && powerdown=$(since "$pd_start")
  else
    alive "$pid" || powerdown=$(since "$pd_start")
  fi
  [ -n "$powerdown" ] || [ "$(since "$pd_start" | cut -d. -f1)" -lt 30 ] || fail "no power-off within 30 s of system_powerdown"
  sleep 0.02
done
grep -q 'novacron-guest: powering off' "$dir/console.log" || fail "no 'powering off' on the console"
if [ "$NO_SHUTDOWN" -eq 1 ]; then
  qmp '{"execute":"quit"}' >/dev/null || true
fi
for _ in $(seq 100); do alive "$pid" || break; sleep 0.05; done
alive "$pid" && fail "QEMU still running after power-off"
echo "OK machine=$MACHINE nic=$NIC accel=$ACCEL${CPU:+ cpu=$CPU} mem=$MEM smp=$SMP launch_s=$launched ready_s=$ready health_s=$health powerdown_s=$powerdown"

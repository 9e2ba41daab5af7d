#!/usr/bin/env bash
# Virtual machines (issue 21): what a guest's network costs, QEMU's user-mode
# network (`network: user`, the default) against the node's VM bridge
# (`network: bridge`), for the same guest on the same node, side by side.
#
# What it does, all on this host: a private controller (embedded store) and one
# agent with a VM bridge of its own (--bridge, default 10.218.0.1/24), from the
# binaries in --bin-dir; two one-replica VM jobs of `novacron/guest-tiny:1`
# (1 vCPU, 256 MiB, cpu: 1 each, a published port each), one per network, whose
# user data writes a --size MiB file into the guest's web root. Then, for each
# path to each guest, --requests sequential `curl /health` (latency: median and
# 95th percentile of curl's time_total) and --downloads downloads of the file
# (throughput: median MB/s):
#   user:    the published port (QEMU's hostfwd on the publish address)
#   bridge:  the published port (a DNAT rule to the guest), and the guest's own
#            address on the bridge (no forwarding at all)
# Prints a table, the ratios bridge/user, and one JSON line. Everything it
# started is removed at the end (VMs, agent, controller, the bridge and its rules).
#
# Usage: bash tests/bench/vm-net.sh [--requests N] [--downloads N] [--size MIB]
#          [--bridge IP/PREFIX] [--bin-dir DIR] [--keep DIR]
# Needs: root (the bridge), curl, QEMU and the guest image (`bash .ci/setup vm`),
# and the binaries built (`cargo build --bins`).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
REQUESTS=200
DOWNLOADS=5
SIZE=16
BRIDGE=10.218.0.1/24
BIN_DIR=$ROOT/target/debug
KEEP=
IMAGE=novacron/guest-tiny:1
die() { echo "vm-net: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case $1 in
    --requests) REQUESTS=$2; shift 2 ;;
    --downloads) DOWNLOADS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --bridge) BRIDGE=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root: the agent makes a bridge"
for b in novacron novacron-controller novacron-agent; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing: cargo build --bins"
done
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "$IMAGE is missing: bash .ci/setup vm"
command -v curl >/dev/null || die "curl is missing"

if [ -n "$KEEP" ]; then W=$KEEP; mkdir -p "$W"; else W=$(mktemp -d /tmp/vm-net.XXXXXX); fi
BIN=$W/bin; STATE=$W/agent; mkdir -p "$BIN"
for b in novacron novacron-controller novacron-agent; do cp "$BIN_DIR/$b" "$BIN/$b"; done
GATEWAY=${BRIDGE%/*}
CTL_PID= AGENT_PID=
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cleanup() {
  set +e
  if [ -n "$AGENT_PID" ]; then
    "$BIN/novacron" --config "$W/cli.toml" job stop net-user >/dev/null 2>&1
    "$BIN/novacron" --config "$W/cli.toml" job stop net-bridge >/dev/null 2>&1
    sleep 5
    kill "$AGENT_PID" 2>/dev/null
  fi
  [ -n "$CTL_PID" ] && kill "$CTL_PID" 2>/dev/null
  for p in "$STATE"/vms/vm-*/qemu.pid; do [ -f "$p" ] && kill -9 "$(cat "$p")" 2>/dev/null; done
  br=$(ip -o -4 addr show | awk -v g="$GATEWAY" '{split($4, a, "/"); if (a[1] == g) print $2}')
  if [ -n "$br" ]; then
    chain="NOVACRON-${br^^}"
    for table in nat filter; do
      iptables -t "$table" -S | grep -e "$br" -e "$chain" | grep '^-A' | grep -v "^-A $chain " |
        sed 's/^-A /-D /; s/"//g' | while read -r rule; do
          # shellcheck disable=SC2086
          iptables -t "$table" $rule
        done
    done
    iptables -t nat -F "$chain" 2>/dev/null; iptables -t nat -X "$chain" 2>/dev/null
    for t in /sys/class/net/"$br"/brif/*; do [ -e "$t" ] && ip link del "$(basename "$t")"; done
    ip link del "$br" 2>/dev/null
  fi
  [ -z "$KEEP" ] && rm -rf "$W"
}
trap cleanup EXIT

CPORT=$(free_port)
"$BIN/novacron-controller" --data-dir "$W/controller" init --server-name localhost --server-name 127.0.0.1 >"$W/init.out" 2>&1 ||
  { cat "$W/init.out" >&2; die "novacron-controller init failed"; }
FP=$(grep -o 'sha256:[0-9a-f]*' "$W/init.out" | head -1)
RUST_LOG=info "$BIN/novacron-controller" --data-dir "$W/controller" serve \
  --api-listen "127.0.0.1:$CPORT" --quic-listen "127.0.0.1:$CPORT" --server-name 127.0.0.1 \
  >/dev/null 2>"$W/controller.log" &
CTL_PID=$!
PKI=$W/controller/pki
cat >"$W/cli.toml" <<EOF
current = "bench"

[contexts.bench]
api = "https://127.0.0.1:$CPORT"
ca = "$PKI/ca.pem"
cert = "$PKI/admin.pem"
key = "$PKI/admin-key.pem"
EOF
cli() { "$BIN/novacron" --config "$W/cli.toml" "$@"; }
api() { curl -sf -m 5 --cacert "$PKI/ca.pem" --cert "$PKI/admin.pem" --key "$PKI/admin-key.pem" "https://127.0.0.1:$CPORT$1"; }
for _ in $(seq 200); do api /healthz >/dev/null 2>&1 && break; sleep 0.1; done
api /healthz >/dev/null || die "the controller did not answer (see $W/controller.log)"
TOKEN=$("$BIN/novacron-controller" --data-dir "$W/controller" token create --quiet --uses 1)
"$BIN/novacron-agent" join --controller "https://127.0.0.1:$CPORT" --token "$TOKEN" \
  --ca-fingerprint "$FP" --name netbench --state-dir "$STATE" >"$W/join.out" 2>&1 ||
  { cat "$W/join.out" >&2; die "novacron-agent join failed"; }
RUST_LOG=info "$BIN/novacron-agent" run --state-dir "$STATE" --publish-address 127.0.0.1 \
  --ingress-address off --vm-bridge "$BRIDGE" >/dev/null 2>>"$W/agent.log" &
AGENT_PID=$!
for _ in $(seq 300); do
  api /v1/nodes/netbench 2>/dev/null | grep -q '"bridge"' && break
  sleep 0.1
done
api /v1/nodes/netbench | grep -q '"bridge": *"' || die "the node reports no VM bridge (see $W/agent.log)"

job() { # name network port
  cat <<EOF
apiVersion: novacron.io/v1
kind: Job
metadata:
  name: $1
spec:
  type: service
  replicas: 1
  task:
    image: $IMAGE
    pullPolicy: never
    ports:
      - {name: http, containerPort: 8080, hostPort: $3}
    vm:
      network: $2
      memory: 256Mi
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 quiet panic=-1
      userData: |
        #!/bin/sh
        dd if=/dev/urandom of=/www/big bs=1M count=$SIZE 2>/dev/null
  resources: {cpu: 1, memory: 512Mi}
EOF
}
UPORT=$(free_port); BPORT=$(free_port)
job net-user user "$UPORT" >"$W/user.yaml"
job net-bridge bridge "$BPORT" >"$W/bridge.yaml"
cli apply -f "$W/user.yaml" >/dev/null
cli apply -f "$W/bridge.yaml" >/dev/null
ready() { # url of the big file
  local size
  for _ in $(seq 300); do
    size=$(curl -s -m 5 -o /dev/null -w '%{size_download}' "$1" 2>/dev/null || true)
    [ "$size" = $((SIZE << 20)) ] && return 0
    sleep 1
  done
  die "$1 did not serve $SIZE MiB within 300 s (see $W/agent.log)"
}
ADDR=
for _ in $(seq 300); do
  ADDR=$(cli vm list -o json | python3 -c 'import json,sys; print(next((r.get("address", "") for r in json.load(sys.stdin) if r["name"] == "net-bridge"), ""))')
  [ -n "$ADDR" ] && break
  sleep 1
done
[ -n "$ADDR" ] || die "vm list shows no address for net-bridge within 300 s (see $W/agent.log)"
PATHS=("user 127.0.0.1:$UPORT" "bridge-published 127.0.0.1:$BPORT" "bridge-direct $ADDR:8080")
for p in "${PATHS[@]}"; do ready "http://${p#* }/big"; done

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
p95() { sort -n | awk '{a[NR]=$1} END {i=int(NR*0.95); if (i<1) i=1; print a[i]}'; }
declare -A LAT P95 MBS
for p in "${PATHS[@]}"; do
  name=${p%% *}; at=${p#* }
  : >"$W/lat.$name"
  for _ in $(seq "$REQUESTS"); do
    curl -s -m 5 -o /dev/null -w '%{time_total}\n' "http://$at/health" >>"$W/lat.$name"
  done
  : >"$W/mbs.$name"
  for _ in $(seq "$DOWNLOADS"); do
    curl -s -m 120 -o /dev/null -w '%{speed_download}\n' "http://$at/big" |
      awk '{printf "%.2f\n", $1 / 1e6}' >>"$W/mbs.$name"
  done
  LAT[$name]=$(awk '{printf "%.2f\n", $1 * 1000}' "$W/lat.$name" | median)
  P95[$name]=$(awk '{printf "%.2f\n", $1 * 1000}' "$W/lat.$name" | p95)
  MBS[$name]=$(median <"$W/mbs.$name")
done
ACCEL=$(api /v1/nodes/netbench | python3 -c 'import json,sys; print(json.load(sys.stdin)["capabilities"]["vm"]["accelerator"])')
printf '%-18s %14s %14s %16s\n' path "median ms" "p95 ms" "median MB/s"
for p in "${PATHS[@]}"; do
  name=${p%% *}
  printf '%-18s %14s %14s %16s\n' "$name" "${LAT[$name]}" "${P95[$name]}" "${MBS[$name]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
echo "ratios to user (latency: lower is better; throughput: higher is better):"
for name in bridge-published bridge-direct; do
  echo "  $name: latency $(ratio "${LAT[$name]}" "${LAT[user]}")x, throughput $(ratio "${MBS[$name]}" "${MBS[user]}")x"
done
printf '{"accel":"%s","requests":%s,"downloads":%s,"size_mib":%s' "$ACCEL" "$REQUESTS" "$DOWNLOADS" "$SIZE"
for p in "${PATHS[@]}"; do
  name=${p%% *}
  printf ',"%s":{"median_ms":%s,"p95_ms":%s,"median_mbs":%s}' "$name" "${LAT[$name]}" "${P95[$name]}" "${MBS[$name]}"
done
echo "}"

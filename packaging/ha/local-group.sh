#!/usr/bin/env bash
# A highly available NovaCron control plane on this machine, without Docker
# Compose: three etcd members (Debian's etcd-server) and three controllers on
# loopback ports, every process in the background with its pid and log in DIR.
# The HA tests start their etcd members with this script (`etcd`).
#
#   local-group.sh up DIR [BASE]     three etcd members, then three controllers
#   local-group.sh etcd DIR [BASE]   only the three etcd members
#   local-group.sh down DIR          stops everything started in DIR
#
# Ports (loopback): etcd member i (0..2): clients BASE+2i, peers BASE+2i+1;
# controller i: API (TCP) and agent link (UDP) on BASE+10+i. BASE defaults to
# 23790. Controllers are `novacron-controller` from $NOVACRON_BIN (default:
# target/debug of this checkout), on the etcd store with a 2 s lease; the first
# one's `init` makes the CA, which the others share (copied: pki/ and
# secrets.key; see docs/high-availability.md).
#
# Agents join any controller's API and run with
#   --controller 127.0.0.1:$((BASE+10)),127.0.0.1:$((BASE+11)),127.0.0.1:$((BASE+12))
set -euo pipefail

cmd=${1:-}
dir=${2:-}
base=${3:-23790}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  sed -n '2,20p' "$0" >&2
  exit 64
fi
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${NOVACRON_BIN:-$here/target/debug}

etcd_up() {
  command -v etcd >/dev/null || { echo "error: etcd is missing: run 'bash .ci/setup system' (Debian's etcd-server)" >&2; exit 1; }
  mkdir -p "$dir"
  local cluster="" i
  for i in 0 1 2; do
    cluster+="${cluster:+,}e$i=http://127.0.0.1:$((base + 2 * i + 1))"
  done
  for i in 0 1 2; do
    local client=$((base + 2 * i)) peer=$((base + 2 * i + 1))
    # Writes of a reconcile pass on a large fleet exceed etcd's defaults of 128
    # operations and 1.5 MiB per transaction.
    nohup etcd --name "e$i" --data-dir "$dir/etcd-$i" \
      --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
      --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "novacron-$base" \
      --max-txn-ops 10000 --max-request-bytes 10485760 --log-level warn \
      >"$dir/etcd-$i.log" 2>&1 &
    echo $! >"$dir/etcd-$i.pid"
  done
  local endpoints
  endpoints=$(etcd_endpoints)
  local waited=0
  until ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1; do
    if [ "$waited" -ge 200 ]; then
      echo "error: the etcd members did not become healthy within 20 s; see $dir/etcd-*.log" >&2
      exit 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  echo "etcd: $endpoints"
}

etcd_endpoints() {
  echo "http://127.0.0.1:$base,http://127.0.0.1:$((base + 2)),http://127.0.0.1:$((base + 4))"
}

controllers_up() {
  local endpoints i
  endpoints=$(etcd_endpoints)
  export NOVACRON_STORE=etcd NOVACRON_ETCD_ENDPOINTS=$endpoints NOVACRON_LEASE=${NOVACRON_LEASE:-2s}
  "$bin/novacron-controller" --data-dir "$dir/c0" init --server-name localhost --server-name 127.0.0.1 >/dev/null
  for i in 1 2; do
    mkdir -p "$dir/c$i"
    cp -a "$dir/c0/pki" "$dir/c$i/"
    cp -a "$dir/c0/secrets.key" "$dir/c$i/"
  done
  for i in 0 1 2; do
    local port=$((base + 10 + i))
    nohup "$bin/novacron-controller" --data-dir "$dir/c$i" serve \
      --api-listen "127.0.0.1:$port" --quic-listen "127.0.0.1:$port" --server-name 127.0.0.1 \
      >"$dir/controller-$i.log" 2>&1 &
    echo $! >"$dir/controller-$i.pid"
  done
  echo "controllers: https://127.0.0.1:$((base + 10)) https://127.0.0.1:$((base + 11)) https://127.0.0.1:$((base + 12)) (one leads; the others stand by)"
  echo "agents: --controller 127.0.0.1:$((base + 10)),127.0.0.1:$((base + 11)),127.0.0.1:$((base + 12))"
}

down() {
  local f
  for f in "$dir"/controller-*.pid "$dir"/etcd-*.pid; do
    [ -e "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}

case "$cmd" in
  etcd) etcd_up ;;
  up) etcd_up && controllers_up ;;
  down) down ;;
  *) echo "unknown command $cmd (up, etcd, down)" >&2; exit 64 ;;
esac

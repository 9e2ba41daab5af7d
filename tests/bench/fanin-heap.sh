#!/usr/bin/env bash
# Where the controller's memory goes per connected agent: runs novacron-fanin
# with the controller under heaptrack (Debian package `heaptrack`), then sums
# the heap at its peak by the component each allocation's stack names.
#
#   cargo build --release --bin novacron-controller --bin novacron-fanin
#   bash tests/bench/fanin-heap.sh [AGENTS] [DURATION]      # default 2000 90s
#
# heaptrack slows the controller: use a few thousand agents, not 10,000.
set -euo pipefail
agents=${1:-2000}
duration=${2:-90s}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
work=$(mktemp -d /tmp/fanin-heap.XXXXXX)
command -v heaptrack >/dev/null || { echo "heaptrack is missing: apt-get install heaptrack" >&2; exit 1; }
for b in novacron-controller novacron-fanin; do
  [ -x "$bin/$b" ] || { echo "$bin/$b is missing: cargo build --release --bin $b" >&2; exit 1; }
done

# The fan-in starts the controller twice (init, then serve); only serve is traced.
cat >"$work/controller.sh" <<EOF
#!/usr/bin/env bash
case " \$* " in
  *" serve "*) exec heaptrack -o "$work/heap" "$bin/novacron-controller" "\$@" ;;
  *) exec "$bin/novacron-controller" "\$@" ;;
esac
EOF
chmod +x "$work/controller.sh"
mkdir -p "$work/data"
"$bin/novacron-fanin" --agents "$agents" --duration "$duration" \
  --data-dir "$work/data" --controller-bin "$work/controller.sh" >"$work/fanin.out" 2>&1 || true
# heaptrack's wrapper is what the fan-in stops: stop the traced controller too,
# so that heaptrack writes its file out.
pkill -INT -f "novacron-controller --data-dir $work/data" || true
for _ in $(seq 1 60); do
  pgrep -f "novacron-controller --data-dir $work/data" >/dev/null || break
  sleep 1
done
tail -n 1 "$work/fanin.out"
file=$(ls "$work"/heap*.zst 2>/dev/null | head -1)
[ -n "$file" ] || { echo "no heaptrack file in $work" >&2; exit 1; }
heaptrack_print -f "$file" --print-peaks 0 --print-allocators 0 --print-temporary 0 \
  --print-leaks 0 -F "$work/peak.folded" --flamegraph-cost-type peak >/dev/null
python3 - "$work/peak.folded" "$agents" <<'EOF'
import collections, sys
path, agents = sys.argv[1], int(sys.argv[2])
# First match wins: the more specific patterns come first.
rules = [
    ("quinn: connection state and its event channel (accept)", "EndpointInner::accept"),
    ("quinn: send buffer (poll_transmit, GSO batches)", "poll_transmit"),
    ("quinn: endpoint to connection channel blocks", "RecvState::poll_socket"),
    ("rustls: QUIC keys and sessions", "rustls"),
    ("quinn: other", "quinn"),
    ("history head (novacron-tsdb)", "novacron_tsdb"),
    ("registry: metrics window", "Registry::ingest"),
    ("decoded messages (samples in the window)", "novacron_wire"),
    ("link: per-connection tasks and channels", "novacron_controller::link"),
    ("store (redb)", "redb"),
    ("workloads", "workloads"),
    ("tokio task cells", "task::core::Cell"),
    ("controller: other", "novacron_controller"),
]
total = 0
groups = collections.Counter()
for line in open(path):
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n)
    total += n
    groups[next((name for name, pat in rules if pat in stack), "other")] += n
print(f"peak heap {total / 1e6:.1f} MB for {agents} agents: {total / agents / 1e3:.1f} KB per agent")
for name, n in groups.most_common():
    print(f"{n / agents / 1e3:7.1f} KB per agent  {n / 1e6:7.1f} MB  {name}")
EOF
echo "files: $work"

#!/usr/bin/env bash
# Dashboard fleet page with 10,000 nodes in Chromium (issue 19's benchmark:
# first 100 rows rendered in <= 1 s). Runs novacron-fanin (the release
# controller plus AGENTS fake agents reporting real samples), and while the
# fleet is connected: an API token from the running controller, then
# tests/bench/dashboard_fleet.py (headless Chromium over chromedriver's W3C
# WebDriver API) loads /ui/ and /ui/?page=50 LOADS times each, and curl times
# the HTML pages and the JSON the page polls (/ui/fleet/live?page=N).
#
#   cargo build --release -p novacron-controller --bin novacron-controller \
#     -p novacron-tests --bin novacron-fanin
#   bash tests/bench/dashboard-fleet.sh [AGENTS] [DURATION] [LOADS]   # default 10000 300s 10
#
# FANIN_ARGS adds flags to novacron-fanin (e.g. "--connect-concurrency 16").
# The page lists every enrolled node, connected or not: check the "live" count
# printed before the browser runs (the controller's connected_agents) and the
# fanin JSON line's live_at_start; on a busy host agents can time out.
#
# Needs Debian's chromium, chromedriver, curl, python3. Every process it starts
# is stopped on exit (fanin stops its controller at the end of DURATION; the
# trap stops fanin's and chromedriver's process groups otherwise).
set -euo pipefail
agents=${1:-10000}
duration=${2:-300s}
loads=${3:-10}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
work=$(mktemp -d /tmp/dash-fleet.XXXXXX)
data=$work/data
for b in novacron-controller novacron-fanin; do
  [ -x "$bin/$b" ] || { echo "$bin/$b is missing (see the header)" >&2; exit 1; }
done
for c in chromium chromedriver curl python3; do
  command -v "$c" >/dev/null || { echo "$c is missing" >&2; exit 1; }
done

fanin_pid=
cleanup() {
  if [ -n "$fanin_pid" ] && kill -0 "$fanin_pid" 2>/dev/null; then
    # fanin's own group: fanin, and the controller it started.
    kill -INT -- "-$fanin_pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$fanin_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$fanin_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT

echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p')"
echo "date: $(date -u +%FT%TZ)"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "work dir: $work"

mkdir -p "$data"
setsid "$bin/novacron-fanin" --agents "$agents" --duration "$duration" \
  --data-dir "$data" ${FANIN_ARGS:-} >"$work/fanin.out" 2>&1 &
fanin_pid=$!

# Wait until every agent is connected and the measurement window has begun.
for _ in $(seq 1 900); do
  grep -q '^measuring for' "$work/fanin.out" && break
  kill -0 "$fanin_pid" 2>/dev/null || { cat "$work/fanin.out" >&2; exit 1; }
  sleep 1
done
grep -q '^measuring for' "$work/fanin.out" || { echo "fanin did not start measuring" >&2; exit 1; }
grep -E '^(controller pid|enrolled [0-9]+ agents|connected|warning)' "$work/fanin.out"

api=$(cat "$data/api-url")
pki=$data/pki
stats() {
  curl -sS --cacert "$pki/ca.pem" --cert "$pki/admin.pem" --key "$pki/admin-key.pem" \
    "$api/v1/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print("connected_agents", s.get("connected_agents"))'
}
echo "controller stats before: $(stats)"
live=$(stats | cut -d' ' -f2)
[ "$live" -ge "$agents" ] || echo "WARNING: only $live of $agents agents are live at the controller (the rest are listed as disconnected/down)"
token=$("$bin/novacron-controller" --data-dir "$data" admin token --name dash-bench --role viewer)

echo "load at browser start: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 "$root/tests/bench/dashboard_fleet.py" --api "$api" --token "$token" \
  --loads "$loads" --page 1 --page 50 --json "$work/browser.json" | tee "$work/browser.md"
echo "load after browser: $(cut -d' ' -f1-3 /proc/loadavg)"

# curl: the server's side, with the browser's session cookie.
cookie=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["cookie"])' "$work/browser.json")
time_of() {  # URL -> median and max time_total (s) over LOADS requests, and the size
  local url=$1 times=() size=0 i t
  for i in $(seq 1 "$loads"); do
    read -r t size < <(curl -sS -o /dev/null --cacert "$pki/ca.pem" \
      -b "__Host-novacron_session=$cookie" -w '%{time_total} %{size_download}\n' "$url")
    times+=("$t")
  done
  printf '%s\n' "${times[@]}" | python3 -c '
import statistics, sys
v = [float(x) * 1000 for x in sys.stdin.read().split()]
print(f"{statistics.median(v):.1f} | {max(v):.1f} | " + sys.argv[1])' "$size"
}
{
  echo
  echo "| curl (time_total, $loads requests) | median ms | max ms | bytes |"
  echo "|---|---|---|---|"
  for path in "/ui/" "/ui/?page=50" "/ui/fleet/live?page=1" "/ui/fleet/live?page=50"; do
    echo "| GET $path | $(time_of "$api$path") |"
  done
} | tee "$work/curl.md"
echo "controller stats after: $(stats)"
echo "load after curl: $(cut -d' ' -f1-3 /proc/loadavg)"

# The rest of fanin's window, then its report (it stops the controller).
echo "waiting for fanin to finish its --duration $duration window"
wait "$fanin_pid" || echo "fanin exited with $?"
fanin_pid=
tail -n 1 "$work/fanin.out"
echo "load at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "files: $work"

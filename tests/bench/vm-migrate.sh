#!/usr/bin/env bash
# Virtual machines, live migration: NovaCron's VM migration side by side with
# the anchor, a plain QEMU-to-QEMU migration by hand
# (tests/bench/vm-migrate-plain.sh), in one run, with the ratios.
#
# What it does, all on this host:
#   1. Copies novacron, novacron-controller and novacron-agent from --bin-dir to
#      a private directory (a build going on meanwhile does not change them).
#   2. Anchor: runs tests/bench/vm-migrate-plain.sh with the same --runs,
#      --sizes and --loads (its output is shown; its work directory is kept
#      under this one) and takes its final JSON line.
#   3. NovaCron: a private controller (`novacron-controller init` + `serve` on a
#      free loopback port, embedded store) and two agents on this host
#      (`novacron-agent join` + `run --publish-address 127.0.0.2|127.0.0.3
#      --ingress-address off`, with NOVACRON_VM_LAUNCH=direct and
#      NOVACRON_VM_ACCEL=tcg: no systemd unit, no KVM probe). For each size x
#      load x run:
#      - `novacron apply -f` a new one-replica VM job (`novacron/guest-tiny:1`,
#        1 vCPU, spec.task.vm.memory SIZE Mi, resources.memory SIZE+64 Mi, cpu
#        500m, a published port on a free hostPort, a readiness check on
#        /health); waits (`novacron job status NAME -o json`) until its
#        allocation runs and is healthy;
#      - bumps the guest's in-memory counter (/cgi-bin/count) 3 times on the
#        source node's publish address;
#      - dirty runs: the job's spec.task.vm.userData is the anchor's own dirty
#        load (the very user-data file the anchor's dirty runs used, taken from
#        its kept work directory; the agent hands it to the guest as a NoCloud
#        seed, as the anchor does); waits for the load's start line and two
#        progress lines on the source's console (the agent's
#        vms/vm-*/serial.run.log), as the anchor does;
#      - times `novacron alloc migrate ALLOC --to OTHER -o json` (the command's
#        wall time) and, from the same start, the target's /health on the other
#        node's publish address saying `ok` (probed every 50 ms while the
#        command runs, each probe waiting at most 2 s);
#      - checks continuity: the next /cgi-bin/count on the target is the
#        source's last value + 1;
#      - records from the migration's JSON: phase, downtime_ms (QEMU's
#        downtime), vm.elapsed_ms (QEMU's total-time), vm.transferred,
#        vm.rounds (dirty-sync count), vm.forced_pause, started/finished_unix_ms;
#      - `novacron job stop NAME` and waits until its QEMUs are gone.
#   4. Prints a table (medians over the completed runs) with the anchor's
#      medians next to NovaCron's and the ratios NovaCron / anchor, and one
#      final JSON line with everything (per-run figures of both, the machine,
#      the accelerator, the binaries' build profile).
# Both sides: TCG, 1 vCPU, q35, the same kernel, initrd and command line from
# the image, downtime-limit 300 ms, max-bandwidth 10 GiB/s, auto-converge on.
# The anchor streams over one local unix socket; NovaCron's stream goes source
# QEMU -> source agent -> controller (QUIC) -> target agent -> target QEMU.
# NovaCron also pauses a guest that has not converged after 90 s (forced_pause).
#
# Usage: bash tests/bench/vm-migrate.sh [--runs N] [--sizes "256 1024"]
#          [--loads "idle dirty"] [--bin-dir DIR] [--keep DIR]
#   --runs N        runs of each size x load, on each side (default 3)
#   --sizes LIST    guest memory sizes in MiB (default "256 1024")
#   --loads LIST    any of idle, dirty (default "idle dirty")
#   --bin-dir DIR   where novacron, novacron-controller, novacron-agent are
#                   (default target/release; copied to a private directory)
#   --keep DIR      work in DIR and keep it (logs, agents' state, manifests,
#                   consoles, the anchor's directory, results)
# Needs what vm-migrate-plain.sh needs (qemu-system-x86_64, docker with
# novacron/guest-tiny:1, curl, python3, ss) and the three binaries.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=3
SIZES="256 1024"
LOADS="idle dirty"
BIN_DIR=$ROOT/target/release
KEEP=
IMAGE=novacron/guest-tiny:1
COUNT_BUMPS=3
PUBLISH=(127.0.0.2 127.0.0.3)
NODES=(vmmig-0 vmmig-1)
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --loads) LOADS=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 64 ;;
  esac
done
[[ $RUNS =~ ^[0-9]+$ ]] && [ "$RUNS" -ge 1 ] || { echo "error: --runs needs a whole number >= 1" >&2; exit 64; }
for s in $SIZES; do
  [[ $s =~ ^[0-9]+$ ]] && [ "$s" -ge 128 ] || { echo "error: --sizes: '$s' is not a size in MiB >= 128" >&2; exit 64; }
done
for l in $LOADS; do
  case $l in idle | dirty) ;; *) echo "error: --loads: '$l' is not idle or dirty" >&2; exit 64 ;; esac
done
[ -n "$SIZES" ] && [ -n "$LOADS" ] || { echo "error: --sizes and --loads must not be empty" >&2; exit 64; }

die() { echo "error: $*" >&2; exit 1; }
for tool in qemu-system-x86_64 docker curl python3 ss awk; do
  command -v "$tool" >/dev/null || die "$tool is missing (qemu, curl: \`bash .ci/setup vm\`)"
done
docker image inspect "$IMAGE" >/dev/null 2>&1 ||
  die "the guest image $IMAGE is missing (or Docker does not answer): run \`bash .ci/setup vm\`"
[ -d "$BIN_DIR" ] || die "--bin-dir $BIN_DIR is not a directory"
BIN_DIR=$(cd "$BIN_DIR" && pwd)
for b in novacron novacron-controller novacron-agent; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing: run \`cargo build --release --bins\` (or pass --bin-dir)"
done
PLAIN=$ROOT/tests/bench/vm-migrate-plain.sh
[ -f "$PLAIN" ] || die "$PLAIN is missing"

# ---- work directory, copies of the binaries, cleanup ---------------------------
if [ -n "$KEEP" ]; then mkdir -p "$KEEP"; W=$(cd "$KEEP" && pwd); else W=$(mktemp -d /tmp/vmmig.XXXXXX); fi
# Unix sockets (QMP, migration) live under $W/agent-N/vms/vm-<16 hex>/ and the
# anchor's $W/anchor/run-*/: a socket path must fit in 108 bytes.
[ "${#W}" -le 56 ] || die "work directory path too long for unix sockets (${#W} > 56 chars): $W"
BIN=$W/bin
mkdir -p "$BIN"
for b in novacron novacron-controller novacron-agent; do cp "$BIN_DIR/$b" "$BIN/$b"; done

CTL_PID=
AGENT_PIDS=()
STATES=("$W/agent-0" "$W/agent-1")
CLI_CFG=$W/cli-config.toml
is_qemu() { [ -n "$1" ] && grep -q '^qemu' "/proc/$1/comm" 2>/dev/null; }
kill_vms() { # every QEMU whose pid file is in an agent's state directory
  local f p
  for f in "${STATES[0]}"/vms/vm-*/qemu.pid "${STATES[1]}"/vms/vm-*/qemu.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f" 2>/dev/null) || continue
    is_qemu "$p" && kill "$p" 2>/dev/null
  done
  return 0
}
cleanup() {
  local rc=$? p
  set +e
  # Agents first (so that none starts a VM again), then their QEMUs (daemonized:
  # they outlive the agents), then the controller.
  for p in "${AGENT_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${AGENT_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  kill_vms
  [ -n "$CTL_PID" ] && kill "$CTL_PID" 2>/dev/null
  if [ -n "$CTL_PID" ]; then
    for _ in $(seq 50); do kill -0 "$CTL_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$CTL_PID" 2>/dev/null
  fi
  wait 2>/dev/null
  if [ -z "$KEEP" ]; then
    if [ "$rc" -ne 0 ]; then echo "work directory kept for inspection: $W" >&2; else rm -rf "$W"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- helpers -----------------------------------------------------------------
alive() { # a process that exists and is not a zombie
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
free_port() { # a port free for TCP on every address
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 30000))
    if [ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ]; then echo "$p"; return 0; fi
  done
  die "no free port found"
}
compiling() { # 1 when a compiler or cargo runs on this host
  local c
  for c in rustc cargo cc1 cc ld ld.lld rust-lld; do pgrep -x "$c" >/dev/null && { echo 1; return 0; }; done
  echo 0
}
progress_lines() { local n; n=$(grep -c '^novacron-dirty: n=' "$1" 2>/dev/null) || true; echo "${n:-0}"; }
dirty_rate_of() { # CONSOLE-LOG -> MiB/s between the first and last progress lines (as the anchor)
  sed -n 's/^novacron-dirty: .*n=\([0-9]*\) uptime_cs=\([0-9]*\).*/\1 \2/p' "$1" 2>/dev/null |
    awk 'NR==1{n0=$1; t0=$2} {n=$1; t=$2} END{ if (NR >= 2 && t > t0) printf "%.2f", (n - n0) * 100 / (t - t0); else print "null" }'
}
count_at() { { curl -s -m 10 "http://$1:$2/cgi-bin/count" 2>/dev/null || true; } | tr -d '\r\n '; }
live_vm_dir() { # STATE-DIR -> the directory of a VM whose QEMU lives there, if any
  local f p
  for f in "$1"/vms/vm-*/qemu.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f" 2>/dev/null) || continue
    if [ -n "$p" ] && alive "$p"; then dirname "$f"; return 0; fi
  done
  return 0
}
live_qemus() { # pids of the live QEMUs of both agents
  local f p
  for f in "${STATES[0]}"/vms/vm-*/qemu.pid "${STATES[1]}"/vms/vm-*/qemu.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f" 2>/dev/null) || continue
    if [ -n "$p" ] && alive "$p"; then echo "$p"; fi
  done
  return 0
}

# The migration driver, the job-status reader, the recorder and the report:
# python3, standard library.
PY=$W/vm-migrate.py
cat >"$PY" <<'PYEOF'
import json, statistics, subprocess, sys, threading, time, urllib.request


def health(url, timeout):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.read().decode().strip() == "ok"
    except Exception:
        return False


def busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    b = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return b, b + v[3] + v[4]


def do_migrate(out, stdout_file, stderr_file, health_url, limit_s, *cmd):
    """Runs the migrate command; from its start, probes health_url every 50 ms
    (each probe waits at most 2 s) until it says ok. Writes the times."""
    limit_s = float(limit_s)
    lock = threading.Lock()
    first_ok = [None]
    exited = [None]
    b0, t0_all = busy()
    t0 = time.monotonic()
    with open(stdout_file, "w") as so, open(stderr_file, "w") as se:
        p = subprocess.Popen(list(cmd), stdout=so, stderr=se)

    def waiter():
        try:
            p.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        exited[0] = time.monotonic()

    def probe():
        if health(health_url, 2.0):
            t = time.monotonic()
            with lock:
                if first_ok[0] is None or t < first_ok[0]:
                    first_ok[0] = t

    w = threading.Thread(target=waiter)
    w.start()
    probes = []
    while True:
        now = time.monotonic()
        with lock:
            ok = first_ok[0] is not None
        if ok:
            break
        if exited[0] is not None and (p.returncode != 0 or now - exited[0] > 60):
            break
        if now - t0 > limit_s + 60:
            break
        probes = [t for t in probes if t.is_alive()]
        if len(probes) < 60:
            t = threading.Thread(target=probe, daemon=True)
            t.start()
            probes.append(t)
        time.sleep(0.05)
    w.join()
    for t in probes:
        t.join(timeout=3)
    b1, t1_all = busy()
    res = {
        "cmd_rc": p.returncode,
        "migrate_cmd_s": round(exited[0] - t0, 3),
        "migrate_to_health_s": None if first_ok[0] is None else round(first_ok[0] - t0, 3),
        "host_busy_pct": round(100.0 * (b1 - b0) / max(1, t1_all - t0_all), 1),
    }
    with open(out, "w") as f:
        json.dump(res, f)
    print(json.dumps(res))


def do_ready_alloc(status_file):
    """From `novacron job status -o json`: 'ID NODE' of the allocation that is
    wanted, running and healthy; nothing otherwise."""
    try:
        d = json.load(open(status_file))
    except Exception:
        return
    for a in d.get("allocations", []):
        if a.get("desired_run") and a.get("state") == "running" and a.get("healthy") is True:
            print(a["id"], a["node"])
            return


def do_alloc_state(status_file):
    """A one-line summary of the job's allocations, for error messages."""
    try:
        d = json.load(open(status_file))
        print("; ".join("%s on %s: %s healthy=%s %s" % (a.get("id"), a.get("node"), a.get("state"),
                                                        a.get("healthy"), a.get("message"))
                        for a in d.get("allocations", [])) or "no allocations")
    except Exception as e:
        print("no status (%s)" % e)


def do_pick_migration(listing, alloc, out):
    """The latest migration of `alloc` from GET /v1/migrations, into `out`."""
    try:
        ms = [m for m in json.load(open(listing)) if m.get("alloc") == alloc]
    except Exception:
        ms = []
    if ms:
        ms.sort(key=lambda m: m.get("started_unix_ms") or 0)
        with open(out, "w") as f:
            json.dump(ms[-1], f)


def do_summary(mig_file, times_file):
    """Prints 'phase downtime_ms elapsed_ms transferred rounds forced cmd_s health_s'."""
    try:
        m = json.load(open(mig_file))
    except Exception:
        m = {}
    try:
        t = json.load(open(times_file))
    except Exception:
        t = {}
    vm = m.get("vm") or {}
    v = [m.get("phase"), m.get("downtime_ms"), vm.get("elapsed_ms"), vm.get("transferred"),
         vm.get("rounds"), vm.get("forced_pause"), t.get("migrate_cmd_s"), t.get("migrate_to_health_s")]
    print(" ".join("-" if x is None else str(x).lower() if isinstance(x, bool) else str(x) for x in v))


def do_record(results, mig_file, times_file, *kv):
    rec = {}
    try:
        m = json.load(open(mig_file))
    except Exception:
        m = None
    try:
        t = json.load(open(times_file))
    except Exception:
        t = {}
    for item in kv:
        k, _, v = item.partition("=")
        try:
            rec[k] = json.loads(v)
        except ValueError:
            rec[k] = v
    vm = (m or {}).get("vm") or {}
    rec.update({
        "migration_id": (m or {}).get("id"),
        "phase": (m or {}).get("phase"),
        "mode": (m or {}).get("mode"),
        "downtime_ms": (m or {}).get("downtime_ms"),
        "total_time_ms": vm.get("elapsed_ms"),
        "transferred_bytes": vm.get("transferred"),
        "ram_total_bytes": vm.get("total"),
        "rounds": vm.get("rounds"),
        "forced_pause": vm.get("forced_pause"),
        "started_unix_ms": (m or {}).get("started_unix_ms"),
        "finished_unix_ms": (m or {}).get("finished_unix_ms"),
        "migration_error": (m or {}).get("error"),
        "migrate_cmd_s": t.get("migrate_cmd_s"),
        "migrate_cmd_rc": t.get("cmd_rc"),
        "migrate_to_health_s": t.get("migrate_to_health_s"),
        "host_busy_pct": t.get("host_busy_pct"),
    })
    if rec.get("started_unix_ms") and rec.get("finished_unix_ms"):
        rec["controller_span_ms"] = rec["finished_unix_ms"] - rec["started_unix_ms"]
    if rec.get("status") is None:
        if rec["phase"] == "completed" and rec["migrate_to_health_s"] is not None:
            rec["status"] = "completed"
        elif rec["phase"] == "completed":
            rec["status"] = "no-health"
        else:
            rec["status"] = rec["phase"] or "error"
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def do_report(results, anchor_file, meta):
    meta = json.loads(meta)
    anchor = json.load(open(anchor_file))
    a_by = {(r["mem_mib"], r["load"]): r for r in anchor.get("results", [])}
    groups = {}
    with open(results) as f:
        for line in f:
            r = json.loads(line)
            groups.setdefault((r["mem_mib"], r["load"]), []).append(r)
    out = []
    for (mem, load), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "completed"]
        g = lambda k: [r.get(k) for r in ok]
        mib = [None if r.get("transferred_bytes") is None else r["transferred_bytes"] / 1048576 for r in ok]
        a = a_by.get((mem, load), {})
        e = {
            "mem_mib": mem, "load": load, "runs": len(rs), "completed": len(ok),
            "median_downtime_ms": med(g("downtime_ms")),
            "median_total_ms": med(g("total_time_ms")),
            "median_transferred_mib": None if med(mib) is None else round(med(mib), 1),
            "median_rounds": med(g("rounds")),
            "median_migrate_cmd_s": med(g("migrate_cmd_s")),
            "median_migrate_to_health_s": med(g("migrate_to_health_s")),
            "median_controller_span_ms": med(g("controller_span_ms")),
            "forced_pauses": sum(1 for r in ok if r.get("forced_pause")),
            "continuity": "%d/%d" % (sum(1 for r in rs if r.get("continuity") is True), len(rs)),
            "median_guest_dirty_mib_s": med([r.get("guest_dirty_mib_s") for r in rs]),
            "median_host_busy_pct": med([r.get("host_busy_pct") for r in rs]),
            "anchor": {k: a.get(k) for k in ("runs", "completed", "median_downtime_ms", "median_total_ms",
                                              "median_transferred_mib", "median_downtime_mib", "median_rounds",
                                              "median_migrate_to_health_s", "continuity",
                                              "median_guest_dirty_mib_s", "median_others_pct")},
            "per_run": {k: [r.get(k) for r in rs] for k in (
                "status", "phase", "downtime_ms", "total_time_ms", "transferred_bytes", "rounds",
                "forced_pause", "migrate_cmd_s", "migrate_to_health_s", "controller_span_ms",
                "started_unix_ms", "finished_unix_ms", "continuity", "counter_source", "counter_target",
                "guest_dirty_mib_s", "host_busy_pct", "compiler", "from", "to", "alloc")},
        }
        e["per_run"]["errors"] = [r.get("error") or r.get("migration_error") for r in rs
                                  if r.get("status") != "completed"]
        e["ratio_downtime"] = ratio(e["median_downtime_ms"], a.get("median_downtime_ms"))
        e["ratio_total"] = ratio(e["median_total_ms"], a.get("median_total_ms"))
        e["ratio_transferred"] = ratio(e["median_transferred_mib"], a.get("median_transferred_mib"))
        e["ratio_migrate_to_health"] = ratio(e["median_migrate_to_health_s"], a.get("median_migrate_to_health_s"))
        out.append(e)

    def fmt(v, p=0):
        if v is None:
            return "-"
        return ("%%.%df" % p) % v

    hdr = ("size MiB", "load", "ok NC/anchor",
           "downtime ms NC", "anchor", "ratio",
           "total ms NC", "anchor", "ratio",
           "MiB sent NC", "anchor", "rounds NC", "anchor",
           "migrate cmd s NC", "migrate->health s NC", "anchor", "ratio",
           "continuity NC", "anchor", "forced pause NC", "dirty MiB/s NC", "anchor")
    rows = [hdr]
    for e in out:
        a = e["anchor"]
        rows.append((str(e["mem_mib"]), e["load"],
                     "%d/%d %s/%s" % (e["completed"], e["runs"], fmt(a.get("completed")), fmt(a.get("runs"))),
                     fmt(e["median_downtime_ms"]), fmt(a.get("median_downtime_ms")), fmt(e["ratio_downtime"], 2),
                     fmt(e["median_total_ms"]), fmt(a.get("median_total_ms")), fmt(e["ratio_total"], 2),
                     fmt(e["median_transferred_mib"], 1), fmt(a.get("median_transferred_mib"), 1),
                     fmt(e["median_rounds"]), fmt(a.get("median_rounds")),
                     fmt(e["median_migrate_cmd_s"], 2),
                     fmt(e["median_migrate_to_health_s"], 2), fmt(a.get("median_migrate_to_health_s"), 2),
                     fmt(e["ratio_migrate_to_health"], 2),
                     e["continuity"], a.get("continuity") or "-", str(e["forced_pauses"]),
                     fmt(e["median_guest_dirty_mib_s"], 2), fmt(a.get("median_guest_dirty_mib_s"), 2)))
    w = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
    for n, r in enumerate(rows):
        print(" | ".join(c.ljust(w[i]) if n == 0 or i == 1 else c.rjust(w[i]) for i, c in enumerate(r)))
        if n == 0:
            print("-+-".join("-" * x for x in w))
    print("(NC: NovaCron; medians over the completed runs; ratio = NovaCron / anchor; continuity counts all runs)")
    meta["results"] = out
    meta["anchor"] = anchor
    print(json.dumps(meta, separators=(",", ":")))


if __name__ == "__main__":
    op, args = sys.argv[1], sys.argv[2:]
    {"migrate": do_migrate, "ready-alloc": do_ready_alloc, "alloc-state": do_alloc_state,
     "pick-migration": do_pick_migration, "summary": do_summary, "record": do_record,
     "report": do_report}[op](*args)
PYEOF

CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
QEMU_VER=$(qemu-system-x86_64 --version | head -1 | awk '{print $4}')
case $(basename "$BIN_DIR") in debug | release) PROFILE=$(basename "$BIN_DIR") ;; *) PROFILE=unknown ;; esac
NC_VERSION=$("$BIN/novacron" --version 2>/dev/null | head -1 || true)
echo "== vm-migrate: NovaCron vs plain QEMU; sizes [$SIZES] MiB, loads [$LOADS], $RUNS runs each, accel tcg, work dir $W"
echo "   $(date -u '+%Y-%m-%d %H:%M:%S UTC'), nproc $(nproc), $CPU_MODEL, kernel $(uname -r), QEMU $QEMU_VER"
echo "   binaries from $BIN_DIR (profile $PROFILE): $NC_VERSION"

# ---- 1. the anchor -------------------------------------------------------------------
echo
echo "== anchor: bash tests/bench/vm-migrate-plain.sh --runs $RUNS --sizes \"$SIZES\" --loads \"$LOADS\" --keep $W/anchor"
ANCHOR_START=$(date +%s)
bash "$PLAIN" --runs "$RUNS" --sizes "$SIZES" --loads "$LOADS" --keep "$W/anchor" 2>&1 | tee "$W/anchor.out" ||
  die "vm-migrate-plain.sh failed (its output: $W/anchor.out)"
tail -n 1 "$W/anchor.out" >"$W/anchor.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d.get("bench") == "vm-migrate-plain" and "results" in d' \
  "$W/anchor.json" 2>/dev/null || die "vm-migrate-plain.sh's last line is not its JSON (see $W/anchor.out)"
ANCHOR_S=$(($(date +%s) - ANCHOR_START))

# The dirty load: the user-data the anchor's own dirty runs used.
USER_DATA=
if [[ " $LOADS " == *" dirty "* ]]; then
  for f in "$W"/anchor/run-*-dirty-*/seed/user-data; do
    [ -f "$f" ] && { USER_DATA=$f; break; }
  done
  { [ -n "$USER_DATA" ] && grep -q 'novacron-dirty: n=' "$USER_DATA"; } ||
    die "no dirty-load user-data in the anchor's work directory ($W/anchor/run-*-dirty-*/seed/user-data)"
  cp "$USER_DATA" "$W/user-data"
  USER_DATA=$W/user-data
fi

# ---- 2. NovaCron: one controller, two agents --------------------------------------------
echo
echo "== NovaCron: a controller and two agents (${NODES[0]} on ${PUBLISH[0]}, ${NODES[1]} on ${PUBLISH[1]})"
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
for _ in $(seq 300); do
  if api /healthz >/dev/null 2>&1 || ! kill -0 "$CTL_PID" 2>/dev/null; then break; fi
  sleep 0.1
done
api /healthz >/dev/null 2>&1 || { tail -n 30 "$W/controller.log" >&2; die "the controller's API did not answer within 30 s"; }

for n in 0 1; do
  TOKEN=$("$BIN/novacron-controller" --data-dir "$W/controller" token create --quiet --uses 1) ||
    die "token create failed"
  "$BIN/novacron-agent" join --controller "https://127.0.0.1:$CPORT" --token "$TOKEN" \
    --ca-fingerprint "$FP" --name "${NODES[$n]}" --state-dir "${STATES[$n]}" >"$W/join-$n.out" 2>&1 ||
    { cat "$W/join-$n.out" >&2; die "novacron-agent join (${NODES[$n]}) failed"; }
  NOVACRON_VM_LAUNCH=direct NOVACRON_VM_ACCEL=tcg RUST_LOG=info "$BIN/novacron-agent" run \
    --state-dir "${STATES[$n]}" --publish-address "${PUBLISH[$n]}" --ingress-address off \
    >/dev/null 2>"$W/agent-$n.log" &
  AGENT_PIDS+=("$!")
done
for n in 0 1; do
  ready=0
  for _ in $(seq 300); do
    if api "/v1/nodes/${NODES[$n]}" 2>/dev/null | grep -q '"status": *"ready"'; then ready=1; break; fi
    kill -0 "${AGENT_PIDS[$n]}" 2>/dev/null || break
    sleep 0.1
  done
  [ "$ready" = 1 ] || { tail -n 30 "$W/agent-$n.log" >&2; die "node ${NODES[$n]} not ready within 30 s"; }
  api "/v1/nodes/${NODES[$n]}" | grep -q '"accelerator": *"tcg"' ||
    die "node ${NODES[$n]} reports no VM capability under tcg: $(api "/v1/nodes/${NODES[$n]}" | grep -A4 '"vm"')"
done
echo "   controller 127.0.0.1:$CPORT (pid $CTL_PID), agents pids ${AGENT_PIDS[*]}: both ready, accelerator tcg"

RESULTS=$W/results.jsonl
: >"$RESULTS"
node_index() { # NODE-NAME -> 0 or 1
  if [ "$1" = "${NODES[0]}" ]; then echo 0; elif [ "$1" = "${NODES[1]}" ]; then echo 1; else echo -1; fi
}

one_run() { # SIZE LOAD I: appends one record to $RESULTS
  local mem=$1 load=$2 i=$3 R name port deadline line alloc node from to last next cont reason='' vmdir
  local cc0 fd='' rate=null st s
  R=$W/run-$mem-$load-$i
  rm -rf "$R"
  mkdir -p "$R"
  name=mig-$mem-$load-$i
  port=$(free_port)
  record() { # key=value pairs
    python3 "$PY" record "$RESULTS" "$R/migration.json" "$R/times.json" "mem_mib=$mem" "load=$load" "run=$i" \
      "job=\"$name\"" "host_port=$port" "$@"
  }
  stop_job() {
    local p gone=0
    cli job stop "$name" >"$R/stop.out" 2>&1 || echo "  run $i: novacron job stop $name failed: $(cat "$R/stop.out")" >&2
    for _ in $(seq 600); do
      if [ -z "$(live_qemus)" ]; then gone=1; break; fi
      sleep 0.2
    done
    if [ "$gone" = 0 ]; then
      echo "  run $i: QEMU still running 120 s after job stop; killing it" >&2
      for p in $(live_qemus); do is_qemu "$p" && kill "$p"; done
      sleep 2
    fi
    # The VMs' directories go after QEMU; wait for them so the next run starts clean.
    for _ in $(seq 300); do
      compgen -G "${STATES[0]}/vms/vm-*" >/dev/null || compgen -G "${STATES[1]}/vms/vm-*" >/dev/null || break
      sleep 0.1
    done
  }
  fail_run() {
    echo "  ${mem} MiB $load run $i: FAILED: $1" >&2
    [ -z "$fd" ] || exec {fd}<&-
    record "status=\"error\"" "error=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1")" "continuity=false"
    stop_job
  }

  {
    cat <<EOF
apiVersion: novacron.io/v1
kind: Job
metadata: {name: $name}
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
      memory: ${mem}Mi
      kernel: /boot/vmlinuz
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 quiet panic=-1
EOF
    if [ "$load" = dirty ]; then
      echo "      userData: |"
      sed 's/^/        /' "$USER_DATA"
    fi
    cat <<EOF
  health:
    readiness: {http: {port: 8080, path: /health}, period: 2s, timeout: 1s}
  resources: {cpu: 500m, memory: $((mem + 64))Mi}
EOF
  } >"$R/job.yaml"
  cli apply -f "$R/job.yaml" >"$R/apply.out" 2>&1 || { fail_run "novacron apply failed: $(cat "$R/apply.out")"; return 0; }

  # Running and healthy.
  deadline=$(($(date +%s) + 180))
  line=
  while [ -z "$line" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail_run "not running and healthy within 180 s of apply: $(python3 "$PY" alloc-state "$R/status.json")"
      return 0
    fi
    sleep 0.5
    cli job status "$name" -o json >"$R/status.json" 2>/dev/null || true
    line=$(python3 "$PY" ready-alloc "$R/status.json")
  done
  read -r alloc node <<<"$line"
  from=$(node_index "$node")
  [ "$from" -ge 0 ] || { fail_run "allocation $alloc on an unknown node '$node'"; return 0; }
  to=$((1 - from))
  if [ "$(curl -s -m 5 "http://${PUBLISH[$from]}:$port/health" 2>/dev/null)" != ok ]; then
    fail_run "healthy, but /health on ${PUBLISH[$from]}:$port does not say ok"
    return 0
  fi
  last=
  for _ in $(seq "$COUNT_BUMPS"); do last=$(count_at "${PUBLISH[$from]}" "$port"); done
  [[ $last =~ ^[0-9]+$ ]] || { fail_run "source counter answered '$last'"; return 0; }
  vmdir=$(live_vm_dir "${STATES[$from]}")
  [ -n "$vmdir" ] || { fail_run "no live QEMU in ${STATES[$from]}/vms"; return 0; }
  [ -n "$QEMU_CMDLINE" ] || QEMU_CMDLINE=$(tr '\0' ' ' <"/proc/$(cat "$vmdir/qemu.pid")/cmdline" 2>/dev/null || true)
  # Keep the source's console open: the agent moves and removes it once the
  # migration is done; what the guest printed until its pause stays readable.
  exec {fd}<"$vmdir/serial.run.log"
  if [ "$load" = dirty ]; then
    # As the anchor: the dirtier's start line and two progress lines (steady state).
    deadline=$(($(date +%s) + 120))
    while [ "$(progress_lines "$vmdir/serial.run.log")" -lt 2 ]; do
      if [ "$(date +%s)" -ge "$deadline" ]; then fail_run "the dirty load did not start within 120 s"; return 0; fi
      sleep 0.2
    done
  fi

  # The migration.
  cc0=$(compiling)
  python3 "$PY" migrate "$R/times.json" "$R/migrate.out" "$R/migrate.err" \
    "http://${PUBLISH[$to]}:$port/health" 700 \
    "$BIN/novacron" --config "$CLI_CFG" alloc migrate "$alloc" --to "${NODES[$to]}" -o json >/dev/null ||
    { fail_run "the migration driver failed"; return 0; }
  cc0=$(( cc0 | $(compiling) ))
  cat <&"$fd" >"$R/source-console.log" 2>/dev/null || true
  exec {fd}<&-
  fd=
  [ "$load" != dirty ] || rate=$(dirty_rate_of "$R/source-console.log")
  # The migration's record: what the command printed, else the controller's list.
  if ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))["phase"]' "$R/migrate.out" 2>/dev/null; then
    api /v1/migrations >"$R/migrations.json" 2>/dev/null || true
    python3 "$PY" pick-migration "$R/migrations.json" "$alloc" "$R/migration.json"
  else
    cp "$R/migrate.out" "$R/migration.json"
  fi

  # Continuity: the target's counter goes on from the source's.
  cont=false
  next=
  read -r s_phase s_dt s_tt s_tb s_rd s_fp s_cmd s_h <<<"$(python3 "$PY" summary "$R/migration.json" "$R/times.json")"
  if [ "$s_phase" = completed ]; then
    next=$(count_at "${PUBLISH[$to]}" "$port")
    if [ "$next" = "$((last + 1))" ]; then cont=true; else reason="counter: source $last, target ${next:-none}"; fi
  else
    reason="migration ${s_phase}: $(head -c 300 "$R/migrate.err" | tr '\n' ' ')"
  fi
  record "continuity=$cont" "counter_source=${last:-null}" "counter_target=${next:-null}" "compiler=$cc0" \
    "guest_dirty_mib_s=$rate" "alloc=\"$alloc\"" "from=\"${NODES[$from]}\"" "to=\"${NODES[$to]}\""
  st=$s_phase
  s=$(awk -v b="$s_tb" 'BEGIN{ if (b ~ /^[0-9]+$/) printf "%.1f", b / 1048576; else print "-" }')
  echo "  ${mem} MiB $load run $i: $st; downtime ${s_dt} ms, total ${s_tt} ms, sent $s MiB, ${s_rd} rounds," \
    "forced pause ${s_fp}; migrate command ${s_cmd} s, migrate->target /health ${s_h} s;" \
    "counter $last -> ${next:-?} (continuity $cont${reason:+: $reason}), guest dirty ${rate} MiB/s, compiler $cc0"
  stop_job
}

QEMU_CMDLINE=
NC_START=$(date +%s)
for mem in $SIZES; do
  for load in $LOADS; do
    for i in $(seq "$RUNS"); do
      one_run "$mem" "$load" "$i"
    done
  done
done
NC_S=$(($(date +%s) - NC_START))

# ---- 3. results ---------------------------------------------------------------------
echo
echo "== results: NovaCron (NC) vs plain QEMU (anchor); accel tcg, QEMU $QEMU_VER, $(nproc) cores, binaries $PROFILE"
meta=$(python3 -c 'import json,sys; a=sys.argv; print(json.dumps({"bench":"vm-migrate","accel":"tcg","date":a[1],"nproc":int(a[2]),"cpu":a[3],"kernel":a[4],"qemu":a[5],"bin_dir":a[6],"build_profile":a[7],"novacron_version":a[8],"runs":int(a[9]),"sizes":[int(x) for x in a[10].split()],"loads":a[11].split(),"anchor_wall_s":int(a[12]),"novacron_wall_s":int(a[13]),"nodes":{"publish":a[14].split(),"launch":"direct","ingress":"off"},"downtime_limit_ms":300,"converge_within_s":90,"count_bumps":int(a[15]),"novacron_qemu_cmdline":a[16]}))' \
  "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$(nproc)" "$CPU_MODEL" "$(uname -r)" "$QEMU_VER" "$BIN_DIR" "$PROFILE" "$NC_VERSION" \
  "$RUNS" "$SIZES" "$LOADS" "$ANCHOR_S" "$NC_S" "${PUBLISH[*]}" "$COUNT_BUMPS" "$QEMU_CMDLINE")
python3 "$PY" report "$RESULTS" "$W/anchor.json" "$meta" | tee "$W/report.txt"

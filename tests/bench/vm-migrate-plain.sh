#!/usr/bin/env bash
# Virtual machines, live migration: the ANCHOR. A plain QEMU-to-QEMU live
# migration (pre-copy) of the project's tiny guest (`novacron/guest-tiny:1`),
# done by hand on this host, source and target under the same accelerator (TCG:
# nested KVM cannot boot guests on the project's machines). NovaCron's own VM
# migration is to be measured against these figures.
#
# What it does, all on this host:
#   1. Copies /boot/vmlinuz, /boot/initrd.img and /novacron-vm.json out of the
#      image once (`docker create` + `docker cp`), as the agent does.
#   2. For each memory size (--sizes) x load (--loads) x run (--runs):
#      - starts the source QEMU with packaging/vm/boot-test.sh's command line
#        (-accel tcg -M q35 -m SIZE -smp 1 -kernel -initrd -append, -nodefaults
#        -no-user-config -display none, serial to a file, QMP on a unix socket,
#        user networking with a hostfwd to guest port 8080, virtio-net-pci,
#        -daemonize) and waits for /health to say `ok`;
#      - bumps the guest's in-memory counter (/cgi-bin/count) 3 times;
#      - starts the target QEMU with the same command line but its own QMP
#        socket, serial file, hostfwd port, and `-incoming unix:RUN/mig.sock`;
#      - on the source, over QMP: migrate-set-parameters downtime-limit 300 ms,
#        max-bandwidth 10 GiB/s (so bandwidth is not the cap), capability
#        auto-converge on; `migrate` to unix:RUN/mig.sock; query-migrate every
#        50 ms until `completed` or `failed` (at most --timeout s, then
#        migrate_cancel and the run counts as failed);
#      - records from the source's final query-migrate: total-time, downtime
#        (ms), ram.transferred and ram.downtime-bytes (bytes: all, and those
#        sent while the guest was stopped), ram.dirty-sync-count (rounds: the
#        bitmap syncs, the first and the final one included); and the wall time
#        from the migrate command to the target's /health saying `ok` (the
#        target starts the guest by itself when the migration completes);
#      - checks continuity: the next /cgi-bin/count on the TARGET's port must be
#        the source's last value + 1;
#      - quits both QEMUs over QMP.
# Loads:
#   idle   the guest only runs its init, httpd and the 3 counter requests.
#   dirty  the guest rewrites a working set of --dirty-wss MiB (a file in its
#          RAM-backed root) 1 MiB at a time, paced to --dirty-rate MiB/s, with
#          alternating random contents (not zero pages: QEMU sends zero pages
#          almost for free). The guest has no HTTP hook to start a load, and its
#          /init reads nothing from the kernel command line but the hostname;
#          its one hook is a NoCloud seed: a read-only FAT disk labelled cidata
#          (QEMU's vvfat, exactly as in `boot-test.sh --seed`) whose `user-data`
#          /init runs after `ready`. So dirty runs add that disk
#          (-drive if=none,...,file.driver=vvfat,... -device virtio-blk-pci) to
#          BOTH QEMUs; idle runs have no seed. The dirtier prints its progress on
#          the console; the rate it achieved before the migration is reported.
# How to read it: QEMU stops the guest for the switchover as soon as what is
# left to send fits in downtime-limit at the bandwidth it measured. Over a local
# unix socket that is GB/s, so the switchover can come while the first (bulk)
# pass still has tens of MiB to go: "MiB in downtime" shows it, and the downtime
# then mostly measures that copy, not the guest's dirtying.
# Other load: the host's busy time during each migration (migrate -> target
# /health) minus what the two QEMUs used is reported as "others" (% of one core),
# with whether a compiler was running; nothing is discarded.
#
# Usage: bash tests/bench/vm-migrate-plain.sh [--runs N] [--sizes "256 1024"]
#          [--loads "idle dirty"] [--timeout S] [--dirty-rate MIBS]
#          [--dirty-wss MIB] [--keep DIR]
#   --runs N          runs of each size x load (default 3)
#   --sizes LIST      guest memory sizes in MiB (default "256 1024")
#   --loads LIST      any of idle, dirty (default "idle dirty")
#   --timeout S       cap on one migration, then migrate_cancel (default 300)
#   --dirty-rate N    MiB/s the dirty load writes (whole number, default 4)
#   --dirty-wss N     MiB the dirty load rewrites in turn (default 64)
#   --keep DIR        work in DIR and keep it (consoles, QMP replies, results)
# Prints a table and one JSON line (medians over the completed runs). Needs
# qemu-system-x86_64, docker, curl, python3 (standard library: the QMP client),
# ss. No KVM: always -accel tcg. Two TCG guests run at once during a migration.
set -euo pipefail

RUNS=3
SIZES="256 1024"
LOADS="idle dirty"
TIMEOUT=300
DIRTY_RATE=4
DIRTY_WSS=64
KEEP=
IMAGE=novacron/guest-tiny:1
DOWNTIME_LIMIT_MS=300
MAX_BANDWIDTH=$((10 * 1024 * 1024 * 1024)) # bytes/s
COUNT_BUMPS=3
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --loads) LOADS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --dirty-rate) DIRTY_RATE=$2; shift 2 ;;
    --dirty-wss) DIRTY_WSS=$2; shift 2 ;;
    --keep) KEEP=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 64 ;;
  esac
done
for v in RUNS TIMEOUT DIRTY_RATE DIRTY_WSS; do
  [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -ge 1 ] ||
    { echo "error: --$(echo "$v" | tr 'A-Z_' 'a-z-') needs a whole number >= 1" >&2; exit 64; }
done
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

# ---- work directory, cleanup ---------------------------------------------------
if [ -n "$KEEP" ]; then mkdir -p "$KEEP"; W=$(cd "$KEEP" && pwd); else W=$(mktemp -d /tmp/vmmig.XXXXXX); fi
# A unix socket path must fit in 108 bytes: RUN/mig.sock and RUN/src/qmp.sock.
[ "${#W}" -le 70 ] || die "work directory path too long for unix sockets (${#W} > 70 chars): $W"
is_qemu() { [ -n "$1" ] && grep -q '^qemu' "/proc/$1/comm" 2>/dev/null; }
cleanup() {
  local rc=$? f p
  set +e
  # QEMU daemonizes: kill every QEMU whose pid file is in the work directory.
  for f in "$W"/run-*/src/qemu.pid "$W"/run-*/dst/qemu.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f" 2>/dev/null)
    is_qemu "$p" && kill "$p"
  done
  if [ -z "$KEEP" ]; then
    if [ "$rc" -ne 0 ]; then echo "work directory kept for inspection: $W" >&2; else rm -rf "$W"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- helpers -----------------------------------------------------------------
HZ=$(getconf CLK_TCK)
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a - b}'; }
alive() { # a process that exists and is not a zombie
  local st
  st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ]
}
free_port() { # a port free on loopback for TCP
  local p
  for _ in $(seq 100); do
    p=$((20000 + RANDOM % 30000))
    if [ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ]; then echo "$p"; return 0; fi
  done
  die "no free port found"
}
busy_jiffies() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
proc_jiffies() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
compiling() { # 1 when a compiler or cargo runs on this host
  local c
  for c in rustc cargo cc1 cc ld ld.lld rust-lld; do pgrep -x "$c" >/dev/null && { echo 1; return 0; }; done
  echo 0
}

# The QMP client, the migration driver and the report: python3, standard library.
PY=$W/migrate.py
cat >"$PY" <<'PYEOF'
import json, socket, statistics, sys, time, urllib.request


class Qmp:
    def __init__(self, path, timeout=10.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.n = 0
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError("no QMP greeting: %r" % greeting)
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, args=None, check=True):
        self.n += 1
        msg = {"execute": name, "id": self.n}
        if args is not None:
            msg["arguments"] = args
        self.f.write((json.dumps(msg) + "\n").encode())
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                continue
            if r.get("id") != self.n:
                continue
            if "error" in r and check:
                raise RuntimeError("%s: %s" % (name, r["error"]))
            return r.get("return", r)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def health(port, timeout=1.0):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%s/health" % port, timeout=timeout) as r:
            return r.read().decode().strip() == "ok"
    except Exception:
        return False


def do_cmd(sock, name, args=None):
    q = Qmp(sock)
    r = q.cmd(name, json.loads(args) if args else None)
    q.close()
    print(json.dumps(r))


def do_migrate(src_sock, dst_sock, uri, dst_port, downtime_ms, max_bw, timeout_s, out):
    res = {"status": "error", "error": None}
    q = Qmp(src_sock)
    try:
        q.cmd("migrate-set-capabilities",
              {"capabilities": [{"capability": "auto-converge", "state": True}]})
        q.cmd("migrate-set-parameters",
              {"downtime-limit": int(downtime_ms), "max-bandwidth": int(max_bw)})
        res["parameters"] = q.cmd("query-migrate-parameters")
        res["capabilities"] = [c["capability"] for c in q.cmd("query-migrate-capabilities") if c["state"]]
        t0 = time.monotonic()
        q.cmd("migrate", {"uri": uri})
        polls, last, last_active, peak_dirty_rate, statuses = 0, {}, {}, 0, []
        deadline = t0 + float(timeout_s)
        while True:
            last = q.cmd("query-migrate")
            polls += 1
            st = last.get("status", "?")
            if not statuses or statuses[-1] != st:
                statuses.append(st)
            peak_dirty_rate = max(peak_dirty_rate, last.get("ram", {}).get("dirty-pages-rate", 0))
            if "ram" in last:
                last_active = last
            if st in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                q.cmd("migrate_cancel", check=False)
                cdl = time.monotonic() + 10
                while time.monotonic() < cdl:
                    last = q.cmd("query-migrate")
                    if last.get("status") in ("cancelled", "failed", "completed"):
                        break
                    time.sleep(0.05)
                st = "timeout"
                break
            time.sleep(0.05)
        t_done = time.monotonic()
        res.update(status=st, statuses=statuses, polls=polls, final=last,
                   migrate_to_completed_s=round(t_done - t0, 3),
                   peak_dirty_pages_rate=peak_dirty_rate)
        ram = last.get("ram", {})
        if not ram and last_active:
            # A cancelled migration reports no statistics: keep the last poll's.
            ram = last_active.get("ram", {})
            res["stats_from_last_poll"] = last_active
        res.update({
            "total_time_ms": last.get("total-time"),
            "downtime_ms": last.get("downtime"),
            "setup_time_ms": last.get("setup-time"),
            "transferred_bytes": ram.get("transferred"),
            "downtime_bytes": ram.get("downtime-bytes"),
            "precopy_bytes": ram.get("precopy-bytes"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "mbps": ram.get("mbps"),
            "error_desc": last.get("error-desc"),
        })
        if st == "completed":
            hd = time.monotonic() + 60
            ok = False
            while time.monotonic() < hd:
                if health(dst_port):
                    ok = True
                    break
                time.sleep(0.05)
            res["migrate_to_health_s"] = round(time.monotonic() - t0, 3) if ok else None
            if not ok:
                res["status"] = "no-health"
            try:
                d = Qmp(dst_sock)
                res["target_status"] = d.cmd("query-status").get("status")
                d.close()
            except Exception as e:
                res["target_status"] = "error: %s" % e
            res["source_status"] = q.cmd("query-status").get("status")
    except Exception as e:
        res["status"] = "error"
        res["error"] = str(e)
    finally:
        q.close()
    with open(out, "w") as f:
        json.dump(res, f)
    print(res["status"])


def do_record(results, mig_file, *kv):
    try:
        with open(mig_file) as f:
            rec = json.load(f)
    except Exception as e:
        rec = {"status": "error", "error": "no migration result (%s)" % e}
    for item in kv:
        k, _, v = item.partition("=")
        try:
            rec[k] = json.loads(v)
        except ValueError:
            rec[k] = v
    with open(results, "a") as f:
        f.write(json.dumps(rec) + "\n")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def do_report(results, meta):
    meta = json.loads(meta)
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
        dmib = [None if r.get("downtime_bytes") is None else r["downtime_bytes"] / 1048576 for r in ok]
        e = {
            "mem_mib": mem, "load": load, "runs": len(rs), "completed": len(ok),
            "median_downtime_ms": med(g("downtime_ms")),
            "median_total_ms": med(g("total_time_ms")),
            "median_transferred_mib": None if med(mib) is None else round(med(mib), 1),
            "median_downtime_mib": None if med(dmib) is None else round(med(dmib), 1),
            "median_rounds": med(g("dirty_sync_count")),
            "median_migrate_to_health_s": med(g("migrate_to_health_s")),
            "continuity": "%d/%d" % (sum(1 for r in rs if r.get("continuity") is True), len(rs)),
            "median_guest_dirty_mib_s": med([r.get("guest_dirty_mib_s") for r in rs]),
            "median_others_pct": med([r.get("others_pct") for r in rs]),
            "per_run": {
                "status": [r.get("status") for r in rs],
                "downtime_ms": [r.get("downtime_ms") for r in rs],
                "total_time_ms": [r.get("total_time_ms") for r in rs],
                "transferred_bytes": [r.get("transferred_bytes") for r in rs],
                "downtime_bytes": [r.get("downtime_bytes") for r in rs],
                "dirty_sync_count": [r.get("dirty_sync_count") for r in rs],
                "migrate_to_health_s": [r.get("migrate_to_health_s") for r in rs],
                "mbps": [r.get("mbps") for r in rs],
                "continuity": [r.get("continuity") for r in rs],
                "guest_dirty_mib_s": [r.get("guest_dirty_mib_s") for r in rs],
                "peak_dirty_pages_rate": [r.get("peak_dirty_pages_rate") for r in rs],
                "others_pct": [r.get("others_pct") for r in rs],
                "compiler_running": [r.get("compiler") for r in rs],
                "errors": [r.get("error") or r.get("error_desc") for r in rs if r.get("status") != "completed"],
            },
        }
        out.append(e)

    def fmt(v, p=0):
        if v is None:
            return "-"
        return ("%%.%df" % p) % v

    hdr = ("size MiB", "load", "runs", "ok", "downtime ms", "total ms", "MiB sent",
           "MiB in downtime", "rounds", "migrate->health s", "continuity", "guest dirty MiB/s", "others %")
    rows = [hdr]
    for e in out:
        rows.append((str(e["mem_mib"]), e["load"], str(e["runs"]), str(e["completed"]),
                     fmt(e["median_downtime_ms"]), fmt(e["median_total_ms"]),
                     fmt(e["median_transferred_mib"], 1), fmt(e["median_downtime_mib"], 1),
                     fmt(e["median_rounds"]),
                     fmt(e["median_migrate_to_health_s"], 2), e["continuity"],
                     fmt(e["median_guest_dirty_mib_s"], 2), fmt(e["median_others_pct"])))
    w = [max(len(r[i]) for r in rows) for i in range(len(hdr))]
    for n, r in enumerate(rows):
        print(" | ".join(c.rjust(w[i]) if n and i not in (1, 10) else c.ljust(w[i]) for i, c in enumerate(r)))
        if n == 0:
            print("-+-".join("-" * x for x in w))
    print("(medians over the completed runs; continuity counts all runs)")
    meta["results"] = out
    print(json.dumps(meta, separators=(",", ":")))


if __name__ == "__main__":
    op, args = sys.argv[1], sys.argv[2:]
    {"cmd": do_cmd, "migrate": do_migrate, "record": do_record, "report": do_report}[op](*args)
PYEOF
qmp() { python3 "$PY" cmd "$@"; } # SOCKET COMMAND [ARGS-JSON]

# ---- 1. kernel, initrd and the image's recommendations, copied out once ---------
cid=$(docker create "$IMAGE") || die "docker create $IMAGE failed"
ok=1
for f in /boot/vmlinuz /boot/initrd.img /novacron-vm.json; do
  docker cp "$cid:$f" "$W/$(basename "$f")" >/dev/null 2>&1 || ok=0
done
docker rm "$cid" >/dev/null 2>&1 || true
[ "$ok" = 1 ] || die "could not copy /boot/vmlinuz, /boot/initrd.img, /novacron-vm.json out of $IMAGE"
field() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" "$W/novacron-vm.json"; }
MACHINE=$(field machine)
NIC=$(field nic)
APPEND=$(field cmdline)
MACHINE=${MACHINE:-q35}
NIC=${NIC:-virtio-net-pci}
APPEND=${APPEND:-console=ttyS0 quiet panic=-1}

# The dirty load: NoCloud user-data run by the guest's /init after `ready`.
write_dirtier() { # DIR
  cat >"$1/user-data" <<EOF
#!/bin/sh
# vm-migrate-plain dirtier: rewrites ${DIRTY_WSS} MiB of RAM-backed file, 1 MiB at a
# time, at ${DIRTY_RATE} MiB/s, alternating two random 1 MiB blocks.
wss=${DIRTY_WSS}
rate=${DIRTY_RATE}
EOF
  cat >>"$1/user-data" <<'EOF'
(
  dd if=/dev/urandom of=/tmp/dirty-a bs=1048576 count=1 2>/dev/null
  dd if=/dev/urandom of=/tmp/dirty-b bs=1048576 count=1 2>/dev/null
  i=0
  while [ $i -lt $wss ]; do
    dd if=/tmp/dirty-a of=/tmp/dirty bs=1048576 count=1 seek=$i conv=notrunc 2>/dev/null
    i=$((i + 1))
  done
  read -r up _ </proc/uptime
  t0=$(( ${up%.*} * 100 + 1${up#*.} - 100 ))
  echo "novacron-dirty: start wss=${wss}MiB rate=${rate}MiB/s n=0 uptime_cs=$t0"
  n=0
  pass=0
  while :; do
    if [ $((pass % 2)) -eq 0 ]; then src=/tmp/dirty-b; else src=/tmp/dirty-a; fi
    j=0
    while [ $j -lt $wss ]; do
      dd if=$src of=/tmp/dirty bs=1048576 count=1 seek=$j conv=notrunc 2>/dev/null
      n=$((n + 1))
      j=$((j + 1))
      read -r up _ </proc/uptime
      now=$(( ${up%.*} * 100 + 1${up#*.} - 100 ))
      due=$(( t0 + n * 100 / rate ))
      # More than 1 s behind (a migration pause, a busy host): restart the pace.
      if [ $((now - due)) -gt 100 ]; then t0=$(( now - n * 100 / rate )); due=$now; fi
      [ $now -ge $due ] || usleep $(( (due - now) * 10000 ))
      [ $((n % 16)) -ne 0 ] || echo "novacron-dirty: n=$n uptime_cs=$now"
    done
    pass=$((pass + 1))
  done
) </dev/null >/dev/console 2>&1 &
exit 0
EOF
  printf 'instance-id: vm-migrate-plain\n' >"$1/meta-data"
}

QARGS=()
qemu_args() { # DIR PORT HOST SEED-DIR-or-empty: sets QARGS (boot-test.sh's command line)
  local d=$1 port=$2 host=$3 seed=$4
  QARGS=(-accel tcg -M "$MACHINE" -m "$MEM" -smp 1
    -kernel "$W/vmlinuz" -initrd "$W/initrd.img" -append "$APPEND novacron.hostname=$host"
    -nodefaults -no-user-config -display none -serial "file:$d/console.log"
    -qmp "unix:$d/qmp.sock,server=on,wait=off"
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:8080" -device "$NIC,netdev=n0")
  if [ -n "$seed" ]; then
    QARGS+=(-drive "if=none,id=seed,format=raw,read-only=on,file.driver=vvfat,file.dir=$seed,file.label=cidata"
      -device "virtio-blk-pci,drive=seed")
  fi
  QARGS+=(-daemonize -pidfile "$d/qemu.pid")
}
quit_qemu() { # DIR
  local p
  p=$(cat "$1/qemu.pid" 2>/dev/null) || return 0
  alive "$p" || return 0
  qmp "$1/qmp.sock" quit >/dev/null 2>&1 || true
  for _ in $(seq 100); do alive "$p" || return 0; sleep 0.05; done
  kill "$p" 2>/dev/null || true
  for _ in $(seq 40); do alive "$p" || return 0; sleep 0.05; done
  kill -9 "$p" 2>/dev/null || true
}
count() { { curl -s -m 10 "http://127.0.0.1:$1/cgi-bin/count" 2>/dev/null || true; } | tr -d '\r\n '; }
progress_lines() { local n; n=$(grep -c '^novacron-dirty: n=' "$1" 2>/dev/null) || true; echo "${n:-0}"; }
mib_of() { case $1 in '' | *[!0-9]*) echo - ;; *) awk -v b="$1" 'BEGIN{printf "%.1f", b / 1048576}' ;; esac; }
dirty_rate_of() { # CONSOLE-LOG -> MiB/s between the first and last progress lines
  sed -n 's/^novacron-dirty: .*n=\([0-9]*\) uptime_cs=\([0-9]*\).*/\1 \2/p' "$1" 2>/dev/null |
    awk 'NR==1{n0=$1; t0=$2} {n=$1; t=$2} END{ if (NR >= 2 && t > t0) printf "%.2f", (n - n0) * 100 / (t - t0); else print "null" }'
}

RESULTS=$W/results.jsonl
: >"$RESULTS"
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
QEMU_VER=$(qemu-system-x86_64 --version | head -1 | awk '{print $4}')
echo "== vm-migrate-plain: sizes [$SIZES] MiB, loads [$LOADS], $RUNS runs each, accel tcg, work dir $W"
echo "   $(date -u '+%Y-%m-%d %H:%M:%S UTC'), nproc $(nproc), $CPU_MODEL, kernel $(uname -r), QEMU $QEMU_VER"
echo "   downtime-limit ${DOWNTIME_LIMIT_MS} ms, max-bandwidth $MAX_BANDWIDTH B/s, auto-converge on, unix socket;" \
  "dirty load ${DIRTY_RATE} MiB/s over ${DIRTY_WSS} MiB"

# ---- 2. the runs ------------------------------------------------------------------
one_run() { # SIZE LOAD I: appends one record to $RESULTS
  MEM=$1
  local load=$2 i=$3 R sp dp host seed='' spid dpid deadline h last c next cont reason='' cc0
  local sj0 dj0 hb0 t0 t1 others st rate
  R=$W/run-$MEM-$load-$i
  rm -rf "$R"
  mkdir -p "$R/src" "$R/dst"
  sp=$(free_port)
  dp=$(free_port)
  while [ "$dp" = "$sp" ]; do dp=$(free_port); done
  host=mig-$MEM-$load-$i
  if [ "$load" = dirty ]; then
    seed=$R/seed
    mkdir -p "$seed"
    write_dirtier "$seed"
  fi
  record() { # extra key=value pairs
    python3 "$PY" record "$RESULTS" "$R/migrate.json" "mem_mib=$MEM" "load=$load" "run=$i" "$@"
  }
  fail_run() {
    echo "  run $i: FAILED: $1" >&2
    tail -n 5 "$R/src/console.log" 2>/dev/null | sed 's/^/    src console: /' >&2 || true
    tail -n 5 "$R/dst/console.log" 2>/dev/null | sed 's/^/    dst console: /' >&2 || true
    quit_qemu "$R/dst"
    quit_qemu "$R/src"
    [ -f "$R/migrate.json" ] || python3 -c 'import json,sys; json.dump({"status": "error", "error": sys.argv[1]}, open(sys.argv[2], "w"))' "$1" "$R/migrate.json"
    record "continuity=false"
  }

  # The source, booted to /health.
  qemu_args "$R/src" "$sp" "$host" "$seed"
  printf '%q ' qemu-system-x86_64 "${QARGS[@]}" >"$R/src/cmdline"
  if ! qemu-system-x86_64 "${QARGS[@]}" 2>"$R/src/stderr"; then fail_run "source QEMU did not start: $(cat "$R/src/stderr")"; return 0; fi
  spid=$(cat "$R/src/qemu.pid")
  deadline=$(($(date +%s) + 120))
  h=
  while [ -z "$h" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then fail_run "source: no /health within 120 s"; return 0; fi
    alive "$spid" || { fail_run "source QEMU exited"; return 0; }
    if [ "$(curl -s -m 1 "http://127.0.0.1:$sp/health" 2>/dev/null)" = ok ]; then h=1; else sleep 0.1; fi
  done
  last=
  for _ in $(seq "$COUNT_BUMPS"); do last=$(count "$sp"); done
  [[ $last =~ ^[0-9]+$ ]] || { fail_run "source counter answered '$last'"; return 0; }
  if [ "$load" = dirty ]; then
    # Wait for the dirtier's start line and two progress lines (steady state).
    deadline=$(($(date +%s) + 120))
    while [ "$(progress_lines "$R/src/console.log")" -lt 2 ]; do
      if [ "$(date +%s)" -ge "$deadline" ]; then fail_run "the dirty load did not start within 120 s"; return 0; fi
      sleep 0.2
    done
  fi

  # The target, waiting for the incoming migration.
  qemu_args "$R/dst" "$dp" "$host" "$seed"
  QARGS+=(-incoming "unix:$R/mig.sock")
  printf '%q ' qemu-system-x86_64 "${QARGS[@]}" >"$R/dst/cmdline"
  if ! qemu-system-x86_64 "${QARGS[@]}" 2>"$R/dst/stderr"; then fail_run "target QEMU did not start: $(cat "$R/dst/stderr")"; return 0; fi
  dpid=$(cat "$R/dst/qemu.pid")
  for _ in $(seq 100); do [ -S "$R/mig.sock" ] && break; sleep 0.05; done
  [ -S "$R/mig.sock" ] || { fail_run "target: no migration socket $R/mig.sock"; return 0; }

  # The migration.
  cc0=$(compiling)
  sj0=$(proc_jiffies "$spid"); dj0=$(proc_jiffies "$dpid"); hb0=$(busy_jiffies); t0=$(now)
  st=$(python3 "$PY" migrate "$R/src/qmp.sock" "$R/dst/qmp.sock" "unix:$R/mig.sock" "$dp" \
    "$DOWNTIME_LIMIT_MS" "$MAX_BANDWIDTH" "$TIMEOUT" "$R/migrate.json") || st=error
  t1=$(now)
  others=$(awk -v h="$(( $(busy_jiffies) - hb0 ))" -v q="$(( $(proc_jiffies "$spid") - sj0 + $(proc_jiffies "$dpid") - dj0 ))" \
    -v w="$(sub "$t1" "$t0")" -v hz="$HZ" 'BEGIN{ o = w > 0 ? 100 * (h - q) / (w * hz) : 0; printf "%.0f", o < 0 ? 0 : o }')
  cc0=$(( cc0 | $(compiling) ))
  rate=null
  [ "$load" != dirty ] || rate=$(dirty_rate_of "$R/src/console.log")

  # Continuity: the target's counter goes on from the source's.
  cont=false
  next=
  if [ "$st" = completed ]; then
    next=$(count "$dp")
    if [ "$next" = "$((last + 1))" ]; then cont=true; else reason="counter: source $last, target $next"; fi
  else
    reason="migration $st"
  fi
  c=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(*["-" if r.get(k) is None else r[k] for k in ("downtime_ms", "total_time_ms", "transferred_bytes", "downtime_bytes", "dirty_sync_count", "migrate_to_health_s")], r.get("error") or r.get("error_desc") or "")' "$R/migrate.json" 2>/dev/null || echo "- - - - - - no result")
  record "continuity=$cont" "counter_source=${last:-null}" "counter_target=${next:-null}" "others_pct=$others" \
    "compiler=$cc0" "guest_dirty_mib_s=$rate" "source_port=$sp" "target_port=$dp"
  quit_qemu "$R/dst"
  quit_qemu "$R/src"
  read -r c_dt c_tt c_tb c_db c_rd c_h c_err <<<"$c"
  echo "  ${MEM} MiB $load run $i: $st; downtime ${c_dt} ms, total ${c_tt} ms, sent $(mib_of "$c_tb") MiB ($(mib_of "$c_db") MiB in the downtime)," \
    "${c_rd} rounds, migrate->target /health ${c_h} s; counter $last -> ${next:-?} (continuity $cont${reason:+: $reason})," \
    "guest dirty ${rate} MiB/s, others ${others}% of a core, compiler $cc0${c_err:+; $c_err}"
  [ -n "$KEEP" ] || rm -rf "$R"
}

for MEM in $SIZES; do
  for load in $LOADS; do
    for i in $(seq "$RUNS"); do
      one_run "$MEM" "$load" "$i"
    done
  done
done

# ---- 3. results ---------------------------------------------------------------------
echo
echo "== results (accel tcg, QEMU $QEMU_VER, $(nproc) cores)"
meta=$(python3 -c 'import json,sys; a=sys.argv; print(json.dumps({"bench":"vm-migrate-plain","accel":"tcg","date":a[1],"nproc":int(a[2]),"cpu":a[3],"kernel":a[4],"qemu":a[5],"machine":a[6],"nic":a[7],"smp":1,"transport":"unix","downtime_limit_ms":int(a[8]),"max_bandwidth_bytes_s":int(a[9]),"auto_converge":True,"timeout_s":int(a[10]),"dirty_rate_mib_s":int(a[11]),"dirty_wss_mib":int(a[12]),"runs":int(a[13])}))' \
  "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" "$(nproc)" "$CPU_MODEL" "$(uname -r)" "$QEMU_VER" "$MACHINE" "$NIC" \
  "$DOWNTIME_LIMIT_MS" "$MAX_BANDWIDTH" "$TIMEOUT" "$DIRTY_RATE" "$DIRTY_WSS" "$RUNS")
python3 "$PY" report "$RESULTS" "$meta"

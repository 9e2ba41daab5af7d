#!/usr/bin/env bash
# Install test: the .deb packages in a clean Debian 12 root, services started by
# systemd, an agent enrolled with install-agent.sh, then purge.
#
#   bash packaging/test-install.sh target/debian/novacron-{cli,controller,agent}_*.deb
#
# The root is `debootstrap --variant=minbase --include=systemd,systemd-sysv bookworm`
# from Debian's archive, imported once as the image novacron-debian-bookworm:1
# (about 70 s; reused afterwards). The container boots systemd as PID 1 (it needs
# CAP_SYS_ADMIN and an unconfined seccomp profile, no --privileged, which these
# hosts refuse: their bounding set lacks CAP_SYS_RESOURCE), so the units run
# exactly as shipped: Type=notify, User=novacron, the hardening. Inside it:
#   0. dpkg -i the CLI package alone: the binary, its man page and its bash, zsh
#      and fish completions, and no controller;
#   1. dpkg -i the controller package (it depends on novacron-cli); check files, conffiles, the novacron user,
#      the state directory, `systemd-analyze verify` and that nothing was enabled;
#   2. bad configuration: serve exits 64 naming the key and the file;
#   3. `init` as novacron, `systemctl start novacron-controller` (returns once
#      READY=1 is sent), the process runs as novacron with NoNewPrivs and its
#      system-call filter;
#   4. install-agent.sh --deb ... with a join token: Docker is missing, so it
#      installs Debian's docker.io (from the archive; its units are masked first:
#      a Docker daemon of the host serves this root), then the agent package (with
#      its dependencies: docker.io, ucf), which installs /etc/criu/runc.conf through
#      ucf; it enrolls and starts through systemd as root with only CAP_DAC_OVERRIDE,
#      CAP_FOWNER and CAP_MKNOD, NoNewPrivs and its system-call filter, and the
#      controller lists the node ready with Docker reachable;
#   5. live checkpoints, as the packaged service runs: the node's advertised
#      live_checkpoint (the agent's probe under its own unit) must agree with what
#      happens: a job runs on the node and `novacron alloc checkpoint --mode live`
#      must succeed exactly when the node claims live checkpoints, and a node that
#      does not claim them must say why. The agent uses the experimental Docker
#      daemon with CRIU of /var/tmp/novacron-ckpt/env (NOVACRON_CKPT_DOCKER_A, as
#      `.ci/setup checkpoint` starts it) when there is one, through a drop-in
#      (DOCKER_HOST and BindPaths= of that daemon's directory, as an operator with a
#      Docker data root outside /var/lib/docker would write), and the claim and the
#      checkpoint must then both succeed; otherwise the host's daemon, and the node
#      must report that it cannot, with the reason (NOVACRON_REQUIRE_LIVE=1 makes a
#      missing checkpoint daemon an error; NOVACRON_CKPT_DOCKER_A=none picks the
#      host's daemon);
#   5b. a virtual machine as the packaged agent runs it: QEMU from the archive,
#      the agent restarted (it reports the VM capability), a VMTemplate and `vm
#      create` of the tiny guest (.ci/setup vm builds its image): the VM must run
#      as a systemd unit of its own (novacron-vm-*.service), answer on its
#      published port, keep running (same QEMU, its in-memory counter going on)
#      across `systemctl restart novacron-agent`, and end with `vm destroy`;
#   5c. containers under runc as the packaged agent runs them: with only
#      container_runtime = runc set, the confined agent refuses to start (exit 64)
#      and names the drop-in; `install-agent.sh --runc`, rerun on the enrolled
#      host, links the packaged runc.conf; the agent then runs unconfined in the
#      host's mount namespace, the node reports runc, a job runs under runc, a
#      live checkpoint (CRIU driven by the agent) succeeds, and the container
#      keeps running (same process) across `systemctl restart novacron-agent`.
#      The sandboxes of runc containers are Docker containers whose processes the
#      agent must see, so this step runs a Docker daemon inside the root; CRIU is
#      the setup's (NOVACRON_CKPT_CRIU, `.ci/setup checkpoint`);
#   6. dpkg --purge all three: binaries, /etc/novacron, /var/lib/novacron and the
#      unchanged /etc/criu/runc.conf are gone; the novacron system user stays
#      (Debian practice);
#   7. an operator's own /etc/criu/runc.conf, there before the agent package, is
#      neither replaced by its install nor removed by its purge.
# Needs docker, debootstrap and Debian's archive (docker.io is installed from it).
# The container, and the job's containers, are removed on exit.
set -euo pipefail

IMAGE=novacron-debian-bookworm:1
MIRROR=${NOVACRON_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Bounds on the waits below.
BOOT_TIMEOUT_SECS=60
READY_TIMEOUT_SECS=60

here=$(cd "$(dirname "$0")" && pwd)
cli_deb="" ctl_deb="" agent_deb=""
for deb in "$@"; do
    case "$(basename "$deb")" in
    novacron-cli_*.deb) cli_deb=$(realpath "$deb") ;;
    novacron-controller_*.deb) ctl_deb=$(realpath "$deb") ;;
    novacron-agent_*.deb) agent_deb=$(realpath "$deb") ;;
    *) echo "unexpected argument $deb: expected the novacron-cli, novacron-controller and novacron-agent .deb files" >&2; exit 64 ;;
    esac
done
if [ -z "$cli_deb" ] || [ -z "$ctl_deb" ] || [ -z "$agent_deb" ]; then
    echo "usage: $0 novacron-cli_*.deb novacron-controller_*.deb novacron-agent_*.deb" >&2
    exit 64
fi

step() { printf '\n--- %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    step "building $IMAGE with debootstrap ($MIRROR)"
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=systemd,systemd-sysv bookworm "$rootfs" "$MIRROR" >/dev/null
    tar -C "$rootfs" -c . | docker import - "$IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

# The experimental Docker daemon with CRIU for the live checkpoint step, if any.
CKPT_ENV=/var/tmp/novacron-ckpt/env
# NOVACRON_CKPT_DOCKER_A=none: use the host's daemon even when there is one.
if [ -z "${NOVACRON_CKPT_DOCKER_A:-}" ] && [ -r "$CKPT_ENV" ]; then
    NOVACRON_CKPT_DOCKER_A=$(sed -n 's/^NOVACRON_CKPT_DOCKER_A=//p' "$CKPT_ENV")
fi
ckpt_host=${NOVACRON_CKPT_DOCKER_A:-}
[ "$ckpt_host" != none ] || ckpt_host=""
ckpt_dir=""
if [ -n "$ckpt_host" ]; then
    ckpt_sock=${ckpt_host#unix://}
    ckpt_dir=$(dirname "$ckpt_sock")
    ckpt_root=$(DOCKER_HOST=$ckpt_host docker info -f '{{.DockerRootDir}} {{.ExperimentalBuild}}')
    case "$ckpt_root" in
    "$ckpt_dir"/*" true") ckpt_root=${ckpt_root% true} ;;
    *) fail "the checkpoint daemon $ckpt_host: expected an experimental daemon with its data root under $ckpt_dir, got: $ckpt_root" ;;
    esac
elif [ "${NOVACRON_REQUIRE_LIVE:-}" = 1 ]; then
    fail "NOVACRON_REQUIRE_LIVE=1 but there is no checkpoint daemon (NOVACRON_CKPT_DOCKER_A, $CKPT_ENV): run .ci/setup checkpoint"
fi
# The Docker the agent uses, and the job that runs there.
agent_docker=${ckpt_host:-unix:///var/run/docker.sock}
job=install-test-$$
TEST_IMAGE=novacron-test/busybox:1
# The VM step: the tiny guest of packaging/vm/build-guest-image.sh (.ci/setup vm).
GUEST_IMAGE=novacron/guest-tiny:1
vm=install-vm-$$
VM_PORT=18089
VM_TIMEOUT_SECS=180
# The VM bridge the step asks install-agent.sh for (not the default's range: the
# setting is taken) and the guest on it.
VM_BRIDGE=10.216.0.1/24
# The runc step: CRIU (the setup's build: Debian 12's criu 3.17 fails on these
# kernels), and a Docker daemon inside the root for the sandboxes.
CKPT_CRIU=${NOVACRON_CKPT_CRIU:-}
if [ -z "$CKPT_CRIU" ] && [ -r "$CKPT_ENV" ]; then
    CKPT_CRIU=$(sed -n 's/^NOVACRON_CKPT_CRIU=//p' "$CKPT_ENV")
fi
[ -n "$CKPT_CRIU" ] && [ -x "$CKPT_CRIU" ] \
    || fail "no CRIU for the runc step (NOVACRON_CKPT_CRIU, $CKPT_ENV): run bash .ci/setup checkpoint"
# Its wrapper runs it from the directory beside it (criu-root).
criu_home=$(dirname "$(dirname "$CKPT_CRIU")")
INNER_DOCKER=unix:///run/novacron-test-docker.sock
runc_job=install-runc-$$

name=novacron-install-$$
pkg=$(mktemp -d)
cleanup() {
    local status=$?
    rm -rf "$pkg"
    if [ "$status" -ne 0 ]; then
        echo "--- journal of the failed run:" >&2
        docker exec "$name" journalctl --no-pager -n 60 -u novacron-controller -u novacron-agent >&2 || true
    fi
    docker rm -f -v "$name" >/dev/null 2>&1 || true
    DOCKER_HOST=$agent_docker docker ps -aq --filter "name=novacron-$job-" | xargs -r env DOCKER_HOST="$agent_docker" docker rm -f -v >/dev/null 2>&1 || true
    exit "$status"
}
trap cleanup EXIT

step "booting systemd in a container of $IMAGE"
# The host's Docker socket, reached inside through a docker group of the same gid,
# as on a real host.
docker_sock=/var/run/docker.sock
docker_gid=$(stat -c %g "$docker_sock")
[ "$docker_gid" -ne 0 ] || fail "$docker_sock belongs to group root; the test needs a docker group"
cp "$cli_deb" "$ctl_deb" "$agent_deb" "$here/install-agent.sh" "$pkg/"
chmod -R a+rX "$pkg"
# The checkpoint daemon's directory (socket and data root) at the same path, as if
# that daemon ran in this root.
ckpt_mount=()
[ -z "$ckpt_dir" ] || ckpt_mount=(-v "$ckpt_dir:$ckpt_dir")
# For the runc step: CRIU at its path, read-only; /proc/sys writable (CRIU
# restores pids through ns_last_pid) and /dev/net/tun (`criu check`); /var/lib on
# a volume, not the root's overlay, so that overlays (the runc containers' root
# file systems, the inner Docker's layers) can be mounted there.
docker run -d --name "$name" --hostname install-test \
    --cgroupns=private --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --security-opt systempaths=unconfined --device /dev/net/tun \
    --tmpfs /run --tmpfs /run/lock --tmpfs /tmp -e container=docker \
    -v "$pkg:/pkg:ro" -v "$docker_sock:/var/run/docker.sock" "${ckpt_mount[@]}" \
    -v "$criu_home:$criu_home:ro" -v /var/lib \
    "$IMAGE" /lib/systemd/systemd >/dev/null
inside() { docker exec "$name" "$@"; }
waited=0
until state=$(inside systemctl is-system-running 2>/dev/null) || [ "$state" = degraded ]; do
    [ "$waited" -lt "$BOOT_TIMEOUT_SECS" ] || fail "systemd did not boot in ${BOOT_TIMEOUT_SECS}s (state: ${state:-?})"
    sleep 1
    waited=$((waited + 1))
done
echo "systemd: $state after ${waited}s"

step "installing the CLI package alone (as on a laptop)"
inside dpkg -i "/pkg/$(basename "$cli_deb")"
for f in /usr/bin/novacron /usr/share/man/man1/novacron.1.gz \
    /usr/share/bash-completion/completions/novacron \
    /usr/share/zsh/vendor-completions/_novacron \
    /usr/share/fish/vendor_completions.d/novacron.fish; do
    inside test -s "$f" || fail "$f is missing from novacron-cli"
done
inside test ! -e /usr/bin/novacron-controller || fail "novacron-cli installed the controller"
inside sh -c 'zcat /usr/share/man/man1/novacron.1.gz | grep -q "^\.TH novacron 1"' || fail "the man page is not a novacron(1) page"
inside bash -c '. /usr/share/bash-completion/completions/novacron && complete -p novacron' >/dev/null \
    || fail "the bash completion does not register novacron"
inside novacron --version >/dev/null || fail "novacron --version failed"
echo "novacron-cli: binary, man page and bash, zsh and fish completions"

step "installing the controller package"
inside dpkg -i "/pkg/$(basename "$ctl_deb")"
for f in /usr/bin/novacron-controller /usr/bin/novacron; do
    inside test -x "$f" || fail "$f is missing"
done
inside test -f /etc/novacron/controller.toml || fail "/etc/novacron/controller.toml is missing"
inside dpkg-query -W -f='${Conffiles}\n' novacron-controller | grep -q /etc/novacron/controller.toml \
    || fail "/etc/novacron/controller.toml is not a conffile"
inside getent passwd novacron | grep -q ':/var/lib/novacron:/usr/sbin/nologin$' \
    || fail "no novacron system user: $(inside getent passwd novacron || true)"
[ "$(inside stat -c %U:%a /var/lib/novacron/controller)" = novacron:700 ] || fail "/var/lib/novacron/controller is not novacron:700"
inside systemd-analyze verify novacron-controller.service || fail "systemd-analyze verify novacron-controller.service"
[ "$(inside systemctl is-enabled novacron-controller || true)" = disabled ] || fail "the package enabled the controller before init"
echo "files, conffile, user, state directory and unit: ok"

step "bad configuration exits 64 and names the key and the file"
inside sh -c 'printf "[serve]\napi_listen = \"7443\"\n" > /tmp/bad.toml'
code=0
msg=$(inside runuser -u novacron -- novacron-controller --config /tmp/bad.toml serve 2>&1) || code=$?
echo "$msg"
[ "$code" -eq 64 ] || fail "exit $code, expected 64"
case "$msg" in *"serve.api_listen"*"/tmp/bad.toml"*) ;; *) fail "the message does not name the key and the file" ;; esac

step "init as novacron, then systemctl start novacron-controller"
fp=$(inside runuser -u novacron -- novacron-controller init --server-name localhost --server-name 127.0.0.1 \
    | grep -o 'sha256:[0-9a-f]*')
start=$(date +%s%N)
inside timeout "$READY_TIMEOUT_SECS" systemctl start novacron-controller || fail "the controller did not start"
echo "systemctl start returned after $((($(date +%s%N) - start) / 1000000)) ms (Type=notify: after READY=1)"
inside systemctl is-active --quiet novacron-controller || fail "the controller is not active"
pid=$(inside systemctl show -p MainPID --value novacron-controller)
[ "$(inside stat -c %U "/proc/$pid")" = novacron ] || fail "the controller does not run as novacron"
inside grep -q '^NoNewPrivs:[[:space:]]*1' "/proc/$pid/status" || fail "NoNewPrivileges is not in effect"
inside grep -q '^CapEff:[[:space:]]*0000000000000000' "/proc/$pid/status" || fail "the controller has capabilities"
# Seccomp mode 2: the unit's SystemCallFilter= is in effect.
inside grep -q '^Seccomp:[[:space:]]*2' "/proc/$pid/status" || fail "the controller's system-call filter is not in effect"
echo "controller active as novacron (pid $pid), no capabilities, NoNewPrivs, system calls filtered"

step "install-agent.sh: Docker, the package, enroll, start"
inside groupadd --system --gid "$docker_gid" docker
# docker.io comes from Debian's archive, but a daemon of the host serves this root:
# its units must not start here.
inside systemctl mask --quiet docker.service docker.socket containerd.service
if [ -n "$ckpt_host" ]; then
    # What an operator whose Docker keeps its data outside /var/lib/docker writes:
    # the endpoint, and that directory visible and writable in the unit's sandbox.
    inside mkdir -p /etc/systemd/system/novacron-agent.service.d
    inside sh -c "printf '[Service]\nEnvironment=DOCKER_HOST=%s\nBindPaths=%s\n' '$ckpt_host' '$ckpt_dir' \
        > /etc/systemd/system/novacron-agent.service.d/docker.conf"
fi
token=$(inside runuser -u novacron -- novacron-controller token create --quiet --uses 1)
inside sh /pkg/install-agent.sh --deb "/pkg/$(basename "$agent_deb")" \
    --controller https://localhost:7443 --token "$token" --ca-fingerprint "$fp" \
    --name install-test --label zone=test
inside systemctl is-active --quiet novacron-agent || fail "the agent is not active"
inside dpkg-query -W -f='${Conffiles}\n' novacron-agent | grep -q /etc/novacron/agent.toml \
    || fail "/etc/novacron/agent.toml is not a conffile"
inside dpkg-query -W -f='${Status}\n' docker.io | grep -q 'install ok installed' \
    || fail "install-agent.sh did not install docker.io"
for opt in tcp-close skip-in-flight; do
    inside grep -qx "$opt" /etc/criu/runc.conf || fail "/etc/criu/runc.conf lacks $opt"
done
inside grep -qx 'fs.pipe-max-size = 4194304' /usr/lib/sysctl.d/60-novacron-agent.conf \
    || fail "the agent's sysctl.d file (post-copy's pipe size) is missing"
inside ucfq -w /etc/criu/runc.conf | grep -q ':novacron-agent:' \
    || fail "/etc/criu/runc.conf is not registered with ucf for novacron-agent: $(inside ucfq -w /etc/criu/runc.conf || true)"
pid=$(inside systemctl show -p MainPID --value novacron-agent)
[ "$(inside stat -c %U "/proc/$pid")" = root ] || fail "the agent does not run as root"
# CAP_DAC_OVERRIDE (1), CAP_FOWNER (3) and CAP_MKNOD (27), nothing else.
inside grep -q '^CapBnd:[[:space:]]*000000000800000a$' "/proc/$pid/status" \
    || fail "the agent's capability bounding set is $(inside grep CapBnd "/proc/$pid/status")"
inside grep -q '^NoNewPrivs:[[:space:]]*1' "/proc/$pid/status" || fail "NoNewPrivileges is not in effect"
inside grep -q '^Seccomp:[[:space:]]*2' "/proc/$pid/status" || fail "the agent's system-call filter is not in effect"
echo "agent active as root (pid $pid) with CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_MKNOD only, NoNewPrivs, system calls filtered"
inside sh -c 'printf "current = \"t\"\n[contexts.t]\napi = \"https://127.0.0.1:7443\"\nca = \"/var/lib/novacron/controller/pki/ca.pem\"\ncert = \"/var/lib/novacron/controller/pki/admin.pem\"\nkey = \"/var/lib/novacron/controller/pki/admin-key.pem\"\n" > /tmp/ctx.toml && chmod 644 /tmp/ctx.toml'
nc() { inside runuser -u novacron -- novacron --config /tmp/ctx.toml "$@"; }
waited=0
until nc -o json node list 2>/dev/null \
    | tr -d ' \n' | grep -q '"name":"install-test","status":"ready"'; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "node install-test is not ready: $(nc node list 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
nc node list
echo "agent enrolled and ready after ${waited}s"

step "live checkpoints as the packaged agent runs (Docker at $agent_docker)"
node_json=$(nc -o json node show install-test)
claim=$(printf '%s' "$node_json" | python3 -c 'import json,sys; c=json.load(sys.stdin)["capabilities"]; print("true" if c["live_checkpoint"] else "false"); print(c.get("live_checkpoint_reason") or "")')
live=$(printf '%s\n' "$claim" | sed -n 1p)
reason=$(printf '%s\n' "$claim" | sed -n 2p)
nc node show install-test | grep 'Live checkpoint'
if ! DOCKER_HOST=$agent_docker docker image inspect "$TEST_IMAGE" >/dev/null 2>&1; then
    ctx=$(mktemp -d)
    cp "$here/images/busybox/Dockerfile" /bin/busybox "$ctx/"
    DOCKER_HOST=$agent_docker DOCKER_BUILDKIT=0 docker build -q -t "$TEST_IMAGE" "$ctx" >/dev/null
    rm -rf "$ctx"
fi
inside sh -c "printf 'apiVersion: novacron.io/v1\nkind: Job\nmetadata:\n  name: $job\nspec:\n  type: service\n  replicas: 1\n  task:\n    image: $TEST_IMAGE\n    command: [sleep, \"3600\"]\n  resources:\n    cpu: 100m\n    memory: 32Mi\n' > /tmp/job.yaml && chmod 644 /tmp/job.yaml"
nc apply -f /tmp/job.yaml >/dev/null
waited=0
until alloc=$(nc -o json alloc list 2>/dev/null | python3 -c 'import json,sys; print(next(a["id"] for a in json.load(sys.stdin) if a["job"]==sys.argv[1] and a["state"]=="running"))' "$job" 2>/dev/null); do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "the job $job did not run: $(nc alloc list 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
code=0
out=$(nc alloc checkpoint "$alloc" --mode live 2>&1) || code=$?
echo "$out"
if [ "$live" = true ]; then
    [ "$code" -eq 0 ] || fail "the node claims live checkpoints, but a live checkpoint of $alloc failed (exit $code)"
    case "$out" in *"(live,"*) ;; *) fail "the checkpoint of $alloc was not live: $out" ;; esac
    echo "the node claims live checkpoints and a live checkpoint of a running allocation succeeded"
else
    [ -n "$reason" ] || fail "the node does not claim live checkpoints and gives no reason"
    [ "$code" -ne 0 ] || fail "the node does not claim live checkpoints, yet a live checkpoint succeeded: the probe is wrong ($reason)"
    echo "the node reports that it cannot take live checkpoints, with the reason: $reason"
fi
if [ -n "$ckpt_host" ] && [ "$live" != true ]; then
    fail "with the checkpoint daemon $ckpt_host the packaged agent should take live checkpoints: $reason"
fi
nc job stop "$job" >/dev/null

step "a virtual machine as the packaged agent runs it: a systemd unit of its own, kept across an agent restart"
docker image inspect "$GUEST_IMAGE" >/dev/null 2>&1 \
    || fail "the guest image $GUEST_IMAGE is missing: run bash .ci/setup vm"
if ! DOCKER_HOST=$agent_docker docker image inspect "$GUEST_IMAGE" >/dev/null 2>&1; then
    docker save "$GUEST_IMAGE" | DOCKER_HOST=$agent_docker docker load -q >/dev/null
fi
# QEMU from Debian's archive, as the package recommends; the agent finds it when
# it starts.
inside env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    qemu-system-x86 qemu-utils >/dev/null || fail "apt-get install qemu-system-x86 qemu-utils"
# The VM bridge as an operator asks for it: install-agent.sh, rerun on the
# enrolled host, links the packaged vm-bridge.conf and restarts the agent.
# A bad range is refused before anything is installed or changed.
code=0
out=$(inside sh /pkg/install-agent.sh --vm-bridge 10.216.0.1 2>&1) || code=$?
[ "$code" -eq 64 ] || fail "install-agent.sh --vm-bridge 10.216.0.1 exited $code, not 64: $out"
case "$out" in *"prefix length"*) ;; *) fail "the refusal of --vm-bridge 10.216.0.1 does not say what is expected: $out" ;; esac
inside test ! -e /etc/systemd/system/novacron-agent.service.d/vm-bridge-range.conf || fail "a refused --vm-bridge wrote a drop-in"
inside sh /pkg/install-agent.sh --deb "/pkg/$(basename "$agent_deb")" --vm-bridge "$VM_BRIDGE"
inside test -L /etc/systemd/system/novacron-agent.service.d/vm-bridge.conf || fail "install-agent.sh --vm-bridge did not link the drop-in"
waited=0
until nc -o json node show install-test 2>/dev/null | python3 -c 'import json,sys; n=json.load(sys.stdin); v=n["capabilities"].get("vm"); sys.exit(0 if n["status"]=="ready" and v and v.get("bridge") else 1)'; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "the node does not report VMs with a bridge after QEMU and vm-bridge.conf: $(nc node show install-test 2>&1) $(inside journalctl -u novacron-agent -n 30 --no-pager -o cat | grep -i bridge)"
    sleep 1
    waited=$((waited + 1))
done
bridge=$(nc -o json node show install-test | python3 -c 'import json,sys; print(json.load(sys.stdin)["capabilities"]["vm"]["bridge"])')
echo "the agent made the VM bridge ($bridge) under its unit with vm-bridge.conf"
inside sh -c "printf 'apiVersion: novacron.io/v1\nkind: VMTemplate\nmetadata: {name: tiny}\nspec:\n  memory: 160Mi\n  initrd: /boot/initrd.img\n  cmdline: console=ttyS0 quiet panic=-1\n' > /tmp/vmt.yaml && chmod 644 /tmp/vmt.yaml"
nc apply -f /tmp/vmt.yaml >/dev/null
nc vm create "$vm" --image "$GUEST_IMAGE" --template tiny --port "http:8080:$VM_PORT" \
    --health-path /health --cpu 500m --no-pull --network bridge >/dev/null
waited=0
until nc -o json vm list 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if any(v["name"]==sys.argv[1] and v["state"]=="running" for v in json.load(sys.stdin)) else 1)' "$vm"; do
    [ "$waited" -lt "$VM_TIMEOUT_SECS" ] || fail "the VM $vm did not run and answer its health check: $(nc vm list 2>&1) $(inside journalctl -u novacron-agent -n 30 --no-pager 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
unit=$(inside systemctl list-units --plain --no-legend 'novacron-vm-*.service' | awk '{print $1}' | head -n1)
[ -n "$unit" ] || fail "the VM runs, but not as a novacron-vm-*.service unit"
qemu_pid=$(inside systemctl show -p MainPID --value "$unit")
[ "$qemu_pid" -gt 0 ] || fail "$unit has no main process"
count() { inside bash -c "exec 3<>/dev/tcp/127.0.0.1/$VM_PORT && printf 'GET /cgi-bin/count HTTP/1.0\r\n\r\n' >&3 && cat <&3" | tail -n1 | tr -d '\r'; }
# Running may come before the guest's server listens: wait for its answer.
first=""
until first=$(count 2>/dev/null) && [ -n "$first" ]; do
    [ "$waited" -lt "$VM_TIMEOUT_SECS" ] || fail "the guest's counter on port $VM_PORT did not answer"
    sleep 1
    waited=$((waited + 1))
done
[ "$first" = 1 ] || fail "the guest's counter on port $VM_PORT answered $first, not 1"
echo "VM $vm runs in $unit (qemu pid $qemu_pid), ready after ${waited}s, its published port answers"
inside systemctl restart novacron-agent
waited=0
until nc -o json vm list 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if any(v["name"]==sys.argv[1] and v["state"]=="running" for v in json.load(sys.stdin)) else 1)' "$vm"; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "after the agent restarted, the VM is not running: $(nc vm list 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
[ "$(inside systemctl show -p MainPID --value "$unit")" = "$qemu_pid" ] \
    || fail "restarting the agent restarted the VM (qemu pid $qemu_pid is gone)"
[ "$(count)" = 2 ] || fail "after the agent restarted, the guest's counter did not go on (memory lost?)"
echo "the agent restarted; the VM kept running (same qemu, counter 2) and was adopted"
nc vm destroy "$vm" >/dev/null
waited=0
while inside systemctl is-active --quiet "$unit"; do
    [ "$waited" -lt 60 ] || fail "$unit still active 60 s after vm destroy"
    sleep 1
    waited=$((waited + 1))
done
echo "vm destroy: the guest powered off and $unit ended"

step "containers under runc as the packaged agent runs them (install-agent.sh --runc)"
# Refused while confined: only the setting, without the drop-in.
inside sh -c "mkdir -p /etc/systemd/system/novacron-agent.service.d && printf '[Service]\nEnvironment=NOVACRON_CONTAINER_RUNTIME=runc\n' \
    > /etc/systemd/system/novacron-agent.service.d/zz-runc-setting.conf"
inside systemctl daemon-reload
inside systemctl restart novacron-agent 2>/dev/null && fail "the confined agent started with container_runtime = runc"
waited=0
until [ "$(inside systemctl show -p ExecMainStatus --value novacron-agent)" = 64 ]; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "the confined agent did not exit 64 under runc: $(inside systemctl status --no-pager novacron-agent 2>&1 | tail -n 5)"
    sleep 1
    waited=$((waited + 1))
done
refusal=$(inside journalctl -u novacron-agent --no-pager -n 20 -o cat | grep 'configuration error' | tail -n 1)
echo "$refusal"
case "$refusal" in *"confined"*"install-agent.sh --runc"*"/usr/share/novacron-agent/systemd/runc.conf"*) ;;
*) fail "the refusal does not say the agent is confined and name the drop-in: $refusal" ;; esac
inside rm /etc/systemd/system/novacron-agent.service.d/zz-runc-setting.conf
# A Docker daemon in this root (its own socket, data root and containerd): the
# agent joins each runc container to its sandbox's network namespace through
# the sandbox's process, which a daemon outside this root's process namespace
# would hide. runc (the agent's and that daemon's) makes cgroups under every
# controller, which Docker mounted read-only here on a cgroup v1 host: as on a
# real host, they are made writable.
for controller in $(inside findmnt -n -l -t cgroup -o TARGET); do
    inside mount -o remount,bind,rw "$controller"
done
inside systemd-run --quiet --unit novacron-test-dockerd /usr/sbin/dockerd -H "$INNER_DOCKER" \
    --data-root /var/lib/docker-inner --exec-root /run/docker-inner --pidfile /run/docker-inner.pid
waited=0
until inside docker -H "$INNER_DOCKER" info >/dev/null 2>&1; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "the Docker daemon in the root did not answer: $(inside journalctl -u novacron-test-dockerd -n 20 --no-pager 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
DOCKER_HOST=$agent_docker docker save "$TEST_IMAGE" | docker exec -i "$name" docker -H "$INNER_DOCKER" load -q >/dev/null
inside sh -c "printf '[Service]\nEnvironment=DOCKER_HOST=$INNER_DOCKER\n' > /etc/systemd/system/novacron-agent.service.d/zz-inner-docker.conf"
# CRIU as an operator who installed it would have it: on PATH.
inside ln -sf "$CKPT_CRIU" /usr/local/sbin/criu
inside sh /pkg/install-agent.sh --deb "/pkg/$(basename "$agent_deb")" --runc
inside test -L /etc/systemd/system/novacron-agent.service.d/runc.conf || fail "install-agent.sh --runc did not link the drop-in"
inside test ! -e /etc/systemd/system/novacron-agent.service.d/vm-bridge.conf || fail "install-agent.sh --runc left vm-bridge.conf, which runc.conf makes needless"
pid=$(inside systemctl show -p MainPID --value novacron-agent)
inside grep -q '^NoNewPrivs:[[:space:]]*0' "/proc/$pid/status" || fail "under runc.conf the agent still has no_new_privs"
inside grep -q '^Seccomp:[[:space:]]*0' "/proc/$pid/status" || fail "under runc.conf the agent still has a system-call filter"
[ "$(inside readlink "/proc/$pid/ns/mnt")" = "$(inside readlink /proc/1/ns/mnt)" ] \
    || fail "under runc.conf the agent still has a mount namespace of its own"
echo "agent (pid $pid) unconfined in the host's mount namespace"
waited=0
until nc -o json node show install-test 2>/dev/null | python3 -c 'import json,sys; n=json.load(sys.stdin); sys.exit(0 if n["status"]=="ready" and n["capabilities"].get("oci") else 1)'; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "the node does not report runc containers: $(nc node show install-test 2>&1) $(inside journalctl -u novacron-agent -n 20 --no-pager -o cat 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
nc node show install-test | grep -i 'runc' || true
# A service that ends on SIGTERM, as most do (a process 1 without a handler
# would ignore it): a stop signal reaching it shows.
docker exec -i "$name" sh -c 'cat > /tmp/runc-job.yaml && chmod 644 /tmp/runc-job.yaml' <<EOF
apiVersion: novacron.io/v1
kind: Job
metadata:
  name: $runc_job
spec:
  type: service
  replicas: 1
  task:
    image: $TEST_IMAGE
    command: [sh, -c, "trap 'exit 0' TERM; while true; do sleep 1; done"]
  resources:
    cpu: 100m
    memory: 32Mi
EOF
nc apply -f /tmp/runc-job.yaml >/dev/null
waited=0
until alloc=$(nc -o json alloc list 2>/dev/null | python3 -c 'import json,sys; print(next(a["id"] for a in json.load(sys.stdin) if a["job"]==sys.argv[1] and a["state"]=="running"))' "$runc_job" 2>/dev/null); do
    [ "$waited" -lt "$VM_TIMEOUT_SECS" ] || fail "the job $runc_job did not run under runc: $(nc alloc list 2>&1) $(inside journalctl -u novacron-agent -n 20 --no-pager -o cat 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
RUNC_ROOT=/var/lib/novacron/agent/oci/runc
container=$(inside runc --root "$RUNC_ROOT" list -q | head -n 1)
[ -n "$container" ] || fail "the allocation $alloc runs, but runc lists no container"
runc_pid() { inside runc --root "$RUNC_ROOT" state "$container" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["pid"] if s["status"]=="running" else "")'; }
cpid=$(runc_pid)
[ -n "$cpid" ] || fail "runc's container $container is not running"
echo "allocation $alloc runs under runc as $container (pid $cpid)"
out=$(nc alloc checkpoint "$alloc" --mode live 2>&1) || fail "a live checkpoint of the runc container failed: $out"
echo "$out"
case "$out" in *"(live,"*) ;; *) fail "the checkpoint of $alloc was not live: $out" ;; esac
inside systemctl restart novacron-agent
waited=0
until nc -o json alloc list 2>/dev/null | python3 -c 'import json,sys; sys.exit(0 if any(a["id"]==sys.argv[1] and a["state"]=="running" for a in json.load(sys.stdin)) else 1)' "$alloc" \
    && nc -o json node list 2>/dev/null | tr -d ' \n' | grep -q '"name":"install-test","status":"ready"'; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "after the agent restarted, $alloc is not running: $(nc alloc list 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
# What this shows is adoption. It does not show runc.conf's KillMode=process:
# systemd in this root cannot move processes into a unit's cgroups on a cgroup
# v1 host ("Failed to attach ... to compat systemd cgroup"), so a stop reaches
# the agent alone either way; the container survived here without that line too.
[ "$(runc_pid)" = "$cpid" ] || fail "restarting the agent restarted the runc container (pid $cpid is gone)"
echo "the agent restarted under runc.conf; the container kept running (pid $cpid) and was adopted"
nc job stop "$runc_job" >/dev/null
waited=0
while [ -n "$(inside runc --root "$RUNC_ROOT" list -q)" ]; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "runc still lists containers 60 s after the job stopped"
    sleep 1
    waited=$((waited + 1))
done
echo "job stop: the runc container is gone"
inside systemctl stop novacron-test-dockerd

step "purge"
inside systemctl stop novacron-agent novacron-controller
inside dpkg --purge novacron-agent novacron-controller novacron-cli
for p in /usr/bin/novacron-agent /usr/bin/novacron-controller /usr/bin/novacron /etc/novacron /var/lib/novacron /etc/criu/runc.conf; do
    if inside test -e "$p"; then fail "$p is left after purge"; fi
done
# Debian practice: purge keeps the system user, so its uid is never reused for a
# new account that would inherit files the user owned.
inside getent passwd novacron >/dev/null || fail "purge removed the novacron user"
echo "purge removed binaries, /etc/novacron, /var/lib/novacron and /etc/criu/runc.conf, and kept the novacron user"

step "an operator's own /etc/criu/runc.conf is neither replaced nor purged"
inside sh -c 'mkdir -p /etc/criu && printf "# the operator'"'"'s\ntcp-close\n" > /etc/criu/runc.conf'
before=$(inside md5sum /etc/criu/runc.conf)
out=$(inside env DEBIAN_FRONTEND=noninteractive dpkg -i "/pkg/$(basename "$agent_deb")" 2>&1) \
    || fail "dpkg -i novacron-agent over an operator's runc.conf: $out"
printf '%s\n' "$out" | grep -i 'runc.conf' || true
[ "$(inside md5sum /etc/criu/runc.conf)" = "$before" ] || fail "installing replaced the operator's /etc/criu/runc.conf: $(inside cat /etc/criu/runc.conf)"
inside dpkg --purge novacron-agent >/dev/null
[ "$(inside md5sum /etc/criu/runc.conf 2>/dev/null)" = "$before" ] || fail "purge removed or changed the operator's /etc/criu/runc.conf"
echo "the operator's /etc/criu/runc.conf stayed as it was through install and purge"
printf '\ninstall test: OK\n'

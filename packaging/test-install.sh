#!/usr/bin/env bash
# Install test: the .deb packages in a clean Debian 12 root, services started by
# systemd, an agent enrolled with install-agent.sh, then purge.
#
#   bash packaging/test-install.sh target/debian/novacron-{cli,controller,agent}_*.deb
#
# The root is `debootstrap --variant=minbase --include=systemd,systemd-sysv bookworm`
# from Debian's archive, imported once as the image novacron-debian-bookworm:1
# (about 70 s; reused afterwards). The container boots systemd as PID 1 (it needs
# CAP_SYS_ADMIN and an unconfined seccomp profile, no --privileged), so the units
# run exactly as shipped: Type=notify, User=novacron, the hardening. Inside it:
#   0. dpkg -i the CLI package alone: the binary, its man page and its bash, zsh
#      and fish completions, and no controller;
#   1. dpkg -i the controller package (it depends on novacron-cli); check files, conffiles, the novacron user,
#      the state directory, `systemd-analyze verify` and that nothing was enabled;
#   2. bad configuration: serve exits 64 naming the key and the file;
#   3. `init` as novacron, `systemctl start novacron-controller` (returns once
#      READY=1 is sent), the process runs as novacron with NoNewPrivs and its
#      system-call filter;
#   4. install-agent.sh --deb ... with a join token: the agent package installs,
#      joins the docker group (the host's Docker socket is mounted, with a docker
#      group of its gid), enrolls, starts through systemd, and the controller lists
#      the node ready with Docker reachable;
#   5. dpkg --purge all three: binaries, /etc/novacron and /var/lib/novacron are
#      gone; the novacron system user stays (Debian practice).
# Needs docker and debootstrap. The container is removed on exit.
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

name=novacron-install-$$
pkg=$(mktemp -d)
cleanup() {
    local status=$?
    rm -rf "$pkg"
    if [ "$status" -ne 0 ]; then
        echo "--- journal of the failed run:" >&2
        docker exec "$name" journalctl --no-pager -n 60 -u novacron-controller -u novacron-agent >&2 || true
    fi
    docker rm -f "$name" >/dev/null 2>&1 || true
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
docker run -d --name "$name" --hostname install-test \
    --cgroupns=private --cap-add ALL --cap-drop SYS_RESOURCE \
    --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
    --tmpfs /run --tmpfs /run/lock --tmpfs /tmp -e container=docker \
    -v "$pkg:/pkg:ro" -v "$docker_sock:/var/run/docker.sock" \
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

step "install-agent.sh: install, enroll, start"
inside groupadd --system --gid "$docker_gid" docker
token=$(inside runuser -u novacron -- novacron-controller token create --quiet --uses 1)
inside sh /pkg/install-agent.sh --deb "/pkg/$(basename "$agent_deb")" \
    --controller https://localhost:7443 --token "$token" --ca-fingerprint "$fp" \
    --name install-test --label zone=test
inside systemctl is-active --quiet novacron-agent || fail "the agent is not active"
inside dpkg-query -W -f='${Conffiles}\n' novacron-agent | grep -q /etc/novacron/agent.toml \
    || fail "/etc/novacron/agent.toml is not a conffile"
inside sh -c 'printf "current = \"t\"\n[contexts.t]\napi = \"https://127.0.0.1:7443\"\nca = \"/var/lib/novacron/controller/pki/ca.pem\"\ncert = \"/var/lib/novacron/controller/pki/admin.pem\"\nkey = \"/var/lib/novacron/controller/pki/admin-key.pem\"\n" > /tmp/ctx.toml && chmod 644 /tmp/ctx.toml'
waited=0
until inside runuser -u novacron -- novacron --config /tmp/ctx.toml -o json node list 2>/dev/null \
    | tr -d ' \n' | grep -q '"name":"install-test","status":"ready"'; do
    [ "$waited" -lt "$READY_TIMEOUT_SECS" ] || fail "node install-test is not ready: $(inside runuser -u novacron -- novacron --config /tmp/ctx.toml node list 2>&1)"
    sleep 1
    waited=$((waited + 1))
done
inside runuser -u novacron -- novacron --config /tmp/ctx.toml node list
echo "agent enrolled and ready after ${waited}s"

step "purge"
inside systemctl stop novacron-agent novacron-controller
inside dpkg --purge novacron-agent novacron-controller novacron-cli
for p in /usr/bin/novacron-agent /usr/bin/novacron-controller /usr/bin/novacron /etc/novacron /var/lib/novacron; do
    if inside test -e "$p"; then fail "$p is left after purge"; fi
done
# Debian practice: purge keeps the system user, so its uid is never reused for a
# new account that would inherit files the user owned.
inside getent passwd novacron >/dev/null || fail "purge removed the novacron user"
echo "purge removed binaries, /etc/novacron and /var/lib/novacron, and kept the novacron user"
printf '\ninstall test: OK\n'

#!/bin/sh
# Installs novacron-agent on this host, enrolls it with a controller and starts it.
#
#   sudo sh install-agent.sh --controller https://ctl.example.com:7443 \
#       --token <token> --ca-fingerprint sha256:<64 hex digits> \
#       [--deb ./novacron-agent_0.1.0-1_amd64.deb] [--name NODE] [--label zone=eu-1a]...
#       [--live] [--runc] [--vm-bridge CIDR]
#
# `novacron-controller token create` prints the token and the fingerprint.
#
# Steps: install Docker when it is missing (Debian's docker.io); install the package
# (the given .deb, else `apt-get install novacron-agent` from a configured
# repository; recommended packages are not installed); with --live, also install
# criu and turn on Docker's experimental features (needed for live checkpoints;
# only when /etc/docker/daemon.json does not exist yet, otherwise it says what to
# add); with --runc, run the node's containers under runc, owned by the agent
# (runc and criu installed when missing, and the unit's drop-in runc.conf linked
# from /usr/share/novacron-agent/systemd/: it sets container_runtime and lifts
# the unit's confinement, which runc containers would inherit); with
# --vm-bridge CIDR, make the VM bridge with that address and range (the drop-in
# vm-bridge.conf gives the unit the rights it needs; --vm-bridge off: no
# bridge); enroll (`novacron-agent join`, as root like the service; skipped when
# this host is already enrolled, unless --force); write the labels to a systemd
# drop-in (NOVACRON_LABELS); enable and (re)start novacron-agent.service and
# wait until it is active. Run again on an enrolled host, it changes the
# drop-ins and restarts the agent, which adopts its running workloads.
# --no-start stops after enrolling (for hosts or containers without systemd). At start the agent probes live checkpoints; `novacron node show NODE`
# says whether they work and, if not, why.
#
# Exit codes: 0 done; 1 a step failed; 64 bad arguments or configuration; 69 the
# controller refused or could not be reached (the agent's own codes pass through).
set -eu

STATE_DIR=/var/lib/novacron/agent
UNIT=novacron-agent.service
DROPIN_DIR=/etc/systemd/system/$UNIT.d
# How long to wait for the service to become active.
START_TIMEOUT_SECS=60

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

die() {
    echo "install-agent: $1" >&2
    exit "${2:-1}"
}

controller="" token="${NOVACRON_JOIN_TOKEN:-}" fingerprint="" name="" deb=""
labels="" force="" start=1 live=0 runc=0 vm_bridge=""
while [ $# -gt 0 ]; do
    case "$1" in
    --controller) controller=${2:-}; shift 2 ;;
    --token) token=${2:-}; shift 2 ;;
    --ca-fingerprint) fingerprint=${2:-}; shift 2 ;;
    --name) name=${2:-}; shift 2 ;;
    --deb) deb=${2:-}; shift 2 ;;
    --label)
        case "${2:-}" in
        *=*) labels="${labels:+$labels,}$2" ;;
        *) die "--label ${2:-}: expected KEY=VALUE, e.g. zone=eu-1a" 64 ;;
        esac
        shift 2 ;;
    --force) force=--force; shift ;;
    --no-start) start=0; shift ;;
    --live) live=1; shift ;;
    --runc) runc=1; shift ;;
    --vm-bridge) vm_bridge=${2:-}; shift 2 ;;
    -h | --help) usage ;;
    *) die "unknown argument $1 (see --help)" 64 ;;
    esac
done
# An enrolled host (rerun to change the drop-ins) needs no enrollment arguments.
if [ ! -f "$STATE_DIR/node.pem" ] || [ -n "$force" ]; then
    [ -n "$controller" ] || die "--controller URL is required, e.g. https://ctl.example.com:7443" 64
    [ -n "$token" ] || die "--token is required (novacron-controller token create prints one)" 64
    [ -n "$fingerprint" ] || die "--ca-fingerprint is required: sha256:<64 hex digits>" 64
fi
# An IPv4 address with a prefix length, or off: checked before anything is
# installed (the agent checks the value itself at start).
case "$vm_bridge" in
"" | off) ;;
*[!0-9./]* | */*/* | */ | .* | *..*) die "--vm-bridge $vm_bridge: expected this node's address on the bridge with the range's prefix length, such as 10.215.0.1/16, or off" 64 ;;
[0-9]*.[0-9]*.[0-9]*.[0-9]*/[0-9]*) ;;
*) die "--vm-bridge $vm_bridge: expected this node's address on the bridge with the range's prefix length, such as 10.215.0.1/16, or off" 64 ;;
esac
[ "$(id -u)" -eq 0 ] || die "run as root (it installs a package and a service)" 64

# apt-get install without recommends, after fetching the package lists once when
# this host has none (a fresh or minimal system).
apt_install() {
    if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
        apt-get update -q
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

if command -v dockerd >/dev/null; then
    echo "==> Docker is installed ($(dockerd --version 2>/dev/null || echo dockerd))"
else
    command -v apt-get >/dev/null || die "Docker is not installed and there is no apt-get: install Docker, then rerun this script"
    echo "==> installing Docker (Debian's docker.io): the agent runs containers through it"
    apt_install docker.io
fi

echo "==> installing novacron-agent"
if [ -n "$deb" ]; then
    [ -f "$deb" ] || die "--deb $deb: no such file" 64
    case "$deb" in /*) ;; *) deb="./$deb" ;; esac
    if command -v apt-get >/dev/null; then
        apt_install "$deb"
    else
        dpkg -i "$deb"
    fi
else
    apt_install novacron-agent
fi
command -v novacron-agent >/dev/null || die "novacron-agent is not on PATH after the install"

if [ "$live" -eq 1 ]; then
    echo "==> live checkpoints: criu and Docker's experimental features"
    command -v criu >/dev/null || apt_install criu
    daemon_json=/etc/docker/daemon.json
    if [ ! -s "$daemon_json" ]; then
        mkdir -p /etc/docker
        printf '{\n  "experimental": true\n}\n' >"$daemon_json"
        echo "==> wrote $daemon_json (experimental: true); restarting Docker"
        if [ -d /run/systemd/system ]; then
            systemctl restart docker.service
        fi
    elif grep -Eq '"experimental"[[:space:]]*:[[:space:]]*true' "$daemon_json"; then
        echo "==> $daemon_json already turns experimental features on"
    else
        echo "==> warning: $daemon_json exists without \"experimental\": true; add it and restart Docker for live checkpoints (left as it is)" >&2
    fi
fi

# The packaged drop-ins (novacron-agent ships them; see their comments).
DROPINS=/usr/share/novacron-agent/systemd
if [ "$runc" -eq 1 ]; then
    echo "==> containers under runc: runc, criu and the unit's drop-in $DROPIN_DIR/runc.conf"
    command -v runc >/dev/null || apt_install runc
    command -v criu >/dev/null || apt_install criu
    [ -f "$DROPINS/runc.conf" ] || die "$DROPINS/runc.conf is missing: the installed novacron-agent is older than this script"
    mkdir -p "$DROPIN_DIR"
    ln -sfn "$DROPINS/runc.conf" "$DROPIN_DIR/runc.conf"
    # runc.conf lifts all that vm-bridge.conf grants; read after it, the latter
    # would give the agent a mount namespace of its own again.
    rm -f "$DROPIN_DIR/vm-bridge.conf"
fi
if [ -n "$vm_bridge" ]; then
    case "$vm_bridge" in
    off)
        # Not the built-in default range either.
        rm -f "$DROPIN_DIR/vm-bridge.conf"
        mkdir -p "$DROPIN_DIR"
        printf '[Service]\nEnvironment="NOVACRON_VM_BRIDGE=off"\n' >"$DROPIN_DIR/vm-bridge-range.conf"
        echo "==> no VM bridge: $DROPIN_DIR/vm-bridge-range.conf"
        ;;
    *)
        # ip and tc (iproute2) make the bridge, the taps and their limits.
        command -v ip >/dev/null && command -v tc >/dev/null || apt_install iproute2
        [ -f "$DROPINS/vm-bridge.conf" ] || die "$DROPINS/vm-bridge.conf is missing: the installed novacron-agent is older than this script"
        mkdir -p "$DROPIN_DIR"
        [ -e "$DROPIN_DIR/runc.conf" ] || ln -sfn "$DROPINS/vm-bridge.conf" "$DROPIN_DIR/vm-bridge.conf"
        # The agent checks the value at start (exit 64 naming it when bad).
        printf '[Service]\nEnvironment="NOVACRON_VM_BRIDGE=%s"\n' "$vm_bridge" >"$DROPIN_DIR/vm-bridge-range.conf"
        echo "==> VM bridge $vm_bridge: $DROPIN_DIR/vm-bridge.conf and vm-bridge-range.conf"
        ;;
    esac
fi

if [ -f "$STATE_DIR/node.pem" ] && [ -z "$force" ]; then
    echo "==> already enrolled ($STATE_DIR/node.pem exists); pass --force to enroll again"
else
    echo "==> enrolling with $controller"
    set -- join --controller "$controller" --ca-fingerprint "$fingerprint"
    [ -n "$name" ] && set -- "$@" --name "$name"
    [ -n "$force" ] && set -- "$@" --force
    # As root, like the service. The token goes through the environment, not the
    # command line (ps shows that).
    code=0
    env NOVACRON_JOIN_TOKEN="$token" novacron-agent "$@" || code=$?
    [ "$code" -eq 0 ] || die "novacron-agent join failed (exit $code)" "$code"
fi

if [ -n "$labels" ]; then
    mkdir -p "$DROPIN_DIR"
    printf '[Service]\nEnvironment="NOVACRON_LABELS=%s"\n' "$labels" >"$DROPIN_DIR/labels.conf"
    echo "==> labels $labels in $DROPIN_DIR/labels.conf"
fi

if [ "$start" -eq 0 ]; then
    echo "==> enrolled; start it with: systemctl enable --now $UNIT"
    exit 0
fi
[ -d /run/systemd/system ] || die "systemd is not running here; start the agent with: novacron-agent run"
systemctl daemon-reload
systemctl enable --quiet "$UNIT"
# A restart, not a start: a rerun's new drop-ins take effect.
systemctl restart "$UNIT"
waited=0
until systemctl is-active --quiet "$UNIT"; do
    if [ "$waited" -ge "$START_TIMEOUT_SECS" ]; then
        systemctl status --no-pager "$UNIT" >&2 || true
        die "$UNIT is not active after ${START_TIMEOUT_SECS}s"
    fi
    sleep 1
    waited=$((waited + 1))
done
echo "==> $UNIT is active; check the fleet with: novacron node list"

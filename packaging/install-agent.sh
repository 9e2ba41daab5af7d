#!/bin/sh
# Installs novacron-agent on this host, enrolls it with a controller and starts it.
#
#   sudo sh install-agent.sh --controller https://ctl.example.com:7443 \
#       --token <token> --ca-fingerprint sha256:<64 hex digits> \
#       [--deb ./novacron-agent_0.1.0-1_amd64.deb] [--name NODE] [--label zone=eu-1a]...
#
# `novacron-controller token create` prints the token and the fingerprint.
#
# Install Docker first. Steps: install the package (the given .deb, else
# `apt-get install novacron-agent`; recommended packages are not installed)
# from a configured repository); add the novacron user to the docker group when
# Docker is installed; enroll as the novacron user (`novacron-agent join`; skipped
# when this host is already enrolled, unless --force); write the labels to a
# systemd drop-in (NOVACRON_LABELS); enable and start novacron-agent.service and
# wait until it is active. --no-start stops after enrolling (for hosts or containers
# without systemd).
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
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 64
}

die() {
    echo "install-agent: $*" >&2
    exit "${2:-1}"
}

controller="" token="${NOVACRON_JOIN_TOKEN:-}" fingerprint="" name="" deb=""
labels="" force="" start=1
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
    -h | --help) usage ;;
    *) die "unknown argument $1 (see --help)" 64 ;;
    esac
done
[ -n "$controller" ] || die "--controller URL is required, e.g. https://ctl.example.com:7443" 64
[ -n "$token" ] || die "--token is required (novacron-controller token create prints one)" 64
[ -n "$fingerprint" ] || die "--ca-fingerprint is required: sha256:<64 hex digits>" 64
[ "$(id -u)" -eq 0 ] || die "run as root (it installs a package and a service)" 64

echo "==> installing novacron-agent"
if [ -n "$deb" ]; then
    [ -f "$deb" ] || die "--deb $deb: no such file" 64
    case "$deb" in /*) ;; *) deb="./$deb" ;; esac
    if command -v apt-get >/dev/null; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$deb"
    else
        dpkg -i "$deb"
    fi
else
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends novacron-agent
fi
command -v novacron-agent >/dev/null || die "novacron-agent is not on PATH after the install"

if getent group docker >/dev/null; then
    usermod --append --groups docker novacron
    echo "==> novacron is in the docker group (containers run through the Docker socket)"
else
    echo "==> warning: no docker group; the agent needs Docker (install it, then rerun this script)" >&2
fi

if [ -f "$STATE_DIR/node.pem" ] && [ -z "$force" ]; then
    echo "==> already enrolled ($STATE_DIR/node.pem exists); pass --force to enroll again"
else
    echo "==> enrolling with $controller"
    set -- join --controller "$controller" --ca-fingerprint "$fingerprint"
    [ -n "$name" ] && set -- "$@" --name "$name"
    [ -n "$force" ] && set -- "$@" --force
    # The token goes through the environment, not the command line (ps shows that).
    code=0
    runuser -u novacron -- env NOVACRON_JOIN_TOKEN="$token" novacron-agent "$@" || code=$?
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
[ -d /run/systemd/system ] || die "systemd is not running here; start the agent with: runuser -u novacron -- novacron-agent run"
systemctl daemon-reload
systemctl enable --now "$UNIT"
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

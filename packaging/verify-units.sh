#!/usr/bin/env bash
# Runs `systemd-analyze verify` on the NovaCron units as they are packaged.
#
#   bash packaging/verify-units.sh target/debian/novacron-agent_*.deb target/debian/novacron-controller_*.deb
#
# Each .deb is unpacked (dpkg -x) into a scratch root beside this machine's own
# systemd units, so the check sees the packaged unit files, the packaged binaries at
# the paths ExecStart names, and the targets the units refer to; the agent's unit
# again with each of its optional drop-ins. Fails on any warning. Needs Debian's `systemd` package (systemd-analyze).
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: $0 PACKAGE.deb..." >&2; exit 64; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/lib/systemd" "$root/etc/systemd/system"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
units=()
for deb in "$@"; do
    dpkg -x "$deb" "$root"
    while IFS= read -r unit; do
        units+=("$(basename "$unit")")
    done < <(dpkg -c "$deb" | awk '{print $NF}' | grep -E '/systemd/system/[^/]+\.service$')
done
# Packages put units in /lib (usrmerge: /lib is /usr/lib on the host).
if [ -d "$root/lib/systemd/system" ]; then
    cp -a "$root/lib/systemd/system/." "$root/usr/lib/systemd/system/"
    rm -rf "$root/lib"
fi
ln -s usr/lib "$root/lib"
[ "${#units[@]}" -gt 0 ] || { echo "no .service file in $*" >&2; exit 1; }
out=$(systemd-analyze verify --root="$root" "${units[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
if [ -n "$out" ]; then
    echo "$out" >&2
    echo "systemd-analyze verify printed warnings for ${units[*]}" >&2
    exit 1
fi
echo "systemd-analyze verify: ${units[*]} OK"
# The agent's optional drop-ins (/usr/share/novacron-agent/systemd/), each copied
# into the unit's drop-in directory: `--root` does not follow the absolute links
# install-agent.sh makes (a linked drop-in with a bad key passed unread).
for dropin in "$root"/usr/share/novacron-agent/systemd/*.conf; do
    [ -e "$dropin" ] || continue
    dir=$root/etc/systemd/system/novacron-agent.service.d
    rm -rf "$dir" && mkdir -p "$dir"
    cp "$dropin" "$dir/"
    out=$(systemd-analyze verify --root="$root" novacron-agent.service 2>&1) || { echo "$out" >&2; exit 1; }
    if [ -n "$out" ]; then
        echo "$out" >&2
        echo "systemd-analyze verify printed warnings for novacron-agent.service with $(basename "$dropin")" >&2
        exit 1
    fi
    echo "systemd-analyze verify: novacron-agent.service with $(basename "$dropin") OK"
done

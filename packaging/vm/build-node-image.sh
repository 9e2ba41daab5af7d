#!/usr/bin/env bash
# Builds the node guest image of `qemu` node pools: a Debian 12 guest that runs
# Docker and novacron-agent under systemd, so that a VM the pool boots joins the
# fleet with the single-use token in its NoCloud seed and runs container jobs.
# It is a containerDisk image like the tiny guest's (docs/vm-images.md):
#   /boot/vmlinuz       the Debian cloud kernel of build-guest-image.sh
#   /boot/initrd.img    a busybox initramfs that loads the virtio drivers and
#                       switches to the disk labelled nc-node-root
#   /disk/root.qcow2    the root: debootstrap minbase + systemd, Docker (docker.io),
#                       iptables, the kernel's modules, the given novacron-agent
#                       with its shipped unit and agent.toml, and
#                       novacron-node-seed.service, which runs the seed's user data
#                       (a script) before the agent starts
#   /novacron-vm.json   where those are and how to boot them
# docs/vm-images.md ("The node guest") describes it; docs/pools.md the pools.
#
# Steps (cached under $NOVACRON_VM_CACHE, default /var/tmp/novacron-vm):
#   1. the kernel: build-guest-image.sh --no-docker (its cache);
#   2. the root without the agent: debootstrap, once per recipe (~70 s and about
#      120 MB from Debian's archive; `--root-only` stops here, which the setup's
#      `vm` step does, because the agent is built later);
#   3. with --agent: the disk (the root, the agent stripped of debug info, the
#      units; mkfs.ext4 -d, qemu-img convert), the initramfs, and `docker build`,
#      skipped when the image with that tag already carries the same input hash.
#
# Usage: build-node-image.sh [--root-only | --agent PATH] [--tag IMAGE] [--print]
#   --agent PATH  the novacron-agent binary to install (required unless --root-only)
#   --root-only   only build (or find cached) step 2's root
#   --tag IMAGE   image name (default novacron/node-guest:dev)
# Environment:
#   NOVACRON_VM_CACHE        cache directory (default /var/tmp/novacron-vm)
#   NOVACRON_DEBIAN_MIRROR   Debian mirror (default http://deb.debian.org/debian)
# Needs root (debootstrap, file ownership in the disk), debootstrap, e2fsprogs,
# qemu-utils, busybox-static, cpio and Docker (`bash .ci/setup vm`).
set -euo pipefail

TAG=novacron/node-guest:dev
AGENT=
ROOT_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --agent)
      [ $# -ge 2 ] || { echo "error: --agent needs a path" >&2; exit 64; }
      AGENT=$2
      shift 2
      ;;
    --tag)
      [ $# -ge 2 ] || { echo "error: --tag needs a value" >&2; exit 64; }
      TAG=$2
      shift 2
      ;;
    --root-only) ROOT_ONLY=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (try --help)" >&2; exit 64 ;;
  esac
done

SELF=$(readlink -f "$0")
HERE=$(dirname "$SELF")
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${NOVACRON_VM_CACHE:-/var/tmp/novacron-vm}
MIRROR=${NOVACRON_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# What the root holds besides minbase. docker.io brings containerd, runc and tini;
# apparmor lets Docker load its docker-default profile (the kernel enables AppArmor).
NODE_PACKAGES=systemd,systemd-sysv,udev,kmod,iproute2,iptables,apparmor,docker.io,ca-certificates
# The disk's size as the guest sees it (sparse; the qcow2 holds only what is used).
DISK_SIZE=4G
# The filesystem label the initramfs mounts as the root.
ROOT_LABEL=nc-node-root
# Drivers the initramfs loads (in order) to see the root disk; the root's own
# /lib/modules has every module for the rest (Docker's overlay, bridge, netfilter).
INITRD_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)

say() { printf '[node-image] %s\n' "$*" >&2; }
die() {
  printf '[node-image] ERROR: %s\n' "$*" >&2
  exit 1
}

[ "$ROOT_ONLY" -eq 1 ] || [ -n "$AGENT" ] || die "--agent PATH is required (or --root-only)"
[ -z "$AGENT" ] || [ -x "$AGENT" ] || die "--agent $AGENT is not an executable file (build it: cargo build -p novacron-agent)"
[ "$(id -u)" -eq 0 ] || die "needs root: debootstrap, and root-owned files in the guest's disk"
missing=()
for tool in debootstrap mkfs.ext4 qemu-img cpio gzip objcopy docker chroot; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
[ "${#missing[@]}" -eq 0 ] || die "missing ${missing[*]}: run 'bash .ci/setup vm'"

# --- 1. kernel ---------------------------------------------------------------
bash "$HERE/build-guest-image.sh" --no-docker
kout=$(readlink -f "$CACHE/current")
deb_name=$(cat "$kout/kernel-package")
deb=$CACHE/debs/$deb_name.deb
kdir=$CACHE/kernels/$deb_name
[ -f "$deb" ] && [ -f "$kdir/version" ] || die "the kernel cache lacks $deb_name: run packaging/vm/build-guest-image.sh"
kver=$(cat "$kdir/version")

# --- 2. the root ---------------------------------------------------------------
# Everything done to the debootstrapped directory $1 (the function's text is part
# of the cache key, so changing it rebuilds the root).
configure_root() {
  local r=$1 x
  # The kernel's modules, for udev and Docker's modprobes.
  x=$(mktemp -d)
  dpkg-deb -x "$deb" "$x"
  mkdir -p "$r/usr/lib/modules"
  cp -a "$x/lib/modules/$kver" "$r/usr/lib/modules/"
  rm -rf "$x"
  chroot "$r" depmod -a "$kver"
  echo novacron-node >"$r/etc/hostname"
  printf 'LABEL=%s / ext4 rw,errors=remount-ro 0 1\n' "$ROOT_LABEL" >"$r/etc/fstab"
  # QEMU's user network (or a bridge with DHCP): systemd-networkd, DHCP on every
  # Ethernet link. DNS: QEMU's user network answers on 10.0.2.3.
  mkdir -p "$r/etc/systemd/network"
  printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' >"$r/etc/systemd/network/10-wired.network"
  echo "nameserver 10.0.2.3" >"$r/etc/resolv.conf"
  chroot "$r" systemctl enable systemd-networkd.service >/dev/null 2>&1
  # Nothing periodic competes with the workload on a small node.
  for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer getty@tty1.service; do
    chroot "$r" systemctl mask "$u" >/dev/null 2>&1 || true
  done
  # No password login; the console shows the boot.
  chroot "$r" passwd -l root >/dev/null
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/usr/share/doc/* \
    "$r"/usr/share/man/* "$r"/usr/share/locale/*
}

root_hash=$(printf 'packages %s\nkernel %s\nrecipe %s\n' "$NODE_PACKAGES" "$deb_name" \
  "$(declare -f configure_root)" | sha256sum | cut -c1-16)
rootdir=$CACHE/node-root/$root_hash
if [ ! -f "$rootdir/.done" ]; then
  say "debootstrap the node root $root_hash ($MIRROR; about 70 s)"
  mkdir -p "$CACHE/node-root"
  tmp=$(mktemp -d "$CACHE/node-root/.tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  debootstrap --variant=minbase --include="$NODE_PACKAGES" bookworm "$tmp" "$MIRROR" >"$tmp.log" 2>&1 ||
    { tail -n 20 "$tmp.log" >&2; rm -f "$tmp.log"; die "debootstrap failed"; }
  rm -f "$tmp.log"
  configure_root "$tmp"
  touch "$tmp/.done"
  rm -rf "$rootdir"
  mv "$tmp" "$rootdir"
  trap - EXIT
fi
# Earlier roots are superseded.
for d in "$CACHE"/node-root/*; do
  [ "$d" = "$rootdir" ] || rm -rf "$d"
done
say "root: $rootdir ($(du -sm "$rootdir" | cut -f1) MiB)"
[ "$ROOT_ONLY" -eq 0 ] || exit 0

# --- 3. the image --------------------------------------------------------------
write_init() {
  cat <<EOF
#!/bin/sh
# NovaCron node guest's initramfs (packaging/vm/build-node-image.sh): load the
# virtio drivers, mount the disk labelled $ROOT_LABEL, hand over to its systemd.
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in ${INITRD_MODULES[*]}; do insmod /lib/modules/\$m.ko 2>/dev/null; done
i=0
until root=\$(findfs LABEL=$ROOT_LABEL 2>/dev/null); do
  [ \$i -lt 100 ] || { echo "novacron-node: no disk labelled $ROOT_LABEL"; sleep 5; poweroff -f; }
  usleep 100000
  i=\$((i + 1))
done
mkdir -p /newroot
mount -t ext4 -o rw "\$root" /newroot || { echo "novacron-node: cannot mount \$root"; sleep 5; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
EOF
}

write_seed() {
  cat <<'EOF'
#!/bin/sh
# Runs the NoCloud seed's user data (a script) once per boot, before the agent
# starts: a node pool's seed writes the agent's settings and joins the fleet.
# (packaging/vm/build-node-image.sh installs this file.)
i=0
while [ ! -e /dev/disk/by-label/cidata ] && [ ! -e /dev/disk/by-label/CIDATA ] && [ $i -lt 100 ]; do
  sleep 0.1
  i=$((i + 1))
done
seed=/dev/disk/by-label/cidata
[ -e "$seed" ] || seed=/dev/disk/by-label/CIDATA
[ -e "$seed" ] || { echo "novacron-node: no cidata seed; nothing to run"; exit 0; }
mkdir -p /run/novacron-seed
mount -o ro "$seed" /run/novacron-seed || { echo "novacron-node: cannot mount the seed $seed"; exit 1; }
rc=0
if [ -f /run/novacron-seed/user-data ] && [ "$(head -c 2 /run/novacron-seed/user-data)" = '#!' ]; then
  install -m 0700 /run/novacron-seed/user-data /run/novacron-user-data
  /run/novacron-user-data || rc=$?
  rm -f /run/novacron-user-data
  echo "novacron-node: user-data ran (exit $rc)"
fi
umount /run/novacron-seed
exit "$rc"
EOF
}

write_seed_unit() {
  cat <<'EOF'
[Unit]
Description=NovaCron node seed: runs the NoCloud seed's user data (joins the fleet)
Wants=network-online.target
After=network-online.target local-fs.target
Before=novacron-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/novacron/node-seed
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=120s

[Install]
WantedBy=multi-user.target
EOF
}

agent_sha=$(sha256sum "$AGENT" | cut -d' ' -f1)
unit_sha=$(cat "$REPO/systemd/novacron-agent.service" "$REPO/packaging/etc/agent.toml" | sha256sum | cut -d' ' -f1)
busybox_sha=$(sha256sum /bin/busybox | cut -d' ' -f1)
inputs_hash=$(printf 'root %s\nagent %s\nunits %s\nbusybox %s\nsteps %s\n' "$root_hash" "$agent_sha" \
  "$unit_sha" "$busybox_sha" "$(declare -f write_init write_seed write_seed_unit)" | sha256sum | cut -c1-16)
have=$(docker image inspect --format '{{ index .Config.Labels "io.novacron.vm.inputs" }}' "$TAG" 2>/dev/null || true)
if [ "$have" = "$inputs_hash" ]; then
  say "image $TAG is up to date ($inputs_hash)"
  exit 0
fi

say "assembling $TAG ($inputs_hash)"
work=$(mktemp -d "$CACHE/.node-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
r=$work/root
cp -a "$rootdir" "$r"
rm -f "$r/.done"
objcopy --strip-debug "$AGENT" "$r/usr/bin/novacron-agent"
chmod 755 "$r/usr/bin/novacron-agent"
install -m 0644 "$REPO/systemd/novacron-agent.service" "$r/etc/systemd/system/novacron-agent.service"
install -d -m 0755 "$r/etc/novacron" "$r/usr/lib/novacron"
install -m 0644 "$REPO/packaging/etc/agent.toml" "$r/etc/novacron/agent.toml"
write_seed >"$r/usr/lib/novacron/node-seed"
chmod 755 "$r/usr/lib/novacron/node-seed"
write_seed_unit >"$r/etc/systemd/system/novacron-node-seed.service"
chroot "$r" systemctl enable novacron-node-seed.service novacron-agent.service >/dev/null 2>&1

mkdir -p "$work/ctx/boot" "$work/ctx/disk"
mkfs.ext4 -q -F -L "$ROOT_LABEL" -d "$r" "$work/root.raw" "$DISK_SIZE"
qemu-img convert -O qcow2 "$work/root.raw" "$work/ctx/disk/root.qcow2"
rm -rf "$r" "$work/root.raw"

ir=$work/initrd
mkdir -p "$ir"/{bin,dev,proc,sys,newroot,lib/modules}
cp /bin/busybox "$ir/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -s busybox "$ir/bin/$applet"
done
ln -s bin "$ir/sbin"
for m in "${INITRD_MODULES[@]}"; do
  [ -f "$kdir/modules/$m.ko" ] || die "the kernel cache lacks $m.ko (build-guest-image.sh's GUEST_MODULES)"
  cp "$kdir/modules/$m.ko" "$ir/lib/modules/"
done
write_init >"$ir/init"
chmod 755 "$ir/init"
mknod -m 600 "$ir/dev/console" c 5 1
(cd "$ir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -6 -n >"$work/ctx/boot/initrd.img"
cp "$kdir/vmlinuz" "$work/ctx/boot/vmlinuz"
cat >"$work/ctx/novacron-vm.json" <<EOF
{"kernel":"/boot/vmlinuz","initrd":"/boot/initrd.img","disk":"/disk/root.qcow2","cmdline":"console=ttyS0 panic=-1","machine":"q35","nic":"virtio-net-pci"}
EOF
cat >"$work/ctx/Dockerfile" <<EOF
FROM scratch
COPY boot/ /boot/
COPY disk/ /disk/
COPY novacron-vm.json /novacron-vm.json
LABEL io.novacron.vm.inputs="$inputs_hash" \\
      io.novacron.vm.kernel-package="$deb_name"
CMD ["/novacron-vm-image-is-not-runnable"]
EOF
old_id=$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
DOCKER_BUILDKIT=0 docker build -q -t "$TAG" "$work/ctx" >"$work/build.log" 2>&1 ||
  { cat "$work/build.log" >&2; die "docker build $TAG failed"; }
[ -z "$old_id" ] || docker image rm "$old_id" >/dev/null 2>&1 || true
say "image $TAG: $(docker image inspect --format '{{.Size}}' "$TAG") bytes (disk $(du -m "$work/ctx/disk/root.qcow2" | cut -f1) MiB)"

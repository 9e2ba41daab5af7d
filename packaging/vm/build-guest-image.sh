#!/usr/bin/env bash
# Builds NovaCron's tiny guest image: a Debian cloud kernel plus a busybox
# initramfs that serves HTTP on port 8080, packaged as a "containerDisk" Docker
# image (FROM scratch: /boot/vmlinuz, /boot/initrd.img, /novacron-vm.json) so the
# orchestrator distributes a VM image like any container image. docs/vm-images.md
# describes the guest, the image layout and the verified QEMU command line.
#
# Steps (each cached under $NOVACRON_VM_CACHE, default /var/tmp/novacron-vm):
#   1. download ONE named kernel package (apt-get download, never a glob) and
#      keep its vmlinuz, config and the few modules the guest needs (virtio-net,
#      virtio-blk, ACPI button, evdev, vfat/iso9660 for a NoCloud seed);
#   2. build the initramfs (cpio newc, gzip; reproducible: fixed mtimes, sorted);
#   3. docker build the image, labelled with a hash of every input; skipped when
#      the image with that tag already carries the same hash.
#
# Usage: build-guest-image.sh [--tag IMAGE] [--no-docker] [--print]
#   --tag IMAGE   image name (default novacron/guest-tiny:1)
#   --no-docker   only produce the files (kernel, initrd, json) in the cache
#   --print       print the cache paths (and the image) as KEY=VALUE lines, build
#                 nothing; run it after a build to find the files
# Environment:
#   NOVACRON_VM_CACHE        cache directory (default /var/tmp/novacron-vm)
#   NOVACRON_VM_KERNEL_PKG   kernel package (default: the pin below)
# Needs qemu-system-x86 qemu-utils busybox-static cpio (`bash .ci/setup vm`).
set -euo pipefail

# The kernel package, one named version (find the current one with
# `apt-cache depends linux-image-cloud-amd64`). When Debian has dropped it from the
# archive and it is not cached yet, the script warns and takes the version the
# meta-package linux-image-cloud-amd64 points to; the image label records which.
KERNEL_PKG_PIN=linux-image-6.1.0-57-cloud-amd64
# Modules the guest loads, in load order (dependencies first; the script checks
# that against each module's `depends=`). The guest insmods all of them.
GUEST_MODULES=(
  kernel/drivers/virtio/virtio_ring.ko
  kernel/drivers/virtio/virtio.ko
  kernel/drivers/virtio/virtio_pci_modern_dev.ko
  kernel/drivers/virtio/virtio_pci_legacy_dev.ko
  kernel/drivers/virtio/virtio_pci.ko
  kernel/drivers/virtio/virtio_mmio.ko
  kernel/net/core/failover.ko
  kernel/drivers/net/net_failover.ko
  kernel/drivers/net/virtio_net.ko
  kernel/drivers/block/virtio_blk.ko
  kernel/drivers/acpi/button.ko
  kernel/drivers/input/evdev.ko
  kernel/fs/fat/fat.ko
  kernel/fs/fat/vfat.ko
  kernel/fs/nls/nls_cp437.ko
  kernel/fs/nls/nls_ascii.ko
  kernel/drivers/cdrom/cdrom.ko
  kernel/fs/isofs/isofs.ko
)
# What the image's /novacron-vm.json recommends (verified under TCG; docs/vm-images.md).
# microvm is not recommended: under TCG its kernel hangs at boot more often than not
# ("tsc: Unable to calibrate against PIT"; microvm has no HPET or PM timer to fall
# back on).
VM_MACHINE=q35
VM_NIC=virtio-net-pci
VM_CMDLINE="console=ttyS0 quiet panic=-1"

TAG=novacron/guest-tiny:1
DOCKER=1
PRINT=0
while [ $# -gt 0 ]; do
  case $1 in
    --tag)
      [ $# -ge 2 ] || { echo "error: --tag needs a value" >&2; exit 64; }
      TAG=$2
      shift 2
      ;;
    --tag=*) TAG=${1#--tag=}; shift ;;
    --no-docker) DOCKER=0; shift ;;
    --print) PRINT=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (try --help)" >&2; exit 64 ;;
  esac
done

CACHE=${NOVACRON_VM_CACHE:-/var/tmp/novacron-vm}
SELF=$(readlink -f "$0")
say() { printf '[guest-image] %s\n' "$*" >&2; }
die() {
  printf '[guest-image] ERROR: %s\n' "$*" >&2
  exit 1
}

if [ "$PRINT" -eq 1 ]; then
  # The build writes $CACHE/current (a link to the last build's directory).
  out=$(readlink -f "$CACHE/current" 2>/dev/null || true)
  echo "NOVACRON_VM_CACHE=$CACHE"
  if [ -n "$out" ] && [ -f "$out/novacron-vm.json" ]; then
    echo "KERNEL=$out/vmlinuz"
    echo "INITRD=$out/initrd.img"
    echo "CONFIG=$out/novacron-vm.json"
    echo "INPUTS_HASH=$(cat "$out/inputs.sha256")"
  else
    echo "# not built yet: run $0" >&2
  fi
  echo "IMAGE=$TAG"
  exit 0
fi

missing=()
for tool in qemu-system-x86_64 qemu-img cpio gzip dpkg-deb apt-get sha256sum; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
# (grep reads the whole list: -q would stop early and pipefail would see SIGPIPE.)
[ -x /bin/busybox ] && /bin/busybox --list | grep -x httpd >/dev/null || missing+=("busybox-static (/bin/busybox)")
if [ "$DOCKER" -eq 1 ] && ! command -v docker >/dev/null; then missing+=(docker); fi
[ "${#missing[@]}" -eq 0 ] || die "missing ${missing[*]}: run 'bash .ci/setup vm' (installs qemu-system-x86 qemu-utils busybox-static cpio)"
# The guest runs /bin/busybox alone, so it must be busybox-static's (the busybox
# package's is dynamically linked and installs the same path).
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep 'install ok installed' >/dev/null ||
  die "busybox-static is not installed (/bin/busybox must be static): run 'bash .ci/setup vm'"

mkdir -p "$CACHE/debs" "$CACHE/kernels" "$CACHE/builds"

# --- 1. kernel ---------------------------------------------------------------
apt_as_root_opts=()
[ "$(id -u)" -eq 0 ] && apt_as_root_opts=(-o APT::Sandbox::User=root)

# Prints the cached .deb for package $1, or nothing.
cached_deb() {
  local f found=
  for f in "$CACHE/debs/$1"_*_amd64.deb; do
    if [ -f "$f" ]; then found=$f; fi
  done
  printf '%s' "$found"
}

kernel_pkg=${NOVACRON_VM_KERNEL_PKG:-$KERNEL_PKG_PIN}
deb=$(cached_deb "$kernel_pkg")
# A substitute chosen earlier for a pin gone from the archive (see below).
subst_file=$CACHE/debs/$kernel_pkg.substitute
if [ -z "$deb" ] && [ -z "${NOVACRON_VM_KERNEL_PKG:-}" ] && [ -f "$subst_file" ]; then
  deb=$(cached_deb "$(cat "$subst_file")")
  [ -z "$deb" ] || say "WARNING: $kernel_pkg is gone from the archive; using $(basename "$deb") (update KERNEL_PKG_PIN in $SELF)"
fi
if [ -z "$deb" ]; then
  if ! apt-cache show "$kernel_pkg" >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    say "apt does not know $kernel_pkg; apt-get update"
    apt-get update -q >&2 || true
  fi
  if ! apt-cache show "$kernel_pkg" >/dev/null 2>&1; then
    [ -z "${NOVACRON_VM_KERNEL_PKG:-}" ] || die "$kernel_pkg is not in the apt archive"
    current=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
      sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n 1)
    [ -n "$current" ] || die "$kernel_pkg is not in the apt archive and linux-image-cloud-amd64 names no kernel"
    say "WARNING: $kernel_pkg is gone from the archive; using $current (update KERNEL_PKG_PIN in $SELF)"
    kernel_pkg=$current
    echo "$current" >"$subst_file"
    deb=$(cached_deb "$kernel_pkg")
  fi
fi
if [ -z "$deb" ]; then
  say "downloading $kernel_pkg"
  dl=$(mktemp -d "$CACHE/debs/.dl.XXXXXX")
  (cd "$dl" && apt-get "${apt_as_root_opts[@]}" download -q "$kernel_pkg" >&2) ||
    { rm -rf "$dl"; die "apt-get download $kernel_pkg failed"; }
  mv "$dl"/*.deb "$CACHE/debs/"
  rmdir "$dl"
  deb=$(cached_deb "$kernel_pkg")
fi
deb_name=$(basename "$deb" .deb)
deb_sha=$(sha256sum "$deb" | cut -d' ' -f1)

# The kept parts of the package: boot/vmlinuz, boot/config, the guest's modules.
kdir=$CACHE/kernels/$deb_name
if [ ! -f "$kdir/.done" ]; then
  say "extracting $deb_name"
  rm -rf "$kdir"
  x=$(mktemp -d "$CACHE/kernels/.x.XXXXXX")
  dpkg-deb -x "$deb" "$x"
  mkdir -p "$kdir/modules"
  cp "$x"/boot/vmlinuz-* "$kdir/vmlinuz"
  cp "$x"/boot/config-* "$kdir/config"
  kver=$(basename "$x"/boot/vmlinuz-*)
  kver=${kver#vmlinuz-}
  echo "$kver" >"$kdir/version"
  moddir=$x/lib/modules/$kver
  for m in "${GUEST_MODULES[@]}"; do
    src=$moddir/$m
    name=$(basename "$m")
    if [ -f "$src" ]; then
      cp "$src" "$kdir/modules/$name"
    elif [ -f "$src.xz" ]; then
      xz -dc "$src.xz" >"$kdir/modules/$name"
    elif [ -f "$src.zst" ]; then
      zstd -qdc "$src.zst" >"$kdir/modules/$name"
    else
      # Built in (or absent): the config says which.
      say "note: $m not shipped as a module in $kver"
    fi
  done
  rm -rf "$x"
  touch "$kdir/.done"
fi
kver=$(cat "$kdir/version")

# Every module's dependencies must be in the list, loaded before it.
loaded=" "
for m in "${GUEST_MODULES[@]}"; do
  name=$(basename "$m" .ko)
  [ -f "$kdir/modules/$name.ko" ] || continue
  deps=$(tr '\0' '\n' <"$kdir/modules/$name.ko" | sed -n 's/^depends=//p' | head -n 1)
  for d in ${deps//,/ }; do
    case $loaded in *" $d "*) ;; *) die "module $name needs $d, which GUEST_MODULES lacks or lists later" ;; esac
  done
  loaded+="$name "
done

# --- 2. initramfs ------------------------------------------------------------
busybox_sha=$(sha256sum /bin/busybox | cut -d' ' -f1)
self_sha=$(sha256sum "$SELF" | cut -d' ' -f1)
# Only root can create the initramfs' /dev/console node (below): that is an input too.
console_node=no
[ "$(id -u)" -ne 0 ] || console_node=yes
inputs_hash=$(printf 'kernel %s %s\nbusybox %s\nscript %s\nconsole-node %s\n' "$deb_name" "$deb_sha" "$busybox_sha" "$self_sha" "$console_node" |
  sha256sum | cut -c1-16)
out=$CACHE/builds/$inputs_hash

write_init() {
  cat <<'EOF'
#!/bin/sh
# NovaCron tiny guest: PID 1 (packaging/vm/build-guest-image.sh writes this file).
export PATH=/bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
log() { echo "novacron-guest: $*"; }

# Drivers the kernel has as modules (the list is in load order). A module whose
# device is absent (virtio_mmio on q35, say) loads and stays idle.
while read -r m; do
  insmod "/lib/modules/$m.ko" 2>/dev/null
done </etc/modules

host=novacron-guest
for arg in $(cat /proc/cmdline); do
  case $arg in novacron.hostname=?*) host=${arg#novacron.hostname=} ;; esac
done
hostname "$host"
echo "$host" >/etc/hostname

# The network: the kernel's ip=ADDR::GATEWAY:NETMASK::eth0:off argument where
# there is one (a guest on its node's VM bridge), else QEMU's user network,
# statically: guest 10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3.
ip link set lo up
netarg=
for arg in $(cat /proc/cmdline); do
  case $arg in ip=?*) netarg=${arg#ip=} ;; esac
done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do usleep 100000; i=$((i + 1)); done
if [ -e /sys/class/net/eth0 ] && [ -n "$netarg" ]; then
  IFS=: read -r addr _ gw mask _ <<NET
$netarg
NET
  eval "$(ipcalc -p "$addr" "$mask")"
  ip addr add "$addr/$PREFIX" dev eth0
  ip link set eth0 up
  [ -z "$gw" ] || ip route add default via "$gw"
  log "eth0 $addr/$PREFIX via $gw"
elif [ -e /sys/class/net/eth0 ]; then
  ip addr add 10.0.2.15/24 dev eth0
  ip link set eth0 up
  ip route add default via 10.0.2.2
  echo "nameserver 10.0.2.3" >/etc/resolv.conf
else
  log "no eth0 (no virtio-net device?)"
fi

# The ACPI power button (QMP system_powerdown) powers the guest off: acpid runs
# /etc/acpi/PWRF/00000080 for the button's input event.
acpid -c /etc/acpi -l /dev/null 2>/dev/null || log "acpid did not start: no clean power-off"

echo "novacron guest $(hostname)" >/www/index.html
httpd -p 8080 -h /www
i=0
# Listening on port 8080 (0x1F90), state 0A = LISTEN; httpd binds [::]:8080, so
# the socket shows in tcp6 (tcp too, for a kernel without IPv6).
until grep -q ':1F90 [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
  [ $i -lt 100 ] || { log "httpd is not listening on 8080"; break; }
  usleep 50000
  i=$((i + 1))
done
log ready

# A NoCloud seed: a filesystem labelled cidata (vfat or iso9660) with user-data.
seed=$(findfs LABEL=cidata 2>/dev/null || findfs LABEL=CIDATA 2>/dev/null)
if [ -n "$seed" ]; then
  mkdir -p /run/cidata
  if mount -o ro "$seed" /run/cidata; then
    if [ -f /run/cidata/user-data ] && [ "$(head -c 2 /run/cidata/user-data)" = '#!' ]; then
      cp /run/cidata/user-data /tmp/user-data
      chmod +x /tmp/user-data
      /tmp/user-data
      log "user-data ran (exit $?)"
    fi
  else
    log "cannot mount the cidata seed $seed"
  fi
fi

# A shell on the serial console, for `novacron vm console NAME -i` (what it
# prints goes to the console's log like the rest); started again when it ends.
( while :; do sh </dev/ttyS0 >/dev/ttyS0 2>&1; usleep 500000; done ) &

# PID 1 never exits; waiting reaps orphans (httpd's CGI children, acpid's scripts).
while :; do
  sleep 3600 &
  wait
done
EOF
}

write_poweroff() {
  cat <<'EOF'
#!/bin/sh
# Run by acpid for the ACPI power button: power off now (nothing to flush but a
# mounted seed: the root is the initramfs).
echo "novacron-guest: powering off" >/dev/console
killall httpd 2>/dev/null
umount /run/cidata 2>/dev/null
sync
poweroff -f
EOF
}

write_count_cgi() {
  cat <<'EOF'
#!/bin/sh
# A counter kept in guest memory (/tmp/count): each request adds one and prints it.
# mkdir is the lock, so concurrent requests never lose an increment.
until mkdir /tmp/count.lock 2>/dev/null; do usleep 10000; done
n=$(cat /tmp/count 2>/dev/null)
n=$((${n:-0} + 1))
echo "$n" >/tmp/count
rmdir /tmp/count.lock
printf 'Content-Type: text/plain\r\n\r\n%s\n' "$n"
EOF
}

if [ ! -f "$out/.done" ]; then
  say "building initramfs $inputs_hash ($kver)"
  rm -rf "$out"
  mkdir -p "$out"
  root=$(mktemp -d "$CACHE/builds/.root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,etc/acpi/PWRF,www/cgi-bin,lib/modules}
  chmod 1777 "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  ln -s bin "$root/sbin"
  write_init >"$root/init"
  write_poweroff >"$root/etc/acpi/PWRF/00000080"
  write_count_cgi >"$root/www/cgi-bin/count"
  chmod 755 "$root/init" "$root/etc/acpi/PWRF/00000080" "$root/www/cgi-bin/count"
  echo ok >"$root/www/health"
  : >"$root/etc/modules"
  for m in "${GUEST_MODULES[@]}"; do
    name=$(basename "$m" .ko)
    [ -f "$kdir/modules/$name.ko" ] || continue
    cp "$kdir/modules/$name.ko" "$root/lib/modules/"
    echo "$name" >>"$root/etc/modules"
  done
  # The kernel opens /dev/console for /init before devtmpfs is mounted; creating
  # the node needs root (the init script reopens the console either way).
  [ "$console_node" = no ] || mknod -m 600 "$root/dev/console" c 5 1
  find "$root" -exec touch -h -d @0 {} +
  (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$out/initrd.img.tmp"
  rm -rf "$root"
  trap - EXIT
  # An empty archive means cpio failed silently (the environment notes it once did).
  [ "$(stat -c %s "$out/initrd.img.tmp")" -gt 100000 ] || die "the initramfs is suspiciously small"
  mv "$out/initrd.img.tmp" "$out/initrd.img"
  cp "$kdir/vmlinuz" "$out/vmlinuz"
  cat >"$out/novacron-vm.json" <<EOF
{"kernel":"/boot/vmlinuz","initrd":"/boot/initrd.img","cmdline":"$VM_CMDLINE","machine":"$VM_MACHINE","nic":"$VM_NIC"}
EOF
  echo "$inputs_hash" >"$out/inputs.sha256"
  printf '%s\n' "$deb_name" >"$out/kernel-package"
  touch "$out/.done"
fi
ln -sfn "builds/$inputs_hash" "$CACHE/current"
# Earlier builds are superseded (the downloaded .debs stay cached).
for d in "$CACHE"/builds/*; do
  [ "$d" = "$out" ] || rm -rf "$d"
done
say "files: $out (vmlinuz $(du -k "$out/vmlinuz" | cut -f1) KiB, initrd.img $(du -k "$out/initrd.img" | cut -f1) KiB)"

# --- 3. containerDisk image --------------------------------------------------
if [ "$DOCKER" -eq 1 ]; then
  have=$(docker image inspect --format '{{ index .Config.Labels "io.novacron.vm.inputs" }}' "$TAG" 2>/dev/null || true)
  if [ "$have" = "$inputs_hash" ]; then
    say "image $TAG is up to date ($inputs_hash)"
  else
    say "docker build $TAG ($inputs_hash)"
    old_id=$(docker image inspect --format '{{.Id}}' "$TAG" 2>/dev/null || true)
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx" "$ctx.log"' EXIT
    mkdir -p "$ctx/boot"
    cp "$out/vmlinuz" "$out/initrd.img" "$ctx/boot/"
    cp "$out/novacron-vm.json" "$ctx/"
    # CMD is never run: it only lets `docker create` make the container the
    # agent copies the files out of (an image with no command cannot be created).
    cat >"$ctx/Dockerfile" <<EOF
FROM scratch
COPY boot/ /boot/
COPY novacron-vm.json /novacron-vm.json
LABEL io.novacron.vm.inputs="$inputs_hash" \\
      io.novacron.vm.kernel-package="$deb_name" \\
      io.novacron.vm.kernel-version="$kver"
CMD ["/novacron-vm-image-is-not-runnable"]
EOF
    # The legacy builder: no BuildKit/buildx needed, and FROM scratch needs no base.
    if ! DOCKER_BUILDKIT=0 docker build -q -t "$TAG" "$ctx" >"$ctx.log" 2>&1; then
      cat "$ctx.log" >&2
      rm -f "$ctx.log"
      die "docker build $TAG failed"
    fi
    rm -f "$ctx.log"
    rm -rf "$ctx"
    trap - EXIT
    # The image the tag named before is now untagged: remove it unless something
    # still uses it (a container, another tag).
    [ -z "$old_id" ] || docker image rm "$old_id" >/dev/null 2>&1 || true
  fi
  say "image $TAG: $(docker image inspect --format '{{.Size}}' "$TAG") bytes"
fi

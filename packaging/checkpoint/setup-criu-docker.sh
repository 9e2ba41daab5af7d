#!/usr/bin/env bash
# Live-checkpoint test environment: a working CRIU and two experimental Docker
# daemons ("a" and "b") that use it, so tests can checkpoint a container on one
# daemon and restore it on the other.
#
# Why CRIU from Debian sid (4.2.1) and not trixie (4.1.1) or bookworm (3.17):
#   - bookworm's criu 3.17 fails on this kernel (6.x): `criu check` reports
#     "vdso: Unexpected rt vDSO area bounds".
#   - trixie's criu 4.1.1 passes `criu check` but FAILS to checkpoint any process
#     holding an INET/INET6 socket: "sockets: Can't get 1:16 opt: Operation not
#     supported" (it reads SO_PASSCRED on an inet socket, which the kernel refuses).
#     Every network server (our workloads) has such a socket.
#   - sid's criu 4.2.1 checkpoints and restores a container with a listening TCP
#     socket (verified: busybox httpd, checkpoint + restore into a new container).
#   sid's criu needs a newer glibc than the host's, so it runs through its own
#   loader from a private root (`dpkg -x` of the .debs); a wrapper script named
#   `criu` goes first on the daemons' PATH (runc, started by the daemon's own
#   containerd, finds it there). Real hosts with a current distribution have
#   criu >= 4.2 natively; this is test-environment setup only.
#
# The daemons get a bridge each (published ports work through docker-proxy, with
# --iptables=false) and their own data-root, exec-root, pidfile and containerd
# namespaces; they never touch the host's daemon.
#
# Usage:
#   setup-criu-docker.sh [start]   fetch criu if needed, start both daemons if they
#                                  are not answering, check, write $DIR/env
#   setup-criu-docker.sh stop      stop the two daemons this script started (by
#                                  their pidfiles) and remove their bridges
#   setup-criu-docker.sh env       print the env file
# Environment: NOVACRON_CKPT_DIR (default /var/tmp/novacron-ckpt). Needs root.
# Idempotent: a second `start` reuses the criu root and the running daemons.
set -euo pipefail

DIR=${NOVACRON_CKPT_DIR:-/var/tmp/novacron-ckpt}
CRIU_ROOT=$DIR/criu-root
WRAPPER_DIR=$DIR/bin
WRAPPER=$WRAPPER_DIR/criu
APT_DIR=$DIR/apt
DEB_DIR=$DIR/debs
SUITE_URL=${NOVACRON_CKPT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=sid
WAIT_SECS=60
# criu and what it links against (sid names; libnet9 is sid's libnet).
CRIU_PACKAGES=(criu libcompel1 libnet9 libnl-3-200 libc6 libgnutls30t64 libnftables1
  libprotobuf-c1 libbsd0 libuuid1 libidn2-0 libunistring5 libtasn1-6 libnettle8t64
  libhogweed6t64 libgmp10 libp11-kit0 libffi8 libmd0 libjansson4 libmnl0 libnftnl11
  libxtables12 libedit2 libtinfo6 libbpf1 libelf1t64 zlib1g libzstd1 libgcc-s1)
# name bridge address/prefix
DAEMONS=("a ncbr-a 10.213.10.1/24" "b ncbr-b 10.213.11.1/24")

say() { printf '[ckpt-setup] %s\n' "$*"; }
die() {
  printf '[ckpt-setup] ERROR: %s\n' "$*" >&2
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (dockerd, bridges and criu need it)"

# --- criu -------------------------------------------------------------------

criu_ok() {
  [ -x "$WRAPPER" ] && "$WRAPPER" check >/dev/null 2>&1
}

write_wrapper() {
  mkdir -p "$WRAPPER_DIR"
  local tmp=$WRAPPER.tmp
  cat >"$tmp" <<EOF
#!/bin/sh
# criu from Debian $SUITE through its own loader (see setup-criu-docker.sh).
exec "$CRIU_ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$CRIU_ROOT/usr/lib/x86_64-linux-gnu:$CRIU_ROOT/lib/x86_64-linux-gnu" "$CRIU_ROOT/usr/sbin/criu" "\$@"
EOF
  chmod 755 "$tmp"
  mv -f "$tmp" "$WRAPPER"
}

fetch_criu() {
  for tool in apt-get dpkg; do
    command -v "$tool" >/dev/null || die "$tool is missing (a Debian host is assumed)"
  done
  [ "$(dpkg --print-architecture)" = amd64 ] || die "only amd64 is supported"
  say "fetching criu from Debian $SUITE into $CRIU_ROOT"
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$DEB_DIR"
  echo "deb $SUITE_URL $SUITE main" >"$APT_DIR/sources.list"
  local apt_opts=(
    -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
    -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::Cache=$APT_DIR/cache"
    -o Debug::NoLocking=1
    -o Dir::State::status=/dev/null
    -o APT::Sandbox::User=root
  )
  apt-get -q "${apt_opts[@]}" update >"$APT_DIR/update.log" 2>&1 ||
    { tail -n 20 "$APT_DIR/update.log" >&2; die "apt-get update for $SUITE failed"; }
  rm -f "$DEB_DIR"/*.deb
  (cd "$DEB_DIR" && apt-get -q "${apt_opts[@]}" download "${CRIU_PACKAGES[@]}") \
    >"$APT_DIR/download.log" 2>&1 ||
    { tail -n 20 "$APT_DIR/download.log" >&2; die "apt-get download from $SUITE failed"; }
  local tmp_root=$CRIU_ROOT.new
  rm -rf "$tmp_root"
  mkdir -p "$tmp_root"
  local deb
  for deb in "$DEB_DIR"/*.deb; do
    dpkg -x "$deb" "$tmp_root" || die "dpkg -x $deb failed"
  done
  rm -rf "$CRIU_ROOT"
  mv "$tmp_root" "$CRIU_ROOT"
  write_wrapper
}

setup_criu() {
  if criu_ok; then
    say "criu: $("$WRAPPER" --version | head -n 1) already passes 'criu check' (no download)"
    return 0
  fi
  local start=$SECONDS
  fetch_criu
  "$WRAPPER" --version >/dev/null 2>&1 ||
    die "the unpacked criu does not run: $("$WRAPPER" --version 2>&1 | tail -n 3)"
  say "criu: fetched $("$WRAPPER" --version | head -n 1) in $((SECONDS - start))s"
}

# --- daemons ----------------------------------------------------------------

# Short exec-root: containerd puts sockets under it and unix socket paths are
# limited to 108 bytes.
exec_root() {
  local name=$1 candidate=$DIR/$1/x
  if [ "${#candidate}" -le 40 ]; then
    echo "$candidate"
  else
    echo "/run/nckpt-$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)-$name"
  fi
}

sock_of() { echo "$DIR/$1/docker.sock"; }

answering() {
  DOCKER_HOST=unix://$(sock_of "$1") timeout 10 docker info >/dev/null 2>&1
}

# The pid in $1's pidfile when that process is a dockerd with our data-root.
our_pid() {
  local name=$1 pidfile=$DIR/$1/docker.pid pid
  [ -s "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--data-root $DIR/$name/data " || return 1
  echo "$pid"
}

ensure_bridge() {
  local bridge=$1 addr=$2
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge || die "cannot create bridge $bridge"
  fi
  if ! ip -4 addr show dev "$bridge" | grep -q "inet $addr "; then
    ip addr add "$addr" dev "$bridge" || die "cannot add $addr to $bridge"
  fi
  ip link set "$bridge" up || die "cannot bring $bridge up"
}

start_daemon() {
  local name=$1 bridge=$2 addr=$3
  local home=$DIR/$name sock
  sock=$(sock_of "$name")
  if answering "$name"; then
    say "daemon $name: already answering on unix://$sock"
    return 0
  fi
  if our_pid "$name" >/dev/null; then
    die "daemon $name (pid $(our_pid "$name")) runs but does not answer on $sock; run '$0 stop' first"
  fi
  command -v dockerd >/dev/null || die "dockerd is missing (apt-get install docker.io)"
  command -v ip >/dev/null || die "ip is missing (apt-get install iproute2)"
  if [ -S /run/containerd/containerd.sock ]; then
    say "WARNING: a system containerd runs at /run/containerd/containerd.sock; dockerd" \
      "will use it instead of its own, and runc will not see the criu wrapper on PATH"
  fi
  ensure_bridge "$bridge" "$addr"
  local exec
  exec=$(exec_root "$name")
  mkdir -p "$home/data" "$exec"
  echo '{}' >"$home/daemon.json"
  rm -f "$sock"
  local start=$SECONDS
  # setsid + nohup: the daemon outlives this script (and CI's step).
  PATH=$WRAPPER_DIR:$PATH setsid nohup dockerd \
    --config-file "$home/daemon.json" --experimental \
    -H "unix://$sock" \
    --data-root "$home/data" --exec-root "$exec" --pidfile "$home/docker.pid" \
    --bridge="$bridge" --iptables=false \
    --containerd-namespace "novacron-ckpt-$name" \
    --containerd-plugins-namespace "novacron-ckpt-${name}p" \
    >"$home/dockerd.log" 2>&1 </dev/null &
  local waited=0
  until answering "$name"; do
    if [ "$waited" -ge "$WAIT_SECS" ]; then
      tail -n 30 "$home/dockerd.log" >&2 || true
      die "daemon $name did not answer on $sock within ${WAIT_SECS}s (log: $home/dockerd.log)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  say "daemon $name: started in $((SECONDS - start))s on unix://$sock (log: $home/dockerd.log)"
}

check_daemon() {
  local name=$1 sock experimental version
  sock=$(sock_of "$name")
  experimental=$(DOCKER_HOST=unix://$sock docker version --format '{{.Server.Experimental}}' 2>/dev/null) ||
    die "daemon $name does not answer on $sock"
  version=$(DOCKER_HOST=unix://$sock docker version --format '{{.Server.Version}}' 2>/dev/null)
  [ "$experimental" = true ] ||
    die "daemon $name on $sock has experimental off (not started by this script?)"
  echo "  daemon $name: unix://$sock  engine $version  experimental=$experimental  pid $(our_pid "$name" || echo '?')"
}

stop_daemon() {
  local name=$1 bridge=$2 pid
  if pid=$(our_pid "$name"); then
    say "daemon $name: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while [ -d "/proc/$pid" ]; do
      if [ "$waited" -ge 30 ]; then
        say "daemon $name: still running after 30s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 1
        break
      fi
      sleep 1
      waited=$((waited + 1))
    done
  else
    say "daemon $name: not running (no pidfile of ours at $DIR/$name/docker.pid)"
  fi
  if ip link show "$bridge" >/dev/null 2>&1; then
    ip link del "$bridge" 2>/dev/null && say "bridge $bridge removed" || true
  fi
}

write_env() {
  local tmp=$DIR/env.tmp
  {
    echo "NOVACRON_CKPT_DOCKER_A=unix://$(sock_of a)"
    echo "NOVACRON_CKPT_DOCKER_B=unix://$(sock_of b)"
    echo "NOVACRON_CKPT_CRIU=$WRAPPER"
  } >"$tmp"
  mv -f "$tmp" "$DIR/env"
}

# runc (under Docker) reads CRIU options from /etc/criu/runc.conf. Without these a
# container that serves connections cannot be dumped: an established connection
# needs tcp-close (restored closed; clients reconnect) and one still in the listen
# backlog needs skip-in-flight (dropped). Appends the missing lines only.
RUNC_CRIU_CONF=/etc/criu/runc.conf
setup_runc_conf() {
  mkdir -p "$(dirname "$RUNC_CRIU_CONF")"
  touch "$RUNC_CRIU_CONF"
  local opt
  for opt in tcp-close skip-in-flight; do
    if ! grep -Eq "^[[:space:]]*(--)?${opt}[[:space:]]*(#.*)?$" "$RUNC_CRIU_CONF"; then
      echo "$opt" >>"$RUNC_CRIU_CONF"
      say "added '$opt' to $RUNC_CRIU_CONF"
    fi
  done
}

cmd_start() {
  mkdir -p "$DIR"
  local start=$SECONDS
  setup_criu
  setup_runc_conf
  local d
  for d in "${DAEMONS[@]}"; do
    # shellcheck disable=SC2086
    start_daemon $d
  done
  local check
  check=$("$WRAPPER" check 2>&1) || die "criu check failed: $check"
  write_env
  echo
  echo "=== live checkpoint environment (${DIR}, ready in $((SECONDS - start))s)"
  echo "  criu: $("$WRAPPER" --version | head -n 1) via $WRAPPER; criu check: $(echo "$check" | tail -n 1)"
  for d in "${DAEMONS[@]}"; do
    check_daemon "${d%% *}"
  done
  echo "  runc CRIU options ($RUNC_CRIU_CONF): $(grep -v '^#' "$RUNC_CRIU_CONF" | tr '\n' ' ')"
  echo "  env file: $DIR/env"
  sed 's/^/    /' "$DIR/env"
}

cmd_stop() {
  local d
  for d in "${DAEMONS[@]}"; do
    # shellcheck disable=SC2086
    set -- $d
    stop_daemon "$1" "$2"
  done
}

case "${1:-start}" in
start) cmd_start ;;
stop) cmd_stop ;;
env) cat "$DIR/env" ;;
*) die "usage: $0 [start|stop|env]" ;;
esac

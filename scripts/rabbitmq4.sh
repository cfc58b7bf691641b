#!/usr/bin/env bash
# A RabbitMQ 4.0 node for the tests, beside this machine's own broker (Debian 12: 3.10).
#
# Debian 13 (trixie) packages RabbitMQ 4.0. `prepare` debootstraps a minimal trixie into
# ROOT (a cache folder, ~2-4 minutes and ~300 MB the first time, reused after) and installs
# rabbitmq-server there; `start` runs one node from it under chroot, on ports of its own:
# AMQP $PORT on loopback, distribution $DIST_PORT, its own epmd on $EPMD_PORT and its own
# node name. The host's broker, its epmd (4369) and everything under the host's /etc are
# never touched: the node's files are written from inside the chroot, so even a symlink
# in ROOT cannot point a write outside it.
#
#   scripts/rabbitmq4.sh prepare | start | stop | status | url | ctl ARGS... | import FILE
#                        | run CMD...
#
# `run CMD...` starts the node, runs CMD with BATCH_WORKER_TEST_BROKER_URL pointing at it
# (and BATCH_WORKER_TEST_RABBITMQ4 naming this script, for the tests' rabbitmqctl), stops
# the node and exits with CMD's status.
# Needs root (debootstrap, chroot). Where Debian's mirror cannot be reached, `prepare`
# fails with a message: a run that wants the 4.0 node fails loudly, never skips.
set -euo pipefail

# Unset: the default; set but empty: refused below, like "/".
ROOT=${RABBITMQ4_ROOT-/var/cache/batch-worker/rabbitmq4-root}
PORT=${RABBITMQ4_PORT:-5673}
DIST_PORT=${RABBITMQ4_DIST_PORT:-25673}
EPMD_PORT=${RABBITMQ4_EPMD_PORT:-4373}
NODE=${RABBITMQ4_NODE:-rabbit4@localhost}
MIRROR=${RABBITMQ4_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
READY=.batch-worker-rabbitmq4-ready
BOOT_TIMEOUT=${RABBITMQ4_BOOT_TIMEOUT:-180}

die() { echo "rabbitmq4: $*" >&2; exit 1; }

# Everything this script writes is under ROOT, so ROOT must be a folder of its own: never
# empty, never "/" (however spelled: "//", "/.", a symlink to it), never a top-level
# system folder such as /etc or /var.
safe_root() {
  [ -n "$ROOT" ] || die "RABBITMQ4_ROOT is empty: refusing"
  case "$ROOT" in /*) ;; *) die "RABBITMQ4_ROOT must be an absolute path, not '$ROOT'" ;; esac
  local real
  real=$(realpath -m -- "$ROOT") || die "cannot resolve RABBITMQ4_ROOT '$ROOT'"
  [ "$real" != "/" ] || die "RABBITMQ4_ROOT '$ROOT' is the host's root: refusing"
  case "${real#/}" in
    */*) ;;
    *) die "RABBITMQ4_ROOT '$ROOT' is a top-level folder ($real): refusing" ;;
  esac
  ROOT=$real
}

require_root_user() { [ "$(id -u)" = 0 ] || die "needs root (debootstrap and chroot)"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A command inside the chroot, with a clean environment: nothing of the host's RABBITMQ_*
# or ERL_* settings leaks in, and the node's own ports and name are set.
in_root() {
  chroot "$ROOT" /usr/bin/env -i \
    PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/var/lib/rabbitmq LANG=C.UTF-8 LC_ALL=C.UTF-8 \
    RABBITMQ_NODENAME="$NODE" RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_CONFIG_FILE=/var/lib/rabbitmq/batch-worker.conf \
    RABBITMQ_ENABLED_PLUGINS_FILE=/var/lib/rabbitmq/batch-worker-plugins \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    ERL_EPMD_PORT="$EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1 \
    "$@"
}

prepare() {
  require_root_user
  if [ -f "$ROOT/$READY" ]; then
    echo "rabbitmq4: $(cat "$ROOT/$READY") in $ROOT"
    return
  fi
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  } || die "cannot install debootstrap"
  # Never deletes a folder it did not make: an existing ROOT without the ready mark, or a
  # leftover build folder without the build mark, is someone else's.
  [ ! -e "$ROOT" ] || die "$ROOT exists but was not prepared by this script: remove it first"
  # Built beside ROOT and moved into place whole: a half-made tree is never taken as ready.
  local building="$ROOT.building"
  if [ -e "$building" ]; then
    [ -f "$building/.batch-worker-building" ] || die "$building is not this script's: remove it first"
    rm -rf --one-file-system -- "$building"
  fi
  mkdir -p -- "$building"
  touch "$building/.batch-worker-building"
  echo "rabbitmq4: debootstrapping Debian $SUITE into $ROOT (a few minutes, once)"
  debootstrap --variant=minbase "$SUITE" "$building" "$MIRROR" >"$building.log" 2>&1 || {
    tail -n 5 "$building.log" >&2
    die "debootstrap of Debian $SUITE from $MIRROR failed (no network to Debian's mirror?); see $building.log"
  }
  # The chroot's rabbitmq user gets the host's rabbitmq uid and gid: Debian's pick in the
  # chroot would be the next free system id there, which on the host belongs to someone
  # else (here: postgres), and the node's files and processes would be theirs.
  if id rabbitmq >/dev/null 2>&1; then
    local uid gid
    uid=$(id -u rabbitmq) gid=$(id -g rabbitmq)
    ROOT=$building in_root sh -c "groupadd --system -g $gid rabbitmq && useradd --system \
        -u $uid -g rabbitmq -d /var/lib/rabbitmq -s /usr/sbin/nologin rabbitmq" \
      || die "cannot make the rabbitmq user ($uid:$gid) in $building"
  fi
  # No init system runs in the chroot: the package's postinst must not try to start it.
  printf '#!/bin/sh\nexit 101\n' >"$building/usr/sbin/policy-rc.d"
  chmod 755 "$building/usr/sbin/policy-rc.d"
  ROOT=$building in_root sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null' \
    || die "installing rabbitmq-server in $building failed"
  local version
  version=$(ROOT=$building in_root dpkg-query -W -f '${Version}' rabbitmq-server)
  echo "rabbitmq-server $version (Debian $SUITE)" >"$building/$READY"
  rm -f -- "$building/.batch-worker-building"
  mv -- "$building" "$ROOT"
  rm -f -- "$building.log"
  echo "rabbitmq4: rabbitmq-server $version ready in $ROOT"
}

running() {
  port_open "$PORT" && in_root rabbitmq-diagnostics -q check_running >/dev/null 2>&1
}

start() {
  require_root_user
  prepare
  if running; then echo "rabbitmq4: $NODE already running on 127.0.0.1:$PORT"; return; fi
  port_open "$PORT" && die "127.0.0.1:$PORT is taken by something else"
  # A fresh node each start: no queue of an earlier run is left over. The files are
  # written by a shell inside the chroot, so their paths are the chroot's.
  in_root sh -c "rm -rf /var/lib/rabbitmq/mnesia /var/log/rabbitmq/*
    printf 'listeners.tcp.local = 127.0.0.1:$PORT\nloopback_users.guest = true\n' \
      > /var/lib/rabbitmq/batch-worker.conf
    printf '[].\n' > /var/lib/rabbitmq/batch-worker-plugins
    chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq"
  # -detached returns at once, even when the boot fails later: hence the polling.
  in_root rabbitmq-server -detached
  local waited=0
  until running; do
    if [ "$waited" -ge "$BOOT_TIMEOUT" ]; then
      tail -n 20 "$ROOT"/var/log/rabbitmq/*.log >&2 2>/dev/null || true
      die "$NODE did not start within $BOOT_TIMEOUT s"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "rabbitmq4: $NODE ($(in_root rabbitmqctl -q version)) on 127.0.0.1:$PORT after ${waited} s"
}

stop() {
  require_root_user
  [ -f "$ROOT/$READY" ] || { echo "rabbitmq4: nothing prepared in $ROOT"; return; }
  in_root rabbitmqctl -q shutdown >/dev/null 2>&1 || true
  # Only the epmd of this node's port: the host's (4369) stays up.
  in_root epmd -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
  # Whatever still runs in this chroot (an epmd that a stray CLI registration keeps, a VM
  # that did not shut down): those processes alone, told by their root folder.
  local pid left
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    left=""
    for pid in $(chrooted_pids); do kill "$pid" 2>/dev/null && left="$left $pid"; done
    [ -n "$left" ] || break
    sleep 1
  done
  for pid in $(chrooted_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  echo "rabbitmq4: $NODE stopped"
}

# The processes whose root is this chroot.
chrooted_pids() {
  local proc
  for proc in /proc/[0-9]*; do
    [ "$(readlink "$proc/root" 2>/dev/null)" = "$ROOT" ] && echo "${proc#/proc/}"
  done
  return 0
}

url() { echo "amqp://guest:guest@127.0.0.1:$PORT//"; }

# import_definitions of a host file: the node sees only the chroot, so the file is copied
# into the chroot's /tmp for it (readable by the node's user) and removed after.
import_definitions() {
  require_root_user
  [ -f "${1:-}" ] || die "import needs a definitions file"
  local inside
  inside=$(in_root mktemp /tmp/batch-worker-definitions.XXXXXX)
  cat -- "$1" | in_root sh -c "cat > '$inside' && chmod 644 '$inside'"
  local status=0
  in_root rabbitmqctl -q import_definitions "$inside" || status=$?
  in_root rm -f -- "$inside"
  return "$status"
}

run() {
  [ "$#" -gt 0 ] || die "run needs a command"
  start
  local status=0
  BATCH_WORKER_TEST_BROKER_URL=$(url) BATCH_WORKER_TEST_RABBITMQ4="$(realpath -- "$0")" \
    "$@" || status=$?
  stop
  return "$status"
}

safe_root
command=${1:-}
[ "$#" -gt 0 ] && shift
case "$command" in
  prepare) prepare ;;
  start) start ;;
  stop) stop ;;
  status) if running; then echo "rabbitmq4: $NODE running on 127.0.0.1:$PORT"; else
      echo "rabbitmq4: $NODE not running"; exit 1; fi ;;
  url) url ;;
  ctl) require_root_user; in_root rabbitmqctl "$@" ;;
  import) import_definitions "$@" ;;
  run) run "$@" ;;
  *) die "usage: $0 prepare|start|stop|status|url|ctl ARGS...|import FILE|run CMD..." ;;
esac

#!/usr/bin/env bash
# Bring up the local services the demo and the tests need, when none is reachable:
# RabbitMQ (5672) and PostgreSQL (5432). Installs them from Debian's packages on a bare
# machine. Idempotent; prints one line per service.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
apt_install() {
  command -v apt-get >/dev/null || { echo "cannot install $*: no apt-get" >&2; exit 1; }
  [ -n "${_APT_UPDATED:-}" ] || { apt-get update -qq; _APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_rabbitmq() {
  # Installed even when a broker already listens: tests that restart a broker start a
  # node of their own (tests/rabbitmq_node.py).
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  if port_open 5672; then echo "rabbitmq: already running on 127.0.0.1:5672"; return; fi
  rabbitmq-server -detached
  # -detached returns at once; `await_startup` right after it fails, so poll.
  for _ in $(seq 1 60); do
    if rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && port_open 5672; then
      echo "rabbitmq: started"; return
    fi
    sleep 1
  done
  echo "rabbitmq: did not start within 60 s" >&2; exit 1
}

ensure_postgres() {
  if port_open 5432; then echo "postgresql: already running on 127.0.0.1:5432"; return; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
    local conf; conf=$(ls -d /etc/postgresql/*/main | head -n1)
    # A throw-away local cluster: trust loopback connections, like the CI machines do.
    sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$conf/pg_hba.conf"
  fi
  local version; version=$(ls /etc/postgresql | head -n1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do
    if port_open 5432; then echo "postgresql: started"; return; fi
    sleep 1
  done
  echo "postgresql: did not start within 30 s" >&2; exit 1
}

ensure_rabbitmq
ensure_postgres

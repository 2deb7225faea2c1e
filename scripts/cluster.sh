#!/usr/bin/env bash
# Starts or stops a local PostgreSQL cluster for pg_changerelay, run as the
# `postgres` user on loopback, with wal_level=logical and the library
# preloaded.
#
#   scripts/cluster.sh start DIR PORT     initdb if needed, configure, start
#   scripts/cluster.sh stop DIR           fast shutdown
#   scripts/cluster.sh restart-immediate DIR   crash-like stop, then start
#   scripts/cluster.sh standby DIR PORT PRIMARY_PORT
#                                         a streaming standby of the cluster on
#                                         127.0.0.1:PRIMARY_PORT, started
#   scripts/cluster.sh promote DIR        promote that standby (waits)
#
# A standby is a pg_basebackup of the primary with a physical slot on the
# primary (STANDBY_SLOT, default standby_PORT; also its application_name,
# for synchronous_standby_names), hot_standby_feedback on, and where the
# server has them (17+) sync_replication_slots on (SYNC_SLOTS=off turns it
# off) with dbname in primary_conninfo, so the relay's failover slot is
# synchronised to it. Its own settings (port, endpoint port, those above,
# then EXTRA_CONF) go to postgresql.auto.conf, after whatever the primary
# set with ALTER SYSTEM, so they win.
#
# EXTRA_CONF (newline-separated settings) is appended to postgresql.conf
# when the cluster is created; INITDB_ENCODING (default UTF8) is the
# encoding initdb gives it.
#
# PG=15|17|18 (default 15) selects the major. 15 is the host's own package;
# 17 and 18 run inside their Debian roots (scripts/root.sh; build them with
# `make setup PG=NN`): this script then runs itself inside the root, where
# the project tree has the same path, so DIR must be inside the project.
# Either way the server listens on 127.0.0.1:PORT and the host's clients
# (psql, psycopg, curl) reach it; it runs as the `postgres` user (the root's
# own one for 17/18).
#
# PostgreSQL 15.19 and later only load output plugins listed in the
# superuser setting output_plugin_libraries; older minors refuse to start
# when it is set, so it is added only when this server knows it.
set -euo pipefail

cmd=${1:?usage: cluster.sh start|stop|restart-immediate|standby|promote DIR [PORT [PRIMARY_PORT]]}
dir=${2:?data directory}
PG=${PG:-15}
case "$PG" in 15 | 17 | 18) ;; *) echo "cluster.sh: PG=$PG is not supported (15, 17, 18)" >&2; exit 2 ;; esac

if [ "$PG" != 15 ] && [ -z "${PGCR_IN_ROOT:-}" ]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  case "$dir/" in
    "$here"/*) ;;
    *) echo "cluster.sh: with PG=$PG the data directory must be inside $here (it is mounted into the root)" >&2; exit 2 ;;
  esac
  # A running server keeps the root's mounts (of its own mount namespace).
  mode=run
  [ "$cmd" = stop ] || mode=serve
  exec "$here/scripts/root.sh" "$mode" "$PG" "$here/scripts/cluster.sh" "$cmd" "$dir" "${@:3}"
fi

PGBIN=/usr/lib/postgresql/$PG/bin
[ -x "$PGBIN/pg_ctl" ] || { echo "cluster.sh: no PostgreSQL $PG in $PGBIN (make setup PG=$PG)" >&2; exit 2; }
OS_USER=postgres

as_pg() {
  if [ "$(id -un)" = "$OS_USER" ]; then "$@"; else sudo -u "$OS_USER" -- "$@"; fi
}

server_knows() {
  as_pg "$PGBIN/postgres" --describe-config 2>/dev/null | cut -f1 | grep -x "$1" >/dev/null
}

configure() {
  local port=$1
  cat >>"$dir/postgresql.conf" <<CONF

# --- pg_changerelay test/dev cluster ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '/tmp'
wal_level = logical
max_replication_slots = 16
max_wal_senders = 16
shared_preload_libraries = 'pg_changerelay'
fsync = off
full_page_writes = off
synchronous_commit = on
log_min_messages = warning
log_line_prefix = '%m [%p] %b '
# The relay worker's WebSocket/HTTP endpoint: the server's port + 1000.
changerelay.port = $((port + 1000))
CONF
  if server_knows output_plugin_libraries; then
    echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json, pg_changerelay'" >>"$dir/postgresql.conf"
  fi
  # Extra settings (one per line), appended last so they win.
  if [ -n "${EXTRA_CONF:-}" ]; then
    printf '%s\n' "$EXTRA_CONF" >>"$dir/postgresql.conf"
  fi
}

case "$cmd" in
  start)
    port=${3:?port}
    mkdir -p "$dir"
    chown "$OS_USER:$OS_USER" "$dir" 2>/dev/null || true
    chmod 700 "$dir"
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_pg "$PGBIN/initdb" -D "$dir" -U postgres -A trust -E "${INITDB_ENCODING:-UTF8}" --locale=C --no-sync >/dev/null
      configure "$port"
    fi
    if as_pg "$PGBIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
      echo "cluster in $dir already running"
    else
      as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
      echo "cluster in $dir listening on 127.0.0.1:$port"
    fi
    ;;
  stop)
    # A fast shutdown that does not finish in STOP_TIMEOUT seconds is a
    # failure (exit 1), but the server is stopped all the same (immediate),
    # so that nothing is left holding the port and the directory.
    if [ -f "$dir/postmaster.pid" ]; then
      if ! as_pg "$PGBIN/pg_ctl" -D "$dir" -m fast -w -t "${STOP_TIMEOUT:-60}" stop >/dev/null; then
        if as_pg "$PGBIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
          echo "cluster in $dir: a fast shutdown did not finish in ${STOP_TIMEOUT:-60} s; stopping it immediately" >&2
          as_pg "$PGBIN/pg_ctl" -D "$dir" -m immediate -w stop >/dev/null || true
          exit 1
        fi
      fi
    fi
    ;;
  restart-immediate)
    as_pg "$PGBIN/pg_ctl" -D "$dir" -m immediate -w stop >/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
    ;;
  standby)
    port=${3:?port}
    primary=${4:?primary port}
    slot=${STANDBY_SLOT:-standby_$port}
    if [ -f "$dir/PG_VERSION" ]; then
      echo "cluster.sh: $dir already holds a cluster" >&2
      exit 2
    fi
    mkdir -p "$dir"
    chown "$OS_USER:$OS_USER" "$dir" 2>/dev/null || true
    chmod 700 "$dir"
    as_pg "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$primary" -U postgres -D "$dir" -X stream -C -S "$slot" \
      --checkpoint=fast --no-sync
    as_pg touch "$dir/standby.signal"
    rm -f "$dir/server.log" "$dir/postmaster.pid"
    {
      echo ""
      echo "# --- pg_changerelay standby of 127.0.0.1:$primary ---"
      echo "port = $port"
      echo "changerelay.port = $((port + 1000))"
      echo "hot_standby = on"
      echo "hot_standby_feedback = on"
      echo "primary_slot_name = '$slot'"
      echo "primary_conninfo = 'host=127.0.0.1 port=$primary user=postgres dbname=postgres application_name=$slot'"
      if server_knows sync_replication_slots; then
        echo "sync_replication_slots = ${SYNC_SLOTS:-on}"
      fi
      if [ -n "${EXTRA_CONF:-}" ]; then
        printf '%s\n' "$EXTRA_CONF"
      fi
    } | as_pg tee -a "$dir/postgresql.auto.conf" >/dev/null
    as_pg "$PGBIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
    echo "standby in $dir listening on 127.0.0.1:$port (slot $slot on 127.0.0.1:$primary)"
    ;;
  promote)
    as_pg "$PGBIN/pg_ctl" -D "$dir" -w -t 60 promote >/dev/null
    echo "promoted the standby in $dir"
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac

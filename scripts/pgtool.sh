#!/usr/bin/env bash
# scripts/pgtool.sh NAME ARGS...: runs PostgreSQL's client program NAME
# (pg_recvlogical, pgbench, pg_config, ...) of the major PG selects
# (default 15, the host's), from inside its root for 17 and 18. Files it
# reads or writes must be in the project tree or /tmp (mounted there).
set -euo pipefail
PG=${PG:-15}
name=${1:?usage: pgtool.sh NAME [ARGS...]}
shift
bin=/usr/lib/postgresql/$PG/bin/$name
if [ "$PG" = 15 ] || [ -n "${PGCR_IN_ROOT:-}" ]; then
  exec "$bin" "$@"
fi
exec "$(dirname "$0")/root.sh" run "$PG" "$bin" "$@"

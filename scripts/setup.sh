#!/usr/bin/env bash
# Installs everything pg_changerelay needs to build, test and run, skipping
# what is already there: Debian packages (Chromium for the browser tests and
# the brokers the sink tests use among them), cargo-pgrx 0.18.0, `cargo pgrx
# init` against the system pg_config, a Python virtualenv for the test
# clients, and the JavaScript client's npm packages (TypeScript,
# playwright-core) from its lockfile.
#
# PG=17 or PG=18 (default 15, the host's own PostgreSQL) also builds that
# major's Debian root (scripts/root.sh: debootstrap, packages) once and runs
# `cargo pgrx init --pgNN` inside it, where PGRX_HOME is the root's own.
set -euo pipefail
cd "$(dirname "$0")/.."

PG=${PG:-15}
PG_MAJOR=15  # the host's: its clients (psql), and a server for cross-major checks
PGRX_VERSION=0.18.0
PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-contrib libclang-dev clang sudo
          postgresql-$PG_MAJOR-wal2json python3-venv curl chromium redis-server nats-server)
[ "$PG" = 15 ] || PACKAGES+=(debootstrap)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # The brokers (redis-server, nats-server) are for the tests, which start their own on loopback ports: keep
  # the packages from starting a system service (policy-rc.d, when the machine has none of its own).
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    policy=/usr/sbin/policy-rc.d
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null || { [ -z "$policy" ] || $SUDO rm -f "$policy"; exit 1; }
  [ -z "$policy" ] || $SUDO rm -f "$policy"
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  log "installing cargo-pgrx $PGRX_VERSION (takes several minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
[ -x "$PG_CONFIG" ] || PG_CONFIG=/usr/bin/pg_config
PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if ! grep -qs "^pg$PG_MAJOR = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
  log "cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG"
fi

if [ ! -x .venv/bin/pytest ] || ! .venv/bin/python -c 'import psycopg, websockets, matplotlib, redis, nats' 2>/dev/null; then
  log "creating .venv with the test clients"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
fi
# clients/js: exactly the lockfile's packages. playwright-core drives Debian's
# chromium (/usr/bin/chromium); no browser is ever downloaded.
JS=clients/js
if [ ! -x "$JS/node_modules/.bin/tsc" ] || [ "$JS/package-lock.json" -nt "$JS/node_modules/.package-lock.json" ]; then
  command -v npm >/dev/null || { echo "[setup] error: Node 20 and npm are needed for clients/js" >&2; exit 1; }
  log "installing the npm packages of $JS (npm ci)"
  (cd "$JS" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
if [ "$PG" != 15 ]; then
  scripts/root.sh ensure "$PG"
  # The root's own ~/.pgrx (the host's is not mounted there).
  scripts/root.sh run "$PG" /bin/sh -c '
    grep -qs "^pg$0 = \"/usr/lib/postgresql/$0/bin/pg_config\"" /root/.pgrx/config.toml && exit 0
    echo "[setup] cargo pgrx init --pg$0 (inside the root)"
    cargo pgrx init --pg$0 /usr/lib/postgresql/$0/bin/pg_config' "$PG"
fi
log "ready (PostgreSQL $PG)"

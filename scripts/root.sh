#!/usr/bin/env bash
# PostgreSQL majors that Debian 12 does not package (17, 18) run inside a
# Debian root made with debootstrap, one per major, built once per machine
# and reused:
#
#   17 -> trixie   18 -> forky      under $PGCR_ROOTS (default
#   $HOME/.cache/pg_changerelay/roots/<suite>)
#
#   scripts/root.sh ensure MAJOR        build or complete the root (idempotent)
#   scripts/root.sh path MAJOR          print the root's directory
#   scripts/root.sh run MAJOR CMD...    run CMD inside the root, then unmount
#   scripts/root.sh serve MAJOR CMD...  the same for a CMD that leaves a server
#                                       running (pg_ctl start): see below
#
# Commands run chrooted, as root, in a private mount namespace (unshare), so
# nothing is ever mounted on the host: /proc, /dev, /tmp, ~/.cargo,
# ~/.rustup and the project tree are bind-mounted at their own paths inside
# the root, which is why paths in the project mean the same on both sides.
# `run` unmounts on exit, whatever the exit status (trap). `serve` leaves the
# mounts to the server it started: they live in that namespace only and the
# kernel drops them when the server's last process exits.
#
# The root's own /root/.pgrx (PGRX_HOME) holds `cargo pgrx init` for that
# major only; the host's ~/.pgrx is not mounted and never touched.
#
# The mirror is read from the host's apt sources at run time.
set -euo pipefail

PROJECT=$(cd "$(dirname "$0")/.." && pwd)
ROOTS=${PGCR_ROOTS:-$HOME/.cache/pg_changerelay/roots}
SELF="$PROJECT/scripts/root.sh"

log() { printf '\033[1m[root]\033[0m %s\n' "$*" >&2; }
die() { printf '[root] error: %s\n' "$*" >&2; exit 1; }

suite_of() {
  case "$1" in
    17) echo trixie ;;
    18) echo forky ;;
    *) die "no root for PostgreSQL $1 (15 is the host's own package)" ;;
  esac
}

root_of() { echo "$ROOTS/$(suite_of "$1")"; }

# Packages inside the root. wal2json is packaged for both (the decoding
# tests and the bench compare with it).
packages_of() {
  local m=$1
  echo "postgresql-$m postgresql-server-dev-$m postgresql-$m-wal2json postgresql-contrib" \
       "clang libclang-dev gcc make pkg-config sudo ca-certificates"
}

# The Debian mirror the host's apt uses (deb822 .sources or one-line lists).
mirror() {
  local uri=""
  if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
    uri=$(awk '
      /^[[:space:]]*$/ { if (u != "" && s ~ /(^| )[a-z]+( |$)/ && t ~ /deb( |$)/) { print u; exit } u=""; s=""; t=""; next }
      /^URIs:/   { u=$2 }
      /^Suites:/ { $1=""; s=$0 }
      /^Types:/  { $1=""; t=$0 }
      END { if (u != "" && s ~ /(^| )[a-z]+( |$)/) print u }' /etc/apt/sources.list.d/*.sources | head -n1)
  fi
  if [ -z "$uri" ]; then
    uri=$(grep -hsE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | grep -v security | awk '{ for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { print $i; exit } }' | head -n1)
  fi
  [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources.list{,.d}"
  echo "$uri"
}

# The inside half of run/serve: in the private mount namespace already.
inner() {
  local mode=$1 root=$2
  shift 2
  MOUNTED=()
  unmount() {
    local i
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
      umount -R "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" 2>/dev/null || true
    done
  }
  [ "$mode" = run ] && trap unmount EXIT
  bind() {  # bind SRC [DEST inside root]
    local src=$1 dst=$root${2:-$1}
    [ -e "$src" ] || return 0
    if [ -d "$src" ]; then mkdir -p "$dst"; else mkdir -p "$(dirname "$dst")"; [ -e "$dst" ] || : >"$dst"; fi
    mount --rbind "$src" "$dst"
    MOUNTED+=("$dst")
  }
  bind /proc
  bind /dev
  bind /tmp
  bind /etc/resolv.conf
  bind /etc/hosts
  # The host's trust store: cargo inside fetches crates through whatever the host trusts (a proxy's own CA).
  bind /etc/ssl/certs
  bind "$HOME/.cargo" /root/.cargo
  bind "$HOME/.rustup" /root/.rustup
  bind "$PROJECT"
  local rc=0
  env -i HOME=/root USER=root LOGNAME=root TERM="${TERM:-dumb}" LANG=C.UTF-8 \
      PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      ${CI:+CI=$CI} ${PG:+PG=$PG} ${CARGO_TARGET_DIR:+CARGO_TARGET_DIR=$CARGO_TARGET_DIR} \
      ${EXTRA_CONF:+"EXTRA_CONF=$EXTRA_CONF"} ${INITDB_ENCODING:+INITDB_ENCODING=$INITDB_ENCODING} ${RUST_BACKTRACE:+RUST_BACKTRACE=$RUST_BACKTRACE} \
      ${SYNC_SLOTS:+SYNC_SLOTS=$SYNC_SLOTS} ${STANDBY_SLOT:+STANDBY_SLOT=$STANDBY_SLOT} \
      ${RUSTUP_AUTO_INSTALL:+RUSTUP_AUTO_INSTALL=$RUSTUP_AUTO_INSTALL} \
      ${CARGO_TERM_COLOR:+CARGO_TERM_COLOR=$CARGO_TERM_COLOR} \
      PGCR_IN_ROOT=1 DEBIAN_FRONTEND=noninteractive \
      chroot "$root" /bin/sh -c 'cd "$0" 2>/dev/null || cd /; exec "$@"' "$PWD" "$@" || rc=$?
  return $rc
}

enter() {  # enter run|serve MAJOR CMD...
  local mode=$1 major=$2
  shift 2
  local root
  root=$(root_of "$major")
  [ -f "$root/.pg_changerelay-ready" ] || die "the PostgreSQL $major root is not built: scripts/setup.sh with PG=$major (make setup PG=$major)"
  [ $# -gt 0 ] || die "no command"
  [ "$(id -u)" -eq 0 ] || die "must run as root (chroot, mount namespaces)"
  exec unshare --mount --propagation private -- "$SELF" __inner "$mode" "$root" "$@"
}

ensure() {
  local major=$1 suite root uri pkgs
  suite=$(suite_of "$major")
  root=$(root_of "$major")
  pkgs=$(packages_of "$major")
  if [ -f "$root/.pg_changerelay-ready" ] && [ "$(cat "$root/.pg_changerelay-ready")" = "$pkgs" ]; then
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "building a root needs root"
  # One builder at a time per root (two sessions may set up at once).
  mkdir -p "$ROOTS"
  exec 9>"$ROOTS/$suite.lock"
  flock 9
  if [ -f "$root/.pg_changerelay-ready" ] && [ "$(cat "$root/.pg_changerelay-ready")" = "$pkgs" ]; then
    return 0
  fi
  local t0=$SECONDS
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  fi
  uri=$(mirror)
  if [ ! -x "$root/usr/bin/apt-get" ] || [ ! -f "$root/.pg_changerelay-bootstrapped" ]; then
    log "debootstrap $suite into $root (a few minutes, about 1.6 GB)"
    rm -rf "$root"
    mkdir -p "$root"
    # bookworm's debootstrap has no script named after every later suite;
    # they are all the sid script.
    debootstrap --variant=minbase --include=ca-certificates "$suite" "$root" "$uri" \
      /usr/share/debootstrap/scripts/sid >"$ROOTS/$suite.debootstrap.log" 2>&1 \
      || { tail -n 20 "$ROOTS/$suite.debootstrap.log" >&2; die "debootstrap failed (log: $ROOTS/$suite.debootstrap.log)"; }
    : >"$root/.pg_changerelay-bootstrapped"
    log "debootstrap done in $((SECONDS - t0)) s"
  fi
  # Servers in the root must not be started by package scripts; testing
  # suites' Release files carry a short Valid-Until, which a mirror
  # snapshot outlives.
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99pg_changerelay"
  # The root's postgres user gets the host's ids when they are free there,
  # so data directories show the same owner on both sides.
  local uid="" gid=""
  if id -u postgres >/dev/null 2>&1; then uid=$(id -u postgres); gid=$(id -g postgres); fi
  local t1=$SECONDS
  log "installing in the root: $pkgs"
  # shellcheck disable=SC2086
  (unshare --mount --propagation private -- "$SELF" __inner run "$root" /bin/sh -ec '
      uid=$1 gid=$2; shift 2
      if ! getent passwd postgres >/dev/null && [ -n "$uid" ]; then
        getent group "$gid" >/dev/null || groupadd --system -g "$gid" postgres
        getent group postgres >/dev/null || groupadd --system postgres
        getent passwd "$uid" >/dev/null && uid=""
        useradd --system ${uid:+-u "$uid"} -g postgres --home-dir /var/lib/postgresql --shell /bin/bash \
          -c "PostgreSQL administrator" postgres
      fi
      mkdir -p /etc/postgresql-common/createcluster.d
      echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/pg_changerelay.conf
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "$@" >/dev/null
      id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
      apt-get clean' sh "$uid" "$gid" $pkgs) \
    || die "installing packages in the root failed"
  log "packages done in $((SECONDS - t1)) s"
  echo "$pkgs" >"$root/.pg_changerelay-ready"
  log "root for PostgreSQL $major ready in $root ($((SECONDS - t0)) s)"
}

cmd=${1:-}
case "$cmd" in
  ensure) ensure "${2:?major}" ;;
  path) root_of "${2:?major}" ;;
  mirror) mirror ;;
  run | serve) shift; enter "$cmd" "$@" ;;
  __inner) shift; inner "$@" ;;
  *) echo "usage: root.sh ensure|path|run|serve MAJOR [CMD...]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Builds pg_changerelay and installs it into a PostgreSQL installation without
# ever rewriting a file in place, so that a running server is never hurt.
#
#   scripts/install.sh [--debug|--release] PG_CONFIG [cargo-pgrx package flags...]
#
# `cargo pgrx install` copies the library over the installed one, truncating
# and rewriting the same file: every running process that has it mapped
# (the postmaster, the relay worker, every backend) then reads new bytes
# under old code and dies with SIGSEGV or SIGBUS. Here the files are built
# into a package directory first, each is copied next to its destination
# under a temporary name and renamed into place: processes that have the old
# library mapped keep the old file (now unlinked) and new loads see the new
# one. Postgres finds an already loaded library by its path first, so
# backends of a server that preloads it keep using the copy they have.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
case "${1:-}" in
  --debug) profile=debug; shift ;;
  --release) shift ;;
esac
pg_config=${1:?usage: install.sh [--debug|--release] PG_CONFIG [flags...]}
shift

major=$("$pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
out="$PWD/target/package-$profile-pg$major"
rm -rf "$out"
flags=(--pg-config "$pg_config" --out-dir "$out")
[ "$profile" = debug ] && flags+=(--debug)
cargo pgrx package "${flags[@]}" "$@"

# Every file of the package, installed under / by rename.
installed=0
while IFS= read -r -d '' file; do
  dest="/${file#"$out"/}"
  mkdir -p "$(dirname "$dest")"
  tmp="$(dirname "$dest")/.$(basename "$dest").new.$$"
  cp "$file" "$tmp"
  chmod 644 "$tmp"
  [ "${dest##*.}" = so ] && chmod 755 "$tmp"
  mv -f "$tmp" "$dest"
  installed=$((installed + 1))
done < <(find "$out" -type f -print0)
echo "installed $installed files of pg_changerelay ($profile) for PostgreSQL $major"

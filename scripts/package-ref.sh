#!/usr/bin/env bash
# Builds pg_changerelay as of a git commit into a package directory, once
# (for the extension upgrade test: the released version's SQL and library).
#
#   [PG=15|17|18] scripts/package-ref.sh COMMIT OUT_DIR PG_CONFIG
#
# The sources are taken with `git archive` (no worktree to clean up); the
# build has a target directory of its own, so the current tree's build is
# not disturbed. A finished package is marked and reused.
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:?commit}; out=${2:?output directory}; pg_config=${3:?pg_config}
[ -f "$out/.complete" ] && exit 0
src="$PWD/target/sources-$ref"
rm -rf "$src" "$out"
mkdir -p "$src"
git archive "$ref" | tar -x -C "$src"
# PG (default 15) is the major PG_CONFIG belongs to: 17 and 18 build inside
# their roots (scripts/root.sh; the sources are in the project tree, which
# the root sees), each major in a target directory of its own.
major=${PG:-15}
in_root=()
[ "$major" = 15 ] || in_root=("$PWD/scripts/root.sh" run "$major")
(cd "$src" && "${in_root[@]}" env CARGO_TARGET_DIR="$PWD/../build-released-pg$major" cargo pgrx package --debug \
    --pg-config "$pg_config" --out-dir "$out" --no-default-features --features "pg$major")
touch "$out/.complete"
echo "packaged $ref into $out"

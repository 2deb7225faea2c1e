#!/usr/bin/env bash
# Builds pg_changerelay as of a git commit into a package directory, once
# (for the extension upgrade test: the released version's SQL and library).
#
#   scripts/package-ref.sh COMMIT OUT_DIR PG_CONFIG
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
(cd "$src" && CARGO_TARGET_DIR="$PWD/../build-released" cargo pgrx package --debug \
    --pg-config "$pg_config" --out-dir "$out")
touch "$out/.complete"
echo "packaged $ref into $out"

#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each (default 60) with cargo-fuzz (libFuzzer and
# AddressSanitizer) and fails if any target finds a crash; the crashing input is left in
# fuzz/artifacts/<target>/. Installs cargo-fuzz when it is missing. Only stable Rust is installed, so the
# nightly flags cargo-fuzz passes are enabled with RUSTC_BOOTSTRAP=1 (for these builds only).
#
#   scripts/fuzz.sh          # 60 s per target
#   scripts/fuzz.sh 300      # 5 min per target
#   TARGETS="cursor filter" scripts/fuzz.sh 10
set -euo pipefail

SECONDS_EACH="${1:-60}"
TARGETS="${TARGETS:-binary_frame cursor filter http_request stored_form}"
CARGO_FUZZ_VERSION="0.13.2"   # builds with Rust 1.95

cd "$(dirname "$0")/.."
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
export RUSTC_BOOTSTRAP=1

summary=()
failed=0
for t in $TARGETS; do
    mkdir -p "fuzz/corpus/$t"
    if [ -d "fuzz/seeds/$t" ]; then
        cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true
    fi
    log="fuzz/target/fuzz-$t.log"
    mkdir -p fuzz/target
    echo "fuzz.sh: $t for ${SECONDS_EACH}s"
    if cargo fuzz run "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        result="ok"
    else
        result="CRASH (see $log and fuzz/artifacts/$t/)"
        failed=1
    fi
    runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1 || true)
    summary+=("$t: $result; ${runs:-no run count (build failed?)}")
    tail -n 3 "$log"
done
printf '%s\n' "${summary[@]}"
exit "$failed"

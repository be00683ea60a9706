#!/usr/bin/env bash
# Every test blkrep has, in the order CI runs them: formatting and lints, unit,
# property and whole-system tests with real NBD clients, the fuzz targets for a short
# time each, the main job (scripts/demo.sh), and the benchmarks in short mode.
#
# Usage: scripts/test-all.sh [--quick]   (--quick: skip fuzzing and benchmarks)
# Environment: FUZZ_SECONDS (default 20) per fuzz target.
set -uo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
fuzz_seconds=${FUZZ_SECONDS:-20}

passed=0
failed=0
failures=()
step() {
    local name=$1
    shift
    local started=$SECONDS
    echo
    echo "===== $name"
    if "$@"; then
        passed=$((passed + 1))
        echo "----- $name: ok ($((SECONDS - started)) s)"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "----- $name: FAILED ($((SECONDS - started)) s)"
    fi
}

fuzz_all() {
    local status=0 target
    for target in $(cargo fuzz list --fuzz-dir fuzz); do
        echo "fuzzing $target for ${fuzz_seconds}s"
        cargo fuzz run --fuzz-dir fuzz "$target" -- -max_total_time="$fuzz_seconds" -rss_limit_mb=2048 \
            >"target/fuzz-$target.log" 2>&1 || { status=1; tail -40 "target/fuzz-$target.log"; }
        grep -E "^Done|DEDUP|ERROR" "target/fuzz-$target.log" | tail -2
    done
    return $status
}

with_fuzz=()
(( quick )) || with_fuzz=(--with-fuzz)
step "install test dependencies" scripts/install-test-deps.sh "${with_fuzz[@]}"
step "cargo fmt" cargo fmt --all -- --check
step "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
# Every test binary runs even after one fails, so a run reports every failure.
step "cargo test" cargo test --workspace --all-targets --locked --no-fail-fast
# The Debian package: its release build is the one demo.sh and the benchmarks use.
step "Debian package (scripts/test-package.sh)" scripts/test-package.sh
if (( ! quick )); then
    if cargo fuzz --version >/dev/null 2>&1; then
        # cargo-fuzz needs -Z flags; a stable toolchain accepts them with RUSTC_BOOTSTRAP.
        if rustc --version | grep -q nightly || rustup run nightly rustc --version >/dev/null 2>&1; then
            step "fuzz (${fuzz_seconds}s per target)" env RUSTUP_TOOLCHAIN=nightly bash -c "$(declare -f fuzz_all); fuzz_seconds=$fuzz_seconds; fuzz_all"
        else
            step "fuzz (${fuzz_seconds}s per target)" env RUSTC_BOOTSTRAP=1 bash -c "$(declare -f fuzz_all); fuzz_seconds=$fuzz_seconds; fuzz_all"
        fi
    else
        failed=$((failed + 1))
        failures+=("fuzz: cargo-fuzz could not be installed")
    fi
    step "main job (scripts/demo.sh)" scripts/demo.sh
    step "benchmarks, short mode" scripts/bench-fio.sh --short
    step "replication benchmarks, short mode" scripts/bench-replication.sh --short
    step "soak, 2 minutes" scripts/soak.sh --minutes 2
fi

echo
if (( failed > 0 )); then
    printf 'failed step: %s\n' "${failures[@]}"
fi
echo "$passed passed, $failed failed"
(( failed == 0 ))

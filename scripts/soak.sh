#!/usr/bin/env bash
# The soak run: the whole system (a primary daemon with four groups of two disks, a
# replica daemon behind the fault proxy, a second one for failback) under writers,
# SIGKILLs of either daemon, link faults, test failovers and a planned failover and
# failback, for N minutes; then every replica, recovery point and acknowledged write
# is checked. The driver is tests/system/soak.rs: the ignored test soak::soak of the
# whole-system test binary `system`, using the harness crate testkit/.
#
# The test binary is a debug build: `cargo test --workspace --all-targets` (CI's
# "cargo test" step) has built it already, so the 2-minute CI run starts at once
# (--workspace here too: the same features of every dependency, so the same binary),
# whereas `cargo test --release --no-run --test ...` from cold (thin LTO, every
# dependency) took 13.5 minutes on the shared 2-core machine, three times what the
# whole soak step may take. Dependencies are optimised in debug builds too
# (profile.dev.package."*" opt-level 2), so TLS, DEFLATE, CRC and hashing run at
# full speed; BLKREP_SOAK_PROFILE=release opts in to a release build for long runs.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/soak.sh --minutes N [--seed S] [--report FILE]

Runs blkrep for N minutes under faults and checks it: every replica equals its
primary byte for byte, every recovery point holds a prefix of the ordered writes,
no acknowledged write is lost. Exits non-zero, naming the violated check and the
directory holding both daemons' logs, if any check fails.

  --minutes N     how long writers and faults run (decimals allowed, e.g. 0.5)
  --seed S        seed of every random choice (default: from the clock; printed)
  --report FILE   also write the markdown report to FILE
  -h, --help      this text

Environment: BLKREP_SOAK_PROFILE=release builds the test binary optimised.
EOF
}

minutes=""
seed=""
report=""
while (($#)); do
    case $1 in
    --minutes | --seed | --report)
        if (($# < 2)); then
            echo "soak.sh: $1 needs a value" >&2
            exit 2
        fi
        case $1 in
        --minutes) minutes=$2 ;;
        --seed) seed=$2 ;;
        --report) report=$2 ;;
        esac
        shift 2
        ;;
    -h | --help) usage; exit 0 ;;
    *) echo "soak.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
if ! [[ $minutes =~ ^[0-9]+(\.[0-9]+)?$ ]] || [[ $minutes =~ ^0+(\.0+)?$ ]]; then
    echo "soak.sh: --minutes needs a positive number" >&2
    usage >&2
    exit 2
fi
if [[ -n $seed && ! $seed =~ ^[0-9]+$ ]]; then
    echo "soak.sh: --seed needs a non-negative integer" >&2
    exit 2
fi

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
if [[ -n $report && $report != /* ]]; then
    report="$OLDPWD/$report"
fi
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ $commit != unknown && -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    commit="$commit (with uncommitted changes)"
fi
logs="$here/target/soak-logs/$(date -u +%Y%m%dT%H%M%SZ)-$$"

profile_args=()
[[ ${BLKREP_SOAK_PROFILE:-debug} == release ]] && profile_args=(--release)

# A filter naming no test would pass without running anything: check it names the soak.
listed=$(cargo test "${profile_args[@]}" --locked --workspace --test system -- soak::soak --exact --ignored --list)
if ! grep -qx 'soak::soak: test' <<<"$listed"; then
    echo "soak.sh: the system test binary has no ignored test soak::soak" >&2
    exit 1
fi

status=0
BLKREP_SOAK_MINUTES=$minutes BLKREP_SOAK_SEED=$seed BLKREP_SOAK_REPORT=$report \
    BLKREP_SOAK_LOGS=$logs BLKREP_SOAK_COMMIT=$commit \
    cargo test "${profile_args[@]}" --locked --workspace --test system -- soak::soak --exact --ignored --nocapture --test-threads 1 ||
    status=$?
if ((status != 0)); then
    echo "soak.sh: FAILED (exit $status); both daemons' logs are in $logs" >&2
    exit 1
fi
rm -rf "$logs"
echo "soak.sh: passed${report:+; report in $report}"

#!/usr/bin/env bash
# Replication benchmarks: a primary and a replica server on loopback, HTTPS with
# mutual TLS (certificates from `blkrep cert`), as in scripts/demo.sh.
#
# Usage: scripts/bench-replication.sh [options]
#
#   --runs N             repetitions; the report shows medians (default 3)
#   --size SIZE          unique data written and shipped per measured cycle, also the
#                        write-path image size: 1GiB, 512MiB, 128M... (default 1GiB)
#   --kinds LIST         data kinds from: random,compressible (compression on, the
#                        default codec: zstd),compressible-deflate (compressible with
#                        compression_codec = "deflate"),random-raw (random with
#                        compression off),compressible-auto (compressible with
#                        compression = "auto"),scattered (random in 4 KiB writes
#                        scattered over a disk 4x SIZE),random-point (random with a
#                        recovery point kept on the replica before the cycle, so its
#                        apply captures undo data) (default: all seven)
#   --compress-pct P     fio buffer_compress_percentage of compressible data (default 50)
#   --blkrep LABEL=PATH  a blkrep binary, with a label; repeat it to measure several
#                        binaries interleaved in one run (--blkrep before=/tmp/blkrep-old
#                        --blkrep after=target/release/blkrep): every measurement is made
#                        with each, and the report adds LABEL/first-label ratios
#   --runtime S          measured seconds per write-path fio job (default 20)
#   --ramp S             write-path fio ramp, not measured (default 3)
#   --interval I         write-path replication interval (default 1s)
#   --ring-size SIZE     write-path ring size (default 4GiB)
#   --write-path-jobs L  bench-fio.sh jobs of part 4 (default: randwrite4k, randwrite64k,
#                        steady4k, steady64k, each with fio buffers and with -refill)
#   --rate-4k MB         fio --rate of steady4k, MB/s (default 40)
#   --rate-64k MB        fio --rate of steady64k, MB/s (default 150)
#   --rpo-rate MB        churn of the achieved-RPO scenario, MB/s (default 50)
#   --rpo-runtime S      its length in seconds (default 60)
#   --skip-shipping      no shipping, compression and apply (parts 1-3)
#   --skip-write-path    no write path under replication (part 4)
#   --skip-rpo           no achieved-RPO scenario (part 5)
#   --out FILE           also write the Markdown report to FILE
#   --json FILE          also write every number as JSON to FILE
#   --short              CI smoke mode: 1 run, 128 MiB, random, compressible and
#                        scattered, write path randwrite4k and steady4k-refill 5 s after
#                        1 s ramp with a 1 GiB ring, RPO scenario 10 s; fails only on
#                        errors, never on the numbers (about 1-2 minutes with blkrep built)
#   --keep               keep the work directory
#   -h, --help           this text
#
# What it measures, in one run:
#  1. Shipping throughput of one cycle of SIZE unique blocks: a fresh replica daemon
#     and primary (interval 1h, so only the benchmark closes cycles) on an image written
#     in full and replicated before (so the cycle overwrites allocated blocks); fio
#     writes SIZE through NBD, `sync`, then `blkrep cycles close` is timed: it returns
#     when the replica holds the cycle durably and the ring space is freed.
#  2. Compression ratio: compressed bytes sent (`network_bytes` of `blkrep status`)
#     over change bytes, per data kind; and the primary's write() bytes (TLS) too.
#  3. Replica apply rate: from the close's return to the replica's `Transfer applied`
#     log line for that cycle (the replica daemon logs JSON).
#     The replica's disk is then compared with the image byte for byte. With the
#     scattered kind, the rate of scattered 4 KiB changes over that of a sequential
#     cycle; and CPU seconds per GiB of both daemons.
#  4. The write path while replication to a live replica runs every --interval:
#     scripts/bench-fio.sh --servers qemu,replicated --jobs (--write-path-jobs),
#     qemu-nbd and blkrep interleaved on the same image in the same run, with the
#     protected writes per second and the lag the replica keeps.
#  5. Achieved RPO: scripts/bench-fio.sh --servers replicated, 1 s interval, 4 KiB
#     random writes of incompressible data at --rpo-rate for --rpo-runtime s; the lag
#     sampled 10 times a second, p50/p99/max.
#
# Environment: BLKREP=path/to/blkrep (default: `cargo build --release --bin blkrep`,
# then target/release/blkrep); TMPDIR_BENCH=dir for the work dir (default /var/tmp).
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/.." && pwd)
command_line="scripts/bench-replication.sh${*:+ $*}"

runs=3
size=1GiB
kinds_csv=random,compressible,compressible-deflate,random-raw,compressible-auto,scattered,random-point
compress_pct=50
runtime=20
ramp=3
interval=1s
ring_size=4GiB
wp_jobs=randwrite4k,randwrite4k-refill,randwrite64k,randwrite64k-refill
wp_jobs+=,steady4k,steady4k-refill,steady64k,steady64k-refill
rate_4k=40
rate_64k=150
rpo_rate=50
rpo_runtime=60
bin_labels=()
bin_paths=()
skip_write_path=0
skip_shipping=0
skip_rpo=0
out=
json_out=
short=0
keep=0
runs_set=0 size_set=0 kinds_set=0 runtime_set=0 ramp_set=0 ring_set=0 wp_jobs_set=0 rpo_set=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
log() { echo "bench-replication: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_arg() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) need_arg "$@"; runs=$2; runs_set=1; shift 2 ;;
        --size) need_arg "$@"; size=$2; size_set=1; shift 2 ;;
        --kinds) need_arg "$@"; kinds_csv=$2; kinds_set=1; shift 2 ;;
        --compress-pct) need_arg "$@"; compress_pct=$2; shift 2 ;;
        --runtime) need_arg "$@"; runtime=$2; runtime_set=1; shift 2 ;;
        --ramp) need_arg "$@"; ramp=$2; ramp_set=1; shift 2 ;;
        --interval) need_arg "$@"; interval=$2; shift 2 ;;
        --ring-size) need_arg "$@"; ring_size=$2; ring_set=1; shift 2 ;;
        --blkrep)
            need_arg "$@"
            [[ "$2" == ?*=?* ]] || die "--blkrep needs LABEL=PATH"
            bin_labels+=("${2%%=*}"); bin_paths+=("${2#*=}"); shift 2 ;;
        --write-path-jobs) need_arg "$@"; wp_jobs=$2; wp_jobs_set=1; shift 2 ;;
        --rate-4k) need_arg "$@"; rate_4k=$2; shift 2 ;;
        --rate-64k) need_arg "$@"; rate_64k=$2; shift 2 ;;
        --rpo-rate) need_arg "$@"; rpo_rate=$2; shift 2 ;;
        --rpo-runtime) need_arg "$@"; rpo_runtime=$2; rpo_set=1; shift 2 ;;
        --skip-write-path) skip_write_path=1; shift ;;
        --skip-shipping) skip_shipping=1; shift ;;
        --skip-rpo) skip_rpo=1; shift ;;
        --out) need_arg "$@"; out=$2; shift 2 ;;
        --json) need_arg "$@"; json_out=$2; shift 2 ;;
        --short) short=1; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option: $1 (try --help)" ;;
    esac
done

if (( short )); then
    (( runs_set )) || runs=1
    (( size_set )) || size=128MiB
    (( kinds_set )) || kinds_csv=random,compressible,scattered
    (( runtime_set )) || runtime=5
    (( ramp_set )) || ramp=1
    (( ring_set )) || ring_size=1GiB
    (( wp_jobs_set )) || wp_jobs=randwrite4k,steady4k-refill
    (( rpo_set )) || rpo_runtime=10
fi
[[ "$rpo_rate" =~ ^[1-9][0-9]*$ ]] || die "--rpo-rate must be a positive integer (MB/s)"
[[ "$rpo_runtime" =~ ^[1-9][0-9]*$ ]] || die "--rpo-runtime must be a positive integer (seconds)"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
[[ "$runtime" =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer (seconds)"
[[ "$ramp" =~ ^[0-9]+$ ]] || die "--ramp must be a non-negative integer (seconds)"
if ! [[ "$compress_pct" =~ ^[0-9]+$ ]] || (( compress_pct > 100 )); then
    die "--compress-pct must be 0-100"
fi
(( skip_write_path && skip_shipping && skip_rpo )) && die "--skip-write-path, --skip-shipping and --skip-rpo leave nothing to do"
IFS=, read -r -a kinds <<<"$kinds_csv"
for k in "${kinds[@]}"; do
    case "$k" in random|compressible|compressible-deflate|random-raw|compressible-auto|scattered|random-point) ;; *) die "unknown data kind: $k" ;; esac
done
for l in "${bin_labels[@]}"; do
    [[ "$l" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--blkrep label '$l': letters, digits, . _ - only"
done
[[ $(printf '%s\n' "${bin_labels[@]}" | sort | uniq -d) == "" ]] || die "--blkrep labels must differ"
# SIZE in bytes (binary units; K, M, G with or without "iB").
size_bytes=$(python3 - "$size" <<'EOF'
import re, sys
m = re.fullmatch(r"(\d+)\s*([KMGT]?)(i?B)?", sys.argv[1].strip(), re.I)
if not m:
    sys.exit(1)
print(int(m[1]) * 1024 ** " KMGT".index((m[2] or " ").upper()))
EOF
) || die "--size: not a size: $size"
(( size_bytes >= 4 << 20 && size_bytes % (1 << 20) == 0 )) || die "--size must be a whole number of MiB, at least 4 MiB"
size_mib=$((size_bytes >> 20))

"$script_dir/install-test-deps.sh" >/dev/null
for tool in fio nbdinfo python3 cmp truncate; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found; run scripts/install-test-deps.sh"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine"
py=/usr/bin/python3
[[ -x "$py" ]] || py=$(command -v python3)
helper="$script_dir/bench_replication_report.py"

# ---- work dir and cleanup -------------------------------------------------
work=$(mktemp -d "${TMPDIR_BENCH:-/var/tmp}/blkrep-benchrep.XXXXXX")
primary_pid=
replica_pid=
child_pid=
terminate() {  # pid: SIGTERM, KILL after 5 s, reap
    local pid=$1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    # A child (fio, the helper, bench-fio.sh) first: bench-fio.sh stops its own servers.
    terminate "$child_pid"
    # The replica before the primary: a primary in the middle of a delivery stops at once.
    terminate "$replica_pid"
    terminate "$primary_pid"
    if (( keep )); then log "work dir kept: $work"; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command in the background and waits for it, so that a signal runs the
# cleanup at once (bash runs traps only after a foreground child exits).
run_child() {
    local rc=0
    "$@" &
    child_pid=$!
    wait "$child_pid" || rc=$?
    child_pid=
    return "$rc"
}

mkdir -p "$work/results"
if (( ${#bin_labels[@]} == 0 )); then
    if [[ -n "${BLKREP:-}" ]]; then
        blkrep=$BLKREP
    else
        log "building blkrep (cargo build --release --bin blkrep)"
        run_child cargo build --release --bin blkrep --manifest-path "$repo/Cargo.toml" \
            >"$work/cargo-build.log" 2>&1 || { tail -n 30 "$work/cargo-build.log" >&2; die "cargo build failed"; }
        blkrep="${CARGO_TARGET_DIR:-$repo/target}/release/blkrep"
    fi
    bin_labels=("")
    bin_paths=("$blkrep")
fi
# Every binary as an absolute path; "" labels the only, unlabelled one.
fio_bin_args=()
for i in "${!bin_paths[@]}"; do
    [[ "${bin_paths[i]}" == /* ]] || bin_paths[i]="$PWD/${bin_paths[i]}"
    [[ -x "${bin_paths[i]}" ]] || die "${bin_paths[i]} is not an executable"
    [[ -n "${bin_labels[i]}" ]] && fio_bin_args+=(--blkrep "${bin_labels[i]}=${bin_paths[i]}")
done
blkrep=${bin_paths[0]}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
started=$SECONDS
log "work dir $work ($(findmnt -n -o FSTYPE --target "$work" 2>/dev/null || echo '?')); $runs run(s), $size_mib MiB"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

last_line() {
    local l
    l=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-300 || true)
    echo "${l:-(no output)}"
}

# SIGTERM process $2 (named $1) and wait up to 30 s; an error if it had to be killed.
stop_daemon() {
    local name=$1 pid=$2 rc=0 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        die "$name did not exit 30 s after SIGTERM"
    fi
    wait "$pid" || rc=$?
    (( rc == 0 )) || die "$name exited with status $rc after SIGTERM"
}

# ---- parts 1-3: one measured cycle per run and data kind --------------------
measure_cycle() {  # kind run label binary
    local kind=$1 run=$2 label=$3 blkrep=$4
    local d="$work/$kind-run$run${label:+-$label}"
    local results="$work/results/${label:-default}"
    mkdir -p "$d" "$results"
    # The scattered kind writes SIZE in 4 KiB blocks at random over a disk 4x as
    # large, every block at most once (fio's random map): few neighbours coalesce.
    local disk_bytes=$size_bytes
    [[ "$kind" == scattered ]] && disk_bytes=$((4 * size_bytes))
    local initial_timeout=$((120 + disk_bytes / (10 << 20)))
    local port
    port=$(free_port)
    cat >"$d/replica.toml" <<TOML
listen = "127.0.0.1:$port"
control_socket = "$d/replica.ctl"
reserve = "64MiB"
[tls]
cert = "$work/pki/localhost.pem"
key = "$work/pki/localhost.key"
ca = "$work/pki/ca.pem"
[nbd]
unix_socket = "$d/replica-nbd.sock"
[[authorization]]
primary = "*.bench.lab"
storage = "$d/replicas"
trust_group = "bench"
TOML
    local compression=true
    [[ "$kind" == random-raw ]] && compression=false
    [[ "$kind" == compressible-auto ]] && compression='"auto"'
    # The consumer's default codec (zstd) unless the kind names one.
    local codec=""
    [[ "$kind" == compressible-deflate ]] && codec='compression_codec = "deflate"'
    # random-point: the replica keeps one point besides the latest, at least 1 s
    # apart, so the measured cycle overwrites blocks first changed since a point.
    local points=""
    [[ "$kind" == random-point ]] && points=$'recovery_points = 1\nrecovery_point_spacing = "1s"'
    # Room for the whole cycle plus record headers.
    cat >"$d/primary.toml" <<TOML
control_socket = "$d/primary.ctl"
[nbd]
unix_socket = "$d/nbd.sock"
[[group]]
name = "bench"
ring = "$d/bench.ring"
ring_size = "$((size_mib + size_mib / 4 + 64))MiB"
interval = "1h"
[group.consumer]
type = "replica"
url = "https://localhost:$port"
ca = "$work/pki/ca.pem"
cert = "$work/pki/primary.bench.lab.pem"
key = "$work/pki/primary.bench.lab.key"
compression = $compression
$codec
$points
[[group.disk]]
name = "disk0"
image = "$d/disk0.img"
TOML
    truncate -s "$disk_bytes" "$d/disk0.img"
    # Written in full first (then copied in full by the initial replication), so that
    # every kind's cycle overwrites allocated blocks on both sides, as in a VM's disk.
    # (Scattered writes into a sparse file also leave thousands of extents, and on a
    # filesystem mounted with `discard` deleting those takes minutes.)
    run_child fio --name=prefill --filename="$d/disk0.img" --rw=write --bs=1M \
        --ioengine=psync --size="$disk_bytes" --end_fsync=1 --output="$d/prefill.txt" \
        >/dev/null || { cat "$d/prefill.txt" >&2; die "writing the disk in full failed"; }

    NO_COLOR=1 "$blkrep" --log-format json replica run --config "$d/replica.toml" 2>"$d/replica.log" &
    replica_pid=$!
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$replica_pid" 2>/dev/null || die "the replica daemon exited: $(last_line "$d/replica.log")"
        "$blkrep" replica status --config "$d/replica.toml" >/dev/null 2>&1 && break
        sleep 0.1
    done
    (( i < 300 )) || die "the replica daemon was not ready after 30 s"
    NO_COLOR=1 "$blkrep" --log-format json primary --config "$d/primary.toml" 2>"$d/primary.log" &
    primary_pid=$!
    local uri="nbd+unix:///disk0?socket=$d/nbd.sock"
    for ((i = 0; i < 300; i++)); do
        kill -0 "$primary_pid" 2>/dev/null || die "the primary exited: $(last_line "$d/primary.log")"
        [[ -S "$d/nbd.sock" ]] && nbdinfo "$uri" >/dev/null 2>&1 && break
        sleep 0.1
    done
    (( i < 300 )) || die "the primary was not ready after 30 s"
    # The initial replication (of a sparse image it sends almost nothing) and the first
    # delta, until the replica has applied them: afterwards the group is replicating, the
    # replica consistent and idle.
    "$py" "$script_dir/bench_probe.py" drain --blkrep "$blkrep" --primary-config "$d/primary.toml" \
        --replica-config "$d/replica.toml" --group bench --timeout "$initial_timeout" \
        --out "$d/initial.json" || die "initial replication failed: $(last_line "$d/primary.log")"

    local fio_data=(--refill_buffers)
    [[ "$kind" == compressible* ]] &&
        fio_data+=(--buffer_compress_percentage="$compress_pct" --buffer_compress_chunk=4k)
    local fio_pattern=(--rw=write --bs=1M --iodepth=8 --size="$size_bytes")
    [[ "$kind" == scattered ]] &&
        fio_pattern=(--rw=randwrite --bs=4k --iodepth=32 --size="$disk_bytes" --io_size="$size_bytes")
    run_child fio --name="fill-$kind" --ioengine=nbd --uri="$uri" "${fio_pattern[@]}" \
        "${fio_data[@]}" --output-format=json --output="$d/fio.json" \
        >"$d/fio.txt" 2>&1 || { tail -n 20 "$d/fio.txt" "$d/fio.json" >&2; die "fio failed ($kind)"; }
    sync
    run_child "$py" "$helper" cycle --blkrep "$blkrep" --primary-config "$d/primary.toml" \
        --replica-config "$d/replica.toml" --replica-log "$d/replica.log" \
        --replica-pid "$replica_pid" --group bench --kind "$kind" --run "$run" --label "$label" \
        --size "$size_bytes" --fio-json "$d/fio.json" --out "$results/$kind-run$run.json" \
        || { tail -n 5 "$d/primary.log" "$d/replica.log" >&2; die "measuring the $kind cycle failed"; }
    local replica_disk="$d/replicas/bench/disks/disk0.img"
    cmp "$d/disk0.img" "$replica_disk" >/dev/null ||
        die "the replica's disk differs from the image after the $kind cycle ($replica_disk)"

    stop_daemon "the primary" "$primary_pid"; primary_pid=
    stop_daemon "the replica daemon" "$replica_pid"; replica_pid=
    if (( keep )); then
        rm -f "$d/disk0.img" "$d/bench.ring" "$replica_disk"   # the big files
    else
        rm -rf "$d"
    fi
}

if (( ! skip_shipping )); then
    { "$blkrep" cert ca --dir "$work/pki" &&
      "$blkrep" cert issue --dir "$work/pki" --name localhost &&
      "$blkrep" cert issue --dir "$work/pki" --name primary.bench.lab; } >"$work/cert.log" 2>&1 ||
        { cat "$work/cert.log" >&2; die "blkrep cert failed"; }
    for ((r = 1; r <= runs; r++)); do
        # Rotate the order of the kinds from run to run, to spread machine noise;
        # the binaries take turns on each kind.
        n=${#kinds[@]}
        for ((j = 0; j < n; j++)); do
            for i in "${!bin_paths[@]}"; do
                measure_cycle "${kinds[(j + r - 1) % n]}" "$r" "${bin_labels[i]}" "${bin_paths[i]}"
            done
        done
    done
    log "shipping, compression and apply measured in $((SECONDS - started)) s"
fi

# ---- part 4: the write path under live replication ----------------------------
wp_args=()
# scripts/bench-fio.sh with this script's binaries, image size and ring; its --embed
# report and JSON go to $work/NAME.md and NAME.json.
bench_fio() {  # name, then bench-fio.sh arguments
    local name=$1
    shift
    local args=(--runs "$runs" --size "${size_mib}M" --ring-size "$ring_size" --embed
                --rate-4k "$rate_4k" --rate-64k "$rate_64k" "${fio_bin_args[@]}"
                --out "$work/$name.md" --json "$work/$name.json" "$@")
    (( short )) && args+=(--short)
    BLKREP=$blkrep TMPDIR_BENCH="${TMPDIR_BENCH:-/var/tmp}" \
        run_child "$script_dir/bench-fio.sh" "${args[@]}" >"$work/$name.out" \
        || { tail -n 30 "$work/$name.out" >&2; die "scripts/bench-fio.sh failed ($name)"; }
}
if (( ! skip_write_path )); then
    wp_started=$SECONDS
    bench_fio write-path --servers qemu,replicated --jobs "$wp_jobs" --runtime "$runtime" \
        --ramp "$ramp" --replica-interval "$interval"
    wp_args=(--write-path-md "$work/write-path.md" --write-path-json "$work/write-path.json")
    log "write path measured in $((SECONDS - wp_started)) s"
fi

# ---- part 5: achieved RPO under steady incompressible churn -------------------
if (( ! skip_rpo )); then
    rpo_started=$SECONDS
    # The first 2 s (the ramp) are not sampled: the first cycle closes then.
    bench_fio rpo --servers replicated --jobs steady4k-refill --rate-4k "$rpo_rate" \
        --runtime "$rpo_runtime" --ramp 2 --replica-interval 1s
    wp_args+=(--rpo-json "$work/rpo.json" --rpo-rate "$rpo_rate" --rpo-runtime "$rpo_runtime")
    log "achieved RPO measured in $((SECONDS - rpo_started)) s"
fi

# ---- report ---------------------------------------------------------------
report_args=(report --runs-dir "$work/results" --runs "$runs" --size "$size_bytes"
             --size-label "$size_mib MiB" --compress-pct "$compress_pct" --work-dir "$work"
             --load-start "$load_start" --command "$command_line")
for i in "${!bin_paths[@]}"; do report_args+=(--blkrep "${bin_labels[i]}=${bin_paths[i]}"); done
if (( skip_shipping )); then
    report_args+=(--kinds "")
else
    report_args+=(--kinds "$kinds_csv")
fi
report_args+=("${wp_args[@]}")
[[ -n "$out" ]] && report_args+=(--out "$out")
[[ -n "$json_out" ]] && report_args+=(--json "$json_out")
(( short )) && report_args+=(--short)
"$py" "$helper" "${report_args[@]}"
log "done in $((SECONDS - started)) s"

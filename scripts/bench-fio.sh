#!/usr/bin/env bash
# Benchmark of the NBD data path: fio's nbd engine against qemu-nbd and blkrep, on the
# same raw image file, in the same run.
#
# Usage: scripts/bench-fio.sh [options]
#
#   --runs N                 runs per job and server; the report shows medians (default 5)
#   --runtime S              measured seconds per fio job (default 15)
#   --ramp S                 fio ramp_time seconds, not measured (default 3)
#   --size SIZE              image size for fallocate, e.g. 4G, 256M (default 4G)
#   --ring-size SIZE         blkrep ring_size for the tracked server (default 4GiB: two 1 s cycles at ~2 GB/s)
#   --jobs LIST              comma list of jobs (default: randwrite4k,randread4k,randwrite64k,
#                            seqwrite1m); see "Jobs" below
#   --servers LIST           comma list from: qemu,untracked,tracked,replicated,qemu-direct,
#                            untracked-direct,tracked-direct (default: qemu,untracked,tracked)
#   --cache hot|cold|both    page-cache state of the image for jobs that read (default hot):
#                            hot = the whole image read into the page cache right before
#                            fio; cold = `sync`, then posix_fadvise(POSIX_FADV_DONTNEED) on the
#                            image right before fio, and no ramp (a ramp would warm it);
#                            both = every read job twice, as "JOB" (hot) and "JOB:cold".
#                            Either way the image's resident bytes (fincore) are logged before
#                            and after fio and shown in the report. Write jobs are unaffected
#   --blkrep LABEL=PATH      a blkrep binary, with a label; repeat it to measure several
#                            binaries interleaved in one run (--blkrep before=/tmp/blkrep-old
#                            --blkrep after=target/release/blkrep): every blkrep server gets
#                            one column per binary, and the report adds LABEL/first-label
#                            ratios. Default: one unlabelled binary (BLKREP, see below)
#   --replica-interval I     interval of the replicated server (default 1s)
#   --rate-4k MB             fio --rate of steady4k, in MB/s (10^6 bytes/s; default 40)
#   --rate-64k MB            fio --rate of steady64k, in MB/s (default 150)
#   --lag-hz N               how often the replicated server's lag is sampled while fio
#                            runs, per second (default 10)
#   --out FILE               also write the report (machine info + table) to FILE
#   --json FILE              also write the medians, ratios and status summaries as JSON
#   --embed                  report for inclusion in another report: no machine table, a
#                            level-3 heading (scripts/bench-replication.sh uses it)
#   --json-dir DIR           keep every fio JSON output under DIR
#   --short                  CI smoke mode: 1 run, 2 s per job, 1 s ramp, 256 MiB image, the
#                            default jobs plus randwrite4k-qd8-fsync1 and randwrite4k-fua-qd8
#                            (unless --jobs), and --cache cold (unless --cache); fails only
#                            on errors, never on the numbers
#   --allow-missing-blkrep   if blkrep cannot be built or started, skip its columns
#                            (for developing this script only; default outside --short
#                            is to skip with a warning, in --short it is an error)
#   --start-timeout S        seconds to wait for a server to be ready (default 30)
#   --keep                   keep the work directory (it holds the image) for inspection
#   -h, --help               this text
#
# Environment: BLKREP=path/to/blkrep (default target/release/blkrep, built with
# `cargo build --release --bin blkrep` if missing); TMPDIR_BENCH=dir to hold the
# work dir (default /var/tmp: not tmpfs, the same filesystem kind as real disks).
#
# Jobs (fio's nbd engine; each fio job opens its own NBD connection):
#   randwrite4k          4k randwrite QD32          randread4k    4k randread QD32
#   randwrite64k         64k randwrite QD16         seqread1m     1M seq read QD8
#   seqwrite1m           1M seq write QD8           seqwrite64k   64k seq write QD16
#   randwrite4k-qd1      4k randwrite QD1 (latency)
#   randrw4k             4k random 70/30 read/write QD32 (--rwmixread=70); IOPS and
#                        MB/s are reads + writes, latencies of both together
#                        (fio unified_rw_reporting=both), read and write IOPS apart
#   steady4k, steady64k  4k QD32 / 64k QD16 randwrite at --rate-4k / --rate-64k MB/s
#   flush jobs (issue 17), 4k randwrite with fio --fsync=N (NBD_CMD_FLUSH after
#   every N writes; the report shows the flushes fio really sent per write):
#   randwrite4k-fsync8   QD32, fsync=8               randwrite4k-qd8-fsync1  QD8, fsync=1
#   randwrite4k-qd1-fsync1  QD1, fsync=1
#   FUA jobs (issue 17), 4k randwrite with every write NBD_CMD_FLAG_FUA, sent by
#   scripts/nbd_fua_bench.py (python3-libnbd) instead of fio, with the same ramp,
#   runtime and percentiles; its data is random, no two writes alike:
#   randwrite4k-fua-qd1  QD1                         randwrite4k-fua-qd8     QD8
# Suffixes: "-refill" on a write job (randwrite4k-refill) writes incompressible data
# (fio refill_buffers) instead of fio's default buffers; then "-Nconn" on any job
# (randread4k-4conn, seqwrite1m-4conn, randwrite4k-qd8-fsync1-4conn) runs it on N
# connections at once (fio --numjobs=N --group_reporting, N <= 16): every connection
# has the job's queue depth, and sequential jobs give each connection its own 1/N
# of the image.
# fio 3.33's nbd engine cannot send FUA (it writes with flags 0 and has no `fua`
# option), hence the python client for the FUA jobs; on N connections it runs N
# client processes and sums their IOPS, and each latency percentile is the
# highest of the N clients'. Note that at a queue depth above 1
# fio 3.33's nbd engine sends about one flush per write whatever --fsync=N says
# (measured); the report's "flushes / write" row shows what was sent.
#
# Servers, each started fresh for every (run, job) and stopped with SIGTERM, in
# the order given by --servers, so machine noise is spread over all of them:
#   qemu       qemu-nbd -t -f raw --cache=writeback --aio=io_uring --shared=N+8
#              (N: the most connections of a job; 8 to spare)
#   untracked  blkrep primary, tracking = false
#   tracked    blkrep primary, tracking = true, a cycle closed every 1 s and
#              consumed by the "discard" consumer; the ring file is new each run
#   replicated blkrep primary, tracking = true, shipping every --replica-interval
#              (1 s) over HTTPS with mutual TLS to a `blkrep replica run` daemon on
#              loopback (certificates from `blkrep cert`); ring and replica are new
#              each run, and fio starts only after the initial replication of the
#              whole image has been shipped and applied (not measured). The replica
#              daemon runs on the same cores, so its CPU is reported too. While fio
#              runs, its lag is sampled (`blkrep status --json`); after fio, a cycle
#              is closed and the time until the replica has applied everything (the
#              drain) gives the protected writes per second: writes / (run + drain).
#   qemu-direct       qemu-nbd ... --cache=none --aio=io_uring (O_DIRECT image)
#   untracked-direct  as untracked, with `direct = true` on the disk (O_DIRECT image)
#   tracked-direct    as tracked, with `direct = true` on the disk
# The report's ratios put each blkrep server against qemu-nbd with the same kind of
# image: the -direct ones against qemu-direct, the others against qemu.
# The image is written once in full before the first job, so reads hit data.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$script_dir/.." && pwd)

runs=5
runtime=15
ramp=3
size=4G
ring_size=4GiB
jobs_csv=randwrite4k,randread4k,randwrite64k,seqwrite1m
servers_csv=qemu,untracked,tracked
cache=hot
replica_interval=1s
rate_4k=40
rate_64k=150
lag_hz=10
bin_labels=()
bin_paths=()
out=
json_out=
embed=0
json_dir=
short=0
allow_missing=0
start_timeout=30
initial_timeout=900
keep=0
runs_set=0 runtime_set=0 ramp_set=0 size_set=0 jobs_set=0 cache_set=0

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
log() { echo "bench-fio: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_arg() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) need_arg "$@"; runs=$2; runs_set=1; shift 2 ;;
        --runtime) need_arg "$@"; runtime=$2; runtime_set=1; shift 2 ;;
        --ramp) need_arg "$@"; ramp=$2; ramp_set=1; shift 2 ;;
        --size) need_arg "$@"; size=$2; size_set=1; shift 2 ;;
        --ring-size) need_arg "$@"; ring_size=$2; ring_size_set=1; shift 2 ;;
        --jobs) need_arg "$@"; jobs_csv=$2; jobs_set=1; shift 2 ;;
        --cache) need_arg "$@"; cache=$2; cache_set=1; shift 2 ;;
        --servers) need_arg "$@"; servers_csv=$2; shift 2 ;;
        --replica-interval) need_arg "$@"; replica_interval=$2; shift 2 ;;
        --blkrep)
            need_arg "$@"
            [[ "$2" == ?*=?* ]] || die "--blkrep needs LABEL=PATH"
            bin_labels+=("${2%%=*}"); bin_paths+=("${2#*=}"); shift 2 ;;
        --rate-4k) need_arg "$@"; rate_4k=$2; shift 2 ;;
        --rate-64k) need_arg "$@"; rate_64k=$2; shift 2 ;;
        --lag-hz) need_arg "$@"; lag_hz=$2; shift 2 ;;
        --out) need_arg "$@"; out=$2; shift 2 ;;
        --json) need_arg "$@"; json_out=$2; shift 2 ;;
        --embed) embed=1; shift ;;
        --json-dir) need_arg "$@"; json_dir=$2; shift 2 ;;
        --short) short=1; shift ;;
        --allow-missing-blkrep) allow_missing=1; shift ;;
        --start-timeout) need_arg "$@"; start_timeout=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option: $1 (try --help)" ;;
    esac
done

if (( short )); then
    (( runs_set )) || runs=1
    # 2 s: the same time in all as the four 3 s jobs before the cold read and the
    # flush job joined (about 70 s on a busy 2-core machine).
    (( runtime_set )) || runtime=2
    (( ramp_set )) || ramp=1
    (( size_set )) || size=256M
    (( ${ring_size_set:-0} )) || ring_size=1GiB
    # One read job evicted from the page cache, one flush job and one FUA job.
    (( jobs_set )) || jobs_csv=$jobs_csv,randwrite4k-qd8-fsync1,randwrite4k-fua-qd8
    (( cache_set )) || cache=cold
fi
[[ "$cache" =~ ^(hot|cold|both)$ ]] || die "--cache must be hot, cold or both"
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
[[ "$runtime" =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer (seconds)"
[[ "$ramp" =~ ^[0-9]+$ ]] || die "--ramp must be a non-negative integer (seconds)"
[[ "$start_timeout" =~ ^[1-9][0-9]*$ ]] || die "--start-timeout must be a positive integer"
[[ "$rate_4k" =~ ^[1-9][0-9]*$ ]] || die "--rate-4k must be a positive integer (MB/s)"
[[ "$rate_64k" =~ ^[1-9][0-9]*$ ]] || die "--rate-64k must be a positive integer (MB/s)"
[[ "$lag_hz" =~ ^[1-9][0-9]*$ ]] || die "--lag-hz must be a positive integer"
for l in "${bin_labels[@]}"; do
    [[ "$l" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--blkrep label '$l': letters, digits, . _ - only"
done
[[ $(printf '%s\n' "${bin_labels[@]}" | sort | uniq -d) == "" ]] || die "--blkrep labels must differ"

IFS=, read -r -a jobs <<<"$jobs_csv"
IFS=, read -r -a servers <<<"$servers_csv"

# A job name is BASE[-refill][-Nconn]. These split it.
job_conns() {  # the N of -Nconn, or 1
    if [[ "$1" =~ -([0-9]+)conn$ ]]; then echo "${BASH_REMATCH[1]}"; else echo 1; fi
}
job_one_conn() {  # the name without -Nconn
    if [[ "$1" =~ ^(.*)-[0-9]+conn$ ]]; then echo "${BASH_REMATCH[1]}"; else echo "$1"; fi
}
job_base() {  # the name without -Nconn and -refill
    local j
    j=$(job_one_conn "$1")
    echo "${j%-refill}"
}
job_fua() {  # whether the job writes with FUA (scripts/nbd_fua_bench.py, not fio)
    case "$(job_base "$1")" in randwrite4k-fua-*) return 0 ;; *) return 1 ;; esac
}
job_reads() {  # whether the job reads, so that the cache state matters
    case "$(job_base "$1")" in randread4k|seqread1m|randrw4k) return 0 ;; *) return 1 ;; esac
}
max_conns=1
want_fua=0
for j in "${jobs[@]}"; do
    case "$(job_base "$j")" in
        randread4k|seqread1m|randrw4k) [[ "$(job_one_conn "$j")" != *-refill ]] || die "job $j: -refill is for write jobs" ;;
        randwrite4k|randwrite64k|seqwrite1m|seqwrite64k|steady4k|steady64k) ;;
        randwrite4k-qd1|randwrite4k-fsync8|randwrite4k-qd8-fsync1|randwrite4k-qd1-fsync1) ;;
        randwrite4k-fua-qd1|randwrite4k-fua-qd8)
            [[ "$(job_one_conn "$j")" != *-refill ]] || die "job $j: FUA jobs always write incompressible data; no -refill"
            want_fua=1 ;;
        *) die "unknown job: $j (see --help)" ;;
    esac
    n=$(job_conns "$j")
    (( n >= 1 && n <= 16 )) || die "job $j: 1 to 16 connections"
    (( n > max_conns )) && max_conns=$n
done
# What is measured: every job once, and a job that reads once per cache state,
# as JOB (hot) and JOB:cold. Results go to results/CASE/COLUMN.
cases=()
for j in "${jobs[@]}"; do
    if job_reads "$j"; then
        [[ "$cache" == cold ]] || cases+=("$j")
        [[ "$cache" == hot ]] || cases+=("$j:cold")
    else
        cases+=("$j")
    fi
done
want_replica=0
for s in "${servers[@]}"; do
    case "$s" in
        qemu|untracked|tracked|qemu-direct|untracked-direct|tracked-direct) ;;
        replicated) want_replica=1 ;;
        *) die "unknown server: $s" ;;
    esac
done
is_qemu() { [[ "$1" == qemu || "$1" == qemu-direct ]]; }

# The FUA client's queue depth of each FUA job.
fua_iodepth() {
    case "$(job_base "$1")" in
        randwrite4k-fua-qd1) echo 1 ;;
        randwrite4k-fua-qd8) echo 8 ;;
    esac
}

# fio arguments of each job (beyond the common ones). The steady jobs are rate
# limited (fio --rate, bytes/s), so that they measure replication that keeps up.
job_args() {
    local conns
    conns=$(job_conns "$1")
    case "$(job_base "$1")" in
        randwrite4k)  echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        randread4k)   echo "--rw=randread --bs=4k --iodepth=32" ;;
        randwrite64k) echo "--rw=randwrite --bs=64k --iodepth=16" ;;
        seqwrite1m)   echo "--rw=write --bs=1M --iodepth=8" ;;
        seqwrite64k)  echo "--rw=write --bs=64k --iodepth=16" ;;
        seqread1m)    echo "--rw=read --bs=1M --iodepth=8" ;;
        randrw4k)     echo "--rw=randrw --rwmixread=70 --bs=4k --iodepth=32 --unified_rw_reporting=both" ;;
        randwrite4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
        randwrite4k-fsync8) echo "--rw=randwrite --bs=4k --iodepth=32 --fsync=8" ;;
        randwrite4k-qd8-fsync1) echo "--rw=randwrite --bs=4k --iodepth=8 --fsync=1" ;;
        randwrite4k-qd1-fsync1) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
        steady4k)     echo "--rw=randwrite --bs=4k --iodepth=32 --rate=$((rate_4k * 1000000))" ;;
        steady64k)    echo "--rw=randwrite --bs=64k --iodepth=16 --rate=$((rate_64k * 1000000))" ;;
    esac
    # Incompressible data: fresh random bytes for every write.
    [[ "$(job_one_conn "$1")" == *-refill ]] && echo "--refill_buffers"
    # N connections: fio's nbd engine opens one per fio job. Sequential jobs get a
    # region each, so they do not all stream over the same blocks.
    echo "--numjobs=$conns"
    if (( conns > 1 )) && [[ "$(job_base "$1")" == seq* ]]; then
        local share=$(( image_bytes / conns / 1048576 * 1048576 ))
        echo "--size=$share --offset_increment=$share"
    fi
    return 0
}

for tool in fio qemu-nbd nbdinfo fallocate python3 fincore; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found; run scripts/install-test-deps.sh"
done
fio --enghelp 2>/dev/null | grep -qw nbd || die "this fio has no nbd ioengine"

# Python for the report: any python3 (stdlib only); prefer the system one, where
# Debian's python3-libnbd is, which the FUA client needs.
py=/usr/bin/python3
[[ -x "$py" ]] || py=$(command -v python3)
report_py="$script_dir/bench_report.py"
probe_py="$script_dir/bench_probe.py"
fua_py="$script_dir/nbd_fua_bench.py"
[[ -f "$report_py" && -f "$probe_py" && -f "$fua_py" ]] || die "missing $report_py, $probe_py or $fua_py"
if (( want_fua )); then
    "$py" -c 'import nbd' 2>/dev/null || die "FUA jobs need $py with python3-libnbd; run scripts/install-test-deps.sh"
fi

# ---- work dir and cleanup -------------------------------------------------
work=$(mktemp -d "${TMPDIR_BENCH:-/var/tmp}/blkrep-bench.XXXXXX")
server_pid=
replica_pid=
fio_pid=
lag_pid=
start_failure=
# SIGTERM process $1, KILL it after 5 s, reap it (cleanup only).
terminate() {
    local pid=$1
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    for pid in "$fio_pid" "$lag_pid"; do
        [[ -n "$pid" ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    # The replica first: a primary shipping to it then stops at once.
    terminate "$replica_pid"
    terminate "$server_pid"
    if (( keep )); then
        log "work dir kept: $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$work/results" "$work/logs"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
image=$work/disk.img
sock=$work/nbd.sock
ctl=$work/primary.ctl
ring=$work/bench.ring
export_name=disk0
uri="nbd+unix:///$export_name?socket=$sock"

# ---- blkrep binary --------------------------------------------------------
want_blkrep=0
for s in "${servers[@]}"; do is_qemu "$s" || want_blkrep=1; done

# Servers that failed to start are skipped for the rest of the run (only when
# skipping is allowed); reasons go to the report.
declare -A skipped=()
skip_allowed() { (( allow_missing )) || (( ! short )); }
blkrep_unavailable() {  # reason
    if skip_allowed; then
        log "WARNING: $1; skipping the blkrep columns"
        for s in untracked tracked replicated untracked-direct tracked-direct; do skipped[$s]=$1; done
    else
        die "$1 (use --allow-missing-blkrep to skip blkrep while developing this script)"
    fi
}

blkrep=
if (( want_blkrep && ${#bin_labels[@]} > 0 )); then
    # Binaries given by label: each must be there (no build, no skipping).
    for i in "${!bin_paths[@]}"; do
        [[ -x "${bin_paths[i]}" ]] || die "--blkrep ${bin_labels[i]}=${bin_paths[i]}: not an executable"
        [[ "${bin_paths[i]}" == /* ]] || bin_paths[i]="$PWD/${bin_paths[i]}"
    done
    blkrep=${bin_paths[0]}
elif (( want_blkrep )); then
    if [[ -n "${BLKREP:-}" ]]; then
        blkrep=$BLKREP
        [[ -x "$blkrep" ]] || blkrep_unavailable "BLKREP=$BLKREP is not an executable"
    else
        blkrep="${CARGO_TARGET_DIR:-$repo/target}/release/blkrep"
        if [[ ! -x "$blkrep" ]]; then
            log "$blkrep missing; building it (cargo build --release --bin blkrep)"
            if ! (cd "$repo" && cargo build --release --bin blkrep) >"$work/logs/cargo-build.log" 2>&1; then
                tail -n 30 "$work/logs/cargo-build.log" >&2
                blkrep_unavailable "cargo build --release --bin blkrep failed"
            fi
        fi
    fi
    [[ "$blkrep" == /* ]] || blkrep="$PWD/$blkrep"
    bin_labels=("")
    bin_paths=("$blkrep")
fi

# The report's columns: qemu, and every blkrep server once per binary, as
# SERVER (one unlabelled binary) or SERVER@LABEL. Results go to results/JOB/COLUMN.
columns=()
declare -A column_server=() column_binary=()
for s in "${servers[@]}"; do
    if is_qemu "$s"; then
        columns+=("$s"); column_server[$s]=$s
        continue
    fi
    for i in "${!bin_labels[@]}"; do
        c=$s${bin_labels[i]:+@${bin_labels[i]}}
        columns+=("$c"); column_server[$c]=$s; column_binary[$c]=${bin_paths[i]}
    done
done

# ---- image ----------------------------------------------------------------
log "work dir $work ($(findmnt -n -o FSTYPE --target "$work" 2>/dev/null || echo '?'))"
log "image $size, preallocated and written once in full"
fallocate -l "$size" "$image"
image_bytes=$(stat -c %s "$image")
# Precondition: write the whole image once, so that reads are of data rather
# than of unwritten extents, and every server sees the same allocated file.
# Buffered, so the image also starts out in the page cache for every server.
fio --name=precondition --filename="$image" --rw=write --bs=1M \
    --ioengine=psync --size="$size" --end_fsync=1 \
    --output="$work/logs/precondition.txt" >/dev/null \
    || { cat "$work/logs/precondition.txt" >&2; die "preconditioning write failed"; }

# ---- servers --------------------------------------------------------------
write_blkrep_config() {  # tracking(true|false) direct(true|false) file
    local tracking=$1 direct=$2 conf=$3
    {
        echo "control_socket = \"$ctl\""
        echo
        echo "[nbd]"
        echo "unix_socket = \"$sock\""
        echo
        echo "[[group]]"
        echo "name = \"bench\""
        echo "ring = \"$ring\""
        echo "ring_size = \"$ring_size\""
        echo "interval = \"1s\""
        echo "tracking = $tracking"
        if [[ "$tracking" == true ]]; then
            echo
            echo "[group.consumer]"
            echo "type = \"discard\""
        fi
        echo
        echo "[[group.disk]]"
        echo "name = \"$export_name\""
        echo "image = \"$image\""
        echo "direct = $direct"
    } >"$conf"
}
write_blkrep_config false false "$work/untracked.toml"
write_blkrep_config true false "$work/tracked.toml"
write_blkrep_config false true "$work/untracked-direct.toml"
write_blkrep_config true true "$work/tracked-direct.toml"

# ---- the replicated server's replica daemon ----------------------------------
# A lab CA and certificates (`blkrep cert`) once; the configurations per run.
replica_ctl=$work/replica.ctl
replica_storage=$work/replicas
if (( want_replica )) && [[ -n "$blkrep" && -z "${skipped[replicated]:-}" ]]; then
    if ! { "$blkrep" cert ca --dir "$work/pki" &&
           "$blkrep" cert issue --dir "$work/pki" --name localhost &&
           "$blkrep" cert issue --dir "$work/pki" --name primary.bench.lab; } >"$work/logs/cert.log" 2>&1; then
        cat "$work/logs/cert.log" >&2
        die "blkrep cert failed"
    fi
fi

# Both configurations of the replicated server, for a free loopback port picked now
# (each run, so no port stays reserved in between).
write_replication_configs() {
    local replica_port
    replica_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat >"$work/replica.toml" <<TOML
listen = "127.0.0.1:$replica_port"
control_socket = "$replica_ctl"
reserve = "64MiB"
[tls]
cert = "$work/pki/localhost.pem"
key = "$work/pki/localhost.key"
ca = "$work/pki/ca.pem"
[[authorization]]
primary = "*.bench.lab"
storage = "$replica_storage"
trust_group = "bench"
TOML
    {
        echo "control_socket = \"$ctl\""
        echo
        echo "[nbd]"
        echo "unix_socket = \"$sock\""
        echo
        echo "[[group]]"
        echo "name = \"bench\""
        echo "ring = \"$ring\""
        echo "ring_size = \"$ring_size\""
        echo "interval = \"$replica_interval\""
        echo
        echo "[group.consumer]"
        echo "type = \"replica\""
        echo "url = \"https://localhost:$replica_port\""
        echo "ca = \"$work/pki/ca.pem\""
        echo "cert = \"$work/pki/primary.bench.lab.pem\""
        echo "key = \"$work/pki/primary.bench.lab.key\""
        echo
        echo "[[group.disk]]"
        echo "name = \"$export_name\""
        echo "image = \"$image\""
    } >"$work/replicated.toml"
}

# Last non-empty line of a log file, for one-line error reasons.
last_line() {
    local l
    l=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-200 || true)
    echo "${l:-(no output)}"
}

# Every server starts from the same page cache: what an earlier job left there
# (large folios from sequential writes, dirty pages under writeback) changes a 4k
# random-write result by 3x on this kind of machine. Root only; otherwise noted.
drop_caches() {
    if [[ -w /proc/sys/vm/drop_caches ]]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    elif [[ -z "${warned_caches:-}" ]]; then
        warned_caches=1
        log "WARNING: not root, so page caches are not dropped between servers; results depend on order"
    fi
}

# The replica daemon's answer to `blkrep replica status --json`, or nothing.
replica_status_json() {
    timeout 10 "$blkrep" replica status --config "$work/replica.toml" --json 2>/dev/null
}

# Starts a fresh replica daemon (empty storage) for the replicated server; logs to
# $1. Sets replica_pid. Returns 1 (with start_failure set) if it did not come up.
start_replica() {
    local logf=$1
    rm -rf "$replica_storage" "$replica_ctl"
    write_replication_configs
    NO_COLOR=1 "$blkrep" --log-format json replica run --config "$work/replica.toml" >"$logf" 2>&1 &
    replica_pid=$!
    local deadline=$((SECONDS + start_timeout))
    while (( SECONDS < deadline )); do
        if ! kill -0 "$replica_pid" 2>/dev/null; then
            wait "$replica_pid" 2>/dev/null || true
            replica_pid=
            start_failure="replica daemon exited before it was ready: $(last_line "$logf")"
            return 1
        fi
        replica_status_json >/dev/null && return 0
        sleep 0.1
    done
    start_failure="replica daemon not ready after ${start_timeout}s: $(last_line "$logf")"
    return 1
}

# The replicated server's initial replication, not measured: ships the whole image
# (`blkrep cycles close` runs it and the first delta, and returns when the replica
# holds them durably), then waits until the replica has applied everything.
initial_replication() {
    local err
    if ! err=$("$py" "$probe_py" drain --blkrep "$blkrep" --primary-config "$work/replicated.toml" \
            --replica-config "$work/replica.toml" --group bench --timeout "$initial_timeout" \
            --out "$work/initial-replication.json" 2>&1 >/dev/null); then
        start_failure="initial replication failed: $(echo "$err" | tail -n 1 | cut -c1-200)"
        return 1
    fi
}

# Start server $1; logs to $2. Sets server_pid. Returns 1 if it did not become
# ready (after printing why, and setting start_failure), leaving nothing running.
start_server() {
    local which=$1 logf=$2
    rm -f "$sock" "$ctl" "$ring" "$ring.replication.json"
    case "$which" in
        qemu|qemu-direct)
            local qcache=writeback
            [[ "$which" == qemu-direct ]] && qcache=none
            # --shared: the most connections of a job (fio closes the one it sizes
            # the export with; checked with --shared=4 and 4 jobs), and 8 to spare.
            qemu-nbd -t -f raw --cache=$qcache --aio=io_uring --shared=$((max_conns + 8)) \
                -k "$sock" -x "$export_name" "$image" >"$logf" 2>&1 &
            ;;
        untracked|tracked|untracked-direct|tracked-direct)
            NO_COLOR=1 "$blkrep" primary --config "$work/$which.toml" >"$logf" 2>&1 &
            ;;
        replicated)
            if ! start_replica "${logf%.log}.replica.log"; then
                log "$which server: $start_failure"
                stop_server "$which" || true
                return 1
            fi
            NO_COLOR=1 "$blkrep" primary --config "$work/replicated.toml" >"$logf" 2>&1 &
            ;;
    esac
    server_pid=$!
    local deadline=$((SECONDS + start_timeout))
    while (( SECONDS < deadline )); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            local rc=0
            wait "$server_pid" || rc=$?
            server_pid=
            start_failure="exited with status $rc before it was ready: $(last_line "$logf")"
            log "$which server $start_failure; its log:"
            tail -n 20 "$logf" | sed 's/^/    /' >&2
            stop_server "$which" || true
            return 1
        fi
        if [[ -S "$sock" ]] && nbdinfo "$uri" >/dev/null 2>&1; then
            [[ "$which" == replicated ]] || return 0
            local started=$SECONDS
            if initial_replication; then
                log "  initial replication shipped and applied in $((SECONDS - started)) s"
                return 0
            fi
            log "$which server: $start_failure; its log:"
            tail -n 20 "$logf" | sed 's/^/    /' >&2
            stop_server "$which" || true
            return 1
        fi
        sleep 0.1
    done
    start_failure="not ready after ${start_timeout}s (socket $sock; nbdinfo $uri)"
    log "$which server $start_failure; its log:"
    tail -n 20 "$logf" | sed 's/^/    /' >&2
    stop_server "$which" || true
    return 1
}

# SIGTERM process $2 (named $1 in warnings) and wait for it; KILL after $3 s.
# Returns 1 if it had to be killed or exited with an error status.
stop_pid() {
    local which=$1 pid=$2 limit=$3 rc=0 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "WARNING: $which did not exit $limit s after SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 1
    fi
    wait "$pid" || rc=$?
    # qemu-nbd reports a SIGTERM as status 143 (128+15) in some versions.
    if (( rc != 0 && rc != 143 )); then
        log "WARNING: $which exited with status $rc after SIGTERM"
        return 1
    fi
    return 0
}

# SIGTERM the server and wait for it; KILL after 20 s. Returns 1 if it had to
# be killed or exited with an error status. The replicated server's replica daemon
# stops first, so a primary in the middle of shipping a cycle fails it and stops at
# once instead of finishing the delivery.
stop_server() {
    local which=$1 rc=0
    if [[ -n "$replica_pid" ]]; then
        stop_pid "replica daemon of the $which server" "$replica_pid" 20 || rc=1
        replica_pid=
    fi
    if [[ -n "$server_pid" ]]; then
        stop_pid "$which server" "$server_pid" 20 || rc=1
        server_pid=
    fi
    return "$rc"
}

# Wall-clock time and /proc/PID/stat of process $2 (default: the server) on one
# line, into $1.
cpu_sample() {
    local now stat
    now=$(date +%s.%N)
    stat=$(cat "/proc/${2:-$server_pid}/stat" 2>/dev/null || true)
    echo "$now $stat" >"$1"
}

# Bytes of the image resident in the page cache.
resident_bytes() {
    fincore --bytes --noheadings --output RES "$image" | tr -d ' '
}

# Puts the image into page-cache state $1 (hot or cold) right before fio, and
# records its resident bytes into $2. Cold: dirty pages written back first
# (DONTNEED drops clean pages only), then every page of the image dropped.
set_cache_state() {  # hot|cold file
    if [[ "$1" == cold ]]; then
        sync
        "$py" -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fdatasync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)' "$image"
    else
        cat "$image" >/dev/null
    fi
    local res
    res=$(resident_bytes)
    echo "$res" >"$2"
    log "  image $1: $((res / 1048576)) MiB of $((image_bytes / 1048576)) MiB in the page cache"
    if [[ "$1" == cold ]] && (( res > image_bytes / 100 )); then
        log "WARNING: eviction left $((res / 1048576)) MiB of the image cached"
    fi
}

# ---- the runs ---------------------------------------------------------------
total=$(( runs * ${#cases[@]} * ${#columns[@]} ))
n=0
errors=0
for ((r = 1; r <= runs; r++)); do
    for case_id in "${cases[@]}"; do
        job=${case_id%:cold}
        cache_state=
        if job_reads "$job"; then
            cache_state=hot
            [[ "$case_id" == *:cold ]] && cache_state=cold
        fi
        for col in "${columns[@]}"; do
            n=$((n + 1))
            srv=${column_server[$col]}
            if [[ -n "${skipped[$col]:-}${skipped[$srv]:-}" ]]; then
                continue
            fi
            is_qemu "$srv" || blkrep=${column_binary[$col]}
            tag="$case_id/$col/run$r"
            mkdir -p "$work/results/$case_id/$col"
            logf="$work/logs/$case_id-$col-run$r.log"
            log "[$n/$total] $tag"
            drop_caches
            if ! start_server "$srv" "$logf"; then
                if is_qemu "$srv"; then
                    die "qemu-nbd ($srv) $start_failure"
                fi
                if skip_allowed; then
                    log "WARNING: blkrep ($col) did not start; skipping its column"
                    skipped[$col]="\`$blkrep primary\` ($srv) $start_failure"
                    continue
                fi
                die "blkrep primary ($col) $start_failure (use --allow-missing-blkrep to skip it while developing this script)"
            fi
            json="$work/results/$case_id/$col/run$r.json"
            # A cold job has no ramp: fio's ramp would read the image back in.
            job_ramp=$ramp
            if [[ -n "$cache_state" ]]; then
                set_cache_state "$cache_state" "$json.resident0"
                [[ "$cache_state" == cold ]] && job_ramp=0
            fi
            # The server's CPU time (all threads) around the fio run, for the
            # report's "server CPU" row.
            cpu_sample "$json.cpu0"
            if [[ -n "$replica_pid" ]]; then
                cpu_sample "$json.rcpu0" "$replica_pid"
                # What was shipped before fio (the initial replication), so the
                # report can tell what shipped while fio ran.
                timeout 10 "$blkrep" status --config "$work/$srv.toml" --json \
                    >"$json.status0" 2>>"$logf" || rm -f "$json.status0"
                # The lag the replica keeps while fio runs.
                "$py" "$probe_py" lag --blkrep "$blkrep" --primary-config "$work/$srv.toml" \
                    --group bench --hz "$lag_hz" --out "$json.lag" 2>>"$logf" &
                lag_pid=$!
            fi
            # In the background, so that SIGINT/SIGTERM run the cleanup at once
            # (bash runs traps only after a foreground child exits). FUA jobs:
            # the python client, whose JSON reads like fio's.
            if job_fua "$job"; then
                "$py" "$fua_py" "$uri" --bs 4096 --iodepth "$(fua_iodepth "$job")" \
                    --runtime "$runtime" --ramp "$job_ramp" --size "$image_bytes" \
                    --connections "$(job_conns "$job")" --json "$json" \
                    >"$work/logs/$case_id-$col-run$r.fio.txt" 2>&1 &
            else
                # shellcheck disable=SC2046  # job_args is meant to split into words
                fio --name="$job" --ioengine=nbd --uri="$uri" \
                    $(job_args "$job") --group_reporting \
                    --time_based --runtime="$runtime" --ramp_time="$job_ramp" \
                    --percentile_list=50:99:99.9 \
                    --output-format=json --output="$json" \
                    >"$work/logs/$case_id-$col-run$r.fio.txt" 2>&1 &
            fi
            fio_pid=$!
            fio_rc=0
            wait "$fio_pid" || fio_rc=$?
            fio_pid=
            fio_end=$(date +%s.%N)
            if [[ -n "$lag_pid" ]]; then
                kill -TERM "$lag_pid" 2>/dev/null || true
                wait "$lag_pid" 2>/dev/null || true
                lag_pid=
            fi
            if (( fio_rc != 0 )); then
                load=fio
                job_fua "$job" && load=nbd_fua_bench.py
                log "$load failed for $tag (status $fio_rc):"
                tail -n 20 "$work/logs/$case_id-$col-run$r.fio.txt" "$json" 2>/dev/null | sed 's/^/    /' >&2
                stop_server "$srv" || true
                die "$load failed against $col"
            fi
            cpu_sample "$json.cpu1"
            [[ -n "$cache_state" ]] && resident_bytes >"$json.resident1"
            [[ -n "$replica_pid" ]] && cpu_sample "$json.rcpu1" "$replica_pid"
            if ! is_qemu "$srv"; then
                # What the server did (cycles closed and delivered, ring use),
                # so the report can show the tracked column really tracked.
                if ! timeout 10 "$blkrep" status --config "$work/$srv.toml" --json \
                        >"$json.status" 2>>"$logf"; then
                    log "WARNING: blkrep status failed for $tag (see $logf)"
                    rm -f "$json.status"
                fi
            fi
            if [[ -n "$replica_pid" ]]; then
                replica_status_json >"$json.replica" || rm -f "$json.replica"
                # The drain: from fio's end until the replica has applied every
                # write (a cycle closed now, shipped, stored and applied), for the
                # protected writes per second. In the background, for the traps.
                "$py" "$probe_py" drain --blkrep "$blkrep" --primary-config "$work/$srv.toml" \
                    --replica-config "$work/replica.toml" --group bench --since "$fio_end" \
                    --timeout "$initial_timeout" --out "$json.drain" 2>>"$logf" &
                fio_pid=$!
                wait "$fio_pid" || { log "WARNING: the drain failed for $tag: $(last_line "$logf")"; rm -f "$json.drain"; }
                fio_pid=
            fi
            if ! stop_server "$srv"; then
                tail -n 20 "$logf" | sed 's/^/    /' >&2
                errors=$((errors + 1))
            fi
            if [[ "$srv" == tracked* || "$srv" == replicated ]]; then
                rm -f "$ring" "$ring.replication.json"
            fi
            if [[ "$srv" == replicated ]]; then
                rm -rf "$replica_storage"
                # Its `Transfer applied` lines give the replica's own lag.
                cp "${logf%.log}.replica.log" "$json.replica-log" 2>/dev/null || true
            fi
        done
    done
done

# ---- report ---------------------------------------------------------------
skip_args=()
for s in "${!skipped[@]}"; do skip_args+=(--skipped "$s=${skipped[$s]}"); done
report_args=(
    --results "$work/results" --jobs "$(IFS=,; echo "${cases[*]}")" --servers "$servers_csv"
    --image-dir "$work" --size "$size" --runs "$runs" --runtime "$runtime" --ramp "$ramp"
    --ring-size "$ring_size" --load-start "$load_start"
    --rate-4k "$rate_4k" --rate-64k "$rate_64k" --lag-hz "$lag_hz"
)
for i in "${!bin_labels[@]}"; do report_args+=(--blkrep "${bin_labels[i]}=${bin_paths[i]}"); done
[[ -n "$out" ]] && report_args+=(--out "$out")
[[ -n "$json_out" ]] && report_args+=(--json "$json_out")
(( embed )) && report_args+=(--embed)
(( want_replica )) && report_args+=(--replica-interval "$replica_interval")
(( short )) && report_args+=(--short)
"$py" "$report_py" "${report_args[@]}" "${skip_args[@]}"

if [[ -n "$json_dir" ]]; then
    mkdir -p "$json_dir"
    cp -r "$work/results/." "$json_dir/"
    cp -r "$work/logs" "$json_dir/"
    log "fio JSON and server logs copied to $json_dir"
fi

if (( errors > 0 )); then
    die "$errors server(s) did not stop cleanly on SIGTERM (see warnings above)"
fi

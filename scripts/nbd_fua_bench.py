#!/usr/bin/python3
"""FUA write benchmark over NBD, for scripts/bench-fio.sh (fio 3.33's nbd engine
cannot send FUA: it writes with flags 0 and has no `fua` option).

Usage: nbd_fua_bench.py URI --bs 4096 --iodepth N --runtime S --ramp S
                        --size BYTES [--flush-every K] [--connections C] --json OUT

Writes --bs bytes at random --bs-aligned offsets below --size (and the export's
size) with NBD_CMD_FLAG_FUA, keeping --iodepth writes in flight on one NBD
connection (python3-libnbd aio_pwrite, polled with poll(-1)). --flush-every K
also sends an NBD_CMD_FLUSH after every K writes (not counted as writes). Each
write's latency is submit -> completion seen (time.perf_counter_ns). Writes that
complete during the first --ramp seconds are not measured; --runtime seconds are.
Each write's data is a window at a random byte offset in 16 MiB of os.urandom
(shared, not copied): incompressible, and no two writes alike, so neither
compression of a cycle's stream nor deduplication shrinks them.

--connections C runs C client processes of this script in parallel, each with its
own connection and --iodepth, and merges their results: IOPS and bytes/s summed,
each latency percentile the maximum over the connections (no client's tail is
hidden; the exact percentile of all writes would need every sample).

OUT is a minimal fio-like JSON, so the report reads it as it reads fio's:
{"jobs": [{"jobname", "error": 0, "write": {"iops", "bw_bytes", "total_ios",
"runtime" (ms), "clat_ns": {"percentile": {"50.000000", "99.000000",
"99.900000"}}}}]}.

Fails (status 1, the reason on stderr) if the server does not advertise FUA, or
on any error from the server (its message), or on a client that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import nbd

# Random bytes the writes' data is taken from.
POOL_BYTES = 16 << 20
# fio's --percentile_list=50:99:99.9, as fio names them in its JSON.
PERCENTILES = (50.0, 99.0, 99.9)


class BenchError(Exception):
    pass


def pct_name(p: float) -> str:
    return f"{p:.6f}"


def percentile(sorted_ns: list[int], p: float) -> int:
    """Nearest-rank percentile of sorted samples."""
    rank = max(1, -(-len(sorted_ns) * p // 100))
    return sorted_ns[int(rank) - 1]


def fio_like(name: str, writes: int, bs: int, run_ns: int,
             pcts: dict[str, float]) -> dict:
    run_s = run_ns / 1e9
    return {"jobs": [{
        "jobname": name, "error": 0,
        "write": {"iops": writes / run_s, "bw_bytes": writes * bs / run_s,
                  "total_ios": writes, "runtime": run_ns / 1e6,
                  "clat_ns": {"percentile": pcts}},
    }]}


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        raise BenchError(f"Cannot connect to {uri}: {e.string}") from e
    if not h.can_fua():
        raise BenchError(f"The server at {uri} does not advertise FUA (NBD_FLAG_SEND_FUA)")
    return h


def retire(h: nbd.NBD, cookie: int) -> None:
    try:
        h.aio_command_completed(cookie)
    except nbd.Error as e:
        raise BenchError(f"Server error: {e.string}") from e


def run_one(args) -> dict:
    """One connection: the measured writes, as fio-like JSON."""
    h = connect(args.uri)
    blocks = min(args.size, h.get_size()) // args.bs
    if blocks < 1:
        raise BenchError(f"The export is smaller than one {args.bs}-byte block")
    pool = memoryview(bytearray(os.urandom(max(POOL_BYTES, 2 * args.bs))))
    rng = random.Random()
    # cookie -> (submit ns, the write's buffer (kept until it completes) or None
    # for a flush)
    in_flight: dict[int, tuple[int, nbd.Buffer | None]] = {}
    samples: list[int] = []
    start = time.perf_counter_ns()
    measure_from = start + args.ramp * 10**9
    stop_at = measure_from + args.runtime * 10**9
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        at = rng.randrange(len(pool) - args.bs)
        buf = nbd.Buffer.from_buffer(pool[at:at + args.bs])
        off = rng.randrange(blocks) * args.bs
        cookie = h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA)
        in_flight[cookie] = (time.perf_counter_ns(), buf)
        submitted += 1
        if args.flush_every and submitted % args.flush_every == 0:
            in_flight[h.aio_flush()] = (time.perf_counter_ns(), None)

    try:
        while len(in_flight) < args.iodepth:
            submit()
        while in_flight:
            h.poll(-1)
            now = time.perf_counter_ns()
            while in_flight and (cookie := h.aio_peek_command_completed()) > 0:
                submitted_ns, buf = in_flight.pop(cookie)
                retire(h, cookie)
                if buf is None:
                    continue  # a flush's completion frees no write slot
                if measure_from <= now < stop_at:
                    samples.append(now - submitted_ns)
                if now < stop_at:
                    submit()
        h.shutdown()
    except nbd.Error as e:
        raise BenchError(f"NBD error: {e.string}") from e
    if not samples:
        raise BenchError("No write completed in the measured time")
    samples.sort()
    pcts = {pct_name(p): float(percentile(samples, p)) for p in PERCENTILES}
    return fio_like("fua", len(samples), args.bs, stop_at - measure_from, pcts)


def merge(docs: list[dict], bs: int) -> dict:
    """Several connections' results as one: sums, and each percentile's maximum."""
    writes = [d["jobs"][0]["write"] for d in docs]
    total = sum(w["total_ios"] for w in writes)
    run_ms = max(w["runtime"] for w in writes)
    pcts = {pct_name(p): max(w["clat_ns"]["percentile"][pct_name(p)] for w in writes)
            for p in PERCENTILES}
    out = fio_like(f"fua x{len(docs)}", total, bs, int(run_ms * 1e6), pcts)
    out["jobs"][0]["write"]["iops"] = sum(w["iops"] for w in writes)
    out["jobs"][0]["write"]["bw_bytes"] = sum(w["bw_bytes"] for w in writes)
    return out


def run_many(args) -> dict:
    """--connections C: C processes of this script in parallel, merged."""
    argv = [sys.executable, os.path.abspath(__file__), args.uri, "--bs", str(args.bs),
            "--iodepth", str(args.iodepth), "--runtime", str(args.runtime),
            "--ramp", str(args.ramp), "--size", str(args.size),
            "--flush-every", str(args.flush_every)]
    outs = [f"{args.json}.conn{i}" for i in range(args.connections)]
    procs = [subprocess.Popen(argv + ["--json", o]) for o in outs]

    def stop(signum, _frame):
        for p in procs:
            p.terminate()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = [i for i, p in enumerate(procs) if p.wait() != 0]
    if failed:
        raise BenchError(f"Client(s) {failed} of {args.connections} failed (see above)")
    docs = []
    for o in outs:
        with open(o, encoding="utf-8") as f:
            docs.append(json.load(f))
        os.unlink(o)
    return merge(docs, args.bs)


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return n


def non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("uri")
    ap.add_argument("--bs", type=positive, default=4096)
    ap.add_argument("--iodepth", type=positive, default=1)
    ap.add_argument("--runtime", type=positive, required=True, help="measured seconds")
    ap.add_argument("--ramp", type=non_negative, default=0, help="unmeasured seconds first")
    ap.add_argument("--size", type=positive, required=True, help="bytes written within")
    ap.add_argument("--flush-every", type=non_negative, default=0,
                    help="an NBD_CMD_FLUSH after every K writes (0: none)")
    ap.add_argument("--connections", type=positive, default=1)
    ap.add_argument("--json", required=True, help="output file")
    args = ap.parse_args()
    try:
        doc = run_many(args) if args.connections > 1 else run_one(args)
    except BenchError as e:
        print(f"nbd_fua_bench: {e}", file=sys.stderr)
        return 1
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Helper of scripts/bench-replication.sh: measures one replicated cycle, and turns
the measurements into a Markdown report and a JSON file. Standard library only.

  cycle   closes a cycle on a running primary (`blkrep cycles close`), times its
          shipping to the replica server, waits until the replica has applied it
          (`blkrep replica status --json`), reads the apply time from the replica's
          JSON log, and writes one run's numbers as JSON.
  report  medians over the runs of every data kind and binary, the scattered over
          sequential ratio, CPU seconds per GiB, plus the write-path and achieved-RPO
          reports of scripts/bench-fio.sh (their --embed Markdown and --json), into
          --out and --json.

Exit status: 0 on success; 1 on an error (a command failing, a timeout, malformed
input), never on the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402  (the fio report's machine table, shared)
from bench_probe import (CLK_TCK, ProbeError, close_cycle, cpu_ticks, group_status,  # noqa: E402
                         log_events, run_json, wait_applied)

MIB = 1 << 20
GIB = 1 << 30

# kind: (label, how the data is made)
KINDS = {
    "random": ("incompressible", "fio `refill_buffers` (fresh pseudo-random data per write)"),
    "compressible": ("compressible", "fio `refill_buffers`, `buffer_compress_percentage={pct}`, "
                                     "`buffer_compress_chunk=4k`; compression on with the "
                                     "default codec (zstd at its default level)"),
    "compressible-deflate": ("compressible, DEFLATE",
                             "as compressible, with `compression_codec = \"deflate\"` "
                             "(level 1) in the consumer"),
    "random-raw": ("incompressible, compression off",
                   "as incompressible, with `compression = \"off\"` in the consumer"),
    "compressible-auto": ("compressible, compression auto",
                          "as compressible, with `compression = \"auto\"` (the default): "
                          "the default codec (zstd) only while the link is slower than "
                          "the codec"),
    "scattered": ("scattered 4 KiB, incompressible",
                  "as incompressible, written as 4 KiB random writes (fio `randwrite`, QD32, "
                  "its random map: no block twice) over a disk 4 times the cycle's size"),
    "random-point": ("incompressible, a point kept",
                     "as incompressible, with `recovery_points = 1` and "
                     "`recovery_point_spacing = \"1s\"` in the consumer, so the replica keeps "
                     "the state before the cycle as a point and its apply first captures what "
                     "each block held (undo data, synced)"),
}
# The scattered cycle is compared with this sequential one (same data, same codec).
SEQUENTIAL_OF_SCATTERED = "random"


class BenchError(ProbeError):
    pass


# ---- cycle ------------------------------------------------------------------

def consumer(status: dict, group: str) -> dict:
    return group_status(status, group).get("consumer") or {}


def write_chars(pid: int) -> int | None:
    """Bytes `pid` passed to write-family system calls (its TLS connections: the
    ring is a mapped file, so shipping writes little else)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_percent(t0: int | None, t1: int | None, seconds: float) -> float | None:
    if t0 is None or t1 is None or seconds <= 0:
        return None
    return (t1 - t0) / CLK_TCK / seconds * 100.0


def cpu_seconds_per_gib(t0: int | None, t1: int | None, data_bytes: int) -> float | None:
    """CPU seconds (clock ticks t1 - t0) per GiB of change data."""
    if t0 is None or t1 is None or data_bytes <= 0:
        return None
    return (t1 - t0) / CLK_TCK / (data_bytes / GIB)


def cmd_cycle(args) -> int:
    blkrep, group = args.blkrep, args.group
    status_cmd = [blkrep, "status", "--config", str(args.primary_config), "--json"]

    before = run_json(status_cmd, 30)
    c0 = consumer(before, group)
    primary_pid = int(before["pid"])
    p_cpu0, r_cpu0, wchar0 = cpu_ticks(primary_pid), cpu_ticks(args.replica_pid), \
        write_chars(primary_pid)

    t0 = time.time()
    cycle = close_cycle(blkrep, args.primary_config, group, args.timeout)
    t1 = time.time()
    p_cpu1, r_cpu1, wchar1 = cpu_ticks(primary_pid), cpu_ticks(args.replica_pid), \
        write_chars(primary_pid)
    after = run_json(status_cmd, 30)
    c1 = consumer(after, group)

    # Until the replica has applied it; the log line's time is the precise one.
    t2 = wait_applied(blkrep, args.replica_config, group, cycle, args.timeout)
    r_cpu2 = cpu_ticks(args.replica_pid)

    # The replica may log the apply a moment after its status shows it.
    log_deadline = time.time() + 10
    while True:
        events = log_events(args.replica_log)
        applied = [ts for ts, f in events if f.get("message") == "Transfer applied"
                   and re.match(rf"Delta {{ cycle: {cycle}[ ,]", str(f.get("kind")))]
        if applied:
            break
        if time.time() > log_deadline:
            raise BenchError(f"no 'Transfer applied' line for cycle {cycle} in "
                             f"{args.replica_log}")
        time.sleep(0.05)
    t_applied = applied[-1]
    # The last control connection before the apply ended is the commit request: an
    # upper bound of the apply time (the replica makes the transfer durable first).
    connects = [ts for ts, f in events if f.get("message", "").startswith("Primary connected")
                and t0 <= ts <= t_applied]

    data_bytes = int(c1.get("bytes_delivered", 0)) - int(c0.get("bytes_delivered", 0))
    network_bytes = int(c1.get("network_bytes", 0)) - int(c0.get("network_bytes", 0))
    ship_s = t1 - t0
    apply_s = t_applied - t1
    out = {
        "kind": args.kind,
        "run": args.run,
        "cycle": cycle,
        "written_bytes": args.size,
        "data_bytes": data_bytes,
        "cycle_bytes": int(c1.get("last_cycle_bytes", 0)),
        "network_bytes": network_bytes,
        "network_ratio": network_bytes / data_bytes if data_bytes else None,
        "primary_write_bytes": None if wchar0 is None or wchar1 is None else wchar1 - wchar0,
        "ship_s": ship_s,
        "ship_mibps": data_bytes / MIB / ship_s if ship_s > 0 else None,
        "shipper_duration_s": (c1.get("last_duration_ms") or 0) / 1000.0,
        "apply_s": apply_s,
        "apply_mibps": data_bytes / MIB / apply_s if apply_s > 0 else None,
        "commit_to_applied_s": (t_applied - connects[-1]) if connects else None,
        "close_to_applied_s": t_applied - t0,
        "apply_seen_by_poll_s": t2 - t1,
        "primary_cpu_ship_pct": cpu_percent(p_cpu0, p_cpu1, ship_s),
        "replica_cpu_ship_pct": cpu_percent(r_cpu0, r_cpu1, ship_s),
        "replica_cpu_apply_pct": cpu_percent(r_cpu1, r_cpu2, t2 - t1),
        "primary_cpu_s_per_gib": cpu_seconds_per_gib(p_cpu0, p_cpu1, data_bytes),
        "replica_cpu_receive_s_per_gib": cpu_seconds_per_gib(r_cpu0, r_cpu1, data_bytes),
        "replica_cpu_apply_s_per_gib": cpu_seconds_per_gib(r_cpu1, r_cpu2, data_bytes),
        "consumer_failures": int(c1.get("failures", 0)) - int(c0.get("failures", 0)),
        "t_close_start": t0,
        "t_close_return": t1,
        "t_applied": t_applied,
    }
    if args.fio_json:
        try:
            fio = bench_report.load_fio_json(args.fio_json)
            out["fio_write_mibps"] = fio["jobs"][0]["write"]["bw_bytes"] / MIB
        except (bench_report.ReportError, OSError, KeyError, IndexError):
            out["fio_write_mibps"] = None
    if data_bytes < args.size:
        raise BenchError(f"cycle {cycle} carried {data_bytes} bytes of changes, fewer than the "
                         f"{args.size} written: {json.dumps(c1)}")
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    who = f" [{args.label}]" if args.label else ""
    print(f"bench-replication: {args.kind}{who} run {args.run}: cycle {cycle} "
          f"{data_bytes / MIB:,.0f} MiB shipped in {ship_s:.2f} s "
          f"({out['ship_mibps']:,.1f} MiB/s, network/data {out['network_ratio']:.3f}), "
          f"applied {apply_s:.2f} s later ({out['apply_mibps']:,.1f} MiB/s)", file=sys.stderr)
    return 0


# ---- report -----------------------------------------------------------------

# key, column, format
COLUMNS = [
    ("data_bytes", "MiB per cycle", lambda v: f"{v / MIB:,.0f}"),
    ("network_ratio", "network / data", lambda v: f"{v:.3f}"),
    ("tls_ratio", "TLS / data", lambda v: f"{v:.3f}"),
    ("ship_s", "ship s", lambda v: f"{v:.2f}"),
    ("ship_mibps", "**ship MiB/s**", lambda v: f"**{v:,.1f}**"),
    ("apply_s", "apply s", lambda v: f"{v:.2f}"),
    ("apply_mibps", "**apply MiB/s**", lambda v: f"**{v:,.1f}**"),
    ("close_to_applied_s", "close → applied s", lambda v: f"{v:.2f}"),
    ("end_to_end_mibps", "close → applied MiB/s", lambda v: f"{v:,.1f}"),
]
CPU_COLUMNS = [
    ("primary_cpu_ship_pct", "primary CPU % (ship)", lambda v: f"{v:.0f}"),
    ("primary_cpu_s_per_gib", "**primary CPU s/GiB**", lambda v: f"**{v:.2f}**"),
    ("replica_cpu_ship_pct", "replica CPU % (receive)", lambda v: f"{v:.0f}"),
    ("replica_cpu_receive_s_per_gib", "replica CPU s/GiB (receive)", lambda v: f"{v:.2f}"),
    ("replica_cpu_apply_pct", "replica CPU % (apply)", lambda v: f"{v:.0f}"),
    ("replica_cpu_apply_s_per_gib", "**replica CPU s/GiB (apply)**", lambda v: f"**{v:.2f}**"),
]
EXTRA = ["cycle_bytes", "shipper_duration_s", "commit_to_applied_s", "apply_seen_by_poll_s",
         "fio_write_mibps", "network_bytes", "primary_write_bytes", "consumer_failures"]
# Rates compared between the scattered and the sequential cycle: (key, what).
SCATTER_RATES = [("ship_mibps", "ship"), ("apply_mibps", "apply"),
                 ("end_to_end_mibps", "close → applied")]
# What a later binary is compared with the first one on: (key, what, higher is better).
BINARY_COMPARISON = [("ship_mibps", "ship MiB/s", True), ("apply_mibps", "apply MiB/s", True),
                     ("end_to_end_mibps", "close → applied MiB/s", True),
                     ("primary_cpu_s_per_gib", "primary CPU s/GiB", False),
                     ("replica_cpu_apply_s_per_gib", "replica CPU s/GiB (apply)", False)]
RPO_JOB = "steady4k-refill"


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def spread(runs: list[dict], key: str, digits: int = 1) -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    if len(vals) < 2:
        return "—"
    med = statistics.median(vals)
    return f"{min(vals):,.{digits}f}–{max(vals):,.{digits}f} " \
        f"({(max(vals) - min(vals)) / med * 100:.0f}%)" if med else "—"


def quotient(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def load_shipping(runs_dir: Path, kinds: list[str], label: str) -> dict:
    """shipping[kind] = {"label", "runs", "median"} of one binary's runs."""
    shipping = {}
    for kind in kinds:
        d = runs_dir / (label or "default")
        files = sorted(d.glob(f"{kind}-run*.json"), key=lambda p: int(p.stem.rpartition("run")[2]))
        if not files:
            raise BenchError(f"no runs of {kind} in {d}")
        runs = [json.loads(f.read_text()) for f in files]
        for r in runs:
            pw = r.get("primary_write_bytes")
            r["tls_ratio"] = pw / r["data_bytes"] if pw is not None and r["data_bytes"] else None
            r["end_to_end_mibps"] = quotient(r["data_bytes"] / MIB, r.get("close_to_applied_s"))
        keys = [c[0] for c in COLUMNS + CPU_COLUMNS] + EXTRA
        shipping[kind] = {"label": KINDS[kind][0], "runs": runs,
                          "median": {k: median_of(runs, k) for k in keys}}
    return shipping


def shipping_targets(shipping: dict, title: str) -> list[str]:
    """Issue 14's goals for one binary's shipping, apply and CPU (PASS/MISS)."""
    lines = []

    def med(kind: str, key: str) -> float | None:
        return shipping[kind]["median"][key] if kind in shipping else None

    def check(desc: str, v: float | None, ok, limit: str) -> None:
        if v is not None:
            lines.append(f"- {verdict(ok(v))} {title}{desc}: {v:,.2f} {limit}")

    check("incompressible ship MiB/s", med("random", "ship_mibps"), lambda v: v >= 500, "≥ 500")
    # The compressible goal is judged on the default codec (kind `compressible`).
    check("compressible ship MiB/s (default codec)", med("compressible", "ship_mibps"),
          lambda v: v >= 400, "≥ 400")
    check("compressible network / data (default codec)", med("compressible", "network_ratio"),
          lambda v: v <= 0.55, "≤ 0.55")
    check("apply MiB/s, no point kept (incompressible)",
          med("random", "apply_mibps"), lambda v: v >= 1024, "≥ 1024")
    check("apply MiB/s, a point kept (incompressible)",
          med("random-point", "apply_mibps"), lambda v: v >= 500, "≥ 500")
    check("primary CPU s/GiB, compression off", med("random-raw", "primary_cpu_s_per_gib"),
          lambda v: v <= 1.0, "≤ 1.00")
    seq, sca = med(SEQUENTIAL_OF_SCATTERED, "end_to_end_mibps"), med("scattered", "end_to_end_mibps")
    r = quotient(sca, seq)
    if r is not None:
        lines.append(f"- {verdict(r >= 0.7)} {title}scattered / sequential close → applied "
                     f"rate: {r:.2f}× ≥ 0.70×")
    return lines


def shipping_section(args, kinds: list[str], binaries: list[tuple[str, str]],
                     shipping: dict) -> list[str]:
    labelled = any(lab for lab, _ in binaries)
    bin_head, bin_align = ("blkrep | ", "---|") if labelled else ("", "")
    out = ["### Shipping one cycle over loopback HTTPS (mutual TLS), and applying it", ""]
    out.append(
        f"Each run starts a `blkrep replica run` daemon and a `blkrep primary` afresh (new "
        f"ring, new replica; certificates from `blkrep cert`; the consumer's default "
        f"compression unless noted; `interval = \"1h\"` so that only the benchmark closes "
        f"cycles) on a {args.size_label} image (4 times that for the scattered kind) written in "
        f"full beforehand (fio, sequential, fio's buffers), lets the initial replication copy "
        f"it and the replica apply it, so the measured cycle overwrites allocated blocks on "
        f"both sides as in a VM's disk; then it writes {args.size_label} of unique blocks through NBD (fio, 1M sequential "
        f"writes, QD8, unless noted), runs `sync` so no writeback of those writes competes, then "
        f"times `blkrep cycles close` (close, read the ring, chunk, compress, send, replica "
        f"stores it durably, commit, acknowledgement) and waits until `blkrep replica status` "
        f"shows it applied. After each run the replica's disk is compared with the image (`cmp`).")
    out.append("")
    out.append("Data kinds: " + "; ".join(
        f"**{KINDS[k][0]}** = {KINDS[k][1].format(pct=args.compress_pct)}" for k in kinds) + ".")
    out.append("")
    if labelled:
        out.append("blkrep binaries, taking turns on every data kind: " + "; ".join(
            f"**{lab}** = `{path}`" for lab, path in binaries) + ".")
        out.append("")

    def table(columns) -> None:
        out.append("| data | " + bin_head + " | ".join(c[1] for c in columns) + " |")
        out.append("|---|" + bin_align + "---:|" * len(columns))
        for kind in kinds:
            for lab, _ in binaries:
                med = shipping[lab][kind]["median"]
                cells = [KINDS[kind][0]] + ([lab] if labelled else []) + \
                    ["—" if med[k] is None else fmt(med[k]) for k, _, fmt in columns]
                out.append("| " + " | ".join(cells) + " |")

    table(COLUMNS)
    out.append("")
    out.append(
        "Columns: MiB per cycle = change bytes the cycle delivered (`bytes_delivered` in "
        "`blkrep status --json`); **network / data** = the compression ratio, compressed "
        "chunk bytes sent (`network_bytes`, also `blkrep_replication_network_bytes_total`) "
        "over change bytes; TLS / data = bytes the primary passed to write() while the cycle "
        "shipped (`/proc/PID/io` wchar: TLS records, HTTP and control requests) over change "
        "bytes; ship s = wall time of `blkrep cycles close`, which returns once the replica "
        "has stored the cycle durably and the primary has freed its ring space; apply s = "
        "from then until the replica's log line `Transfer applied` for that cycle (the apply "
        "starts when the replica commits, a few ms before the primary's acknowledgement, so "
        "this slightly understates it); close → applied = the whole way (the RPO cost of one "
        "such cycle), and the change bytes over it. MiB = 2^20 bytes.")
    out.append("")
    out.append("CPU of both daemons (user+system, all threads, from `/proc/PID/stat`), while the "
               "cycle shipped (`cycles close`) and while the replica applied it (until the "
               "status poll saw it applied); % of one core, and seconds per GiB of change "
               "bytes (one core busy for a second per GiB = 1.00):")
    out.append("")
    table(CPU_COLUMNS)
    if args.runs > 1:
        out.append("")
        out.append("Run-to-run spread, min–max ((max − min) / median):")
        out.append("")
        out.append("| data | " + bin_head + "ship MiB/s | apply MiB/s | network / data |")
        out.append("|---|" + bin_align + "---:|---:|---:|")
        for kind in kinds:
            for lab, _ in binaries:
                runs = shipping[lab][kind]["runs"]
                out.append(f"| {KINDS[kind][0]} | " + (f"{lab} | " if labelled else "") +
                           f"{spread(runs, 'ship_mibps')} | {spread(runs, 'apply_mibps')} | "
                           f"{spread(runs, 'network_ratio', 3)} |")
    if "scattered" in kinds and SEQUENTIAL_OF_SCATTERED in kinds:
        out.append("")
        out.append(f"Scattered 4 KiB changes against the sequential cycle of the same size and "
                   f"data ({KINDS[SEQUENTIAL_OF_SCATTERED][0]}), rates in MiB/s (goal: "
                   f"≥ 0.70× the whole way):")
        out.append("")
        out.append("| " + bin_head + "rate | sequential | scattered | scattered / sequential |")
        out.append("|" + bin_align + "---|---:|---:|---:|")
        for lab, _ in binaries:
            seq = shipping[lab][SEQUENTIAL_OF_SCATTERED]["median"]
            sca = shipping[lab]["scattered"]["median"]
            for key, what in SCATTER_RATES:
                a, b = sca[key], seq[key]
                out.append("| " + (f"{lab} | " if labelled else "") +
                           f"{what} | {'—' if b is None else f'{b:,.1f}'} | "
                           f"{'—' if a is None else f'{a:,.1f}'} | {bench_report.fmt_ratio(quotient(a, b))} |")
    if len(binaries) > 1:
        first = binaries[0][0]
        out.append("")
        out.append(f"Each binary against **{first}** (ratios of medians; above 1 is better for "
                   "MiB/s, below 1 for CPU s/GiB):")
        out.append("")
        out.append("| data | blkrep | " + " | ".join(w for _, w, _ in BINARY_COMPARISON) + " |")
        out.append("|---|---|" + "---:|" * len(BINARY_COMPARISON))
        for kind in kinds:
            for lab, _ in binaries[1:]:
                cells = [KINDS[kind][0], f"{lab}/{first}"] + [
                    bench_report.fmt_ratio(quotient(shipping[lab][kind]["median"][k],
                                       shipping[first][kind]["median"][k]))
                    for k, _, _ in BINARY_COMPARISON]
                out.append("| " + " | ".join(cells) + " |")
    failures = sum(r.get("consumer_failures") or 0 for lab, _ in binaries for k in kinds
                   for r in shipping[lab][k]["runs"])
    if failures:
        out.append("")
        out.append(f"- WARNING: the consumer failed {failures} time(s) during measured cycles "
                   "(retries are included in the ship times)")
    out.append("")
    out.append("Targets of issue 14 (informational: the script never fails on numbers):")
    out.append("")
    for lab, _ in binaries:
        out.extend(shipping_targets(shipping[lab], f"[{lab}] " if lab else ""))
    out.append("")
    return out


def rpo_section(args, rpo: dict) -> tuple[list[str], dict]:
    """The achieved-RPO scenario from scripts/bench-fio.sh's JSON: lag p50/p99/max
    per binary (medians over runs), with the goals."""
    job = (rpo.get("jobs") or {}).get(RPO_JOB)
    if not job:
        raise BenchError(f"no {RPO_JOB} job in the achieved-RPO results")
    out = ["### Achieved RPO under steady incompressible churn", ""]
    out.append(
        f"`scripts/bench-fio.sh --servers replicated --jobs {RPO_JOB} --rate-4k "
        f"{args.rpo_rate} --runtime {args.rpo_runtime} --ramp 2 --replica-interval 1s`: fio "
        f"4 KiB random writes (QD32) of fresh random data (`refill_buffers`) at "
        f"{args.rpo_rate} MB/s for {args.rpo_runtime} s through a primary replicating every "
        f"1 s to a replica daemon on loopback, after the initial replication. The lag (now "
        f"minus the close time of the newest cycle the replica holds) is sampled from `blkrep "
        f"status --json` 10 times a second, the 2 s ramp excluded; medians over "
        f"{args.runs} run(s). Goals: p99 ≤ 2 s, max ≤ 3 s.")
    out.append("")
    out.append("| blkrep | IOPS | MB/s | lag p50 ms | **lag p99 ms** | **lag max ms** | "
               "samples (missed) | lag from | applied lag p50 / p99 / max ms | drain s |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    summary, targets = {}, []
    for col, e in (job.get("servers") or {}).items():
        if not e:
            continue
        _, _, lab = col.partition("@")
        m = e["median"]
        lags = [r["lag"] for r in e["runs"] if r.get("lag")]
        samples = sum(x["samples"] for x in lags)
        missed = sum(x["missed"] for x in lags)
        source = ",".join(sorted(bench_report.lag_sources(e))) or "—"
        num = {key: bench_report.fmt_metric(key, m[key]) for key in
               ("lag_p50", "lag_p99", "lag_max", "alag_p50", "alag_p99", "alag_max", "drain_s")}
        out.append(f"| {lab or 'blkrep'} | {m['iops']:,.0f} | {m['mbps']:,.1f} | "
                   f"{num['lag_p50']} | **{num['lag_p99']}** | **{num['lag_max']}** | "
                   f"{samples} ({missed}) | {source} | {num['alag_p50']} / "
                   f"{num['alag_p99']} / {num['alag_max']} | {num['drain_s']} |")
        summary[lab or "blkrep"] = {"lag_p50_ms": m["lag_p50"], "lag_p99_ms": m["lag_p99"],
                                    "lag_max_ms": m["lag_max"], "source": source,
                                    "applied_lag_p50_ms": m["alag_p50"],
                                    "applied_lag_p99_ms": m["alag_p99"],
                                    "applied_lag_max_ms": m["alag_max"],
                                    "iops": m["iops"], "runs": [r.get("lag") for r in e["runs"]]}
        title = f"[{lab}] " if lab else ""
        p99, worst, which = bench_report.rpo_figures(e)
        if p99 is not None:
            targets.append(f"- {verdict(p99 <= 2000)} {title}achieved RPO p99, {which}: "
                           f"{p99:,.0f} ms ≤ 2,000 ms")
            targets.append(f"- {verdict(worst <= 3000)} {title}achieved RPO max, {which}: "
                           f"{worst:,.0f} ms ≤ 3,000 ms")
    out.append("")
    out.append("`lag from` names the status field: `lag_ms` (milliseconds), or `lag_secs` "
               "(whole seconds, so every figure is a multiple of 1,000 ms) from a blkrep "
               "without `lag_ms`. samples (missed) = samples kept, and those where `blkrep "
               "status` did not answer in time. applied lag = the replica's own lag over the "
               "same window, 10 times a second: now minus the close time of the newest cycle "
               "it had applied, from its log (`Transfer applied`, `closed_unix_ms`), exact to "
               "the millisecond with any blkrep, and stricter than the status lag (applied, "
               "not only stored). The goals are checked on the status lag when it is `lag_ms`, "
               "else on the applied lag.")
    out.append("")
    out.extend(targets)
    out.append("")
    return out, summary


def cmd_report(args) -> int:
    kinds = [k for k in args.kinds.split(",") if k]
    binaries = []
    for item in args.blkrep:
        label, _, path = item.partition("=")
        binaries.append((label, path))
    if not binaries:
        raise BenchError("no --blkrep")
    shipping = {lab: load_shipping(args.runs_dir, kinds, lab) for lab, _ in binaries}

    info_args = argparse.Namespace(image_dir=str(args.work_dir), load_start=args.load_start,
                                   blkrep=binaries)
    machine = bench_report.machine_info(info_args)
    out: list[str] = []
    out.append("## Replication benchmark: shipping, compression, apply, write path under "
               "replication, achieved RPO")
    out.append("")
    out.append("| machine | |")
    out.append("|---|---|")
    for k, v in machine:
        out.append(f"| {k} | {v.replace('|', '/')} |")
    out.append("")
    mode = " (--short smoke run: numbers are indicative only)" if args.short else ""
    out.append(
        f"Settings{mode}: {args.runs} run(s) per data kind, medians shown; command "
        f"`{args.command}`.")
    out.append("")
    if kinds:
        out.extend(shipping_section(args, kinds, binaries, shipping))

    write_path = rpo = None
    if args.write_path_md:
        out.append(args.write_path_md.read_text().rstrip())
        out.append("")
    if args.write_path_json:
        write_path = json.loads(args.write_path_json.read_text())
    if args.rpo_json:
        rpo_lines, rpo = rpo_section(args, json.loads(args.rpo_json.read_text()))
        out.extend(rpo_lines)

    text = "\n".join(out)
    sys.stdout.write(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"bench-replication: report written to {args.out}", file=sys.stderr)
    if args.json:
        doc = {
            "settings": {"runs": args.runs, "size_bytes": args.size, "kinds": kinds,
                         "compress_percentage": args.compress_pct, "short": args.short,
                         "binaries": dict(binaries), "command": args.command},
            "machine": dict(machine),
            # Per binary label ("blkrep" for the only, unlabelled one), then data kind.
            "shipping": {lab or "blkrep": {k: {"label": v["label"], "median": v["median"],
                                               "runs": v["runs"]}
                                           for k, v in by_kind.items()}
                         for lab, by_kind in shipping.items()},
            "write_path": write_path,
            "achieved_rpo": rpo,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"bench-replication: JSON written to {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command_name", required=True)

    c = sub.add_parser("cycle", help="measure one cycle")
    c.add_argument("--blkrep", required=True)
    c.add_argument("--primary-config", required=True, type=Path)
    c.add_argument("--replica-config", required=True, type=Path)
    c.add_argument("--replica-log", required=True, type=Path)
    c.add_argument("--replica-pid", required=True, type=int)
    c.add_argument("--group", required=True)
    c.add_argument("--kind", required=True, choices=sorted(KINDS))
    c.add_argument("--run", required=True, type=int)
    c.add_argument("--label", default="", help="the blkrep binary's label, for the log")
    c.add_argument("--size", required=True, type=int, help="bytes written")
    c.add_argument("--fio-json", type=Path)
    c.add_argument("--timeout", type=int, default=900)
    c.add_argument("--out", required=True, type=Path)

    r = sub.add_parser("report", help="the report")
    r.add_argument("--runs-dir", required=True, type=Path)
    r.add_argument("--kinds", required=True)
    r.add_argument("--runs", required=True, type=int)
    r.add_argument("--size", required=True, type=int)
    r.add_argument("--size-label", required=True)
    r.add_argument("--compress-pct", required=True)
    r.add_argument("--work-dir", required=True, type=Path)
    r.add_argument("--blkrep", action="append", default=[],
                   help="LABEL=PATH of each blkrep binary (LABEL empty when only one)")
    r.add_argument("--load-start", default="?")
    r.add_argument("--command", required=True)
    r.add_argument("--write-path-md", type=Path)
    r.add_argument("--write-path-json", type=Path)
    r.add_argument("--rpo-json", type=Path, help="scripts/bench-fio.sh --json of the RPO run")
    r.add_argument("--rpo-rate", default="50")
    r.add_argument("--rpo-runtime", default="60")
    r.add_argument("--short", action="store_true")
    r.add_argument("--out", type=Path)
    r.add_argument("--json", type=Path)

    args = ap.parse_args(argv)
    try:
        return cmd_cycle(args) if args.command_name == "cycle" else cmd_report(args)
    except (ProbeError, OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        print(f"bench_replication_report: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

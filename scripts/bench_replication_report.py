#!/usr/bin/env python3
"""Helper of scripts/bench-replication.sh: measures one replicated cycle, and turns
the measurements into a Markdown report and a JSON file. Standard library only.

  cycle   closes a cycle on a running primary (`blkrep cycles close`), times its
          shipping to the replica server, waits until the replica has applied it
          (`blkrep replica status --json`), reads the apply time from the replica's
          JSON log, and writes one run's numbers as JSON.
  report  medians over the runs of every data kind, plus the write-path report of
          scripts/bench-fio.sh (its --embed Markdown and --json), into --out and
          --json.

Exit status: 0 on success; 1 on an error (a command failing, a timeout, malformed
input), never on the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402  (the fio report's machine table, shared)

MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

# kind: (label, how the data is made)
KINDS = {
    "random": ("incompressible", "fio `refill_buffers` (fresh pseudo-random data per write)"),
    "compressible": ("compressible", "fio `refill_buffers`, `buffer_compress_percentage={pct}`, "
                                     "`buffer_compress_chunk=4k`"),
    "random-raw": ("incompressible, compression off",
                   "as incompressible, with `compression = false` in the consumer"),
}


class BenchError(Exception):
    pass


# ---- cycle ------------------------------------------------------------------

def run_json(argv: list[str], timeout: float) -> object:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from e
    if p.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise BenchError(f"{' '.join(argv)}: not JSON: {p.stdout[:200]!r}") from e


def consumer(status: dict, group: str) -> dict:
    for g in status.get("groups") or []:
        if g.get("name") == group:
            return g.get("consumer") or {}
    raise BenchError(f"no group {group!r} in blkrep status")


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of every thread of `pid`, in clock ticks."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


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


def parse_ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def log_events(path: Path) -> list[tuple[float, dict]]:
    """(unix time, fields) of every JSON line of a daemon's log."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise BenchError(f"cannot read {path}: {e}") from e
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
            out.append((parse_ts(doc["timestamp"]), doc.get("fields") or {}))
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
    return out


def cmd_cycle(args) -> int:
    blkrep, group = args.blkrep, args.group
    status_cmd = [blkrep, "status", "--config", str(args.primary_config), "--json"]
    replica_cmd = [blkrep, "replica", "status", "--config", str(args.replica_config), "--json"]

    before = run_json(status_cmd, 30)
    c0 = consumer(before, group)
    primary_pid = int(before["pid"])
    p_cpu0, r_cpu0, wchar0 = cpu_ticks(primary_pid), cpu_ticks(args.replica_pid), \
        write_chars(primary_pid)

    t0 = time.time()
    answer = run_json([blkrep, "cycles", "close", "--config", str(args.primary_config),
                       "--group", group, "--timeout", f"{args.timeout}s"], args.timeout + 15)
    t1 = time.time()
    p_cpu1, r_cpu1, wchar1 = cpu_ticks(primary_pid), cpu_ticks(args.replica_pid), \
        write_chars(primary_pid)
    cycle = int(answer["cycle"])
    after = run_json(status_cmd, 30)
    c1 = consumer(after, group)

    # Until the replica has applied it; the log line's time is the precise one.
    deadline = t1 + args.timeout
    while True:
        replicas = run_json(replica_cmd, 30)
        r = next((x for x in replicas if x.get("name") == group), None)
        if r and r.get("last_applied_cycle") is not None and \
                r["last_applied_cycle"] >= cycle and r.get("pending_transfers") == 0:
            break
        if time.time() > deadline:
            raise BenchError(f"the replica did not apply cycle {cycle} within {args.timeout} s: {r}")
        time.sleep(0.05)
    t2 = time.time()
    r_cpu2 = cpu_ticks(args.replica_pid)

    events = log_events(args.replica_log)
    applied = [ts for ts, f in events if f.get("message") == "Transfer applied"
               and re.match(rf"Delta {{ cycle: {cycle}[ ,]", str(f.get("kind")))]
    if not applied:
        raise BenchError(f"no 'Transfer applied' line for cycle {cycle} in {args.replica_log}")
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
    print(f"bench-replication: {args.kind} run {args.run}: cycle {cycle} "
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
    ("primary_cpu_ship_pct", "primary CPU % (ship)", lambda v: f"{v:.0f}"),
    ("replica_cpu_ship_pct", "replica CPU % (ship)", lambda v: f"{v:.0f}"),
    ("replica_cpu_apply_pct", "replica CPU % (apply)", lambda v: f"{v:.0f}"),
]
EXTRA = ["cycle_bytes", "shipper_duration_s", "commit_to_applied_s", "apply_seen_by_poll_s",
         "fio_write_mibps", "network_bytes", "primary_write_bytes", "consumer_failures"]


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


def cmd_report(args) -> int:
    kinds = [k for k in args.kinds.split(",") if k]
    shipping: dict = {}
    for kind in kinds:
        files = sorted(args.runs_dir.glob(f"{kind}-run*.json"),
                       key=lambda p: int(p.stem.rpartition("run")[2]))
        if not files:
            raise BenchError(f"no runs of {kind} in {args.runs_dir}")
        runs = [json.loads(f.read_text()) for f in files]
        for r in runs:
            pw = r.get("primary_write_bytes")
            r["tls_ratio"] = pw / r["data_bytes"] if pw is not None and r["data_bytes"] else None
        keys = [c[0] for c in COLUMNS] + EXTRA
        shipping[kind] = {"label": KINDS[kind][0], "runs": runs,
                          "median": {k: median_of(runs, k) for k in keys}}

    info_args = argparse.Namespace(image_dir=str(args.work_dir), load_start=args.load_start,
                                   blkrep=args.blkrep)
    machine = bench_report.machine_info(info_args)
    out: list[str] = []
    out.append("## Replication benchmark: shipping, compression, apply, write path under "
               "replication")
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
        out.append(
            "### Shipping one cycle over loopback HTTPS (mutual TLS), and applying it")
        out.append("")
        out.append(
            f"Each run starts a `blkrep replica run` daemon and a `blkrep primary` afresh (new "
            f"ring, new replica; certificates from `blkrep cert`; DEFLATE level 1 unless noted; "
            f"`interval = \"1h\"` so that only the benchmark closes cycles) on a sparse "
            f"{args.size_label} image, lets the (empty) initial replication finish, writes "
            f"{args.size_label} of unique blocks through NBD (fio, 1M sequential writes, QD8), "
            f"runs `sync` so no writeback of those writes competes, then times `blkrep cycles "
            f"close` (close, read the ring, chunk, compress, send, replica stores it durably, "
            f"commit, acknowledgement) and waits until `blkrep replica status` shows it applied. "
            f"After each run the replica's disk is compared with the image (`cmp`).")
        out.append("")
        out.append("Data kinds: " + "; ".join(
            f"**{KINDS[k][0]}** = {KINDS[k][1].format(pct=args.compress_pct)}" for k in kinds) + ".")
        out.append("")
        out.append("| data | " + " | ".join(c[1] for c in COLUMNS) + " |")
        out.append("|---|" + "---:|" * len(COLUMNS))
        for kind in kinds:
            med = shipping[kind]["median"]
            cells = [KINDS[kind][0]] + ["—" if med[k] is None else fmt(med[k])
                                        for k, _, fmt in COLUMNS]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        out.append(
            "Columns: MiB per cycle = change bytes the cycle delivered (`bytes_delivered` in "
            "`blkrep status --json`); **network / data** = the compression ratio, compressed "
            "chunk bytes sent (`network_bytes`, also `blkrep_replication_network_bytes_total`) "
            "over change bytes; TLS / data = bytes the primary passed to write() while the cycle "
            "shipped (`/proc/PID/io` wchar: TLS records, HTTP and control requests) over change "
            "bytes; ship s = wall time of `blkrep cycles close`, which returns once the replica "
            "has stored the cycle durably and the primary has freed its ring space; apply s = "
            "from then until the replica's log line `Transfer applied` for that cycle (no metric "
            "exposes the apply duration; the apply starts when the replica commits, a few ms "
            "before the primary's acknowledgement, so this slightly understates it); close → "
            "applied = the whole way (the RPO cost of one such cycle); CPU % = user+system time "
            "of the daemon, all threads, in % of one core, over the ship or apply interval (both "
            "daemons share the machine's cores with each other). MiB = 2^20 bytes.")
        if args.runs > 1:
            out.append("")
            out.append("Run-to-run spread, min–max ((max − min) / median):")
            out.append("")
            out.append("| data | ship MiB/s | apply MiB/s | network / data |")
            out.append("|---|---:|---:|---:|")
            for kind in kinds:
                runs = shipping[kind]["runs"]
                out.append(f"| {KINDS[kind][0]} | {spread(runs, 'ship_mibps')} | "
                           f"{spread(runs, 'apply_mibps')} | {spread(runs, 'network_ratio', 3)} |")
        failures = sum(r.get("consumer_failures") or 0 for k in kinds for r in shipping[k]["runs"])
        if failures:
            out.append("")
            out.append(f"- WARNING: the consumer failed {failures} time(s) during measured cycles "
                       "(retries are included in the ship times)")

        out.append("")

    write_path = None
    if args.write_path_md:
        out.append(args.write_path_md.read_text().rstrip())
        out.append("")
    if args.write_path_json:
        write_path = json.loads(args.write_path_json.read_text())

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
                         "command": args.command},
            "machine": dict(machine),
            "shipping": {k: {"label": v["label"], "median": v["median"], "runs": v["runs"]}
                         for k, v in shipping.items()},
            "write_path": write_path,
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
    r.add_argument("--blkrep", default="")
    r.add_argument("--load-start", default="?")
    r.add_argument("--command", required=True)
    r.add_argument("--write-path-md", type=Path)
    r.add_argument("--write-path-json", type=Path)
    r.add_argument("--short", action="store_true")
    r.add_argument("--out", type=Path)
    r.add_argument("--json", type=Path)

    args = ap.parse_args(argv)
    try:
        return cmd_cycle(args) if args.command_name == "cycle" else cmd_report(args)
    except (BenchError, OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        print(f"bench_replication_report: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

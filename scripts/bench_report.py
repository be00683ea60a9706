#!/usr/bin/env python3
"""Turn scripts/bench-fio.sh's fio JSON outputs into a Markdown report.

Reads RESULTS/<job>/<server>/run<N>.json (fio --output-format=json with
--percentile_list=50:99:99.9), takes the median of each metric over the runs,
computes blkrep/qemu-nbd and tracked/untracked ratios, checks the targets
(PASS/MISS, never failing), adds machine information, prints the report and
optionally writes it to --out. Standard library only.

Exit status: 0 with a report; 1 on missing or malformed fio output (an error,
not a performance verdict).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

JOBS = {
    # name: (label, fio direction)
    "randwrite4k": ("4k randwrite QD32", "write"),
    "randread4k": ("4k randread QD32", "read"),
    "randwrite64k": ("64k randwrite QD16", "write"),
    "seqwrite1m": ("1M seq write QD8", "write"),
    "seqwrite64k": ("64k seq write QD16", "write"),
}
SERVERS = {
    "qemu": "qemu-nbd",
    "untracked": "blkrep untracked",
    "tracked": "blkrep tracked",
    "replicated": "blkrep replicated",
}
# (numerator, denominator) server pairs shown as ratio columns.
RATIOS = [("untracked", "qemu"), ("tracked", "qemu"), ("tracked", "untracked"),
          ("replicated", "qemu"), ("replicated", "tracked")]
# metric key, row label, higher-is-better
METRICS = [
    ("iops", "IOPS", True),
    ("mbps", "MB/s", True),
    ("p50", "p50 µs", False),
    ("p99", "p99 µs", False),
    ("p999", "p99.9 µs", False),
    ("cpu", "server CPU %", False),
    # Only the replicated server has one (shown when some server has a value).
    ("rcpu", "replica CPU %", False),
]
PERCENTILES = {"p50": "50.000000", "p99": "99.000000", "p999": "99.900000"}


class ReportError(Exception):
    pass


def load_fio_json(path: Path) -> dict:
    text = path.read_text(errors="replace")
    # fio may print warnings ahead of the JSON document in its output file.
    start = text.find("{")
    if start < 0:
        raise ReportError(f"{path}: no JSON in fio output")
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: malformed fio JSON: {e}") from e


def server_cpu_percent(json_path: Path, which: str = "cpu") -> float | None:
    """CPU used by the server process (user+system, all threads) while fio ran,
    from the samples bench-fio.sh takes before and after fio, as % of one core.
    Includes fio's ramp. None if the samples are missing or unreadable.
    which="rcpu": the replicated server's replica daemon instead."""
    samples = []
    for suffix in (f".{which}0", f".{which}1"):
        try:
            line = Path(str(json_path) + suffix).read_text().strip()
            wall, _, stat = line.partition(" ")
            # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces.
            fields = stat.rpartition(")")[2].split()
            # fields[0] is field 3 (state); utime, stime are fields 14, 15.
            ticks = int(fields[11]) + int(fields[12])
            samples.append((float(wall), ticks))
        except (OSError, ValueError, IndexError):
            return None
    (w0, t0), (w1, t1) = samples
    if w1 <= w0:
        return None
    return (t1 - t0) / os.sysconf("SC_CLK_TCK") / (w1 - w0) * 100.0


def server_status(json_path: Path, suffix: str = ".status") -> dict | None:
    """Summary of `blkrep status --json` taken right after fio finished (suffix
    ".status0": right before fio started, replicated server only), summed over
    groups; None if there is no status file (qemu-nbd, or status failed)."""
    p = Path(str(json_path) + suffix)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    out = {"tracking": set(), "closed": 0, "delivered": 0, "bytes": 0,
           "records": 0, "failures": 0, "resyncs": 0, "resync_required": False,
           "last_error": None, "resync_reason": None, "network_bytes": 0}
    for g in doc.get("groups") or []:
        out["tracking"].add(str(g.get("tracking")))
        out["resync_required"] |= bool(g.get("resync_required"))
        if g.get("resync_reason"):
            out["resync_reason"] = str(g["resync_reason"])
        out["closed"] += int((g.get("cycle") or {}).get("last_closed") or 0)
        out["records"] += int((g.get("ring") or {}).get("records_logged") or 0)
        c = g.get("consumer") or {}
        out["delivered"] += int(c.get("cycles_delivered") or 0)
        out["bytes"] += int(c.get("bytes_delivered") or 0)
        out["network_bytes"] += int(c.get("network_bytes") or 0)
        out["failures"] += int(c.get("failures") or 0)
        out["resyncs"] += int(c.get("resyncs") or 0)
        if c.get("last_error"):
            out["last_error"] = str(c["last_error"])
    out["tracking"] = ",".join(sorted(out["tracking"])) or "?"
    return out


def replica_status(json_path: Path) -> dict | None:
    """The replicated server's replica right after fio finished (`blkrep replica
    status --json`); None if there is none."""
    try:
        doc = json.loads(Path(str(json_path) + ".replica").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for r in doc if isinstance(doc, list) else []:
        if r.get("name") == "bench":
            return {"last_applied_cycle": r.get("last_applied_cycle"),
                    "pending_transfers": int(r.get("pending_transfers") or 0),
                    "consistent": bool(r.get("consistent"))}
    return None


def parse_run(path: Path, direction: str) -> dict[str, float]:
    doc = load_fio_json(path)
    jobs = doc.get("jobs") or []
    if len(jobs) != 1:
        raise ReportError(f"{path}: expected 1 fio job, found {len(jobs)}")
    job = jobs[0]
    if job.get("error"):
        raise ReportError(f"{path}: fio job error {job['error']}")
    d = job.get(direction)
    if not d or not d.get("total_ios"):
        raise ReportError(f"{path}: no {direction} I/O recorded")
    pct = (d.get("clat_ns") or {}).get("percentile") or {}
    out = {"iops": float(d["iops"]), "mbps": float(d["bw_bytes"]) / 1e6}
    for key, name in PERCENTILES.items():
        if name not in pct:
            raise ReportError(f"{path}: clat_ns percentile {name} missing "
                              "(run fio with --percentile_list=50:99:99.9)")
        out[key] = float(pct[name]) / 1e3  # ns -> µs
    out["cpu"] = server_cpu_percent(path)
    out["rcpu"] = server_cpu_percent(path, "rcpu")
    out["status"] = server_status(path)
    out["status0"] = server_status(path, ".status0")
    out["replica"] = replica_status(path)
    return out


def collect(results: Path, jobs: list[str], servers: list[str],
            skipped: dict[str, str]) -> dict:
    """data[job][server] = {"runs": [per-run dicts], "median": {...}} or None."""
    data: dict = {}
    for job in jobs:
        _, direction = JOBS[job]
        data[job] = {}
        for srv in servers:
            d = results / job / srv
            files = sorted(d.glob("run*.json"), key=lambda p: int(p.stem[3:]))
            if not files:
                if srv in skipped:
                    data[job][srv] = None
                    continue
                raise ReportError(f"no fio results in {d}")
            runs = [parse_run(f, direction) for f in files]
            median = {}
            for k, _, _ in METRICS:
                vals = [r[k] for r in runs if r.get(k) is not None]
                median[k] = statistics.median(vals) if vals else None
            data[job][srv] = {"runs": runs, "median": median}
    return data


def cmd_first_line(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (p.stdout or p.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def load_now() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_info(args) -> list[tuple[str, str]]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count() or 0
    fstype = cmd_first_line(["findmnt", "-n", "-o", "FSTYPE", "--target", args.image_dir])
    repo = Path(__file__).resolve().parent.parent
    commit = cmd_first_line(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"])
    dirty = cmd_first_line(["git", "-C", str(repo), "status", "--porcelain",
                            "--untracked-files=no"])
    if commit != "?" and dirty not in ("?", ""):
        commit += " (work tree modified)"
    info = [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("kernel", platform.release()),
        ("CPU", cpu),
        ("nproc", str(ncpu)),
        ("memory", mem),
        ("load average (1/5/15 min) at start → end",
         f"{args.load_start} → {load_now()}"),
        ("image filesystem", f"{fstype} ({args.image_dir})"),
        ("fio", cmd_first_line(["fio", "--version"])),
        ("qemu-nbd", cmd_first_line(["qemu-nbd", "--version"])),
        ("blkrep commit", commit),
    ]
    if args.blkrep:
        try:
            mtime = datetime.datetime.fromtimestamp(
                os.stat(args.blkrep).st_mtime, datetime.timezone.utc)
            built = f" (modified {mtime:%Y-%m-%d %H:%M:%S} UTC)"
        except OSError:
            built = ""
        info.append(("blkrep binary", args.blkrep + built))
    return info


def fmt_metric(key: str, v: float | None) -> str:
    if v is None:
        return "—"
    if key == "iops":
        return f"{v:,.0f}"
    if key in ("mbps", "cpu"):
        return f"{v:,.1f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def ratio(data_job: dict, num: str, den: str, key: str) -> float | None:
    a, b = data_job.get(num), data_job.get(den)
    if not a or not b or a["median"][key] is None or not b["median"][key]:
        return None
    return a["median"][key] / b["median"][key]


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def targets(data: dict, jobs: list[str], servers: list[str]) -> list[str]:
    """PASS/MISS lines of the targets whose servers took part in the run."""
    lines = []

    def check(desc: str, r: float | None, op: str, limit: float,
              aim: float | None = None, pair: tuple[str, str] = ("tracked", "qemu")) -> None:
        if not all(s in servers for s in pair):
            return
        if r is None:
            lines.append(f"- SKIP {desc}: no data")
            return
        ok = r >= limit if op == ">=" else r <= limit
        sym = "≥" if op == ">=" else "≤"
        line = f"- {'PASS' if ok else 'MISS'} {desc}: {r:.2f}× {sym} {limit:.2f}×"
        if aim is not None:
            aim_ok = r >= aim if op == ">=" else r <= aim
            line += f" (aim {aim:.2f}×: {'PASS' if aim_ok else 'MISS'})"
        lines.append(line)

    for job in jobs:
        label = JOBS[job][0]
        d = data[job]
        check(f"{label}: tracked / qemu-nbd IOPS", ratio(d, "tracked", "qemu", "iops"),
              ">=", 1.0, 1.2 if job == "randwrite4k" else None)
    for job in jobs:
        label = JOBS[job][0]
        check(f"{label}: tracked / untracked IOPS",
              ratio(data[job], "tracked", "untracked", "iops"), ">=", 0.9,
              pair=("tracked", "untracked"))
    for job in jobs:
        label = JOBS[job][0]
        check(f"{label}: tracked / untracked p99.9 latency",
              ratio(data[job], "tracked", "untracked", "p999"), "<=", 1.2,
              pair=("tracked", "untracked"))
    for job in jobs:
        label = JOBS[job][0]
        check(f"{label}: replicated / qemu-nbd IOPS",
              ratio(data[job], "replicated", "qemu", "iops"), ">=", 1.0,
              1.2 if job == "randwrite4k" else None, pair=("replicated", "qemu"))
    return lines


def tracking_section(data: dict, jobs: list[str], servers: list[str], args) -> list[str]:
    """What the blkrep servers reported about tracking, per job (medians over
    runs), plus warnings when the tracked server did not do its work."""
    blk = [s for s in servers if s != "qemu"]
    rows, warnings = [], []
    for job in jobs:
        for srv in blk:
            e = data[job].get(srv)
            if not e:
                continue
            sts = [r["status"] for r in e["runs"] if r.get("status")]
            label = f"{JOBS[job][0]} | {SERVERS[srv]}"
            if not sts:
                rows.append(f"| {label} | no status | | | | | | |")
                continue

            def med(key: str) -> float:
                return statistics.median(st[key] for st in sts)

            modes = ",".join(sorted({st["tracking"] for st in sts}))
            fails = sum(st["failures"] for st in sts)
            resyncs = sum(st["resyncs"] for st in sts)
            pending = any(st["resync_required"] for st in sts)
            rows.append(f"| {label} | {modes} | {med('closed'):.0f} | {med('delivered'):.0f} | "
                        f"{med('bytes') / 1e6:,.0f} | {med('records'):,.0f} | {fails} | "
                        f"{resyncs}{' + pending' if pending else ''} |")
            if srv in ("tracked", "replicated"):
                # What the replicated server did before fio started (its initial
                # replication, and cycles of intervals that passed meanwhile) is not
                # fio's doing.
                before = [r.get("status0") or {} for r in e["runs"] if r.get("status")]
                delivered = [st["delivered"] - b.get("delivered", 0) for st, b in zip(sts, before)]
                resyncs = sum(st["resyncs"] - b.get("resyncs", 0) for st, b in zip(sts, before))
                if any(n <= 0 for n in delivered):
                    why = (" while fio ran (the shipper was still sending an earlier, larger "
                           "cycle, or the ring overflowed)") if srv == "replicated" else ""
                    warnings.append(f"- WARNING {JOBS[job][0]}: a {srv} run delivered no "
                                    f"cycle to the consumer{why}; its numbers are not of "
                                    f"{srv[:-2]}ing alone")
                if fails:
                    err = next((st["last_error"] for st in sts if st["last_error"]), "")
                    warnings.append(f"- WARNING {JOBS[job][0]}: the {srv} consumer failed "
                                    f"{fails} time(s){': ' + err if err else ''}")
                if resyncs or pending:
                    why = next((st["resync_reason"] for st in sts if st["resync_reason"]), "")
                    warnings.append(f"- NOTE {JOBS[job][0]}: the {srv} server fell back to "
                                    f"resync ({resyncs} done{', one pending' if pending else ''}"
                                    f"): {why or 'reason no longer reported (usually the ring filled up)'}"
                                    f"; ring {args.ring_size}, so this column includes resync work")
    if not rows:
        return []
    out = ["", "What blkrep reported at the end of each fio run (`blkrep status --json`; "
           f"medians over runs; counts include the {args.ramp} s ramp):", "",
           "| job | server | tracking | cycles closed | cycles delivered | MB delivered | "
           "records logged | consumer failures (sum) | resyncs (sum) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    out.extend(rows)
    if "replicated" in blk:
        out.append("")
        out.append("Counts of blkrep replicated include its initial replication of the whole "
                   "image (one resync and the cycles delivered meanwhile), shipped and applied "
                   "before fio started; the notes below count only what happened while fio ran.")
        out.extend(replica_section(data, jobs))
    if warnings:
        out.append("")
        out.extend(warnings)
    return out


def replica_section(data: dict, jobs: list[str]) -> list[str]:
    """The replicated server's shipping while fio ran (status after fio minus status
    before it), and its replica at the end (medians over runs)."""
    rows = []
    for job in jobs:
        e = data[job].get("replicated")
        if not e:
            continue
        runs = [r for r in e["runs"] if r.get("status") and r.get("status0")]
        if not runs:
            continue

        def med(key: str) -> float:
            return statistics.median(r["status"][key] - r["status0"][key] for r in runs)

        data_b, net_b = med("bytes"), med("network_bytes")
        reps = [r["replica"] for r in runs if r.get("replica")]
        applied = ("—" if not reps else
                   f"{statistics.median((x['last_applied_cycle'] or 0) for x in reps):.0f}")
        pending = ("—" if not reps else
                   f"{statistics.median(x['pending_transfers'] for x in reps):.0f}")
        ratio_s = f"{net_b / data_b:.3f}" if data_b else "—"
        rows.append(f"| {JOBS[job][0]} | {med('delivered'):.0f} | {data_b / 1e6:,.0f} | "
                    f"{net_b / 1e6:,.0f} | {ratio_s} | {applied} | {pending} |")
    if not rows:
        return []
    return ["", "blkrep replicated while fio ran (`blkrep status` after fio minus before it, "
            "medians over runs; MB sent = compressed chunk bytes, before TLS, resync copies "
            "included; MB delivered counts cycles' change bytes only), and its replica when "
            "fio ended:", "",
            "| job | cycles delivered | MB delivered | MB sent (network) | sent / delivered | "
            "replica's last applied cycle | replica's pending transfers |",
            "|---|---:|---:|---:|---:|---:|---:|"] + rows


def render(args, data: dict, jobs: list[str], servers: list[str],
           skipped: dict[str, str]) -> str:
    out: list[str] = []
    if args.embed:
        out.append("### fio write path: blkrep vs qemu-nbd")
        out.append("")
    else:
        out.append("## fio write-path benchmark: blkrep vs qemu-nbd")
        out.append("")
        out.append("| machine | |")
        out.append("|---|---|")
        for k, v in machine_info(args):
            out.append(f"| {k} | {v.replace('|', '/')} |")
        out.append("")
    mode = " (--short smoke run: numbers are indicative only)" if args.short else ""
    out.append(
        f"Settings{mode}: {args.runs} run(s) per job and server, medians shown; "
        f"{args.runtime} s measured after {args.ramp} s ramp; fio nbd engine over a unix "
        f"socket, numjobs=1; raw image {args.size} (fallocate, written once in full), "
        f"the same file for every server; servers started fresh for each run in the order "
        f"{', '.join(SERVERS[x] for x in args.servers.split(',') if x)}. MB/s = 10^6 bytes/s; latencies are fio completion "
        f"latency (clat) in µs; server CPU % is the server process's user+system time (all "
        f"threads) while fio ran, ramp included, in % of one core (the machine has "
        f"{len(os.sched_getaffinity(0))} cores, shared with fio).")
    out.append("")
    desc = {
        "qemu": "**qemu-nbd** = `qemu-nbd -t -f raw --cache=writeback --aio=io_uring`",
        "untracked": "**blkrep untracked** = `blkrep primary`, `tracking = false`",
        "tracked": f"**blkrep tracked** = `tracking = true`, `interval = \"1s\"`, ring "
                   f"{args.ring_size}, `discard` consumer",
        "replicated": f"**blkrep replicated** = `tracking = true`, `interval = "
                      f"\"{args.replica_interval}\"`, ring {args.ring_size}, `replica` consumer "
                      "shipping over HTTPS with mutual TLS (DEFLATE level 1) to a `blkrep replica "
                      "run` daemon on loopback, itself started fresh for each run (empty storage) "
                      "and sharing the machine's cores; fio starts after the initial replication "
                      "of the whole image has been shipped and applied",
    }
    out.append("Servers: " + "; ".join(desc[s] for s in servers) + ".")
    out.append("")
    for srv, why in sorted(skipped.items()):
        out.append(f"**{SERVERS[srv]} skipped:** {why}")
        out.append("")

    ratio_cols = [(a, b) for a, b in RATIOS if a in servers and b in servers]
    head = ["job", "metric"] + [SERVERS[s] for s in servers] + \
        [f"{a}/{'qemu' if b == 'qemu' else b}" for a, b in ratio_cols]
    out.append("| " + " | ".join(head) + " |")
    out.append("|---|---|" + "---:|" * (len(servers) + len(ratio_cols)))
    for job in jobs:
        label = JOBS[job][0]
        metrics = [m for m in METRICS if m[0] != "rcpu" or any(
            data[job].get(srv) and data[job][srv]["median"].get("rcpu") is not None
            for srv in servers)]
        for i, (key, mlabel, _) in enumerate(metrics):
            cells = [label if i == 0 else "", mlabel]
            for srv in servers:
                e = data[job].get(srv)
                cells.append(fmt_metric(key, e["median"][key] if e else None))
            for a, b in ratio_cols:
                cells.append(fmt_ratio(ratio(data[job], a, b, key)))
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("Ratios are of medians: above 1 is better for IOPS and MB/s, below 1 is "
               "better for latency and server CPU.")

    if args.runs > 1:
        out.append("")
        out.append("Run-to-run spread of IOPS, (max − min) / median over the runs:")
        out.append("")
        out.append("| job | " + " | ".join(SERVERS[s] for s in servers) + " |")
        out.append("|---|" + "---:|" * len(servers))
        for job in jobs:
            cells = [JOBS[job][0]]
            for srv in servers:
                e = data[job].get(srv)
                if not e:
                    cells.append("—")
                    continue
                v = [r["iops"] for r in e["runs"]]
                med = statistics.median(v)
                cells.append(f"{(max(v) - min(v)) / med * 100:.1f}% (n={len(v)})" if med else "—")
            out.append("| " + " | ".join(cells) + " |")

    out.extend(tracking_section(data, jobs, servers, args))
    out.append("")
    note = " (informational: --short never fails on numbers)" if args.short else \
        " (informational: the script never fails on numbers)"
    out.append(f"Targets{note}:")
    out.append("")
    out.extend(targets(data, jobs, servers))
    out.append("")
    return "\n".join(out)


def to_json(args, data: dict, jobs: list[str], servers: list[str],
            skipped: dict[str, str]) -> dict:
    """The report's numbers: per job and server the medians and every run, and the
    ratio columns."""
    def clean(run: dict) -> dict:
        return dict(run)
    out = {
        "settings": {"runs": args.runs, "runtime_s": args.runtime, "ramp_s": args.ramp,
                     "image_size": args.size, "ring_size": args.ring_size,
                     "replica_interval": args.replica_interval if "replicated" in servers
                     else None, "short": args.short},
        "machine": dict(machine_info(args)),
        "skipped": skipped,
        "jobs": {},
    }
    for job in jobs:
        j = {"label": JOBS[job][0], "servers": {}, "ratios": {}}
        for srv in servers:
            e = data[job].get(srv)
            j["servers"][srv] = None if not e else {
                "median": e["median"], "runs": [clean(r) for r in e["runs"]]}
        for a, b in RATIOS:
            if a in servers and b in servers:
                j["ratios"][f"{a}/{b}"] = {k: ratio(data[job], a, b, k) for k, _, _ in METRICS}
        out["jobs"][job] = j
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--jobs", required=True)
    ap.add_argument("--servers", required=True)
    ap.add_argument("--image-dir", required=True)
    ap.add_argument("--size", required=True)
    ap.add_argument("--runs", required=True, type=int)
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--ramp", required=True)
    ap.add_argument("--ring-size", default="?")
    ap.add_argument("--blkrep", default="")
    ap.add_argument("--load-start", default="?",
                    help="/proc/loadavg's first three fields when the benchmark started")
    ap.add_argument("--replica-interval", default="5s")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path,
                    help="also write medians, ratios and status summaries as JSON")
    ap.add_argument("--embed", action="store_true",
                    help="no machine table, a level-3 heading: for inclusion in another report")
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--skipped", action="append", default=[],
                    help="SERVER=REASON: a server whose column has no data, and why")
    args = ap.parse_args(argv)

    jobs = [j for j in args.jobs.split(",") if j]
    wanted = [s for s in args.servers.split(",") if s]
    for j in jobs:
        if j not in JOBS:
            ap.error(f"unknown job {j}")
    for s in wanted:
        if s not in SERVERS:
            ap.error(f"unknown server {s}")
    servers = [s for s in SERVERS if s in wanted]  # canonical column order
    skipped = {}
    for item in args.skipped:
        srv, _, why = item.partition("=")
        skipped[srv] = why or "skipped"

    try:
        data = collect(args.results, jobs, servers, skipped)
    except (ReportError, OSError) as e:
        print(f"bench_report: error: {e}", file=sys.stderr)
        return 1
    text = render(args, data, jobs, servers, skipped)
    sys.stdout.write(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"bench_report: report written to {args.out}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(args, data, jobs, servers, skipped),
                                        indent=2) + "\n")
        print(f"bench_report: JSON written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

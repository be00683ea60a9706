#!/usr/bin/env python3
"""Turn scripts/bench-fio.sh's fio JSON outputs into a Markdown report.

Reads RESULTS/<case>/<column>/run<N>.json (fio --output-format=json with
--percentile_list=50:99:99.9; FUA jobs: scripts/nbd_fua_bench.py's fio-like JSON
of the same fields), takes the median of each metric over the runs,
computes blkrep/qemu-nbd and tracked/untracked ratios, checks the targets
(PASS/MISS, never failing), adds machine information, prints the report and
optionally writes it to --out. Standard library only.

A case is a job (BASE[-refill][-Nconn]), with ":cold" appended when a job that
reads ran with the image evicted from the page cache (without it, such a job ran
with the image hot). Runs of jobs that read have .resident0/.resident1 files: the
image's bytes in the page cache right before and right after fio.

A column is a server: qemu, or a blkrep server (untracked, tracked, replicated)
run with one binary. With one unlabelled binary its name is the server's; with
binaries given as LABEL=PATH it is SERVER@LABEL, and ratios of every label to the
first one are added (before/after from one run).

The replicated server's runs also have a lag samples file (.lag, from
bench_probe.py lag) and a drain file (.drain, from bench_probe.py drain): the
protected writes per second are fio's writes / (measured run time + drain).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_probe  # noqa: E402  (lag samples, /proc/PID/stat)
from bench_cases import (QEMU_SERVERS, SERVERS, Columns, cache_section,  # noqa: E402
                         job_base, job_conns, job_direction, job_flushes, job_fua, job_label,
                         scaling_section, split_case, valid_job)

# metric key, row label, higher-is-better
METRICS = [
    ("iops", "IOPS", True),
    # Only the 70/30 job has these.
    ("read_iops", "read IOPS", True),
    ("write_iops", "write IOPS", True),
    ("mbps", "MB/s", True),
    ("p50", "p50 µs", False),
    ("p99", "p99 µs", False),
    ("p999", "p99.9 µs", False),
    # Only jobs with fio --fsync have these.
    ("flushes", "flushes/s", True),
    ("flush_ratio", "flushes / write", False),
    ("flush_p99", "flush p99 µs", False),
    ("cpu", "server CPU %", False),
    # Only the replicated server has these (a row is shown when some column has a value).
    ("rcpu", "replica CPU %", False),
    ("protected", "**protected IOPS**", True),
    ("drain_s", "drain s", False),
    ("lag_p50", "lag p50 ms", False),
    ("lag_p99", "lag p99 ms", False),
    ("lag_max", "lag max ms", False),
    ("alag_p50", "applied lag p50 ms", False),
    ("alag_p99", "applied lag p99 ms", False),
    ("alag_max", "applied lag max ms", False),
]
# Metrics only some columns have; a ratio to a column without one divides by this
# metric instead (protected IOPS of blkrep over qemu-nbd's plain IOPS).
RATIO_FALLBACK = {"protected": "iops"}
OPTIONAL_METRICS = {"rcpu", "protected", "drain_s", "lag_p50", "lag_p99", "lag_max",
                    "alag_p50", "alag_p99", "alag_max", "read_iops", "write_iops",
                    "flushes", "flush_ratio", "flush_p99"}
# Metrics whose ratio between servers means nothing.
NO_RATIO = {"flush_ratio"}
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
            samples.append((float(wall), bench_probe.stat_ticks(stat)))
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
           "last_error": None, "resync_reason": None, "network_bytes": 0,
           "connections": 0}
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
        out["connections"] += sum(int(d.get("total_connections") or 0)
                                  for d in g.get("disks") or [])
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


def drain(json_path: Path) -> dict | None:
    """The replicated server's drain after fio (bench_probe.py drain); None if none."""
    try:
        return json.loads(Path(str(json_path) + ".drain").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def resident_mib(json_path: Path, suffix: str) -> float | None:
    """MiB of the image in the page cache before (".resident0") or after
    (".resident1") fio, from fincore; None where not recorded."""
    try:
        return int(Path(str(json_path) + suffix).read_text().strip()) / 1048576
    except (OSError, ValueError):
        return None


def flush_figures(job: dict, writes: int, run_s: float) -> dict[str, float | None]:
    """Flushes fio sent (its "sync" I/O, NBD_CMD_FLUSH with the nbd engine): per
    second, per write, and their p99 completion latency in µs."""
    sync = job.get("sync") or {}
    n = int(sync.get("total_ios") or 0)
    p99 = ((sync.get("lat_ns") or {}).get("percentile") or {}).get(PERCENTILES["p99"])
    return {"flushes": n / run_s if run_s > 0 else None,
            "flush_ratio": n / writes if writes else None,
            "flush_p99": float(p99) / 1e3 if p99 is not None else None}


def parse_run(path: Path, direction: str, ramp: float,
              flushes: bool = False) -> dict[str, float]:
    doc = load_fio_json(path)
    jobs = doc.get("jobs") or []
    if len(jobs) != 1:
        raise ReportError(f"{path}: expected 1 fio job, found {len(jobs)} "
                          "(run fio with --group_reporting)")
    job = jobs[0]
    if job.get("error"):
        raise ReportError(f"{path}: fio job error {job['error']}")
    # A read/write mix is measured as one (fio unified_rw_reporting=both).
    section = "mixed" if direction == "rw" else direction
    d = job.get(section)
    if not d or not d.get("total_ios"):
        raise ReportError(f"{path}: no {section} I/O recorded")
    pct = (d.get("clat_ns") or {}).get("percentile") or {}
    out = {"iops": float(d["iops"]), "mbps": float(d["bw_bytes"]) / 1e6}
    for key, name in PERCENTILES.items():
        if name not in pct:
            raise ReportError(f"{path}: clat_ns percentile {name} missing "
                              "(run fio with --percentile_list=50:99:99.9)")
        out[key] = float(pct[name]) / 1e3  # ns -> µs
    out["read_iops"] = out["write_iops"] = None
    if direction == "rw":
        out["read_iops"] = float((job.get("read") or {}).get("iops") or 0)
        out["write_iops"] = float((job.get("write") or {}).get("iops") or 0)
    out["flushes"] = out["flush_ratio"] = out["flush_p99"] = None
    if flushes:
        w = job.get("write") or {}
        out.update(flush_figures(job, int(w.get("total_ios") or 0),
                                 float(w.get("runtime") or 0) / 1000.0))
    out["resident0"] = resident_mib(path, ".resident0")
    out["resident1"] = resident_mib(path, ".resident1")
    out["cpu"] = server_cpu_percent(path)
    # Protected writes per second: a write counts once the replica applied it.
    out["protected"] = out["drain_s"] = None
    dr = drain(path)
    run_s = float(d.get("runtime") or 0) / 1000.0  # ms, the ramp excluded
    if dr is not None and run_s > 0:
        out["drain_s"] = float(dr["drain_s"])
        out["protected"] = float(d["total_ios"]) / (run_s + out["drain_s"])
    lag = bench_probe.lag_summary(Path(str(path) + ".lag"), skip_s=ramp)
    out["lag"] = lag
    # The replica's own lag over the same window, from its log (exact to the ms).
    applied = None
    if lag and lag["start"] is not None:
        applied = bench_probe.applied_lag_summary(Path(str(path) + ".replica-log"),
                                                  lag["start"], lag["end"])
    out["applied_lag"] = applied
    for key in ("p50", "p99", "max"):
        out[f"lag_{key}"] = lag[f"{key}_ms"] if lag else None
        out[f"alag_{key}"] = applied[f"{key}_ms"] if applied else None
    out["rcpu"] = server_cpu_percent(path, "rcpu")
    out["status"] = server_status(path)
    out["status0"] = server_status(path, ".status0")
    out["replica"] = replica_status(path)
    return out


def collect(results: Path, jobs: list[str], cols: Columns,
            skipped: dict[str, str], ramp: float) -> dict:
    """data[job][column] = {"runs": [per-run dicts], "median": {...}} or None."""
    data: dict = {}
    for job in jobs:
        data[job] = {}
        for col in cols.ids:
            d = results / job / col
            files = sorted(d.glob("run*.json"), key=lambda p: int(p.stem[3:]))
            if not files:
                if col in skipped or cols.server[col] in skipped:
                    data[job][col] = None
                    continue
                raise ReportError(f"no fio results in {d}")
            # A cold job ran without a ramp.
            job_ramp = 0.0 if split_case(job)[1] == "cold" else ramp
            runs = [parse_run(f, job_direction(job), job_ramp, job_flushes(job)) for f in files]
            median = {}
            for k in [m[0] for m in METRICS] + ["resident0", "resident1"]:
                vals = [r[k] for r in runs if r.get(k) is not None]
                median[k] = statistics.median(vals) if vals else None
            data[job][col] = {"runs": runs, "median": median}
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
    for label, path in args.blkrep:
        try:
            mtime = datetime.datetime.fromtimestamp(
                os.stat(path).st_mtime, datetime.timezone.utc)
            built = f" (modified {mtime:%Y-%m-%d %H:%M:%S} UTC)"
        except OSError:
            built = ""
        info.append((f"blkrep binary{f' [{label}]' if label else ''}", path + built))
    return info


def rpo_figures(entry: dict) -> tuple[float | None, float | None, str]:
    """(p99, max, which lag) to check an achieved-RPO goal on, from a column's
    medians and runs: the status lag where every run had `lag_ms`, else the
    replica's applied lag (ms-exact, and never below the status lag), else the
    status lag in whole seconds."""
    m = entry["median"]
    sources = lag_sources(entry)
    if sources == {"lag_ms"} or m["alag_p99"] is None:
        return m["lag_p99"], m["lag_max"], f"status lag ({','.join(sorted(sources)) or '—'})"
    return m["alag_p99"], m["alag_max"], "applied lag (replica log; status has whole seconds)"


def lag_sources(entry: dict) -> set[str]:
    """The status fields a column's lag samples came from (`lag_ms`, `lag_secs`);
    runs whose samples all failed have none."""
    return {r["lag"]["source"] for r in entry["runs"] if r.get("lag") and r["lag"]["source"]}


def fmt_metric(key: str, v: float | None) -> str:
    if v is None:
        return "—"
    if key == "iops":
        return f"{v:,.0f}"
    if key in ("mbps", "cpu", "read_iops", "write_iops", "flushes"):
        return f"{v:,.1f}" if key in ("mbps", "cpu") else f"{v:,.0f}"
    if key == "flush_ratio":
        return f"{v:.2f}"
    if key == "protected":
        return f"**{v:,.0f}**"
    if key == "drain_s":
        return f"{v:.2f}"
    if key.startswith(("lag_", "alag_")):
        return f"{v:,.0f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def ratio(data_job: dict, num: str, den: str, key: str) -> float | None:
    a, b = data_job.get(num), data_job.get(den)
    if key in NO_RATIO or not a or not b or a["median"][key] is None:
        return None
    den_value = b["median"][key]
    if den_value is None and key in RATIO_FALLBACK:
        den_value = b["median"][RATIO_FALLBACK[key]]
    if not den_value:
        return None
    return a["median"][key] / den_value


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def targets(data: dict, jobs: list[str], cols: Columns, args) -> list[str]:
    """PASS/MISS lines of the targets whose columns took part in the run, per binary."""
    lines = []

    def check(desc: str, r: float | None, op: str, limit: float,
              aim: float | None = None) -> None:
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

    # (numerator server, denominator server, metric, what, op, limit, aim of 4k
    # randwrite, the jobs: "write" jobs, "all", "flush" jobs, or one job's name)
    rules = [
        ("tracked", "qemu", "iops", "IOPS", ">=", 1.0, 1.2, "all"),
        ("tracked", "untracked", "iops", "IOPS", ">=", 0.9, None, "all"),
        ("tracked", "untracked", "p999", "p99.9 latency", "<=", 1.2, None, "write"),
        ("replicated", "qemu", "iops", "IOPS", ">=", 1.0, 1.2, "all"),
        ("replicated", "qemu", "p999", "p99.9 latency", "<=", 1.0, None, "write"),
        # Issue 16: 4k randwrite QD32 stays at 2x; tails no worse than qemu-nbd's;
        # O_DIRECT images against qemu-nbd --cache=none. Issue 17: the p99 of flush
        # jobs and FUA jobs (whose IOPS the "all" rules check).
        ("tracked", "qemu", "iops", "IOPS (issue 16: keep 2×)", ">=", 2.0, None, "randwrite4k"),
        ("tracked", "qemu", "p999", "p99.9 latency", "<=", 1.0, None, "all"),
        ("tracked-direct", "qemu-direct", "iops", "IOPS", ">=", 1.0, None, "all"),
        ("tracked-direct", "qemu-direct", "p999", "p99.9 latency", "<=", 1.0, None, "all"),
        ("tracked", "qemu", "p99", "p99 latency", "<=", 1.0, None, "flush"),
        ("tracked-direct", "qemu-direct", "p99", "p99 latency", "<=", 1.0, None, "flush"),
    ]
    in_scope = {
        "all": lambda job: True,
        "write": lambda job: job_direction(job) == "write",
        "flush": lambda job: job_flushes(job) or job_fua(job),
    }
    for num, den, key, what, op, limit, aim, scope in rules:
        for lab in cols.labels:
            a, b = cols.of(num, lab), cols.of(den, lab)
            if not a or not b:
                continue
            for job in jobs:
                if not in_scope.get(scope, lambda j, s=scope: j == s)(job):
                    continue
                if key == "iops" and job_base(job).startswith("steady"):
                    continue  # fio's --rate sets the IOPS
                check(f"{job_label(job, args)}: {cols.title(a)} / {cols.title(b)} {what}",
                      ratio(data[job], a, b, key), op, limit,
                      aim if job == "randwrite4k" else None)
    # Issue 16: throughput on several connections scales at least as qemu-nbd's.
    for desc, r in scaling_section(data, jobs, cols, args)[1]:
        check(desc, r, ">=", 1.0)
    # Issue 14: protected writes per second against qemu-nbd's plain IOPS.
    protected_limits = {"randwrite4k": 1.0, "randwrite64k": 0.9}
    for lab in cols.labels:
        a, b = cols.of("replicated", lab), cols.of("qemu", "")
        if not a or not b:
            continue
        for job in jobs:
            limit = protected_limits.get(job_base(job))
            if limit is not None:
                check(f"{job_label(job, args)}: {cols.title(a)} protected IOPS / qemu-nbd IOPS",
                      ratio(data[job], a, b, "protected"), ">=", limit)
    # A rate-limited job measures replication that keeps up: at a 1 s interval the
    # achieved RPO's p99 stays within 2 s (issue 14).
    for lab in cols.labels:
        a = cols.of("replicated", lab)
        if not a:
            continue
        for job in jobs:
            e = data[job].get(a)
            if not job_base(job).startswith("steady") or not e:
                continue
            p99, _, which = rpo_figures(e)
            desc = f"{job_label(job, args)}: {cols.title(a)} {which} p99"
            if p99 is None:
                lines.append(f"- SKIP {desc}: no lag samples")
            else:
                lines.append(f"- {'PASS' if p99 <= 2000 else 'MISS'} {desc}: "
                             f"{p99:,.0f} ms ≤ 2,000 ms (interval {args.replica_interval})")
    return lines


def tracking_section(data: dict, jobs: list[str], cols: Columns, args) -> list[str]:
    """What the blkrep servers reported about tracking, per job (medians over
    runs), plus warnings when the tracked server did not do its work."""
    blk = [c for c in cols.ids if cols.server[c] not in QEMU_SERVERS]
    rows, warnings = [], []
    for job in jobs:
        jl = job_label(job, args)
        for col in blk:
            srv = cols.server[col]
            e = data[job].get(col)
            if not e:
                continue
            sts = [r["status"] for r in e["runs"] if r.get("status")]
            label = f"{jl} | {cols.title(col)}"
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
            # Each fio job of the nbd engine opens its own connection (nbdinfo's
            # readiness probe adds one).
            if min(st["connections"] for st in sts) < job_conns(job):
                warnings.append(f"- WARNING {jl}: {cols.title(col)} counted fewer than "
                                f"{job_conns(job)} connections in a run")
            if srv in ("tracked", "replicated", "tracked-direct"):
                # What the replicated server did before fio started (its initial
                # replication, and cycles of intervals that passed meanwhile) is not
                # fio's doing.
                before = [r.get("status0") or {} for r in e["runs"] if r.get("status")]
                delivered = [st["delivered"] - b.get("delivered", 0) for st, b in zip(sts, before)]
                resyncs = sum(st["resyncs"] - b.get("resyncs", 0) for st, b in zip(sts, before))
                if any(n <= 0 for n in delivered):
                    why = (" while fio ran (the shipper was still sending an earlier, larger "
                           "cycle, or the ring overflowed)") if srv == "replicated" else ""
                    warnings.append(f"- WARNING {jl}: a {cols.title(col)} run delivered no "
                                    f"cycle to the consumer{why}; its numbers are not of "
                                    f"{'replicat' if srv == 'replicated' else 'track'}ing alone")
                if fails:
                    err = next((st["last_error"] for st in sts if st["last_error"]), "")
                    warnings.append(f"- WARNING {jl}: the {cols.title(col)} consumer failed "
                                    f"{fails} time(s){': ' + err if err else ''}")
                if resyncs or pending:
                    why = next((st["resync_reason"] for st in sts if st["resync_reason"]), "")
                    warnings.append(f"- NOTE {jl}: {cols.title(col)} fell back to "
                                    f"resync ({resyncs} done{', one pending' if pending else ''}"
                                    f"): {why or 'reason no longer reported (usually the ring filled up)'}"
                                    f"; ring {args.ring_size}, so this column includes resync work")
            if srv == "replicated" and any(r.get("drain_s") is None for r in e["runs"]):
                warnings.append(f"- WARNING {jl}: a {cols.title(col)} run has no drain "
                                "measurement (see its log), so no protected IOPS")
    if not rows:
        return []
    out = ["", "What blkrep reported at the end of each fio run (`blkrep status --json`; "
           f"medians over runs; counts include the {args.ramp} s ramp):", "",
           "| job | server | tracking | cycles closed | cycles delivered | MB delivered | "
           "records logged | consumer failures (sum) | resyncs (sum) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    out.extend(rows)
    if any(cols.server[c] == "replicated" for c in blk):
        out.append("")
        out.append("Counts of blkrep replicated include its initial replication of the whole "
                   "image (one resync and the cycles delivered meanwhile), shipped and applied "
                   "before fio started; the notes below count only what happened while fio ran.")
        out.extend(replica_section(data, jobs, cols, args))
    if warnings:
        out.append("")
        out.extend(warnings)
    return out


def replica_section(data: dict, jobs: list[str], cols: Columns, args) -> list[str]:
    """The replicated server's shipping while fio ran (status after fio minus status
    before it), and its replica at the end (medians over runs)."""
    rows = []
    for job in jobs:
        for col in cols.ids:
            e = data[job].get(col)
            if cols.server[col] != "replicated" or not e:
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
            lag_src = ",".join(sorted(lag_sources(e))) or "—"
            rows.append(f"| {job_label(job, args)} | {cols.title(col)} | "
                        f"{med('delivered'):.0f} | {data_b / 1e6:,.0f} | "
                        f"{net_b / 1e6:,.0f} | {ratio_s} | {applied} | {pending} | {lag_src} |")
    if not rows:
        return []
    return ["", "blkrep replicated while fio ran (`blkrep status` after fio minus before it, "
            "medians over runs; MB sent = compressed chunk bytes, before TLS, resync copies "
            "included; MB delivered counts cycles' change bytes only), its replica when "
            "fio ended, and the status field the lag rows come from (`lag_ms`, or `lag_secs` "
            "in whole seconds from a blkrep that has no `lag_ms`):", "",
            "| job | server | cycles delivered | MB delivered | MB sent (network) | "
            "sent / delivered | replica's last applied cycle | replica's pending transfers | "
            "lag from |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|"] + rows


def render(args, data: dict, jobs: list[str], cols: Columns,
           skipped: dict[str, str]) -> str:
    out: list[str] = []
    if args.embed:
        out.append("### fio write path: blkrep vs qemu-nbd")
        out.append("")
    else:
        out.append("## fio benchmark: blkrep vs qemu-nbd")
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
        f"socket, one connection per fio job (numjobs=1, or N with group_reporting for the "
        f"jobs on N connections, each at the job's queue depth); raw image {args.size} "
        f"(fallocate, written once in full), "
        f"the same file for every server; servers started fresh for each run in the order "
        f"{', '.join(cols.title(c) for c in cols.ids)}. MB/s = 10^6 bytes/s; latencies are "
        f"fio completion latency (clat) in µs; server CPU % is the server process's "
        f"user+system time (all threads) while fio ran, ramp included, in % of one core (the "
        f"machine has {len(os.sched_getaffinity(0))} cores, shared with fio). Jobs marked "
        f"\"fio buffers\" write fio's default buffers (they compress to about 0.8 with "
        f"DEFLATE), \"incompressible\" ones fresh random data (fio `refill_buffers`).")
    out.append("")
    if any(split_case(j)[1] for j in jobs):
        out.append(
            "Page cache of jobs that read (all page caches are dropped before every server "
            "starts, when run as root): **hot** = after the server started, the whole image "
            "read (`cat`) into the page cache, then fio with its ramp; **cold** = after the "
            "server started, `sync`, then `posix_fadvise(POSIX_FADV_DONTNEED)` on the whole "
            "image, then fio **without a ramp** (a ramp would read the image back in), so the "
            "cache warms as the job reads. The table below the results gives the image's "
            "bytes in the page cache (fincore) right before and after fio. O_DIRECT servers "
            "read around the page cache, so for them hot and cold differ only below it.")
        out.append("")
    if any(job_flushes(j) for j in jobs):
        out.append(
            "Flush jobs: fio `--fsync=N` sends NBD_CMD_FLUSH (its nbd engine's "
            "`nbd_aio_flush`) after every N writes, but at a queue depth above 1 fio 3.33 "
            "sends about one per write whatever N is: \"flushes / write\" shows what was sent. "
            "IOPS and latency rows are of the writes; flush p99 is fio's total latency of "
            "the flushes. fio's nbd engine cannot send FUA writes.")
        out.append("")
    if any(job_fua(j) for j in jobs):
        out.append(
            "FUA jobs: every write has NBD_CMD_FLAG_FUA, sent by `scripts/nbd_fua_bench.py` "
            "(python3-libnbd `aio_pwrite`, the job's queue depth kept in flight; fio's nbd "
            "engine cannot send FUA) instead of fio, with the same ramp and runtime. Latency "
            "is from submission to the completion seen by the client's `poll`; its data is "
            "random (incompressible), no two writes alike. On N connections, N client "
            "processes run at once: IOPS and MB/s are their sums, each latency percentile "
            "the highest of the N clients'.")
        out.append("")
    servers = [s for s in SERVERS if any(cols.server[c] == s for c in cols.ids)]
    desc = {
        "qemu": "**qemu-nbd** = `qemu-nbd -t -f raw --cache=writeback --aio=io_uring --shared`",
        "qemu-direct": "**qemu-nbd O_DIRECT** = `qemu-nbd -t -f raw --cache=none "
                       "--aio=io_uring --shared`",
        "untracked-direct": "**blkrep untracked O_DIRECT** = as blkrep untracked, with "
                            "`direct = true` on the disk",
        "tracked-direct": "**blkrep tracked O_DIRECT** = as blkrep tracked, with "
                          "`direct = true` on the disk",
        "untracked": "**blkrep untracked** = `blkrep primary`, `tracking = false`",
        "tracked": f"**blkrep tracked** = `tracking = true`, `interval = \"1s\"`, ring "
                   f"{args.ring_size}, `discard` consumer",
        "replicated": f"**blkrep replicated** = `tracking = true`, `interval = "
                      f"\"{args.replica_interval}\"`, ring {args.ring_size}, `replica` consumer "
                      "shipping over HTTPS with mutual TLS to a `blkrep replica "
                      "run` daemon on loopback, itself started fresh for each run (empty storage) "
                      "and sharing the machine's cores; fio starts after the initial replication "
                      "of the whole image has been shipped and applied",
    }
    out.append("Servers: " + "; ".join(desc[s] for s in servers) + ".")
    out.append("")
    if any(cols.labels):
        out.append("blkrep binaries, each run for every blkrep server, interleaved: " + "; ".join(
            f"**{lab}** = `{path}`" for lab, path in cols.binaries) + ".")
        out.append("")
    for col, why in sorted(skipped.items()):
        if col in cols.server:
            title = cols.title(col)
        elif col in cols.server.values():  # every column of that server
            title = SERVERS[col]
        else:
            continue  # a server this run did not ask for
        out.append(f"**{title} skipped:** {why}")
        out.append("")

    ratio_cols = cols.ratio_pairs()
    head = ["job", "metric"] + [cols.title(c) for c in cols.ids] + \
        [Columns.ratio_title(a, b) for a, b in ratio_cols]
    out.append("| " + " | ".join(head) + " |")
    out.append("|---|---|" + "---:|" * (len(cols.ids) + len(ratio_cols)))
    for job in jobs:
        label = job_label(job, args)
        metrics = [m for m in METRICS if m[0] not in OPTIONAL_METRICS or any(
            data[job].get(c) and data[job][c]["median"].get(m[0]) is not None
            for c in cols.ids)]
        for i, (key, mlabel, _) in enumerate(metrics):
            cells = [label if i == 0 else "", mlabel]
            for col in cols.ids:
                e = data[job].get(col)
                cells.append(fmt_metric(key, e["median"][key] if e else None))
            for a, b in ratio_cols:
                cells.append(fmt_ratio(ratio(data[job], a, b, key)))
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("Ratios are of medians: above 1 is better for IOPS and MB/s, below 1 is "
               "better for latency, server CPU, drain and lag.")
    if any(cols.server[c] == "replicated" for c in cols.ids):
        out.append("")
        out.append(
            "blkrep replicated rows: **protected IOPS** = writes fio completed / (measured run "
            "time + drain), counting a write only once the replica has applied it; its ratio "
            "to qemu-nbd divides by qemu-nbd's plain IOPS. drain s = from fio's end until "
            "the replica's status (`blkrep replica status --json`, asked on its control "
            "socket every 50 ms) shows a cycle closed then (`blkrep cycles close`) applied "
            "with no transfer pending. lag = the achieved recovery point, now minus the close "
            f"time of the newest delivered cycle, sampled from the primary's status (`blkrep "
            f"status --json`, asked on its control socket, no process started per sample) "
            f"{args.lag_hz} times a second while fio ran (ramp excluded); with `lag_secs` "
            "(whole seconds) its resolution is 1000 ms. applied lag = the replica's own: over "
            "the same window, 10 times a second, now minus the close time of the newest cycle "
            "it had applied, from its log's `Transfer applied` lines (`closed_unix_ms`), exact "
            "to the ms and stricter (applied, not only stored).")

    if args.runs > 1:
        out.append("")
        out.append("Run-to-run spread of IOPS, (max − min) / median over the runs:")
        out.append("")
        out.append("| job | " + " | ".join(cols.title(c) for c in cols.ids) + " |")
        out.append("|---|" + "---:|" * len(cols.ids))
        for job in jobs:
            cells = [job_label(job, args)]
            for col in cols.ids:
                e = data[job].get(col)
                if not e:
                    cells.append("—")
                    continue
                v = [r["iops"] for r in e["runs"]]
                med = statistics.median(v)
                cells.append(f"{(max(v) - min(v)) / med * 100:.1f}% (n={len(v)})" if med else "—")
            out.append("| " + " | ".join(cells) + " |")

    out.extend(cache_section(data, jobs, cols, args))
    out.extend(scaling_section(data, jobs, cols, args)[0])
    out.extend(tracking_section(data, jobs, cols, args))
    out.append("")
    note = " (informational: --short never fails on numbers)" if args.short else \
        " (informational: the script never fails on numbers)"
    out.append(f"Targets{note}:")
    out.append("")
    out.extend(targets(data, jobs, cols, args))
    out.append("")
    return "\n".join(out)


def to_json(args, data: dict, jobs: list[str], cols: Columns,
            skipped: dict[str, str]) -> dict:
    """The report's numbers: per job and column the medians and every run, and the
    ratio columns."""
    out = {
        "settings": {"runs": args.runs, "runtime_s": args.runtime, "ramp_s": args.ramp,
                     "image_size": args.size, "ring_size": args.ring_size,
                     "replica_interval": args.replica_interval
                     if any(cols.server[c] == "replicated" for c in cols.ids) else None,
                     "rate_4k_mbps": args.rate_4k, "rate_64k_mbps": args.rate_64k,
                     "binaries": dict(cols.binaries), "short": args.short},
        "machine": dict(machine_info(args)),
        "skipped": skipped,
        "jobs": {},
    }
    for job in jobs:
        j = {"label": job_label(job, args), "job": split_case(job)[0],
             "cache": split_case(job)[1], "connections": job_conns(job),
             "servers": {}, "ratios": {}}
        for col in cols.ids:
            e = data[job].get(col)
            j["servers"][col] = None if not e else {"median": e["median"], "runs": e["runs"]}
        for a, b in cols.ratio_pairs():
            j["ratios"][f"{a}/{b}"] = {k: ratio(data[job], a, b, k) for k, _, _ in METRICS}
        out["jobs"][job] = j
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--jobs", required=True,
                    help="comma list of cases: JOB, or JOB:cold for a job that reads run cold")
    ap.add_argument("--servers", required=True)
    ap.add_argument("--image-dir", required=True)
    ap.add_argument("--size", required=True)
    ap.add_argument("--runs", required=True, type=int)
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--ramp", required=True)
    ap.add_argument("--ring-size", default="?")
    ap.add_argument("--blkrep", action="append", default=[],
                    help="[LABEL=]PATH of a blkrep binary, in column order; repeat for several")
    ap.add_argument("--load-start", default="?",
                    help="/proc/loadavg's first three fields when the benchmark started")
    ap.add_argument("--replica-interval", default="1s")
    ap.add_argument("--rate-4k", default="40", help="MB/s of the steady4k job")
    ap.add_argument("--rate-64k", default="150", help="MB/s of the steady64k job")
    ap.add_argument("--lag-hz", default="10", help="lag samples per second")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path,
                    help="also write medians, ratios and status summaries as JSON")
    ap.add_argument("--embed", action="store_true",
                    help="no machine table, a level-3 heading: for inclusion in another report")
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--skipped", action="append", default=[],
                    help="COLUMN=REASON: a column (or server) that has no data, and why")
    args = ap.parse_args(argv)

    jobs = [j for j in args.jobs.split(",") if j]
    wanted = [s for s in args.servers.split(",") if s]
    for j in jobs:
        if not valid_job(j):
            ap.error(f"unknown job {j}")
    for s in wanted:
        if s not in SERVERS:
            ap.error(f"unknown server {s}")
    binaries = []
    for item in args.blkrep:
        label, sep, path = item.partition("=")
        binaries.append((label, path) if sep else ("", item))
    if not binaries and any(s != "qemu" for s in wanted):
        binaries = [("", "")]
    args.blkrep = [b for b in binaries if b[1]]
    cols = Columns([s for s in SERVERS if s in wanted], binaries)  # canonical order
    skipped = {}
    for item in args.skipped:
        col, _, why = item.partition("=")
        skipped[col] = why or "skipped"

    try:
        data = collect(args.results, jobs, cols, skipped, float(args.ramp))
    except (ReportError, OSError) as e:
        print(f"bench_report: error: {e}", file=sys.stderr)
        return 1
    text = render(args, data, jobs, cols, skipped)
    sys.stdout.write(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"bench_report: report written to {args.out}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(args, data, jobs, cols, skipped),
                                        indent=2) + "\n")
        print(f"bench_report: JSON written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Probes of a running primary and replica for the benchmark scripts, and the
helpers their reports share. Standard library only.

  drain   closes a cycle on the primary (`blkrep cycles close`, which returns once
          the replica holds it durably), then waits until `blkrep replica status`
          shows it applied with no transfer pending; writes {"cycle", "close_s",
          "drain_s"} as JSON. drain_s counts from --since (the moment the writer
          stopped) to the first poll that saw the cycle applied (polled every 50 ms).
  lag     samples the achieved recovery point of one group (`blkrep status --json`)
          every 1/--hz s until SIGTERM or SIGINT, one JSON line per sample:
          {"t": unix time, "lag_ms": ms or null, "source": field}.

Both poll a daemon's status often (10-20 times a second), so they ask its control
socket directly (the request `blkrep status --json` and `blkrep replica status
--json` send, whose answer they print) instead of starting a `blkrep` process per
sample: each such process took about 4 ms of CPU at once, on the two cores the
benchmarked writes run on, which showed in blkrep's own tail latencies.

Lag: `lag_ms` (milliseconds, now minus the close time of the newest delivered
cycle) where the primary reports it, else `lag_secs` (whole seconds, the same
quantity truncated). Every sample says which it used; `lag_of_group` is the one
place that chooses. `applied_lag_summary` gives the replica's own lag, exact to the
millisecond, from its JSON log.

Exit status: 0 on success; 1 on an error (a command failing, a timeout, malformed
output).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProbeError(Exception):
    pass


def run_json(argv: list[str], timeout: float) -> object:
    """The JSON a command prints; ProbeError if it fails, hangs or prints no JSON."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise ProbeError(f"{' '.join(argv)}: no answer within {timeout:.0f} s") from e
    if p.returncode != 0:
        raise ProbeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()[-400:]}")
    try:
        return json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise ProbeError(f"{' '.join(argv)}: not JSON: {p.stdout[:200]!r}") from e


def control_socket_of(config: Path) -> Path | None:
    """The `control_socket` a daemon's TOML configuration names; None if it names
    none (the daemon's default) or cannot be read."""
    try:
        with open(config, "rb") as f:
            value = tomllib.load(f).get("control_socket")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return Path(value) if isinstance(value, str) else None


def control_call(path: Path, request: dict, timeout: float) -> object:
    """The answer of one request on a daemon's control socket: one JSON line each
    way, the answer in the `{"ok", "result", "error"}` envelope. ProbeError if the
    daemon cannot be reached, refuses, or answers no JSON."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            conn.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                piece = conn.recv(1 << 16)
                if not piece:
                    break
                reply += piece
    except OSError as e:
        raise ProbeError(f"control socket {path}: {e}") from e
    try:
        envelope = json.loads(reply)
    except json.JSONDecodeError as e:
        raise ProbeError(f"control socket {path}: not JSON: {reply[:200]!r}") from e
    if not envelope.get("ok"):
        raise ProbeError(f"control socket {path}: {envelope.get('error')}")
    return envelope.get("result")


def status_reader(blkrep: str, config: Path, replica: bool):
    """A function returning the daemon's status as `blkrep [replica] status --json`
    prints it: asked on its control socket, or by that command when the
    configuration names no socket."""
    path = control_socket_of(config)
    if path is not None:
        return lambda timeout: control_call(path, {"op": "status"}, timeout)
    argv = [blkrep, *(["replica"] if replica else []), "status", "--config", str(config), "--json"]
    return lambda timeout: run_json(argv, timeout)


def stat_ticks(stat: str) -> int:
    """utime + stime, in clock ticks, of a /proc/PID/stat line (all threads)."""
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of every thread of `pid`, in clock ticks; None once it is gone."""
    try:
        return stat_ticks(Path(f"/proc/{pid}/stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def group_status(status: dict, group: str) -> dict:
    for g in status.get("groups") or []:
        if g.get("name") == group:
            return g
    raise ProbeError(f"no group {group!r} in blkrep status")


def lag_of_group(g: dict) -> tuple[float | None, str]:
    """(lag in ms, the field it came from) of one group of `blkrep status --json`.
    Prefers the millisecond field; falls back to whole seconds."""
    consumer = g.get("consumer") or {}
    for where in (g, consumer):
        if where.get("lag_ms") is not None:
            return float(where["lag_ms"]), "lag_ms"
    if consumer.get("lag_secs") is not None:
        return float(consumer["lag_secs"]) * 1000.0, "lag_secs"
    return None, ""


def percentile(values: list[float], pct: float) -> float | None:
    """The pct-th percentile (0-100) of values, nearest rank; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil, at least the first
    return ordered[int(min(rank, len(ordered))) - 1]


def lag_summary(path: Path, skip_s: float = 0.0) -> dict | None:
    """p50/p99/max lag (ms) of a `lag` samples file, without the first skip_s
    seconds; None if there is no file or no sample."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    samples = []
    for line in lines:
        try:
            samples.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the sampler was stopped mid-line
    if not samples:
        return None
    start = samples[0]["t"] + skip_s
    kept = [s for s in samples if s["t"] >= start]
    lags = [s["lag_ms"] for s in kept if s.get("lag_ms") is not None]
    sources = sorted({s["source"] for s in kept if s.get("lag_ms") is not None})
    return {"p50_ms": percentile(lags, 50), "p99_ms": percentile(lags, 99),
            "max_ms": max(lags) if lags else None, "samples": len(lags),
            "missed": len(kept) - len(lags), "source": ",".join(sources) or None,
            "start": kept[0]["t"] if kept else None, "end": samples[-1]["t"]}


def parse_ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def log_events(path: Path) -> list[tuple[float, dict]]:
    """(unix time, fields) of every JSON line of a daemon's log (--log-format json)."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise ProbeError(f"cannot read {path}: {e}") from e
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
            out.append((parse_ts(doc["timestamp"]), doc.get("fields") or {}))
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
    return out


def applied_lag_summary(replica_log: Path, start: float, end: float,
                        hz: float = 10.0) -> dict | None:
    """p50/p99/max (ms) of the replica's own lag between start and end: at every
    1/hz s, now minus the close time of the newest cycle the replica had applied,
    from its `Transfer applied` log lines (their time, and the cycle's
    `closed_unix_ms`). Millisecond-exact whatever the primary's status reports,
    and stricter than it (applied, not only stored). None without such lines."""
    try:
        events = log_events(replica_log)
    except ProbeError:
        return None
    applies = []
    for ts, fields in events:
        m = re.search(r"closed_unix_ms: (\d+)", str(fields.get("kind")))
        if fields.get("message") == "Transfer applied" and m:
            applies.append((ts, int(m[1]) / 1000.0))
    applies.sort()
    lags, i, newest_close = [], 0, None
    steps = int((end - start) * hz) + 1 if end > start else 0
    for k in range(steps):
        t = start + k / hz
        while i < len(applies) and applies[i][0] <= t:
            closed = applies[i][1]
            newest_close = closed if newest_close is None else max(newest_close, closed)
            i += 1
        if newest_close is not None:
            lags.append((t - newest_close) * 1000.0)
    if not lags:
        return None
    return {"p50_ms": percentile(lags, 50), "p99_ms": percentile(lags, 99),
            "max_ms": max(lags), "samples": len(lags)}


def replica_of(replicas: object, name: str) -> dict | None:
    for r in replicas if isinstance(replicas, list) else []:
        if r.get("name") == name:
            return r
    return None


def applied(replica: dict | None, cycle: int) -> bool:
    """Whether the replica has applied `cycle` and holds nothing unapplied."""
    return bool(replica) and replica.get("last_applied_cycle") is not None and \
        replica["last_applied_cycle"] >= cycle and replica.get("pending_transfers") == 0


def wait_applied(blkrep: str, replica_config: Path, group: str, cycle: int,
                 timeout: float) -> float:
    """Polls the replica's status every 50 ms until it has applied `cycle` with
    nothing pending; returns the time it saw that."""
    replica_status = status_reader(blkrep, replica_config, replica=True)
    deadline = time.time() + timeout
    while True:
        r = replica_of(replica_status(30), group)
        if applied(r, cycle):
            return time.time()
        if time.time() > deadline:
            raise ProbeError(f"the replica did not apply cycle {cycle} within {timeout:.0f} s: {r}")
        time.sleep(0.05)


def close_cycle(blkrep: str, primary_config: Path, group: str, timeout: float) -> int:
    """`blkrep cycles close`: returns the cycle closed, once the replica holds it
    durably."""
    answer = run_json([blkrep, "cycles", "close", "--config", str(primary_config),
                       "--group", group, "--timeout", f"{timeout}s"], timeout + 15)
    return int(answer["cycle"])


def cmd_drain(args) -> int:
    since = args.since if args.since is not None else time.time()
    t0 = time.time()
    cycle = close_cycle(args.blkrep, args.primary_config, args.group, args.timeout)
    t1 = time.time()
    t2 = wait_applied(args.blkrep, args.replica_config, args.group, cycle, args.timeout)
    out = {"cycle": cycle, "close_s": t1 - t0, "drain_s": t2 - since}
    args.out.write_text(json.dumps(out) + "\n")
    return 0


def cmd_lag(args) -> int:
    stop = False

    def on_signal(_signum, _frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    primary_status = status_reader(args.blkrep, args.primary_config, replica=False)
    period = 1.0 / args.hz
    next_at = time.monotonic()
    with args.out.open("w") as f:
        while not stop:
            t = time.time()
            try:
                lag, source = lag_of_group(group_status(primary_status(5), args.group))
            except ProbeError as e:
                # A busy primary may miss a sample; the report counts the misses.
                lag, source = None, f"error: {e}"[:200]
            f.write(json.dumps({"t": t, "lag_ms": lag, "source": source}) + "\n")
            f.flush()
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command_name", required=True)

    d = sub.add_parser("drain", help="close a cycle and wait until the replica applied it")
    d.add_argument("--blkrep", required=True)
    d.add_argument("--primary-config", required=True, type=Path)
    d.add_argument("--replica-config", required=True, type=Path)
    d.add_argument("--group", required=True)
    d.add_argument("--since", type=float, help="unix time the drain counts from (default: now)")
    d.add_argument("--timeout", type=int, default=900)
    d.add_argument("--out", required=True, type=Path)

    g = sub.add_parser("lag", help="sample a group's lag until SIGTERM")
    g.add_argument("--blkrep", required=True)
    g.add_argument("--primary-config", required=True, type=Path)
    g.add_argument("--group", required=True)
    g.add_argument("--hz", type=float, default=10.0)
    g.add_argument("--out", required=True, type=Path)

    args = ap.parse_args(argv)
    if args.command_name == "lag" and not args.hz > 0:
        ap.error("--hz must be positive")
    try:
        return cmd_drain(args) if args.command_name == "drain" else cmd_lag(args)
    except (ProbeError, OSError, KeyError, ValueError) as e:
        print(f"bench_probe: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

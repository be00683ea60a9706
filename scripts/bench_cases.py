"""The vocabulary of scripts/bench-fio.sh's results, shared by its report: jobs
and the cases they run as (a job that reads runs hot as JOB, cold as JOB:cold),
servers, and the report's columns (qemu-nbd, and every blkrep server once per
binary). A job's name is BASE[-refill][-Nconn]: "-refill" writes incompressible
data, "-Nconn" runs the job on N NBD connections at once. Also the report's
sections about cases: the page-cache state of jobs that read, and the scaling of
jobs run on several connections. Standard library only.
"""

from __future__ import annotations

import re

JOBS = {
    # name: (label, fio direction: read, write, or rw for a mix measured as one);
    # a write job + "-refill" writes incompressible data
    "randwrite4k": ("4k randwrite QD32", "write"),
    "randread4k": ("4k randread QD32", "read"),
    "randwrite64k": ("64k randwrite QD16", "write"),
    "seqwrite1m": ("1M seq write QD8", "write"),
    "seqwrite64k": ("64k seq write QD16", "write"),
    "seqread1m": ("1M seq read QD8", "read"),
    "randrw4k": ("4k randrw 70/30 QD32 (IOPS, MB/s, latency: reads+writes)", "rw"),
    "randwrite4k-qd1": ("4k randwrite QD1", "write"),
    "randwrite4k-fsync8": ("4k randwrite QD32 fsync=8", "write"),
    "randwrite4k-qd8-fsync1": ("4k randwrite QD8 fsync=1", "write"),
    "randwrite4k-qd1-fsync1": ("4k randwrite QD1 fsync=1", "write"),
    # Every write with NBD_CMD_FLAG_FUA, by scripts/nbd_fua_bench.py, not fio.
    "randwrite4k-fua-qd1": ("4k FUA randwrite QD1", "write"),
    "randwrite4k-fua-qd8": ("4k FUA randwrite QD8", "write"),
    "steady4k": ("4k randwrite QD32 at {rate_4k} MB/s", "write"),
    "steady64k": ("64k randwrite QD16 at {rate_64k} MB/s", "write"),
}
REFILL = "-refill"
COLD = ":cold"
SERVERS = {
    "qemu": "qemu-nbd",
    "untracked": "blkrep untracked",
    "tracked": "blkrep tracked",
    "replicated": "blkrep replicated",
    "qemu-direct": "qemu-nbd O_DIRECT",
    "untracked-direct": "blkrep untracked O_DIRECT",
    "tracked-direct": "blkrep tracked O_DIRECT",
}
QEMU_SERVERS = ("qemu", "qemu-direct")
# (numerator, denominator) server pairs shown as ratio columns, per binary: each
# blkrep server against qemu-nbd with the same kind of image.
RATIOS = [("untracked", "qemu"), ("tracked", "qemu"), ("tracked", "untracked"),
          ("replicated", "qemu"), ("replicated", "tracked"),
          ("untracked-direct", "qemu-direct"), ("tracked-direct", "qemu-direct"),
          ("tracked-direct", "untracked-direct")]


def split_case(case: str) -> tuple[str, str | None]:
    """(job, cache state) of a case: "hot" or "cold" for a job that reads, else None."""
    job = case[:-len(COLD)] if case.endswith(COLD) else case
    base = JOBS.get(job_base(job))
    if base is None or base[1] == "write":
        return job, None
    return job, "cold" if case.endswith(COLD) else "hot"


def job_conns(case: str) -> int:
    """The N of a job's -Nconn suffix (connections at once), or 1."""
    m = re.search(r"-([0-9]+)conn$", split_case(case)[0])
    return int(m[1]) if m else 1


def job_one_conn(case: str) -> str:
    """The case without its -Nconn suffix (cache state kept)."""
    job, cache = split_case(case)
    return re.sub(r"-[0-9]+conn$", "", job) + (COLD if cache == "cold" else "")


def job_base(case: str) -> str:
    job = re.sub(r"-[0-9]+conn$", "", case[:-len(COLD)] if case.endswith(COLD) else case)
    return job[:-len(REFILL)] if job.endswith(REFILL) else job


def job_direction(case: str) -> str:
    return JOBS[job_base(case)][1]


def job_flushes(case: str) -> bool:
    return "fsync" in job_base(case)


def job_fua(case: str) -> bool:
    """Whether every write of the job has FUA (sent by nbd_fua_bench.py, not fio)."""
    return "-fua-" in job_base(case)


def job_label(case: str, args) -> str:
    job, cache = split_case(case)
    label = JOBS[job_base(job)][0].format(rate_4k=args.rate_4k, rate_64k=args.rate_64k)
    if job_conns(job) > 1:
        label += f", {job_conns(job)} connections"
    if job_fua(job):
        label += ", incompressible"  # random data, no two writes alike
    elif JOBS[job_base(job)][1] == "write":
        label += ", incompressible" if job_one_conn(job).endswith(REFILL) else ", fio buffers"
    if cache:
        label += ", **cold**" if cache == "cold" else ", hot"
    return label


def valid_job(case: str) -> bool:
    job, cache = split_case(case)
    base = job_base(job)
    if base not in JOBS or (case.endswith(COLD) and cache is None):
        return False
    plain = job_one_conn(job)
    return base == plain or (plain == base + REFILL and JOBS[base][1] == "write"
                             and not job_fua(base))


class Columns:
    """The report's columns: qemu, and each blkrep server once per binary."""

    def __init__(self, servers: list[str], binaries: list[tuple[str, str]]):
        self.binaries = binaries  # [(label, path)], label "" when unlabelled
        self.labels = [label for label, _ in binaries]
        self.ids: list[str] = []
        self.server: dict[str, str] = {}
        self.label: dict[str, str] = {}
        for srv in servers:
            for lab in ([""] if srv in QEMU_SERVERS else self.labels):
                col = srv + (f"@{lab}" if lab else "")
                self.ids.append(col)
                self.server[col], self.label[col] = srv, lab

    def of(self, srv: str, lab: str) -> str | None:
        col = srv + (f"@{lab}" if lab and srv not in QEMU_SERVERS else "")
        return col if col in self.server else None

    def title(self, col: str) -> str:
        lab = self.label[col]
        return SERVERS[self.server[col]] + (f" [{lab}]" if lab else "")

    def ratio_pairs(self) -> list[tuple[str, str]]:
        """(numerator, denominator) column pairs: the server pairs per binary,
        then every labelled binary against the first one."""
        pairs = []
        for lab in self.labels:
            for a, b in RATIOS:
                ca, cb = self.of(a, lab), self.of(b, lab)
                if ca and cb:
                    pairs.append((ca, cb))
        for lab in self.labels[1:]:
            for srv in SERVERS:
                ca, cb = self.of(srv, lab), self.of(srv, self.labels[0])
                if srv not in QEMU_SERVERS and ca and cb:
                    pairs.append((ca, cb))
        return pairs

    @staticmethod
    def ratio_title(a: str, b: str) -> str:
        sa, _, la = a.partition("@")
        sb, _, lb = b.partition("@")
        if sa == sb:  # one server, two binaries
            return f"{sa}: {la}/{lb}"
        return f"{a}/{b}"


def cache_section(data: dict, jobs: list[str], cols: Columns, args) -> list[str]:
    """The image's bytes in the page cache right before and after fio, for every
    job that reads (medians over runs): shows that eviction and warming worked."""
    cases = [j for j in jobs if split_case(j)[1]]
    if not cases:
        return []
    out = ["", "MiB of the image in the page cache right before fio → right after it "
           "(fincore; medians over runs):", "",
           "| job | " + " | ".join(cols.title(c) for c in cols.ids) + " |",
           "|---|" + "---:|" * len(cols.ids)]
    for job in cases:
        cells = [job_label(job, args)]
        for col in cols.ids:
            m = (data[job].get(col) or {}).get("median") or {}
            if m.get("resident0") is None:
                cells.append("—")
            else:
                after = m.get("resident1")
                cells.append(f"{m['resident0']:,.0f} → "
                             f"{'?' if after is None else f'{after:,.0f}'}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def scaling_section(data: dict, jobs: list[str], cols: Columns,
                    args) -> tuple[list[str], list[tuple[str, float | None]]]:
    """Jobs run on N connections whose one-connection job is in the same run:
    each column's IOPS(N) / IOPS(1), and each blkrep column's scaling over that of
    the qemu-nbd with the same kind of image. Returns the lines and, for the
    targets, (description, scaling ratio) pairs."""
    rows, checks = [], []
    for job in jobs:
        one = job_one_conn(job)
        if job_conns(job) == 1 or one not in data:
            continue

        def scaling(col: str, job: str = job, one: str = one) -> float | None:
            a, b = data[job].get(col), data[one].get(col)
            if not a or not b or not b["median"]["iops"]:
                return None
            return a["median"]["iops"] / b["median"]["iops"]

        cells = [job_label(job, args)]
        for col in cols.ids:
            x = scaling(col)
            cells.append("—" if x is None else f"{x:.2f}×")
        against = []
        for col in cols.ids:
            srv = cols.server[col]
            if srv in QEMU_SERVERS or srv == "replicated":
                continue
            q = cols.of("qemu-direct" if srv.endswith("-direct") else "qemu", "")
            x, y = scaling(col), scaling(q) if q else None
            if x is not None and y:
                against.append(f"{cols.title(col)}: {x / y:.2f}×")
                checks.append((f"{job_label(job, args)}: {cols.title(col)} scaling / "
                               f"{cols.title(q)} scaling", x / y))
        cells.append("; ".join(against) or "—")
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return [], []
    return ["", "Scaling with connections: IOPS on N connections / IOPS of the same job "
            "on one (medians), then each blkrep column's scaling over qemu-nbd's with the "
            "same kind of image:", "",
            "| job | " + " | ".join(cols.title(c) for c in cols.ids) + " | blkrep / qemu-nbd |",
            "|---|" + "---:|" * len(cols.ids) + "---|"] + rows, checks

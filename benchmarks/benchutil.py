"""What the benchmark scripts share: quiet-machine waits, CPU counters, the report's provenance.

Every script here measures on a shared 2-core machine, so each run first waits
for both CPUs to be nearly idle (`wait_for_quiet`), counts the busy time of
each CPU (`per_cpu_busy`, for the "other tenants" column), and says in its
report which CPU and which commit it measured (`cpu_model`, `git_revision`).
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Iterable

TICK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Before a run, wait until the CPUs are below this busy % (for at most the caller's limit).
QUIET_BUSY_PCT = 30.0


def per_cpu_busy() -> dict[int, float]:
    """{cpu: busy seconds so far} from /proc/stat (everything but idle, iowait and steal)."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                v = [int(x) for x in fields[:8]]
                busy[int(name[3:])] = (sum(v) - v[3] - v[4] - v[7]) / TICK
    return busy


def wait_for_quiet(cpus: Iterable[int], limit: float) -> float:
    """Wait (up to `limit` s) until `cpus` are nearly idle; the last busy % of the busiest."""
    cpus = list(cpus)
    deadline = time.monotonic() + limit
    while True:
        before, t0 = per_cpu_busy(), time.monotonic()
        time.sleep(0.5)
        after, elapsed = per_cpu_busy(), time.monotonic() - t0
        busiest = max(100.0 * (after[c] - before[c]) / elapsed for c in cpus)
        if busiest < QUIET_BUSY_PCT or time.monotonic() > deadline:
            return busiest


def cpu_model() -> str:
    """The CPU's model name as lscpu says it (the vendor matters to the figures)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def git_revision(multiconn_dir: str | None = None) -> str:
    """The commit measured, and whether the servers ran something else (an uncommitted src/,
    or a multiconn imported from elsewhere)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    ours = os.path.join(ROOT, "src", "multiconn")
    if multiconn_dir is not None and os.path.realpath(multiconn_dir) != os.path.realpath(ours):
        return f"{head}; multiconn imported from `{multiconn_dir}`"
    return f"{head} (src/ had uncommitted changes: the servers ran the working tree)" if dirty else head


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are not None; None if there are none."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt(value: float | None, digits: int = 0, whole_from: float = 100) -> str:
    """A figure for a report: "–" for none, whole with thousands separators
    from `whole_from` up (or when `digits` is 0), else `digits` decimals."""
    if value is None:
        return "–"
    if digits == 0 or abs(value) >= whole_from:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def publish(report: str, out: str | None) -> None:
    """Print `report`, and write it to `out` (its folder made if need be) when given."""
    print(report)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(report)
        print(f"wrote {out}", file=sys.stderr, flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server the script is about to start."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: "subprocess.Popen[bytes]", limit: float = 60.0) -> None:
    """Wait until something listens on `port` of 127.0.0.1, or exit with why
    not: the server `proc` ended, or `limit` seconds passed."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the server did not listen on {port} within {limit:g} s")

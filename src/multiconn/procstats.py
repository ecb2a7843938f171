"""What Linux's /proc says about a process: CPU time, memory, descriptors.

Used by `multiconn.server_process.ServerProcess` (and so by the tests and
``multiconn bench``) and by ``benchmarks/run.py``. Every function returns None
where /proc is unavailable (not Linux) or the process is gone.
"""

from __future__ import annotations

import os

__all__ = ["process_cpu_seconds", "process_open_fds", "process_peak_rss_bytes", "process_rss_bytes"]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of `pid`, all its threads, in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # Fields after the parenthesised command (which may hold spaces and
    # parentheses): utime and stime are fields 14 and 15 of the line.
    fields = text[text.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of `pid` now (VmRSS)."""
    return _status_bytes(pid, b"VmRSS:")


def process_peak_rss_bytes(pid: int) -> int | None:
    """The most resident memory `pid` has had (VmHWM, the high-water mark)."""
    return _status_bytes(pid, b"VmHWM:")


def process_open_fds(pid: int) -> int | None:
    """How many descriptors `pid` has open."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def _status_bytes(pid: int, key: bytes) -> int | None:
    """A ``kB`` line of /proc/PID/status, in bytes."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

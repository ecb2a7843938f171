"""What one large frame costs the server: CPU, page faults and syscalls per frame.

Bulk echo (4 connections, 1 MiB frames, one in flight each) is where a server
spends its time in the kernel and in the allocator rather than in Python. The
figures that tell why a server is slower there are per frame: minor page
faults (a fresh buffer per frame is paged in, cleared and unmapped again),
and the syscalls it makes (reads, sends, and the epoll_ctl calls of interest
changes). This script measures them for each target, fresh server per run:

- CPU and minor faults from /proc over the measured window, interleaved
  rounds (medians), server pinned to CPU 0 and load generator to CPU 1;
- syscalls per frame from one extra run under ``strace -c -f`` (strace slows
  the server, so that run's rate is not reported, only its counts).

    python benchmarks/bulk.py                                 # this checkout's multiconn
    python benchmarks/bulk.py --target 'c=../shared/bench/build/c_epoll_echo --port {port} --mode framed'

The load generator is `multiconn bench` unless `--loadgen` names the shared
harness's C one (``../shared/bench/build/loadgen``), which leaves the server
more of the machine. Needs strace for the syscall table (skipped without it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchutil import ROOT, TICK, cpu_model, free_port, git_revision, wait_for_quiet

MULTICONN = f"{sys.executable} -m multiconn serve --port {{port}} --app echo --log-level warning"
SIZE = 1 << 20
CONNECTIONS = 4
#: Syscalls shown in the report, in this order; the rest are summed as "other".
SHOWN = ("recvfrom", "read", "sendmsg", "sendto", "write", "epoll_ctl", "epoll_wait", "epoll_pwait")



def start(command: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["taskset", "-c", "0", *command.format(port=port).split()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{command!r} exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    stop(proc)
    raise SystemExit(f"{command!r} did not listen on {port} within 30 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_and_faults(pid: int) -> tuple[float, int]:
    """Seconds of CPU and minor faults so far, over all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK, int(fields[7])


def load(port: int, duration: float, loadgen: str | None) -> int:
    """Frames echoed in `duration` seconds."""
    if loadgen:
        argv = [loadgen, "--port", str(port), "--mode", "framed", "--conns", str(CONNECTIONS),
                "--size", str(SIZE), "--duration", str(duration), "--warmup", "0"]
    else:
        argv = [sys.executable, "-m", "multiconn", "bench", "--port", str(port), "--mode", "framed",
                "--connections", str(CONNECTIONS), "--size", str(SIZE), "--duration", str(duration),
                "--warmup", "0", "--json"]
    out = subprocess.run(["taskset", "-c", "1", *argv], capture_output=True, text=True,
                         timeout=duration + 120, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result.get("errors"):
        raise SystemExit(f"the load generator saw errors: {result['errors']}")
    return int(result.get("completed", result.get("requests", 0)))


def measure(command: str, duration: float, loadgen: str | None) -> tuple[float, float, float]:
    """(MB/s, CPU µs per frame, minor faults per frame) of one run."""
    port = free_port()
    proc = start(command, port)
    try:
        load(port, 0.5, loadgen)  # warm-up: first buffers, caches
        cpu0, faults0 = cpu_and_faults(proc.pid)
        t0 = time.monotonic()
        frames = load(port, duration, loadgen)
        elapsed = time.monotonic() - t0
        cpu1, faults1 = cpu_and_faults(proc.pid)
    finally:
        stop(proc)
    frames = max(frames, 1)
    return frames * SIZE / elapsed / 1e6, (cpu1 - cpu0) / frames * 1e6, (faults1 - faults0) / frames


def syscalls(command: str, duration: float, loadgen: str | None, workdir: str) -> dict[str, float]:
    """Syscalls per frame, from ``strace -c -f`` attached for one measured load."""
    port = free_port()
    proc = start(command, port)
    out = os.path.join(workdir, f"strace.{port}")
    try:
        load(port, 0.5, loadgen)
        tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(proc.pid), "-o", out],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached
        frames = max(load(port, duration, loadgen), 1)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
    finally:
        stop(proc)
    counts: dict[str, float] = {}
    with open(out) as f:
        for line in f:
            match = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
            if match and match.group(2) != "total":
                counts[match.group(2)] = int(match.group(1)) / frames
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default 3)")
    parser.add_argument("--loadgen", help="the shared harness's C load generator (default: multiconn bench)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=COMMAND",
                        help="a framed echo server ({port} is filled in); default: this checkout's multiconn")
    args = parser.parse_args()
    targets = [t.split("=", 1) for t in args.target] or [["multiconn", MULTICONN]]
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in targets}
    for round_ in range(args.rounds):
        for name, command in targets[round_ % len(targets):] + targets[:round_ % len(targets)]:
            wait_for_quiet([0, 1], 60)
            runs[name].append(measure(command, args.duration, args.loadgen))
    traced: dict[str, dict[str, float]] = {}
    if shutil.which("strace"):
        with tempfile.TemporaryDirectory(prefix="bulk-") as workdir:
            for name, command in targets:
                traced[name] = syscalls(command, args.duration, args.loadgen, workdir)

    print(f"# Bulk echo per frame: {CONNECTIONS} connections x 1 MiB, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"\nmulticonn {git_revision(ROOT)}, {cpu_model()}, Python {sys.version.split()[0]}; "
          f"{args.rounds} interleaved rounds of {args.duration:g} s (medians); load generator: "
          f"{args.loadgen or 'multiconn bench'}\n")
    print("| target | MB/s | server CPU µs per frame | minor faults per frame |")
    print("|---|---:|---:|---:|")
    for name, _ in targets:
        mbps, cpu, faults = (statistics.median(column) for column in zip(*runs[name]))
        print(f"| {name} | {mbps:,.0f} | {cpu:,.0f} | {faults:.2f} |")
    if traced:
        print("\nSyscalls per frame (`strace -c -f`, one run each):\n")
        print("| target | " + " | ".join(SHOWN) + " | other |")
        print("|---|" + "---:|" * (len(SHOWN) + 1))
        for name, counts in traced.items():
            other = sum(v for k, v in counts.items() if k not in SHOWN)
            print(f"| {name} | " + " | ".join(f"{counts.get(k, 0):.2f}" for k in SHOWN) + f" | {other:.2f} |")


if __name__ == "__main__":
    main()

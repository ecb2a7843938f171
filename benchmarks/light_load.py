"""Server CPU per request under light load, as paired ratios of many short loads.

Why not the shared harness alone: at one connection a request's server CPU is
mostly the kernel's wake-up work, which on a shared VM moves by tens of
percent from one minute to the next, and the harness starts a fresh server
for each 5-second run, a few rounds apart. A difference of 5 % (what is left
between multiconn's raw echo and uvloop's) drowns in that. Here every server
starts once and stays up, pinned to CPU 0; the C load generator (on CPU 1)
loads each in turn for a short block (1 s by default), the order rotated
every pass, so adjacent blocks of two servers see the same host. A server's
CPU is the sum of its threads' run time from ``/proc/<pid>/task/*/schedstat``
(nanoseconds, not clock ticks). The ratio reported is the median of the
per-pass ratios to the baseline, with its quartiles.

    python benchmarks/light_load.py --pairs 40 \\
        --target 'multiconn=multiconn serve --port {port} --app raw-echo --log-level warning' \\
        --target 'floor=python benchmarks/peers/python_floor.py --port {port} --mode raw' \\
        --target 'uvloop=python benchmarks/peers/asyncio_protocol.py --port {port} --mode raw --loop uvloop'

The last target is the baseline unless ``--baseline`` names another. Needs the
shared harness's load generator (``make`` in ``../shared/bench``); Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from benchutil import ROOT, cpu_model, free_port, git_revision, wait_for_port

DEFAULT_LOADGEN = os.path.join(ROOT, "..", "shared", "bench", "build", "loadgen")
SERVER_CPU, LOADGEN_CPU = "0", "1"


def thread_cpu_ns(pid: int) -> int:
    """Run time of every thread of `pid` so far, in nanoseconds."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return total


def load(loadgen: str, port: int, args: argparse.Namespace) -> int:
    """One block of load on `port`; the requests it completed.

    No warm-up: the server's CPU is read around the whole block, so every
    request in it must be counted (a warm-up's requests are not)."""
    argv = ["taskset", "-c", LOADGEN_CPU, loadgen, "--port", str(port), "--conns", str(args.connections),
            "--size", str(args.size), "--duration", str(args.block), "--warmup", "0", "--mode", args.mode]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0 or "{" not in done.stdout:
        raise SystemExit(f"the load generator failed on port {port} (exit {done.returncode}): "
                         f"{done.stderr.strip() or done.stdout.strip()}")
    return int(json.loads(done.stdout[done.stdout.index("{"):])["completed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", required=True, metavar="NAME=COMMAND",
                        help="a server command with {port}; give two or more")
    parser.add_argument("--baseline", help="the target the others are divided by (default: the last)")
    parser.add_argument("--pairs", type=int, default=40, help="passes over all targets (default 40)")
    parser.add_argument("--block", type=float, default=1.0, help="seconds of load per block (default 1)")
    parser.add_argument("--connections", type=int, default=1, help="default 1")
    parser.add_argument("--size", type=int, default=64, help="message bytes (default 64)")
    parser.add_argument("--mode", choices=["raw", "framed"], default="raw")
    parser.add_argument("--loadgen", default=DEFAULT_LOADGEN, help="the C load generator (default: %(default)s)")
    args = parser.parse_args()
    targets = [t.split("=", 1) for t in args.target]
    if len(targets) < 2 or any(len(t) != 2 for t in targets):
        parser.error("give two or more --target NAME=COMMAND")
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (quartiles of one pair mean nothing)")
    names = [name for name, _ in targets]
    baseline = args.baseline or names[-1]
    if baseline not in names:
        parser.error(f"--baseline {baseline!r} is not a target")
    if not os.access(args.loadgen, os.X_OK):
        parser.error(f"no load generator at {args.loadgen} (run make in ../shared/bench, or give --loadgen)")

    servers: list[tuple[str, int, subprocess.Popen[bytes]]] = []
    cpu_per_request: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name, command in targets:
            port = free_port()
            argv = ["taskset", "-c", SERVER_CPU, "bash", "-c", "exec " + command.format(port=port)]
            servers.append((name, port, subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)))
            wait_for_port(port, servers[-1][2])
        for i in range(args.pairs):
            shift = i % len(servers)
            for name, port, proc in servers[shift:] + servers[:shift]:
                before = thread_cpu_ns(proc.pid)
                requests = load(args.loadgen, port, args)
                cpu_per_request[name].append((thread_cpu_ns(proc.pid) - before) / 1000 / max(requests, 1))
            print(f"pass {i + 1}/{args.pairs}", file=sys.stderr, flush=True)
    finally:
        for _, _, proc in servers:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    print(f"# Light load: server CPU per request, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print(f"multiconn {git_revision()}, {cpu_model()}, Python {sys.version.split()[0]}; {args.mode}, "
          f"{args.connections} connection(s), {args.size} B, {args.pairs} passes of {args.block:g} s per target\n")
    print(f"Command: `python benchmarks/light_load.py {shlex.join(sys.argv[1:])}`\n")
    print(f"| target | µs per request (median) | ÷ {baseline}: median of pairs | quartiles |")
    print("|---|---:|---:|---:|")
    for name in names:
        ratios = [a / b for a, b in zip(cpu_per_request[name], cpu_per_request[baseline])]
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"| {name} | {statistics.median(cpu_per_request[name]):.1f} | {statistics.median(ratios):.3f} "
              f"| {low:.3f}–{high:.3f} |")


if __name__ == "__main__":
    main()

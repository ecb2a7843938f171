"""What the PROXY protocol stage costs per connection.

    python benchmarks/proxy_cost.py [--rounds 5] [--duration 3] [--out benchmarks/results/proxy.md]

Short connections, one after another from several client processes: connect,
(send a PROXY v1 or v2 header), one small echo, close. The same `multiconn
serve --app echo` with and without `--proxy-protocol`, interleaved (A B C A B
C ...), server pinned to CPU 0 and the clients to CPU 1. Reported: connections
per second, and the server's CPU time per connection (from /proc), whose
difference is the stage's own cost.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

from multiconn import Frame, FrameDecoder, encode_frame
from multiconn.procstats import process_cpu_seconds
from multiconn.proxy import encode_v1, encode_v2
from multiconn.server_process import ServerProcess

VARIANTS = {
    "off": ((), None),
    "v1": (("--proxy-protocol", "v1"), "v1"),
    "v2": (("--proxy-protocol", "v2"), "v2"),
}
REQUEST = encode_frame(Frame.binary(b"x" * 64))
CLIENT_PROCESSES = 4


def client_loop(port: int, header_kind: str | None, deadline: float, counts: "multiprocessing.Queue[int]") -> None:
    os.sched_setaffinity(0, {1})
    done = 0
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local, peer = sock.getsockname()[:2], sock.getpeername()[:2]
            header = b""
            if header_kind == "v1":
                header = encode_v1(local, peer)
            elif header_kind == "v2":
                header = encode_v2(local, peer)
            sock.sendall(header + REQUEST)
            decoder = FrameDecoder()
            while not decoder.feed(sock.recv(4096)):
                pass
        done += 1
    counts.put(done)


def run_once(variant: str, duration: float) -> tuple[float, float]:
    args, header_kind = VARIANTS[variant]
    with ServerProcess("--app", "echo", "--log-level", "info", *args) as server:
        os.sched_setaffinity(server.pid, {0})
        assert server.port is not None
        counts: multiprocessing.Queue[int] = multiprocessing.Queue()
        deadline = time.monotonic() + duration
        cpu_before = process_cpu_seconds(server.pid) or 0.0
        clients = [multiprocessing.Process(target=client_loop, args=(server.port, header_kind, deadline, counts))
                   for _ in range(CLIENT_PROCESSES)]
        started = time.monotonic()
        for client in clients:
            client.start()
        total = sum(counts.get(timeout=duration + 30) for _ in clients)
        elapsed = time.monotonic() - started
        cpu = (process_cpu_seconds(server.pid) or 0.0) - cpu_before
        for client in clients:
            client.join()
    return total / elapsed, cpu / max(total, 1) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run (default 3)")
    parser.add_argument("--out", help="also write the markdown report here")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for round_number in range(args.rounds):
        order = names[round_number % len(names):] + names[:round_number % len(names)]
        for name in order:
            rate, cpu = run_once(name, args.duration)
            results[name].append((rate, cpu))
            print(f"round {round_number + 1} {name:>3}: {rate:8.0f} conn/s, {cpu:6.1f} µs server CPU/conn",
                  file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor())
    lines = [
        "# PROXY protocol stage: cost per connection",
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}; {cpu_model}, 2 cores, shared.",
        f"- {args.rounds} interleaved rounds of {args.duration:g} s per variant; server on CPU 0, "
        f"{CLIENT_PROCESSES} client processes on CPU 1; each connection: connect, header, one 64-byte echo, close.",
        f"- Command: `python benchmarks/proxy_cost.py --rounds {args.rounds} --duration {args.duration:g}`",
        "",
        "| variant | connections/s (median) | server CPU µs per connection (median) | ratio of conn/s to off |",
        "|---|---:|---:|---:|",
    ]
    base = [rate for rate, _ in results["off"]]
    for name in names:
        rates = [rate for rate, _ in results[name]]
        cpus = [cpu for _, cpu in results[name]]
        ratio = statistics.median(r / b for r, b in zip(rates, base))
        lines.append(f"| {name} | {statistics.median(rates):,.0f} | {statistics.median(cpus):.1f} | {ratio:.3f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as out:
            out.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

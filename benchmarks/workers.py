#!/usr/bin/env python3
"""``multiconn serve --workers 1`` against ``--workers 2``: throughput and server CPU per
request on a handler of about 1 ms of pure-Python work, and how 1,000 connections
spread over 2 workers.

    python benchmarks/workers.py                                   # 3 rounds of 5 s: 1 to 5 minutes
    python benchmarks/workers.py --rounds 3 --out benchmarks/results/workers.md
    python benchmarks/workers.py --quick                           # 1 round of 2 s: a smoke test

The handler (`app`, this very file imported by the server as ``workers:app``)
spins a loop of integer arithmetic for `--work-ms` (1 ms) of CPU, calibrated
once here with the thread's CPU clock and handed to every server process
through the environment, then echoes the request's content; a request whose
content is ``pid`` is answered with the worker's pid instead, at once. With
1 ms of work per request the server needs about 1 CPU-second per 1,000
requests while the load generator (this process: one epoll loop, ping-pong, each
answer's id and content checked) spends a few per cent of that, so on two
cores two workers can approach twice one worker's throughput.

Each run starts a fresh server (``--port 0``, unpinned, its workers free to use
both CPUs), waits up to 30 s for the machine to be quiet (other processes
below 30 % of a CPU), opens `--connections` connections (32) with one
request in flight each, loads for `--warmup` s, then measures for
`--duration` s: the answers received in the window, and the CPU time
(utime + stime from /proc) of the server's processes (the supervisor and its
workers) over the window, per answer. "Other load" is the CPU the rest of
the machine used during the window (all CPUs' busy time less the server's
and this process's): a run during which it exceeded 25 % of a CPU is run
again, up to 3 times in all, and the quietest kept. After the
throughput run of ``--workers 2``, 1,000 connections are opened at once and
each asks ``pid``: the spread is how many each worker holds.

Rounds interleave the two servers (1, 2, 1, 2, ...); the report holds every
round and the medians: req/s of each, the median of the per-round ratios
(target: 2 workers >= 1.7 x one), CPU per request, and the spread. Linux
only (/proc, SO_REUSEPORT). Every wait is bounded; a failed run is reported
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import select
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ITERATIONS_ENV = "WORKERS_BENCH_ITERATIONS"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 5.0
QUIET_BUSY_PCT = 30.0
QUIET_MAX_WAIT = 30.0
#: A run during which other processes used more than this (% of a CPU) is run again...
OTHER_LOAD_LIMIT_PCT = 25.0
#: ...up to this many times in all; the one with the least other load is kept.
ATTEMPTS = 3
SPREAD_CONNECTIONS = 1000


# -- the application (what the server imports) -----------------------------------------------


def spin(iterations: int) -> int:
    """Pure-Python work that holds the GIL."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def calibrate(seconds: float) -> int:
    """The `spin` count that takes about `seconds` of this thread's CPU (median of 7)."""
    clock = time.thread_time
    n = 1000
    while True:
        start = clock()
        spin(n)
        if clock() - start >= seconds / 4:
            break
        n *= 2
    times = []
    for _ in range(7):
        start = clock()
        spin(n)
        times.append(clock() - start)
    return max(1, round(n * seconds / statistics.median(times)))


def app(request):  # type: ignore[no-untyped-def]
    from multiconn import Frame

    content = bytes(request.content)
    if content == b"pid":
        return Frame.binary(str(os.getpid()).encode())
    spin(_iterations())
    return Frame.binary(content)


_ITERATIONS: int | None = None


def _iterations() -> int:
    global _ITERATIONS
    if _ITERATIONS is None:
        _ITERATIONS = int(os.environ.get(ITERATIONS_ENV) or 0) or calibrate(0.001)
    return _ITERATIONS


# -- measuring --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return 0.0
    fields = text[text.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as text:
            return [int(child) for child in text.read().split()]
    except OSError:
        return []


def server_pids(pid: int) -> list[int]:
    """The server and every process under it (workers, their handler pools)."""
    found = [pid]
    for child in children(pid):
        found.extend(server_pids(child))
    return found


def busy_seconds() -> float:
    """CPU time used by everything on the machine (all CPUs), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(own: list[int]) -> float:
    """Wait (up to QUIET_MAX_WAIT) until other processes use < QUIET_BUSY_PCT of a CPU; the last reading."""
    deadline = time.monotonic() + QUIET_MAX_WAIT
    while True:
        mine = sum(cpu_seconds(pid) for pid in own)
        busy = busy_seconds()
        time.sleep(0.5)
        other = (busy_seconds() - busy - (sum(cpu_seconds(pid) for pid in own) - mine)) / 0.5 * 100
        if other < QUIET_BUSY_PCT or time.monotonic() > deadline:
            return other


class BenchFailed(Exception):
    pass


def load(port: int, connections: int, warmup: float, duration: float,
         on_window: Callable[[bool], None]) -> tuple[int, float]:
    """Ping-pong on `connections` connections; (answers in the window, window seconds).

    `on_window(True)` is called as the window opens and `on_window(False)` as it closes.
    """
    from multiconn.protocol import Frame, FrameDecoder, encode_frame

    socks = []
    epoll = select.epoll()
    try:
        for _ in range(connections):
            sock = socket.create_connection((HOST, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            socks.append(sock)
        state = {}
        for index, sock in enumerate(socks):
            state[sock.fileno()] = [sock, FrameDecoder(), 0, f"c{index}-"]
            epoll.register(sock.fileno(), select.EPOLLIN)
            sock.send(encode_frame(Frame.binary(f"c{index}-0".encode(), id=0)))
        start = time.monotonic()
        window_start, window_end = start + warmup, start + warmup + duration
        in_window = False
        answered = 0
        outstanding = len(socks)
        while outstanding:
            now = time.monotonic()
            if not in_window and now >= window_start:
                in_window = True
                on_window(True)
            if in_window and now >= window_end:
                on_window(False)
                in_window = False
                window_start = float("inf")
                answered_in_window = answered
            if now > window_end + DRAIN_TIMEOUT:
                raise BenchFailed(f"{outstanding} requests unanswered {DRAIN_TIMEOUT:g} s after the window")
            for fd, _ in epoll.poll(0.05):
                sock, decoder, n, prefix = state[fd]
                data = sock.recv(65536)
                if not data:
                    raise BenchFailed("the server closed a connection")
                for frame in decoder.feed(data):
                    if frame.id != n or bytes(frame.content) != f"{prefix}{n}".encode():
                        raise BenchFailed(f"wrong answer on {prefix}: {frame.id!r} {bytes(frame.content)[:40]!r}")
                    if window_start <= time.monotonic() < window_end:
                        answered += 1
                    n += 1
                    state[fd][2] = n
                    if time.monotonic() < window_end:
                        sock.send(encode_frame(Frame.binary(f"{prefix}{n}".encode(), id=n)))
                    else:
                        outstanding -= 1
        return answered_in_window, duration
    finally:
        epoll.close()
        for sock in socks:
            sock.close()


def spread(port: int, count: int) -> Counter:
    """Open `count` connections at once, ask each for its worker's pid; connections per pid."""
    from multiconn.protocol import Frame, FrameDecoder, encode_frame

    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((HOST, port))
            socks.append(sock)
        request = encode_frame(Frame.binary(b"pid"))
        held: Counter = Counter()
        for sock in socks:
            select.select([], [sock], [], 10)
            sock.setblocking(True)
            sock.settimeout(10)
            sock.sendall(request)
        for sock in socks:
            decoder = FrameDecoder()
            frames: list = []
            while not frames:
                data = sock.recv(4096)
                if not data:
                    raise BenchFailed("closed before answering pid")
                frames = decoder.feed(data)
            held[int(frames[0].content)] += 1
        return held
    finally:
        for sock in socks:
            sock.close()


def run_once(workers: int, args: argparse.Namespace, iterations: int) -> dict:
    from multiconn.server_process import ServerProcess

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.path.join(ROOT, "src"), env.get("PYTHONPATH")]))
    env[ITERATIONS_ENV] = str(iterations)
    env.pop("PYTHONWARNINGS", None)
    server = ServerProcess("--workers", str(workers), "--app", "workers:app", env=env, start_new_session=True)
    result: dict = {"workers": workers}
    try:
        server.start(START_TIMEOUT)
        result["quiet_before"] = wait_for_quiet([os.getpid(), *server_pids(server.pid)])
        marks: dict = {}

        def on_window(opening: bool) -> None:
            pids = server_pids(server.pid)
            key = "start" if opening else "end"
            marks[key] = (sum(cpu_seconds(pid) for pid in pids), cpu_seconds(os.getpid()), busy_seconds(),
                          time.monotonic())

        answered, _ = load(server.port, args.connections, args.warmup, args.duration, on_window)
        (server0, own0, busy0, t0), (server1, own1, busy1, t1) = marks["start"], marks["end"]
        seconds = t1 - t0
        result["rps"] = answered / seconds
        result["cpu_us"] = (server1 - server0) / max(answered, 1) * 1e6
        result["server_cpus"] = (server1 - server0) / seconds
        result["loadgen_cpus"] = (own1 - own0) / seconds
        result["other_pct"] = max(0.0, (busy1 - busy0) - (server1 - server0) - (own1 - own0)) / seconds * 100
        if workers > 1:
            result["spread"] = sorted(spread(server.port, SPREAD_CONNECTIONS).values(), reverse=True)
        if "Traceback" in server.stderr:
            raise BenchFailed("the server printed a traceback")
    except Exception as exc:  # noqa: BLE001 - reported, and the exit status says so
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            status = server.stop(15)
        except Exception as exc:  # noqa: BLE001
            status = None
            result.setdefault("error", f"stop: {exc}")
        if status not in (0, None) and "error" not in result:
            result["error"] = f"the server exited with status {status}"
        if server.proc is not None:
            try:
                os.killpg(server.proc.pid, signal.SIGKILL)  # anything left of its session
            except (ProcessLookupError, PermissionError):
                pass
    return result


# -- the report ---------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(runs: list[dict], args: argparse.Namespace, iterations: int, started: str) -> str:
    lines = [
        "# `--workers 1` against `--workers 2`",
        "",
        f"`python benchmarks/workers.py --rounds {args.rounds} --duration {args.duration:g} --warmup {args.warmup:g} "
        f"--connections {args.connections}`, {started}; {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}. "
        f"Handler: {args.work_ms:g} ms of pure-Python work per request ({iterations} loop iterations, "
        f"calibrated here), answered with the request's content. Ping-pong, {args.connections} connections, "
        "one request in flight each. CPU/request is the server's (supervisor + workers) user + system time "
        "over the window per answer; other load is what the rest of the machine used meanwhile (a run with "
        f"more than {OTHER_LOAD_LIMIT_PCT:g} % was run again, up to {ATTEMPTS} times, keeping the quietest: "
        "attempts says how many it took).",
        "",
        "| round | workers | req/s | server CPU/request | server CPUs busy | load generator CPUs | other load | "
        f"attempts | spread of {SPREAD_CONNECTIONS:,} connections |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        if "error" in run:
            lines.append(f"| {run['round']} | {run['workers']} | failed: {run['error']} | | | | | | |")
            continue
        spread_text = " / ".join(str(n) for n in run.get("spread", [])) or "-"
        lines.append(
            f"| {run['round']} | {run['workers']} | {run['rps']:,.0f} | {run['cpu_us']:,.0f} µs | "
            f"{run['server_cpus']:.2f} | {run['loadgen_cpus']:.2f} | {run['other_pct']:.0f} % | {run['attempts']} | "
            f"{spread_text} |")
    ok = [run for run in runs if "error" not in run]
    one = [run for run in ok if run["workers"] == 1]
    two = [run for run in ok if run["workers"] == 2]
    ratios = []
    for round_ in sorted({run["round"] for run in ok}):
        a = [run for run in one if run["round"] == round_]
        b = [run for run in two if run["round"] == round_]
        if a and b:
            ratios.append(b[0]["rps"] / a[0]["rps"])
    median = statistics.median
    lines += ["", "Medians over rounds:", "",
              "| | 1 worker | 2 workers |", "|---|---:|---:|",
              f"| req/s | {fmt(median([r['rps'] for r in one]) if one else None, ',.0f')} | "
              f"{fmt(median([r['rps'] for r in two]) if two else None, ',.0f')} |",
              f"| server CPU/request | {fmt(median([r['cpu_us'] for r in one]) if one else None, ',.0f')} µs | "
              f"{fmt(median([r['cpu_us'] for r in two]) if two else None, ',.0f')} µs |", ""]
    if ratios:
        verdict = "met" if median(ratios) >= 1.7 else "NOT met"
        lines.append(f"2 workers ÷ 1 worker: **{median(ratios):.3f}×** (median of the per-round ratios "
                     f"{', '.join(f'{r:.3f}' for r in ratios)}; target 1.7×: {verdict}).")
    shares = [max(run["spread"]) / SPREAD_CONNECTIONS for run in two if run.get("spread")]
    if shares:
        lines.append(f"Spread: the busiest of 2 workers held at most {max(shares):.1%} of "
                     f"{SPREAD_CONNECTIONS:,} connections (target: at most 60 %).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See the module docstring (head -40 benchmarks/workers.py) for the method.")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running 1 then 2 workers (default 3)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured window per run, s (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="load before the window, s (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="ping-pong connections (default 32)")
    parser.add_argument("--work-ms", type=float, default=1.0, help="handler CPU per request, ms (default 1)")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s windows, 0.5 s warmup")
    parser.add_argument("--out", help="also write the report (Markdown) to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2.0, 0.5
    if not (1 <= args.rounds <= 20 and 0 < args.duration <= 60 and 0 <= args.warmup <= 30
            and 1 <= args.connections <= 1000 and 0 < args.work_ms <= 100):
        parser.error("out of range: 1-20 rounds, 0-60 s windows, 0-30 s warmup, 1-1000 connections, 0-100 ms work")
    if not sys.platform.startswith("linux"):
        parser.error("Linux only (/proc, SO_REUSEPORT)")
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from multiconn.server import raise_nofile_limit

    raise_nofile_limit()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    iterations = calibrate(args.work_ms / 1000)
    print(f"calibrated: {iterations} iterations = {args.work_ms:g} ms", file=sys.stderr)
    runs = []
    for round_ in range(1, args.rounds + 1):
        for workers in (1, 2):
            tries = []
            for attempt in range(1, ATTEMPTS + 1):
                run = run_once(workers, args, iterations)
                tries.append(run)
                if "error" in run or run["other_pct"] <= OTHER_LOAD_LIMIT_PCT or attempt == ATTEMPTS:
                    break
                print(f"round {round_}, {workers} worker(s): other load {run['other_pct']:.0f} %: again",
                      file=sys.stderr)
            run = min(tries, key=lambda r: r.get("other_pct", 0.0) if "error" not in r else -1.0)
            run["round"] = round_
            run["attempts"] = len(tries)
            runs.append(run)
            summary = run.get("error") or f"{run['rps']:,.0f} req/s, {run['cpu_us']:,.0f} µs CPU/request, " \
                f"other load {run['other_pct']:.0f} %" + (f", spread {run['spread']}" if "spread" in run else "")
            print(f"round {round_}, {workers} worker{'s' if workers > 1 else ''}: {summary}", file=sys.stderr)
    text = report(runs, args, iterations, started)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(text)
    return 1 if any("error" in run for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

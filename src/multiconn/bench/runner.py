"""Orchestration: the embedded server, the worker processes, the phases, the result.

Theory of operation
-------------------
The parent starts the echo server when no port is given (a ``multiconn serve
--port 0`` subprocess whose port is read from its log line), then
``processes`` workers (``spawn``, `multiconn.bench.worker`), each driving its
share of the connections over one selector. Workers connect, report ready, and
wait for one "go" carrying the start time; phase boundaries are
CLOCK_MONOTONIC instants, the same clock in every process. The parent only
sleeps: it samples the server's CPU time at the window's edges and draws the
progress line from a shared array each worker writes its completed count
into. The embedded server and the workers are stopped on every way out,
KeyboardInterrupt and SIGTERM included.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import threading
import time
from array import array
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait as wait_pipes
from typing import Any, TextIO, cast

from ..errors import ServerStartError
from ..protocol import DEFAULT_MAX_CONTENT
from ..server_process import ServerProcess
from .options import DRAIN_TIMEOUT, BenchError, BenchOptions
from .progress import ProgressLine
from .results import BenchResult, percentiles_us
from .worker import WorkerPlan, worker_main

__all__ = ["run", "start_embedded_server"]

#: How long the embedded server has to log its port.
SERVER_START_TIMEOUT = 10.0
#: After SIGTERM, how long the embedded server has to exit before SIGKILL.
SERVER_STOP_TIMEOUT = 5.0
#: Workers start, connect and report ready within ``timeout`` plus this.
WORKER_START_GRACE = 30.0
#: Workers report within this long after the drain.
WORKER_REPORT_GRACE = 10.0


def start_embedded_server(host: str, app: str, max_content: int) -> ServerProcess:
    """``multiconn serve --port 0`` in a subprocess; raises `BenchError`."""
    server = ServerProcess("--host", host, "--app", app, "--max-content", str(max_content),
                           "--log-level", "info")
    try:
        return server.start(SERVER_START_TIMEOUT)
    except ServerStartError as exc:
        raise BenchError(str(exc)) from None


def _resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise BenchError(f"cannot resolve {host!r}: {getattr(exc, 'strerror', None) or 'invalid host name'}") from None
    family, _type, _proto, _name, address = infos[0]
    return family, address


def _split(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` shares, the remainder one each to the first."""
    share, extra = divmod(total, parts)
    return [share + (1 if index < extra else 0) for index in range(parts)]


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, raised as KeyboardInterrupt so that every cleanup path runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Interrupted()


def run(options: BenchOptions, *, progress: TextIO | None = None) -> BenchResult:
    """Run one benchmark; raises `BenchError` when it cannot run at all.

    The embedded server (no `options.port`) and the workers are stopped on
    every way out, KeyboardInterrupt and SIGTERM included. `progress`: a stream
    for the live progress line (a TTY), or None.
    """
    options.validate()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    server: ServerProcess | None = None
    processes: list[multiprocessing.process.BaseProcess] = []
    try:
        port = options.port
        if port is None:
            app = "echo" if options.mode == "framed" else "raw-echo"
            server = start_embedded_server(options.host, app, max(DEFAULT_MAX_CONTENT, options.size))
            port = server.port
            assert port is not None  # start() returns once the server reported it
        return _run_workers(options, port, server, processes, progress)
    finally:
        try:
            for process in processes:
                if process.is_alive():
                    process.terminate()
            for process in processes:
                process.join(2.0)
                if process.is_alive():
                    process.kill()
                    process.join()
        finally:
            if server is not None:
                server.stop(SERVER_STOP_TIMEOUT)
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)


def _run_workers(options: BenchOptions, port: int, server: ServerProcess | None,
                 processes: list[Any], progress_stream: TextIO | None) -> BenchResult:
    family, address = _resolve(options.host, port)
    target = f"[{options.host}]:{port}" if ":" in options.host else f"{options.host}:{port}"
    context = multiprocessing.get_context("spawn")
    counts = context.RawArray("q", options.processes)
    channels: dict[Pipe, int] = {}
    first = 0
    for slot, share in enumerate(_split(options.connections, options.processes)):
        plan = WorkerPlan(slot=slot, first_connection=first, connections=share, family=family,
                           address=address, target=target, mode=options.mode, size=options.size,
                           pipeline=options.pipeline, timeout=options.timeout)
        first += share
        parent_end, child_end = context.Pipe()
        process = context.Process(target=worker_main, args=(plan, child_end, counts),
                                  name=f"multiconn-bench-{slot}", daemon=True)
        process.start()
        child_end.close()
        processes.append(process)
        channels[parent_end] = slot

    # Every connection of every worker is open before any request is sent.
    waiting = dict(channels)
    deadline = time.monotonic() + options.timeout + WORKER_START_GRACE
    while waiting:
        # wait() returns some of the objects it was given: here, pipes.
        ready = cast("list[Pipe]", wait_pipes(list(waiting), timeout=max(0.0, deadline - time.monotonic())))
        if not ready:
            raise BenchError(f"{len(waiting)} worker processes did not get ready in time")
        for channel in ready:
            slot = waiting.pop(channel)
            kind, detail = _receive(channel)
            if kind != "ready":
                raise BenchError(detail if kind == "failed" else f"worker {slot + 1} failed: {detail}")

    start = time.monotonic()
    t_measure = start + options.warmup
    t_end = t_measure + options.duration
    for channel in channels:
        try:
            channel.send(("go", start, options.warmup, options.duration))
        except OSError:
            pass  # it died since it said ready: its report reads as a crash below
    progress = ProgressLine(progress_stream, counts, start, options.warmup, options.duration)
    cpu_start = cpu_end = None
    reports: dict[int, tuple[str, Any]] = {}
    waiting = dict(channels)
    hard_deadline = t_end + DRAIN_TIMEOUT + WORKER_REPORT_GRACE
    try:
        while waiting:
            now = time.monotonic()
            if server is not None:
                if cpu_start is None and now >= t_measure:
                    cpu_start = server.cpu_seconds()
                if cpu_end is None and now >= t_end:
                    cpu_end = server.cpu_seconds()
            if now >= hard_deadline:
                break
            progress.update(now)
            wake = min(hard_deadline, progress.next if progress_stream is not None else hard_deadline,
                       t_measure if now < t_measure else t_end if now < t_end else hard_deadline)
            for channel in cast("list[Pipe]", wait_pipes(list(waiting), timeout=max(0.0, wake - now))):
                slot = waiting.pop(channel)
                reports[slot] = _receive(channel)
    finally:
        progress.clear()
    if server is not None and cpu_end is None and cpu_start is not None:
        cpu_end = server.cpu_seconds()  # every worker stopped early

    requests = errors = outstanding = 0
    samples: dict[str, str] = {}
    latencies = array("d")
    cpu_percent: list[float] = []
    for slot in range(options.processes):
        kind, detail = reports.get(slot, ("crashed", "no report in time"))
        if kind != "done":
            errors += 1
            samples.setdefault("worker", f"worker {slot + 1} failed: {detail}")
            continue
        requests += detail["measured"]
        outstanding += detail["outstanding"]
        latencies.extend(detail["latencies"])
        cpu_percent.append(100.0 * detail["cpu_seconds"] / options.duration)
        for error_kind, (count, sample) in detail["errors"].items():
            errors += count
            samples.setdefault(error_kind, sample)

    server_cpu = None
    if cpu_start is not None and cpu_end is not None and requests:
        server_cpu = (cpu_end - cpu_start) * 1e6 / requests
    return BenchResult(
        options=options, duration_s=options.duration, requests=requests, errors=errors,
        error_samples=[f"{kind}: {sample}" for kind, sample in samples.items()],
        latency_us=percentiles_us(latencies), server_cpu_us_per_request=server_cpu,
        server_pid=server.pid if server is not None else None,
        client_cpu_percent=sum(cpu_percent) / len(cpu_percent) if cpu_percent else None,
        outstanding_after_drain=outstanding, target=target,
    )


def _receive(channel: Pipe) -> tuple[str, Any]:
    """One message from a worker; a dead worker reads as ("crashed", why)."""
    try:
        return cast("tuple[str, Any]", channel.recv())
    except (EOFError, OSError):
        return "crashed", "it exited without a word"

"""`multiconn bench`: a load generator for echo servers, in Python.

It mirrors ``bench/loadgen.c``: open every connection first, keep ``pipeline``
requests in flight on each, verify every byte of every response, and time each
request from the moment it is queued to the moment its response is complete.
A warm-up is not counted; the measured window follows; then no new requests
are issued, the outstanding ones are drained (for at most `DRAIN_TIMEOUT`) and
the connections are closed.

Theory of operation
-------------------
1. Processes. The parent starts the echo server when no port is given (a
   ``multiconn serve --port 0`` subprocess whose port is read from its log line),
   then ``processes`` workers (``spawn``), each driving its share of the
   connections over one selector. Workers connect, report ready, and wait for
   one "go" carrying the start time; phase boundaries are CLOCK_MONOTONIC
   instants, the same clock in every process. The parent only sleeps: it samples
   the server's CPU time at the window's edges and draws the progress line from
   a shared array each worker writes its completed count into.
2. The request ring. Requests differ per request (a sliding window over a random
   block), but they are not built per request: a worker builds, once, the bytes
   of ``W`` requests back to back plus ``E`` more that repeat the first ones, the
   *ring*. Request ``k`` of a connection is ring slot ``(base + k) % W``, so the
   requests a connection has to send are always one contiguous slice of the
   ring, and all of them go out in one ``send`` of a memoryview: no join, no
   copy, whatever the pipeline depth.
3. Verification is a bytes comparison. An echo answers request bytes with the
   same bytes: in raw mode by definition, and in framed mode because multiconn's
   ``echo`` answers our header (``encode_header`` of the same keys) with the same
   header bytes. So the response stream a connection expects is the very ring
   slice it sent, and one ``data == ring[pos:pos + n]`` (a memcmp) verifies every
   byte of a ``recv``, however many responses it holds. In framed mode a server
   is free to spell its header differently (key order, spacing, extra keys): on
   the first mismatch the connection falls back, for good, to a `FrameDecoder`
   fed from the start of the current response, and checks each frame's
   content-type, content-encoding and content. In raw mode a mismatch is an
   error.
4. Errors (a mismatch, an unexpected close or reset, a malformed frame, a
   response to nothing, no response within ``timeout``) close the connection
   they happen on and are counted by kind; the first description of each kind
   is kept. The others carry on.
5. Latencies go into one ``array('d')`` per worker (8 bytes per request) and are
   merged and sorted in the parent for the percentiles.

A ``recv`` asks for `RECV_SIZE` bytes. ``recv`` allocates that much and then
shrinks it; at 128 KiB and above glibc's malloc serves it with mmap and munmap
(until some large free happens to raise its dynamic threshold), which costs
more than the system call itself.
"""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import random
import selectors
import signal
import socket
import sys
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass
from itertools import repeat
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait as wait_pipes
from typing import Any, Sequence, TextIO

from .errors import ProtocolError, ServerStartError
from .protocol import DEFAULT_MAX_CONTENT, FrameDecoder, encode_header
from .server_process import ServerProcess

__all__ = ["BenchError", "BenchOptions", "BenchResult", "run"]

MODES = ("framed", "raw")
CONTENT_TYPE = "binary/octet-stream"
CONTENT_ENCODING = "binary"

#: Bytes asked of one recv (below glibc's default 128 KiB mmap threshold, see above).
RECV_SIZE = 64 * 1024
#: Distinct requests in a worker's ring, at most ...
RING_REQUESTS = 64
#: ... and at most about this many bytes (but never fewer than 2 requests).
RING_BYTES = 8 * 1024 * 1024
#: After the measured window, how long outstanding responses are waited for.
DRAIN_TIMEOUT = 2.0
#: How long the embedded server has to log its port.
SERVER_START_TIMEOUT = 10.0
#: After SIGTERM, how long the embedded server has to exit before SIGKILL.
SERVER_STOP_TIMEOUT = 5.0
#: Workers start, connect and report ready within ``timeout`` plus this.
WORKER_START_GRACE = 30.0
#: Workers report within this long after the drain.
WORKER_REPORT_GRACE = 10.0
#: The live progress line is redrawn this often.
PROGRESS_INTERVAL = 0.5
#: A worker publishes its progress and checks timeouts this often.
HOUSEKEEPING_INTERVAL = 0.1


class BenchError(Exception):
    """The benchmark could not run (no server, no connection); one readable line."""


@dataclass(frozen=True)
class BenchOptions:
    """What to run; the defaults are the command line's."""

    host: str = "127.0.0.1"
    #: None: start an echo server on a free port and stop it at the end.
    port: int | None = None
    connections: int = 50
    size: int = 64
    pipeline: int = 1
    duration: float = 5.0
    warmup: float = 1.0
    mode: str = "framed"
    processes: int = 1
    timeout: float = 10.0

    def validate(self) -> None:
        """Raise ValueError naming the first option out of range."""
        checks = [
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            (self.connections >= 1, "connections must be >= 1"),
            (self.size >= (1 if self.mode == "raw" else 0),
             "size must be >= 1 in raw mode" if self.mode == "raw" else "size must be >= 0"),
            (self.pipeline >= 1, "pipeline must be >= 1"),
            (self.duration > 0, "duration must be > 0"),
            (self.warmup >= 0, "warmup must be >= 0"),
            (self.processes >= 1, "processes must be >= 1"),
            (self.processes <= self.connections, "processes must not exceed connections"),
            (self.timeout > 0, "timeout must be > 0"),
            (self.port is None or 0 < self.port <= 65535, "port must be 1..65535"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# -- the embedded server --------------------------------------------------


def start_embedded_server(host: str, app: str, max_content: int) -> ServerProcess:
    """``multiconn serve --port 0`` in a subprocess; raises `BenchError`."""
    server = ServerProcess("--host", host, "--app", app, "--max-content", str(max_content),
                           "--log-level", "info")
    try:
        return server.start(SERVER_START_TIMEOUT)
    except ServerStartError as exc:
        raise BenchError(str(exc)) from None


# -- the worker -----------------------------------------------------------


@dataclass(frozen=True)
class _WorkerPlan:
    """Everything one worker process needs: plain, picklable data."""

    slot: int
    first_connection: int
    connections: int
    family: int
    address: tuple
    target: str  # host:port, for messages
    mode: str
    size: int
    pipeline: int
    timeout: float


class _Conn:
    """The state of one connection (see "The request ring" above)."""

    __slots__ = ("index", "sock", "queued", "sidx", "unsent", "sent_part", "inflight",
                 "rpos", "decoder", "ridx", "writing", "responses")

    def __init__(self, index: int, sock: socket.socket, base: int, request_len: int) -> None:
        self.index = index
        self.sock: socket.socket | None = sock
        #: Queue time of every request not yet answered, oldest first.
        self.queued: deque[float] = deque()
        #: Ring slot of the first request not completely sent, and how many are unsent.
        self.sidx = base
        self.unsent = 0
        #: Bytes of request `sidx` already sent.
        self.sent_part = 0
        #: Bytes sent and not yet echoed (fast path only).
        self.inflight = 0
        #: Ring position of the next expected response byte (fast path).
        self.rpos = base * request_len
        #: Set once the server's bytes differ from our own: frames are then decoded.
        self.decoder: FrameDecoder | None = None
        #: Ring slot of the next expected response (decoder path).
        self.ridx = base
        self.writing = False
        self.responses = 0


class _Worker:
    """Drives a share of the connections over one selector, in one process."""

    def __init__(self, plan: _WorkerPlan, progress: Any) -> None:
        self.plan = plan
        self.progress = progress
        self.framed = plan.mode == "framed"
        header = (encode_header({"content-type": CONTENT_TYPE, "content-encoding": CONTENT_ENCODING}, plan.size)
                  if self.framed else b"")
        self.request_len = length = len(header) + plan.size
        self.window = window = max(2, min(RING_REQUESTS, RING_BYTES // length))
        extra = min(plan.pipeline, window)
        pool = random.Random(plan.slot).randbytes(plan.size + window)
        self.contents = [pool[i:i + plan.size] for i in range(window)]
        self.ring = b"".join(header + self.contents[i % window] for i in range(window + extra))
        self.ring_view = memoryview(self.ring)
        self.ring_slots = window + extra
        self.selector = selectors.DefaultSelector()
        self.conns: list[_Conn] = []
        self.open = 0
        self.errors: dict[str, list[Any]] = {}
        self.latencies = array("d")
        self.completed = 0
        self.measured = 0
        self.outstanding_at_end = 0
        self.cpu_seconds = 0.0

    # -- connecting -------------------------------------------------------

    def connect(self) -> str | None:
        """Open every connection; None, or why it could not."""
        plan = self.plan
        deadline = time.monotonic() + plan.timeout
        selector = self.selector
        for index in range(plan.first_connection, plan.first_connection + plan.connections):
            try:
                sock = socket.socket(plan.family, socket.SOCK_STREAM)
            except OSError as exc:
                return f"cannot open connection {index + 1}: {exc.strerror or exc}"
            sock.setblocking(False)
            conn = _Conn(index, sock, index % self.window, self.request_len)
            self.conns.append(conn)
            err = sock.connect_ex(plan.address)
            if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
                return f"cannot connect to {plan.target}: {os.strerror(err)}"
            selector.register(sock, selectors.EVENT_WRITE, conn)
        pending = len(self.conns)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return (f"cannot connect to {plan.target}: {pending} of {plan.connections} connections "
                        f"not established within {plan.timeout:g} s")
            for key, mask in selector.select(min(remaining, 1.0)):
                if not mask & selectors.EVENT_WRITE:  # connected already, and the server spoke first
                    continue
                conn = key.data
                sock = conn.sock
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    return f"cannot connect to {plan.target}: {os.strerror(err)}"
                if plan.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                selector.modify(sock, selectors.EVENT_READ, conn)
                pending -= 1
        self.open = len(self.conns)
        return None

    # -- running ----------------------------------------------------------

    def run(self, start: float, warmup: float, duration: float) -> None:
        """Warm up, measure, drain; `start` is a time.monotonic() instant."""
        perf = time.perf_counter
        offset = perf() - time.monotonic()
        t_measure = start + warmup + offset
        t_end = t_measure + duration
        pipeline = self.plan.pipeline
        progress, slot = self.progress, self.plan.slot
        sweep_every = min(1.0, self.plan.timeout / 4)

        ring, ring_len, ring_view, ring_slots = self.ring, len(self.ring), self.ring_view, self.ring_slots
        length = self.request_len
        window = self.window
        window_bytes = window * length
        select = self.selector.select
        flush = self._flush
        record = self.latencies.append
        completed = measured = 0
        stopping = measuring = False
        cpu_start = 0.0
        drain_deadline = math.inf

        now = perf()
        for conn in self.conns:
            conn.queued.extend(repeat(now, pipeline))
            conn.unsent = pipeline
            flush(conn)
        next_sweep = now + sweep_every
        next_tick = now
        while self.open:
            now = perf()
            if now >= next_tick:
                progress[slot] = completed
                if not measuring and now >= t_measure:
                    measuring = True
                    cpu_start = time.process_time()
                if not stopping and now >= t_end:
                    stopping = True
                    self.cpu_seconds = time.process_time() - cpu_start
                    drain_deadline = now + DRAIN_TIMEOUT
                    for conn in self.conns:
                        if conn.sock is not None and not conn.queued:
                            self._close(conn)
                if now >= drain_deadline:
                    break
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + sweep_every
                next_tick = min(now + HOUSEKEEPING_INTERVAL, next_sweep,
                                t_measure if not measuring else drain_deadline if stopping else t_end)
            for key, mask in select(max(0.0, next_tick - now)):
                conn = key.data
                sock = conn.sock
                if sock is None:  # closed by an earlier event of this batch
                    continue
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError as exc:
                        self._fail(conn, "closed", f"{self._outstanding(conn)}: {exc.strerror or exc}")
                        continue
                    if data is not None:
                        n = len(data)
                        if not n:
                            self._fail(conn, "closed", f"{self._outstanding(conn)}: the server closed it")
                            continue
                        now = perf()
                        pos = conn.rpos
                        end = pos + n
                        if (conn.decoder is None and n <= conn.inflight and end <= ring_len
                                and data == ring[pos:end]):
                            # Every byte is what was sent (see "Verification").
                            conn.inflight -= n
                            done = end // length - pos // length
                            conn.rpos = end - window_bytes if end >= window_bytes else end
                        else:
                            done = self._receive_slow(conn, data)
                            if done < 0:
                                continue
                        if done:
                            conn.responses += done
                            completed += done
                            queued = conn.queued
                            if t_measure <= now < t_end:
                                measured += done
                                for _ in range(done):
                                    record(now - queued.popleft())
                            else:
                                for _ in range(done):
                                    queued.popleft()
                            if stopping:
                                if not queued:
                                    self._close(conn)
                                continue
                            # As many new requests as were answered, queued now.
                            if done == 1:
                                queued.append(now)
                            else:
                                queued.extend(repeat(now, done))
                            if conn.writing:  # still sending older ones: EVENT_WRITE will
                                conn.unsent += done
                                continue
                            # Nothing was unsent, so the new requests are one ring slice
                            # from `sidx`; the common case, inlined: it all goes at once.
                            conn.unsent = done
                            first = conn.sidx
                            last = first + done
                            if last <= ring_slots:
                                try:
                                    sent = sock.send(ring_view[first * length:last * length])
                                except OSError:
                                    sent = 0  # _flush retries, and tells an error from EAGAIN
                                if sent == done * length:
                                    conn.unsent = 0
                                    conn.inflight += sent
                                    conn.sidx = last - window if last >= window else last
                                    continue
                                if sent:
                                    conn.inflight += sent
                                    sent_done, conn.sent_part = divmod(sent, length)
                                    conn.unsent -= sent_done
                                    conn.sidx = (first + sent_done) % window
                            flush(conn)  # the general case: the rest of a partial send, wrapping
                            continue
                if mask & selectors.EVENT_WRITE and conn.unsent:
                    flush(conn)
        if not stopping:  # every connection failed before the end
            self.cpu_seconds = time.process_time() - cpu_start if measuring else 0.0
        progress[slot] = completed
        self.completed, self.measured = completed, measured
        for conn in self.conns:
            if conn.sock is not None:
                self.outstanding_at_end += len(conn.queued)
                self._close(conn)

    def _flush(self, conn: _Conn) -> None:
        """Send the connection's unsent requests: one slice of the ring per send."""
        sock = conn.sock
        length = self.request_len
        while conn.unsent:
            first = conn.sidx
            count = min(conn.unsent, self.ring_slots - first)
            start = first * length + conn.sent_part
            stop = (first + count) * length
            try:
                sent = sock.send(self.ring_view[start:stop])
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fail(conn, "closed", f"{self._outstanding(conn)}: send failed: {exc.strerror or exc}")
                return
            conn.inflight += sent
            done, conn.sent_part = divmod(conn.sent_part + sent, length)
            conn.unsent -= done
            conn.sidx = (first + done) % self.window
            if sent < stop - start:
                break
        want_write = conn.unsent > 0
        if want_write != conn.writing:
            conn.writing = want_write
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.selector.modify(sock, events, conn)

    def _receive_slow(self, conn: _Conn, data: bytes) -> int:
        """Responses completed by `data` off the fast path; -1 if the connection failed."""
        if conn.decoder is None:
            expected = self._expected(conn.rpos, min(len(data), conn.inflight))
            if len(data) <= conn.inflight and data == expected:  # it wrapped around the ring
                partial = conn.rpos % self.request_len
                conn.inflight -= len(data)
                conn.rpos = (conn.rpos + len(data)) % (self.window * self.request_len)
                return (partial + len(data)) // self.request_len
            if not self.framed:
                self._fail(conn, *self._describe_raw(conn, data, expected))
                return -1
            # The server spells its frames differently: decode from the start
            # of the current response (the bytes before it were ours).
            partial = conn.rpos % self.request_len
            conn.ridx = conn.rpos // self.request_len
            conn.decoder = FrameDecoder(max(DEFAULT_MAX_CONTENT, self.plan.size))
            data = self.ring[conn.rpos - partial:conn.rpos] + data
        try:
            frames = conn.decoder.feed(data)
        except ProtocolError as exc:
            self._fail(conn, "protocol", f"response {conn.responses + len(exc.frames) + 1}: "  # type: ignore[attr-defined]
                                         f"malformed frame: {exc}")
            return -1
        sent = len(conn.queued) - conn.unsent
        for number, frame in enumerate(frames):
            if number >= sent:
                self._fail(conn, "unexpected", f"a response ({len(frames)} in all) to a request not sent")
                return -1
            problem = self._check_frame(frame, conn.ridx)
            if problem:
                self._fail(conn, "mismatch", f"response {conn.responses + number + 1}: {problem}")
                return -1
            conn.ridx = (conn.ridx + 1) % self.window
        return len(frames)

    def _expected(self, pos: int, count: int) -> bytes:
        """`count` expected bytes from ring position `pos`, wrapping around the window."""
        window_bytes = self.window * self.request_len
        parts = []
        while count > 0:
            take = min(count, window_bytes - pos)
            parts.append(self.ring[pos:pos + take])
            count -= take
            pos = 0
        return b"".join(parts)

    def _describe_raw(self, conn: _Conn, data: bytes, expected: bytes) -> tuple[str, str]:
        at = _first_difference(data, expected)
        if at == len(expected) and len(data) > len(expected):
            return "unexpected", f"{len(data) - len(expected)} more bytes than were sent"
        offset = conn.rpos % self.request_len + at
        number = conn.responses + offset // self.request_len + 1
        return "mismatch", (f"response {number}: echoed bytes differ from the request at byte "
                            f"{offset % self.request_len} of {self.request_len}")

    def _check_frame(self, frame: Any, slot: int) -> str | None:
        """Why `frame` is not the echo of request slot `slot`, or None."""
        header = frame.header
        if header.get("content-type") == "text/json" and frame.error_info:
            code, message = frame.error_info
            return f"the server answered with an error frame: {code}: {message}"
        for key, wanted in (("content-type", CONTENT_TYPE), ("content-encoding", CONTENT_ENCODING)):
            if header.get(key) != wanted:
                return f"{key} {header.get(key)!r}, expected {wanted!r}"
        expected = self.contents[slot]
        content = frame.content
        if content != expected:
            if len(content) != len(expected):
                return f"content-length {len(content)}, expected {len(expected)}"
            return f"content differs from the request at byte {_first_difference(content, expected)} of {len(expected)}"
        return None

    def _sweep(self, now: float) -> None:
        """Fail connections whose oldest request has waited longer than the timeout."""
        timeout = self.plan.timeout
        for conn in self.conns:
            if conn.sock is not None and conn.queued and now - conn.queued[0] > timeout:
                self._fail(conn, "timeout", f"no response within {timeout:g} s")

    def _outstanding(self, conn: _Conn) -> str:
        return f"connection closed with {len(conn.queued)} of its requests outstanding"

    def _fail(self, conn: _Conn, kind: str, message: str) -> None:
        entry = self.errors.get(kind)
        if entry is None:
            self.errors[kind] = [1, f"connection {conn.index + 1}: {message}"]
        else:
            entry[0] += 1
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        sock = conn.sock
        if sock is None:
            return
        conn.sock = None
        self.open -= 1
        self.selector.unregister(sock)
        sock.close()

    def report(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "measured": self.measured,
            "latencies": self.latencies,
            "errors": self.errors,
            "outstanding": self.outstanding_at_end,
            "cpu_seconds": self.cpu_seconds,
        }

    def close(self) -> None:
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.close()
                conn.sock = None
        self.selector.close()


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first byte where `a` and `b` differ (the shorter length if none)."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


def _worker_main(plan: _WorkerPlan, channel: Pipe, progress: Any) -> None:
    """A worker process: connect, say ready, wait for go, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        from .server import raise_nofile_limit
        raise_nofile_limit()
        worker = _Worker(plan, progress)
        try:
            failure = worker.connect()
            channel.send(("failed", failure) if failure else ("ready", None))
            if failure:
                return
            message = channel.recv()
            if message[0] != "go":
                return
            worker.run(*message[1:])
            channel.send(("done", worker.report()))
        finally:
            worker.close()
    except (EOFError, BrokenPipeError):
        pass  # the parent went away
    except Exception as exc:  # a bug: report it in one line rather than die silently
        try:
            channel.send(("crashed", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass  # the parent is gone too; it reports a worker that never answered


# -- the parent -----------------------------------------------------------


@dataclass
class BenchResult:
    """The outcome of one run; `to_json` and `format_table` present it."""

    options: BenchOptions
    duration_s: float
    requests: int
    errors: int
    error_samples: list[str]
    latency_us: dict[str, float] | None
    server_cpu_us_per_request: float | None
    server_pid: int | None = None
    client_cpu_percent: float | None = None
    outstanding_after_drain: int = 0
    target: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def mbps(self) -> float:
        return self.rps * self.options.size / 1e6

    def to_json(self) -> dict[str, Any]:
        options = self.options
        return {
            "mode": options.mode,
            "connections": options.connections,
            "size": options.size,
            "pipeline": options.pipeline,
            "processes": options.processes,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "errors": self.errors,
            "rps": round(self.rps, 1),
            "mbps": round(self.mbps, 3),
            "latency_us": ({key: round(value, 1) for key, value in self.latency_us.items()}
                           if self.latency_us is not None else None),
            "server_cpu_us_per_request": (round(self.server_cpu_us_per_request, 2)
                                          if self.server_cpu_us_per_request is not None else None),
            "error_samples": list(self.error_samples),
        }

    def format_table(self, micro: str | None = None) -> str:
        """The human-readable report; `micro` is the µs unit (default: "us" where stdout cannot print "µ")."""
        options = self.options
        micro = micro or _micro_sign()
        server = (f"server started by bench (pid {self.server_pid})" if self.server_pid is not None
                  else f"server at {self.target}")
        processes = f"{options.processes} process{'es' if options.processes > 1 else ''}"
        lines = [
            f"multiconn bench: {options.mode}, {options.connections} connections x pipeline {options.pipeline}, "
            f"{options.size} B payload, {processes}, {server}",
            f"measured {self.duration_s:g} s after {options.warmup:g} s of warm-up",
            "",
        ]
        rows: list[tuple[str, str]] = [
            ("requests", f"{self.requests:,}"),
            ("req/s", f"{self.rps:,.0f}"),
            ("MB/s", f"{self.mbps:,.3f}  (payload, one direction)"),
        ]
        names = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p999"), ("max", "max")]
        for label, key in names:
            value = self.latency_us[key] if self.latency_us is not None else None
            rows.append((f"latency {label}", _format_us(value, micro)))
        rows.append(("errors", f"{self.errors:,}"))
        if self.server_pid is not None:
            cpu = self.server_cpu_us_per_request
            rows.append(("server CPU / request", f"{cpu:,.1f} {micro}" if cpu is not None else "-"))
        if self.client_cpu_percent is not None:
            rows.append(("bench CPU", f"{self.client_cpu_percent:.0f} % of a core per process"))
        width = max(len(label) for label, _ in rows)
        lines += [f"  {label:<{width}}  {value}" for label, value in rows]
        if self.outstanding_after_drain:
            lines.append(f"  ({self.outstanding_after_drain} responses still outstanding "
                         f"{DRAIN_TIMEOUT:g} s after the window)")
        for sample in self.error_samples:
            lines.append(f"  error: {sample}")
        return "\n".join(lines)


def _format_us(value: float | None, micro: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f} {micro}" if value >= 100 else f"{value:.1f} {micro}"


def _micro_sign() -> str:
    try:
        "\u00b5".encode(getattr(sys.stdout, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "us"
    return "\u00b5s"


def percentiles_us(latencies: Sequence[float]) -> dict[str, float] | None:
    """Nearest-rank p50/p90/p99/p99.9 and max, in µs, of latencies in seconds."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    count = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(count, max(1, math.ceil(q * count))) - 1] * 1e6

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "p999": rank(0.999),
            "max": ordered[-1] * 1e6}


def _resolve(host: str, port: int) -> tuple[int, tuple]:
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


class _Progress:
    """The live line on a TTY: elapsed, completed, current rate."""

    def __init__(self, stream: TextIO | None, counts: Any, start: float, warmup: float, duration: float) -> None:
        self.stream = stream
        self.counts = counts
        self.start = start
        self.warmup = warmup
        self.duration = duration
        self.last_time = start
        self.last_count = 0
        self.next = start + PROGRESS_INTERVAL
        self.drawn = False

    def update(self, now: float) -> None:
        if self.stream is None or now < self.next:
            return
        self.next = now + PROGRESS_INTERVAL
        completed = sum(self.counts)
        rate = (completed - self.last_count) / max(1e-9, now - self.last_time)
        self.last_time, self.last_count = now, completed
        elapsed = now - self.start
        phase = ("warm-up" if elapsed < self.warmup
                 else "measuring" if elapsed < self.warmup + self.duration else "draining")
        self.stream.write(f"\r{elapsed:6.1f} s  {phase:<9}  {completed:>12,} done  {rate:>10,.0f} req/s\x1b[K")
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        if self.drawn and self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False


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
        plan = _WorkerPlan(slot=slot, first_connection=first, connections=share, family=family,
                           address=address, target=target, mode=options.mode, size=options.size,
                           pipeline=options.pipeline, timeout=options.timeout)
        first += share
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_worker_main, args=(plan, child_end, counts),
                                  name=f"multiconn-bench-{slot}", daemon=True)
        process.start()
        child_end.close()
        processes.append(process)
        channels[parent_end] = slot

    # Every connection of every worker is open before any request is sent.
    waiting = dict(channels)
    deadline = time.monotonic() + options.timeout + WORKER_START_GRACE
    while waiting:
        ready = wait_pipes(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
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
    progress = _Progress(progress_stream, counts, start, options.warmup, options.duration)
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
            for channel in wait_pipes(list(waiting), timeout=max(0.0, wake - now)):
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
        return channel.recv()
    except (EOFError, OSError):
        return "crashed", "it exited without a word"

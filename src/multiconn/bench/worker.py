"""The load generator proper: one worker process drives its share of the connections.

A worker opens every connection first, then keeps ``pipeline`` requests in
flight on each, verifies every byte of every response, and times each request
from the moment it is queued to the moment its response is complete. It is
started by `multiconn.bench.runner` (``spawn``), which tells it when the
warm-up, the measured window and the drain begin and end.

Theory of operation
-------------------
1. The request ring. Requests differ per request (a sliding window over a random
   block), but they are not built per request: a worker builds, once, the bytes
   of ``W`` requests back to back plus ``E`` more that repeat the first ones, the
   *ring*. Request ``k`` of a connection is ring slot ``(base + k) % W``, so the
   requests a connection has to send are always one contiguous slice of the
   ring, and all of them go out in one ``send`` of a memoryview: no join, no
   copy, whatever the pipeline depth.
2. Verification is a bytes comparison. An echo answers request bytes with the
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
3. Errors (a mismatch, an unexpected close or reset, a malformed frame, a
   response to nothing, no response within ``timeout``) close the connection
   they happen on and are counted by kind; the first description of each kind
   is kept. The others carry on.
4. Latencies go into one ``array('d')`` per worker (8 bytes per request), which
   the parent merges and sorts for the percentiles.

A ``recv`` asks for `RECV_SIZE` bytes. ``recv`` allocates that much and then
shrinks it; at 128 KiB and above glibc's malloc serves it with mmap and munmap
(until some large free happens to raise its dynamic threshold), which costs
more than the system call itself.
"""

from __future__ import annotations

import errno
import math
import os
import random
import selectors
import signal
import socket
import time
from array import array
from collections import deque
from dataclasses import dataclass
from itertools import repeat
from multiprocessing.connection import Connection as Pipe
from typing import Any

from ..errors import ProtocolError
from ..protocol import DEFAULT_MAX_CONTENT, FrameDecoder, encode_header
from .options import DRAIN_TIMEOUT

__all__ = ["WorkerPlan", "worker_main"]

CONTENT_TYPE = "binary/octet-stream"
CONTENT_ENCODING = "binary"

#: Bytes asked of one recv (below glibc's default 128 KiB mmap threshold, see above).
RECV_SIZE = 64 * 1024
#: Distinct requests in a worker's ring, at most ...
RING_REQUESTS = 64
#: ... and at most about this many bytes (but never fewer than 2 requests).
RING_BYTES = 8 * 1024 * 1024
#: A worker publishes its progress and checks timeouts this often.
HOUSEKEEPING_INTERVAL = 0.1


@dataclass(frozen=True)
class WorkerPlan:
    """Everything one worker process needs: plain, picklable data."""

    slot: int
    first_connection: int
    connections: int
    family: int
    address: tuple[Any, ...]
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

    def __init__(self, plan: WorkerPlan, progress: Any) -> None:
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
        assert sock is not None  # only open connections are flushed
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


def worker_main(plan: WorkerPlan, channel: Pipe, progress: Any) -> None:
    """A worker process: connect, say ready, wait for go, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        from ..server import raise_nofile_limit
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

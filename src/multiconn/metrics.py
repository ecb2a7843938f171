"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Counting is cheap and formatting is lazy: the layers bump plain integers on a
`ServerMetrics` object (no locks: everything that counts runs on the loop's
thread), and the text is built only when ``GET /metrics`` asks for it
(`render`). Without ``--metrics`` the server has no `ServerMetrics` at all:
the per-request timing (`InlineTiming`, `PooledResponder`'s completions) is
not installed, and what is counted always (accepts, closes, pauses, fatal
errors) happens on paths far from the per-request one.

Bytes in and out are not counted per read and write: the kernel counts them
for every TCP socket (``TCP_INFO``'s ``tcpi_bytes_received`` and
``tcpi_bytes_acked``), so a connection's totals are read once when it closes
and, for the open ones, at each scrape. The counters never go backwards.

Names follow Prometheus conventions: base units (seconds, bytes), ``_total``
for counters, cumulative histogram buckets with ``+Inf``, ``_sum`` and
``_count``.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from bisect import bisect_right
from typing import TYPE_CHECKING, Any, Callable, Iterable, cast

from .protocol import Frame

if TYPE_CHECKING:
    from .responders import PooledResponder
    from .server import Server

#: Request duration buckets (seconds): log-spaced, 50 µs to 10 s.
DURATION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received, u64 at offset 120.
_TCP_INFO_BYTES = struct.Struct("=QQ")
_TCP_INFO_BYTES_OFFSET = 120
_TCP_INFO_SIZE = _TCP_INFO_BYTES_OFFSET + _TCP_INFO_BYTES.size
_TCP_INFO = getattr(socket, "TCP_INFO", None)

_ERROR_PREFIX = b'{"error": {"code": "'


def socket_bytes(sock: socket.socket) -> tuple[int, int]:
    """(bytes received, bytes sent and acknowledged) of a TCP socket; (0, 0) where unknown."""
    if _TCP_INFO is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0, 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return 0, 0
    if len(info) < _TCP_INFO_SIZE:
        return 0, 0  # a kernel older than 4.1
    acked, received = _TCP_INFO_BYTES.unpack_from(info, _TCP_INFO_BYTES_OFFSET)
    return received, acked


def error_code(frame: Frame) -> str | None:
    """The code of an error frame (docs/protocol.md ("Errors")), else None; cheap for other frames."""
    content = frame.content
    if frame.header.get("content-type") != "text/json" or bytes(content[:len(_ERROR_PREFIX)]) != _ERROR_PREFIX:
        return None
    try:
        return str(json.loads(bytes(content))["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


class Histogram:
    """Counts per bucket and a sum, with observations folded in batches.

    Why batches: on the inline path an observation is paid once per request,
    and a bisect over the bounds plus two updates were a third of what
    ``--metrics`` added to a request (benchmarks/results/micro.md). So
    `observe` only appends the value to `pending`, and
    `fold` (at `FOLD_AT` pending values, and before anyone reads `counts` or
    `sum`) sorts the batch, where CPython compares floats without the generic
    protocol, and finds each bound's place in it with one bisect.

    Maintenance contract: read the totals through `counts`, `sum`,
    `count` or `as_list`, which fold first; a caller that appends to `pending`
    directly (`InlineTiming`) calls `fold` once it holds `FOLD_AT` values.
    """

    __slots__ = ("bounds", "_counts", "_sum", "pending")

    #: Pending values that trigger a fold: a few dozen KiB, folded in tens of microseconds.
    FOLD_AT = 1024

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self.pending: list[float] = []

    def observe(self, value: float) -> None:
        pending = self.pending
        pending.append(value)
        if len(pending) >= self.FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Move the pending values into the counts and the sum."""
        values = self.pending
        if not values:
            return
        values.sort()
        counts = self._counts
        below = 0  # values counted in the buckets so far: those <= the previous bound
        for index, bound in enumerate(self.bounds):
            upto = bisect_right(values, bound, below)
            counts[index] += upto - below
            below = upto
        counts[-1] += len(values) - below
        self._sum += sum(values)
        values.clear()

    @property
    def counts(self) -> list[int]:
        """Observations per bucket: ``bounds[i-1] < value <= bounds[i]``, the last one past every bound."""
        self.fold()
        return self._counts

    @property
    def sum(self) -> float:
        self.fold()
        return self._sum

    @property
    def count(self) -> int:
        return sum(self.counts)

    def as_list(self) -> list[Any]:
        """``counts + [sum]``: a snapshot's form (`from_list` reads it back)."""
        return self.counts + [self._sum]

    @classmethod
    def from_list(cls, data: list[Any], bounds: tuple[float, ...] = DURATION_BUCKETS) -> "Histogram":
        """The inverse of ``counts + [sum]`` (a snapshot's form)."""
        histogram = cls(bounds)
        histogram._counts = [int(count) for count in data[:-1]]
        histogram._sum = float(data[-1])
        return histogram

    def samples(self, name: str, labels: str = "") -> Iterable[str]:
        running = 0
        sep = "," if labels else ""
        for bound, count in zip(self.bounds, self.counts):
            running += count
            yield f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {running}'
        total = running + self.counts[-1]
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {total}'
        suffix = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{suffix} {_number(self.sum)}"
        yield f"{name}_count{suffix} {total}"


class ServerMetrics:
    """What one server counts. Attributes are bumped in place by the layers."""

    def __init__(self) -> None:
        self.started = time.time()
        self.accepted = 0
        self.closed: dict[str, int] = {}
        self.fatal_errors = 0
        self.errors: dict[str, int] = {}
        self.pauses = 0
        self.duration = Histogram()
        self.pool_wait = Histogram()
        # Bytes of connections already closed; open ones are read at each scrape.
        self.closed_bytes_in = 0
        self.closed_bytes_out = 0

    # -- what the layers call ---------------------------------------------

    def connection_closed(self, sock: socket.socket, kind: str) -> None:
        self.closed[kind] = self.closed.get(kind, 0) + 1
        received, sent = socket_bytes(sock)
        self.closed_bytes_in += received
        self.closed_bytes_out += sent

    def answered(self, response: Frame, seconds: float) -> None:
        """One request answered (by the handler, or an error frame in its place).

        Requests are counted by the duration histogram (its count); see also
        `InlineTiming`, which does the same inline."""
        self.duration.observe(seconds)
        self.count_error(response)

    def count_error(self, response: Frame) -> None:
        """Count `response` by its code if it is an error frame."""
        code = error_code(response)
        if code is not None:
            self.errors[code] = self.errors.get(code, 0) + 1

    def fatal_error(self, code: str) -> None:
        """A fatal error frame (the connection closes after it)."""
        self.fatal_errors += 1
        self.errors[code] = self.errors.get(code, 0) + 1

    # -- the exposition ---------------------------------------------------

    def render(self, server: "Server") -> str:
        """The text format, version 0.0.4, for `server` as it is now."""
        return render_snapshot(self.snapshot(server))

    def snapshot(self, server: "Server") -> dict[str, Any]:
        """Every value as plain JSON data: what a worker sends its supervisor,
        which adds the workers' snapshots up (`merge`) and renders the sum.

        Gauges (what is open or running now) are kept apart under "gauges", so
        that the counters of a worker that is gone can be kept without them.
        """
        open_in = open_out = 0
        for transport in list(server.connections):
            received, sent = socket_bytes(transport.sock)
            open_in += received
            open_out += sent
        snapshot: dict[str, Any] = {
            "accepted": self.accepted,
            "closed": dict(self.closed),
            "fatal_errors": self.fatal_errors,
            "errors": dict(self.errors),
            "pauses": self.pauses,
            "bytes_in": self.closed_bytes_in + open_in,
            "bytes_out": self.closed_bytes_out + open_out,
            "duration": self.duration.as_list(),
            "gauges": {"open": len(server.connections)},
            "started": self.started,
        }
        kind = getattr(server.responder, "kind", "inline")
        if kind != "inline":
            responder = cast("PooledResponder", server.responder)
            capacity = getattr(responder, "capacity", 0)
            running = min(responder.outstanding, capacity) if capacity else responder.outstanding
            snapshot["pool"] = {
                "kind": kind,
                "wait": self.pool_wait.as_list(),
                "abandoned": getattr(responder, "abandoned", 0),
                "restarts": getattr(responder, "restarts", 0),
            }
            snapshot["gauges"].update(queued=responder.outstanding - running, in_flight=running)
        return snapshot


def empty_snapshot() -> dict[str, Any]:
    """A snapshot of nothing counted yet (a supervisor before its first worker reports)."""
    metrics = ServerMetrics()
    return {"accepted": 0, "closed": {}, "fatal_errors": 0, "errors": {}, "pauses": 0, "bytes_in": 0,
            "bytes_out": 0, "duration": metrics.duration.as_list(), "gauges": {"open": 0},
            "started": metrics.started}


def merge(total: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """`total` plus `more`: numbers add, lists add element by element, dicts merge."""
    result = dict(total)
    for key, value in more.items():
        mine = result.get(key)
        if mine is None:
            result[key] = value
        elif isinstance(value, dict):
            result[key] = merge(mine, value)
        elif isinstance(value, list):
            result[key] = [a + b for a, b in zip(mine, value)]
        elif isinstance(value, str):
            result[key] = value  # a name (the pool's kind): the same in every worker
        elif key == "started":
            result[key] = min(mine, value)
        else:
            result[key] = mine + value
    return result


def render_snapshot(snap: dict[str, Any], extra: Iterable[str] = ()) -> str:
    """The text format for a snapshot (one server's, or the sum of its workers'),
    with `extra` lines (the supervisor's own families) before the last family."""
    lines: list[str] = []
    add = _Family(lines)
    gauges = snap.get("gauges", {})
    add("multiconn_connections_open", "gauge", "Connections open now.", [("", gauges.get("open", 0))])
    add("multiconn_connections_accepted_total", "counter", "Connections accepted.", [("", snap["accepted"])])
    add("multiconn_connections_closed_total", "counter", "Connections closed, by reason.",
        [(f'reason="{reason}"', count) for reason, count in sorted(snap["closed"].items())])
    duration = Histogram.from_list(snap["duration"])
    requests = duration.count
    add("multiconn_requests_total", "counter", "Request frames received and answered.", [("", requests)])
    add("multiconn_frames_sent_total", "counter", "Frames sent: answers and error frames.",
        [("", requests + snap["fatal_errors"])])
    add("multiconn_error_frames_total", "counter", "Error frames sent, by protocol error code.",
        [(f'code="{code}"', count) for code, count in sorted(snap["errors"].items())])
    add("multiconn_received_bytes_total", "counter", "Bytes received on client connections (TCP payload).",
        [("", snap["bytes_in"])])
    add("multiconn_sent_bytes_total", "counter", "Bytes sent on client connections and acknowledged.",
        [("", snap["bytes_out"])])
    add("multiconn_backpressure_pauses_total", "counter",
        "Times a connection stopped being read because its output passed the high-water mark.",
        [("", snap["pauses"])])
    lines.append("# HELP multiconn_request_duration_seconds Time from a request's arrival to its answer.")
    lines.append("# TYPE multiconn_request_duration_seconds histogram")
    lines.extend(duration.samples("multiconn_request_duration_seconds"))
    pool_data = snap.get("pool")
    if pool_data is not None:
        kind = pool_data["kind"]
        pool = f'pool="{kind}"'
        add("multiconn_pool_queued", "gauge", "Requests waiting for a handler pool worker.",
            [(pool, gauges.get("queued", 0))])
        add("multiconn_pool_in_flight", "gauge", "Requests a pool worker (or an async task) is running now.",
            [(pool, gauges.get("in_flight", 0))])
        lines.append("# HELP multiconn_pool_wait_seconds Time a request waited for a pool worker.")
        lines.append("# TYPE multiconn_pool_wait_seconds histogram")
        lines.extend(Histogram.from_list(pool_data["wait"]).samples("multiconn_pool_wait_seconds", pool))
        if kind == "thread":
            add("multiconn_pool_threads_abandoned_total", "counter",
                "Pool threads given up after running past the handler timeout.", [(pool, pool_data["abandoned"])])
        if kind == "process":
            add("multiconn_pool_worker_restarts_total", "counter", "Pool worker processes restarted.",
                [(pool, pool_data["restarts"])])
    lines.extend(extra)
    add("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch.",
        [("", snap["started"])])
    return "\n".join(lines) + "\n"


class _Family:
    """Appends one metric family (HELP, TYPE, samples) to a list of lines."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def __call__(self, name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{{{labels}}} {_number(value)}" if labels else f"{name} {_number(value)}")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class InlineTiming:
    """What ``--metrics`` does for every answer of the inline responder.

    `multiconn.responders.run_handler` times each answer with it, its steps
    spelled out there: as a method of this class they cost 2,651
    instructions per frame, as a wrapper around ``run_handler`` (the first
    form) 2,337, spelled out 2,054 (benchmarks/results/micro.md).

    A request's duration runs from its arrival, the clock reading the `loop`
    took when it woke up with the request's bytes (``loop.now``), to its
    answer, on the loop's own clock: so a request read in the same wake-up as
    others (pipelined, or on other connections) counts the time it waited for
    them, as a pool's requests count their wait for a worker. One clock read
    per request instead of two, too. A request held back by backpressure
    counts from when it is taken up again.

    Maintenance contract: ``run_handler`` counts what `ServerMetrics.answered` counts.
    """

    __slots__ = ("pending", "fold", "fold_at", "clock", "loop", "count_error")

    def __init__(self, metrics: ServerMetrics, loop: Any) -> None:
        #: The duration histogram's batch (see `Histogram`), and its fold.
        self.pending = metrics.duration.pending
        self.fold = metrics.duration.fold
        self.fold_at = Histogram.FOLD_AT
        self.clock: Callable[[], float] = loop.clock
        self.loop = loop
        #: Called for ``text/json`` answers only: no other frame is an error frame.
        self.count_error = metrics.count_error

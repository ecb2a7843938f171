"""What a connection says: the framed protocol (or raw echo) with no I/O.

A session is the protocol half of a connection, in the manner of h11's
``Connection``: bytes and the clock come in (`data_received`, `eof_received`,
`check_timeouts(now)`), and what should happen goes out as calls on its
transport, which may be a socket's (`multiconn.transport`) or one in memory
(`multiconn.testing.MemoryTransport`): send these bytes, stop or resume
reading for this reason, fail (after an error frame), finish. It never touches
a socket, so every rule below is tested in memory, byte by byte.

Theory of operation
-------------------
Requests get answered in order. A decoded frame goes to the responder
(`multiconn.responders`):

* **inline** (`FramedSession`): the handler runs now, in the loop; the answers
  of one read are written with one send. This is the hot path and holds no
  per-request object.
* **pooled** (`PooledFramedSession`): each request becomes a `Job` in the
  connection's `_jobs` queue, and the responder completes it later (thread,
  process, asyncio). Answers leave from the head of `_jobs` as soon as the
  head is done, so a fast answer waits for the slow one before it: this is
  where a request waits for a pooled handler.

Requests the session cannot take yet wait in `_held`, received but not
started: with the inline responder once the answers of one read passed the
high-water mark (they are answered when output drains, before anything else is
read); with a pool once `Limits.max_in_flight` jobs are unanswered. Either way
the transport stops reading (`PAUSE_HELD`, `PAUSE_IN_FLIGHT`), so the peer
sees TCP backpressure and memory stays bounded.

A fatal protocol error (a malformed frame, the frame timeout) keeps its place
in that order: the answers owed before it go out first, then the error frame,
then the transport lingers and closes. End of input (EOF, or the server
draining) drops a partial frame and answers everything complete.

States and transitions (`TRANSITIONS` is the whole table; anything not in it
is a bug, raised as `LocalProtocolError`)::

    OPEN ----input ended----> FINISHING --all answered--> DONE (transport.finish)
    OPEN ----protocol error--> FAILING ---all answered--> DONE (error frame, transport.fail)
    any -----transport closed--> CLOSED (jobs not started are cancelled)
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol, Sequence, cast

from .errors import LocalProtocolError, ProtocolError
from .limits import Limits
from .protocol import ErrorCode, Frame, FrameDecoder, encode_header
from .responders import health_answer
from .transport import PAUSE_ENDED, PAUSE_HELD, PAUSE_IN_FLIGHT

if TYPE_CHECKING:
    from .connection_info import ConnectionInfo
    from .responders import PooledResponder, Responder

log = logging.getLogger("multiconn.connection")

#: Answers of one read up to this size are joined into one buffer for one send.
JOIN_LIMIT = 64 * 1024

# Session states.
OPEN = "open"
FINISHING = "finishing"
FAILING = "failing"
DONE = "done"
CLOSED = "closed"

# Events that change the state.
INPUT_ENDED = "input ended"        # EOF from the peer, or the server draining
PROTOCOL_ERROR = "protocol error"  # a malformed frame or the frame timeout
ALL_ANSWERED = "all answered"      # nothing held, nothing in a pool
TRANSPORT_CLOSED = "transport closed"

#: (state, event) -> next state. The one place that says what may happen when.
TRANSITIONS: dict[tuple[str, str], str] = {
    (OPEN, INPUT_ENDED): FINISHING,
    (OPEN, PROTOCOL_ERROR): FAILING,
    (FINISHING, INPUT_ENDED): FINISHING,
    (FAILING, INPUT_ENDED): FAILING,
    (DONE, INPUT_ENDED): DONE,
    (FINISHING, ALL_ANSWERED): DONE,
    (FAILING, ALL_ANSWERED): DONE,
    (OPEN, TRANSPORT_CLOSED): CLOSED,
    (FINISHING, TRANSPORT_CLOSED): CLOSED,
    (FAILING, TRANSPORT_CLOSED): CLOSED,
    (DONE, TRANSPORT_CLOSED): CLOSED,
    (CLOSED, TRANSPORT_CLOSED): CLOSED,
}


class SessionTransport(Protocol):
    """What a session asks of its transport (a socket's, or one in memory)."""

    def write(self, data: bytes) -> None: ...
    def write_many(self, parts: Sequence[bytes | bytearray]) -> None: ...
    @property
    def pending_output(self) -> int: ...
    @property
    def connection_info(self) -> ConnectionInfo | None: ...
    def want_buffer(self) -> None: ...
    def pause_reading(self, reason: int) -> None: ...
    def resume_reading(self, reason: int) -> None: ...
    def finish(self) -> None: ...
    def fail(self) -> None: ...


class Clock(Protocol):
    """Anything with the current time in ``now`` (the event loop, a test's clock)."""

    now: float


class SessionContext:
    """What every session of one server shares: its responder, limits and clock.

    One object per server rather than three attributes per connection: an
    idle connection's memory is part of the product.
    """

    __slots__ = ("responder", "limits", "clock", "metrics", "status", "with_connection", "buffers")

    def __init__(self, responder: "Responder", limits: Limits, clock: Clock, status: Any = None) -> None:
        self.responder = responder
        self.limits = limits
        self.clock = clock
        #: `multiconn.responders.ServerStatus`: pooled sessions answer health checks with it.
        self.status = status
        #: Whether requests carry their `ConnectionInfo` (the app asked for it).
        self.with_connection = False
        #: `multiconn.buffers.BufferPool` for large contents (None: a new buffer each).
        self.buffers: Any = None
        #: `multiconn.metrics.ServerMetrics` when the server counts, else None.
        self.metrics: Any = None


class FramedSession:
    """The framed protocol, answered by an inline responder."""

    # Eight slots and no __weakref__: every idle connection carries one session.
    __slots__ = ("transport", "context", "decoder", "state", "frame_started", "_held", "_error")

    #: Requests in a pool, in order, until their answers are written: always
    #: None here (a class attribute, no slot); `PooledFramedSession` has the slot.
    _jobs: "deque[Job] | None" = None

    def __init__(self, transport: SessionTransport, context: SessionContext) -> None:
        self.transport = transport
        self.context = context
        self.decoder = FrameDecoder(context.limits.max_content, context.buffers)
        self.state = OPEN
        self.frame_started: float | None = None
        #: Requests received but not started (see the module's docstring).
        self._held: deque[Frame] | None = None
        #: The fatal error frame owed after the answers before it.
        self._error: Frame | None = None

    def _transition(self, event: str) -> str:
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise LocalProtocolError(f"session: {event!r} cannot happen in state {self.state!r}") from None
        return self.state

    # -- input ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        self._handle(frames)

    def get_buffer(self) -> memoryview | None:
        """Where the transport should receive a large content (see `want_buffer`)."""
        return self.decoder.recv_buffer() if self.state is OPEN else None

    def buffer_updated(self, nbytes: int) -> None:
        self._handle(self.decoder.buffer_updated(nbytes))

    def _handle(self, frames: list[Frame]) -> None:
        if frames:
            if self.context.with_connection:
                info = self.transport.connection_info
                for frame in frames:
                    frame.connection = info
            self._answer(frames)
        decoder = self.decoder
        if decoder.has_partial:
            if frames or self.frame_started is None:
                self.frame_started = self.context.clock.now
            if decoder.wants_buffer:
                self.transport.want_buffer()
        else:
            self.frame_started = None

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.debug("%s: protocol error %s", self.transport, exc)
        frames = getattr(exc, "frames", None)
        if frames:  # complete frames before the bad bytes are answered first
            self._answer(frames)
            if self.state is CLOSED:  # a send failed meanwhile: nobody to tell
                return
        self._fail(Frame.error(exc.code, exc.message, id=exc.request_id))

    def eof_received(self) -> None:
        """The peer closed its sending side: answer what is complete, then finish."""
        self.input_ended("peer closed its sending side")

    def input_ended(self, reason: str) -> None:
        """No more input will come (EOF, or the server drains): a partial frame is dropped."""
        if self._transition(INPUT_ENDED) is FINISHING:
            log.debug("%s: finishing (%s)", self.transport, reason)
            self.frame_started = None
            self._maybe_done()

    # -- answering (inline) -----------------------------------------------

    def _answer(self, frames: list[Frame]) -> None:
        """Answer `frames` in order with one send; past the high-water mark, hold the rest.

        Holding keeps a peer whose small requests have large answers from
        growing the output beyond the mark: the held requests are answered
        (before anything else is read) once the output drains.
        """
        transport = self.transport
        respond = self.context.responder.respond
        if len(frames) == 1:  # the common case, without the loop's bookkeeping
            response = respond(frames[0])
            content = response.content
            prefix = encode_header(response.header, len(content))
            if len(content) <= JOIN_LIMIT:
                transport.write(prefix + content)
            else:
                transport.write_many([prefix, content])
            return
        parts: list[bytes | bytearray] = []
        size = 0
        budget = self.context.limits.high_water - transport.pending_output
        held = None
        for frame in frames:
            response = respond(frame)
            content = response.content
            prefix = encode_header(response.header, len(content))
            parts.append(prefix)
            parts.append(content)
            size += len(prefix) + len(content)
            if size > budget:
                held = frames[len(parts) >> 1:]  # two parts per answer; empty after the last
                break
        if size <= JOIN_LIMIT:
            transport.write(b"".join(parts))
        else:
            transport.write_many(parts)
        if held and self.state is not CLOSED:  # a failed send closed it: nothing to hold for
            self._held = deque(held)
            transport.pause_reading(PAUSE_HELD)
            self.resume_writing()

    def resume_writing(self) -> None:
        """The output has drained below the low-water mark: answer held requests."""
        limits = self.context.limits
        while self._held and self.state is not CLOSED and self.transport.pending_output <= limits.low_water:
            frames, self._held = list(self._held), None
            self._answer(frames)
        if not self._held and self.state is not CLOSED:
            self._held = None
            self.transport.resume_reading(PAUSE_HELD)
            self._maybe_done()

    # -- the end ----------------------------------------------------------

    def _fail(self, error: Frame) -> None:
        self._error = error
        self._transition(PROTOCOL_ERROR)
        self.frame_started = None
        self.transport.pause_reading(PAUSE_ENDED)  # the transport discards input once the error is out
        self._maybe_done()

    def _maybe_done(self) -> None:
        """In FINISHING or FAILING: once nothing is owed, end the connection."""
        if self.state not in (FINISHING, FAILING) or self._held or self._jobs:
            return
        failing = self.state is FAILING
        self._transition(ALL_ANSWERED)
        if failing:
            error, self._error = self._error, None
            assert error is not None
            if self.context.metrics is not None:
                self.context.metrics.fatal_error(error.error_info[0])  # type: ignore[index]
            self.transport.write(encode_header(error.header, len(error.content)) + error.content)
            self.transport.fail()
        else:
            self.transport.finish()

    def connection_lost(self) -> None:
        """The transport closed (the peer reset, the server aborted): drop the work."""
        self._transition(TRANSPORT_CLOSED)
        self._held = None

    # -- timeouts ---------------------------------------------------------

    def check_timeouts(self, now: float) -> bool:
        """Enforce the frame timeout; True when it fired."""
        started = self.frame_started
        limits = self.context.limits
        if started is None or self.state is not OPEN or now - started < limits.frame_timeout:
            return False
        message = f"frame not complete within {limits.frame_timeout:g} s"
        log.debug("%s: %s", self.transport, message)
        self._fail(Frame.error(ErrorCode.TIMEOUT, message, id=self.decoder.partial_id))
        return True

    def reading_resumed(self, paused_for: float) -> None:
        """The frame timeout does not run while the server holds the peer up."""
        if self.frame_started is not None:
            self.frame_started += paused_for

    def is_idle(self) -> bool:
        """Nothing in progress: no partial frame, no request held or in a pool."""
        return not (self.decoder.has_partial or self._held or self._jobs)


class Job:
    """One request handed to a pooled responder, and later its answer.

    The responder sets `response` and calls `done` on the loop's thread; the
    session writes answers from the head of its queue. `cancelled` is set on
    the loop's thread when the connection goes away; a pool reads it before
    starting the job. `handle` is the responder's own (a future, a worker).
    """

    __slots__ = ("request", "session", "response", "cancelled", "submitted", "started", "handle")

    def __init__(self, request: Frame, session: "PooledFramedSession") -> None:
        self.request = request
        self.session = session
        self.response: Frame | None = None
        self.cancelled = False
        #: When it was handed to the pool, and when a worker took it (monotonic seconds).
        self.submitted = self.started = 0.0
        self.handle: Any = None

    def done(self, response: Frame) -> None:
        if self.cancelled or self.response is not None:
            return  # answered at its deadline already, or nobody is waiting
        self.response = response
        self.session.job_done()


class PooledFramedSession(FramedSession):
    """The framed protocol, answered by a pool: jobs, answered in order."""

    __slots__ = ("_jobs",)

    def __init__(self, transport: SessionTransport, context: SessionContext) -> None:
        super().__init__(transport, context)
        self._jobs = None

    def connection_lost(self) -> None:
        """The transport closed: its jobs are cancelled (those not started never run)."""
        super().connection_lost()
        jobs = self._jobs
        if jobs:
            self._jobs = None
            cancel = self.context.responder.cancel
            for job in jobs:
                cancel(job)

    def _answer(self, frames: list[Frame]) -> None:
        held = self._held
        if held is None:
            held = self._held = deque(frames)
        else:
            held.extend(frames)
        self._start_held()

    def _start_held(self) -> None:
        held = self._held
        jobs = self._jobs
        if jobs is None:
            jobs = self._jobs = deque()
        limit = self.context.limits.max_in_flight
        # A pooled session is only ever given a pool (see `Server`).
        responder = cast("PooledResponder", self.context.responder)
        submit = responder.submit
        status = self.context.status
        while held and len(jobs) < limit:
            if responder.saturated:  # --max-queued: the rest waits until the queue has room
                responder.wait_for_room(self)
                break
            job = Job(held.popleft(), self)
            jobs.append(job)
            health = health_answer(job.request, status) if status is not None else None
            if health is None:
                submit(job)
            else:  # the server answers health checks itself, in their turn
                job.response = health
        if not held:
            self._held = None
        if len(jobs) >= limit:
            self.transport.pause_reading(PAUSE_IN_FLIGHT)
        if jobs and jobs[0].response is not None:
            self.job_done()

    def job_done(self) -> None:
        """A job finished: write every answer now due, in order."""
        jobs = self._jobs
        if self.state is CLOSED or not jobs or jobs[0].response is None:
            return
        parts: list[bytes | bytearray] = []
        size = 0
        while jobs and jobs[0].response is not None:
            response = jobs.popleft().response
            assert response is not None  # checked by the loop's condition
            content = response.content
            prefix = encode_header(response.header, len(content))
            parts.append(prefix)
            parts.append(content)
            size += len(prefix) + len(content)
        transport = self.transport
        if size <= JOIN_LIMIT:
            transport.write(b"".join(parts))
        else:
            transport.write_many(parts)
        if self.state is CLOSED:
            return
        if self._held:
            self._start_held()
        if len(jobs) < self.context.limits.max_in_flight:
            transport.resume_reading(PAUSE_IN_FLIGHT)
        if not jobs:
            self._jobs = None
        self._maybe_done()

    def room_available(self) -> None:
        """The server's handler queue has room again (see `wait_for_room`)."""
        if self.state is not CLOSED and self._held:
            self._start_held()

    def resume_writing(self) -> None:
        """Pooled answers are written when done; backpressure stops reading only."""


class RawEchoSession:
    """No framing: bytes are echoed as they arrive (the guide's multiconn-server).

    The transport inlines the common event (`Transport._on_events`);
    this is the general path: backpressure, EOF, TLS.
    """

    __slots__ = ("transport",)

    def __init__(self, transport: SessionTransport, context: SessionContext | None = None) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def get_buffer(self) -> None:
        return None

    def buffer_updated(self, nbytes: int) -> None:
        raise LocalProtocolError("raw echo never asks for a buffer")

    def eof_received(self) -> None:
        self.transport.finish()

    def input_ended(self, reason: str) -> None:
        self.transport.finish()

    def resume_writing(self) -> None:
        pass

    def reading_resumed(self, paused_for: float) -> None:
        pass

    def check_timeouts(self, now: float) -> bool:
        return False

    def is_idle(self) -> bool:
        return True

    def connection_lost(self) -> None:
        pass

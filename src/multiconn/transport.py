"""The socket side of one accepted connection: partial I/O, interest, backpressure.

A transport moves bytes and knows nothing of frames. Above it sits a session
(`multiconn.session`), which it feeds what it reads and which tells it what to
send; below it, the event loop. Its owner (the server) hears of it only
through the narrow `TransportOwner` interface it was given: that it closed, and
that its output passed the high-water mark.

Theory of operation
-------------------
Readiness is a hint, never a promise: every ``recv``/``send`` tolerates
``BlockingIOError``, ``InterruptedError`` and TLS's want-read/want-write, and
any other ``OSError`` (reset, broken pipe) ends the connection through the one
`close` path, which unregisters before it closes, runs only once, and tells the
session the peer is gone (`connection_lost`, so that work for it is cancelled).

Output is written at once; only what the kernel refuses is queued (as
memoryviews, so a partial send never copies the rest) and only then does the
transport ask for EVENT_WRITE. The poller interest is recomputed in one place,
`_update_interest`, and ``modify`` is called only when it changes.

Reading stops for any of several reasons at once, kept as bits in `_paused`:
pending output past the high-water mark (`PAUSE_OUTPUT`, the transport's own:
a peer that does not read cannot make the server buffer without bound), and
the session's (`PAUSE_HELD`, `PAUSE_IN_FLIGHT`, `PAUSE_QUEUE`: requests it
cannot take yet; `PAUSE_ENDED`: it takes no more). Reading resumes when no bit is left. Below the low-water
mark the session hears `resume_writing`, on the next loop iteration, so that
requests it held back can be answered before anything else is read.

Input: each read asks for as much as recent reads suggest (`_read_once`):
small reads come from CPython's small-object allocator, large ones from
malloc, and a ping-pong of small messages is cheaper for the difference. A
session that expects a large content asks (`want_buffer`) to receive it
straight into a buffer of its own (`_read_into`), signalled through the same
size field, so the common event pays for no extra check.

Lifecycle (the transport's own, independent of the session's)::

    OPEN --finish()--> FINISHING (flush, then close)
    OPEN --fail()--> LINGERING (flush, shut down writing, discard input until
         EOF or `Limits.error_linger`, close)
    LINGERING --EOF before the output is out--> FINISHING
    any --reset / timeout / abort / close()--> CLOSED

Preamble stages (`Stage`: the TLS handshake today, the PROXY header next) run
in order before the session sees a byte. While one runs, the loop calls the
stage, not the transport (`watch`), so the hot path carries no check for them;
a new stage is one class and one entry in the server's list of stages.

Timeouts are not timers per connection: the server sweeps its connections a few
times per timeout period and calls `check_timeouts`, so the hot path only stamps
``loop.now`` into an attribute. Idle means no progress in either direction:
input stamps `last_activity`, and so does output that moves.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import termios
from collections import deque
from typing import Any, Callable, Protocol, Sequence

from .connection_info import ConnectionInfo, build_connection_info, format_address
from .errors import WOULD_BLOCK
from .limits import Limits
from .loop import EVENT_READ, EVENT_WRITE, EventLoop
from .proxy import ProxyHeader

log = logging.getLogger("multiconn.connection")

#: Bytes asked of one ``recv`` while reads are large.
RECV_SIZE = 64 * 1024
#: Bytes asked of one ``recv`` while reads are small. ``recv(n)`` allocates n
#: bytes before it knows how many arrive: up to 512 (with the object's header)
#: they come from CPython's small-object allocator, above that from malloc,
#: which costs a measurable share of a small echo (benchmarks/results/micro.md).
SMALL_RECV_SIZE = 448
#: A read of at most this many bytes is small. Half of SMALL_RECV_SIZE, so that
#: messages a little shorter than it do not flip the size at every read.
SMALL_READ = SMALL_RECV_SIZE // 2
#: `_recv_size` while the session receives into a buffer of its own (`_read_into`).
RECV_IN_PLACE = 0
#: Buffers handed to one ``sendmsg`` (IOV_MAX is 1024 on Linux).
MAX_IOVECS = 512

# Why reading is paused: bits of `Transport._paused`.
PAUSE_OUTPUT = 1      #: pending output above the high-water mark
PAUSE_HELD = 2        #: the session holds requests until output drains
PAUSE_IN_FLIGHT = 4   #: the connection has --max-in-flight requests unanswered
PAUSE_QUEUE = 8       #: the server's handler queue is full (--max-queued)
PAUSE_ENDED = 16      #: the session takes no more input (a fatal error is on its way)

OPEN, FINISHING, LINGERING, CLOSED = "open", "finishing", "lingering", "closed"

# What happens to input (`Transport._input`): read it; read what is there and
# end (server shutdown); no more (EOF); no more, the drain took what there was
# (the peer has not closed: the close lingers, so its next request is not met
# by a reset).
INPUT_OPEN, INPUT_DRAINING, INPUT_ENDED, INPUT_DRAINED = 0, 1, 2, 3


class Stage(Protocol):
    """A preamble stage: runs on the socket before the session sees a byte.

    `start` either finishes at once or asks for readiness with
    `Transport.watch`; when done it calls `Transport.stage_done`, and to refuse
    the connection `Transport.reject`. A stage consumes only its own bytes
    (peek first, as HAProxy's PROXY protocol advises), so whatever follows is
    the next stage's or the session's.
    """

    def start(self) -> None: ...


StageFactory = Callable[["Transport"], Stage]


class TransportOwner(Protocol):
    """What a transport tells its owner, and all it knows of it."""

    def connection_closed(self, transport: "Transport", reason: str) -> None:
        """`transport` is closing for `reason` (its socket is still open)."""

    def output_paused(self, transport: "Transport") -> None:
        """`transport` stopped reading: its output passed the high-water mark."""

#: ioctl that reads how many sent bytes the kernel still holds (Linux: SIOCOUTQ).
_OUTQ: int | None = getattr(termios, "TIOCOUTQ", None)

#: The common read and send on plain sockets: one global lookup each, and
#: unlike ``socket.recv``/``send`` they parse their arguments the fast way.
_os_read, _os_write = os.read, os.write


class Transport:
    """A plain TCP (or Unix) socket, served by the event loop.

    `session` must be attached (`attach`) before the loop runs; `owner` hears
    `connection_closed` once, just before the socket is closed.
    """

    #: Whether this is a plain socket: it can send several buffers at once
    #: (``sendmsg``), and the common read and send may use its descriptor.
    vectored = True

    __slots__ = (
        "sock", "loop", "limits", "session", "state", "_owner", "_out", "_out_size",
        "_interest", "_paused", "_paused_at", "_input", "last_activity",
        "last_progress", "_recv_size", "_fd", "_kernel_unsent", "_preamble",
        "_info", "_echo",
    )

    def __init__(self, sock: socket.socket, loop: EventLoop, limits: Limits,
                 owner: "TransportOwner", preamble: Sequence[StageFactory] = ()) -> None:
        self.sock = sock
        self.loop = loop
        self.limits = limits
        self.session: Any = None
        self.state = OPEN
        self._owner = owner
        # Created on the first partial send and dropped when drained: an idle
        # connection should not carry an empty deque (760 bytes).
        self._out: deque[Any] | None = None
        self._out_size = 0
        self._paused = 0
        self._paused_at = 0.0
        self._input = INPUT_OPEN
        self._recv_size = SMALL_RECV_SIZE
        #: The socket's descriptor for ``os.read``/``os.write`` on the common
        #: path (`attach`: plain sockets), else -1 (TLS goes through its object).
        self._fd = -1
        #: The session echoes every byte (raw echo): `_on_events` sends it back inline.
        self._echo = False
        self._kernel_unsent = 0
        self.last_activity = self.last_progress = loop.now
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._interest = 0
        #: The stages still to run before the session (an iterator), or None.
        self._preamble: Any = iter(preamble) if preamble else None
        #: What a handler may learn of this connection: None, the PROXY header a
        #: stage read, or (once asked for) the `ConnectionInfo` built from both.
        self._info: Any = None

    def attach(self, session: Any, *, raw_echo: bool = False) -> None:
        """Start serving `session` (after the preamble stages, if any).
        `raw_echo`: the session echoes every byte, so the common event may take
        the inlined read-and-write path."""
        self.session = session
        if self.vectored:  # a plain socket: the common read and send skip the socket object
            self._fd = self.sock.fileno()
            self._echo = raw_echo
        if self._preamble is None:
            self._set_interest(EVENT_READ)
        else:
            self.stage_done()

    # -- preamble stages --------------------------------------------------

    def stage_done(self) -> None:
        """The current preamble stage is done: start the next, or the session."""
        if self.state is not OPEN:
            return
        stage = next(self._preamble, None)
        if stage is not None:
            stage(self).start()
            return
        self._preamble = None
        self.last_activity = self.loop.now
        if self._interest:  # registered with the stage's callback: ours from now on (one modify)
            self.loop.modify(self.sock, EVENT_READ, self._on_events)
            self._interest = EVENT_READ
        self._update_interest()
        if self.session is not None and self.state is OPEN:
            self._on_events(EVENT_READ)  # bytes may be waiting already (or inside TLS)

    def watch(self, interest: int, step: Callable[[], None]) -> None:
        """For a preamble stage: call `step()` when the socket is ready for `interest`.

        An exception out of `step` is a bug: it costs this connection (logged,
        closed), never the server, as on the transport's own events.
        """
        def on_events(mask: int) -> None:
            try:
                step()
            except Exception:
                self._internal_error()

        if self._interest:
            self.loop.modify(self.sock, interest, on_events)
        else:
            self.loop.register(self.sock, interest, on_events)
        self._interest = interest

    def reject(self, reason: str, *, linger: bool = True) -> None:
        """For a preamble stage: end the connection without sending a byte.

        With `linger`, our side is shut down and input discarded until EOF or
        `Limits.error_linger`, so that the peer sees a FIN rather than a reset.
        """
        log.info("%s: %s", self, reason)
        self._preamble = None
        if not linger:
            self.close(reason)
            return
        self.state = LINGERING
        self._shutdown_write()
        self.loop.call_later(self.limits.error_linger, self.close, "error linger over")
        if self._interest:
            self._set_interest(0)
        self._set_interest(EVENT_READ)

    # -- events -----------------------------------------------------------

    def _on_events(self, mask: int) -> None:
        """The loop's callback: the common event inline, the rest in `_handle_events`.

        The common event (readable, reading small, open) reads here: the call
        to `_read_once` and its checks were 3 % of a small request's
        instructions (benchmarks/results/micro.md). On a plain socket it reads
        with ``os.read`` on the descriptor, as `write` sends with ``os.write``:
        the socket object's ``recv`` and ``send`` cost 1,000 instructions more
        per request. For raw echo (`_echo`), with nothing queued, it also sends
        the bytes straight back, `write` inlined: raw echo is the event loop's
        own benchmark, and there the general path's calls were a seventh of
        the server's Python time.
        Maintenance contract: these are the steps of `_read_once` and `write`;
        change them together. Only plain sockets come here (`attach` set
        `_fd`): TLS, whose reads must drain the SSL object, takes
        `_handle_events` for every event.
        """
        if mask != EVENT_READ or self._recv_size != SMALL_RECV_SIZE or self.state is not OPEN or self._input:
            self._handle_events(mask)
            return
        try:
            fd = self._fd
            try:
                data = _os_read(fd, SMALL_RECV_SIZE)
            except OSError as exc:
                self._recv_failed(exc)
                return
            if not data:
                self._on_eof()
                return
            self.last_activity = self.loop.now
            received = len(data)
            if received > SMALL_READ:
                self._recv_size = RECV_SIZE
            if not self._echo or self._out is not None:
                self.session.data_received(data)
                return
            try:
                sent = _os_write(fd, data)
            except WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc}")
                return
            if sent < received:
                self._queue(memoryview(data)[sent:])
                self._update_interest()
        except Exception:  # a bug must cost this connection, not the server
            self._internal_error()

    def _handle_events(self, mask: int) -> None:
        """Any event: flush what is pending, then read, drain or discard."""
        try:
            if mask & EVENT_WRITE:
                self._flush()
            if mask & EVENT_READ and self.state is not CLOSED:
                if self._input and self.state is OPEN:  # draining, or ended (a stale event)
                    self._drain_input()
                else:
                    self._read_once()
        except Exception:  # a bug must cost this connection, not the server
            self._internal_error()

    def _internal_error(self) -> None:
        log.exception("%s: unexpected error; closing the connection", self)
        self.close("internal error")

    def _read_once(self) -> bool:
        """One ``recv``; False when the kernel had nothing or the connection ended.

        The size asked adapts: large after a read of more than SMALL_READ
        bytes, small after two small reads in a row (the first of them steps
        down to half of RECV_SIZE, which costs the same as RECV_SIZE). So a
        bulk transfer pays one short read to grow and a ping-pong of small
        messages reads small.
        """
        size = self._recv_size
        if size == RECV_IN_PLACE:
            return self._read_into()
        try:
            data = self.sock.recv(size)
        except OSError as exc:
            self._recv_failed(exc)
            return False
        if not data:
            self._on_eof()
            return False
        self.last_activity = self.loop.now
        if len(data) > SMALL_READ:
            self._recv_size = RECV_SIZE
        elif size != SMALL_RECV_SIZE:
            self._recv_size = RECV_SIZE // 2 if size == RECV_SIZE else SMALL_RECV_SIZE
        if self.state is OPEN:  # lingering: discard until EOF, so the error frame is not lost to a reset
            self.session.data_received(data)
        return True

    def _read_into(self) -> bool:
        """Receive into the session's own buffer (a large content), never past its end.

        The steps of `_read_once`, spelled out rather than shared: it runs on
        every event of a bulk transfer.
        """
        self._recv_size = RECV_SIZE  # the session asks again if it still wants a buffer
        view = self.session.get_buffer() if self.state is OPEN else None
        if view is None:
            return self._read_once()
        try:
            received = self.sock.recv_into(view)
        except OSError as exc:
            self._recv_failed(exc)
            return False
        finally:
            view.release()
        if not received:
            self._on_eof()
            return False
        self.last_activity = self.loop.now
        self.session.buffer_updated(received)
        return True

    def want_buffer(self) -> None:
        """The session's next input is a large content: read it into `get_buffer()`."""
        self._recv_size = RECV_IN_PLACE

    def _recv_failed(self, exc: OSError) -> None:
        if not isinstance(exc, WOULD_BLOCK):  # would block: readiness was only a hint
            self.close(f"recv failed: {exc}")

    def _on_eof(self) -> None:
        drained = self._input == INPUT_DRAINED
        self._input = INPUT_ENDED
        if self.state is LINGERING and not self._out:
            # The error frame (or the drained answers) is out and our sending side shut down: done.
            self.close("peer closed after drain" if drained else "peer closed after error")
            return
        if self.state is LINGERING:
            # The peer will not reset us now: flush the error frame, then close.
            self.state = OPEN
            self.finish()
            return
        self._update_interest()
        self.session.eof_received()  # the session answers what is complete, then calls finish()

    # -- what the session asks --------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        """Send `data` now as far as the kernel takes it; queue the rest."""
        if self.state is OPEN and not self._out:
            # The common case: the kernel takes it all and nothing is queued.
            fd = self._fd
            try:
                sent = _os_write(fd, data) if fd >= 0 else self.sock.send(data)
            except WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc}")
                return
            if sent == len(data):
                return
            self._queue(memoryview(data)[sent:])
            self._update_interest()
        elif self.state is not CLOSED and data:
            self._queue(data)
            out = self._out
            assert out is not None  # _queue created it
            if len(out) == 1:
                self._flush()

    def write_many(self, parts: Sequence[bytes | bytearray]) -> None:
        """Queue several buffers (large contents: no join copy) and send."""
        if self.state is CLOSED:
            return
        was_empty = not self._out
        for part in parts:
            if part:
                self._queue(part)
        if was_empty and self._out:
            self._flush()

    @property
    def pending_output(self) -> int:
        return self._out_size

    def pause_reading(self, reason: int) -> None:
        if not self._paused:
            self._paused_at = self.loop.now
        self._paused |= reason
        self._update_interest()

    def resume_reading(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if self._paused:
            return
        self.session.reading_resumed(self.loop.now - self._paused_at)
        self._update_interest()
        if self.state is OPEN and self._input == INPUT_DRAINING:
            self.loop.call_soon(self._drain_input)
        else:
            self._after_resume()

    def _after_resume(self) -> None:
        """Hook: TLS may hold decrypted bytes that no poll will report."""

    @property
    def reading_paused(self) -> int:
        return self._paused

    def finish(self) -> None:
        """The session is done: flush what is pending, then close.

        After a drain (server shutdown) the peer has not closed its side and
        may be sending its next request right now: the close then lingers as
        after an error frame, so that request meets a FIN, not a reset.
        """
        if self.state not in (OPEN, LINGERING):
            return
        if self.state is OPEN and self._input == INPUT_DRAINED:
            self.state = LINGERING
            if not self._out:
                self._linger()
            else:
                self._update_interest()
            return
        self.state = FINISHING
        if not self._out:
            self.close("done")
        else:
            self._update_interest()

    def fail(self) -> None:
        """The session wrote a fatal error frame: flush it, shut down writing,
        and discard input until EOF or the linger ends, so that the peer reads
        the error frame instead of a reset."""
        if self.state is not OPEN:
            return
        if self._input == INPUT_ENDED:  # no more input will come: nothing would reset
            self.finish()
            return
        self.state = LINGERING
        if not self._out:
            self._linger()
        else:
            self._update_interest()

    def _linger(self) -> None:
        self._paused = 0  # read and discard, so that closing sends no reset
        self._shutdown_write()
        reason = "drain linger over" if self._input == INPUT_DRAINED else "error linger over"
        self.loop.call_later(self.limits.error_linger, self.close, reason)
        self._update_interest()

    def drain(self) -> None:
        """Server shutdown: read what the peer already sent, then end the input."""
        if self.state is not OPEN or self._input:
            return
        if self._preamble is not None:  # no request has come yet, and none will
            self.close("server shutting down")
            return
        self._input = INPUT_DRAINING
        if not self._paused:
            self._drain_input()

    def _drain_input(self) -> None:
        while self.state is OPEN and not self._paused and self._input == INPUT_DRAINING:
            if not self._read_once():
                break
        if self.state is OPEN and not self._paused and self._input == INPUT_DRAINING:
            self._input = INPUT_DRAINED  # no more input will be taken
            self._update_interest()
            self.session.input_ended("server shutting down")

    # -- output -----------------------------------------------------------

    def _queue(self, data: bytes | bytearray | memoryview) -> None:
        out = self._out
        if not out:
            if out is None:
                out = self._out = deque()
            self.last_progress = self.loop.now
        out.append(data)
        self._out_size += len(data)
        if self._out_size > self.limits.high_water and not self._paused & PAUSE_OUTPUT:
            self.pause_reading(PAUSE_OUTPUT)
            self._owner.output_paused(self)

    def _flush(self) -> None:
        out = self._out
        sock = self.sock
        while out:
            try:
                if len(out) == 1 or not self.vectored:
                    attempted = len(out[0])
                    sent = sock.send(out[0])
                else:
                    batch = list(_first(out, MAX_IOVECS))
                    attempted = sum(map(len, batch))
                    sent = sock.sendmsg(batch)
            except WOULD_BLOCK:
                break
            except OSError as exc:
                self.close(f"send failed: {exc}")
                return
            self.last_progress = self.last_activity = self.loop.now
            self._out_size -= sent
            _consume(out, sent)
            if sent < attempted:
                break  # the kernel's buffer is full: wait for EVENT_WRITE
        # Resume first, then settle the interest: one modify for both (resuming
        # after the output is settled would unregister, then register again).
        if self._paused and self._out_size <= self.limits.low_water:
            if self._paused & PAUSE_HELD and self.state is OPEN:
                self.loop.call_soon(self.session.resume_writing)
            self.resume_reading(PAUSE_OUTPUT)
        if self._out:
            self._update_interest()
        else:
            self._out = None
            self._on_output_flushed()

    def _on_output_flushed(self) -> None:
        if self.state is FINISHING:
            self.close("done")
        elif self.state is LINGERING:
            self._linger()
        else:
            self._update_interest()

    # -- interest ---------------------------------------------------------

    def _update_interest(self) -> None:
        """Ask the poller for exactly what this connection can use now."""
        if self.state is CLOSED:
            return
        reading = not self._paused and self.state is not FINISHING and not (self._input >= INPUT_ENDED and self.state is OPEN)
        self._set_interest((EVENT_READ if reading else 0) | (EVENT_WRITE if self._out else 0))

    def _set_interest(self, interest: int) -> None:
        current = self._interest
        if interest == current:
            return
        # A plain socket registers by its descriptor, the very int `_fd` holds:
        # registered by the socket, the poller's key would be another int from
        # ``fileno()``, 32 bytes more per connection (descriptors over 256 are
        # not cached). It is unregistered before its socket is closed (`close`).
        fileobj = self._fd if self._fd >= 0 else self.sock
        if not interest:
            self.loop.unregister(fileobj)
        else:
            if not current:
                self.loop.register(fileobj, interest, self._on_events)
            else:
                self.loop.modify(fileobj, interest, self._on_events)
        self._interest = interest

    # -- timeouts and closing ---------------------------------------------

    def check_timeouts(self, now: float) -> None:
        """Called by the server's sweep: the preamble's or the session's timeouts, then idleness.

        A preamble (a TLS handshake, a PROXY header) must be done within the
        frame timeout. Idle means no progress either way: no input, no output
        that moved, and nothing the session is working on (a partial frame, a
        request in a pool).
        """
        if self._preamble is not None:
            if self.state is OPEN and now - self.last_activity >= self.limits.frame_timeout:
                log.info("%s: connection preamble not done within %g s", self, self.limits.frame_timeout)
                self.close("preamble timed out")
            return
        if self.state is LINGERING and not self._out:
            return  # the linger timer ends it
        # While reading is paused the server holds the peer up: no frame timeout.
        if self.state is OPEN and not self._paused and self.session.check_timeouts(now):
            return
        if self.state is CLOSED:
            return
        if self._interest == 0 and self.state is OPEN and self._probe_peer_gone():
            return
        if self._out:
            if now - self.last_progress >= self.limits.idle_timeout:
                self.close("pending output did not move for the idle timeout")
        elif self.session.is_idle() and now - self.last_activity >= self.limits.idle_timeout:
            if self._kernel_output_moved():
                self.last_activity = now
            else:
                self.close("idle timeout")

    def _kernel_output_moved(self) -> bool:
        """Whether the kernel's send queue moved since the last look (the
        bytes it still held are fewer, or gone): the peer is reading slowly,
        not idle.

        Our last ``send`` may have handed the kernel megabytes (its buffer grows
        with the connection), so a peer still reading them long after looks
        idle from here. Asked only when the idle timeout would fire, so a
        queue that emptied just before counts as moved: the peer may still be
        reading its own buffer, and gets one more idle timeout from now.
        """
        if _OUTQ is None:
            return False
        try:
            unsent: int = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), _OUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return False
        before, self._kernel_unsent = self._kernel_unsent, unsent
        return unsent != before

    def _probe_peer_gone(self) -> bool:
        """Close the connection if its peer reset it; True if so.

        A connection paused for the session (its requests wait in a pool) with
        nothing to send is not in the poller at all, so nothing would report a
        reset, and the work queued for a peer that is gone would all run. The
        sweep peeks at such connections instead: one ``recv(MSG_PEEK)`` per
        sweep, and only for them. A FIN (b"") is a half-close, not a departure.
        """
        try:
            socket.socket.recv(self.sock, 1, socket.MSG_PEEK)  # the TCP stream, under any TLS
        except WOULD_BLOCK:
            return False
        except OSError as exc:
            self.close(f"peer gone while its requests waited: {exc}")
            return True
        return False

    def _shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already reset by the peer: the next read or the linger timer closes it

    def close(self, reason: str = "closed") -> None:
        """Unregister and close the socket; runs once."""
        if self.state is CLOSED:
            return
        self.state = CLOSED
        log.debug("%s: closed (%s)", self, reason)
        if self._interest:
            self.loop.unregister(self.sock)
        self._interest = 0
        self._owner.connection_closed(self, reason)  # while the socket can still say what it moved
        self.sock.close()
        self._out = None
        self._out_size = 0
        if self.session is not None:
            self.session.connection_lost()

    @property
    def peer(self) -> Any:
        """The socket's peer (looked up when asked: most connections never are)."""
        try:
            return self.sock.getpeername()
        except OSError:
            return None

    @property
    def proxy_header(self) -> ProxyHeader | None:
        info = self._info
        return info if isinstance(info, ProxyHeader) else None

    @proxy_header.setter
    def proxy_header(self, header: ProxyHeader) -> None:
        self._info = header

    @property
    def client(self) -> Any:
        """The real client: the PROXY header's source when there was one, else the peer."""
        info = self._info
        if isinstance(info, ProxyHeader) and info.source is not None:
            return info.source
        if isinstance(info, ConnectionInfo):
            return info.peer
        return self.peer

    @property
    def connection_info(self) -> ConnectionInfo:
        """This connection as a handler sees it (built once, when first asked)."""
        info = self._info
        if isinstance(info, ConnectionInfo):
            return info
        self._info = built = build_connection_info(self.sock, info)
        return built

    def __repr__(self) -> str:
        return f"<connection {format_address(self.client)} {self.state}>"


def _consume(out: deque[Any], sent: int) -> None:
    """Drop `sent` bytes from the front of the output queue, without copying."""
    while sent:
        head = out[0]
        size = len(head)
        if sent < size:
            out[0] = memoryview(head)[sent:]
            return
        out.popleft()
        sent -= size


def _first(items: deque[Any], count: int) -> Any:
    if len(items) <= count:
        return items
    return (items[i] for i in range(count))

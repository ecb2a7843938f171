"""One accepted connection on the server: partial I/O, backpressure, timeouts.

Theory of operation
-------------------
Readiness is a hint, never a promise: every ``recv``/``send`` tolerates
``BlockingIOError``, ``InterruptedError`` and TLS's want-read/want-write, and any other ``OSError`` (reset,
broken pipe) ends the connection through the one `close` path, which unregisters
before it closes and runs only once.

Output is written at once; only what the kernel refuses is queued (as
memoryviews, so a partial send never copies the rest) and only then does the
connection ask for EVENT_WRITE. The selector interest is recomputed in one
place, `_update_interest`, and ``modify`` is called only when it changes.

Backpressure: once pending output passes the high-water mark the connection
stops asking for EVENT_READ, so a peer that does not read its answers cannot
make the server buffer without bound; reading resumes below the low-water mark.
The frame timeout is paused meanwhile (it is the server that holds the peer up).

Input: each read asks for as much as recent reads suggest (`_read_once`):
small reads come from CPython's small-object allocator, large ones from
malloc, and a ping-pong of small messages is cheaper for the difference. A
framed connection receives a large content straight into the frame's own
buffer (`_read_into`), chosen by the same size field, so the common event
pays for no extra check.

Lifecycle::

    OPEN --EOF / drain--> FINISHING (answer what is complete, flush, close)
    OPEN --fatal protocol error--> FAILED (flush the error frame, shut down
         writing, discard input until EOF or `error_linger`, close)
    FAILED --EOF before the error frame is out--> FINISHING
    any --reset / timeout / abort--> CLOSED

Timeouts are not timers per connection: the server sweeps its connections a few
times per timeout period and calls `check_timeouts`, so the hot path only stamps
``loop.now`` into an attribute.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections import deque
from typing import TYPE_CHECKING, Any

from .errors import WOULD_BLOCK, ProtocolError
from .loop import EVENT_READ, EVENT_WRITE
from .protocol import ErrorCode, Frame, FrameDecoder, encode_header

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("multiconn.connection")

#: Bytes asked of one ``recv`` while reads are large.
RECV_SIZE = 64 * 1024
#: Bytes asked of one ``recv`` while reads are small. ``recv(n)`` allocates n
#: bytes before it knows how many arrive: up to 512 (with the object's header)
#: they come from CPython's small-object allocator, above that from malloc,
#: which costs about 100 ns more per read, a tenth of a small echo's Python time.
SMALL_RECV_SIZE = 448
#: A read of at most this many bytes is small. Half of SMALL_RECV_SIZE, so that
#: messages a little shorter than it do not flip the size at every read.
SMALL_READ = SMALL_RECV_SIZE // 2
#: `_recv_size` while the connection receives into a buffer of its own (`_read_into`).
RECV_IN_PLACE = 0
#: Responses of one read up to this size are joined into one buffer for one send.
JOIN_LIMIT = 64 * 1024
#: Buffers handed to one ``sendmsg`` (IOV_MAX is 1024 on Linux).
MAX_IOVECS = 512

OPEN, FINISHING, FAILED, CLOSED = "open", "finishing", "failed", "closed"

_os_read, _os_write = os.read, os.write  # raw echo's fast path: one global lookup each


class Connection:
    """Base of server-side connections; subclasses say what to do with data."""

    #: Whether the socket can send several buffers at once (``sendmsg``).
    vectored = True

    __slots__ = (
        "sock", "server", "loop", "limits", "state", "_out", "_out_size",
        "_interest", "_paused", "_paused_at", "_draining", "last_activity",
        "last_progress", "_recv_size", "__weakref__",
    )

    def __init__(self, sock: socket.socket, server: "Server") -> None:
        self.sock = sock
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.state = OPEN
        # Created on the first partial send and dropped when drained: an idle
        # connection should not carry an empty deque (760 bytes).
        self._out: deque[Any] | None = None
        self._out_size = 0
        self._paused = False
        self._paused_at = 0.0
        self._draining = False
        self._recv_size = SMALL_RECV_SIZE
        self.last_activity = self.last_progress = self.loop.now
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._interest = EVENT_READ
        self.loop.register(sock, EVENT_READ, self._on_events)

    # -- events -----------------------------------------------------------

    def _on_events(self, mask: int) -> None:
        try:
            if mask & EVENT_WRITE:
                self._flush()
            if mask & EVENT_READ and self.state is not CLOSED:
                if self._draining:
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
        messages reads small. A subclass that wants bytes in a buffer of its
        own sets the size to RECV_IN_PLACE and reads them in `_read_into`.
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
        if self.state is not FAILED:  # failed: discard until EOF, so the error frame is not lost to a reset
            self.data_received(data)
        return True

    def _read_into(self) -> bool:
        """Hook for a subclass that sets `_recv_size` to RECV_IN_PLACE."""
        raise NotImplementedError

    def _recv_failed(self, exc: OSError) -> None:
        if not isinstance(exc, WOULD_BLOCK):  # would block: readiness was only a hint
            self.close(f"recv failed: {exc}")

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def partial_input(self) -> bool:
        """True while an unfinished request is buffered (for the frame timeout)."""
        return False

    def _on_eof(self) -> None:
        if self.state is FAILED and not self._out:
            # The error frame is out and our sending side shut down: done.
            self.close("peer closed after error")
        else:
            # Answers (and maybe an error frame) may still be queued: the peer
            # only closed its sending side, so stop reading and flush them first.
            self._finish("peer closed its sending side")

    def _finish(self, reason: str) -> None:
        """No more input will be handled: flush what is pending, then close."""
        if self.state not in (OPEN, FAILED):
            return
        self.state = FINISHING
        log.debug("%s: finishing (%s)", self, reason)
        if not self._out:
            self.close(reason)
        else:
            self._update_interest()

    # -- output -----------------------------------------------------------

    def write(self, data: bytes | memoryview) -> None:
        """Send `data` now as far as the kernel takes it; queue the rest."""
        if self.state is OPEN and not self._out:
            # The common case: the kernel takes it all and nothing is queued.
            try:
                sent = self.sock.send(data)
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
            if len(self._out) == 1:
                self._flush()

    def _queue(self, data: bytes | memoryview) -> None:
        out = self._out
        if not out:
            if out is None:
                out = self._out = deque()
            self.last_progress = self.loop.now
        out.append(data)
        self._out_size += len(data)
        if self._out_size > self.limits.high_water and not self._paused:
            self._pause_reading()

    def write_many(self, parts: list[bytes]) -> None:
        """Queue several buffers (large contents: no join copy) and send."""
        if self.state is CLOSED:
            return
        was_empty = not self._out
        for part in parts:
            if part:
                self._queue(part)
        if was_empty and self._out:
            self._flush()

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
            self.last_progress = self.loop.now
            self._out_size -= sent
            _consume(out, sent)
            if sent < attempted:
                break  # the kernel's buffer is full: wait for EVENT_WRITE
        limits = self.limits
        if self._paused:
            if self._out_size <= limits.low_water:
                self._resume_reading()
        elif self._out_size > limits.high_water:
            self._pause_reading()
        if self._out:
            self._update_interest()
        else:
            self._out = None
            self._on_output_flushed()

    def _on_output_flushed(self) -> None:
        if self.state is FINISHING:
            self.close("done")
        elif self.state is FAILED:
            self._shutdown_write()
            # The error frame is out: give the peer a moment to read it.
            self.loop.call_later(self.limits.error_linger, self.close, "error linger over")
        self._update_interest()

    @property
    def pending_output(self) -> int:
        return self._out_size

    # -- interest and backpressure ----------------------------------------

    def _update_interest(self) -> None:
        """Ask the selector for exactly what this connection can use now."""
        if self.state is CLOSED:
            return
        reading = not self._paused and self.state is not FINISHING
        self._set_interest((EVENT_READ if reading else 0) | (EVENT_WRITE if self._out else 0))

    def _set_interest(self, interest: int) -> None:
        current = self._interest
        if interest == current:
            return
        if not interest:
            self.loop.unregister(self.sock)
        elif not current:
            self.loop.register(self.sock, interest, self._on_events)
        else:
            self.loop.modify(self.sock, interest, self._on_events)
        self._interest = interest

    def _pause_reading(self) -> None:
        self._paused = True
        self._paused_at = self.loop.now
        self._update_interest()

    def _resume_reading(self) -> None:
        self._paused = False
        self.on_resumed(self.loop.now - self._paused_at)
        self._update_interest()
        if self._draining and self.state is OPEN:
            self.loop.call_soon(self._drain_input)

    def on_resumed(self, paused_for: float) -> None:
        """Hook: reading resumed after `paused_for` seconds of backpressure."""

    # -- shutdown and timeouts --------------------------------------------

    def drain(self) -> None:
        """Server shutdown: handle what the peer already sent, flush, close."""
        if self.state is not OPEN:
            return
        self._draining = True
        if not self._paused:
            self._drain_input()

    def _drain_input(self) -> None:
        while self.state is OPEN and not self._paused:
            if not self._read_once():
                break
        if self.state is OPEN and not self._paused:
            self._finish("server shutting down")

    def check_timeouts(self, now: float) -> None:
        """Called by the server's sweep; enforces the frame and idle timeouts."""
        limits = self.limits
        if self.state is FAILED and not self._out:
            return  # the error linger timer ends it
        if not self._paused and self.partial_input() and self.frame_timed_out(now):
            return
        if self._out:
            if now - self.last_progress >= limits.idle_timeout:
                self.close("pending output did not move for the idle timeout")
        elif not self.partial_input() and now - self.last_activity >= limits.idle_timeout:
            self.close("idle timeout")

    def frame_timed_out(self, now: float) -> bool:
        """Hook for framed connections: act on an expired frame timeout."""
        return False

    def fail(self, frame: Frame) -> None:
        """Send a fatal error frame, then close without losing it to a reset."""
        if self.state is not OPEN:
            return
        self.state = FAILED
        # Flushing it shuts down our sending side and starts the linger (see
        # _on_output_flushed); until then the stalled-output timeout applies.
        self.write(encode_header(frame.header, len(frame.content)) + frame.content)

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
        self.sock.close()
        self._out = None
        self._out_size = 0
        self.server._connection_closed(self)

    @property
    def peer(self) -> Any:
        """The peer's address (looked up when asked: most connections never are)."""
        try:
            return self.sock.getpeername()
        except OSError:
            return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {_format_peer(self.peer)} {self.state}>"


def _consume(out: deque, sent: int) -> None:
    """Drop `sent` bytes from the front of the output queue, without copying."""
    while sent:
        head = out[0]
        size = len(head)
        if sent < size:
            out[0] = memoryview(head)[sent:]
            return
        out.popleft()
        sent -= size


def _first(items: deque, count: int) -> Any:
    if len(items) <= count:
        return items
    return (items[i] for i in range(count))


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = f"[{peer[0]}]" if ":" in str(peer[0]) else peer[0]
        return f"{host}:{peer[1]}"
    return str(peer)


class FramedConnection(Connection):
    """Speaks the framed protocol: decode, answer every frame in order, report errors."""

    __slots__ = ("decoder", "frame_started", "_held", "_held_due", "_held_error")

    def __init__(self, sock: socket.socket, server: "Server") -> None:
        self.decoder = FrameDecoder(server.limits.max_content)
        self.frame_started: float | None = None
        # Requests received but not answered yet because the answers before
        # them already filled the output past the high-water mark.
        self._held: list[Frame] | None = None
        self._held_due = False  # answering them is scheduled
        self._held_error: Frame | None = None  # a fatal error frame to send after them
        super().__init__(sock, server)

    def _read_into(self) -> bool:
        """Receive a large content in place, never past the frame's end.

        The steps of Connection._read_once, which spells them out rather than
        share a helper: it runs on every event.
        """
        view = self.decoder.recv_buffer() if self.state is OPEN else None
        if view is None:  # failed meanwhile: input is read and discarded
            self._recv_size = RECV_SIZE
            return super()._read_once()
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
        frames = self.decoder.buffer_updated(received)
        if frames:  # the content is complete
            self._recv_size = RECV_SIZE
        self._handle(frames)
        return True

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            log.debug("%s: protocol error %s", self, exc)
            error = Frame.error(exc.code, exc.message, id=exc.request_id)
            if exc.frames:  # type: ignore[attr-defined]
                self._answer(exc.frames)  # type: ignore[attr-defined]
            if self._held is not None:
                self._held_error = error  # its place is after the held answers
            else:
                self.fail(error)
            return
        self._handle(frames)

    def _handle(self, frames: list[Frame]) -> None:
        if frames:
            self._answer(frames)
        decoder = self.decoder
        if decoder.has_partial:
            if frames or self.frame_started is None:
                self.frame_started = self.loop.now
            if decoder.wants_buffer:
                self._recv_size = RECV_IN_PLACE
        else:
            self.frame_started = None

    def _answer(self, frames: list[Frame]) -> None:
        """Answer `frames` in order with one send; past the high-water mark, hold the rest.

        Holding keeps a peer whose small requests have large answers from
        growing the output queue beyond the mark: the held requests are
        answered (before anything else is read) once the queue drains.
        """
        respond = self.server.respond
        if len(frames) == 1:  # the common case, without the loop's bookkeeping
            response = respond(frames[0])
            content = response.content
            prefix = encode_header(response.header, len(content))
            if len(content) <= JOIN_LIMIT:
                self.write(prefix + content)
            else:
                self.write_many([prefix, content])
            return
        parts = []
        size = 0
        budget = self.limits.high_water - self._out_size
        last = len(frames) - 1
        for index, frame in enumerate(frames):
            response = respond(frame)
            content = response.content
            prefix = encode_header(response.header, len(content))
            parts.append(prefix)
            parts.append(content)
            size += len(prefix) + len(content)
            if size > budget and index < last:
                self._held = frames[index + 1 :]
                break
        if size <= JOIN_LIMIT:
            self.write(b"".join(parts))
        else:
            self.write_many(parts)
        if self._held and self.state is not CLOSED:
            if not self._paused:
                self._pause_reading()
            if self._out_size <= self.limits.low_water:
                self._resume_reading()

    def _resume_reading(self) -> None:
        if self._held is None:
            super()._resume_reading()
        elif not self._held_due:  # answer those first; reading stays paused until then
            self._held_due = True
            self.loop.call_soon(self._answer_held)

    def _answer_held(self) -> None:
        frames, self._held, self._held_due = self._held, None, False
        if self.state is CLOSED or not frames:
            return
        self._answer(frames)
        if self._held is not None:
            return
        if self._held_error is not None:
            error, self._held_error = self._held_error, None
            self.fail(error)
        elif self._paused and self._out_size <= self.limits.low_water:
            super()._resume_reading()

    def partial_input(self) -> bool:
        return self.decoder.has_partial

    def on_resumed(self, paused_for: float) -> None:
        if self.frame_started is not None:
            self.frame_started += paused_for

    def frame_timed_out(self, now: float) -> bool:
        started = self.frame_started
        if started is None or now - started < self.limits.frame_timeout:
            return False
        message = f"frame not complete within {self.limits.frame_timeout:g} s"
        log.debug("%s: %s", self, message)
        self.fail(Frame.error(ErrorCode.TIMEOUT, message, id=self.decoder.partial_id))
        return True


class RawEchoConnection(Connection):
    """Echoes bytes as they arrive (no framing)."""

    __slots__ = ("_fd",)

    def __init__(self, sock: socket.socket, server: "Server") -> None:
        super().__init__(sock, server)
        self._fd = sock.fileno()  # for the fast path's os.read and os.write

    # Echo writes back what it receives: `write` itself, one call less per read.
    data_received = Connection.write

    def _on_events(self, mask: int) -> None:
        """Small messages, the state nearly every event of a ping-pong finds
        (readable, reading small, nothing queued), take one call: `_read_once`
        and `write` inlined. Anything else takes the general path.

        Raw echo is the event loop's own benchmark, and there the general
        path's calls are a seventh of the server's Python time: with the C
        load generator (100 connections, 64-byte ping-pong) this path took
        0.83 µs of user CPU per request against 0.96, 2 % more requests/s.

        It reads and writes the descriptor with `os.read` and `os.write` (a
        socket is a file on POSIX; TLS never comes here). They take their
        arguments the fast way, where ``socket.recv`` and ``send`` parse an
        argument tuple against a format string: 0.09 µs less user CPU per
        request in the same benchmark, of which the kernel's read and write
        paths give back up to 0.05 µs; 0.8 % more requests/s.
        """
        if (mask != EVENT_READ or self._recv_size != SMALL_RECV_SIZE or self._out is not None
                or self.state is not OPEN or self._draining):
            super()._on_events(mask)
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


class TLSConnectionMixin:
    """TLS on top of a connection class: a non-blocking handshake first, then
    the same framing, with the few differences TLS brings:

    * the handshake may want to read or to write; until it is done the
      connection only drives it, and the frame timeout bounds how long it may take;
    * one ``recv`` returns at most one TLS record, and decrypted bytes can wait
      inside the SSL object (``pending()``) while the socket itself has nothing
      to read: those are read at once, or no select() would ever report them;
    * ``SSLSocket`` has no ``sendmsg``, and shutting down its sending side
      would drop the TLS session, so neither is used.
    """

    __slots__ = ()
    vectored = False

    def __init__(self, sock: ssl.SSLSocket, server: "Server") -> None:
        self._handshaking = True
        super().__init__(sock, server)  # type: ignore[call-arg]

    def _on_events(self, mask: int) -> None:
        if self._handshaking:
            self._continue_handshake()
        else:
            # The general path, never a subclass's fast path: those read the
            # socket directly and would miss bytes waiting in the SSL object.
            Connection._on_events(self, mask)  # type: ignore[arg-type]

    def _continue_handshake(self) -> None:
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_interest(EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_interest(EVENT_WRITE)
            return
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
            log.info("%s: TLS handshake failed: %s", self, reason)
            self._handshaking = False
            self._abandon_tls()
            return
        self._handshaking = False
        self.last_activity = self.loop.now
        log.debug("%s: TLS established (%s)", self, self.sock.version())
        self._update_interest()
        self._read_once()

    def _abandon_tls(self) -> None:
        """Close without a reset: stop TLS, send FIN, discard input until EOF or the linger ends."""
        self.state = FAILED
        try:
            self.sock.shutdown(socket.SHUT_WR)  # also drops the SSL object: plain reads from here
        except OSError:
            pass  # already reset by the peer: the next read or the linger timer closes it
        self.loop.call_later(self.limits.error_linger, self.close, "error linger over")
        self._set_interest(EVENT_READ)

    def _read_once(self) -> bool:
        progressed = super()._read_once()  # type: ignore[misc]
        while progressed and self.state is not CLOSED and not self._paused and self.sock.pending():
            progressed = super()._read_once()  # type: ignore[misc]
        return progressed

    def _resume_reading(self) -> None:
        super()._resume_reading()  # type: ignore[misc]
        if self.state is not CLOSED and not self._paused and self.sock.pending():
            self.loop.call_soon(self._on_events, EVENT_READ)

    def _shutdown_write(self) -> None:
        pass

    def check_timeouts(self, now: float) -> None:
        if self._handshaking:
            if now - self.last_activity >= self.limits.frame_timeout:
                log.info("%s: TLS handshake not done within %g s", self, self.limits.frame_timeout)
                self.close("TLS handshake timed out")
            return
        super().check_timeouts(now)  # type: ignore[misc]


class TLSFramedConnection(TLSConnectionMixin, FramedConnection):
    __slots__ = ("_handshaking",)


class TLSRawEchoConnection(TLSConnectionMixin, RawEchoConnection):
    __slots__ = ("_handshaking",)

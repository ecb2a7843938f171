"""An asyncio client: many tasks share one pipelined connection.

``client = await multiconn.aio.connect(host, port)`` opens a connection;
``await client.request(frame)`` may then be called by any number of tasks at
once. Their frames are pipelined, written in call order, and each task gets
its own answer. `AsyncClient` mirrors the blocking `multiconn.Client`: the same
`request` / `request_many` and the same exceptions.

Theory of operation
-------------------
The protocol has no multiplexing: the server answers the requests of a
connection in the order they arrived, so the only way to pair an answer with
its request is to count. Everything here exists to keep that count right
whatever the tasks do.

* **One reader.** The connection is an `asyncio.Protocol`; its
  ``data_received`` feeds a sans-IO `FrameDecoder`, and every complete frame
  resolves the oldest entry of one FIFO of pending requests. No task ever reads
  the socket itself, so no task can take another's answer, and answers flow even
  while no one is awaiting them.
* **Atomic writes.** A request appends its entry to the FIFO and hands its whole
  encoded frame to ``transport.write`` in one synchronous step, with no ``await``
  in between. The transport either sends the bytes or buffers all of them, so the
  order of the FIFO is the order of the bytes on the wire, and a frame is never
  half written: cancellation can only strike before the step (nothing was sent)
  or after it (the whole frame is on its way).
* **Cancellation and timeouts leave the FIFO alone.** A task that gives up
  (cancelled, or past its `timeout`) abandons its future, not its entry. The
  answer is still read when it comes, matched to that entry and dropped, so
  every later answer still finds its own request: one task's cancellation never
  costs another task its answer.
* **Bounded in flight.** At most `max_in_flight` requests are written and
  unanswered at once (64 by default, the server's own per-connection bound).
  Further callers wait, first come first served, for a slot; a slot is freed
  when an answer is read (not when a task gives up: the server is still
  working on an abandoned request), and is handed straight to the oldest
  waiter, so a newcomer can never overtake it. The transport's own flow
  control (``pause_writing``) also holds a writer until its bytes drain.
* **Failure is shared.** When the server closes the connection, or sends bytes
  that are not a frame, nothing after that point can be matched any more:
  every pending request fails at once (`ConnectionClosed` or `ProtocolError`),
  the connection is closed, and later calls fail at once with
  `ConnectionClosed`.
* **Ids.** Frames are sent as given, ``id`` included, and answers are returned
  as received. Order alone does the matching; an answer that carries an ``id``
  different from its request's is taken as a broken stream (`ProtocolError`).

`OSError` and `ssl.SSLError` are translated once, at this boundary:
`ConnectionFailed` (`TLSError`, `CertificateVerificationError`) at connect,
`ConnectionClosed` afterwards, and `Timeout` (also a `TimeoutError`) for every
deadline. An error frame is returned as `ErrorResponse`, as by the blocking
client.

This module is imported on its own (``import multiconn.aio``); plain
``import multiconn`` does not load it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl as _ssl
from collections import deque
from typing import Any, Callable, Iterable, cast

from .client import DEFAULT_TIMEOUT, raise_for_error
from .errors import (
    CertificateVerificationError,
    ConnectionClosed,
    ConnectionFailed,
    MulticonnError,
    ProtocolError,
    Timeout,
    TLSError,
)
from .protocol import DEFAULT_MAX_CONTENT, ErrorCode, Frame, FrameDecoder, encode_frame

__all__ = ["AsyncClient", "connect", "DEFAULT_MAX_IN_FLIGHT"]

#: Requests written and not yet answered, per connection, before callers wait.
DEFAULT_MAX_IN_FLIGHT = 64
#: How long `AsyncClient.close` waits for the transport to finish closing.
CLOSE_WAIT = 5.0


def _expire(future: asyncio.Future[Any], message: str) -> None:
    """A deadline passed: fail `future` with `Timeout` unless it is settled."""
    if not future.done():
        future.set_exception(Timeout(message))


def _settle(future: asyncio.Future[Any]) -> None:
    """Abandon `future`: cancel it, or mark its exception retrieved (no log noise)."""
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


class _Protocol(asyncio.Protocol):
    """Forwards the transport's callbacks to its `AsyncClient`."""

    def __init__(self, client: "AsyncClient") -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport is always an asyncio.Transport.
        self.client._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client._data_received(data)

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost does the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost(exc)

    def pause_writing(self) -> None:
        self.client._write_paused = True

    def resume_writing(self) -> None:
        self.client._resume_writing()


class AsyncClient:
    """One connection shared by any number of tasks. Open it with `connect`.

    ``timeout`` (seconds, or None for no limit) bounds every call: a `request`
    must have its answer within `timeout` of being called, slot wait included;
    each frame of a `request_many` within `timeout` of the batch reaching it.
    ``max_in_flight`` bounds the requests written and not yet answered.
    """

    def __init__(self, *, timeout: float | None = DEFAULT_TIMEOUT,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 max_content: int = DEFAULT_MAX_CONTENT) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 or None")
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self._loop = asyncio.get_running_loop()
        self._protocol = _Protocol(self)
        self._transport: asyncio.Transport | None = None
        self._decoder = FrameDecoder(max_content)
        #: (answer future, request id, deadline timer) per written request, oldest first.
        self._pending: deque[tuple[asyncio.Future[Frame], Any, asyncio.TimerHandle | None]] = deque()
        self._in_flight = 0  # slots taken: written and unanswered, or handed to a waiter
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        #: Waiters handed a slot that have not run yet to write with it: until
        #: they have, a newcomer must queue too, or it would write first.
        self._handed = 0
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: Set once the connection can carry no more requests: raised by later calls.
        self._error: MulticonnError | None = None
        self._last_fatal: tuple[str, str] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()

    # -- public API -------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests written and not yet answered (abandoned ones included), plus
        slots just handed to a waiting caller. Never more than `max_in_flight`."""
        return self._in_flight

    @property
    def closed(self) -> bool:
        """True once the connection can carry no more requests."""
        return self._error is not None

    async def request(self, frame: Frame) -> Frame:
        """Send one request and return its answer.

        Raises `ErrorResponse` for an error frame, `Timeout`, `ConnectionClosed`
        or `ProtocolError`. Safe to call from many tasks at once, and to cancel.
        """
        data = encode_frame(frame)
        deadline = self._deadline()
        if not self._take_slot():
            await self._wait_for_slot(deadline)
        future = self._send([(data, frame.id)], deadline)[0]
        try:
            if self._write_paused:
                await self._wait_writable(deadline)
            answer = await future
        except BaseException:
            _settle(future)
            raise
        return raise_for_error(answer)

    async def request_many(self, frames: Iterable[Frame], *, raise_errors: bool = True) -> list[Frame]:
        """Pipeline `frames` (in order, as many at a time as there are free slots)
        and return their answers in order.

        With `raise_errors`, an error frame among the answers raises
        `ErrorResponse` once all answers are in (the first error wins). If the
        server closes the connection after answering one of them with an error
        frame, that `ErrorResponse` is raised rather than `ConnectionClosed`.
        """
        encoded = [(encode_frame(frame), frame.id) for frame in frames]
        futures: list[asyncio.Future[Frame]] = []
        try:
            sent = 0
            while sent < len(encoded):
                deadline = self._deadline()
                if not self._take_slot():
                    await self._wait_for_slot(deadline)
                count = 1
                while sent + count < len(encoded) and self._take_slot():
                    count += 1
                futures += self._send(encoded[sent:sent + count], deadline)
                sent += count
                if self._write_paused:
                    await self._wait_writable(deadline)
            answers = []
            for future in futures:
                try:
                    answers.append(await future)
                except ConnectionClosed:
                    for answer in answers:  # the server's reason to close, if it gave one
                        raise_for_error(answer)
                    raise
        except BaseException:
            for future in futures:
                _settle(future)
            raise
        if raise_errors:
            for answer in answers:
                raise_for_error(answer)
        return answers

    async def close(self) -> None:
        """Close the connection; requests still pending fail with `ConnectionClosed`.

        Returns once the transport is closed (aborted after `CLOSE_WAIT` s).
        Safe to call more than once.
        """
        transport = self._transport
        if transport is None:
            return
        if self._error is None:
            self._fail(lambda: ConnectionClosed("the connection was closed by the client before the answer came"),
                       ConnectionClosed("the connection was closed by the client"))
        if self._closed.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), CLOSE_WAIT)
        except asyncio.TimeoutError:
            transport.abort()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"in_flight={self._in_flight}/{self.max_in_flight}"
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return f"<AsyncClient {peer} {state}>"

    # -- slots --------------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None if self.timeout is None else self._loop.time() + self.timeout

    def _take_slot(self) -> bool:
        """Take a free slot at once, unless someone is already waiting for one
        or holds one it has not written with yet."""
        if self._in_flight < self.max_in_flight and not self._slot_waiters and not self._handed:
            self._in_flight += 1
            return True
        return False

    async def _wait_for_slot(self, deadline: float | None) -> None:
        """Wait in line for a slot; returns holding it."""
        if self._error is not None:
            raise self._closed_error()
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._slot_waiters.append(waiter)
        timer = None
        if deadline is not None:
            timer = self._loop.call_at(deadline, _expire, waiter,
                                       f"no free slot within {self.timeout:g} s "
                                       f"({self.max_in_flight} requests in flight)")
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._slot_taken_up()
                self._release_slot()  # handed a slot, then cancelled before using it: pass it on
            else:
                try:
                    self._slot_waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        else:
            self._slot_taken_up()  # the caller writes with it before anyone else runs
        finally:
            if timer is not None:
                timer.cancel()

    def _slot_taken_up(self) -> None:
        """A handed slot's waiter runs: once none is left to run, slots freed
        meanwhile (while newcomers had to queue) go to the oldest waiters."""
        self._handed -= 1
        if not self._handed:
            waiters = self._slot_waiters
            while waiters and self._in_flight < self.max_in_flight:
                waiter = waiters.popleft()
                if not waiter.done():
                    self._in_flight += 1
                    self._hand(waiter)

    def _hand(self, waiter: asyncio.Future[None]) -> None:
        self._handed += 1
        waiter.set_result(None)

    def _release_slot(self) -> None:
        """An answer came (or a slot went unused): hand the slot to the oldest waiter."""
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                self._hand(waiter)  # the slot changes hands; the count stays
                return
        self._in_flight -= 1

    # -- writing ------------------------------------------------------------------

    def _send(self, items: list[tuple[bytes, Any]], deadline: float | None) -> list[asyncio.Future[Frame]]:
        """Queue one entry per frame and write them all, in one synchronous step.

        The caller holds one slot per frame; they are given back if the
        connection is already closed.
        """
        transport = self._transport
        if self._error is not None or transport is None or transport.is_closing():
            for _ in items:
                self._release_slot()
            raise self._closed_error()
        loop = self._loop
        futures = []
        for _data, request_id in items:
            future: asyncio.Future[Frame] = loop.create_future()
            timer = None
            if deadline is not None:
                timer = loop.call_at(deadline, _expire, future, f"no response within {self.timeout:g} s")
            self._pending.append((future, request_id, timer))
            futures.append(future)
        transport.write(items[0][0] if len(items) == 1 else b"".join(data for data, _ in items))
        return futures

    async def _wait_writable(self, deadline: float | None) -> None:
        """Wait until the transport's buffer has drained below its low-water mark."""
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._drain_waiters.append(waiter)
        timer = None
        if deadline is not None:
            timer = self._loop.call_at(deadline, _expire, waiter,
                                       f"request not sent within {self.timeout:g} s")
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            if not waiter.done() or waiter.cancelled():
                try:
                    self._drain_waiters.remove(waiter)
                except ValueError:
                    pass

    def _resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- reading ------------------------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            for frame in exc.frames:  # type: ignore[attr-defined]
                if not self._deliver(frame):
                    return
            self._fail_protocol(exc.code, exc.message)
            return
        for frame in frames:
            if not self._deliver(frame):
                return

    def _deliver(self, frame: Frame) -> bool:
        """Give `frame` to the oldest pending request; False if the stream broke."""
        if self._error is not None:
            return False
        if not self._pending:
            self._fail_protocol(ErrorCode.BAD_HEADER_VALUE,
                                f"the server sent a frame (id {frame.id!r}) with no request pending")
            return False
        future, request_id, timer = self._pending.popleft()
        if timer is not None:
            timer.cancel()
        answer_id = frame.id
        if request_id is not None and answer_id is not None and answer_id != request_id:
            self._pending.appendleft((future, request_id, None))  # fails with the rest
            self._fail_protocol(ErrorCode.BAD_HEADER_VALUE,
                                f"answer id {answer_id!r} does not match request id {request_id!r}",
                                request_id)
            return False
        self._release_slot()
        info = frame.error_info
        if info is not None and info[0] in ErrorCode.FATAL:
            self._last_fatal = info
        if not future.done():  # else abandoned (cancelled or timed out): drop the answer
            future.set_result(frame)
        return True

    def _fail_protocol(self, code: str, message: str, request_id: Any = None) -> None:
        self._fail(lambda: ProtocolError(code, message, request_id),
                   ConnectionClosed(f"the connection was closed after a malformed answer ({code}: {message})"))

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            if exc is None:
                reason = ""
            elif isinstance(exc, OSError) and exc.errno:
                reason = f": {os.strerror(exc.errno)}"
            else:
                reason = f": {exc}"
            if self._last_fatal is not None:
                reason += f" (after an error frame {self._last_fatal[0]}: {self._last_fatal[1]})"
            self._fail(lambda: ConnectionClosed(f"the server closed the connection before answering{reason}"),
                       ConnectionClosed(f"the server closed the connection{reason}"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _fail(self, pending_error: Callable[[], MulticonnError], later: MulticonnError) -> None:
        """The stream is over: fail everyone waiting, close the transport."""
        self._error = later
        pending, self._pending = self._pending, deque()
        for future, _request_id, timer in pending:
            if timer is not None:
                timer.cancel()
            if not future.done():
                future.set_exception(pending_error())
        self._in_flight -= len(pending)  # their slots go with them
        waiters, self._slot_waiters = self._slot_waiters, deque()
        for waiter in waiters:  # one already handed a slot gives it back when it runs
            if not waiter.done():
                waiter.set_exception(self._closed_error())
        self._resume_writing()  # writers go on to find their answer futures failed
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if transport.get_write_buffer_size():
                transport.abort()  # nothing unsent matters any more
            else:
                transport.close()

    def _closed_error(self) -> ConnectionClosed:
        """A fresh exception for a call made after the connection ended."""
        error = self._error
        return ConnectionClosed(str(error) if error is not None else "the connection is closed")


# -- connecting -------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


async def connect(host: str = "127.0.0.1", port: int = 65432, *,
                  ssl: _ssl.SSLContext | bool | None = None, server_hostname: str | None = None,
                  timeout: float | None = DEFAULT_TIMEOUT, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                  max_content: int = DEFAULT_MAX_CONTENT) -> AsyncClient:
    """Open an `AsyncClient`, over TLS when `ssl` is a context (``True``: the
    system's default context).

    `server_hostname` is the name the certificate must carry (default: `host`).
    `timeout` bounds the TCP connect and the TLS handshake each, and then every
    request (see `AsyncClient`). Raises `ConnectionFailed` (`TLSError`,
    `CertificateVerificationError` for TLS failures) or `Timeout`.
    """
    if ssl is True:
        ssl = _ssl.create_default_context()
    elif ssl is False:
        ssl = None
    if server_hostname is not None and ssl is None:
        raise ValueError("server_hostname is only meaningful with ssl")
    client = AsyncClient(timeout=timeout, max_in_flight=max_in_flight, max_content=max_content)
    loop = client._loop
    where = f"{host}:{port}"
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(lambda: client._protocol, host, port), timeout)
    except asyncio.TimeoutError:
        raise Timeout(f"connecting to {where} timed out after {timeout:g} s") from None
    except OSError as exc:
        raise ConnectionFailed(f"cannot connect to {where}: {_reason(exc)}") from None
    except UnicodeError:  # the idna codec rejects the name before any lookup
        raise ConnectionFailed(f"cannot connect to {where}: invalid host name") from None
    if ssl is not None:
        try:
            tls_transport = await asyncio.wait_for(
                loop.start_tls(transport, client._protocol, ssl, server_hostname=server_hostname or host),
                timeout)
        except BaseException as exc:
            transport.abort()
            if isinstance(exc, _ssl.SSLCertVerificationError):
                raise CertificateVerificationError(
                    f"TLS certificate of {where} not accepted: {exc.verify_message or exc.reason}") from None
            if isinstance(exc, asyncio.TimeoutError):
                raise Timeout(f"TLS handshake with {where} timed out after {timeout:g} s") from None
            if isinstance(exc, (_ssl.SSLError, OSError)):
                reason = getattr(exc, "reason", None) or _reason(exc)
                raise TLSError(f"TLS handshake with {where} failed: {reason}") from None
            raise
        if tls_transport is None:  # the peer closed during the handshake
            raise TLSError(f"TLS handshake with {where} failed: connection closed")
        client._transport = tls_transport
    return client

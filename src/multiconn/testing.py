"""Helpers for testing applications against a real multiconn server.

``with ServerThread(my_app) as server: client = server.connect()`` runs a real
server on an ephemeral loopback port in a background thread, so an
application's tests exercise the same sockets and framing as production.
`ServerProcess` (from `multiconn.server_process`) runs ``multiconn serve`` as
a subprocess instead, for what a thread cannot show (signals, exit status,
descriptor limits, the server's own CPU time and memory). `MemoryTransport`
and `ManualClock` drive a session in memory, with no socket at all.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence, Union

from .apps import App, ConnectionApp, RawEcho, load_app
from .client import Client, connect
from .connection_info import ConnectionInfo, WithConnection, wants_connection
from .limits import Limits
from .protocol import Frame, FrameDecoder, encode_frame, encode_frames
from .responders import InlineResponder, ServerStatus, is_async_app
from .server import Server
from .session import FramedSession, SessionContext
from .server_process import ServerProcess
from .transport import PAUSE_ENDED

__all__ = ["ManualClock", "MemoryTransport", "ServerProcess", "ServerThread"]


class ServerThread:
    """A `Server` on 127.0.0.1 and a free port, running in a daemon thread."""

    def __init__(self, app: Union[App, ConnectionApp, RawEcho, str] = "echo", *, host: str = "127.0.0.1",
                 limits: Limits = Limits(), **server_args: Any) -> None:
        self.server = Server(app, host, 0, limits=limits, **server_args)
        self._thread = threading.Thread(target=self._run, name="multiconn-server", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.serve_forever(handle_signals=False)
        except BaseException as exc:  # kept for the test to see
            self.error = exc
            raise

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    @property
    def port(self) -> int:
        return self._address[1]

    def connect(self, **client_args: Any) -> Client:
        return connect(*self._address, **client_args)

    def start(self) -> "ServerThread":
        self.server.start()  # in the caller's thread, so bind errors surface here
        self._address = self.server.addresses[0]
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful shutdown, then wait for the thread; raises if it does not end."""
        if not self._thread.is_alive():
            return
        self.server.shutdown()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the server thread did not stop")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ManualClock:
    """A clock that moves only when told: a session reads ``now``, a test calls `advance`."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryTransport:
    """The socket side of a session, in memory: drive a session with no socket.

    Bytes in: `feed` (in pieces of any size, the way ``recv`` would return
    them, including a session's request to receive straight into its own
    buffer), `eof`, `lose` (the peer reset). Actions out: `output` (every byte
    the session sent), `paused` (the reasons it stopped reading, bits of
    ``multiconn.transport.PAUSE_*``), and `finished` / `failed` (it ended the
    connection, cleanly or after an error frame). Set `pending` to pretend the
    peer has not read that many bytes yet (backpressure), then `drain` to let
    them go; the session hears `resume_writing` as a real transport would say it.
    For example:

        >>> from multiconn.session import FramedSession, SessionContext
        >>> from multiconn.responders import InlineResponder
        >>> from multiconn import Limits, echo, encode_frame, Frame
        >>> transport = MemoryTransport()
        >>> session = FramedSession(transport, SessionContext(InlineResponder(echo), Limits(), ManualClock()))
        >>> transport.attach(session)
        >>> transport.feed(encode_frame(Frame.binary(b"hi", id=1)), chunk=1)
        >>> transport.take_frames()[0].content
        b'hi'
    """

    def __init__(self, low_water: int = 256 * 1024) -> None:
        self.session: Any = None
        self.output = bytearray()
        self.pending = 0
        self.low_water = low_water
        self.paused = 0
        self.finished = False
        self.failed = False
        self.lost = False
        self._wants_buffer = False
        #: What a two-parameter app is given as its connection.
        self.connection_info: ConnectionInfo | None = None

    def attach(self, session: Any) -> None:
        self.session = session

    # -- bytes in -------------------------------------------------------------

    def feed(self, data: bytes, chunk: int | None = None) -> None:
        """Deliver `data` as a transport would, `chunk` bytes per read (default: all at once).

        Once the session takes no more input (``PAUSE_ENDED``: a fatal error is
        owed) or the connection has ended, the rest is discarded, as a real
        transport stops reading and then discards input while it lingers.
        """
        step = chunk or max(1, len(data))
        view = memoryview(data)
        while view:
            if self.paused & PAUSE_ENDED or self.finished or self.failed or self.lost:
                return
            if self._wants_buffer:
                self._wants_buffer = False
                buffer = self.session.get_buffer()
                if buffer is not None:
                    size = min(len(buffer), len(view), step)
                    buffer[:size] = view[:size]
                    buffer.release()
                    view = view[size:]
                    self.session.buffer_updated(size)
                    continue
            piece, view = bytes(view[:step]), view[step:]
            self.session.data_received(piece)

    def eof(self) -> None:
        self.session.eof_received()

    def lose(self) -> None:
        """The peer reset the connection."""
        self.lost = True
        self.session.connection_lost()

    def drain(self) -> None:
        """The peer read everything pending: below the low-water mark, the session may write again."""
        self.pending = 0
        self.session.resume_writing()

    # -- what the session asks ---------------------------------------------

    def write(self, data: bytes) -> None:
        self.output += data

    def write_many(self, parts: Sequence[bytes | bytearray]) -> None:
        for part in parts:
            self.output += part

    @property
    def pending_output(self) -> int:
        return self.pending

    def want_buffer(self) -> None:
        self._wants_buffer = True

    def pause_reading(self, reason: int) -> None:
        self.paused |= reason

    def resume_reading(self, reason: int) -> None:
        self.paused &= ~reason

    def finish(self) -> None:
        self.finished = True

    def fail(self) -> None:
        self.failed = True

    # -- reading the output -------------------------------------------------

    def take_frames(self) -> list[Any]:
        """Decode and remove every complete frame the session has sent."""
        decoder = FrameDecoder(max_content=1 << 30)
        frames = decoder.feed(bytes(self.output))
        del self.output[:len(self.output) - decoder.buffered]
        return frames


class MemoryConnection:
    """The server side of one framed connection, in memory: unit-test an app
    under pipelining, partial frames and timeouts with no socket and no sleep.

    It is the server's own session (`multiconn.session.FramedSession`) and
    handler path, driven by a `MemoryTransport` and a `ManualClock`::

        conn = MemoryConnection(myapp.upper, limits=Limits(frame_timeout=5))
        conn.send([Frame.binary(b"a", id=1), Frame.binary(b"b", id=2)], chunk=3)
        assert [f.content for f in conn.answers()] == [b"A", b"B"]
        conn.send(encode_frame(Frame.binary(b"half"))[:10])   # a partial frame
        conn.advance(6)                                        # past the frame timeout
        assert conn.answers()[0].error_info[0] == "timeout" and conn.failed

    Handlers run inline (an ``async def`` app needs a real server: use
    `ServerThread`); a two-parameter app gets `connection` as its
    `ConnectionInfo` (default: a client at 127.0.0.1:50000).
    """

    def __init__(self, app: Any, *, limits: Limits = Limits(), clock: ManualClock | None = None,
                 connection: Any = None) -> None:
        app = load_app(app) if isinstance(app, str) else app
        if isinstance(app, RawEcho) or is_async_app(app):
            raise ValueError("MemoryConnection runs framed, synchronous apps; use ServerThread for this one")
        with_connection = wants_connection(app)
        if with_connection:
            app = WithConnection(app)
        self.clock = clock if clock is not None else ManualClock()
        self.status = ServerStatus()
        self.transport = MemoryTransport(low_water=limits.low_water)
        self.transport.connection_info = connection or ConnectionInfo(("127.0.0.1", 50000), ("127.0.0.1", 65432))
        context = SessionContext(InlineResponder(app, self.status), limits, self.clock, self.status)
        context.with_connection = with_connection
        self.session = FramedSession(self.transport, context)
        self.transport.attach(self.session)

    def send(self, data: Any, chunk: int | None = None) -> None:
        """Bytes, a `Frame` or frames, as the client would send them (`chunk` bytes per read)."""
        if isinstance(data, Frame):
            data = encode_frame(data)
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            data = encode_frames(data)
        self.transport.feed(bytes(data), chunk)

    def answers(self) -> list[Frame]:
        """Every complete frame the server sent since the last call."""
        return self.transport.take_frames()

    def advance(self, seconds: float) -> None:
        """Move the clock, then let the server check its timeouts, as its sweep would."""
        self.clock.advance(seconds)
        self.session.check_timeouts(self.clock.now)

    def close_input(self) -> None:
        """The client shuts down its sending side (EOF): complete requests are still answered."""
        self.transport.eof()

    @property
    def finished(self) -> bool:
        """The server ended the connection cleanly (after EOF, all answered)."""
        return self.transport.finished

    @property
    def failed(self) -> bool:
        """The server ended the connection after a fatal error frame."""
        return self.transport.failed

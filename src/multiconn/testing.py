"""Helpers for testing applications against a real multiconn server.

``with ServerThread(my_app) as server: client = server.connect()`` runs a real
server on an ephemeral loopback port in a background thread, so an
application's tests exercise the same sockets and framing as production.
`ServerProcess` runs ``multiconn serve`` as a subprocess instead, for what a
thread cannot show (signals, exit status, descriptor limits, the server's own
CPU time and memory); ``multiconn bench`` starts its embedded server with it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Union

from .apps import App, RawEcho
from .client import Client, connect
from .errors import ServerStartError
from .limits import Limits
from .server import Server
from .transport import PAUSE_ENDED


class ServerThread:
    """A `Server` on 127.0.0.1 and a free port, running in a daemon thread."""

    def __init__(self, app: Union[App, RawEcho, str] = "echo", *, host: str = "127.0.0.1",
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


# -- a server in a subprocess ------------------------------------------------

#: The server's INFO line that announces each listening address.
LISTENING = re.compile(r"listening on (\S+):(\d+) \(app ")


class ServerProcess:
    """``python -m multiconn serve --port 0 ARGS`` in a subprocess: its port,
    its stderr, and what /proc says about it.

    For what a thread cannot show: signals, exit codes, descriptor limits, the
    server's own CPU time and memory. The port comes from the "listening on"
    log line (so the server must log at INFO, the default). Stderr is read by
    a thread for as long as the process runs, because a full pipe would block
    the server; its lines are appended to `lines`. Extra keyword arguments go
    to `subprocess.Popen` (``env``, ``preexec_fn``, ``start_new_session``).
    """

    def __init__(self, *args: str, python: str = sys.executable, **popen_args: Any) -> None:
        self.command = [python, "-m", "multiconn", "serve", "--port", "0", *args]
        self.lines: list[str] = []
        self.host: str | None = None
        self.port: int | None = None
        self._popen_args = popen_args
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> "ServerProcess":
        """Start it and wait for its port; raises `ServerStartError`."""
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, **self._popen_args)
        except OSError as exc:
            raise ServerStartError(f"cannot start the server ({self.command[0]}): {exc.strerror or exc}") from None
        self._reader = threading.Thread(target=self._read_stderr, name="multiconn-serve-stderr", daemon=True)
        self._reader.start()
        self._listening.wait(timeout)
        if self.port is None:
            status = self.proc.poll()
            if status is None and not self._reader.is_alive():  # stderr closed: the exit is moments away
                try:
                    status = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            self.stop()
            last = self.lines[-1] if self.lines else "no output"
            if status is None:
                raise ServerStartError(f"the server did not report listening within {timeout:g} s ({last})")
            raise ServerStartError(f"the server exited with status {status} at start: {last}")
        return self

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                if self.port is None:
                    match = LISTENING.search(line)
                    if match:
                        self.host, self.port = match.group(1), int(match.group(2))
                        self._listening.set()
        except (OSError, ValueError):
            pass  # the pipe was closed under us by stop()
        finally:
            self._listening.set()  # EOF before the line: start() says why

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> bool:
        """Wait until a line of stderr contains `text`; False if none did in time."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the exit and for all of stderr to be read; the exit status.

        Raises `subprocess.TimeoutExpired` if it is still running.
        """
        assert self.proc is not None and self._reader is not None, "not started"
        status = self.proc.wait(timeout)
        self._reader.join(5)
        return status

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, up to `timeout` s for a graceful exit, then SIGKILL; the exit
        status. Releases the pipe and the reader; safe to call again."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if self._reader is not None:
                self._reader.join(5)
            if proc.stderr is not None:
                proc.stderr.close()
        return proc.returncode

    def cpu_seconds(self) -> float | None:
        return process_cpu_seconds(self.pid)

    def rss_bytes(self) -> int | None:
        return process_rss_bytes(self.pid)

    def open_fds(self) -> int | None:
        return process_open_fds(self.pid)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of `pid` (Linux /proc), in seconds; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # Fields after the parenthesised command (which may hold spaces and
    # parentheses): utime and stime are fields 14 and 15 of the line.
    fields = text[text.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of `pid` (Linux /proc); None where unavailable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_open_fds(pid: int) -> int | None:
    """How many descriptors `pid` has open (Linux /proc); None where unavailable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


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

    def write_many(self, parts: list[bytes]) -> None:
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
        from .protocol import FrameDecoder

        decoder = FrameDecoder(max_content=1 << 30)
        frames = decoder.feed(bytes(self.output))
        del self.output[:len(self.output) - decoder.buffered]
        return frames

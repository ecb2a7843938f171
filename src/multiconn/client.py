"""Clients: a blocking one for scripts, and one that drives many connections.

Both send and receive at the same time over a non-blocking socket and a
selector, so pipelining any number of frames cannot deadlock on full socket
buffers (the trap of "send everything, then read"). Every wait has a deadline:
`timeout` is the longest the client waits without any progress.

`OSError` is translated here, once, into `ConnectionFailed` (could not
connect), `ConnectionClosed` (the peer went away mid-exchange) and `Timeout`.
An error frame from the server becomes `ErrorResponse`, a malformed frame
`ProtocolError`.
"""

from __future__ import annotations

import errno
import selectors
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, NoReturn, Sequence, cast

from .errors import (
    WOULD_BLOCK,
    CertificateVerificationError,
    ConnectionClosed,
    ConnectionFailed,
    ErrorResponse,
    MulticonnError,
    Timeout,
    TLSError,
)
from .protocol import DEFAULT_MAX_CONTENT, Frame, FrameDecoder, encode_frame, encode_frames

__all__ = ["Client", "connect", "MultiClient", "Response"]

RECV_SIZE = 64 * 1024
DEFAULT_TIMEOUT = 10.0


def _open_socket(host: str, port: int, timeout: float, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise Timeout(f"connecting to {host}:{port} timed out after {timeout:g} s") from None
    except OSError as exc:
        raise ConnectionFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    except UnicodeError:  # the idna codec rejects the name before any lookup
        raise ConnectionFailed(f"cannot connect to {host}:{port}: invalid host name") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is not None:
        sock = _tls_handshake(sock, ssl_context, server_hostname or host, f"{host}:{port}", timeout)
    sock.setblocking(False)
    return sock


def _tls_handshake(sock: socket.socket, context: ssl.SSLContext, server_hostname: str,
                   where: str, timeout: float) -> ssl.SSLSocket:
    """Wrap `sock` in TLS (a blocking handshake, bounded by the socket's timeout)."""
    try:
        return context.wrap_socket(sock, server_hostname=server_hostname)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise CertificateVerificationError(
            f"TLS certificate of {where} not accepted: {exc.verify_message or exc.reason}"
        ) from None
    except socket.timeout:
        sock.close()
        raise Timeout(f"TLS handshake with {where} timed out after {timeout:g} s") from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
        raise TLSError(f"TLS handshake with {where} failed: {reason}") from None


def raise_for_error(frame: Frame) -> Frame:
    """Return `frame`, or raise `ErrorResponse` if it is an error frame."""
    info = frame.error_info
    if info is not None:
        raise ErrorResponse(info[0], info[1], frame)
    return frame


class Client:
    """One blocking connection: ``with connect(host, port) as c: c.request(frame)``."""

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT,
                 max_content: int = DEFAULT_MAX_CONTENT) -> None:
        self.sock = sock
        self.timeout = timeout
        self._decoder = FrameDecoder(max_content)
        self._received: deque[Frame] = deque()
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._eof = False
        self._tls = isinstance(sock, ssl.SSLSocket)

    def request(self, frame: Frame) -> Frame:
        """Send one request and return its response; raises `ErrorResponse` for an error frame."""
        return raise_for_error(self._exchange(encode_frame(frame), 1)[0])

    def request_many(self, frames: Iterable[Frame], *, raise_errors: bool = True) -> list[Frame]:
        """Pipeline `frames` and return their responses in order.

        With `raise_errors`, an error frame among the responses raises
        `ErrorResponse` once all responses are in (the first error wins).
        """
        frames = list(frames)
        if not frames:
            return []
        responses = self._exchange(encode_frames(frames), len(frames))
        if raise_errors:
            for response in responses:
                raise_for_error(response)
        return responses

    def _exchange(self, payload: bytes, expected: int) -> list[Frame]:
        view = memoryview(payload)
        sock = self.sock
        selector = self._selector
        interest = selectors.EVENT_READ | selectors.EVENT_WRITE
        selector.modify(sock, interest)
        deadline = time.monotonic() + self.timeout
        try:
            while len(self._received) < expected:
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if view else 0)
                if want != interest:
                    selector.modify(sock, want)
                    interest = want
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(f"no response within {self.timeout:g} s")
                for _key, mask in selector.select(remaining):
                    if mask & selectors.EVENT_WRITE and view:
                        view = view[self._send(view):]
                        deadline = time.monotonic() + self.timeout
                    if mask & selectors.EVENT_READ and self._receive():
                        deadline = time.monotonic() + self.timeout
        finally:
            if interest != selectors.EVENT_READ:
                selector.modify(sock, selectors.EVENT_READ)
        return [self._received.popleft() for _ in range(expected)]

    def _send(self, view: memoryview) -> int:
        try:
            return self.sock.send(view)
        except WOULD_BLOCK:
            return 0
        except OSError as exc:
            self._closed_early(exc)

    def _receive(self) -> bool:
        """Read what is there; TLS may hold decrypted bytes no select() reports."""
        sock = self.sock
        while True:
            try:
                data = sock.recv(RECV_SIZE)
            except WOULD_BLOCK:
                return False
            except OSError as exc:
                self._closed_early(exc)
            if not data:
                self._eof = True
                self._closed_early(None)
            self._received.extend(self._decoder.feed(data))
            if not (self._tls and cast(ssl.SSLSocket, sock).pending()):
                return True

    def _closed_early(self, exc: OSError | None) -> NoReturn:
        """The server went away: report its error frame if it sent one."""
        for frame in self._received:
            raise_for_error(frame)
        reason = f": {exc.strerror or exc}" if exc is not None else ""
        raise ConnectionClosed(f"the server closed the connection before answering{reason}")

    def close(self) -> None:
        self._selector.close()
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(host: str = "127.0.0.1", port: int = 65432, *, timeout: float = DEFAULT_TIMEOUT,
            max_content: int = DEFAULT_MAX_CONTENT, ssl_context: ssl.SSLContext | None = None,
            server_hostname: str | None = None) -> Client:
    """Open a `Client`, over TLS when `ssl_context` is given.

    Raises `ConnectionFailed` (`TLSError`, `CertificateVerificationError` for TLS
    failures) or `Timeout`. `server_hostname` is the name the certificate must
    carry (default: `host`).
    """
    sock = _open_socket(host, port, timeout, ssl_context, server_hostname)
    return Client(sock, timeout=timeout, max_content=max_content)


# -- many connections -----------------------------------------------------


@dataclass
class Response:
    """One response and how long it took (seconds, from send to last byte)."""

    frame: Frame
    latency: float

    @property
    def error(self) -> tuple[str, str] | None:
        return self.frame.error_info


class _Stream:
    """The state of one connection driven by `MultiClient`."""

    __slots__ = ("index", "sock", "requests", "next_request", "out", "sent_at",
                 "decoder", "responses", "connected", "interest")

    def __init__(self, index: int, sock: socket.socket, requests: Sequence[Frame]) -> None:
        self.index = index
        self.sock = sock
        self.requests = requests
        self.next_request = 0
        self.out = bytearray()
        self.sent_at: deque[float] = deque()
        self.decoder = FrameDecoder()
        self.responses: list[Response] = []
        self.connected = False
        self.interest = selectors.EVENT_WRITE

    @property
    def done(self) -> bool:
        return len(self.responses) == len(self.requests)


class MultiClient:
    """Drives many connections at once over one selector (the guide's multiconn client).

    ``MultiClient(host, port).run([[f1, f2], [f3], ...])`` opens one connection
    per inner list, keeps up to `pipeline` requests in flight on each, and
    returns every response with its latency, per connection, in order.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 65432, *,
                 timeout: float = DEFAULT_TIMEOUT, pipeline: int = 1) -> None:
        if pipeline < 1:
            raise ValueError("pipeline must be >= 1")
        self.host = host
        self.port = port
        self.timeout = timeout
        self.pipeline = pipeline

    def run(self, requests: Sequence[Sequence[Frame]]) -> list[list[Response]]:
        selector = selectors.DefaultSelector()
        streams: list[_Stream] = []
        try:
            for index, frames in enumerate(requests):
                stream = _Stream(index, self._start_connect(), frames)
                streams.append(stream)
                selector.register(stream.sock, stream.interest, stream)
            self._drive(selector, streams)
            return [stream.responses for stream in streams]
        finally:
            for stream in streams:
                stream.sock.close()
            selector.close()

    def _start_connect(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or "invalid host name"
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {reason}") from None
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            raise ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {errno.errorcode.get(err, err)}")
        return sock

    def _drive(self, selector: selectors.BaseSelector, streams: list[_Stream]) -> None:
        pending = sum(1 for stream in streams if not stream.done)
        for stream in streams:
            if stream.done:
                selector.unregister(stream.sock)
        deadline = time.monotonic() + self.timeout
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(f"{pending} connections made no progress for {self.timeout:g} s")
            for key, mask in selector.select(remaining):
                stream = key.data
                if self._step(stream, mask):
                    deadline = time.monotonic() + self.timeout
                if stream.done:
                    selector.unregister(stream.sock)
                    pending -= 1
                    continue
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if stream.out or not stream.connected else 0)
                if want != stream.interest:
                    selector.modify(stream.sock, want, stream)
                    stream.interest = want

    def _step(self, stream: _Stream, mask: int) -> bool:
        """Advance one connection; True if it made progress."""
        sock = stream.sock
        progress = False
        if not stream.connected:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise ConnectionFailed(f"cannot connect to {self.host}:{self.port}: {errno.errorcode.get(err, err)}")
            stream.connected = True
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            progress = True
        if mask & selectors.EVENT_READ:
            progress = self._read(stream) or progress
        self._fill(stream)
        if stream.out:
            try:
                sent = sock.send(stream.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                raise ConnectionClosed(f"connection {stream.index}: {exc.strerror or exc}") from None
            if sent:
                del stream.out[:sent]
                progress = True
        return progress

    def _fill(self, stream: _Stream) -> None:
        """Queue requests until `pipeline` are in flight."""
        now = time.perf_counter()
        while stream.next_request < len(stream.requests) and len(stream.sent_at) < self.pipeline:
            stream.out += encode_frame(stream.requests[stream.next_request])
            stream.next_request += 1
            stream.sent_at.append(now)

    def _read(self, stream: _Stream) -> bool:
        try:
            data = stream.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise ConnectionClosed(f"connection {stream.index}: {exc.strerror or exc}") from None
        if not data:
            raise ConnectionClosed(
                f"connection {stream.index} closed by the server after "
                f"{len(stream.responses)} of {len(stream.requests)} responses"
            )
        now = time.perf_counter()
        for frame in stream.decoder.feed(data):
            if not stream.sent_at:
                raise MulticonnError(f"connection {stream.index}: the server sent a response to no request")
            stream.responses.append(Response(frame, now - stream.sent_at.popleft()))
        return True

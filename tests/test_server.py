"""Integration tests of the server over real loopback sockets (docs/protocol.md:
connections, errors, the built-in applications).

Every test runs a real `Server` in a background thread (the ``start_server``
fixture of conftest.py) and talks to it either through the library's clients
or through raw blocking sockets (`RawConn`), so that malformed bytes, half
frames, half-closes and peers that never read can be produced exactly.

Synchronisation is done with reads that have a deadline, never with sleeps
alone; the few ``time.sleep`` calls pace a scenario (a slow sender, a client
that is busy elsewhere) and are followed by a read with a timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import selectors
import socket
import struct
import termios
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator

import pytest

from multiconn import (
    Client,
    ErrorResponse,
    EventLoop,
    Frame,
    FrameDecoder,
    Limits,
    MultiClient,
    Response,
    connect,
    encode_frame,
    encode_frames,
)
from multiconn.apps import echo
from multiconn.transport import (
    RECV_IN_PLACE,
    RECV_SIZE,
    SMALL_READ,
    SMALL_RECV_SIZE,
    Transport,
)
from multiconn.protocol import LARGE_CONTENT, ErrorCode
from multiconn.testing import ServerThread

from helpers import assert_error_frame, raw_frame, recv_exactly

KiB = 1024
MiB = 1024 * KiB

SEARCH_ANSWERS = {
    "morpheus": "Follow the white rabbit. \U0001f430",
    "ring": "In the caves beneath the Misty Mountains. \U0001f48d",
    "\U0001f436": "\U0001f43e Playing ball! \U0001f3d0",
}


# -- helpers ------------------------------------------------------------------


def good_header(length: int = 0, **extra: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "byteorder": "little",
        "content-type": "binary/x",
        "content-encoding": "binary",
        "content-length": length,
    }
    header.update(extra)
    return header


def search_request(value: Any, action: str = "search", id: Any = None) -> Frame:
    return Frame.json({"action": action, "value": value}, id=id)


def echo_frames(ids: range) -> list[Frame]:
    return [Frame.binary(f"request {i}".encode(), id=i) for i in ids]


def assert_echoed(responses: list[Frame], ids: range) -> None:
    assert [r.id for r in responses] == list(ids)
    assert [bytes(r.content) for r in responses] == [f"request {i}".encode() for i in ids]


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


class RawConn:
    """A blocking socket to the server, with a frame decoder for its answers."""

    def __init__(self, address: tuple, *, nodelay: bool = False, max_content: int = 64 * MiB) -> None:
        self.sock = socket.create_connection(address[:2], timeout=5.0)
        if nodelay:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = FrameDecoder(max_content)
        self.frames: deque[Frame] = deque()

    def sendall(self, data: bytes) -> None:
        self.sock.settimeout(10.0)
        self.sock.sendall(data)

    def recv_frames(self, count: int, timeout: float = 5.0) -> list[Frame]:
        """Exactly the next `count` frames; fails on EOF or when they do not arrive in time."""
        deadline = time.monotonic() + timeout
        while len(self.frames) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {len(self.frames)} of {count} frames within {timeout} s"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 * MiB)
            except socket.timeout:
                continue
            assert data, f"EOF after {len(self.frames)} of {count} frames"
            self.frames.extend(self.decoder.feed(data))
        return [self.frames.popleft() for _ in range(count)]

    def expect_eof(self, timeout: float = 5.0) -> None:
        """Nothing more arrives, and the server closes (a FIN, not a reset) in time."""
        assert not self.frames, f"unexpected frames: {list(self.frames)}"
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the server did not close within {timeout} s"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            assert data == b"", f"unexpected bytes before EOF: {data[:200]!r}"
            assert not self.decoder.has_partial
            return

    def expect_silence(self, seconds: float) -> None:
        """No byte (and no EOF) arrives for `seconds`."""
        self.sock.settimeout(seconds)
        with pytest.raises(socket.timeout):
            data = self.sock.recv(65536)
            pytest.fail(f"expected silence, got {data[:200]!r}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawConn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Blaster:
    """A thread that sends `block` over and over on a non-blocking socket and never reads.

    It stops after `total` bytes, when asked, or when the kernel has accepted
    nothing for `stall` seconds (``stalled`` is then set).
    """

    def __init__(self, sock: socket.socket, block: bytes, total: int, stall: float = 2.0) -> None:
        self.sock = sock
        self.block = memoryview(block)
        self.total = total
        self.stall = stall
        self.sent = 0
        self.stalled = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blaster", daemon=True)

    def _run(self) -> None:
        try:
            self.sock.setblocking(False)
            offset = 0
            last_progress = time.monotonic()
            while self.sent < self.total and not self._stop.is_set():
                if time.monotonic() - last_progress >= self.stall:
                    self.stalled.set()
                    return
                try:
                    n = self.sock.send(self.block[offset:])
                except BlockingIOError:
                    select.select([], [self.sock], [], 0.05)
                    continue
                self.sent += n
                offset = (offset + n) % len(self.block)
                last_progress = time.monotonic()
        except OSError as exc:
            self.error = exc
        finally:
            self.done.set()

    def __enter__(self) -> "Blaster":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class PeakSampler:
    """A thread that polls ``conn.pending_output`` about every millisecond and keeps the peak."""

    def __init__(self, conn: Any, interval: float = 0.001) -> None:
        self.conn = conn
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.conn.pending_output)
            self.samples += 1

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def server_connection_of(server: ServerThread, sock: socket.socket) -> Any:
    """The server-side Connection object of a client socket."""
    local = sock.getsockname()[:2]
    for _ in range(100):
        for conn in tuple(server.server.connections):
            if tuple(conn.peer[:2]) == tuple(local):
                return conn
        time.sleep(0.01)  # accept may still be on its way
    raise AssertionError(f"no server connection for {local}")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll server-side state (there is no socket event to wait for); return the time taken."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"{what} not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - start


# -- fixtures -------------------------------------------------------------------


@pytest.fixture
def open_raw(start_server: Any) -> Iterator[Callable[..., RawConn]]:
    """``open_raw(address, **kw)`` -> a `RawConn`, closed before the server stops."""
    with contextlib.ExitStack() as stack:
        def open_(address: tuple, **kwargs: Any) -> RawConn:
            return stack.enter_context(RawConn(address, **kwargs))
        yield open_


@pytest.fixture
def open_client(start_server: Any) -> Iterator[Callable[..., Client]]:
    """``open_client(server, **kw)`` -> a `Client`, closed before the server stops."""
    with contextlib.ExitStack() as stack:
        def open_(server: ServerThread, **kwargs: Any) -> Client:
            kwargs.setdefault("timeout", 5.0)
            return stack.enter_context(server.connect(**kwargs))
        yield open_


@pytest.fixture
def output_peaks(monkeypatch: pytest.MonkeyPatch) -> dict[Any, int]:
    """Connection -> the largest ``pending_output`` it held after any write.

    Polling from the test thread can miss a peak that the kernel absorbs a
    millisecond later; this records what each write left queued, exactly.
    Raw echo writes through an alias of `write` and, on its fast path, inline.
    """
    peaks: dict[Any, int] = {}
    writers = [(Transport, "write"), (Transport, "write_many"), (Transport, "_on_events")]
    for cls, name in writers:
        original = getattr(cls, name)

        def recording(self: Any, *args: Any, _original: Any = original) -> None:
            _original(self, *args)
            peaks[self] = max(peaks.get(self, 0), self.pending_output)

        monkeypatch.setattr(cls, name, recording)
    return peaks


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A bug in the server's I/O paths is logged at ERROR and swallowed: fail on it."""
    caplog.set_level(logging.WARNING, logger="multiconn")
    yield
    errors = [r for r in caplog.records if r.name.startswith("multiconn") and r.levelno >= logging.ERROR]
    assert not errors, "server logged errors: " + "; ".join(r.getMessage() for r in errors)


# -- 1. built-in applications ---------------------------------------------------


@pytest.mark.parametrize("value", list(SEARCH_ANSWERS))
def test_search_known_values(start_server: Any, open_client: Any, value: str) -> None:
    client = open_client(start_server("search"))
    response = client.request(search_request(value, id="q1"))
    assert response.header["content-type"] == "text/json"
    assert response.header["content-encoding"] == "utf-8"
    assert response.id == "q1"
    assert json.loads(bytes(response.content).decode("utf-8")) == {"result": SEARCH_ANSWERS[value]}


def test_search_unknown_value_and_other_action(start_server: Any, open_client: Any) -> None:
    client = open_client(start_server("search"))
    unknown, other = client.request_many([search_request("x"), search_request("morpheus", action="a")])
    assert unknown.json_content() == {"result": "No match for 'x'."}
    assert other.json_content() == {"result": "Error: invalid action 'a'."}
    assert "id" not in unknown.header and "id" not in other.header


def test_search_binary_request(start_server: Any, open_client: Any) -> None:
    client = open_client(start_server("search"))
    content = bytes(range(200, 256)) + b"tail"
    response = client.request(Frame.binary(content, content_type="image/png", id=3))
    assert response.header["content-type"] == "binary/custom-server-binary-type"
    assert response.header["content-encoding"] == "binary"
    assert response.id == 3
    assert bytes(response.content) == b"First 10 bytes of request: " + content[:10]
    short = client.request(Frame.binary(b"abc"))
    assert bytes(short.content) == b"First 10 bytes of request: abc"


@pytest.mark.parametrize(
    "request_frame",
    [
        pytest.param(Frame.json({"k": ["v", 1, None, "\u00e9\U0001f436"]}, id="abc"), id="json-utf8-str-id"),
        pytest.param(Frame.json({"k": "\u00e9"}, id=5, encoding="utf-16"), id="json-utf16-int-id"),
        pytest.param(Frame.json([1, 2, 3], encoding="UTF_32_LE"), id="json-utf32le-spelling-no-id"),
        pytest.param(Frame.binary(os.urandom(5000), content_type="image/png", encoding="gzip", id=0), id="binary"),
        pytest.param(Frame.binary(b"", id=-12), id="binary-empty"),
    ],
)
def test_echo(start_server: Any, open_client: Any, request_frame: Frame) -> None:
    client = open_client(start_server("echo"))
    response = client.request(request_frame)
    assert response.header["content-type"] == request_frame.header["content-type"]
    assert response.header["content-encoding"] == request_frame.header["content-encoding"]
    assert bytes(response.content) == request_frame.content
    assert response.header["content-length"] == len(request_frame.content)
    assert response.header.get("id") == request_frame.header.get("id")
    assert ("id" in response.header) == ("id" in request_frame.header)


def test_raw_echo_with_half_close(start_server: Any, open_raw: Any) -> None:
    server = start_server("raw-echo")
    payload = os.urandom(3 * MiB) + b"\x00\x00not a frame"
    conn = open_raw(server.address)
    sender = threading.Thread(target=lambda: (conn.sock.sendall(payload), conn.sock.shutdown(socket.SHUT_WR)))
    received = bytearray()
    sender.start()
    try:
        conn.sock.settimeout(10.0)
        while True:
            data = conn.sock.recv(1 * MiB)
            if not data:
                break
            received += data
    finally:
        sender.join(10)
    assert len(received) == len(payload)
    assert received == payload


def _echo_exactly(conn: RawConn, data: bytes) -> None:
    """Send `data` and read back exactly as many bytes, which must be the same.

    The bytes go out from a thread, so data larger than the socket buffers
    cannot deadlock against the server's backpressure while nobody reads."""
    sender = threading.Thread(target=conn.sendall, args=(data,), daemon=True)
    sender.start()
    try:
        got = recv_exactly(conn.sock, len(data))
    finally:
        sender.join(10)
    assert got == data


def test_raw_echo_small_exchanges(start_server: Any, open_raw: Any) -> None:
    server = start_server("raw-echo")
    conn = open_raw(server.address, nodelay=True)
    for chunk in (b"a", b"hello", b"\x00\x00", bytes(range(256))):
        _echo_exactly(conn, chunk)
    conn.sock.shutdown(socket.SHUT_WR)
    conn.expect_eof()


def test_receive_size_adapts_to_the_reads(start_server: Any, open_raw: Any) -> None:
    """Small reads ask for SMALL_RECV_SIZE; a large read switches to RECV_SIZE;
    the next small read steps down to half of it, the one after to small."""
    server = start_server("raw-echo")
    conn = open_raw(server.address, nodelay=True)
    server_side = server_connection_of(server, conn.sock)
    small = b"s" * 64
    assert server_side._recv_size == SMALL_RECV_SIZE
    _echo_exactly(conn, small)
    assert server_side._recv_size == SMALL_RECV_SIZE
    # One loopback segment: a small read that fills, then one read of the rest.
    _echo_exactly(conn, os.urandom(10_000))
    assert server_side._recv_size == RECV_SIZE
    _echo_exactly(conn, small)
    assert server_side._recv_size == RECV_SIZE // 2
    _echo_exactly(conn, small)
    assert server_side._recv_size == SMALL_RECV_SIZE
    # A read just over the small-read mark is not small.
    _echo_exactly(conn, b"m" * (SMALL_READ + 1))
    assert server_side._recv_size == RECV_SIZE


def test_raw_echo_peers_that_reset_are_closed_quietly(start_server: Any, open_raw: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A reset reaches raw echo's fast path as a failed read or write: the
    connection closes, nothing is logged as an error, and others are served."""
    server = start_server("raw-echo")
    keeper = open_raw(server.address, nodelay=True)
    _echo_exactly(keeper, b"before")
    with caplog.at_level(logging.DEBUG, logger="multiconn"):
        for number in range(20):
            with RawConn(server.address, nodelay=True) as conn:
                _echo_exactly(conn, b"ping %d" % number)
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if number % 2:
                    conn.sendall(b"one more, then a reset")  # the echo's write fails
        wait_until(lambda: len(server.server.connections) == 1, 5.0, "the reset connections to close")
    _echo_exactly(keeper, b"after")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    closes = [r.getMessage() for r in caplog.records if "closed (" in r.getMessage()]
    assert len(closes) == 20, closes
    assert sum("(recv failed: " in message for message in closes) >= 5, closes
    # Which of the two a reset with data in flight meets depends on timing (the
    # reset may arrive before the data is read); on a busy machine most are reads.
    assert sum("(send failed: " in message for message in closes) >= 1, closes


def test_raw_echo_small_messages_to_a_peer_that_reads_late(start_server: Any) -> None:
    """Small messages take raw echo's fast path. When the peer does not read,
    what the kernel refuses is queued, and all of it arrives later, in order."""
    server = start_server("raw-echo")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(server.address[:2])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server_side = server_connection_of(server, sock)
        server_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = b""
        for number in range(5000):
            message = b"%064d" % number
            sock.sendall(message)
            sent += message
            time.sleep(0.0005)  # one read per message: every read is small
            if server_side.pending_output:
                break
        assert server_side.pending_output, "the kernel never refused an echo"
        sock.settimeout(5.0)
        assert recv_exactly(sock, len(sent)) == sent
        wait_until(lambda: not server_side.pending_output, 5.0, "the queue to drain")
        sock.sendall(b"after")
        assert sock.recv(100) == b"after"


# -- 2. a frame one byte at a time ----------------------------------------------


def test_frame_sent_one_byte_at_a_time(start_server: Any, open_raw: Any) -> None:
    server = start_server("search")
    conn = open_raw(server.address, nodelay=True)
    # The multi-byte UTF-8 of the emoji is split across reads as well.
    data = encode_frames([search_request("\U0001f436", id="dog"), search_request("ring")])
    for i in range(len(data)):
        conn.sock.send(data[i : i + 1])
        time.sleep(0.001)  # pacing, so that the server sees the bytes in separate reads
    dog, ring = conn.recv_frames(2)
    assert dog.id == "dog"
    assert dog.json_content() == {"result": SEARCH_ANSWERS["\U0001f436"]}
    assert "id" not in ring.header
    assert ring.json_content() == {"result": SEARCH_ANSWERS["ring"]}
    conn.expect_silence(0.1)


# -- 3. pipelining ----------------------------------------------------------------


def test_200_pipelined_frames_request_many(start_server: Any, open_client: Any) -> None:
    client = open_client(start_server("echo"))
    responses = client.request_many(echo_frames(range(200)))
    assert_echoed(responses, range(200))


def test_200_pipelined_frames_raw_socket(start_server: Any, open_raw: Any) -> None:
    server = start_server("search")
    conn = open_raw(server.address)
    values = list(SEARCH_ANSWERS) + ["nothing"]
    frames = [search_request(values[i % 4], id=i) for i in range(200)]
    conn.sendall(encode_frames(frames))
    responses = conn.recv_frames(200)
    assert [r.id for r in responses] == list(range(200))
    expected = [SEARCH_ANSWERS.get(values[i % 4], "No match for 'nothing'.") for i in range(200)]
    assert [r.json_content()["result"] for r in responses] == expected
    conn.expect_silence(0.1)


# -- 4. many connections ------------------------------------------------------------


def test_1000_concurrent_connections(start_server: Any) -> None:
    server = start_server("echo")
    requests = [
        [Frame.binary(f"conn {i} req {j}".encode(), id=j) for j in range(3)] for i in range(1000)
    ]
    results = MultiClient(*server.address, timeout=20.0).run(requests)
    assert len(results) == 1000
    for i, responses in enumerate(results):
        assert len(responses) == 3
        for j, response in enumerate(responses):
            assert isinstance(response, Response)
            assert response.frame.id == j
            assert bytes(response.frame.content) == f"conn {i} req {j}".encode()
            assert response.error is None
            assert isinstance(response.latency, float) and response.latency > 0


# -- 5. a large content -------------------------------------------------------------


def test_8_mib_echo(start_server: Any, open_client: Any) -> None:
    client = open_client(start_server("echo"), timeout=20.0)
    content = os.urandom(8 * MiB)
    response = client.request(Frame.binary(content, id="big"))
    assert response.id == "big"
    assert len(response.content) == len(content)
    assert bytes(response.content) == content
    # The connection is still usable afterwards.
    assert bytes(client.request(Frame.binary(b"after")).content) == b"after"


def test_a_server_on_a_selectors_selector() -> None:
    """The loop's other poller (any `selectors` selector, the default off
    Linux) serves the same: pipelined frames, and large contents whose answers
    the kernel takes only in part, so the connection waits for EVENT_WRITE."""
    with EventLoop(selector=selectors.PollSelector()) as loop, \
            ServerThread("echo", loop=loop) as server, server.connect(timeout=20.0) as client:
        assert_echoed(client.request_many(echo_frames(range(200))), range(200))
        contents = [os.urandom(4 * MiB) for _ in range(3)]
        answers = client.request_many([Frame.binary(c, id=i) for i, c in enumerate(contents)])
        assert [bytes(a.content) == c for a, c in zip(answers, contents)] == [True] * 3


def test_raw_echo_on_a_selectors_selector() -> None:
    with EventLoop(selector=selectors.PollSelector()) as loop, \
            ServerThread("raw-echo", loop=loop) as server, RawConn(server.address, nodelay=True) as conn:
        for chunk in (b"a", bytes(range(256)) * 4, os.urandom(2 * MiB)):
            _echo_exactly(conn, chunk)


def test_large_content_is_received_in_place(start_server: Any, open_raw: Any) -> None:
    """Once the header of a large frame is in, the connection receives its
    content into the frame's own buffer (RECV_IN_PLACE) and never past its
    end: the next frame, sent right behind it, is read the usual way."""
    server = start_server("echo")
    conn = open_raw(server.address)
    server_side = server_connection_of(server, conn.sock)
    content = os.urandom(LARGE_CONTENT * 4)
    first = raw_frame(good_header(len(content), id=1), content)
    cut = len(first) - len(content) + LARGE_CONTENT  # the header and a quarter of the content
    conn.sendall(first[:cut])
    wait_until(lambda: server_side.session.decoder.buffered == LARGE_CONTENT, 5.0, "the first quarter")
    assert server_side._recv_size == RECV_IN_PLACE
    conn.sendall(first[cut:] + raw_frame(good_header(5, id=2), b"small"))
    big, small = conn.recv_frames(2, timeout=10.0)
    assert (big.id, bytes(big.content) == content) == (1, True)
    assert (small.id, small.content) == (2, b"small")
    assert server_side._recv_size != RECV_IN_PLACE
    assert not server_side.session.decoder.has_partial


# -- 6. errors ------------------------------------------------------------------------

FATAL_CASES = [
    pytest.param(b"\x00\x00", ErrorCode.BAD_HEADER_LENGTH, None, id="hlen-0"),
    pytest.param(b"\x00\x00" + raw_frame(good_header()), ErrorCode.BAD_HEADER_LENGTH, None,
                 id="hlen-0-then-good-frame"),
    pytest.param(raw_frame(b"{not json"), ErrorCode.BAD_HEADER, None, id="not-json"),
    pytest.param(raw_frame(b"\xef\xbb\xbf" + json.dumps(good_header(id=1)).encode()),
                 ErrorCode.BAD_HEADER, None, id="bom"),
    pytest.param(
        raw_frame(b'{"byteorder": "little", "content-type": "a", "content-type": "b", '
                  b'"content-encoding": "binary", "content-length": 0}'),
        ErrorCode.BAD_HEADER, None, id="duplicate-required-key"),
    pytest.param(raw_frame(b'{"x": "\xff\xfe"}'), ErrorCode.BAD_HEADER, None, id="not-utf8"),
    pytest.param(raw_frame(b"[1, 2]"), ErrorCode.BAD_HEADER, None, id="not-an-object"),
    pytest.param(raw_frame({k: v for k, v in good_header().items() if k != "content-encoding"}),
                 ErrorCode.MISSING_HEADER, None, id="missing-content-encoding"),
    pytest.param(raw_frame({"byteorder": "big", "id": "m1"}), ErrorCode.MISSING_HEADER, "m1",
                 id="missing-with-id"),
    pytest.param(raw_frame(good_header(-1)), ErrorCode.BAD_HEADER_VALUE, None, id="negative-length"),
    pytest.param(raw_frame(good_header(-1, id=7)), ErrorCode.BAD_HEADER_VALUE, 7,
                 id="negative-length-id-7"),
    pytest.param(raw_frame(good_header(True)), ErrorCode.BAD_HEADER_VALUE, None, id="bool-length"),
    pytest.param(raw_frame(good_header(1.0, id="f")), ErrorCode.BAD_HEADER_VALUE, "f", id="float-length"),
    pytest.param(raw_frame(good_header(byteorder="middle")), ErrorCode.BAD_HEADER_VALUE, None,
                 id="bad-byteorder"),
    pytest.param(raw_frame(good_header(**{"content-type": "text/json", "content-encoding": "binary"})),
                 ErrorCode.BAD_HEADER_VALUE, None, id="json-with-binary-encoding"),
    pytest.param(raw_frame(good_header(id=[1])), ErrorCode.BAD_HEADER_VALUE, None, id="list-id"),
    pytest.param(raw_frame(good_header(2000)), ErrorCode.CONTENT_TOO_LARGE, None,
                 id="content-too-large-no-content-sent"),
    pytest.param(raw_frame(good_header(2000, id="big")), ErrorCode.CONTENT_TOO_LARGE, "big",
                 id="content-too-large-with-id"),
]


@pytest.mark.parametrize(("bad", "code", "request_id"), FATAL_CASES)
def test_fatal_error(start_server: Any, open_raw: Any, open_client: Any,
                     bad: bytes, code: str, request_id: Any) -> None:
    server = start_server("echo", limits=Limits(max_content=1000))
    other = open_client(server)
    assert bytes(other.request(Frame.binary(b"before")).content) == b"before"
    conn = open_raw(server.address)
    # Two good frames ahead of the bad one, in the same send: answered first, in order.
    conn.sendall(encode_frames(echo_frames(range(2))) + bad)
    *answers, error = conn.recv_frames(3)
    assert_echoed(answers, range(2))
    assert_error_frame(error, code, request_id)
    conn.expect_eof(timeout=5.0)
    # Every other connection is unaffected.
    assert_echoed(other.request_many(echo_frames(range(10, 13))), range(10, 13))
    with server.connect(timeout=5.0) as fresh:
        assert bytes(fresh.request(Frame.binary(b"after")).content) == b"after"


def test_content_too_large_answered_before_content_is_sent(start_server: Any, open_raw: Any) -> None:
    server = start_server("echo", limits=Limits(max_content=1000))
    conn = open_raw(server.address)
    conn.sendall(raw_frame(good_header(2000, id=9)))  # and not one byte of the content
    (error,) = conn.recv_frames(1)
    assert_error_frame(error, ErrorCode.CONTENT_TOO_LARGE, 9)
    conn.expect_eof()


def test_content_at_the_limit_is_accepted(start_server: Any, open_client: Any) -> None:
    client = open_client(start_server("echo", limits=Limits(max_content=1000)))
    assert len(client.request(Frame.binary(b"x" * 1000)).content) == 1000


@pytest.mark.parametrize(
    ("app", "request_bytes", "request_id"),
    [
        pytest.param("echo", raw_frame(good_header(9, **{"content-type": "text/json",
                                                          "content-encoding": "utf-8", "id": 4}), b"{not json"),
                     4, id="echo-json-not-json"),
        pytest.param("search", raw_frame(good_header(9, **{"content-type": "text/json",
                                                            "content-encoding": "utf-8"}), b"{not json"),
                     None, id="search-json-not-json"),
        pytest.param("echo", raw_frame(good_header(3, **{"content-type": "text/json",
                                                         "content-encoding": "utf-8", "id": "u"}),
                                       b'"\xff"'),
                     "u", id="echo-json-not-utf8"),
        pytest.param("echo", raw_frame(good_header(3, **{"content-type": "text/json",
                                                         "content-encoding": "utf-8"}), b"NaN"),
                     None, id="echo-json-nan"),
        pytest.param("search", encode_frame(Frame.json(["action", "search"], id="arr")), "arr",
                     id="search-json-array"),
    ],
)
def test_bad_content_keeps_connection_open(start_server: Any, open_raw: Any, open_client: Any,
                                           app: str, request_bytes: bytes, request_id: Any) -> None:
    server = start_server(app)
    other = open_client(server)
    conn = open_raw(server.address)
    follow = Frame.binary(b"0123456789abc", id="next")
    conn.sendall(request_bytes + encode_frame(follow))
    error, answer = conn.recv_frames(2)
    assert_error_frame(error, ErrorCode.BAD_CONTENT, request_id)
    assert answer.id == "next"
    expected = b"0123456789abc" if app == "echo" else b"First 10 bytes of request: 0123456789"
    assert bytes(answer.content) == expected
    # Still open, and still framed: a later request on the same connection is answered.
    conn.sendall(encode_frame(Frame.binary(b"again", id=2)))
    (again,) = conn.recv_frames(1)
    assert again.id == 2
    other_response = other.request(Frame.binary(b"other"))
    assert other_response.error_info is None


def test_bad_content_through_client_raises_error_response(start_server: Any, open_client: Any) -> None:
    client = open_client(start_server("search"))
    with pytest.raises(ErrorResponse) as excinfo:
        client.request(Frame.json([1, 2], id=11))
    assert excinfo.value.code == ErrorCode.BAD_CONTENT
    assert excinfo.value.frame.id == 11
    assert client.request(search_request("ring")).json_content() == {"result": SEARCH_ANSWERS["ring"]}


def test_timeout_in_header(start_server: Any, open_raw: Any, open_client: Any) -> None:
    server = start_server("echo", limits=Limits(frame_timeout=0.5))
    other = open_client(server)
    conn = open_raw(server.address)
    half = raw_frame(good_header(10, id="h"))[:12]  # hlen and part of the header
    started = time.monotonic()
    conn.sendall(encode_frames(echo_frames(range(2))) + half)
    answers = conn.recv_frames(2)
    assert_echoed(answers, range(2))
    # Other connections are served while this one waits for its frame.
    assert bytes(other.request(Frame.binary(b"meanwhile")).content) == b"meanwhile"
    (error,) = conn.recv_frames(1, timeout=5.0)
    elapsed = time.monotonic() - started
    assert_error_frame(error, ErrorCode.TIMEOUT, None)  # the header was not complete: no id
    assert 0.4 <= elapsed < 3.0, elapsed
    conn.expect_eof()
    assert bytes(other.request(Frame.binary(b"after")).content) == b"after"


def test_timeout_in_content_carries_the_id(start_server: Any, open_raw: Any, open_client: Any) -> None:
    server = start_server("echo", limits=Limits(frame_timeout=0.5))
    other = open_client(server)
    conn = open_raw(server.address)
    started = time.monotonic()
    conn.sendall(encode_frame(Frame.binary(b"ok", id=1)) + raw_frame(good_header(100, id="t1"), b"x" * 50))
    (answer,) = conn.recv_frames(1)
    assert answer.id == 1 and bytes(answer.content) == b"ok"
    (error,) = conn.recv_frames(1, timeout=5.0)
    assert_error_frame(error, ErrorCode.TIMEOUT, "t1")
    assert 0.4 <= time.monotonic() - started < 3.0
    conn.expect_eof()
    assert bytes(other.request(Frame.binary(b"after")).content) == b"after"


def test_timeout_runs_from_first_to_last_byte(start_server: Any, open_raw: Any) -> None:
    """A frame that keeps trickling in still times out: progress does not reset the clock."""
    server = start_server("echo", limits=Limits(frame_timeout=0.5))
    conn = open_raw(server.address, nodelay=True)
    data = encode_frame(Frame.binary(b"y" * 100, id="slow"))
    content_start = len(data) - 100
    started = time.monotonic()
    conn.sendall(data[: content_start + 1])  # the whole header and a first byte of content
    error = None
    for i in range(content_start + 1, len(data) - 1):
        conn.sock.send(data[i : i + 1])
        ready, _, _ = select.select([conn.sock], [], [], 0.05)  # a slow sender: ~20 bytes/s
        if ready:
            (error,) = conn.recv_frames(1)
            break
    assert error is not None, "the frame was never timed out"
    assert_error_frame(error, ErrorCode.TIMEOUT, "slow")
    assert 0.4 <= time.monotonic() - started < 3.0
    conn.expect_eof()


def crashing_app(request: Frame) -> Frame:
    if request.content == b"boom":
        raise ValueError("kaboom")
    if request.content == b"none":
        return None  # type: ignore[return-value]
    return Frame.binary(b"ok:" + request.content)


def test_handler_error_keeps_connection_open(start_server: Any, open_raw: Any, open_client: Any) -> None:
    server = start_server(crashing_app)
    other = open_client(server)
    conn = open_raw(server.address)
    frames = [
        Frame.binary(b"a", id=1),
        Frame.binary(b"boom", id=2),
        Frame.binary(b"b", id=3),
        Frame.binary(b"none", id="n"),
        Frame.binary(b"boom"),
        Frame.binary(b"c", id=4),
    ]
    conn.sendall(encode_frames(frames))
    r1, r2, r3, r4, r5, r6 = conn.recv_frames(6)
    assert (r1.id, bytes(r1.content)) == (1, b"ok:a")
    assert "kaboom" in assert_error_frame(r2, ErrorCode.HANDLER_ERROR, 2)
    assert (r3.id, bytes(r3.content)) == (3, b"ok:b")
    assert_error_frame(r4, ErrorCode.HANDLER_ERROR, "n")
    assert_error_frame(r5, ErrorCode.HANDLER_ERROR, None)
    assert (r6.id, bytes(r6.content)) == (4, b"ok:c")
    conn.sendall(encode_frame(Frame.binary(b"later", id=5)))
    (later,) = conn.recv_frames(1)
    assert (later.id, bytes(later.content)) == (5, b"ok:later")
    with pytest.raises(ErrorResponse) as excinfo:
        other.request(Frame.binary(b"boom"))
    assert excinfo.value.code == ErrorCode.HANDLER_ERROR
    assert bytes(other.request(Frame.binary(b"fine")).content) == b"ok:fine"


def test_fatal_error_after_large_responses_to_a_slow_reader(start_server: Any, open_raw: Any) -> None:
    """The error linger starts once the error frame is flushed, not when it is queued.

    Regression: the server closed error_linger (1 s) after the fatal error was
    found, losing the answers still queued ahead of the error frame.
    """
    limits = Limits(high_water=64 * MiB, low_water=1 * MiB, max_content=32 * MiB)
    server = start_server("echo", limits=limits)
    conn = open_raw(server.address)
    contents = [os.urandom(8 * MiB) for _ in range(3)]
    payload = encode_frames(Frame.binary(c, id=i) for i, c in enumerate(contents)) + b"\x00\x00"
    sender = threading.Thread(target=conn.sock.sendall, args=(payload,), daemon=True)
    sender.start()
    try:
        # A reader that is busy for a moment (or on a slow link) after sending.
        time.sleep(1.5)
        *answers, error = conn.recv_frames(4, timeout=10.0)
    finally:
        sender.join(10)
    assert [a.id for a in answers] == [0, 1, 2]
    assert [bytes(a.content) == c for a, c in zip(answers, contents)] == [True] * 3
    assert_error_frame(error, ErrorCode.BAD_HEADER_LENGTH)
    conn.expect_eof()


# -- 7. half-close on a framed connection ---------------------------------------------


def test_half_close_answers_complete_frames_then_closes(start_server: Any, open_raw: Any) -> None:
    server = start_server("echo", limits=Limits(frame_timeout=30.0))
    conn = open_raw(server.address)
    half = encode_frame(Frame.binary(b"z" * 40, id=99))[:-20]
    conn.sendall(encode_frames(echo_frames(range(3))) + half)
    conn.sock.shutdown(socket.SHUT_WR)
    answers = conn.recv_frames(3)
    assert_echoed(answers, range(3))
    conn.expect_eof(timeout=3.0)  # well before the frame timeout: the partial frame is dropped


def test_half_close_with_large_pending_output(start_server: Any, open_raw: Any) -> None:
    server = start_server("echo", limits=Limits(high_water=256 * KiB, low_water=64 * KiB))
    conn = open_raw(server.address)
    contents = [os.urandom(1 * MiB) for _ in range(6)]
    payload = encode_frames(Frame.binary(c, id=i) for i, c in enumerate(contents))
    sender = threading.Thread(
        target=lambda: (conn.sock.sendall(payload), conn.sock.shutdown(socket.SHUT_WR)), daemon=True)
    sender.start()
    try:
        answers = conn.recv_frames(6, timeout=15.0)
    finally:
        sender.join(10)
    assert [a.id for a in answers] == list(range(6))
    assert all(bytes(a.content) == c for a, c in zip(answers, contents))
    conn.expect_eof()


# -- 8. a peer that never reads ----------------------------------------------------------


AMPLIFIED = b"A" * 60_000


def amplifying_app(request: Frame) -> Frame:
    """Every (tiny) request is answered with 60,000 bytes: one frame within max_content."""
    return Frame.binary(AMPLIFIED)


BACKPRESSURE_CASES = [
    pytest.param("echo", 1 * MiB, Limits(high_water=256 * KiB, low_water=64 * KiB), id="echo-1MiB-frames"),
    # Tiny requests with large answers: one read's answers must not all be queued at once.
    pytest.param(amplifying_app, 0, Limits(high_water=256 * KiB, low_water=64 * KiB, max_content=64 * KiB),
                 id="amplifying-app"),
]


@pytest.mark.parametrize(("app", "size", "limits"), BACKPRESSURE_CASES)
def test_peer_that_never_reads(start_server: Any, open_raw: Any, open_client: Any, output_peaks: Any,
                               app: Any, size: int, limits: Limits) -> None:
    """Backpressure: the output queue stays within high_water + one response; others are served."""
    server = start_server(app, limits=limits)
    other = open_client(server)
    assert other.request(Frame.binary(b"warm-up")).error_info is None
    reader_less = open_raw(server.address)
    request_frames = [Frame.binary(os.urandom(size), id=i) for i in range(4)]
    block = encode_frames(request_frames * max(1, (2 * MiB) // (4 * size + 400)))
    if app == "echo":
        largest_response = max(len(encode_frame(f)) for f in request_frames) + 16  # byteorder may differ
    else:
        largest_response = len(encode_frame(app(request_frames[0]))) + 16
    bound = limits.high_water + largest_response
    server_side = server_connection_of(server, reader_less.sock)

    probes = 0
    with PeakSampler(server_side) as sampler, \
            Blaster(reader_less.sock, block, total=60 * MiB, stall=2.0) as blaster:
        while not blaster.done.is_set():
            pending = server_side.pending_output
            assert pending <= bound, f"pending_output {pending} > high_water + largest response {bound}"
            # Another client is answered promptly meanwhile.
            probes += 1
            started = time.monotonic()
            response = other.request(Frame.binary(f"probe {probes}".encode()))
            assert time.monotonic() - started < 1.0
            assert response.error_info is None
            blaster.done.wait(0.1)
        assert blaster.error is None, blaster.error
        assert blaster.stalled.is_set(), f"the kernel took all {blaster.sent} bytes: no backpressure"
        final = server_side.pending_output
    assert probes >= 3 and sampler.samples >= 100
    # What each write left queued, and what the poller saw (it may catch a
    # write in the middle of queueing): neither may pass the bound.
    exact_peak = output_peaks.get(server_side, 0)
    assert sampler.peak <= bound, (sampler.peak, bound)
    # The server stopped reading because of backpressure (it resumes only at the
    # low-water mark), and its output queue never passed the high-water mark by
    # more than one response.
    assert limits.low_water < final <= bound, (final, bound)
    assert limits.low_water < exact_peak <= bound, (exact_peak, bound)
    assert server_side in server.server.connections
    # Closing the socket that never read frees its connection; the others go on.
    reader_less.close()
    wait_until(lambda: server_side not in server.server.connections, 5.0, "the server to drop the connection")
    assert bytes(other.request(Frame.binary(b"still here")).content) == (
        b"still here" if app == "echo" else AMPLIFIED)


def test_raw_echo_peer_that_never_reads(start_server: Any, open_raw: Any, open_client: Any,
                                        output_peaks: Any) -> None:
    limits = Limits(high_water=256 * KiB, low_water=64 * KiB)
    server = start_server("raw-echo", limits=limits)
    reader_less = open_raw(server.address)
    server_side = server_connection_of(server, reader_less.sock)
    other = open_raw(server.address, nodelay=True)
    # raw-echo answers each read with its bytes: the largest "response" is one read.
    bound = limits.high_water + RECV_SIZE
    with Blaster(reader_less.sock, os.urandom(1 * MiB), total=60 * MiB, stall=2.0) as blaster:
        probes = 0
        while not blaster.done.is_set():
            probes += 1
            probe = f"probe {probes}".encode()
            started = time.monotonic()
            other.sendall(probe)
            other.sock.settimeout(1.0)
            assert recv_exactly(other.sock, len(probe)) == probe and time.monotonic() - started < 1.0
            assert server_side.pending_output <= bound
            blaster.done.wait(0.1)
        assert blaster.error is None and blaster.stalled.is_set()
        final = server_side.pending_output
    assert probes >= 3
    assert limits.low_water < final <= bound
    assert limits.low_water < output_peaks[server_side] <= bound
    reader_less.close()
    wait_until(lambda: server_side not in server.server.connections, 5.0, "the server to drop the connection")


def test_frame_timeout_paused_during_backpressure(start_server: Any, open_raw: Any) -> None:
    """The frame timeout does not run while the server itself holds the peer up."""
    huge = b"H" * (32 * MiB)  # more than the kernel buffers hold: reading pauses

    def app(request: Frame) -> Frame:
        return Frame.binary(huge) if request.content == b"huge" else echo(request)

    server = start_server(app, limits=Limits(frame_timeout=1.0, high_water=256 * KiB, low_water=64 * KiB))
    conn = open_raw(server.address)
    server_side = server_connection_of(server, conn.sock)
    last = encode_frame(Frame.binary(b"the last one", id="last"))
    # One small send: the server reads the request for the huge answer and half
    # of the next frame together, answers, and stops reading.
    conn.sendall(encode_frame(Frame.binary(b"huge", id="h")) + last[:20])
    wait_until(lambda: server_side.pending_output > 256 * KiB, 5.0, "backpressure")
    time.sleep(2.0)  # two frame timeouts during which this client does not read
    (huge_answer,) = conn.recv_frames(1, timeout=20.0)  # reading resumes on the way
    assert huge_answer.id == "h" and len(huge_answer.content) == len(huge)
    # Still incomplete, for longer than a sweep (0.25 s) but well within what is left of
    # the frame timeout once the time spent paused is not counted: no error yet.
    conn.expect_silence(0.3)
    conn.sendall(last[20:])
    (answer,) = conn.recv_frames(1)
    assert answer.error_info is None, answer.error_info
    assert (answer.id, bytes(answer.content)) == ("last", b"the last one")
    conn.expect_silence(0.1)


def test_requests_before_a_fatal_error_respect_the_high_water_mark(
        start_server: Any, open_raw: Any, open_client: Any, output_peaks: Any) -> None:
    big = b"B" * (1 * MiB)
    limits = Limits(high_water=256 * KiB, low_water=64 * KiB, max_content=1 * MiB)
    server = start_server(lambda request: Frame.binary(big), limits=limits)
    other = open_client(server)
    conn = open_raw(server.address)
    server_side = server_connection_of(server, conn.sock)
    # 40 tiny requests and a bad frame: one small send, so one read on the server.
    conn.sendall(encode_frames(Frame.binary(b"", id=i) for i in range(40)) + b"\x00\x00")
    wait_until(lambda: server_side in output_peaks, 5.0, "the server to answer")
    bound = limits.high_water + len(encode_frame(Frame.binary(big, id=39))) + 16
    try:
        assert output_peaks[server_side] <= bound, (output_peaks[server_side], bound)
        assert server_side.pending_output <= bound
    finally:
        conn.close()  # never read a byte
    assert bytes(other.request(Frame.binary(b"x")).content) == big


# -- 9. idle timeout ------------------------------------------------------------------------


def test_idle_connection_closed_silently(start_server: Any, open_raw: Any) -> None:
    server = start_server("echo", limits=Limits(idle_timeout=0.5))
    never_used = open_raw(server.address)
    used_once = open_raw(server.address)
    started = time.monotonic()
    used_once.sendall(encode_frame(Frame.binary(b"once", id=1)))
    (answer,) = used_once.recv_frames(1)
    assert bytes(answer.content) == b"once"
    never_used.expect_eof(timeout=3.0)  # no bytes at all, just EOF
    used_once.expect_eof(timeout=3.0)
    assert 0.4 <= time.monotonic() - started < 3.5


def test_active_connection_not_closed_by_idle_timeout(start_server: Any, open_raw: Any) -> None:
    server = start_server("echo", limits=Limits(idle_timeout=0.5))
    active = open_raw(server.address)
    idle = open_raw(server.address)
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < 1.5:  # three idle timeouts long
        active.sendall(encode_frame(Frame.binary(b"tick", id=i)))
        (answer,) = active.recv_frames(1)
        assert answer.id == i
        i += 1
        # Pacing: the client is busy elsewhere for a fifth of the idle timeout.
        time.sleep(0.1)
    assert i >= 5
    idle.expect_eof(timeout=0.1)  # the idle one was closed meanwhile
    active.expect_silence(0.05)  # the active one was not
    active.sendall(encode_frame(Frame.binary(b"last", id="last")))
    assert active.recv_frames(1)[0].id == "last"


def test_idle_timeout_with_a_partial_frame_is_a_frame_timeout(start_server: Any, open_raw: Any) -> None:
    """A connection holding a partial frame is not idle: it gets the frame timeout's error frame."""
    server = start_server("echo", limits=Limits(idle_timeout=0.5, frame_timeout=1.0))
    conn = open_raw(server.address)
    conn.sendall(raw_frame(good_header(10, id="p"), b"12345"))
    (error,) = conn.recv_frames(1, timeout=4.0)
    assert_error_frame(error, ErrorCode.TIMEOUT, "p")
    conn.expect_eof()


def test_idle_timeout_closes_peer_whose_output_does_not_move(start_server: Any, open_raw: Any) -> None:
    limits = Limits(idle_timeout=0.5, high_water=256 * KiB, low_water=64 * KiB)
    server = start_server("echo", limits=limits)
    stuck = open_raw(server.address)
    server_side = server_connection_of(server, stuck.sock)
    block = encode_frames([Frame.binary(os.urandom(256 * KiB), id=i) for i in range(4)])
    with Blaster(stuck.sock, block, total=60 * MiB, stall=10.0) as blaster:
        took = wait_until(lambda: server_side not in server.server.connections, 8.0,
                          "the server to close the connection whose output stopped")
        assert blaster.sent > limits.high_water
    assert took < 8.0


def test_a_slow_steady_reader_is_not_idle(start_server: Any, open_raw: Any) -> None:
    """Idle means no progress in either direction: a large answer that takes
    longer than the idle timeout to deliver, read slowly but steadily, keeps
    the connection open, and the next request is answered."""
    server = start_server("echo", limits=Limits(idle_timeout=0.5))
    conn = open_raw(server.address)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    content = os.urandom(4 * MiB)
    conn.sendall(encode_frame(Frame.binary(content, id=1)))
    decoder = FrameDecoder(max_content=64 * MiB)
    started = time.monotonic()
    frames: list[Frame] = []
    while not frames:  # about 2.5 MiB/s: 1.6 s, three idle timeouts
        data = conn.sock.recv(32 * KiB)
        assert data, f"closed as idle after {time.monotonic() - started:.2f} s of steady reading"
        frames = decoder.feed(data)
        time.sleep(0.0125)
    assert time.monotonic() - started > 1.0
    assert bytes(frames[0].content) == content
    time.sleep(0.1)  # well within the idle timeout after the last byte arrived
    conn.sendall(encode_frame(Frame.binary(b"next", id=2)))
    assert conn.recv_frames(1)[0].id == 2


class ClosingOwner:
    """A transport's owner for tests that build a `Transport` themselves: it
    records why its connection closed."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    def connection_closed(self, transport: Any, reason: str) -> None:
        self.closed.append(reason)

    def output_paused(self, transport: Any) -> None:
        pass


def test_a_send_queue_that_emptied_since_the_last_look_is_progress() -> None:
    """The idle check asks the kernel how much of what was sent it still
    holds only when the idle timeout would fire. A queue that held bytes at
    the last look and is empty now moved: the peer read the answer's tail
    since, and may still be reading its own buffer before it sends again
    (test_a_slow_steady_reader_is_not_idle lost that race now and then). It
    gets one more idle timeout; a queue that stays empty is idle."""
    from multiconn.session import RawEchoSession
    from multiconn.transport import Transport as _Transport

    def unsent(sock: socket.socket) -> int:  # what the kernel holds of what was sent (SIOCOUTQ)
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])

    owner = ClosingOwner()
    answer = b"t" * (256 * KiB)
    with EventLoop() as loop, socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * KiB)  # before connecting: a small window
        client.connect(listener.getsockname())
        server_side, _ = listener.accept()
        server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 * MiB)
        transport = _Transport(server_side, loop, Limits(idle_timeout=0.5), owner)
        transport.attach(RawEchoSession(transport))
        transport.write(answer)
        assert transport.pending_output == 0 and unsent(server_side) > 0  # with the kernel, not yet read
        start = transport.last_activity
        transport.check_timeouts(start + 1)  # the kernel still holds bytes: moving
        assert owner.closed == []
        received = 0
        client.settimeout(5)
        while received < len(answer):
            received += len(client.recv(64 * KiB))
        deadline = time.monotonic() + 5
        while unsent(server_side) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the last bytes are acknowledged
        assert unsent(server_side) == 0
        transport.check_timeouts(start + 2)
        assert owner.closed == [], "closed as idle though its output moved since the last look"
        transport.check_timeouts(start + 3)
        assert owner.closed == ["idle timeout"]


# -- 10. max-connections ----------------------------------------------------------------------


def test_max_connections(start_server: Any, open_raw: Any) -> None:
    server = start_server("echo", limits=Limits(max_connections=2))
    first = open_raw(server.address)
    second = open_raw(server.address)
    for i, conn in enumerate((first, second)):
        conn.sendall(encode_frame(Frame.binary(b"in", id=i)))
        assert conn.recv_frames(1)[0].id == i
    third = open_raw(server.address)  # completes in the listen backlog
    third.sendall(encode_frame(Frame.binary(b"waiting", id=3)))
    third.expect_silence(0.5)
    assert len(server.server.connections) == 2
    # The two served connections still work.
    second.sendall(encode_frame(Frame.binary(b"still", id=22)))
    assert second.recv_frames(1)[0].id == 22
    first.close()
    (answer,) = third.recv_frames(1, timeout=5.0)
    assert (answer.id, bytes(answer.content)) == (3, b"waiting")
    assert len(server.server.connections) == 2


# -- 11. custom app and ids ----------------------------------------------------------------------


def test_custom_callable_app_and_id_copied(start_server: Any, open_client: Any) -> None:
    seen: list[Any] = []

    class Upper:
        def __call__(self, request: Frame) -> Frame:
            seen.append(request.header.get("id"))
            return Frame.binary(bytes(request.content).upper(), content_type="text/plain", encoding="ascii")

    client = open_client(start_server(Upper()))
    responses = client.request_many([
        Frame.binary(b"abc", id="s"),
        Frame.binary(b"def", id=12345678901234567890),
        Frame.binary(b"ghi", id=0),
        Frame.binary(b"jkl"),
    ])
    assert [bytes(r.content) for r in responses] == [b"ABC", b"DEF", b"GHI", b"JKL"]
    assert [r.header["content-type"] for r in responses] == ["text/plain"] * 4
    assert [r.header["content-encoding"] for r in responses] == ["ascii"] * 4
    assert [r.header.get("id") for r in responses] == ["s", 12345678901234567890, 0, None]
    assert "id" not in responses[3].header
    assert seen == ["s", 12345678901234567890, 0, None]


def test_response_id_overrides_a_wrong_id_from_the_app(start_server: Any, open_client: Any) -> None:
    client = open_client(start_server(lambda request: Frame.binary(b"r", id="wrong")))
    assert client.request(Frame.binary(b"q", id="right")).id == "right"
    assert client.request(Frame.binary(b"q", id=7)).id == 7


def test_app_given_by_dotted_name(start_server: Any, open_client: Any) -> None:
    client = open_client(start_server("multiconn.apps:echo"))
    assert bytes(client.request(Frame.binary(b"dotted", id=1)).content) == b"dotted"


# -- 12. IPv6 ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_loopback(start_server: Any, open_client: Any, open_raw: Any) -> None:
    server = start_server("search", host="::1")
    assert server.address[0] == "::1"
    assert server.server.addresses[0][0] == "::1"
    client = open_client(server)
    assert client.request(search_request("morpheus")).json_content() == {"result": SEARCH_ANSWERS["morpheus"]}
    conn = open_raw(server.address)
    assert conn.sock.family == socket.AF_INET6
    conn.sendall(encode_frame(Frame.binary(b"0123456789xyz", id=6)))
    (answer,) = conn.recv_frames(1)
    assert (answer.id, bytes(answer.content)) == (6, b"First 10 bytes of request: 0123456789")


# -- 13. port 0 ----------------------------------------------------------------------------------------


def test_port_0_reports_the_chosen_port(start_server: Any, open_client: Any) -> None:
    server = start_server("echo")
    addresses = server.server.addresses
    assert addresses and all(port != 0 for _, port in addresses)
    assert server.server.port == 0
    assert addresses[0] == server.address and server.port == addresses[0][1]
    client = open_client(server)
    assert bytes(client.request(Frame.binary(b"p0")).content) == b"p0"


def test_port_0_every_listener_on_one_port(start_server: Any) -> None:
    server = start_server("echo", host="localhost")
    addresses = server.server.addresses
    assert addresses
    ports = {port for _, port in addresses}
    assert len(ports) == 1 and 0 not in ports
    for host, port in addresses:
        with connect(host, port, timeout=5.0) as client:
            assert bytes(client.request(Frame.binary(host.encode())).content) == host.encode()


def test_held_answers_then_the_fatal_error_in_order(start_server: Any, open_raw: Any) -> None:
    """Answers held back by backpressure still come before the error frame."""
    big = b"H" * (100 * KiB)
    limits = Limits(high_water=128 * KiB, low_water=32 * KiB, max_content=1 * MiB)
    server = start_server(lambda request: Frame.binary(big), limits=limits)
    conn = open_raw(server.address)
    conn.sendall(encode_frames(Frame.binary(b"", id=i) for i in range(12)) + b"\x00\x00")
    time.sleep(0.3)  # let the server hold what does not fit
    *answers, error = conn.recv_frames(13, timeout=10.0)
    assert [a.id for a in answers] == list(range(12))
    assert all(bytes(a.content) == big for a in answers)
    assert_error_frame(error, ErrorCode.BAD_HEADER_LENGTH)
    conn.expect_eof()


def test_a_preamble_stage_that_raises_costs_only_its_connection(caplog: pytest.LogCaptureFixture) -> None:
    """Transport.watch runs a stage's step under the same guard as the
    transport's own events: a bug in a stage closes that connection, logged,
    and the loop (the server) goes on."""
    from multiconn.loop import EVENT_READ
    from multiconn.session import RawEchoSession
    from multiconn.transport import Transport as _Transport

    class Broken:
        def __init__(self, transport: Any) -> None:
            self.transport = transport

        def start(self) -> None:
            self.transport.watch(EVENT_READ, self.step)

        def step(self) -> None:
            raise RuntimeError("a bug in a stage")

    owner = ClosingOwner()
    with EventLoop() as loop:
        server_side, client = socket.socketpair()
        with client:
            transport = _Transport(server_side, loop, Limits(), owner, (Broken,))
            transport.attach(RawEchoSession(transport))
            client.sendall(b"x")
            loop.call_later(0.5, loop.stop)
            with caplog.at_level(logging.ERROR, logger="multiconn"):
                loop.run_forever()
            assert owner.closed == ["internal error"]
            try:  # closed: with our byte unread, by a reset
                assert client.recv(10) == b""
            except ConnectionResetError:
                pass
    assert "unexpected error" in caplog.text and "a bug in a stage" in caplog.text
    caplog.clear()  # the error above is this test's point, not a server bug

"""Tests of the clients (`Client`/`connect`, `MultiClient`) and their exceptions.

Real servers come from the `start_server` fixture; misbehaving servers (silent,
closing, sending garbage) are plain sockets driven by a thread in this file.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from multiconn import (
    ConnectionClosed,
    ConnectionFailed,
    ErrorResponse,
    Frame,
    MultiClient,
    MulticonnError,
    ProtocolError,
    Timeout,
    connect,
)
from multiconn.protocol import encode_frame

from helpers import free_port, recv_exactly


# -- helpers ----------------------------------------------------------------


class PlainServer:
    """One-connection socket server on 127.0.0.1 whose behaviour a test supplies.

    ``behaviour(conn, done)`` runs in a thread with the accepted socket; `done` is
    set when the test is finished with the exchange (so a behaviour can keep the
    connection open until then).
    """

    def __init__(self, behaviour: Callable[[socket.socket, threading.Event], None]) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        self.behaviour = behaviour
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            self.error = exc
            return
        with conn:
            conn.settimeout(10)
            try:
                self.behaviour(conn, self.done)
            except OSError as exc:  # e.g. the client reset: not the test's concern
                self.error = exc

    def close(self) -> None:
        self.done.set()
        self.thread.join(15)
        self.listener.close()
        assert not self.thread.is_alive(), "the plain server thread did not end"


@contextlib.contextmanager
def plain_server(behaviour: Callable[[socket.socket, threading.Event], None]) -> Iterator[PlainServer]:
    server = PlainServer(behaviour)
    try:
        yield server
    finally:
        server.close()


REQUEST = Frame.binary(b"hello", id=1)
REQUEST_BYTES = encode_frame(REQUEST)


# -- connecting ---------------------------------------------------------------


def test_connect_to_a_closed_port_raises_connection_failed() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        connect("127.0.0.1", port, timeout=5)
    assert time.monotonic() - t0 < 2
    exc = info.value
    assert isinstance(exc, ConnectionError)
    assert isinstance(exc, MulticonnError)
    assert isinstance(exc, OSError)  # ConnectionError is an OSError: `except OSError` still works
    assert f"127.0.0.1:{port}" in str(exc)
    assert "refused" in str(exc).lower()


@pytest.fixture
def unknown_host(monkeypatch: pytest.MonkeyPatch) -> str:
    """A host name that does not resolve; getaddrinfo is faked for it, so no DNS
    query leaves the machine."""
    real = socket.getaddrinfo

    def fake_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "no-such-host.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    return "no-such-host.invalid"


def test_connect_to_an_unknown_host_name_raises_connection_failed(unknown_host: str) -> None:
    """Name resolution failing is ConnectionFailed, not a raw socket.gaierror."""
    with pytest.raises(ConnectionFailed) as info:
        connect(unknown_host, 80, timeout=2)
    assert "no-such-host.invalid" in str(info.value)
    assert "Name or service not known" in str(info.value)


def test_connect_to_an_invalid_host_name_raises_connection_failed() -> None:
    # An empty label makes the idna codec fail before any lookup: no traffic.
    with pytest.raises(ConnectionFailed):
        connect("bad..host", 80, timeout=2)


# -- failures during an exchange ---------------------------------------------


def test_timeout_when_the_server_accepts_but_never_answers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the handshake; nobody ever reads
        with connect(*listener.getsockname(), timeout=0.5) as client:
            t0 = time.monotonic()
            with pytest.raises(Timeout) as info:
                client.request(REQUEST)
            elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 1.5
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, MulticonnError)
    assert "0.5" in str(info.value)


def test_connection_closed_when_the_server_closes_without_answering() -> None:
    def read_then_close(conn: socket.socket, done: threading.Event) -> None:
        assert recv_exactly(conn, len(REQUEST_BYTES)) == REQUEST_BYTES

    with plain_server(read_then_close) as server:
        with connect("127.0.0.1", server.port, timeout=5) as client:
            t0 = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                client.request(REQUEST)
            assert time.monotonic() - t0 < 2
    assert isinstance(info.value, ConnectionError)
    assert isinstance(info.value, MulticonnError)
    assert server.error is None


def test_connection_closed_after_a_partial_response() -> None:
    response = encode_frame(Frame.binary(b"0123456789", id=1))

    def half_answer(conn: socket.socket, done: threading.Event) -> None:
        recv_exactly(conn, len(REQUEST_BYTES))
        conn.sendall(response[: len(response) - 4])

    with plain_server(half_answer) as server:
        with connect("127.0.0.1", server.port, timeout=5) as client:
            with pytest.raises(ConnectionClosed):
                client.request(REQUEST)


def test_protocol_error_when_the_server_sends_garbage() -> None:
    def garbage(conn: socket.socket, done: threading.Event) -> None:
        recv_exactly(conn, len(REQUEST_BYTES))
        conn.sendall(b"\x00\x00")
        done.wait(10)  # keep the connection open: the client must not need EOF

    with plain_server(garbage) as server:
        with connect("127.0.0.1", server.port, timeout=5) as client:
            t0 = time.monotonic()
            with pytest.raises(ProtocolError) as info:
                client.request(REQUEST)
            assert time.monotonic() - t0 < 2
    assert info.value.code == "bad-header-length"
    assert isinstance(info.value, MulticonnError)


def test_protocol_error_when_the_server_sends_a_non_json_header() -> None:
    def garbage(conn: socket.socket, done: threading.Event) -> None:
        recv_exactly(conn, len(REQUEST_BYTES))
        conn.sendall(b"\x00\x05hello")
        done.wait(10)

    with plain_server(garbage) as server:
        with connect("127.0.0.1", server.port, timeout=5) as client:
            with pytest.raises(ProtocolError) as info:
                client.request(REQUEST)
    assert info.value.code == "bad-header"


# -- error frames from a real server ---------------------------------------------


def test_bad_content_raises_error_response_and_the_connection_stays_open(start_server: Any) -> None:
    server = start_server("echo")
    not_json = Frame({"content-type": "text/json", "content-encoding": "utf-8", "id": 7}, b"{not json")
    with server.connect(timeout=5) as client:
        with pytest.raises(ErrorResponse) as info:
            client.request(not_json)
        exc = info.value
        assert exc.code == "bad-content"
        assert exc.message
        assert exc.frame.id == 7
        assert exc.frame.error_info == ("bad-content", exc.message)
        assert isinstance(exc, MulticonnError)
        # framing is intact: the same connection still answers
        answer = client.request(Frame.json({"ok": True}, id=8))
        assert answer.json_content() == {"ok": True}
        assert answer.id == 8


def test_search_given_an_array_is_bad_content(start_server: Any) -> None:
    server = start_server("search")
    with server.connect(timeout=5) as client:
        with pytest.raises(ErrorResponse) as info:
            client.request(Frame.json(["search", "ring"]))
        assert info.value.code == "bad-content"
        answer = client.request(Frame.json({"action": "search", "value": "ring"}))
        assert answer.json_content() == {"result": "In the caves beneath the Misty Mountains. \U0001f48d"}


def test_fatal_missing_header_raises_error_response_not_connection_closed(start_server: Any) -> None:
    server = start_server("echo")
    no_content_type = Frame({"content-encoding": "binary"}, b"abc")  # encoder adds only byteorder/length
    with server.connect(timeout=5) as client:
        with pytest.raises(ErrorResponse) as info:
            client.request(no_content_type)
        assert info.value.code == "missing-header"
        assert "content-type" in info.value.message
        # fatal: the server closed the connection afterwards
        with pytest.raises(ConnectionClosed):
            client.request(Frame.binary(b"more"))


def test_fatal_error_in_a_pipeline_raises_error_response(start_server: Any) -> None:
    """The error frame arrives followed by EOF, before the other answers: the
    client must report the error frame, not that the connection closed."""
    server = start_server("echo")
    frames = [
        Frame.binary(b"ok-1", id=1),
        Frame({"content-type": "binary/x", "content-encoding": "binary", "id": [1]}, b"x"),
        Frame.binary(b"never answered", id=3),
    ]
    with server.connect(timeout=5) as client:
        with pytest.raises(ErrorResponse) as info:
            client.request_many(frames, raise_errors=False)
    assert info.value.code == "bad-header-value"


def test_handler_error_raises_error_response_with_code(start_server: Any) -> None:
    def broken(request: Frame) -> Frame:
        raise KeyError("nope")

    server = start_server(broken)
    with server.connect(timeout=5) as client:
        with pytest.raises(ErrorResponse) as info:
            client.request(Frame.binary(b"x", id="r1"))
        assert info.value.code == "handler-error"
        assert "KeyError" in info.value.message
        assert info.value.frame.id == "r1"


# -- request_many ---------------------------------------------------------------


def test_request_many_returns_responses_in_order(start_server: Any) -> None:
    server = start_server("echo")
    frames = [Frame.binary(f"payload {i}".encode() * (i + 1), id=i) for i in range(50)]
    with server.connect(timeout=5) as client:
        responses = client.request_many(frames)
        assert [r.id for r in responses] == list(range(50))
        assert [r.content for r in responses] == [f.content for f in frames]
        assert all(r.content_type == "binary/octet-stream" for r in responses)
        assert client.request_many([]) == []


def test_request_many_with_raise_errors_false_keeps_error_frames_in_place(start_server: Any) -> None:
    server = start_server("echo")
    bad = Frame({"content-type": "text/json", "content-encoding": "utf-8", "id": "b"}, b"[1, 2")
    frames = [Frame.json({"n": 1}, id="a"), bad, Frame.json({"n": 3}, id="c")]
    with server.connect(timeout=5) as client:
        responses = client.request_many(frames, raise_errors=False)
        assert [r.id for r in responses] == ["a", "b", "c"]
        assert responses[0].json_content() == {"n": 1}
        assert responses[0].error_info is None
        code, message = responses[1].error_info
        assert code == "bad-content"
        assert message
        assert responses[2].json_content() == {"n": 3}

        with pytest.raises(ErrorResponse) as info:
            client.request_many(frames, raise_errors=True)
        assert info.value.code == "bad-content"
        assert info.value.frame.id == "b"
        # all responses were consumed: the connection is in sync for the next request
        after = client.request(Frame.binary(b"sync", id="d"))
        assert (after.id, after.content) == ("d", b"sync")


def test_request_many_two_thousand_4k_frames_does_not_deadlock(start_server: Any) -> None:
    server = start_server("echo")
    frames = [Frame.binary(bytes([i % 256]) * 4096, id=i) for i in range(2000)]
    with server.connect(timeout=10) as client:
        t0 = time.monotonic()
        responses = client.request_many(frames)
        elapsed = time.monotonic() - t0
    assert len(responses) == 2000
    assert [r.id for r in responses] == list(range(2000))
    assert all(r.content == f.content for r, f in zip(responses, frames))
    assert elapsed < 15


def test_client_close_closes_the_socket(start_server: Any) -> None:
    server = start_server("echo")
    client = server.connect(timeout=5)
    with client:
        assert client.request(Frame.binary(b"x")).content == b"x"
    assert client.sock.fileno() == -1


# -- MultiClient -------------------------------------------------------------------


def test_multiclient_pipelined_connections_answer_in_order(start_server: Any) -> None:
    server = start_server("echo")
    requests = [
        [Frame.binary(f"c{c}-r{r}".encode(), id=f"{c}-{r}") for r in range(20)]
        for c in range(10)
    ]
    results = MultiClient("127.0.0.1", server.port, timeout=10, pipeline=4).run(requests)
    assert len(results) == 10
    for c, responses in enumerate(results):
        assert [resp.frame.id for resp in responses] == [f"{c}-{r}" for r in range(20)]
        assert [resp.frame.content for resp in responses] == [f"c{c}-r{r}".encode() for r in range(20)]
        assert all(resp.error is None for resp in responses)
        assert all(0 <= resp.latency < 10 for resp in responses)


def test_multiclient_reports_error_frames_in_place(start_server: Any) -> None:
    server = start_server("echo")
    bad = Frame({"content-type": "text/json", "content-encoding": "utf-8", "id": 2}, b"nope")
    requests = [[Frame.binary(b"a", id=1), bad, Frame.binary(b"c", id=3)], []]
    results = MultiClient("127.0.0.1", server.port, timeout=5, pipeline=2).run(requests)
    assert [r.frame.id for r in results[0]] == [1, 2, 3]
    assert results[0][1].error is not None and results[0][1].error[0] == "bad-content"
    assert results[0][0].frame.content == b"a"
    assert results[1] == []


def test_multiclient_pipeline_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MultiClient("127.0.0.1", 1, pipeline=0)


def test_multiclient_to_a_closed_port_raises_connection_failed() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        MultiClient("127.0.0.1", port, timeout=5).run([[Frame.binary(b"x")], [Frame.binary(b"y")]])
    assert time.monotonic() - t0 < 3
    assert isinstance(info.value, ConnectionError)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "ECONNREFUSED" in str(info.value)


def test_multiclient_to_an_unknown_host_name_raises_connection_failed(unknown_host: str) -> None:
    with pytest.raises(ConnectionFailed):
        MultiClient(unknown_host, 80, timeout=2).run([[Frame.binary(b"x")]])


def test_multiclient_connection_closed_by_server() -> None:
    def read_then_close(conn: socket.socket, done: threading.Event) -> None:
        recv_exactly(conn, len(REQUEST_BYTES))

    with plain_server(read_then_close) as server:
        with pytest.raises(ConnectionClosed) as info:
            MultiClient("127.0.0.1", server.port, timeout=5).run([[REQUEST]])
    assert "0 of 1" in str(info.value) or "connection 0" in str(info.value)


def test_multiclient_timeout_when_server_never_answers() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=4) as listener:
        t0 = time.monotonic()
        with pytest.raises(Timeout):
            MultiClient(*listener.getsockname(), timeout=0.5).run([[REQUEST], [REQUEST]])
        elapsed = time.monotonic() - t0
    assert 0.45 <= elapsed < 1.5


def test_multiclient_unsolicited_extra_response_is_a_multiconn_error() -> None:
    def answer_twice(conn: socket.socket, done: threading.Event) -> None:
        recv_exactly(conn, len(REQUEST_BYTES))
        conn.sendall(encode_frame(Frame.binary(b"a", id=1)) + encode_frame(Frame.binary(b"b", id=1)))
        done.wait(10)

    with plain_server(answer_twice) as server:
        with pytest.raises(MulticonnError):
            MultiClient("127.0.0.1", server.port, timeout=2).run([[REQUEST]])

"""Tests of the asyncio client, `multiconn.aio`, over real loopback sockets.

Real servers come from the `start_server` fixture (a `ServerThread` in this
process); misbehaving servers (silent, closing, sending garbage) are
`asyncio.start_server` callbacks running on the test's own loop. Every test
runs on asyncio's default loop and, when it is importable, on uvloop, through
anyio's pytest plugin (only its runner: the client under test is plain asyncio).
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Awaitable, Callable

import pytest

from multiconn import (
    CertificateVerificationError,
    ConnectionClosed,
    ConnectionFailed,
    ErrorResponse,
    Frame,
    FrameDecoder,
    Limits,
    MulticonnError,
    ProtocolError,
    Timeout,
    TLSError,
    encode_frame,
)
from multiconn import aio

try:
    import uvloop
except ImportError:  # pragma: no cover - the test extra installs it where it builds (not Windows)
    uvloop = None

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module", params=[
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop",
                 marks=pytest.mark.skipif(uvloop is None, reason="uvloop is not installed")),
])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


# -- helpers ------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A one-shot server on the test's loop whose behaviour the test writes."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: not the test's concern
        finally:
            writer.close()

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def read_frames(reader: asyncio.StreamReader, count: int) -> list[Frame]:
    """Read exactly `count` request frames off a raw server's connection."""
    decoder = FrameDecoder()
    frames: list[Frame] = []
    while len(frames) < count:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("client went away")
        frames += decoder.feed(data)
    return frames


def search(value: str, id: Any = None) -> Frame:
    return Frame.json({"action": "search", "value": value}, id=id)


RING = "In the caves beneath the Misty Mountains. \U0001f48d"


class Gauge:
    """An app (for a thread pool) that counts the requests being handled at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def __call__(self, request: Frame) -> Frame:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.delay)
        with self.lock:
            self.now -= 1
        return Frame.binary(request.content)


# -- basic use ----------------------------------------------------------------------


async def test_request(start_server: Any) -> None:
    server = start_server("search")
    client = await aio.connect(*server.address, timeout=5)
    async with client:
        answer = await client.request(search("ring", id=7))
        assert answer.json_content() == {"result": RING}
        assert answer.id == 7
        assert client.in_flight == 0
        assert not client.closed
    assert client.closed
    with pytest.raises(ConnectionClosed):
        await client.request(search("ring"))
    await client.close()  # again: nothing happens


async def test_request_many_in_order(start_server: Any) -> None:
    server = start_server("echo")
    frames = [Frame.binary(f"payload {i}".encode() * (i + 1), id=i) for i in range(300)]
    async with await aio.connect(*server.address, timeout=5, max_in_flight=16) as client:
        answers = await client.request_many(frames)  # more frames than slots
        assert [a.id for a in answers] == list(range(300))
        assert [a.content for a in answers] == [f.content for f in frames]
        assert await client.request_many([]) == []
        assert client.in_flight == 0


async def test_error_frames(start_server: Any) -> None:
    server = start_server("echo")
    bad = Frame({"content-type": "text/json", "content-encoding": "utf-8", "id": "b"}, b"[1, 2")
    frames = [Frame.json({"n": 1}, id="a"), bad, Frame.json({"n": 3}, id="c")]
    async with await aio.connect(*server.address, timeout=5) as client:
        with pytest.raises(ErrorResponse) as info:
            await client.request(bad)
        assert info.value.code == "bad-content"
        assert info.value.frame.id == "b"

        answers = await client.request_many(frames, raise_errors=False)
        assert [a.id for a in answers] == ["a", "b", "c"]
        assert answers[1].error_info[0] == "bad-content"
        with pytest.raises(ErrorResponse) as info:
            await client.request_many(frames)
        assert info.value.frame.id == "b"
        # every answer was read: the connection is in sync
        after = await client.request(Frame.binary(b"sync", id="d"))
        assert (after.id, after.content) == ("d", b"sync")


async def test_fatal_error_frame_then_close(start_server: Any) -> None:
    """An error frame after which the server closes: that request gets the
    ErrorResponse, the requests behind it ConnectionClosed naming the cause."""
    server = start_server("echo")
    no_content_type = Frame({"content-encoding": "binary", "id": 2}, b"abc")
    async with await aio.connect(*server.address, timeout=5) as client:
        results = await asyncio.gather(
            client.request(Frame.binary(b"ok", id=1)),
            client.request(no_content_type),
            client.request(Frame.binary(b"never", id=3)),
            return_exceptions=True)
        assert results[0].content == b"ok"
        assert isinstance(results[1], ErrorResponse) and results[1].code == "missing-header"
        assert isinstance(results[2], ConnectionClosed)
        assert "missing-header" in str(results[2])
        with pytest.raises(ConnectionClosed):
            await client.request(Frame.binary(b"more"))
    async with await aio.connect(*server.address, timeout=5) as client:
        # request_many reports the server's reason, like the blocking client
        with pytest.raises(ErrorResponse) as info:
            await client.request_many([Frame.binary(b"ok"), no_content_type, Frame.binary(b"x")],
                                      raise_errors=False)
        assert info.value.code == "missing-header"


async def test_8_mib_echo(start_server: Any) -> None:
    """Large frames: the transport's flow control and the decoder's big buffers."""
    server = start_server("echo")
    content = os.urandom(8 * 1024 * 1024)
    async with await aio.connect(*server.address, timeout=20) as client:
        first, second = await asyncio.gather(client.request(Frame.binary(content, id=1)),
                                             client.request(Frame.binary(b"small", id=2)))
        assert (first.id, second.id) == (1, 2)
        assert first.content == content and second.content == b"small"


# -- concurrency --------------------------------------------------------------------


async def test_1000_tasks_on_10_connections(start_server: Any) -> None:
    server = start_server("echo")
    clients = [await aio.connect(*server.address, timeout=20) for _ in range(10)]
    try:
        async def one(client: aio.AsyncClient, n: int) -> tuple[int, Frame]:
            content = f"request {n} ".encode() * (n % 7 + 1)
            return n, await client.request(Frame.binary(content, id=f"r{n}"))

        results = await asyncio.gather(*(one(clients[n % 10], n) for n in range(1000)))
        assert len(results) == 1000
        for n, answer in results:
            assert answer.id == f"r{n}"
            assert answer.content == f"request {n} ".encode() * (n % 7 + 1)
        assert all(client.in_flight == 0 for client in clients)
    finally:
        for client in clients:
            await client.close()


async def test_max_in_flight_bounds_the_requests_at_the_server(start_server: Any) -> None:
    gauge = Gauge(delay=0.03)
    server = start_server(gauge, handler_pool="thread", pool_size=16)
    async with await aio.connect(*server.address, timeout=10, max_in_flight=4) as client:
        tasks = [asyncio.ensure_future(client.request(Frame.binary(b"%d" % i, id=i))) for i in range(40)]
        await asyncio.sleep(0)  # every task has run to its first wait
        assert client.in_flight == 4
        seen = []
        while not all(task.done() for task in tasks):
            seen.append(client.in_flight)
            await asyncio.sleep(0.002)
        answers = await asyncio.gather(*tasks)
    assert [(a.id, a.content) for a in answers] == [(i, b"%d" % i) for i in range(40)]
    assert max(seen) <= 4
    assert gauge.peak == 4
    # The control: with a looser bound, the same server does see more at once.
    gauge.peak = 0
    async with await aio.connect(*server.address, timeout=10, max_in_flight=16) as client:
        await asyncio.gather(*(client.request(Frame.binary(b"x")) for _ in range(40)))
    assert gauge.peak > 4


async def test_callers_get_slots_first_come_first_served(start_server: Any) -> None:
    """Frames go on the wire in call order, also past the in-flight bound."""
    server = start_server("echo")
    order: list[int] = []
    async with await aio.connect(*server.address, timeout=5, max_in_flight=2) as client:
        async def one(i: int) -> None:
            answer = await client.request(Frame.binary(b"", id=i))
            order.append(answer.id)

        await asyncio.gather(*(one(i) for i in range(50)))
    assert order == list(range(50))


async def test_newcomers_do_not_overtake_waiting_callers(start_server: Any) -> None:
    """Callers keep arriving, one per loop iteration, while others wait for a
    slot: a slot freed by an answer goes to the oldest waiter, never to a
    newcomer that happens to run first."""
    server = start_server("echo")
    order: list[int] = []
    async with await aio.connect(*server.address, timeout=10, max_in_flight=2) as client:
        async def one(i: int) -> None:
            answer = await client.request(Frame.binary(b"", id=i))
            order.append(answer.id)  # tasks resume in the order their answers were read

        tasks = []
        for i in range(400):
            tasks.append(asyncio.ensure_future(one(i)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    assert order == list(range(400))


async def test_cancelling_part_of_a_pipeline(start_server: Any) -> None:
    """Cancel tasks in flight and tasks still waiting for a slot: the others get
    their own answers, and the connection stays usable."""
    server = start_server(Gauge(delay=0.002), handler_pool="thread", pool_size=4)
    async with await aio.connect(*server.address, timeout=10, max_in_flight=8) as client:
        tasks = [asyncio.ensure_future(client.request(Frame.binary(b"%d" % i, id=i))) for i in range(60)]
        await asyncio.sleep(0)
        assert client.in_flight == 8  # 8 written, 52 waiting for a slot
        doomed = set(range(0, 60, 3))  # both kinds: 0, 3, 6 are in flight
        for i in doomed:
            tasks[i].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for i, result in enumerate(results):
            if i in doomed:
                assert isinstance(result, asyncio.CancelledError)
            else:
                assert (result.id, result.content) == (i, b"%d" % i)
        after = await client.request(Frame.binary(b"after", id="after"))
        assert (after.id, after.content) == ("after", b"after")
        assert client.in_flight == 0  # the cancelled ones' answers were read and dropped


async def test_random_cancellations_keep_every_answer_matched(start_server: Any) -> None:
    """Cancellation at random moments: waiting for a slot, just handed one,
    written, answer arriving. Survivors must still get exactly their answer."""
    server = start_server("echo")
    rng = random.Random(1414)
    loop = asyncio.get_running_loop()
    async with await aio.connect(*server.address, timeout=10, max_in_flight=8) as client:
        for _round in range(3):
            contents = [os.urandom(rng.randrange(200)) for _ in range(300)]
            tasks = [asyncio.ensure_future(client.request(Frame.binary(content, id=i)))
                     for i, content in enumerate(contents)]
            for task in tasks:
                if rng.random() < 0.3:
                    loop.call_later(rng.random() * 0.02, task.cancel)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            survivors = 0
            for i, result in enumerate(results):
                if isinstance(result, asyncio.CancelledError):
                    continue
                assert isinstance(result, Frame), result
                assert (result.id, result.content) == (i, contents[i])
                survivors += 1
            assert survivors >= 150
            check = await client.request(Frame.binary(b"check", id="check"))
            assert (check.id, check.content) == ("check", b"check")
            assert client.in_flight == 0


async def test_request_many_cancelled_midway(start_server: Any) -> None:
    server = start_server(Gauge(delay=0.001), handler_pool="thread", pool_size=2)
    async with await aio.connect(*server.address, timeout=10, max_in_flight=4) as client:
        batch = asyncio.ensure_future(client.request_many(Frame.binary(b"%d" % i, id=i) for i in range(100)))
        await asyncio.sleep(0.02)
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        answer = await client.request(Frame.binary(b"next", id="next"))
        assert (answer.id, answer.content) == ("next", b"next")
        assert client.in_flight == 0


# -- TLS ----------------------------------------------------------------------------


async def test_tls(start_server: Any, server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> None:
    server = start_server("search", ssl_context=server_context)
    async with await aio.connect(*server.address, ssl=client_context, server_hostname="localhost",
                                 timeout=5) as client:
        answers = await asyncio.gather(*(client.request(search("ring", id=i)) for i in range(200)))
        assert [a.id for a in answers] == list(range(200))
        assert all(a.json_content() == {"result": RING} for a in answers)


async def test_tls_certificate_not_trusted(start_server: Any, server_context: ssl.SSLContext,
                                           client_context: ssl.SSLContext) -> None:
    server = start_server("echo", ssl_context=server_context)
    with pytest.raises(CertificateVerificationError) as info:
        await aio.connect(*server.address, ssl=ssl.create_default_context(), timeout=5)
    assert isinstance(info.value, TLSError) and isinstance(info.value, ConnectionFailed)
    with pytest.raises(CertificateVerificationError):
        await aio.connect(*server.address, ssl=client_context, server_hostname="not-this-host.example",
                          timeout=5)
    # The failed handshakes did not hurt the server.
    async with await aio.connect(*server.address, ssl=client_context, timeout=5) as client:
        assert (await client.request(Frame.binary(b"ok"))).content == b"ok"


async def test_tls_client_on_a_plain_server(start_server: Any) -> None:
    # The plain server takes the ClientHello for the start of a frame and, at
    # its frame timeout, answers with an error frame: not TLS.
    server = start_server("echo", limits=Limits(frame_timeout=0.3))
    with pytest.raises(TLSError):
        await aio.connect(*server.address, ssl=ssl.create_default_context(), timeout=5)


# -- failures -----------------------------------------------------------------------


async def test_connect_refused() -> None:
    async with RawServer(lambda r, w: asyncio.sleep(0)) as raw:
        port = raw.port
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        await aio.connect("127.0.0.1", port, timeout=5)
    assert time.monotonic() - started < 2
    assert isinstance(info.value, ConnectionError) and isinstance(info.value, MulticonnError)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "refused" in str(info.value).lower()


async def test_connect_to_an_invalid_host_name() -> None:
    with pytest.raises(ConnectionFailed):
        await aio.connect("bad..host", 80, timeout=2)


async def test_server_closes_mid_request() -> None:
    """Five requests pending; the server answers two and closes."""
    async def answer_two_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = await read_frames(reader, 5)
        writer.write(b"".join(encode_frame(f) for f in frames[:2]))
        await writer.drain()

    async with RawServer(answer_two_then_close) as raw:
        async with await aio.connect("127.0.0.1", raw.port, timeout=5) as client:
            started = time.monotonic()
            results = await asyncio.gather(*(client.request(Frame.binary(b"%d" % i, id=i)) for i in range(5)),
                                           return_exceptions=True)
            assert time.monotonic() - started < 2
            assert [r.content for r in results[:2]] == [b"0", b"1"]
            for result in results[2:]:
                assert isinstance(result, ConnectionClosed), result
            assert client.closed and client.in_flight == 0
            with pytest.raises(ConnectionClosed):
                await client.request(Frame.binary(b"later"))


async def test_server_closes_mid_answer() -> None:
    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (frame,) = await read_frames(reader, 1)
        writer.write(encode_frame(frame)[:-3])
        await writer.drain()

    async with RawServer(half_answer) as raw:
        async with await aio.connect("127.0.0.1", raw.port, timeout=5) as client:
            with pytest.raises(ConnectionClosed):
                await client.request(Frame.binary(b"0123456789"))


async def test_threaded_server_stopped_while_requests_wait(start_server: Any) -> None:
    """A real server, shut down (gracefully, then its drain timeout) while a
    handler sleeps: the request answered before the stop is fine, the others
    fail with ConnectionClosed, none hangs."""
    release = threading.Event()

    def slow(request: Frame) -> Frame:
        if request.content == b"slow":
            release.wait(5)
        return Frame.binary(request.content)

    server = start_server(slow, handler_pool="thread", pool_size=2, limits=Limits(drain_timeout=0.2))
    async with await aio.connect(*server.address, timeout=5) as client:
        assert (await client.request(Frame.binary(b"fast"))).content == b"fast"
        tasks = [asyncio.ensure_future(client.request(Frame.binary(b"slow"))) for _ in range(3)]
        await asyncio.sleep(0.05)
        stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        release.set()
        await stopping
    assert all(isinstance(r, ConnectionClosed) for r in results), results


async def test_timeout_when_the_server_never_answers() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client closes

    async with RawServer(silent) as raw:
        async with await aio.connect("127.0.0.1", raw.port, timeout=0.3, max_in_flight=4) as client:
            started = time.monotonic()
            with pytest.raises(Timeout) as info:
                await client.request(Frame.binary(b"x"))
            assert 0.25 <= time.monotonic() - started < 1.5
            assert isinstance(info.value, TimeoutError) and isinstance(info.value, MulticonnError)
            assert "0.3" in str(info.value)
            with pytest.raises(Timeout):
                await client.request_many([Frame.binary(b"y")] * 3)
            # Abandoned requests keep their slots; a caller waiting for one times out too.
            assert client.in_flight == 4
            with pytest.raises(Timeout):
                await client.request(Frame.binary(b"z"))


async def test_a_late_answer_after_a_timeout_is_dropped(start_server: Any) -> None:
    def slow_first(request: Frame) -> Frame:
        if request.content == b"slow":
            time.sleep(0.4)
        return Frame.binary(request.content)

    server = start_server(slow_first, handler_pool="thread", pool_size=2)
    async with await aio.connect(*server.address, timeout=0.2) as client:
        with pytest.raises(Timeout):
            await client.request(Frame.binary(b"slow"))
        client.timeout = 5
        answer = await client.request(Frame.binary(b"fast"))
        assert answer.content == b"fast"  # not the late "slow"
        assert client.in_flight == 0


async def test_protocol_error_on_garbage() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frames(reader, 3)
        writer.write(b"\x00\x00")
        await reader.read()  # keep the connection open: the client must not need EOF

    async with RawServer(garbage) as raw:
        async with await aio.connect("127.0.0.1", raw.port, timeout=5) as client:
            results = await asyncio.gather(*(client.request(Frame.binary(b"x")) for _ in range(3)),
                                           return_exceptions=True)
            for result in results:
                assert isinstance(result, ProtocolError) and result.code == "bad-header-length"
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await client.request(Frame.binary(b"x"))


async def test_protocol_error_on_a_mismatched_id() -> None:
    async def wrong_id(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        (frame,) = await read_frames(reader, 1)
        writer.write(encode_frame(Frame.binary(frame.content, id=frame.id + 1)))
        await reader.read()

    async with RawServer(wrong_id) as raw:
        async with await aio.connect("127.0.0.1", raw.port, timeout=5) as client:
            with pytest.raises(ProtocolError) as info:
                await client.request(Frame.binary(b"x", id=1))
            assert "does not match" in str(info.value)


async def test_close_fails_pending_requests() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with RawServer(silent) as raw:
        client = await aio.connect("127.0.0.1", raw.port, timeout=5)
        task = asyncio.ensure_future(client.request(Frame.binary(b"x")))
        await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(ConnectionClosed):
            await task


# -- packaging ----------------------------------------------------------------------


def test_import_multiconn_does_not_load_aio() -> None:
    code = "import sys, multiconn; assert 'multiconn.aio' not in sys.modules; import multiconn.aio"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)

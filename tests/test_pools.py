"""Handler pools over real sockets: thread, process and async handlers.

What the issue promises and a user relies on: answers in request order with
their ids whatever order handlers finish in; fast connections unaffected by a
slow one; the per-connection and server-wide bounds (TCP backpressure, nothing
dropped); deadlines in every mode; a worker process that dies failing only its
own request; a client that goes away not costing the work it queued; SIGTERM
answering what is in the pools; and one-line refusals at start. The apps live
in ``tests/apps/pool_apps.py``, importable by name so that worker processes
and ``multiconn serve`` subprocesses can load them.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable

import pytest

from multiconn import Frame, Limits, encode_frame, encode_frames
from multiconn.transport import PAUSE_IN_FLIGHT, PAUSE_QUEUE
from multiconn.testing import ServerProcess

from helpers import APPS, cli_env, read_frames

sys.path.insert(0, str(APPS))
import pool_apps  # noqa: E402

#: (handler pool, app) for every mode that runs a handler outside the loop.
POOLED = [
    pytest.param("thread", pool_apps.slow, id="thread"),
    pytest.param("process", pool_apps.slow, id="process"),
    pytest.param("inline", pool_apps.async_slow, id="async"),
]


def command(text: str, id: Any = None) -> Frame:
    return Frame.binary(text.encode(), id=id)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.01)


def only_connection(server: Any) -> Any:
    wait_until(lambda: len(server.server.connections) == 1, 5.0, "the connection to be accepted")
    return next(iter(server.server.connections))


# -- order, ids, and the built-in apps --------------------------------------------


@pytest.mark.parametrize("pool, app", POOLED)
def test_answers_keep_request_order_when_handlers_finish_out_of_order(start_server, pool, app) -> None:
    server = start_server(app, handler_pool=pool, pool_size=4 if pool != "inline" else None)
    # Earlier requests sleep longer, so they finish last; ids of every JSON type.
    frames = [command(f"sleep:{0.05 * (8 - i):.2f}", id=i if i % 2 else f"r{i}") for i in range(8)]
    frames.append(command("now", id=99))
    with server.connect(timeout=10) as client:
        answers = client.request_many(frames)
    assert [a.id for a in answers] == [f.id for f in frames]
    assert [bytes(a.content) for a in answers] == [bytes(f.content) for f in frames]


@pytest.mark.parametrize("pool", ["thread", "process"])
@pytest.mark.parametrize("app", ["search", "echo"])
def test_builtin_apps_work_in_every_pool(start_server, pool, app) -> None:
    server = start_server(app, handler_pool=pool, pool_size=2)
    with server.connect(timeout=10) as client:
        answer = client.request(Frame.json({"action": "search", "value": "ring"}, id=7))
        assert answer.id == 7
        if app == "search":
            assert answer.json_content() == {"result": "In the caves beneath the Misty Mountains. \U0001f48d"}
        else:
            assert answer.json_content() == {"action": "search", "value": "ring"}
        bad = client.request_many([Frame({"content-type": "text/json", "content-encoding": "utf-8"}, b"{")],
                                  raise_errors=False)
        assert bad[0].error_info[0] == "bad-content"


def test_async_callable_object_is_detected(start_server) -> None:
    server = start_server(pool_apps.async_callable)
    assert server.server.responder.kind == "async"
    with server.connect(timeout=5) as client:
        assert client.request(command("sleep:0.01")).content == b"sleep:0.01"


# -- concurrency: the point of the pools ------------------------------------------


@pytest.mark.parametrize("pool, app", [POOLED[0], POOLED[2]])
def test_fast_connections_are_not_stalled_by_slow_handlers(start_server, pool, app) -> None:
    """One connection's handlers sleep 0.5 s each; four others keep their pace."""
    server = start_server(app, handler_pool=pool)
    slow = socket.create_connection(server.address)
    try:
        slow.sendall(encode_frames(command("sleep:0.5", id=i) for i in range(8)))
        time.sleep(0.05)  # the slow requests are in the pool
        latencies = []
        clients = [server.connect(timeout=5) for _ in range(4)]
        try:
            for _ in range(50):
                for client in clients:
                    start = time.monotonic()
                    assert client.request(command("fast")).content == b"fast"
                    latencies.append(time.monotonic() - start)
        finally:
            for client in clients:
                client.close()
        # 200 round trips while slow handlers run: none waited for them.
        assert max(latencies) < 0.25, f"a fast request took {max(latencies):.3f} s"
        answers = read_frames(slow, 8)
        assert [a.id for a in answers] == list(range(8))
    finally:
        slow.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_async_handlers_run_on_the_loop_asked_for(start_server, loop_kind: str) -> None:
    """``--async-loop``: the handlers' loop is asyncio's or uvloop's, and either
    runs 20 sleeping requests of one connection at once, answered in order."""
    if loop_kind == "uvloop":
        pytest.importorskip("uvloop")  # in the test extra; absent only where it does not build
    server = start_server(pool_apps.async_loop_name, async_loop=loop_kind)
    assert server.server.responder.loop_kind == loop_kind
    with socket.create_connection(server.address) as sock:
        start = time.monotonic()
        sock.sendall(encode_frames(command("sleep:0.2", id=i) for i in range(20)))
        answers = read_frames(sock, 20)
        took = time.monotonic() - start
    assert [a.id for a in answers] == list(range(20))
    expected = "uvloop.Loop" if loop_kind == "uvloop" else "asyncio"
    assert all(expected in a.content.decode() for a in answers), answers[0].content
    assert took < 2.0, f"took {took:.2f} s: the sleeps did not overlap"


def test_async_app_serves_a_thousand_sleeping_requests_concurrently(start_server) -> None:
    """1,000 requests over 20 connections, each awaiting 0.2 s: about 1 s, not 200 s."""
    server = start_server(pool_apps.async_slow)
    socks = [socket.create_connection(server.address) for _ in range(20)]
    try:
        start = time.monotonic()
        for sock in socks:
            sock.sendall(encode_frames(command("sleep:0.2", id=i) for i in range(50)))
        for sock in socks:
            answers = read_frames(sock, 50)
            assert [a.id for a in answers] == list(range(50))
        took = time.monotonic() - start
    finally:
        for sock in socks:
            sock.close()
    # max-in-flight (64) lets all 50 of a connection run at once.
    assert took < 3.0, f"took {took:.2f} s"


# -- bounds -----------------------------------------------------------------------


def test_max_in_flight_stops_reading_until_answers_go_out(start_server) -> None:
    server = start_server(pool_apps.slow, handler_pool="thread", pool_size=1,
                          limits=Limits(max_in_flight=4))
    with socket.create_connection(server.address) as sock:
        sock.sendall(encode_frames(command("sleep:0.1", id=i) for i in range(12)))
        transport = only_connection(server)
        wait_until(lambda: transport.reading_paused & PAUSE_IN_FLIGHT, 5.0, "reading to pause")
        # Never more than max-in-flight jobs for the connection.
        assert len(transport.session._jobs) == 4
        answers = read_frames(sock, 12)
        assert [a.id for a in answers] == list(range(12))
        wait_until(lambda: not transport.reading_paused, 5.0, "reading to resume")


def test_max_queued_bounds_the_whole_servers_queue(start_server) -> None:
    """Past --max-queued every connection stops reading; nothing is dropped."""
    server = start_server(pool_apps.slow, handler_pool="thread", pool_size=1,
                          limits=Limits(max_queued=6))
    responder = server.server.responder
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, responder.outstanding)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    socks = [socket.create_connection(server.address) for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(encode_frames(command("sleep:0.02", id=i) for i in range(10)))
        wait_until(lambda: len(server.server.connections) == 4, 5.0, "four connections")
        wait_until(lambda: all(t.reading_paused & PAUSE_QUEUE for t in server.server.connections), 5.0,
                   "every connection to pause for the queue")
        for sock in socks:
            assert [a.id for a in read_frames(sock, 10)] == list(range(10))
    finally:
        stop.set()
        sampler.join()
        for sock in socks:
            sock.close()
    assert peak <= 6 + 1  # max-queued waiting, plus the one running
    assert responder.outstanding == 0


# -- deadlines --------------------------------------------------------------------


@pytest.mark.parametrize("pool, app", POOLED)
def test_a_handler_past_the_deadline_is_answered_handler_error(start_server, pool, app) -> None:
    server = start_server(app, handler_pool=pool, pool_size=2 if pool != "inline" else None,
                          limits=Limits(handler_timeout=0.5))
    with server.connect(timeout=10) as client:
        start = time.monotonic()
        answers = client.request_many([command("sleep:30", id=1), command("after", id=2)], raise_errors=False)
        took = time.monotonic() - start
        code, message = answers[0].error_info
        assert (code, answers[0].id) == ("handler-error", 1)
        assert "longer than 0.5 s" in message
        assert bytes(answers[1].content) == b"after"
        assert took < 3.0
        # The pool keeps its size: more requests are served.
        assert [bytes(a.content) for a in client.request_many([command("x"), command("y")])] == [b"x", b"y"]
    if pool == "thread":
        assert server.server.responder.abandoned == 1
        assert len(server.server.responder._workers) == 2


def test_sigkill_of_a_worker_mid_request(start_server) -> None:
    """SIGKILL from outside, as the OOM killer would: that request fails with the
    signal's name, the pool is rebuilt, every other request is answered."""
    server = start_server(pool_apps.slow, handler_pool="process", pool_size=2)
    responder = server.server.responder
    with socket.create_connection(server.address) as sock:
        sock.sendall(encode_frame(command("sleep:5", id="victim")))
        wait_until(lambda: any(w.job is not None for w in responder._workers), 5.0, "the request to start")
        victim = next(w for w in responder._workers if w.job is not None)
        sock.sendall(encode_frames(command("sleep:0.05", id=i) for i in range(6)))
        time.sleep(0.1)
        os.kill(victim.process.pid, signal.SIGKILL)
        answers = read_frames(sock, 7)
    code, message = answers[0].error_info
    assert (code, answers[0].id) == ("handler-error", "victim")
    assert "SIGKILL" in message
    assert [a.id for a in answers[1:]] == list(range(6))
    assert all(a.error_info is None for a in answers[1:])
    wait_until(lambda: len(responder._workers) == 2 and all(w.ready for w in responder._workers), 10.0,
               "the pool to be rebuilt")
    assert responder.restarts == 1


def test_a_worker_that_exits_fails_its_request_with_the_exit_code(start_server) -> None:
    server = start_server(pool_apps.slow, handler_pool="process", pool_size=1)
    with server.connect(timeout=10) as client:
        answers = client.request_many([command("exit:3", id=1), command("after", id=2)], raise_errors=False)
    code, message = answers[0].error_info
    assert code == "handler-error" and "exited with code 3" in message
    assert answers[1].content == b"after"


# -- a client that goes away --------------------------------------------------------


def test_a_client_that_resets_with_100_queued_requests_costs_little(start_server, tmp_path) -> None:
    """Requests not started when the client resets are never run."""
    server = start_server(pool_apps.slow, handler_pool="thread", pool_size=1,
                          limits=Limits(frame_timeout=1.0))  # sweeps every 0.25 s
    sock = socket.create_connection(server.address)
    frames = []
    for i in range(100):
        frames.append(command("sleep:0.05"))
        frames.append(command(f"touch:{tmp_path / str(i)}"))
    sock.sendall(encode_frames(frames[:200]))
    time.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset
    wait_until(lambda: not server.server.connections, 5.0, "the server to drop the connection")
    time.sleep(0.5)
    ran = len(list(tmp_path.iterdir()))
    assert ran < 20, f"{ran} of 100 requests ran after the client left"
    assert server.server.responder.outstanding == 0


@pytest.mark.parametrize("pool, app", POOLED)
def test_half_close_still_answers_every_request(start_server, pool, app) -> None:
    server = start_server(app, handler_pool=pool, pool_size=2 if pool != "inline" else None)
    with socket.create_connection(server.address) as sock:
        sock.sendall(encode_frames(command("sleep:0.1", id=i) for i in range(5)))
        sock.shutdown(socket.SHUT_WR)
        answers = read_frames(sock, 5)
        assert [a.id for a in answers] == list(range(5))
        assert sock.recv(1) == b""  # then the server closes


# -- the command line -----------------------------------------------------------------


@pytest.mark.parametrize("pool, app", [("thread", "pool_apps:slow"), ("process", "pool_apps:slow"),
                                       ("inline", "pool_apps:async_slow")])
def test_sigterm_answers_requests_in_the_pools_and_exits_0(pool, app) -> None:
    with ServerProcess("--app", app, "--handler-pool", pool, env=cli_env()) as server:
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(encode_frames(command("sleep:0.5", id=i) for i in range(4)))
            time.sleep(0.2)  # in the pool
            server.signal(signal.SIGTERM)
            answers = read_frames(sock, 4)
            assert [bytes(a.content) for a in answers] == [b"sleep:0.5"] * 4
            assert [a.id for a in answers] == list(range(4))
        assert server.wait(15) == 0
    assert "Traceback" not in server.stderr, server.stderr


def test_an_unpicklable_app_is_refused_at_start_by_the_process_pool() -> None:
    result = _run_serve("--app", "pool_apps:unpicklable", "--handler-pool", "process")
    assert result.returncode == 2
    assert "cannot be pickled" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # usage, then the one-line reason


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_an_async_app_with_a_pool_is_refused(pool) -> None:
    result = _run_serve("--app", "pool_apps:async_slow", "--handler-pool", pool)
    assert result.returncode == 2
    assert "async" in result.stderr.splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_pool_size_without_a_pool_is_refused() -> None:
    result = _run_serve("--pool-size", "4")
    assert result.returncode == 2 and "--pool-size needs --handler-pool" in result.stderr


def _run_serve(*args: str) -> Any:
    import subprocess

    return subprocess.run([sys.executable, "-m", "multiconn", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=30, env=cli_env())


def test_an_async_handler_that_blocks_its_loop_is_answered_at_the_deadline(start_server, caplog) -> None:
    """time.sleep in an async def holds the asyncio loop, so asyncio cannot time
    it out; the server's own loop answers it handler-error at the deadline."""
    server = start_server(pool_apps.async_blocking, limits=Limits(handler_timeout=0.5))
    with server.connect(timeout=10) as client:
        start = time.monotonic()
        (answer,) = client.request_many([command("sleep:3", id="blocked")], raise_errors=False)
        took = time.monotonic() - start
    code, message = answer.error_info
    assert (code, answer.id) == ("handler-error", "blocked") and "blocked" in message
    assert took < 2.0, took
    assert any("blocks its event loop" in r.getMessage() for r in caplog.records)

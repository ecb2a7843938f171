"""Tests of the ``multiconn`` command line, run as real subprocesses.

Every CLI run is ``[sys.executable, "-m", "multiconn", ...]``. Servers are
`multiconn.testing.ServerProcess` (``serve --port 0``, its port read from the
INFO line ``listening on 127.0.0.1:PORT (app ...)`` on stderr, stderr drained
by a thread so a chatty server never blocks on a full pipe). Every process is
stopped and waited for by a fixture, even when a test fails.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from multiconn import connect
from multiconn.errors import ServerStartError
from multiconn.protocol import Frame, FrameDecoder, encode_frame, encode_frames
from multiconn.testing import ServerProcess

from helpers import cli_env, free_port


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


# -- helpers ------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run the CLI to completion (killed by subprocess.run if it overruns)."""
    result = subprocess.run(
        [sys.executable, "-m", "multiconn", *args],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env or cli_env(),
    )
    result.stdout = result.stdout.decode("utf-8", "replace")
    result.stderr = result.stderr.decode("utf-8", "replace")
    return result


@pytest.fixture
def serve(serve: Any) -> Any:
    """The shared fixture (conftest.py), with the CLI tests' environment by default."""
    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        return serve(*args, env=env or cli_env())
    return start


APPS_MODULE = '''
import time

from multiconn.protocol import Frame


def handler(request):
    """A custom app: says who answered and what it got."""
    if request.is_json:
        value = request.json_content().get("value")
        return Frame.json({"result": f"custom handler saw {value}"})
    return Frame.binary(b"custom handler saw " + request.content)


def boom(request):
    raise ValueError("the test app always fails")


def slow(request):
    """Sleeps float(content) seconds, then echoes the content."""
    time.sleep(float(request.content.decode() or "0"))
    return Frame.binary(request.content)
'''


@pytest.fixture
def apps_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "mc_test_apps.py").write_text(textwrap.dedent(APPS_MODULE), encoding="utf-8")
    return cli_env(tmp_path)


def read_frames(sock: socket.socket, decoder: FrameDecoder, count: int | None = None) -> list[Frame]:
    """Read `count` frames, or (count None) every frame until EOF."""
    frames: list[Frame] = []
    while count is None or len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        frames.extend(decoder.feed(data))
    return frames


def open_session(port: int) -> tuple[socket.socket, FrameDecoder]:
    """A raw connection that has completed one round trip with the `slow` app.

    After it the connection is surely accepted and the server's loop (and so its
    signal handlers) is running.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    decoder = FrameDecoder()
    try:
        sock.sendall(encode_frame(Frame.binary(b"0", id="warm-up")))
        [answer] = read_frames(sock, decoder, 1)
        assert (answer.id, answer.content) == ("warm-up", b"0")
    except BaseException:
        sock.close()
        raise
    return sock, decoder


def stuff_without_reading(port: int) -> socket.socket:
    """Connect to an echo server and send until it stops reading us.

    The client never reads, with a small receive buffer, so the server's echoes
    pile up in its pending output; past the high-water mark (1 MiB) the server
    stops reading this connection and our sends block. Returns the socket once
    no byte went out for 0.5 s.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        chunk = encode_frame(Frame.binary(b"z" * (256 * 1024)))
        view = memoryview(chunk)
        total = 0
        last_progress = time.monotonic()
        while time.monotonic() - last_progress < 0.5:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            total += sent
            last_progress = time.monotonic()
            view = view[sent:] or memoryview(chunk)
            assert total < 512 * 1024 * 1024, "the server kept reading: no backpressure?"
        assert total > 1024 * 1024
    except BaseException:
        sock.close()
        raise
    return sock


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# -- serve + request --------------------------------------------------------------


@pytest.fixture(scope="module")
def search_port() -> Iterator[int]:
    with ServerProcess(env=cli_env()) as process:  # default app: search
        assert "(app search)" in process.stderr
        yield process.port


@pytest.mark.parametrize(
    "action, value, expected",
    [
        ("search", "ring", "In the caves beneath the Misty Mountains. \U0001f48d"),
        ("search", "morpheus", "Follow the white rabbit. \U0001f430"),
        ("search", "\U0001f436", "\U0001f43e Playing ball! \U0001f3d0"),
        ("search", "nothing", "No match for 'nothing'."),
        ("hello", "world", "First 10 bytes of request: helloworld"),
        ("binary", "0123456789abcdef", "First 10 bytes of request: binary0123"),
    ],
)
def test_request_prints_the_answer(search_port: int, action: str, value: str, expected: str) -> None:
    result = run_cli("request", "--port", str(search_port), action, value)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert result.stderr == ""


def test_request_with_an_invalid_action(search_port: int) -> None:
    # `request` only sends JSON for "search"; another JSON action goes through the library.
    with connect("127.0.0.1", search_port, timeout=5) as client:
        answer = client.request(Frame.json({"action": "find", "value": "ring"}))
    assert answer.json_content() == {"result": "Error: invalid action 'find'."}


# -- help and usage errors -----------------------------------------------------------


def test_top_level_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: multiconn")
    assert "serve" in result.stdout and "request" in result.stdout
    assert result.stderr == ""


def test_serve_help_lists_every_flag() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: multiconn serve")
    for flag in ("--host", "--port", "--app", "--max-content", "--frame-timeout", "--idle-timeout",
                 "--max-connections", "--drain-timeout", "--log-level"):
        assert flag in result.stdout, flag


def test_request_help_lists_every_flag() -> None:
    result = run_cli("request", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: multiconn request")
    for flag in ("--host", "--port", "--timeout"):
        assert flag in result.stdout, flag
    assert "action" in result.stdout and "value" in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "multiconn 0.1.0"


def test_server_process_says_why_a_server_did_not_start() -> None:
    server = ServerProcess("--app", "nosuchapp", env=cli_env())
    with pytest.raises(ServerStartError, match=r"exited with status 2 at start: .*nosuchapp"):
        server.start()
    assert not server.alive()
    assert server.stop() == 2  # already stopped: says how it ended


@pytest.mark.parametrize(
    "args, expected",
    [
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--port", "0", "--frame-timeout", "-1"], "--frame-timeout"),
        (["serve", "--port", "0", "--idle-timeout", "abc"], "--idle-timeout"),
        (["serve", "--port", "0", "--max-connections", "0"], "--max-connections"),
        (["serve", "--port", "0", "--app", "nosuchapp"], "nosuchapp"),
        (["serve", "--port", "0", "--app", "nosuchmodule:app"], "nosuchmodule"),
        (["serve", "--port", "0", "--log-level", "loud"], "--log-level"),
        (["request", "search"], "value"),
        (["request", "--timeout", "0", "search", "x"], "--timeout"),
        ([], "COMMAND"),
    ],
)
def test_bad_usage_exits_2_with_a_readable_message(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "error:" in result.stderr
    assert expected in result.stderr
    assert result.stderr.startswith("usage: multiconn")
    assert_no_traceback(result.stderr)


def test_request_to_a_port_with_nothing_listening() -> None:
    port = free_port()
    result = run_cli("request", "--port", str(port), "search", "ring")
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("multiconn request: ")
    assert f"127.0.0.1:{port}" in lines[0]
    assert "refused" in lines[0].lower()
    assert_no_traceback(result.stderr)


def test_request_to_a_malformed_host_name() -> None:
    # "bad..host" fails in the idna codec before any lookup: no network traffic.
    result = run_cli("request", "--host", "bad..host", "--port", "1", "search", "ring")
    assert result.returncode == 1
    assert result.stdout == ""
    assert_no_traceback(result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("multiconn request: ")
    assert "bad..host" in lines[0]


def test_serve_on_a_malformed_host_name() -> None:
    result = run_cli("serve", "--host", "bad..host", "--port", "0")
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("multiconn serve: cannot listen on bad..host:0: ")


def test_serve_on_a_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=1) as busy:
        port = busy.getsockname()[1]
        result = run_cli("serve", "--port", str(port), "--log-level", "info")
    assert result.returncode == 1
    assert_no_traceback(result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"multiconn serve: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in lines[0]


# -- custom applications ------------------------------------------------------------


def test_serve_a_custom_app(serve: Any, apps_env: dict[str, str]) -> None:
    server = serve("--app", "mc_test_apps:handler", env=apps_env)
    assert "(app handler)" in server.stderr
    result = run_cli("request", "--port", str(server.port), "search", "ring", env=apps_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "custom handler saw ring\n"
    result = run_cli("request", "--port", str(server.port), "raw", "bytes", env=apps_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "custom handler saw rawbytes\n"


def test_an_app_that_raises_gives_handler_error(serve: Any, apps_env: dict[str, str]) -> None:
    server = serve("--app", "mc_test_apps:boom", env=apps_env)
    result = run_cli("request", "--port", str(server.port), "search", "ring", env=apps_env)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "handler-error" in lines[0]
    assert "the test app always fails" in lines[0]
    assert_no_traceback(result.stderr)
    # the server survives and logs a warning, not a traceback (log level info)
    server.signal(signal.SIGTERM)
    assert server.wait(5) == 0
    assert "WARNING multiconn.server: handler boom raised ValueError" in server.stderr
    assert_no_traceback(server.stderr)


def test_app_not_callable_is_a_usage_error(apps_env: dict[str, str]) -> None:
    result = run_cli("serve", "--port", "0", "--app", "mc_test_apps:time", env=apps_env)
    assert result.returncode == 2
    assert "not callable" in result.stderr
    assert_no_traceback(result.stderr)
    result = run_cli("serve", "--port", "0", "--app", "mc_test_apps:missing", env=apps_env)
    assert result.returncode == 2
    assert "missing" in result.stderr
    assert_no_traceback(result.stderr)


# -- shutdown -----------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_an_idle_server_with_exit_0(serve: Any, signum: int) -> None:
    server = serve()
    result = run_cli("request", "--port", str(server.port), "search", "ring")
    assert result.returncode == 0
    server.signal(signum)
    assert server.wait(5) == 0
    assert f"{signal.Signals(signum).name}: stopping" in server.stderr
    assert server.lines[-1].endswith("INFO multiconn.server: stopped")
    assert_no_traceback(server.stderr)


def test_sigterm_answers_every_request_in_flight(serve: Any, apps_env: dict[str, str]) -> None:
    server = serve("--app", "mc_test_apps:slow", env=apps_env)
    sock, decoder = open_session(server.port)
    with sock:
        frames = [Frame.binary(b"0.05", id=i) for i in range(40)]  # ~2 s of handler time
        sock.sendall(encode_frames(frames))
        server.signal(signal.SIGTERM)
        t0 = time.monotonic()
        answers = read_frames(sock, decoder)  # until the server closes
    assert [a.id for a in answers] == list(range(40))
    assert all(a.content == b"0.05" and a.error_info is None for a in answers)
    assert server.wait(5) == 0
    assert time.monotonic() - t0 < 6
    assert "SIGTERM: stopping" in server.stderr
    assert_no_traceback(server.stderr)


def test_partial_frame_is_dropped_on_sigterm(serve: Any, apps_env: dict[str, str]) -> None:
    server = serve("--app", "mc_test_apps:slow", env=apps_env)
    sock, decoder = open_session(server.port)
    with sock:
        whole = encode_frame(Frame.binary(b"0", id="whole"))
        partial = encode_frame(Frame.binary(b"0", id="partial"))[:-3]
        sock.sendall(whole + partial)
        time.sleep(0.1)
        server.signal(signal.SIGTERM)
        answers = read_frames(sock, decoder)
    assert [a.id for a in answers] == ["whole"]
    assert server.wait(5) == 0
    assert_no_traceback(server.stderr)


def test_after_sigterm_new_connections_are_refused_and_a_second_signal_aborts(serve: Any) -> None:
    """Drain is held up by a client that never reads (backpressure, not a
    blocked handler); the listener is closed meanwhile, and a second SIGTERM
    ends the process at once instead of after the 10 s drain timeout."""
    server = serve("--app", "echo")
    port = server.port
    stuck = stuff_without_reading(port)
    with stuck:
        server.signal(signal.SIGTERM)
        refused = False
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                probe = socket.create_connection(("127.0.0.1", port), timeout=1)
            except ConnectionRefusedError:
                refused = True
                break
            probe.close()  # the signal was not handled yet: try again
            time.sleep(0.02)
        assert refused, "the listener was still accepting connections after SIGTERM"
        time.sleep(0.2)
        assert server.proc.poll() is None, "the server should still be draining the stuck connection"
        server.signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = server.wait(5)
        elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"second SIGTERM took {elapsed:.2f} s to end the server"
    assert code == 0
    assert "second SIGTERM: aborting" in server.stderr
    assert_no_traceback(server.stderr)


def test_sigint_then_sigterm_aborts_too(serve: Any) -> None:
    server = serve("--app", "echo")
    stuck = stuff_without_reading(server.port)
    with stuck:
        server.signal(signal.SIGINT)
        time.sleep(0.3)
        assert server.proc.poll() is None
        server.signal(signal.SIGTERM)
        t0 = time.monotonic()
        server.wait(5)
        assert time.monotonic() - t0 < 1.0
    assert "SIGINT: stopping" in server.stderr
    assert "second SIGTERM: aborting" in server.stderr
    assert_no_traceback(server.stderr)


def test_second_sigterm_aborts_a_long_running_handler(serve: Any, apps_env: dict[str, str]) -> None:
    """Handlers run inline, so the loop is blocked in the handler: the second
    signal must still end the process at once, not when the handler returns."""
    server = serve("--app", "mc_test_apps:slow", env=apps_env)
    sock, decoder = open_session(server.port)
    with sock:
        sock.sendall(encode_frame(Frame.binary(b"2", id="long")))  # a 2 s handler
        time.sleep(0.2)
        server.signal(signal.SIGTERM)
        time.sleep(0.2)
        assert server.proc.poll() is None
        server.signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = server.wait(5)
        elapsed = time.monotonic() - t0
        try:
            leftovers = read_frames(sock, decoder)  # aborted: closed without the answer
        except ConnectionResetError:
            leftovers = []
    assert elapsed < 1.0, f"the server exited {elapsed:.2f} s after the second SIGTERM"
    assert code == 0
    assert leftovers == []
    assert "second SIGTERM: aborting" in server.stderr
    assert_no_traceback(server.stderr)


def test_drain_timeout_aborts_a_connection_that_cannot_finish(serve: Any) -> None:
    server = serve("--app", "echo", "--drain-timeout", "0.5")
    stuck = stuff_without_reading(server.port)
    with stuck:
        server.signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = server.wait(5)
        elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 2.5, f"exited {elapsed:.2f} s after SIGTERM with --drain-timeout 0.5"
    assert code == 0
    assert "SIGTERM: stopping (up to 0.5 s to drain)" in server.stderr
    assert "drain timeout: aborting 1 connections" in server.stderr
    assert_no_traceback(server.stderr)

"""The handler deadline: a hung handler is interrupted and others are served."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import multiconn
from multiconn import ErrorCode, ErrorResponse, Frame

HANG_APP = textwrap.dedent(
    """
    import time
    from multiconn import Frame

    def handler(request):
        if request.content == b"sleep":
            time.sleep(60)
        if request.content == b"spin":
            while True:
                pass
        return Frame.binary(request.content)
    """
)


@pytest.fixture
def hang_server(tmp_path):
    (tmp_path / "hangapp.py").write_text(HANG_APP)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "multiconn", "serve", "--port", "0", "--app", "hangapp:handler",
         "--handler-timeout", "0.5"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = process.stderr.readline()
        port = int(line.split("127.0.0.1:")[1].split()[0])
        yield port, process
    finally:
        process.terminate()
        try:
            process.wait(10)
        finally:
            process.kill()
            process.stderr.close()


@pytest.mark.parametrize("hang", [b"sleep", b"spin"])
def test_hung_handler_is_interrupted_and_the_connection_kept(hang_server, hang) -> None:
    port, _ = hang_server
    with multiconn.connect("127.0.0.1", port, timeout=10) as client:
        started = time.monotonic()
        with pytest.raises(ErrorResponse) as info:
            client.request(Frame.binary(hang, id=1))
        assert info.value.code == ErrorCode.HANDLER_ERROR
        assert "0.5 s" in info.value.message
        assert info.value.frame.id == 1
        assert time.monotonic() - started < 5
        assert client.request(Frame.binary(b"after")).content == b"after"


def test_others_wait_no_longer_than_the_deadline(hang_server) -> None:
    port, _ = hang_server
    waited: list[float] = []

    def other() -> None:
        time.sleep(0.1)  # let the hanging request go first
        started = time.monotonic()
        with multiconn.connect("127.0.0.1", port, timeout=10) as client:
            assert client.request(Frame.binary(b"x")).content == b"x"
        waited.append(time.monotonic() - started)

    thread = threading.Thread(target=other)
    thread.start()
    with multiconn.connect("127.0.0.1", port, timeout=10) as client:
        with pytest.raises(ErrorResponse):
            client.request(Frame.binary(b"sleep"))
    thread.join(10)
    assert waited and waited[0] < 3.0


def test_server_still_exits_cleanly_after_interrupts(hang_server) -> None:
    port, process = hang_server
    with multiconn.connect("127.0.0.1", port, timeout=10) as client:
        with pytest.raises(ErrorResponse):
            client.request(Frame.binary(b"spin"))
    process.terminate()
    assert process.wait(10) == 0
    assert "Traceback" not in process.stderr.read()

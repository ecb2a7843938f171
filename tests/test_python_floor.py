"""The benchmarks' Python floor (benchmarks/peers/python_floor.py) is a correct
raw echo server, so that what light_load.py and the shared harness measure
against it is a server's cost, not a shortcut's: every byte comes back, in
order, also when the client reads late and the server's sends come up short."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import free_port

FLOOR = Path(__file__).resolve().parent.parent / "benchmarks" / "peers" / "python_floor.py"


@pytest.fixture
def floor_port() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(FLOOR), "--port", str(port), "--mode", "raw"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"python_floor.py did not listen: {proc.communicate()}") from None
                time.sleep(0.05)
        yield port
        assert proc.poll() is None, "the server died"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_small_messages_are_echoed_on_many_connections(floor_port: int) -> None:
    clients = [socket.create_connection(("127.0.0.1", floor_port), timeout=5) for _ in range(20)]
    try:
        for round_ in range(50):
            for i, client in enumerate(clients):
                client.sendall(b"%02d:%03d" % (i, round_))
            for i, client in enumerate(clients):
                assert client.recv(64) == b"%02d:%03d" % (i, round_)
    finally:
        for client in clients:
            client.close()


def test_a_late_reader_gets_every_byte_in_order(floor_port: int) -> None:
    """5 MB sent before a byte is read: the server's sends come up short and
    its reading pauses; nothing is lost once the client reads."""
    data = bytes(range(256)) * 20_000
    with socket.create_connection(("127.0.0.1", floor_port), timeout=10) as client:
        sender = threading.Thread(target=client.sendall, args=(data,))
        sender.start()
        time.sleep(0.5)
        received = bytearray()
        while len(received) < len(data):
            chunk = client.recv(65536)
            assert chunk, "the server closed early"
            received += chunk
        sender.join(10)
    assert bytes(received) == data


def test_a_closed_client_is_forgotten(floor_port: int) -> None:
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", floor_port), timeout=5) as client:
            client.sendall(b"bye")
            assert client.recv(16) == b"bye"
    with socket.create_connection(("127.0.0.1", floor_port), timeout=5) as client:
        client.sendall(b"still here")
        assert client.recv(16) == b"still here"


def test_framed_mode_is_refused() -> None:
    done = subprocess.run([sys.executable, str(FLOOR), "--port", "1", "--mode", "framed"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "raw echo only" in done.stderr

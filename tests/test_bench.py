"""Smoke tests of ``multiconn bench`` over real loopback sockets.

Each test runs the command as a user would (``python -m multiconn bench``, a
fresh process) for a fraction of a second: what is checked is the contract
(exit status, the JSON keys, errors counted, no traceback), not the numbers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

import pytest

from multiconn import Frame

from helpers import free_port

SHORT = ["--duration", "0.3", "--warmup", "0.1"]
JSON_KEYS = {
    "mode", "connections", "size", "pipeline", "processes", "duration_s", "requests", "errors",
    "rps", "mbps", "latency_us", "server_cpu_us_per_request", "error_samples",
}


def bench(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multiconn", "bench", *args],
                          capture_output=True, text=True, timeout=timeout)


def bench_json(*args: str) -> tuple[int, dict[str, Any]]:
    done = bench(*SHORT, "--json", *args)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    return done.returncode, json.loads(lines[0])


def test_embedded_framed_server() -> None:
    status, result = bench_json("--connections", "4")
    assert status == 0, result
    assert set(result) == JSON_KEYS
    assert result["requests"] > 0 and result["errors"] == 0 and result["error_samples"] == []
    assert result["server_cpu_us_per_request"] > 0
    assert (result["mode"], result["connections"], result["duration_s"]) == ("framed", 4, 0.3)
    latency = result["latency_us"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p999"] <= latency["max"]


def test_embedded_raw_server_pipelined_two_processes() -> None:
    status, result = bench_json("--connections", "4", "--mode", "raw", "--pipeline", "4", "--processes", "2")
    assert status == 0, result
    assert (result["mode"], result["pipeline"], result["processes"]) == ("raw", 4, 2)
    assert result["requests"] > 0 and result["errors"] == 0
    assert result["server_cpu_us_per_request"] > 0


def test_external_server_and_table(start_server: Any) -> None:
    server = start_server("echo")
    done = bench(*SHORT, "--port", str(server.port), "--connections", "3", "--pipeline", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    for label in ("requests", "req/s", "MB/s", "latency p50", "latency p99.9", "errors"):
        assert label in done.stdout
    assert "server CPU" not in done.stdout  # not our server: its CPU is not ours to read
    assert done.stderr == ""  # no progress line when stderr is not a TTY


def test_differently_spelled_frames_are_verified_by_decoding(start_server: Any) -> None:
    # A valid echo whose header bytes differ from the request's (key order, an
    # extra key): the byte-compare fast path fails and the decoder takes over.
    def echo_reordered(request: Frame) -> Frame:
        return Frame({"x-note": "reordered", "content-encoding": "binary", "content-type": "binary/octet-stream"},
                     request.content)

    server = start_server(echo_reordered)
    status, result = bench_json("--port", str(server.port), "--connections", "2", "--pipeline", "3")
    assert status == 0, result
    assert result["requests"] > 0 and result["errors"] == 0
    assert result["server_cpu_us_per_request"] is None


def test_wrong_answers_are_errors(start_server: Any) -> None:
    def corrupt(request: Frame) -> Frame:
        content = bytes([request.content[0] ^ 0xFF]) + request.content[1:] if request.content else b"x"
        return Frame.binary(content)

    server = start_server(corrupt)
    status, result = bench_json("--port", str(server.port), "--connections", "3")
    assert status == 1
    assert result["errors"] == 3  # each connection fails on its first response and is closed
    assert result["requests"] == 0
    [sample] = result["error_samples"]
    assert sample.startswith("mismatch: connection ") and "differs from the request at byte 0" in sample


def test_silent_server_times_out() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts (backlog), never answers
        port = listener.getsockname()[1]
        status, result = bench_json("--port", str(port), "--connections", "2", "--timeout", "0.2")
    assert status == 1
    assert result["errors"] == 2 and result["requests"] == 0
    assert result["error_samples"][0].startswith("timeout: connection ")


@pytest.mark.parametrize("args", [
    ["--connections", "0"], ["--size", "-1"], ["--mode", "raw", "--size", "0"], ["--pipeline", "0"],
    ["--duration", "0"], ["--warmup", "-1"], ["--processes", "0"], ["--processes", "3", "--connections", "2"],
    ["--mode", "tcp"], ["--timeout", "0"], ["--port", "0"],
])
def test_bad_flags_exit_2(args: list[str]) -> None:
    from multiconn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2


def test_no_server_exits_1_without_traceback() -> None:
    port = free_port()
    done = bench(*SHORT, "--port", str(port), "--json")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"multiconn bench: cannot connect to 127.0.0.1:{port}: Connection refused"
    ]


def test_raw_mode_verifies_bytes() -> None:
    import threading

    def flipping_echo(listener: socket.socket) -> None:  # echoes with the last byte of each read flipped
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data[:-1] + bytes([data[-1] ^ 1]))

    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=flipping_echo, args=(listener,), daemon=True)
        thread.start()
        status, result = bench_json("--port", str(listener.getsockname()[1]), "--mode", "raw",
                                    "--connections", "1", "--size", "10")
    thread.join(5)
    assert status == 1 and result["errors"] == 1
    assert result["error_samples"] == ["mismatch: connection 1: response 1: echoed bytes differ "
                                       "from the request at byte 9 of 10"]

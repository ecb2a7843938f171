"""What the tests share: a free port, exact reads, raw frames, the error-frame check.

``from helpers import ...`` in any test module (pytest puts tests/ on the path).
The wire-level pieces are those of `reference_codec`, written without
multiconn's codec, so that malformed bytes are built, and answers checked,
independently of the code under test. `read_frames` is the exception, for
tests of what comes above the codec (answer order, ids, pools, the PROXY
stage): it decodes with multiconn's own `FrameDecoder`, which
tests/test_protocol.py and the reference codec's users hold to the protocol.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from multiconn import Frame, FrameDecoder

from reference_codec import NO_ID, PeerClosed, check_error_frame, header_bytes, raw_frame, recv_exactly

__all__ = ["APPS", "NO_ID", "PeerClosed", "assert_error_frame", "cli_env", "free_port", "header_bytes",
           "raw_frame", "read_frames", "recv_exactly"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port with nothing listening on it (bound once, then released)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def assert_error_frame(frame: Any, code: str, request_id: Any = None) -> str:
    """`frame` (a `multiconn.Frame`) is the exact error frame of docs/protocol.md
    ("Errors") with `code`, carrying `request_id` (None: no ``id`` key); its message."""
    expected_id = NO_ID if request_id is None else request_id
    return check_error_frame(frame.header, bytes(frame.content), code, expected_id)[1]


#: Applications the tests load by name (``pool_apps:slow``), in subprocesses too.
APPS = Path(__file__).parent / "apps"


def cli_env(*pythonpath: Path) -> dict[str, str]:
    """The environment of a ``multiconn`` subprocess: UTF-8 output, no inherited
    warning filters, and tests/apps (and `pythonpath`) importable."""
    env = dict(os.environ)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a module rewritten within a second is read again
    env.pop("PYTHONWARNINGS", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, pythonpath), str(APPS), env.get("PYTHONPATH")]))
    return env


def read_frames(sock: socket.socket, count: int, timeout: float = 10.0) -> list[Frame]:
    """Exactly `count` frames from a blocking socket; fails on EOF, a timeout, or bytes left over."""
    sock.settimeout(timeout)
    decoder = FrameDecoder(max_content=1 << 30)
    frames: list[Frame] = []
    while len(frames) < count:
        data = sock.recv(65536)
        assert data, f"EOF after {len(frames)} of {count} frames"
        frames += decoder.feed(data)
    assert len(frames) == count and decoder.buffered == 0, f"{len(frames)} frames, {decoder.buffered} bytes more"
    return frames

"""What the tests share: a free port, exact reads, raw frames, the error-frame check.

``from helpers import ...`` in any test module (pytest puts tests/ on the path).
The wire-level pieces are those of `reference_codec`, written without
multiconn's codec, so that malformed bytes are built, and answers checked,
independently of the code under test.
"""

from __future__ import annotations

import socket
from typing import Any

from reference_codec import NO_ID, PeerClosed, check_error_frame, header_bytes, raw_frame, recv_exactly

__all__ = ["NO_ID", "PeerClosed", "assert_error_frame", "free_port", "header_bytes", "raw_frame", "recv_exactly"]


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

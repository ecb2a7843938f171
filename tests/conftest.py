"""Shared fixtures: real servers on ephemeral loopback ports."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest

from multiconn.server import raise_nofile_limit
from multiconn.testing import ServerProcess, ServerThread

raise_nofile_limit()  # 1,000-connection tests hold both ends in this process


@pytest.fixture
def start_server() -> Iterator[Any]:
    """``start_server(app, limits=...)`` -> a running `ServerThread`, stopped after the test."""
    with contextlib.ExitStack() as stack:
        def start(app: Any = "echo", **kwargs: Any) -> ServerThread:
            return stack.enter_context(ServerThread(app, **kwargs))
        yield start


@pytest.fixture
def serve() -> Iterator[Any]:
    """``serve(*args, **popen_args)`` -> a started `ServerProcess`
    (``multiconn serve --port 0 ARGS`` in a subprocess), stopped after the test."""
    with contextlib.ExitStack() as stack:
        def start(*args: str, **popen_args: Any) -> ServerProcess:
            return stack.enter_context(ServerProcess(*args, **popen_args))
        yield start

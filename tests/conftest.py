"""Shared fixtures: real servers on ephemeral loopback ports."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any, Iterator

import pytest
import trustme

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


# -- TLS: one test CA for the session, a server and a client context from it -------


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context

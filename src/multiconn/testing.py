"""Helpers for testing applications against a real multiconn server.

``with ServerThread(my_app) as server: client = server.connect()`` runs a real
server on an ephemeral loopback port in a background thread, so an
application's tests exercise the same sockets and framing as production.
"""

from __future__ import annotations

import threading
from typing import Any, Union

from .apps import App, RawEcho
from .client import Client, connect
from .limits import Limits
from .server import Server


class ServerThread:
    """A `Server` on 127.0.0.1 and a free port, running in a daemon thread."""

    def __init__(self, app: Union[App, RawEcho, str] = "echo", *, host: str = "127.0.0.1",
                 limits: Limits = Limits(), **server_args: Any) -> None:
        self.server = Server(app, host, 0, limits=limits, **server_args)
        self._thread = threading.Thread(target=self._run, name="multiconn-server", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.serve_forever(handle_signals=False)
        except BaseException as exc:  # kept for the test to see
            self.error = exc
            raise

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    @property
    def port(self) -> int:
        return self._address[1]

    def connect(self, **client_args: Any) -> Client:
        return connect(*self._address, **client_args)

    def start(self) -> "ServerThread":
        self.server.start()  # in the caller's thread, so bind errors surface here
        self._address = self.server.addresses[0]
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful shutdown, then wait for the thread; raises if it does not end."""
        if not self._thread.is_alive():
            return
        self.server.shutdown()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("the server thread did not stop")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""``GET /metrics`` over HTTP/1.1, on the server's own event loop.

A Prometheus server scrapes a few times a minute, so this is the smallest
HTTP responder that is still a good citizen: no thread, no framework, one
request per connection (``Connection: close``), a bounded request head
(`MAX_REQUEST_HEAD`), and a deadline (`SCRAPE_TIMEOUT`) after which a scraper
that stalls is dropped. The body is rendered only when asked for. Anything but
``GET``/``HEAD`` of ``/metrics`` gets a plain 404 or 405.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable

from .errors import WOULD_BLOCK
from .loop import EVENT_READ, EVENT_WRITE, EventLoop

log = logging.getLogger("multiconn.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST_HEAD = 8192
SCRAPE_TIMEOUT = 10.0
ACCEPT_BATCH = 16


class MetricsEndpoint:
    """Serves `render()` at ``/metrics`` on `listeners` (bound, listening sockets)."""

    def __init__(self, loop: EventLoop, listeners: list[socket.socket], render: Callable[[], str]) -> None:
        self.loop = loop
        self.listeners = listeners
        self.render = render
        self._scrapes: set[_Scrape] = set()
        for sock in listeners:
            sock.setblocking(False)
            loop.register(sock, EVENT_READ, self._accepter(sock))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [sock.getsockname()[:2] for sock in self.listeners]

    def _accepter(self, listener: socket.socket) -> Callable[[int], None]:
        def on_readable(mask: int) -> None:
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, _ = listener.accept()
                except WOULD_BLOCK:
                    return
                except OSError as exc:
                    log.debug("metrics: accept failed: %s", exc)
                    return
                self._scrapes.add(_Scrape(self, sock))
        return on_readable

    def close(self) -> None:
        for sock in self.listeners:
            self.loop.unregister(sock)
            sock.close()
        self.listeners = []
        for scrape in list(self._scrapes):
            scrape.close()


class _Scrape:
    """One HTTP connection: read the request head, answer, close."""

    def __init__(self, endpoint: MetricsEndpoint, sock: socket.socket) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.head = bytearray()
        self.out = memoryview(b"")
        self.closed = False
        sock.setblocking(False)
        endpoint.loop.register(sock, EVENT_READ, self._on_events)
        self.timer = endpoint.loop.call_later(SCRAPE_TIMEOUT, self.close)

    def _on_events(self, mask: int) -> None:
        if self.out:
            self._send()
            return
        try:
            data = self.sock.recv(4096)
        except WOULD_BLOCK:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.head += data
        if b"\r\n\r\n" in self.head or b"\n\n" in self.head:
            self._answer()
        elif len(self.head) > MAX_REQUEST_HEAD:
            self._respond(431, "Request Header Fields Too Large", b"request head too large\n")

    def _answer(self) -> None:
        line = bytes(self.head).split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._respond(400, "Bad Request", b"bad request line\n")
            return
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            self._respond(404, "Not Found", b"see /metrics\n")
        elif method not in ("GET", "HEAD"):
            self._respond(405, "Method Not Allowed", b"GET /metrics\n", extra="Allow: GET, HEAD\r\n")
        else:
            body = self.endpoint.render().encode("utf-8")
            self._respond(200, "OK", body, content_type=CONTENT_TYPE, head_only=method == "HEAD")

    def _respond(self, status: int, reason: str, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
                 extra: str = "", head_only: bool = False) -> None:
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode("latin-1")
        self.out = memoryview(head if head_only else head + body)
        self.endpoint.loop.modify(self.sock, EVENT_WRITE, self._on_events)
        self._send()

    def _send(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except WOULD_BLOCK:
            return
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if not self.out:
            self.close()

    def close(self, *args: Any) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        self.endpoint.loop.unregister(self.sock)
        self.sock.close()
        self.endpoint._scrapes.discard(self)

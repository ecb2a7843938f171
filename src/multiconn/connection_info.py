"""What a handler may learn about the connection a request came on.

An application keeps its one-argument interface (a `Frame` in, a `Frame` out).
One that also wants its peer declares a second parameter, ``def handler(request,
connection)``, and is called with a `ConnectionInfo`: the real client (from the
PROXY header when a load balancer sent one), the local address, and the TLS
details. It is a plain, picklable record, so a process pool's workers get it too.
"""

from __future__ import annotations

import inspect
import socket
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .proxy import ProxyHeader

Address = tuple[str, int]


@dataclass(frozen=True)
class ConnectionInfo:
    """One connection as a handler sees it.

    `peer` is the real client and `local` the address it connected to: from the
    PROXY header when `proxied`, else the socket's own. `socket_peer` is always
    the socket's peer (the load balancer, when there is one). `tls_version`,
    `tls_cipher` and `alpn` are None on a plain connection; `proxy_tlvs` holds
    the PROXY v2 TLVs by type (ALPN, authority, unique id, ...).
    """

    peer: Optional[Address]
    local: Optional[Address]
    proxied: bool = False
    socket_peer: Optional[Address] = None
    tls_version: Optional[str] = None
    tls_cipher: Optional[str] = None
    alpn: Optional[str] = None
    proxy_tlvs: dict[int, bytes] = field(default_factory=dict)


def format_address(address: Any) -> str:
    """``HOST:PORT`` (``[HOST]:PORT`` for IPv6), or ``str(address)``."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = f"[{address[0]}]" if ":" in str(address[0]) else address[0]
        return f"{host}:{address[1]}"
    return str(address)


def wants_connection(app: Callable[..., Any]) -> bool:
    """True when `app` takes two positional parameters: ``(request, connection)``."""
    try:
        parameters = list(inspect.signature(app).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(positional) == 2


class WithConnection:
    """Calls a two-parameter app with the request's `ConnectionInfo`
    (``request.connection``, set by the session). Picklable when the app is."""

    __slots__ = ("app",)

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    def __call__(self, request: Any) -> Any:
        return self.app(request, getattr(request, "connection", None))

    def __getstate__(self) -> Any:
        return self.app

    def __setstate__(self, app: Any) -> None:
        self.app = app

    def __repr__(self) -> str:
        return getattr(self.app, "__qualname__", None) or repr(self.app)


def build_connection_info(sock: socket.socket, header: ProxyHeader | None) -> ConnectionInfo:
    """A `ConnectionInfo` from the socket and the PROXY header (if any)."""
    def address(get: Callable[[], Any]) -> Any:
        try:
            value = get()
        except OSError:
            return None
        return tuple(value[:2]) if isinstance(value, tuple) else value

    socket_peer, local = address(sock.getpeername), address(sock.getsockname)
    peer = socket_peer
    proxied = False
    tlvs: dict[int, bytes] = {}
    if header is not None:
        tlvs = dict(header.tlvs)
        if header.source is not None:
            peer, local, proxied = header.source, header.destination, True
    tls_version = tls_cipher = alpn = None
    if isinstance(sock, ssl.SSLSocket):
        tls_version = sock.version()
        cipher = sock.cipher()
        tls_cipher = cipher[0] if cipher else None
        alpn = sock.selected_alpn_protocol()
    return ConnectionInfo(peer, local, proxied, socket_peer, tls_version, tls_cipher, alpn, tlvs)

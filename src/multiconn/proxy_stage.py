"""The PROXY protocol as a preamble stage: the header before anything else.

With ``--proxy-protocol``, every connection must start with a PROXY header from
a trusted peer, before any TLS or frame bytes (`multiconn.proxy` parses it).
Anything else closes the connection with one log line and without sending a
byte: no error frame, because the peer is a load balancer that did not speak
the protocol it was configured for, or someone who is not the load balancer.
That includes a peer outside `trusted` (checked before a byte is read), a
malformed or unknown header, one that is too long, and one not complete within
the frame timeout of the accept (the transport's preamble deadline).

The stage peeks at the socket and reads exactly the header's bytes, so what
follows (a TLS ClientHello, the first frame) is left for the next stage. It
reads the TCP stream under any TLS layer, which has not started yet.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Iterable, Sequence

from .errors import WOULD_BLOCK
from .loop import EVENT_READ
from .proxy import ProxyHeaderError, ProxyHeaderParser
from .transport import Transport

log = logging.getLogger("multiconn.connection")

DEFAULT_TRUSTED = ("127.0.0.0/8", "::1")

Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def parse_networks(text: str | Iterable[str]) -> Networks:
    """``"127.0.0.0/8,::1"`` (or a list of them) as networks; ValueError names a bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    networks = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (CIDR) or address") from None
    if not networks:
        raise ValueError("no trusted network given")
    return tuple(networks)


def is_trusted(host: str, networks: Networks) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class ProxyProtocolStage:
    """Reads and checks one PROXY header; see the module's docstring."""

    __slots__ = ("transport", "parser", "trusted")

    def __init__(self, transport: Transport, accept: str = "any", trusted: Networks = ()) -> None:
        self.transport = transport
        self.parser = ProxyHeaderParser(accept)
        self.trusted = trusted

    def start(self) -> None:
        transport = self.transport
        peer = transport.peer
        host = peer[0] if isinstance(peer, tuple) else ""
        if not is_trusted(host, self.trusted):
            transport.reject(f"PROXY header expected from a trusted network; {host or peer} is not trusted")
            return
        transport.watch(EVENT_READ, self._step)

    def _step(self) -> None:
        transport = self.transport
        sock = transport.sock
        try:
            data = socket.socket.recv(sock, self.parser.wanted(), socket.MSG_PEEK)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            transport.close(f"recv failed: {exc}")
            return
        if not data:
            transport.reject("peer closed before its PROXY header was complete", linger=False)
            return
        try:
            consumed, header = self.parser.feed(data)
        except ProxyHeaderError as exc:
            transport.reject(str(exc))
            return
        socket.socket.recv(sock, consumed)  # exactly the header's bytes: they are in the buffer
        # The preamble's deadline runs from the accept, not from the last byte:
        # a header trickled in a byte at a time must not hold the connection open.
        if header is not None:
            transport.proxy_header = header
            log.debug("%s: PROXY v%d %s", transport, header.version, header.command)
            transport.stage_done()

"""Applications for the PROXY protocol tests (tests/test_proxy.py).

`connection_details` is a two-parameter handler: it answers every request with
everything its `ConnectionInfo` holds, as JSON, so a test can see what a
handler learns behind a load balancer (the PROXY source, TLVs, TLS details).
"""

from __future__ import annotations

from multiconn import Frame
from multiconn.connection_info import ConnectionInfo, format_address


def connection_details(request: Frame, connection: ConnectionInfo) -> Frame:
    return Frame.json({
        "peer": format_address(connection.peer),
        "local": format_address(connection.local),
        "proxied": connection.proxied,
        "socket_peer": format_address(connection.socket_peer),
        "tls_version": connection.tls_version,
        "tls_cipher": connection.tls_cipher,
        "alpn": connection.alpn,
        "proxy_tlvs": {str(kind): value.hex() for kind, value in sorted(connection.proxy_tlvs.items())},
    }, id=request.id)

"""The public exceptions of multiconn: one base class, named by cause.

Every exception the library raises on purpose derives from `MulticonnError`, so
``except multiconn.MulticonnError`` is the one catch-all a caller needs. The
branches say who is to blame:

- `ProtocolError`: the peer sent bytes that are not a valid frame. It carries the
  protocol's error code (docs/protocol.md, "Errors") so a server can answer with it.
- `ErrorResponse`: the peer sent a well-formed *error frame*, i.e. the server
  understood us and said no.
- `ConnectionFailed`, `ConnectionClosed`, `Timeout`: the network or the peer
  broke the exchange. `OSError` is translated into these once, at the socket
  boundary, so callers never have to guess which errno means what.
"""

from __future__ import annotations

import ssl
from typing import Any

#: OS-level exceptions that mean "not now, try again when ready": a plain
#: socket's, and TLS's wish to read or write first.
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class MulticonnError(Exception):
    """Base class of every error multiconn raises on purpose."""


class ProtocolError(MulticonnError):
    """The peer sent something that breaks the wire protocol.

    `code` is one of the protocol's error codes (see `multiconn.protocol.ErrorCode`);
    `request_id` is the request's ``id`` when the header was readable enough to
    hold a valid one, so that the error frame can carry it back.
    """

    def __init__(self, code: str, message: str, request_id: Any = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


class LocalProtocolError(MulticonnError):
    """multiconn itself broke a rule of its own protocol state machine: a bug
    in this process, never the peer's fault (h11's name for the same thing)."""


class ErrorResponse(MulticonnError):
    """The server answered a request with an error frame."""

    def __init__(self, code: str, message: str, frame: Any = None) -> None:
        super().__init__(f"server answered {code}: {message}")
        self.code = code
        self.message = message
        self.frame = frame


class ConnectionFailed(MulticonnError, ConnectionError):
    """A connection could not be opened (refused, unreachable, unknown host)."""


class TLSError(ConnectionFailed):
    """The TLS handshake failed (the peer does not speak TLS, or refused ours)."""


class CertificateVerificationError(TLSError):
    """The server's certificate could not be verified (unknown CA, wrong name, expired)."""


class ConnectionClosed(MulticonnError, ConnectionError):
    """The peer closed or reset the connection before the exchange was complete."""


class Timeout(MulticonnError, TimeoutError):
    """An operation did not complete within its deadline."""


class AppLoadError(MulticonnError):
    """An application given as ``package.module:attr`` could not be loaded."""


class ServerStartError(MulticonnError):
    """A ``multiconn serve`` subprocess exited or stayed silent instead of listening."""

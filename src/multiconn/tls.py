"""TLS on the server side: a transport over ``ssl.SSLSocket`` and its handshake stage.

TLS is two pieces, not a mixin over connection classes: `TLSHandshake`, a
preamble stage (`multiconn.transport.Stage`) that drives the non-blocking
handshake before the session sees a byte, and `TLSTransport`, the few ways in
which reading and writing through the SSL object differ from a plain socket:

* one ``recv`` returns at most one TLS record, and decrypted bytes can wait
  inside the SSL object (``pending()``) while the socket itself has nothing to
  read: those are read at once, or no poll would ever report them;
* ``SSLSocket`` has no ``sendmsg``, and shutting down its sending side would
  drop the TLS session, so neither is used;
* the ``os.read``/``os.write`` of a plain transport's common read and send
  would bypass the SSL object, so a TLS transport never uses them
  (``vectored = False`` rules them out, and every event takes the general path).

Any session runs over it unchanged; the frame timeout bounds the handshake.
"""

from __future__ import annotations

import logging
import socket
import ssl

from .loop import EVENT_READ, EVENT_WRITE
from .transport import OPEN, Transport

log = logging.getLogger("multiconn.connection")


class TLSTransport(Transport):
    """A `Transport` whose socket is an ``ssl.SSLSocket`` (see the module's docstring)."""

    __slots__ = ()
    vectored = False
    sock: ssl.SSLSocket
    #: Every event reads through `_read_once`, which drains the SSL object.
    _on_events = Transport._handle_events

    def _read_once(self) -> bool:
        progressed = super()._read_once()
        while progressed and self.state is OPEN and not self._paused and self.sock.pending():
            progressed = super()._read_once()
        return progressed

    def _after_resume(self) -> None:
        if self.state is OPEN and self.sock.pending():
            self.loop.call_soon(self._on_events, EVENT_READ)

    def _shutdown_write(self) -> None:
        pass


class TLSHandshake:
    """The server side of the TLS handshake, as a preamble stage."""

    __slots__ = ("transport",)

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def start(self) -> None:
        self._step()

    def _step(self) -> None:
        transport = self.transport
        sock = transport.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            transport.watch(EVENT_READ, self._step)
            return
        except ssl.SSLWantWriteError:
            transport.watch(EVENT_WRITE, self._step)
            return
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
            try:
                sock.shutdown(socket.SHUT_WR)  # a FIN, not a reset; also drops the SSL object
            except OSError:
                pass  # already reset by the peer: the next read or the linger timer closes it
            transport.reject(f"TLS handshake failed: {reason}")
            return
        log.debug("%s: TLS established (%s)", transport, sock.version())
        transport.stage_done()

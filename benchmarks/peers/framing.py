"""The frame codec and command line shared by the peer servers.

A frame (docs/protocol.md) is a 2-byte big-endian header length, a UTF-8 JSON
header object, then ``content-length`` bytes of content.  The peers answer
each frame with a frame of the same content-type, content-encoding, content
and id: the ``echo`` application.  The codec is written plainly (struct +
json) and shared, so that the peers differ only in their I/O layer.
"""

import argparse
import json
import struct
import sys

HLEN = struct.Struct(">H")
REQUIRED = ("byteorder", "content-type", "content-encoding", "content-length")
MAX_CONTENT = 16 * 1024 * 1024  # the protocol's default limit
RECV_SIZE = 256 * 1024           # what asyncio's transports read at a time
BACKLOG = 1024


class FrameError(Exception):
    """The peer sent a malformed frame; ``code`` is the protocol's error code."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def parse_header(raw):
    """Decode and check a JSON header; return it as a dict or raise FrameError."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is a ValueError too
        raise FrameError("bad-header", "the header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise FrameError("bad-header", "the header is not a JSON object")
    missing = [key for key in REQUIRED if key not in header]
    if missing:
        raise FrameError("missing-header", f"missing header key {missing[0]!r}")
    length = header["content-length"]
    if type(length) is not int or length < 0:
        raise FrameError("bad-header-value", "content-length must be an integer >= 0")
    if length > MAX_CONTENT:
        raise FrameError("content-too-large", f"content-length is above {MAX_CONTENT}")
    return header


def encode(header, content):
    raw = json.dumps(header).encode("utf-8")
    return HLEN.pack(len(raw)) + raw + content


def echo(header, content):
    """The echo application's answer to one request frame."""
    answer = {
        "byteorder": sys.byteorder,
        "content-type": header["content-type"],
        "content-encoding": header["content-encoding"],
        "content-length": len(content),
    }
    if "id" in header:
        answer["id"] = header["id"]
    return encode(answer, content)


def error_frame(error):
    content = json.dumps({"error": {"code": error.code, "message": str(error)}}).encode("utf-8")
    return encode({"byteorder": sys.byteorder, "content-type": "text/json",
                   "content-encoding": "utf-8", "content-length": len(content)}, content)


class FrameDecoder:
    """Incremental decoder: ``feed(data)`` returns the (header, content) pairs
    that ``data`` completes.  After a malformed frame it returns the frames
    before it and sets ``error``; the connection should then be closed."""

    def __init__(self):
        self._buf = bytearray()
        self._header = None  # parsed header of the frame in progress
        self.error = None

    def feed(self, data):
        buf = self._buf
        buf += data
        frames = []
        pos = 0
        try:
            while True:
                if self._header is None:
                    if len(buf) - pos < 2:
                        break
                    (hlen,) = HLEN.unpack_from(buf, pos)
                    if hlen == 0:
                        raise FrameError("bad-header-length", "the header length is 0")
                    if len(buf) - pos - 2 < hlen:
                        break
                    self._header = parse_header(bytes(buf[pos + 2:pos + 2 + hlen]))
                    pos += 2 + hlen
                end = pos + self._header["content-length"]
                if len(buf) < end:
                    break
                with memoryview(buf) as view:  # one copy, not two as bytes(buf[pos:end]) makes
                    frames.append((self._header, view[pos:end].tobytes()))
                self._header = None
                pos = end
        except FrameError as exc:
            self.error = exc
        if pos:
            del buf[:pos]  # bytearray deletes a prefix cheaply (it moves its start)
        return frames


def parse_args(doc, loops=False, tls=False):
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["framed", "raw"], default="framed",
                        help="framed: the echo application; raw: bytes echoed as they arrive")
    if loops:
        parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    if tls:
        parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain (PEM)")
        parser.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert (PEM; default: in the cert file)")
    args = parser.parse_args()
    if tls and args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    return args


def server_ssl_context(args):
    """The server-side SSLContext for --tls-cert/--tls-key, or None without them.

    Made exactly as ``multiconn serve --tls-cert`` makes its own
    (``create_default_context(Purpose.CLIENT_AUTH)`` + ``load_cert_chain``), so
    that the peers negotiate the same protocol version, cipher suites, key
    exchange groups and session tickets as multiconn.
    """
    if not getattr(args, "tls_cert", None):
        return None
    import ssl
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    return context

"""An independent reference codec of the multiconn protocol, for tests.

Written from docs/protocol.md with `json` and `struct` alone, it shares no
code with `multiconn.protocol`: a test that builds its requests and checks the
server's answers with it does not test the package's codec with itself. Keep
it that way (no multiconn import here).

Used by tests/test_stateful.py and scripts/soak.py (run by tests/test_soak.py),
which read and check every answer with it, and by tests/helpers.py, which
hands its raw-frame builder, exact read and error-frame check to the other
tests.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from typing import Any

__all__ = [
    "ANY_ID", "ERROR_CODES", "FATAL_CODES", "HLEN", "NO_ID", "REQUIRED_KEYS", "TEXT_ENCODINGS",
    "FrameReader", "Mismatch", "PeerClosed",
    "check_error_frame", "encode", "error_of", "header_bytes", "make_header", "raw_frame", "recv_exactly",
    "same_id",
]

#: ``hlen``: the header's length, 2 bytes, big-endian ("Frames").
HLEN = struct.Struct(">H")
#: The keys every header holds ("Frames").
REQUIRED_KEYS = ("byteorder", "content-type", "content-encoding", "content-length")
#: The codecs a ``text/json`` content may name in ``content-encoding``, in any
#: case and with ``_`` for ``-`` ("Frames").
TEXT_ENCODINGS = (
    "utf-8", "utf8", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
    "utf-32-le", "utf-32-be", "ascii", "latin-1", "iso-8859-1",
)
#: Every error code ("Errors") ...
ERROR_CODES = (
    "bad-header-length", "bad-header", "missing-header", "bad-header-value",
    "content-too-large", "bad-content", "timeout", "handler-error",
)
#: ... and those after which the server closes the connection.
FATAL_CODES = frozenset(ERROR_CODES) - {"bad-content", "handler-error"}


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: An id that is not there: a header without an ``id`` key (``header.get("id", NO_ID)``).
NO_ID = _Marker("NO_ID")
#: In an expectation: any id, or none, is right.
ANY_ID = _Marker("ANY_ID")


class Mismatch(AssertionError):
    """The server's bytes are not what the protocol prescribes."""


class PeerClosed(ConnectionError):
    """The peer closed the connection where more bytes were due.

    `partial`: how many bytes of what was due had arrived (0: the EOF came
    between frames, where a server may close).
    """

    def __init__(self, message: str, partial: int = 0) -> None:
        super().__init__(message)
        self.partial = partial


def same_id(expected: Any, actual: Any) -> bool:
    """Ids compare by JSON type too: 1, True and "1" are different ids; `NO_ID` is only itself."""
    if expected is ANY_ID:
        return True
    return type(expected) is type(actual) and expected == actual


# -- building frames -------------------------------------------------------------


def make_header(content_type: Any, content_encoding: Any, length: Any, id: Any = NO_ID,
                byteorder: Any = "little") -> dict[str, Any]:
    """A header with the four required keys, and ``id`` unless it is `NO_ID`.
    Nothing is checked: bad values make bad headers."""
    header = {"byteorder": byteorder, "content-type": content_type,
              "content-encoding": content_encoding, "content-length": length}
    if id is not NO_ID:
        header["id"] = id
    return header


def header_bytes(header: Any) -> bytes:
    """A header given as raw bytes, as text or as a JSON-able object, as header bytes."""
    if isinstance(header, bytes):
        return header
    if isinstance(header, str):
        return header.encode("utf-8")
    return json.dumps(header, ensure_ascii=False).encode("utf-8")


def raw_frame(header: Any, content: bytes = b"") -> bytes:
    """``hlen`` + header + content, exactly as given: nothing is added or checked,
    so malformed frames are built as easily as good ones."""
    raw = header_bytes(header)
    return HLEN.pack(len(raw)) + raw + content


def encode(header: dict[str, Any], content: bytes, rng: Any = None) -> bytes:
    """A valid frame: `header` with ``byteorder`` and ``content-length`` filled in.

    With `rng` (a `random.Random`), what the protocol leaves free varies: key
    order, spacing, escaping and byteorder.
    """
    full = dict(header)
    full.setdefault("byteorder", sys.byteorder if rng is None else rng.choice(("little", "big")))
    full.setdefault("content-length", len(content))
    items = list(full.items())
    separators = (", ", ": ")
    ensure_ascii = False
    if rng is not None:
        rng.shuffle(items)
        separators = rng.choice(((", ", ": "), (",", ":"), (" ,\n", " :\t")))
        ensure_ascii = rng.random() < 0.3
    raw = json.dumps(dict(items), separators=separators, ensure_ascii=ensure_ascii).encode("utf-8")
    return raw_frame(raw, content)


# -- reading frames --------------------------------------------------------------


def parse_header(raw: bytes) -> dict[str, Any]:
    """The header of a frame the server sent, checked against "Frames"; raises `Mismatch`."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise Mismatch(f"server header is not UTF-8 JSON: {exc}: {raw[:200]!r}") from None
    if not isinstance(header, dict):
        raise Mismatch(f"server header is not an object: {header!r}")
    for key in REQUIRED_KEYS:
        if key not in header:
            raise Mismatch(f"server header lacks {key!r}: {header!r}")
    if header["byteorder"] not in ("little", "big"):
        raise Mismatch(f"server byteorder {header['byteorder']!r}")
    for key in ("content-type", "content-encoding"):
        if not (isinstance(header[key], str) and header[key]):
            raise Mismatch(f"server {key} {header[key]!r}")
    length = header["content-length"]
    if type(length) is not int or length < 0:
        raise Mismatch(f"server content-length {length!r}")
    return header


class FrameReader:
    """Reads a blocking socket: exact byte counts, frames, the EOF.

    It reads ahead up to `readahead` bytes (one ``recv`` can then hold many
    answers); with 0 it never takes more than it was asked for, so the socket
    can be read otherwise afterwards. The socket's timeout applies to every
    ``recv`` (``socket.timeout`` is raised as it is).
    """

    def __init__(self, sock: socket.socket, readahead: int = 65536) -> None:
        self.sock = sock
        self.readahead = readahead
        self.buf = bytearray()

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            data = self.sock.recv(max(self.readahead, n - len(self.buf)))
            if not data:
                raise PeerClosed(f"EOF with {len(self.buf)} of {n} bytes", partial=len(self.buf))
            self.buf += data

    def exactly(self, n: int) -> bytes:
        """The next `n` bytes; `PeerClosed` if the peer closes first."""
        self._fill(n)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def frame(self) -> tuple[dict[str, Any], bytes]:
        """The next frame, as (header, content); `Mismatch` if it breaks "Frames",
        `PeerClosed` if the peer closes before it is complete."""
        self._fill(2)
        (hlen,) = HLEN.unpack_from(self.buf)
        if hlen == 0:
            raise Mismatch("server sent hlen 0")
        self._fill(2 + hlen)
        header = parse_header(bytes(self.buf[2:2 + hlen]))
        end = 2 + hlen + header["content-length"]
        self._fill(end)
        content = bytes(self.buf[2 + hlen:end])
        del self.buf[:end]
        return header, content

    def eof(self) -> None:
        """The peer must close now: it has nothing more to say."""
        if self.buf:
            raise Mismatch(f"{len(self.buf)} unexpected bytes before EOF: {bytes(self.buf[:60])!r}")
        data = self.sock.recv(65536)
        if data:
            raise Mismatch(f"expected EOF, got {len(data)} more bytes: {data[:60]!r}")


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from a blocking socket; `PeerClosed` if it closes first."""
    return FrameReader(sock, readahead=0).exactly(size)


# -- error frames ----------------------------------------------------------------


def error_of(header: dict[str, Any], content: bytes) -> tuple[str, str] | None:
    """``(code, message)`` if the frame is an error frame, else None; checks nothing more."""
    if header.get("content-type") != "text/json":
        return None
    try:
        body = json.loads(content.decode(header.get("content-encoding", "utf-8")))
    except (ValueError, LookupError):
        return None
    if not (isinstance(body, dict) and len(body) == 1 and isinstance(body.get("error"), dict)):
        return None
    code, message = body["error"].get("code"), body["error"].get("message")
    return (code, message) if isinstance(code, str) and isinstance(message, str) else None


def check_error_frame(header: dict[str, Any], content: bytes, code: str | None = None,
                      id: Any = NO_ID) -> tuple[str, str]:
    """The exact error frame of "Errors", with `code` (None: any code) and `id`
    (`NO_ID`: none, `ANY_ID`: not checked); its ``(code, message)``, or `Mismatch`."""
    wanted = code or "an error frame"
    if header.get("content-type") != "text/json" or header.get("content-encoding") != "utf-8":
        raise Mismatch(f"{wanted}: a frame with header {header!r}")
    if header.get("content-length", len(content)) != len(content):
        raise Mismatch(f"{wanted}: content-length {header.get('content-length')!r} for {len(content)} bytes")
    try:
        body = json.loads(content.decode("utf-8"))
    except ValueError:
        raise Mismatch(f"{wanted}: content is not UTF-8 JSON: {content[:200]!r}") from None
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], dict)
            and set(body["error"]) == {"code", "message"}):
        raise Mismatch(f"{wanted}: not an error frame: {content[:200]!r}")
    got, message = body["error"]["code"], body["error"]["message"]
    if got not in ERROR_CODES:
        raise Mismatch(f"{wanted}: unknown error code {got!r}: {content[:200]!r}")
    if code is not None and got != code:
        raise Mismatch(f"error code {got!r}, wanted {code!r}: {content[:200]!r}")
    if not (isinstance(message, str) and message):
        raise Mismatch(f"{got} error frame with message {message!r}")
    got_id = header.get("id", NO_ID)
    if not same_id(id, got_id):
        raise Mismatch(f"{got} error frame with id {got_id!r}, wanted {id!r}")
    return got, message

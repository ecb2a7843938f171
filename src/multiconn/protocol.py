"""The multiconn wire protocol, without any I/O ("sans-IO").

A frame is ``hlen`` (uint16, big-endian) + a UTF-8 JSON header of ``hlen`` bytes
+ ``content-length`` bytes of content (see docs/protocol.md). This module turns
bytes into `Frame` objects and back and never touches a socket, so it can be
tested byte by byte and reused by any transport.

Theory of operation
-------------------
`FrameDecoder.feed` takes whatever bytes a ``recv`` returned and returns every
frame they complete, in order, keeping the tail of an unfinished frame. Two
things keep it fast on a stream of small frames:

* It parses straight out of the bytes it was given when nothing was buffered
  before, and otherwise out of one ``bytearray`` whose consumed prefix is deleted
  once per call (CPython deletes a bytearray prefix in O(1)), so a read never
  costs more than a copy of its own bytes.
* A stream of frames repeats the same header bytes over and over (only ``id``
  changes, and many clients send none), so validated headers are kept in a small
  bounded cache keyed by their exact bytes. JSON parsing and validation then run
  once per distinct header, not once per frame. The encoder does the same for
  response headers. A read that is exactly one frame with a cached header,
  the common read of a request/response peer, is decoded straight from the
  cache, before the general path's loop and bookkeeping.

Errors are raised as `ProtocolError` with the protocol's code. Frames completed
before the bad bytes are not lost: they ride on the exception as ``.frames`` so
that a server can answer them (in order) before it sends the error frame. After
an error the decoder stays broken: framing can no longer be trusted.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from typing import TYPE_CHECKING, Any, Iterable, cast

from .errors import ProtocolError

if TYPE_CHECKING:
    from .connection_info import ConnectionInfo

__all__ = [
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "encode_frame",
    "encode_frames",
    "DEFAULT_MAX_CONTENT",
    "TEXT_ENCODINGS",
]

DEFAULT_MAX_CONTENT = 16 * 1024 * 1024
MAX_HEADER_LENGTH = 0xFFFF
REQUIRED_KEYS = ("byteorder", "content-type", "content-encoding", "content-length")
JSON_CONTENT_TYPE = "text/json"
TEXT_ENCODINGS = frozenset(
    {
        "utf-8", "utf8", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
        "utf-32-le", "utf-32-be", "ascii", "latin-1", "iso-8859-1",
    }
)
_HLEN = struct.Struct(">H")
_UTF8_BOM = b"\xef\xbb\xbf"
_HEADER_CACHE_SIZE = 1024
#: Longer headers are parsed every time, never cached: the caches are shared
#: by every connection, and 1,024 headers of up to 64 KiB that peers chose
#: could hold 64 MiB. Real headers are a hundred bytes or so.
_CACHED_HEADER_BYTES = 1024
#: Contents at least this large are received straight into their own buffer.
LARGE_CONTENT = 64 * 1024


class ErrorCode:
    """The error codes of docs/protocol.md ("Errors"), as they appear on the wire."""

    BAD_HEADER_LENGTH = "bad-header-length"
    BAD_HEADER = "bad-header"
    MISSING_HEADER = "missing-header"
    BAD_HEADER_VALUE = "bad-header-value"
    CONTENT_TOO_LARGE = "content-too-large"
    BAD_CONTENT = "bad-content"
    TIMEOUT = "timeout"
    HANDLER_ERROR = "handler-error"

    ALL = (
        BAD_HEADER_LENGTH, BAD_HEADER, MISSING_HEADER, BAD_HEADER_VALUE,
        CONTENT_TOO_LARGE, BAD_CONTENT, TIMEOUT, HANDLER_ERROR,
    )
    #: Codes after which the connection is closed: framing can't be trusted.
    FATAL = frozenset(
        {BAD_HEADER_LENGTH, BAD_HEADER, MISSING_HEADER, BAD_HEADER_VALUE,
         CONTENT_TOO_LARGE, TIMEOUT}
    )


def normalize_encoding(name: str) -> str:
    """Spell a codec name the way TEXT_ENCODINGS does (case-free, ``_`` as ``-``)."""
    return name.lower().replace("_", "-")


def is_valid_id(value: Any) -> bool:
    """A request id is a JSON string or integer (and a JSON boolean is neither)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


_NO_JSON = object()
#: Makes a `Frame` without calling its ``__init__`` (see `FrameDecoder._parse`).
_new_frame = object.__new__
#: Validated headers by their exact bytes: (header, content-length, id), shared
#: by every decoder: the headers of one stream, and of many connections of one
#: client program, are the same bytes again and again.
_header_cache: dict[bytes, tuple[dict[str, Any], int, Any]] = {}
#: A decoder's input buffer while it holds nothing: shared, so that an idle
#: connection carries no empty ``bytearray`` of its own (56 bytes, a twelfth
#: of an idle connection). `FrameDecoder.feed` makes one when bytes must wait.
_NO_INPUT = b""


class Frame:
    """One protocol frame: a header dict and the content bytes.

    A frame you build needs only ``content-type`` and ``content-encoding`` (and
    ``id`` if you want one); the encoder fills in ``byteorder`` and
    ``content-length``. Decoded frames carry every key that was received.
    A request's `connection` (a `multiconn.connection_info.ConnectionInfo`) is
    set by the server only for applications that ask for it.
    """

    __slots__ = ("header", "content", "_json", "connection")

    #: Set by the session, only for applications that ask for it (unset
    #: otherwise); None when its transport knows no connection (a bare
    #: `multiconn.testing.MemoryTransport`).
    connection: ConnectionInfo | None

    def __init__(self, header: dict[str, Any], content: bytes | bytearray = b"") -> None:
        # Maintenance contract: FrameDecoder.feed and _parse make received frames
        # without this call, with the same stores; change both together.
        self.header = header
        self.content = content
        self._json = _NO_JSON

    @classmethod
    def json(cls, value: Any, *, id: Any = None, encoding: str = "utf-8") -> "Frame":
        """A ``text/json`` frame holding `value`."""
        content = json.dumps(value, ensure_ascii=False).encode(encoding)
        header = {"content-type": JSON_CONTENT_TYPE, "content-encoding": encoding}
        if id is not None:
            header["id"] = id
        frame = cls(header, content)
        frame._json = value
        return frame

    @classmethod
    def binary(
        cls,
        content: bytes | bytearray | memoryview,
        *,
        content_type: str = "binary/octet-stream",
        encoding: str = "binary",
        id: Any = None,
    ) -> "Frame":
        """A frame of opaque bytes."""
        header = {"content-type": content_type, "content-encoding": encoding}
        if id is not None:
            header["id"] = id
        return cls(header, bytes(content))

    @classmethod
    def error(cls, code: str, message: str, *, id: Any = None) -> "Frame":
        """The error frame of docs/protocol.md ("Errors")."""
        return cls.json({"error": {"code": code, "message": message}}, id=id)

    @property
    def content_type(self) -> str:
        return cast(str, self.header.get("content-type", ""))

    @property
    def content_encoding(self) -> str:
        return cast(str, self.header.get("content-encoding", ""))

    @property
    def id(self) -> Any:
        return self.header.get("id")

    @property
    def is_json(self) -> bool:
        return self.header.get("content-type") == JSON_CONTENT_TYPE

    def json_content(self) -> Any:
        """Decode and parse ``text/json`` content (parsed once, then cached).

        Raises `ProtocolError` with code ``bad-content`` when the content is not
        JSON text in its declared encoding.
        """
        if self._json is _NO_JSON:
            self._json = _parse_json_content(self.content, self.content_encoding, self.id)
        return self._json

    @property
    def error_info(self) -> tuple[str, str] | None:
        """``(code, message)`` if this is an error frame, else None."""
        if not self.is_json:
            return None
        try:
            value = self.json_content()
        except ProtocolError:
            return None
        if not (isinstance(value, dict) and len(value) == 1 and isinstance(value.get("error"), dict)):
            return None
        error = value["error"]
        code, message = error.get("code"), error.get("message")
        if isinstance(code, str) and isinstance(message, str):
            return code, message
        return None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return self.header == other.header and self.content == other.content

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        content = self.content if len(self.content) <= 40 else self.content[:40] + b"..."
        return f"Frame({self.header!r}, {content!r})"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json_content(content: bytes | bytearray, encoding: str, request_id: Any) -> Any:
    try:
        text = bytes(content).decode(normalize_encoding(encoding))
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, LookupError, ValueError, RecursionError) as exc:
        raise ProtocolError(
            ErrorCode.BAD_CONTENT, f"text/json content does not parse: {exc}", request_id
        ) from None


# -- decoding -------------------------------------------------------------


class _HeaderObject(dict[str, Any]):
    """A JSON object that remembers whether a required key appeared twice."""

    duplicate: str | None = None


def _object_pairs(pairs: list[tuple[str, Any]]) -> _HeaderObject:
    obj = _HeaderObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and key in REQUIRED_KEYS:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


#: One decoder for every header: ``json.loads`` with keyword arguments builds a
#: new ``JSONDecoder`` per call, which is most of the cost of a small header.
_HEADER_DECODER = json.JSONDecoder(object_pairs_hook=_object_pairs, parse_constant=_reject_constant)


def _fail(code: str, message: str, request_id: Any = None) -> ProtocolError:
    return ProtocolError(code, message, request_id)


def parse_header(raw: bytes) -> tuple[dict[str, Any], int, Any]:
    """Validate header bytes; return ``(header, content_length, request_id)``.

    Raises `ProtocolError` with the code docs/protocol.md assigns to each defect.
    """
    if raw.startswith(_UTF8_BOM):
        raise _fail(ErrorCode.BAD_HEADER, "header starts with a byte-order mark")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(ErrorCode.BAD_HEADER, "header is not valid UTF-8") from None
    try:
        obj = _HEADER_DECODER.decode(text)
    except (ValueError, RecursionError):
        raise _fail(ErrorCode.BAD_HEADER, "header is not valid JSON") from None
    # object_pairs_hook makes every JSON object a _HeaderObject.
    if not isinstance(obj, _HeaderObject):
        raise _fail(ErrorCode.BAD_HEADER, "header is not a JSON object")
    if obj.duplicate is not None:
        raise _fail(ErrorCode.BAD_HEADER, f"header key {obj.duplicate!r} appears twice")
    header = dict(obj)

    request_id = header.get("id")
    if "id" in header and not is_valid_id(request_id):
        raise _fail(ErrorCode.BAD_HEADER_VALUE, "'id' must be a string or an integer")
    missing = [key for key in REQUIRED_KEYS if key not in header]
    if missing:
        raise _fail(ErrorCode.MISSING_HEADER, f"header lacks {', '.join(map(repr, missing))}", request_id)

    def bad_value(message: str) -> ProtocolError:
        return _fail(ErrorCode.BAD_HEADER_VALUE, message, request_id)

    if header["byteorder"] not in ("little", "big"):
        raise bad_value("'byteorder' must be \"little\" or \"big\"")
    for key in ("content-type", "content-encoding"):
        value = header[key]
        if not isinstance(value, str) or not value:
            raise bad_value(f"{key!r} must be a non-empty string")
    length = header["content-length"]
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise bad_value("'content-length' must be an integer >= 0")
    if header["content-type"] == JSON_CONTENT_TYPE and (
        normalize_encoding(header["content-encoding"]) not in TEXT_ENCODINGS
    ):
        raise bad_value(f"{header['content-encoding']!r} is not a text encoding for text/json")
    return header, length, request_id


def _all_scalar(header: dict[str, Any]) -> bool:
    return all(type(value) in _SCALARS for value in header.values())


_SCALARS = frozenset({str, int, float, bool, type(None)})

#: Headers whose last member is the id, as a client that splices each
#: request's id into one template writes them (multiconn's clients, and
#: ``json.dumps`` of a dict with the id last): by the bytes before the id,
#: the rest of the header, validated once. An id makes every header's bytes
#: new, so without this each one is a whole JSON parse (benchmarks/results/micro.md).
_id_prefix_cache: dict[bytes, tuple[dict[str, Any], int]] = {}
_ID_MEMBER = b', "id": '
#: The id literals read here; any other (escapes, exponents, spaces, more
#: than 18 digits: json's own limit on long ints stays json's to report)
#: goes to `parse_header`.
_INT_ID = re.compile(rb"-?(?:0|[1-9][0-9]{0,17})")
_PLAIN_STRING_ID = re.compile(rb'"[^"\\\x00-\x1f]*"')


def _split_last_id(raw: bytes) -> tuple[bytes, Any] | None:
    """(the bytes before it, the id) for a header that ends in a plain id
    member, ``, "id": ID}``; None for any other."""
    cut = raw.rfind(_ID_MEMBER)
    if cut < 0 or raw[-1] != 0x7D:  # "}"
        return None
    literal = raw[cut + len(_ID_MEMBER) : -1]
    if _INT_ID.fullmatch(literal):
        return raw[:cut], int(literal)
    if _PLAIN_STRING_ID.fullmatch(literal):
        try:
            return raw[:cut], literal[1:-1].decode("utf-8")
        except UnicodeDecodeError:
            return None  # parse_header says what is wrong
    return None


def _parse_id_header(raw: bytes) -> tuple[dict[str, Any], int, Any] | None:
    """`parse_header`'s answer for a header that is a known prefix, then
    ``, "id": ID}``; None for any other.

    Sound because of how a prefix gets known (`_remember_id_prefix`): it
    came from a valid header that ended the same way, so the ``, "id": ``
    found last in it was a member of the outermost object (inside a string
    a quote is escaped; a nested object would close after it), and the
    prefix holds no other id. Any plain literal in its place makes a valid
    header with the same members and that id.
    """
    split = _split_last_id(raw)
    if split is None:
        return None
    prefix, request_id = split
    known = _id_prefix_cache.get(prefix)
    if known is None:
        return None
    header = known[0].copy()
    header["id"] = request_id
    return header, known[1], request_id


def _remember_id_prefix(raw: bytes, parsed: tuple[dict[str, Any], int, Any]) -> None:
    """After `parse_header` accepted `raw`, with an id: if it ends in a plain
    id member, remember the rest for `_parse_id_header`."""
    split = _split_last_id(raw)
    if split is None or b'"id"' in split[0]:
        return  # a literal only json reads, or an id before the last (or "id" anywhere else)
    rest = {key: value for key, value in parsed[0].items() if key != "id"}
    if not _all_scalar(rest):
        return  # nested values are mutable: as in the header cache
    if len(_id_prefix_cache) >= _HEADER_CACHE_SIZE:
        _id_prefix_cache.clear()
    _id_prefix_cache[split[0]] = (rest, parsed[1])


class FrameDecoder:
    """Incremental decoder: `feed` bytes in, complete frames out.

    `max_content` is enforced as soon as a header is complete, before any of the
    content is buffered.

    Large contents can also be received without intermediate copies, in the
    manner of ``asyncio.BufferedProtocol``: `recv_buffer` hands out a writable
    view of a buffer sized once from ``content-length``, the caller
    ``recv_into``s it and reports the byte count to `buffer_updated`. Such
    frames carry that buffer (a ``bytearray``) as their content.
    """

    __slots__ = ("max_content", "_buffer", "_pending", "_error", "_content", "_filled", "buffers",
                 "has_partial")

    def __init__(self, max_content: int = DEFAULT_MAX_CONTENT, buffers: Any = None) -> None:
        """`buffers`, a `multiconn.buffers.BufferPool`, supplies (and reuses) the
        buffers of large contents; without one each is a new ``bytearray``."""
        self.max_content = max_content
        self.buffers = buffers
        self._buffer: bytes | bytearray = _NO_INPUT
        # The parsed header of a frame whose content has not all arrived yet.
        self._pending: tuple[dict[str, Any], int, Any] | None = None
        self._error: ProtocolError | None = None
        # The content of a large frame being received in place, and its fill.
        self._content: bytearray | None = None
        self._filled = 0
        #: True while a frame has started but not finished. An attribute kept
        #: up to date, not a property: a session asks after every read, and a
        #: property's call was 2 % of a small request's instructions
        #: (benchmarks/results/micro.md). The slot is free: the object stays
        #: in the allocator's 96-byte size class.
        self.has_partial = False

    @property
    def wants_buffer(self) -> bool:
        """True while a large content is due: receive it through `recv_buffer`."""
        pending = self._pending
        return pending is not None and pending[1] >= LARGE_CONTENT

    def recv_buffer(self) -> memoryview | None:
        """Where to ``recv_into`` the rest of a large content, or None to use `feed`.

        The view covers exactly the missing bytes, so a receive into it never
        reads past the frame's end.
        """
        pending = self._pending
        if pending is None or pending[1] < LARGE_CONTENT:
            return None
        if self._content is None:
            buffers = self.buffers
            content = self._content = buffers.take(pending[1]) if buffers is not None else bytearray(pending[1])
            filled = self._filled = len(self._buffer)
            content[:filled] = self._buffer
            self._buffer = _NO_INPUT
        return memoryview(self._content)[self._filled :]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """Account for `nbytes` received into the last `recv_buffer` view."""
        self._filled += nbytes
        pending, content = self._pending, self._content
        if pending is None or content is None or self._filled < len(content):
            return []
        self._pending = self._content = None
        self._filled = 0
        self.has_partial = bool(self._buffer)
        return [Frame(pending[0].copy(), content)]

    @property
    def partial_id(self) -> Any:
        """The ``id`` of the unfinished frame, once its header is complete."""
        return self._pending[2] if self._pending is not None else None

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame."""
        return len(self._buffer) + self._filled

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add received bytes; return every frame they complete, in order.

        On malformed input raises `ProtocolError`; its ``frames`` attribute holds
        the frames that were complete before the bad bytes.

        The common read of a request/response peer is one whole frame whose
        header was seen before, with nothing buffered: that read is answered
        here, from the header cache, without `_parse`'s loop and bookkeeping
        (an eighth of a framed request's instructions; benchmarks/results/micro.md).
        Any other read (more or less than one frame, a new header, an id, a
        content over the limit) takes the general path below, which decides;
        one that starts with a cached header goes on from that header's
        lookup, so a pipelined read pays for the fast path's check no more
        than the slicing of its first header (benchmarks/results/micro.md).
        """
        resume_at = 0
        if not self.has_partial and type(data) is bytes and self._error is None:
            size = len(data)
            if size > 2:
                start = ((data[0] << 8) | data[1]) + 2
                pending = _header_cache.get(data[2:start])
                if pending is not None and pending[1] <= self.max_content:
                    if start + pending[1] == size:
                        frame = _new_frame(Frame)  # as in _parse
                        frame.header = pending[0].copy()
                        frame.content = data[start:]
                        frame._json = _NO_JSON
                        return [frame]
                    if start <= size:  # a cut header can equal a shorter cached one
                        # More or less than one frame: the general path goes on from
                        # this header rather than looking it up again.
                        self._pending, resume_at = pending, start
        if self._error is not None:  # a fresh copy: its frames were answered already
            error = self._error
            raise ProtocolError(error.code, error.message, error.request_id)
        if self._content is not None:  # finish an in-place content first
            view = self.recv_buffer()
            assert view is not None
            taken = min(len(view), len(data))
            view[:taken] = memoryview(data)[:taken]
            view.release()
            done = self.buffer_updated(taken)
            if not done or taken == len(data):
                return done
            try:
                return done + self.feed(memoryview(data)[taken:])
            except ProtocolError as exc:
                exc.frames = done + exc.frames  # type: ignore[attr-defined]
                raise
        buffer = self._buffer
        # Parsed in place only when it is all there is and is bytes, so its slices are bytes.
        buffered = bool(buffer) or type(data) is not bytes
        if buffered:
            held = buffer if isinstance(buffer, bytearray) else bytearray()  # not _NO_INPUT
            self._buffer = buffer = held
            held += data
            source: Any = memoryview(held)
        else:
            source = data
        frames: list[Frame] = []
        try:
            consumed = self._parse(source, buffered, frames, resume_at)
        except ProtocolError as exc:
            if buffered:
                source.release()
            exc.frames = frames  # type: ignore[attr-defined]
            self._error = exc
            self._buffer = _NO_INPUT
            self._pending = None
            self.has_partial = False
            raise
        if buffered:
            source.release()
            del held[:consumed]
        elif consumed < len(data):  # the buffer is empty: it starts with the rest
            buffer = self._buffer = bytearray(memoryview(data)[consumed:])
        self.has_partial = bool(buffer) or self._pending is not None
        return frames

    def _parse(self, data: Any, is_view: bool, frames: list[Frame], pos: int = 0) -> int:
        """Append the frames in `data` from `pos` on to `frames`; return the bytes consumed.

        `data` is the received bytes themselves, whose slices are bytes, or
        (`is_view`) a memoryview of the buffer, whose slices are copied out:
        ``bytes()`` on what is already bytes would be a call for nothing,
        twice per frame of the hot path (what it cost when measured:
        benchmarks/results/micro.md). Frames are made with ``object.__new__``
        and `Frame.__init__`'s stores spelled out: the call of a Python
        ``__init__`` was 500 instructions of a frame's 18,000.
        """
        end = len(data)
        pending = self._pending
        cache = _header_cache
        new_frame = _new_frame
        while True:
            if pending is None:
                if end - pos < 2:
                    break
                hlen = (data[pos] << 8) | data[pos + 1]
                if hlen == 0:
                    raise _fail(ErrorCode.BAD_HEADER_LENGTH, "header length is 0")
                start = pos + 2
                if end - start < hlen:
                    break
                raw = data[start : start + hlen]
                if is_view:
                    raw = bytes(raw)
                pending = cache.get(raw)
                if pending is None:
                    pending = _parse_id_header(raw)
                if pending is None:
                    pending = parse_header(raw)
                    if hlen <= _CACHED_HEADER_BYTES:
                        # Headers with ids rarely repeat (their rest does); nested values are mutable.
                        if pending[2] is not None:
                            _remember_id_prefix(raw, pending)
                        elif _all_scalar(pending[0]):
                            if len(cache) >= _HEADER_CACHE_SIZE:
                                cache.clear()
                            cache[raw] = pending
                if pending[1] > self.max_content:
                    raise _fail(
                        ErrorCode.CONTENT_TOO_LARGE,
                        f"content-length {pending[1]} exceeds the limit of {self.max_content}",
                        pending[2],
                    )
                pos = start + hlen
            length = pending[1]
            if end - pos < length:
                break
            content = data[pos : pos + length]
            frame = new_frame(Frame)  # Frame.__init__'s three stores, without its call (and in feed)
            frame.header = pending[0].copy()
            frame.content = bytes(content) if is_view else content
            frame._json = _NO_JSON
            frames.append(frame)
            pos += length
            pending = None
        self._pending = pending
        return pos


# -- encoding -------------------------------------------------------------

_BYTEORDER = sys.byteorder
_prefix_cache: dict[tuple[Any, ...], bytes] = {}
#: Headers of exactly content-type and content-encoding: (their values, content-length) -> prefix.
_pair_cache: dict[tuple[str, str, int], bytes] = {}
#: Answers with ids: the JSON text of the rest of the header, without its
#: closing brace; by (content-type, content-encoding, content-length) when
#: those and the id are all there is, else by the rest's items and the length.
_id_template_cache: dict[tuple[Any, ...], str] = {}
#: One encoder for every header (``json.dumps`` with keywords builds one per call).
_HEADER_ENCODER = json.JSONEncoder(ensure_ascii=False)


def encode_header(header: dict[str, Any], content_length: int) -> bytes:
    """The ``hlen`` + JSON header bytes for a frame with that header and length.

    ``byteorder`` and ``content-length`` are always the encoder's own, whatever
    `header` says. Encoded prefixes are cached per distinct header. Most
    answers carry exactly the two keys a frame needs, and those are looked
    up by their two values (`_pair_cache`): with the general key, every item
    as a tuple built and hashed per answer, encoding was a fifth of a
    pipelined frame's instructions, and is a seventh this way
    (benchmarks/results/micro.md).
    """
    if len(header) == 2:
        try:
            prefix = _pair_cache.get((header["content-type"], header["content-encoding"], content_length))
        except (KeyError, TypeError):  # other keys, or unhashable values: the general path says which
            prefix = None
        if prefix is not None:
            return prefix
    request_id = header.get("id")
    if request_id is not None:  # a new header every time: the rest is a template
        prefix = _encode_with_id(header, content_length, request_id)
        if prefix is not None:
            return prefix
    try:
        key = (*header.items(), content_length)
        prefix = _prefix_cache.get(key)
    except TypeError:  # unhashable header values: encode without the cache
        key, prefix = None, None
    if prefix is not None:
        return prefix
    raw = _HEADER_ENCODER.encode(_full_header(header, content_length)).encode("utf-8")
    if len(raw) > MAX_HEADER_LENGTH:
        raise ValueError(f"encoded header is {len(raw)} bytes, more than {MAX_HEADER_LENGTH}")
    prefix = _HLEN.pack(len(raw)) + raw
    # Only all-string headers are cached: as dict keys True, 1 and 1.0 are equal.
    # A lookup needs no such check: a value of another type never equals a string.
    if key is not None and all(type(value) is str for value in header.values()):
        cache: dict[Any, bytes] = _prefix_cache
        if len(header) == 2 and "content-type" in header and "content-encoding" in header:
            cache, key = _pair_cache, (header["content-type"], header["content-encoding"], content_length)
        if len(cache) >= _HEADER_CACHE_SIZE:
            cache.clear()
        cache[key] = prefix
    return prefix


def _full_header(header: dict[str, Any], content_length: int) -> dict[str, Any]:
    full: dict[str, Any] = {"byteorder": _BYTEORDER}
    full.update(header)
    full["byteorder"] = _BYTEORDER
    full["content-length"] = content_length
    return full


def _encode_with_id(header: dict[str, Any], content_length: int, request_id: Any) -> bytes | None:
    """An answer's header, whose id changes with every request: the rest is
    encoded once and cached as JSON text; the id is spliced in as the last key
    (the protocol leaves key order free), as `_parse_id_header` reads it.
    None when a value is unhashable: no template can be looked up.

    The common answer, content-type, content-encoding and the id, is looked
    up by those two values, as `_pair_cache` does for answers without an id.
    """
    key: Any = None
    if len(header) == 3:
        try:
            key = (header["content-type"], header["content-encoding"], content_length)
        except KeyError:
            pass
    if key is None:
        key = (*(item for item in header.items() if item[0] != "id"), content_length)
    try:
        text = _id_template_cache.get(key)
    except TypeError:
        return None
    if text is None:
        rest = {name: value for name, value in header.items() if name != "id"}
        text = _HEADER_ENCODER.encode(_full_header(rest, content_length))[:-1]
        # As in encode_header: only all-string headers are cached (True, 1 and 1.0 are equal keys).
        if all(type(value) is str for value in rest.values()):
            if len(_id_template_cache) >= _HEADER_CACHE_SIZE:
                _id_template_cache.clear()
            _id_template_cache[key] = text
    if type(request_id) is int:
        id_text = str(request_id)
    else:
        id_text = _HEADER_ENCODER.encode(request_id)
    raw = (text + ', "id": ' + id_text + "}").encode("utf-8")
    if len(raw) > MAX_HEADER_LENGTH:
        raise ValueError(f"encoded header is {len(raw)} bytes, more than {MAX_HEADER_LENGTH}")
    return _HLEN.pack(len(raw)) + raw


def encode_frame(frame: Frame) -> bytes:
    """The bytes of one frame on the wire."""
    return encode_header(frame.header, len(frame.content)) + frame.content


def encode_frames(frames: Iterable[Frame]) -> bytes:
    """The bytes of several frames, ready for one ``send``."""
    parts: list[bytes | bytearray] = []
    for frame in frames:
        parts.append(encode_header(frame.header, len(frame.content)))
        parts.append(frame.content)
    return b"".join(parts)

"""Model-based (hypothesis stateful) test of a real echo server over loopback.

A `RuleBasedStateMachine` keeps up to four raw blocking sockets to one real
`echo` server (a `ServerThread` per test case) and interleaves, at random, on
several connections at once: pipelined batches of valid frames sent in random
chunks, partial frames finished later, ``text/json`` frames whose content does
not parse, fatal garbage, half-closes, resets, and reads. A model of each
connection (`Conn.expected`: the answers owed, in order) is the oracle: every
complete request is answered exactly once and in request order (same id,
content-type, content-encoding and content), an error frame takes the failed
request's place, a fatal error is the last frame before EOF, a half-close gets
the answers to complete frames and then EOF. After every step a fresh
connection must still get the right answer and the server thread must be
alive (docs/protocol.md: frames, connections, errors).

The oracle is independent of the package: frames are built and read with
`reference_codec` (the soak's codec too), never with `multiconn.protocol`.

Timing. Correctness never depends on a sleep: every expectation is read with a
generous socket timeout. The one timer the model meets is the 2 s frame
timeout, which a partial frame left pending across steps may legitimately hit
on a slow machine. The model accepts a ``timeout`` error (then EOF) in place of
a partial frame's answer only when it is causally possible: it arrived at least
`FRAME_TIMEOUT` after the partial frame's first byte was sent (the server's
clock for that frame cannot start earlier). Complete frames are sent within one
step and are never allowed to time out.

"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from multiconn.limits import Limits
from multiconn.testing import ServerThread

from reference_codec import ANY_ID, FATAL_CODES, NO_ID, REQUIRED_KEYS, TEXT_ENCODINGS, FrameReader, PeerClosed
from reference_codec import check_error_frame, error_of, make_header, raw_frame, same_id

FRAME_TIMEOUT = 2.0
MAX_CONTENT = 1 << 16
LIMITS = Limits(frame_timeout=FRAME_TIMEOUT, idle_timeout=30, error_linger=0.2, max_content=MAX_CONTENT)
#: Per blocking socket operation; a loaded 2-core machine answers in far less.
SOCK_TIMEOUT = 5.0
MAX_CONNS = 4


def normalize_codec(name: str) -> str:
    return name.lower().replace("_", "-")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_parses(content: bytes, encoding: str) -> bool | None:
    """Whether `content` is JSON text in `encoding`; None where the spec is silent."""
    try:
        text = content.decode(normalize_codec(encoding))
    except UnicodeDecodeError:
        return False
    if text.startswith("\ufeff"):
        return None  # RFC 8259 lets a parser ignore a BOM or reject it
    try:
        json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False
    return True


# -- expectations -----------------------------------------------------------------


@dataclass
class Expect:
    """One answer a connection is owed, in order."""

    kind: str  # "echo" or "error"
    id: Any = NO_ID
    content_type: str = ""
    content_encoding: str = ""
    content: bytes = b""
    code: str = ""
    #: For a frame that was partial across steps: when its first byte was sent,
    #: and the ids a ``timeout`` error for it may carry.
    partial_since: float | None = None
    partial_ids: tuple = ()

    @property
    def fatal(self) -> bool:
        return self.kind == "error" and self.code in FATAL_CODES

    def __repr__(self) -> str:
        if self.kind == "error":
            return f"<error {self.code} id={self.id!r}>"
        return f"<echo id={self.id!r} {self.content_type!r}/{self.content_encoding!r} {len(self.content)} B>"


@dataclass
class Req:
    """A request's bytes on the wire and the answer it is owed."""

    data: bytes
    expect: Expect
    header_end: int  # 2 + hlen: a prefix this long holds the whole header

    def __repr__(self) -> str:
        return f"Req({self.data[:60]!r}{'...' if len(self.data) > 60 else ''} -> {self.expect!r})"


@dataclass
class Garbage:
    """Bytes that make the connection fatal once `decisive` bytes have arrived."""

    data: bytes
    decisive: int
    code: str
    id: Any

    def __repr__(self) -> str:
        return f"Garbage({self.data[:80]!r} -> {self.code} id={self.id!r})"


@dataclass
class Partial:
    rest: bytes
    since: float
    ids: tuple
    expect: Expect


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    number: int
    #: Every answer is read through it (it reads ahead).
    reader: FrameReader = field(init=False)
    expected: deque = field(default_factory=deque)
    partial: Partial | None = None
    #: When the first byte of the oldest partial frame finished on it was sent.
    first_partial: float | None = None
    dead: bool = False  # closed by the server after a partial frame timed out
    eof: bool = False  # the server's EOF was read

    def __post_init__(self) -> None:
        self.reader = FrameReader(self.sock)

    def __repr__(self) -> str:
        return f"conn{self.number}"


# -- strategies -------------------------------------------------------------------

ids = st.one_of(st.just(NO_ID), st.integers(-(2**63), 2**64), st.text(max_size=16))
invalid_ids = st.sampled_from([1.5, 0.0, True, False, None, [1], {"a": 1}, []])
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
codec_spellings = st.sampled_from(TEXT_ENCODINGS).flatmap(
    lambda name: st.sampled_from(sorted({name, name.upper(), name.replace("-", "_"), name.title()}))
)
binary_types = st.one_of(
    st.sampled_from([
        "binary/octet-stream", "binary/custom-client-binary-type", "application/json",
        "TEXT/JSON", "text/json ", "Text/Json", "text/plain",
    ]),
    st.text(min_size=1, max_size=20).filter(lambda s: s != "text/json"),
)
extra_keys = st.text(max_size=10).filter(lambda k: k not in REQUIRED_KEYS and k != "id")


@st.composite
def raw_header(draw: Any, header: dict[str, Any]) -> bytes:
    """`header` as JSON in a random key order, with ignorable extra keys."""
    extras = draw(st.dictionaries(extra_keys, json_scalars, max_size=2))
    items = draw(st.permutations([*header.items(), *extras.items()]))
    text = json.dumps(
        dict(items),
        ensure_ascii=draw(st.booleans()),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    )
    return text.encode("utf-8")


@st.composite
def request_bodies(draw: Any) -> tuple[str, str, bytes]:
    """(content-type, content-encoding, content) of a valid request."""
    if draw(st.booleans()):
        encoding = draw(codec_spellings)
        ascii_only = normalize_codec(encoding) in ("ascii", "latin-1", "iso-8859-1")
        text = json.dumps(draw(json_values), ensure_ascii=ascii_only or draw(st.booleans()))
        text = draw(st.sampled_from(["", " ", "\n"])) + text + draw(st.sampled_from(["", " ", "\r\n"]))
        return "text/json", encoding, text.encode(normalize_codec(encoding))
    return draw(binary_types), draw(st.text(min_size=1, max_size=16)), draw(st.binary(max_size=2048))


@st.composite
def valid_requests(draw: Any) -> Req:
    content_type, encoding, content = draw(request_bodies())
    request_id = draw(ids)
    header = make_header(content_type, encoding, len(content), request_id)
    header["byteorder"] = draw(st.sampled_from(["little", "big"]))
    raw = draw(raw_header(header))
    expect = Expect("echo", request_id, content_type, encoding, content)
    return Req(raw_frame(raw, content), expect, 2 + len(raw))


BAD_JSON_TEXTS = [
    "", " ", "{", "[1,]", "NaN", "Infinity", "-Infinity", "[NaN]", "{'a': 1}", "tru",
    '"unterminated', "01", "{\"a\" 1}", "1 2", "[\"\x01\"]", "nul",
]


@st.composite
def bad_content_requests(draw: Any) -> Req:
    """``text/json`` whose content does not decode or parse: bad-content, stays open."""
    encoding = draw(codec_spellings)
    codec = normalize_codec(encoding)
    content = draw(st.one_of(
        st.sampled_from(BAD_JSON_TEXTS).map(lambda t: t.encode(codec)),
        st.text(max_size=30).map(lambda t: t.encode(codec, errors="replace")),
        st.binary(max_size=64),
    ).filter(lambda c: json_parses(c, encoding) is False))
    request_id = draw(ids)
    raw = draw(raw_header(make_header("text/json", encoding, len(content), request_id)))
    expect = Expect("error", request_id, code="bad-content")
    return Req(raw_frame(raw, content), expect, 2 + len(raw))


requests = st.one_of(valid_requests(), valid_requests(), valid_requests(), bad_content_requests())

junk = st.binary(max_size=64)
INVALID_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80", b"\xf8\x88\x80\x80\x80"]
BAD_VALUES = {
    "byteorder": ["LITTLE", "middle", "", None, 1, ["little"]],
    "content-type": ["", 1, None, [], {}],
    "content-encoding": ["", 0, None, ["utf-8"]],
    "content-length": [-1, 1.0, 2.5, 1e3, "3", True, False, None, [1]],
}
NON_TEXT_CODECS = ["binary", "utf-7", "utf-8-sig", "latin1", "cp1252", "UTF8 ", "utf-16le", ""]


@st.composite
def base_header(draw: Any, request_id: Any = NO_ID) -> dict[str, Any]:
    content_type, encoding, _ = draw(request_bodies())
    return make_header(content_type, encoding, draw(st.integers(0, 100)), request_id)


def _header_garbage(raw: bytes, trailing: bytes, code: str, request_id: Any) -> Garbage:
    data = raw_frame(raw, trailing)
    return Garbage(data, 2 + len(raw), code, request_id)


@st.composite
def fatal_garbage(draw: Any) -> Garbage:
    kind = draw(st.sampled_from([
        "hlen-0", "not-json", "not-object", "truncated", "bom", "bad-utf8", "duplicate",
        "missing", "bad-value", "bad-codec", "bad-id", "too-large",
    ]))
    trailing = draw(junk)
    if kind == "hlen-0":
        return Garbage(b"\x00\x00" + trailing, 2, "bad-header-length", NO_ID)
    if kind == "not-json":  # random bytes that can't be a JSON object
        raw = draw(st.binary(min_size=1, max_size=40).filter(
            lambda b: not b.lstrip(b" \t\r\n").startswith(b"{")))
        return _header_garbage(raw, trailing, "bad-header", NO_ID)
    if kind == "not-object":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return _header_garbage(json.dumps(value).encode(), trailing, "bad-header", NO_ID)
    good = draw(raw_header(draw(base_header(draw(ids)))))
    if kind == "truncated":
        raw = good[: draw(st.integers(1, len(good) - 1))]
        return _header_garbage(raw, trailing, "bad-header", NO_ID)
    if kind == "bom":
        return _header_garbage(b"\xef\xbb\xbf" + good, trailing, "bad-header", NO_ID)
    if kind == "bad-utf8":
        raw = b'{"x-bad": "' + draw(st.sampled_from(INVALID_UTF8)) + b'", ' + good[1:]
        return _header_garbage(raw, trailing, "bad-header", NO_ID)
    if kind == "duplicate":
        key = draw(st.sampled_from(REQUIRED_KEYS))
        value = json.loads(good)[key]
        again = json.dumps({key: draw(st.sampled_from([value, "big", 7]))})
        raw = good[:-1] + b", " + again[1:].encode()
        # Whether the id of a header that did not parse is echoed: not checked.
        return _header_garbage(raw, trailing, "bad-header", ANY_ID)
    expected_id = request_id = draw(ids)
    header = draw(base_header(request_id))
    if kind == "missing":
        del header[draw(st.sampled_from(REQUIRED_KEYS))]
        code = "missing-header"
    elif kind == "bad-value":
        key = draw(st.sampled_from(REQUIRED_KEYS))
        header[key] = draw(st.sampled_from(BAD_VALUES[key]))
        code = "bad-header-value"
    elif kind == "bad-codec":
        header["content-type"] = "text/json"
        header["content-encoding"] = draw(st.sampled_from(NON_TEXT_CODECS).filter(bool))
        code = "bad-header-value"
    elif kind == "bad-id":
        header["id"] = draw(invalid_ids)
        code, expected_id = "bad-header-value", NO_ID
    else:  # too-large: the content is never read, so none need follow
        header["content-length"] = draw(st.integers(MAX_CONTENT + 1, 2**53))
        code = "content-too-large"
    return _header_garbage(draw(raw_header(header)), trailing, code, expected_id)


# -- reading answers ------------------------------------------------------------------


def read_frame(reader: FrameReader, what: str) -> tuple[dict[str, Any], bytes] | None:
    """The next answer, checked against docs/protocol.md ("Frames"); None for an
    EOF between frames. `what` names the connection in messages."""
    try:
        return reader.frame()
    except socket.timeout:
        raise AssertionError(f"{what}: no complete answer within {SOCK_TIMEOUT} s") from None
    except PeerClosed as exc:
        if exc.partial:
            raise AssertionError(f"{what}: EOF inside an answer ({exc})") from None
        return None


def check_answer(conn: Conn, expect: Expect, header: dict[str, Any], content: bytes) -> None:
    where = f"{conn}: expected {expect!r}, got {header!r} {content[:100]!r}"
    if expect.kind == "error":
        try:
            check_error_frame(header, content, expect.code, expect.id)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        return
    assert header["content-type"] == expect.content_type, where
    assert header["content-encoding"] == expect.content_encoding, where
    assert content == expect.content, where
    assert same_id(expect.id, header.get("id", NO_ID)), where


def send_in_chunks(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if start < cut <= len(data):
            sock.sendall(data[start:cut])
            start = cut


def draw_cuts(data: Any, length: int, max_cuts: int = 4) -> list[int]:
    if length < 2:
        return []
    return data.draw(st.lists(st.integers(1, length - 1), max_size=max_cuts), label="cuts")


# -- the machine ------------------------------------------------------------------------


class _ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class EchoServerMachine(RuleBasedStateMachine):
    conns = Bundle("conns")

    def __init__(self) -> None:
        super().__init__()
        self.server = ServerThread("echo", limits=LIMITS).start()
        self.errors = _ErrorLog()  # a bug in the server's I/O paths is logged and swallowed
        logging.getLogger("multiconn").addHandler(self.errors)
        self.live: list[Conn] = []  # open, and still in the model
        self.finishing: list[Conn] = []  # half-closed or failed: owe answers, then EOF
        self.opened: list[Conn] = []
        self.probes = 0

    # -- helpers --

    # The model's bookkeeping (what is owed, which connections exist, which
    # have a partial frame) evolves from the drawn steps alone, so that every
    # draw is the same when hypothesis replays a case. What timing may change
    # (a partial frame that timed out, see the module docstring) only marks the
    # connection `dead`: its I/O is skipped from then on.

    def _may_have_timed_out(self, conn: Conn) -> bool:
        started = conn.first_partial if conn.partial is None else conn.partial.since
        return started is not None and time.monotonic() - started >= FRAME_TIMEOUT

    def _send(self, conn: Conn, data: bytes, cuts: Any = ()) -> None:
        """Send in chunks cut at `cuts`, completing a pending partial frame first."""
        partial, conn.partial = conn.partial, None
        if partial is not None:
            data = partial.rest + data
            cuts = [len(partial.rest), *(c + len(partial.rest) for c in cuts)]
            conn.expected.append(replace(partial.expect, partial_since=partial.since, partial_ids=partial.ids))
            if conn.first_partial is None:
                conn.first_partial = partial.since
        if conn.dead:
            return
        try:
            send_in_chunks(conn.sock, data, list(cuts))
        except OSError:
            # The server closes a connection whose partial frame timed out, so
            # a send may then fail. What the server sent before is still read
            # and checked: the model's reads are the oracle, not this send.
            if not self._may_have_timed_out(conn):
                raise

    def _shut_down(self, conn: Conn) -> None:
        if conn.dead:
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            if not self._may_have_timed_out(conn):
                raise

    def _timed_out(self, conn: Conn, header: dict[str, Any], content: bytes, since: float, ids: tuple) -> bool:
        """Is this the frame timeout of a partial frame (and could it be)? Then EOF follows."""
        error = error_of(header, content)
        if error is None or error[0] != "timeout":
            return False
        elapsed = time.monotonic() - since
        assert elapsed >= FRAME_TIMEOUT, f"{conn}: timeout error only {elapsed:.3f} s after the frame's first byte"
        got_id = header.get("id", NO_ID)
        assert any(same_id(i, got_id) for i in ids), f"{conn}: timeout error with id {got_id!r}, expected one of {ids}"
        # Bytes we sent after the server closed may earn a reset instead of EOF.
        self._expect_eof(conn, reset_ok=True)
        conn.dead = True
        return True

    def _read_owed(self, conn: Conn, count: int | None = None) -> None:
        """Read `count` (default: all) owed answers, checking each against the model."""
        count = len(conn.expected) if count is None else count
        for _ in range(count):
            expect = conn.expected.popleft()
            if conn.dead:
                continue
            conn.sock.settimeout(SOCK_TIMEOUT)
            answer = read_frame(conn.reader, str(conn))
            if answer is None:
                raise AssertionError(f"{conn}: EOF, still owed {expect!r} and {len(conn.expected)} more")
            header, content = answer
            if expect.partial_since is not None and self._timed_out(
                    conn, header, content, expect.partial_since, expect.partial_ids):
                continue
            check_answer(conn, expect, header, content)
            if expect.fatal:
                assert not conn.expected, "the model owes nothing after a fatal error"
                self._expect_eof(conn)

    def _expect_eof(self, conn: Conn, reset_ok: bool = False) -> None:
        conn.sock.settimeout(SOCK_TIMEOUT)
        try:
            conn.reader.eof()
        except socket.timeout:
            raise AssertionError(f"{conn}: the server did not close within {SOCK_TIMEOUT} s") from None
        except ConnectionResetError:
            if not reset_ok:
                raise AssertionError(f"{conn}: reset instead of EOF (an answer may have been destroyed)") from None
        except AssertionError as exc:
            raise AssertionError(f"{conn}: {exc}") from None
        conn.eof = True

    def _finish(self, conn: Conn) -> None:
        """A half-closed or failed connection: owed answers, then EOF (a partial frame is dropped)."""
        self._read_owed(conn)
        if not (conn.dead or conn.eof):
            partial = conn.partial
            conn.sock.settimeout(SOCK_TIMEOUT)
            answer = read_frame(conn.reader, str(conn))
            if answer is None:
                conn.eof = True
            else:
                header, content = answer
                assert partial is not None and self._timed_out(
                    conn, header, content, partial.since, partial.ids), \
                    f"{conn}: unexpected frame before EOF: {header!r} {content[:100]!r}"
        conn.sock.close()

    # -- rules --

    @precondition(lambda self: len(self.live) < MAX_CONNS)
    @rule(target=conns)
    def open_connection(self) -> Conn:
        sock = socket.create_connection(self.server.address, timeout=SOCK_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, len(self.opened))
        self.opened.append(conn)
        self.live.append(conn)
        return conn

    @rule(conn=conns, batch=st.lists(requests, min_size=1, max_size=5), data=st.data())
    def send_batch(self, conn: Conn, batch: list[Req], data: Any) -> None:
        """Pipelined requests (some with content that is not JSON), in random chunks."""
        payload = b"".join(r.data for r in batch)
        self._send(conn, payload, draw_cuts(data, len(payload)))
        conn.expected.extend(replace(r.expect) for r in batch)

    @rule(conn=conns, before=st.lists(valid_requests(), max_size=2), bad=bad_content_requests(),
          after=st.lists(valid_requests(), max_size=2))
    def send_bad_content(self, conn: Conn, before: list[Req], bad: Req, after: list[Req]) -> None:
        """Content that is not JSON: a bad-content error in its place; the connection stays open."""
        batch = [*before, bad, *after]
        self._send(conn, b"".join(r.data for r in batch))
        conn.expected.extend(replace(r.expect) for r in batch)

    @rule(conn=conns, req=requests, data=st.data())
    def send_partial(self, conn: Conn, req: Req, data: Any) -> None:
        """A strict prefix of a request; a later rule finishes it, or it is dropped."""
        size = data.draw(st.integers(1, len(req.data) - 1), label="prefix")
        cuts = draw_cuts(data, size, 2)
        self._send(conn, b"")  # finishes an earlier partial frame, if any
        since = time.monotonic()
        self._send(conn, req.data[:size], cuts)
        # A timeout error carries the id only once the server had the whole header.
        ids = (req.expect.id,) if size >= req.header_end else (NO_ID, req.expect.id)
        conn.partial = Partial(req.data[size:], since, ids, replace(req.expect))

    @precondition(lambda self: any(c.partial for c in self.live))
    @rule(data=st.data())
    def complete_partial(self, data: Any) -> None:
        conn = data.draw(st.sampled_from([c for c in self.live if c.partial]), label="conn")
        self._send(conn, b"", draw_cuts(data, len(conn.partial.rest), 3))

    @rule(conn=conns, data=st.data())
    def read_some(self, conn: Conn, data: Any) -> None:
        """Read some of the owed answers (the rest stay pipelined)."""
        if conn.expected:
            self._read_owed(conn, data.draw(st.integers(1, len(conn.expected)), label="count"))

    @rule(conn=consumes(conns), before=st.lists(requests, max_size=3), garbage=fatal_garbage(),
          then_shut_down=st.booleans(), data=st.data())
    def send_fatal(self, conn: Conn, before: list[Req], garbage: Garbage, then_shut_down: bool, data: Any) -> None:
        """Garbage: the answers to what came before, then one error frame, then EOF."""
        self.live.remove(conn)
        prefix = b"".join(r.data for r in before)
        payload = prefix + garbage.data
        # Random chunks up to the decisive byte; the decisive byte and the junk
        # after it in one send, so that nothing arrives after the server closed.
        cut = data.draw(st.integers(0, len(prefix) + garbage.decisive - 1), label="cut")
        cuts = draw_cuts(data, cut, 3)
        self._send(conn, payload[:cut], cuts)
        self._send(conn, payload[cut:])
        conn.expected.extend(replace(r.expect) for r in before)
        conn.expected.append(Expect("error", garbage.id, code=garbage.code))
        if then_shut_down:
            self._shut_down(conn)
        self.finishing.append(conn)

    @rule(conn=consumes(conns))
    def half_close(self, conn: Conn) -> None:
        """Shut down our sending side: answers to complete frames, then EOF."""
        self.live.remove(conn)
        self._shut_down(conn)
        self.finishing.append(conn)

    @precondition(lambda self: self.finishing)
    @rule(data=st.data())
    def check_finishing(self, data: Any) -> None:
        conn = data.draw(st.sampled_from(self.finishing), label="conn")
        self.finishing.remove(conn)
        self._finish(conn)

    @rule(conn=consumes(conns))
    def reset(self, conn: Conn) -> None:
        """SO_LINGER 0 and close, without reading: the server sees a reset."""
        self.live.remove(conn)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.sock.close()

    # -- invariants and teardown --

    @invariant()
    def server_serves_a_fresh_connection(self) -> None:
        assert self.server.error is None, f"server thread raised {self.server.error!r}"
        assert self.server._thread.is_alive(), "server thread died"
        self.probes += 1
        content = f"probe {self.probes}".encode()
        request = raw_frame(json.dumps(make_header("binary/probe", "binary", len(content), self.probes)).encode(),
                              content)
        with socket.create_connection(self.server.address, timeout=SOCK_TIMEOUT) as sock:
            sock.sendall(request)
            frame = read_frame(FrameReader(sock), f"probe {self.probes}")
        assert frame is not None, f"probe {self.probes}: EOF instead of the answer"
        header, answer = frame
        assert (header.get("id"), header["content-type"], answer) == (self.probes, "binary/probe", content)

    def teardown(self) -> None:
        try:
            for conn in self.finishing:
                self._finish(conn)
            for conn in list(self.live):
                self._read_owed(conn)
            for conn in self.opened:
                conn.sock.close()
            # Every connection we closed is closed by the server too.
            deadline = time.monotonic() + 10
            while self.server.server.connections and time.monotonic() < deadline:
                time.sleep(0.005)
            assert not self.server.server.connections, f"connections left open: {self.server.server.connections}"
            errors = [r.getMessage() for r in self.errors.records]
            assert not errors, f"server logged errors: {errors}"
        finally:
            for conn in self.opened:
                conn.sock.close()
            logging.getLogger("multiconn").removeHandler(self.errors)
            self.server.stop()
        assert self.server.error is None, f"server thread raised {self.server.error!r}"


EchoServerMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    # One shrunk failure, in reasonable time: every case starts a server.
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Passing takes a few seconds; shrinking a failure can take minutes.
TestEchoServerStateful = pytest.mark.timeout(600)(EchoServerMachine.TestCase)


# -- regressions --------------------------------------------------------------------------

MiB = 1 << 20


def test_half_close_after_fatal_error_gets_queued_answers(start_server: Any) -> None:
    """Pipelined requests, garbage, then a half-close: every answer, the error frame, then EOF.

    The answers (16 MiB) cannot all fit the kernel's socket buffers, so the
    server still holds some of them when it reads the client's EOF. The test
    reads nothing until the server has closed the connection (or 3 s have
    passed, which is what a correct server makes it wait), so the outcome does
    not depend on how fast either side runs.
    """
    limits = Limits(high_water=64 * MiB, low_water=1 * MiB, max_content=16 * MiB, error_linger=0.2)
    server = start_server("echo", limits=limits)
    sock = socket.create_connection(server.address, timeout=SOCK_TIMEOUT)
    contents = [bytes([i]) * (4 * MiB) for i in range(4)]
    payload = b"".join(
        raw_frame(json.dumps(make_header("binary/x", "binary", len(c), i)).encode(), c)
        for i, c in enumerate(contents)
    ) + b"\x00\x00"

    def send() -> None:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 3.0
        while server.server.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        sock.settimeout(10.0)
        reader = FrameReader(sock)
        for i, content in enumerate(contents):
            header, answer = reader.frame()
            assert (header.get("id"), len(answer)) == (i, len(content))
            assert answer == content
        header, answer = reader.frame()
        check_error_frame(header, answer, "bad-header-length")
        reader.eof()
    finally:
        sender.join(10)
        sock.close()

"""Tests of the sans-IO wire protocol (docs/protocol.md: frames and errors).

Every decoder test runs twice, like h11's tests do: once with the whole input in
one ``feed`` and once one byte per ``feed`` (the ``mode`` fixture), so that the
incremental paths (buffered tail, pending header, header cache) are exercised
by the same assertions.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multiconn import protocol
from multiconn.errors import MulticonnError, ProtocolError
from multiconn.protocol import (
    DEFAULT_MAX_CONTENT,
    LARGE_CONTENT,
    TEXT_ENCODINGS,
    ErrorCode,
    Frame,
    FrameDecoder,
    encode_frame,
    encode_frames,
)

from helpers import header_bytes, raw_frame  # hand-built wire bytes, independent of the codec under test

REQUIRED = ("byteorder", "content-type", "content-encoding", "content-length")
DECODER_CODES = {
    ErrorCode.BAD_HEADER_LENGTH,
    ErrorCode.BAD_HEADER,
    ErrorCode.MISSING_HEADER,
    ErrorCode.BAD_HEADER_VALUE,
    ErrorCode.CONTENT_TOO_LARGE,
}


# -- helpers ----------------------------------------------------------------


def hdr(content: bytes = b"", **extra: Any) -> dict[str, Any]:
    """A valid binary header for `content`; keyword args override/add keys
    (underscores in names become dashes)."""
    header: dict[str, Any] = {
        "byteorder": "big",
        "content-type": "binary/octet-stream",
        "content-encoding": "binary",
        "content-length": len(content),
    }
    for key, value in extra.items():
        header[key.replace("_", "-")] = value
    return header


def chunks(data: bytes, mode: str) -> list[bytes]:
    if mode == "whole":
        return [data]
    return [data[i : i + 1] for i in range(len(data))]


def feed_all(decoder: FrameDecoder, data: bytes, mode: str) -> list[Frame]:
    frames: list[Frame] = []
    for chunk in chunks(data, mode):
        frames.extend(decoder.feed(chunk))
    return frames


def feed_until_error(
    data: bytes, mode: str, decoder: FrameDecoder | None = None
) -> tuple[ProtocolError, list[Frame]]:
    """Feed `data`; it must raise. Return the error and the frames returned by
    the feeds that succeeded before it."""
    decoder = decoder if decoder is not None else FrameDecoder()
    got: list[Frame] = []
    for chunk in chunks(data, mode):
        try:
            got.extend(decoder.feed(chunk))
        except ProtocolError as exc:
            return exc, got
    pytest.fail(f"no ProtocolError for {data!r}; decoded {got!r}")


@pytest.fixture(params=["whole", "bytewise"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def split_header(wire: bytes) -> tuple[int, dict[str, Any], bytes]:
    hlen = int.from_bytes(wire[:2], "big")
    header = json.loads(wire[2 : 2 + hlen].decode("utf-8"))
    return hlen, header, wire[2 + hlen :]


# -- 1. encoding --------------------------------------------------------------


def test_encode_frame_layout() -> None:
    wire = encode_frame(Frame.binary(b"\x00\x01abc", content_type="x/y", id=5))
    hlen, header, content = split_header(wire)
    assert wire[:2] == struct.pack(">H", hlen)
    assert header == {
        "byteorder": sys.byteorder,
        "content-type": "x/y",
        "content-encoding": "binary",
        "content-length": 5,
        "id": 5,
    }
    assert content == b"\x00\x01abc"
    assert len(wire) == 2 + hlen + 5


def test_encode_frame_hlen_is_big_endian_for_long_headers() -> None:
    frame = Frame.binary(b"", id="x" * 300)
    wire = encode_frame(frame)
    hlen = len(wire) - 2
    assert hlen > 255
    assert wire[0] == hlen >> 8 and wire[1] == hlen & 0xFF


def test_encoder_overrides_byteorder_and_content_length() -> None:
    frame = Frame(
        {"content-type": "a/b", "content-encoding": "binary", "byteorder": "middle",
         "content-length": 999},
        b"xyz",
    )
    _, header, content = split_header(encode_frame(frame))
    assert header["byteorder"] == sys.byteorder
    assert header["content-length"] == 3
    assert content == b"xyz"
    assert frame.header["content-length"] == 999  # the frame itself is not mutated


def test_encode_frames_is_concatenation() -> None:
    frames = [Frame.json({"a": 1}, id=1), Frame.binary(b"zz"), Frame.json([], id="q")]
    assert encode_frames(frames) == b"".join(encode_frame(f) for f in frames)
    assert encode_frames([]) == b""
    assert encode_frames(iter(frames)) == encode_frames(frames)


def test_frame_json_helper() -> None:
    value = {"action": "search", "value": "🐶", "n": [1, 2.5, None, True]}
    frame = Frame.json(value, id=3)
    assert frame.header == {"content-type": "text/json", "content-encoding": "utf-8", "id": 3}
    assert frame.content == json.dumps(value, ensure_ascii=False).encode("utf-8")
    assert "🐶".encode("utf-8") in frame.content
    assert frame.is_json and frame.content_type == "text/json"
    assert frame.content_encoding == "utf-8"
    assert frame.id == 3
    assert frame.json_content() == value


def test_frame_json_without_id_has_no_id_key_but_id_zero_is_kept() -> None:
    assert "id" not in Frame.json(1).header
    assert Frame.json(1).id is None
    assert Frame.json(1, id=0).header["id"] == 0
    assert Frame.json(1, id="").header["id"] == ""


def test_frame_json_other_encoding() -> None:
    frame = Frame.json({"k": "é"}, encoding="utf-16")
    assert frame.content_encoding == "utf-16"
    assert json.loads(frame.content.decode("utf-16")) == {"k": "é"}
    decoded = FrameDecoder().feed(encode_frame(frame))[0]
    assert decoded.json_content() == {"k": "é"}


def test_frame_binary_helper() -> None:
    frame = Frame.binary(bytearray(b"ab"), id="r1")
    assert frame.header == {
        "content-type": "binary/octet-stream", "content-encoding": "binary", "id": "r1"
    }
    assert frame.content == b"ab" and type(frame.content) is bytes
    assert not frame.is_json
    custom = Frame.binary(b"", content_type="binary/custom", encoding="zip")
    assert custom.header == {"content-type": "binary/custom", "content-encoding": "zip"}


def test_frame_error_helper_and_error_info() -> None:
    frame = Frame.error(ErrorCode.BAD_HEADER, "no good", id=9)
    assert frame.header == {"content-type": "text/json", "content-encoding": "utf-8", "id": 9}
    assert json.loads(frame.content.decode("utf-8")) == {
        "error": {"code": "bad-header", "message": "no good"}
    }
    assert frame.error_info == ("bad-header", "no good")
    decoded = FrameDecoder().feed(encode_frame(frame))[0]
    assert decoded.error_info == ("bad-header", "no good")
    assert decoded.id == 9


@pytest.mark.parametrize(
    "frame",
    [
        Frame.binary(b'{"error": {"code": "x", "message": "y"}}'),
        Frame.json({"result": "ok"}),
        Frame.json({"error": {"code": "x", "message": "y"}, "more": 1}),
        Frame.json({"error": {"code": 1, "message": "y"}}),
        Frame.json({"error": {"code": "x"}}),
        Frame.json({"error": "x"}),
        Frame.json([{"error": {"code": "x", "message": "y"}}]),
        Frame({"content-type": "text/json", "content-encoding": "utf-8"}, b"{not json"),
    ],
)
def test_error_info_none_for_non_error_frames(frame: Frame) -> None:
    assert frame.error_info is None


def test_json_content_is_parsed_from_decoded_bytes() -> None:
    frame = Frame({"content-type": "text/json", "content-encoding": "UTF_8"}, b' {"a": [1, "\xc3\xa9"]} ')
    assert frame.json_content() == {"a": [1, "é"]}


@pytest.mark.parametrize("request_id", [0, 1, -1, 2**63, 10**30, "", "abc", "🐶 id", "7"])
def test_ids_round_trip(request_id: Any, mode: str) -> None:
    wire = encode_frame(Frame.binary(b"x", id=request_id)) + encode_frame(
        Frame.json({"v": 1}, id=request_id)
    )
    frames = feed_all(FrameDecoder(), wire, mode)
    assert [f.id for f in frames] == [request_id, request_id]
    assert all(type(f.id) is type(request_id) for f in frames)


def test_non_ascii_header_values_and_content() -> None:
    frame = Frame.binary(
        "контент ✓".encode("utf-8"), content_type="x/ünï", encoding="bïnary", id="ключ🐶"
    )
    wire = encode_frame(frame)
    hlen, header, content = split_header(wire)
    # hlen counts UTF-8 bytes, not characters.
    raw = wire[2 : 2 + hlen]
    assert len(raw) == hlen and len(raw.decode("utf-8")) < hlen
    assert header["content-type"] == "x/ünï"
    assert header["content-encoding"] == "bïnary"
    assert header["id"] == "ключ🐶"
    assert content == "контент ✓".encode("utf-8")
    (decoded,) = FrameDecoder().feed(wire)
    assert decoded.content_type == "x/ünï" and decoded.id == "ключ🐶"
    assert decoded.content == frame.content


def _padded(n_pad: int) -> Frame:
    return Frame({"content-type": "a", "content-encoding": "b", "pad": "p" * n_pad})


def test_header_size_limit() -> None:
    base = len(encode_frame(_padded(0))) - 2
    ok = encode_frame(_padded(65535 - base))
    assert int.from_bytes(ok[:2], "big") == 65535 and len(ok) == 2 + 65535
    (decoded,) = FrameDecoder().feed(ok)
    assert len(decoded.header["pad"]) == 65535 - base
    with pytest.raises(ValueError):
        encode_frame(_padded(65536 - base))
    with pytest.raises(ValueError):
        encode_frames([Frame.binary(b""), _padded(70000)])


def test_header_size_limit_counts_utf8_bytes() -> None:
    # 22000 three-byte characters = 66000 bytes but only 22000 characters.
    with pytest.raises(ValueError):
        encode_frame(Frame.binary(b"", id="€" * 22000))


def test_frame_equality() -> None:
    assert Frame.json({"a": 1}, id=1) == Frame.json({"a": 1}, id=1)
    assert Frame.json({"a": 1}, id=1) != Frame.json({"a": 1}, id=2)
    assert Frame.binary(b"a") != Frame.binary(b"b")
    assert Frame.binary(b"a") != "a"


# -- 2. decoding --------------------------------------------------------------


def test_decode_single_frame(mode: str) -> None:
    wire = raw_frame(hdr(b"hello", id=1), b"hello")
    frames = feed_all(FrameDecoder(), wire, mode)
    assert len(frames) == 1
    (frame,) = frames
    assert frame.header == hdr(b"hello", id=1)
    assert frame.content == b"hello"
    assert frame.id == 1


def test_decode_several_frames_in_one_feed(mode: str) -> None:
    parts = [
        (hdr(b"a", id=1), b"a"),
        (hdr(b"", id="two"), b""),
        (hdr(b'{"x": 1}', content_type="text/json", content_encoding="utf-8"), b'{"x": 1}'),
        (hdr(b"\x00" * 300, id=4), b"\x00" * 300),
    ]
    wire = b"".join(raw_frame(h, c) for h, c in parts)
    decoder = FrameDecoder()
    frames = feed_all(decoder, wire, mode)
    assert [f.header for f in frames] == [h for h, _ in parts]
    assert [f.content for f in frames] == [c for _, c in parts]
    assert frames[2].json_content() == {"x": 1}
    assert not decoder.has_partial and decoder.buffered == 0


def test_whole_feed_returns_all_frames_at_once() -> None:
    wire = raw_frame(hdr(b"1"), b"1") * 5
    assert len(FrameDecoder().feed(wire)) == 5


def test_decode_zero_length_content(mode: str) -> None:
    wire = raw_frame(hdr(b"", id=5))
    decoder = FrameDecoder()
    if mode == "bytewise":
        # The frame is complete with the last header byte.
        for byte in chunks(wire[:-1], mode):
            assert decoder.feed(byte) == []
        frames = decoder.feed(wire[-1:])
    else:
        frames = decoder.feed(wire)
    assert [(f.content, f.id) for f in frames] == [(b"", 5)]
    assert not decoder.has_partial


def test_feed_empty_bytes() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert not decoder.has_partial
    decoder.feed(b"\x00")
    assert decoder.feed(b"") == []
    assert decoder.has_partial


def test_feed_accepts_bytearray_and_memoryview() -> None:
    wire = raw_frame(hdr(b"abc"), b"abc")
    for data in (bytearray(wire), memoryview(wire)):
        (frame,) = FrameDecoder().feed(data)
        assert frame.content == b"abc" and type(frame.content) is bytes


def test_a_decoder_holds_an_input_buffer_only_once_bytes_must_wait() -> None:
    # Every idle connection has a decoder: one that has only seen whole frames
    # (a new header, then the cached one) holds nothing but itself.
    wire = raw_frame(hdr(b"abc"), b"abc") + raw_frame(hdr(b"abc", id=7), b"abc")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoders = [FrameDecoder() for _ in range(1000)]
        for decoder in decoders:
            assert len(decoder.feed(wire)) == 2 and not decoder.has_partial
        held = (tracemalloc.get_traced_memory()[0] - before) / len(decoders)
    finally:
        tracemalloc.stop()
    assert held < sys.getsizeof(decoders[0]) + 24, held  # the decoder, its place in the list, the cache
    # Bytes that wait get a buffer of their own, from any kind of input, and
    # after an error the decoder still refuses alike.
    for kind in (bytes, bytearray, memoryview):
        first, second = FrameDecoder(), FrameDecoder()
        assert first.feed(kind(wire[:5])) == [] and second.feed(kind(wire[:3])) == []
        assert [f.content for f in first.feed(kind(wire[5:]))] == [b"abc", b"abc"]
        assert [f.content for f in second.feed(kind(wire[3:]))] == [b"abc", b"abc"]
    broken = FrameDecoder()
    assert broken.feed(b"\x00") == [] and broken.buffered == 1
    for _ in range(2):
        with pytest.raises(ProtocolError, match="header length is 0"):
            broken.feed(b"\x00")
    assert broken.buffered == 0


def test_frame_split_anywhere() -> None:
    parts = [(hdr(b"abcdef", id=1), b"abcdef"), (hdr(b"", id=2), b""), (hdr(b"xy"), b"xy")]
    wire = b"".join(raw_frame(h, c) for h, c in parts)
    expected = [Frame(h, c) for h, c in parts]
    for i in range(len(wire) + 1):
        for j in range(i, len(wire) + 1, 7):
            decoder = FrameDecoder()
            got = decoder.feed(wire[:i]) + decoder.feed(wire[i:j]) + decoder.feed(wire[j:])
            assert got == expected, (i, j)
            assert not decoder.has_partial


def test_decoder_does_not_return_frames_early() -> None:
    wire = raw_frame(hdr(b"abc"), b"abc")
    decoder = FrameDecoder()
    assert decoder.feed(wire[:-1]) == []
    assert decoder.buffered == 2  # the two content bytes so far
    assert [f.content for f in decoder.feed(wire[-1:] + wire[:3])] == [b"abc"]
    assert decoder.buffered == 3


def test_has_partial_and_partial_id(mode: str) -> None:
    content = b"0123456789"
    wire = raw_frame(hdr(content, id="req-1"), content)
    header_end = len(wire) - len(content)
    decoder = FrameDecoder()
    assert not decoder.has_partial and decoder.partial_id is None
    fed = 0
    for chunk in chunks(wire, mode):
        frames = decoder.feed(chunk)
        fed += len(chunk)
        if fed < len(wire):
            assert frames == []
            assert decoder.has_partial
            assert decoder.partial_id == ("req-1" if fed >= header_end else None)
    assert [f.id for f in frames] == ["req-1"]
    assert not decoder.has_partial and decoder.partial_id is None


def test_partial_id_exactly_at_header_end() -> None:
    content = b"abc"
    wire = raw_frame(hdr(content, id=42), content)
    header_end = len(wire) - len(content)
    decoder = FrameDecoder()
    assert decoder.feed(wire[: header_end - 1]) == []
    assert decoder.has_partial and decoder.partial_id is None
    assert decoder.feed(wire[header_end - 1 : header_end]) == []
    assert decoder.has_partial and decoder.partial_id == 42
    assert decoder.buffered == 0
    assert [f.id for f in decoder.feed(wire[header_end:])] == [42]


def test_partial_id_none_without_id() -> None:
    wire = raw_frame(hdr(b"abc"), b"abc")
    decoder = FrameDecoder()
    decoder.feed(wire[:-1])
    assert decoder.has_partial and decoder.partial_id is None


def test_partial_id_of_second_frame_after_first_completes() -> None:
    wire = raw_frame(hdr(b"a", id=1), b"a") + raw_frame(hdr(b"bb", id=2), b"bb")
    decoder = FrameDecoder()
    assert [f.id for f in decoder.feed(wire[:-1])] == [1]
    assert decoder.has_partial and decoder.partial_id == 2


def test_extra_header_keys_are_ignored(mode: str) -> None:
    header = hdr(b"c", id=1, x_custom={"nested": [1, 2]}, **{"": None, "🐶": "woof"})
    header["content-lengthx"] = "not-a-number"
    header["byteOrder"] = 17
    frames = feed_all(FrameDecoder(), raw_frame(header, b"c"), mode)
    assert len(frames) == 1
    assert frames[0].content == b"c"
    assert frames[0].header == header  # kept, but not validated


def test_header_key_order_is_free(mode: str) -> None:
    raw = b'{"id": 3, "content-length": 2, "content-encoding": "binary", "x": 0, "content-type": "a/b", "byteorder": "little"}'
    frames = feed_all(FrameDecoder(), raw_frame(raw, b"hi"), mode)
    assert [(f.content_type, f.content_encoding, f.id, f.content) for f in frames] == [
        ("a/b", "binary", 3, b"hi")
    ]
    assert frames[0].header["byteorder"] == "little"


def test_header_whitespace_is_allowed(mode: str) -> None:
    raw = b' \n{ "byteorder" : "big" ,"content-type":"t","content-encoding":"e",\t"content-length":1 }\r\n'
    frames = feed_all(FrameDecoder(), raw_frame(raw, b"z"), mode)
    assert [f.content for f in frames] == [b"z"]


def test_same_header_bytes_many_frames(mode: str) -> None:
    # Exercises the decoder's header cache: frames from identical header bytes
    # must still be independent objects with their own content.
    wire = b"".join(raw_frame(hdr(b"abcd"), bytes([i]) * 4) for i in range(5))
    frames = feed_all(FrameDecoder(), wire, mode)
    assert [f.content for f in frames] == [bytes([i]) * 4 for i in range(5)]
    frames[0].header["content-type"] = "mutated"
    assert frames[1].header["content-type"] == "binary/octet-stream"
    (again,) = FrameDecoder().feed(raw_frame(hdr(b"abcd"), b"abcd"))
    assert again.header == hdr(b"abcd")


def test_decoded_frames_round_trip_through_encoder() -> None:
    original = [Frame.json({"a": "é"}, id=1), Frame.binary(b"\xff\x00", id="b")]
    decoded = FrameDecoder().feed(encode_frames(original))
    for orig, dec in zip(original, decoded):
        assert {k: v for k, v in dec.header.items() if k not in ("byteorder", "content-length")} == orig.header
        assert dec.content == orig.content
    assert encode_frames(decoded) == encode_frames(original)


def test_max_content_boundary(mode: str) -> None:
    wire = raw_frame(hdr(b"0123456789"), b"0123456789")
    frames = feed_all(FrameDecoder(max_content=10), wire, mode)
    assert [f.content for f in frames] == [b"0123456789"]


def _no_parse(self: FrameDecoder, data: Any, is_view: bool, frames: list[Frame], pos: int = 0) -> int:
    raise AssertionError("the read took the general path")


def test_a_whole_frame_with_a_known_header_skips_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """`feed`'s first lines: one whole frame, its header cached, nothing buffered."""
    wire = raw_frame(hdr(b"whole", x_fast="yes"), b"whole")
    decoder = FrameDecoder()
    (first,) = decoder.feed(wire)  # the general path parses and caches the header
    with monkeypatch.context() as patch:
        patch.setattr(FrameDecoder, "_parse", _no_parse)
        (second,) = decoder.feed(wire)
        (third,) = decoder.feed(wire)
    assert second == first and second.content == b"whole" and type(second.content) is bytes
    assert second.header is not first.header and second.header is not third.header
    second.header["x-fast"] = "changed"
    assert third.header["x-fast"] == "yes" and decoder.feed(wire)[0].header["x-fast"] == "yes"
    assert not decoder.has_partial and decoder.buffered == 0


@pytest.mark.parametrize("read", [
    "frame and a byte", "frame less a byte", "two frames", "after a partial", "bytearray", "memoryview",
])
def test_reads_that_are_not_one_whole_frame_take_the_general_path(read: str) -> None:
    wire = raw_frame(hdr(b"whole"), b"whole")
    decoder = FrameDecoder()
    assert len(decoder.feed(wire)) == 1  # the header is cached from here on
    reads: list[Any] = {
        "frame and a byte": [wire + wire[:1], wire[1:]],
        "frame less a byte": [wire[:-1], wire[-1:] + wire],
        "two frames": [wire + wire],
        "after a partial": [wire[:3], wire[3:] + wire],
        "bytearray": [bytearray(wire), bytearray(wire)],
        "memoryview": [memoryview(wire + wire)],
    }[read]
    frames = [frame for data in reads for frame in decoder.feed(data)]
    assert [frame.content for frame in frames] == [b"whole", b"whole"]
    assert all(type(frame.content) is bytes for frame in frames)
    assert not decoder.has_partial and decoder.buffered == 0


class _CountingCache(dict):  # type: ignore[type-arg]
    lookups = 0

    def get(self, key: Any, default: Any = None) -> Any:
        self.lookups += 1
        return super().get(key, default)


@pytest.mark.parametrize("frames_in_read", [2, 3, 16])
def test_a_read_of_several_frames_looks_up_its_first_header_once(
        monkeypatch: pytest.MonkeyPatch, frames_in_read: int) -> None:
    """The fast path's lookup of the first header is handed to the general path."""
    wire = raw_frame(hdr(b"several"), b"several")
    cache = _CountingCache()
    monkeypatch.setattr(protocol, "_header_cache", cache)
    decoder = FrameDecoder()
    decoder.feed(wire)  # cached from here on
    cache.lookups = 0
    frames = decoder.feed(wire * frames_in_read + wire[:5])
    assert [frame.content for frame in frames] == [b"several"] * frames_in_read
    assert cache.lookups == frames_in_read
    assert decoder.has_partial and decoder.feed(wire[5:])[0].content == b"several"
    assert not decoder.has_partial and decoder.buffered == 0


# -- headers that differ only in their id ------------------------------------

ID_LITERALS = [b"0", b"-0", b"7", b"-12", b"123456789012345678", b"1234567890123456789",  # the last: 19 digits
               b'""', b'"r1"', b'"with space"', "\"\u00fc\u2603\"".encode("utf-8"), b'"a\\"b"', b'"\\u00e9"',
               b"1.5", b"1e3", b"01", b"-", b"true", b"null", b"[1]", b'"\xff"', b'"a\x01"', b" 7"]


@pytest.fixture
def id_prefixes(monkeypatch: pytest.MonkeyPatch) -> dict[bytes, Any]:
    """An empty cache of known prefixes, and a count of the whole parses made."""
    cache: dict[bytes, Any] = {}
    monkeypatch.setattr(protocol, "_id_prefix_cache", cache)
    return cache


def _decoded_alone(header: bytes, content: bytes) -> Any:
    """What a header decodes to by the general parse alone (no prefix known)."""
    saved = dict(protocol._id_prefix_cache)
    protocol._id_prefix_cache.clear()
    try:
        return FrameDecoder().feed(raw_frame(header, content))
    except ProtocolError as exc:
        return (exc.code, exc.request_id)
    finally:
        protocol._id_prefix_cache.clear()
        protocol._id_prefix_cache.update(saved)


@pytest.mark.parametrize("literal", ID_LITERALS, ids=repr)
def test_an_id_after_a_known_prefix_decodes_as_the_whole_parse_does(
        id_prefixes: dict[bytes, Any], literal: bytes) -> None:
    """Once a header's rest is known, any id in its place (good or bad) gives
    the frame, or the error code and request id, that a whole parse gives."""
    prefix = json.dumps(hdr(b"abc")).encode("utf-8")[:-1]
    assert FrameDecoder().feed(raw_frame(prefix + b', "id": 5}', b"abc"))[0].header["id"] == 5
    assert list(id_prefixes) == [prefix]
    header = prefix + b', "id": ' + literal + b"}"
    expected = _decoded_alone(header, b"abc")
    try:
        got: Any = FrameDecoder().feed(raw_frame(header, b"abc"))
    except ProtocolError as exc:
        got = (exc.code, exc.request_id)
    if isinstance(expected, list):
        assert [(f.header, f.content) for f in got] == [(f.header, f.content) for f in expected]
        assert type(got[0].header["id"]) is type(expected[0].header["id"])
    else:
        assert got == expected


def test_headers_that_differ_only_in_their_id_are_parsed_whole_once(
        monkeypatch: pytest.MonkeyPatch, id_prefixes: dict[bytes, Any]) -> None:
    parses = []
    real = protocol.parse_header
    monkeypatch.setattr(protocol, "parse_header", lambda raw: parses.append(raw) or real(raw))
    wire = b"".join(raw_frame(hdr(b"xy", id=i), b"xy") for i in range(50))
    wire += b"".join(raw_frame(hdr(b"xy", id=f"s{i}"), b"xy") for i in range(50))
    frames = FrameDecoder().feed(wire)
    assert [f.header["id"] for f in frames] == [*range(50), *(f"s{i}" for i in range(50))]
    assert all(f.header == hdr(b"xy", id=f.header["id"]) for f in frames)
    assert len(parses) == 1
    frames[0].header["content-type"] = "changed"  # a frame's header is its own
    assert FrameDecoder().feed(raw_frame(hdr(b"xy", id=9), b"xy"))[0].header == hdr(b"xy", id=9)


@pytest.mark.parametrize("header", [
    # an id before the last one (the last wins, as json reads it)
    b'{"id": 1, "byteorder": "big", "content-type": "a/b", "content-encoding": "binary", "content-length": 0, "id": 2}',
    # the last "id" belongs to a nested object
    b'{"byteorder": "big", "content-type": "a/b", "content-encoding": "binary", "content-length": 0, "x": {"y": 1, "id": 2}}',
    # "id" inside a string value
    b'{"byteorder": "big", "content-type": "a/b", "content-encoding": "binary", "content-length": 0, "x": ", \\"id\\": 3}"}',
], ids=["two-ids", "nested", "in-a-string"])
def test_headers_whose_id_is_not_a_plain_last_member_are_not_remembered(
        id_prefixes: dict[bytes, Any], header: bytes) -> None:
    expected = json.loads(header)
    for _ in range(2):
        (frame,) = FrameDecoder().feed(raw_frame(header))
        assert frame.header == expected
    assert id_prefixes == {}


def test_long_headers_are_parsed_every_time_not_cached(
        monkeypatch: pytest.MonkeyPatch, id_prefixes: dict[bytes, Any]) -> None:
    """The header caches are shared by every connection: a peer must not fill
    them with headers of up to 64 KiB."""
    cache: dict[bytes, Any] = {}
    monkeypatch.setattr(protocol, "_header_cache", cache)
    padding = "p" * protocol._CACHED_HEADER_BYTES
    for header in (hdr(b"ab", x=padding), hdr(b"ab", x=padding, id=1), hdr(b"ab", x=padding, id=2)):
        (frame,) = FrameDecoder().feed(raw_frame(header, b"ab"))
        assert frame.header == header
    assert cache == {} and id_prefixes == {}
    FrameDecoder().feed(raw_frame(hdr(b"ab", x="short"), b"ab") + raw_frame(hdr(b"ab", x="short", id=1), b"ab"))
    assert len(cache) == 1 and len(id_prefixes) == 1


def test_a_read_that_cuts_a_header_where_a_shorter_cached_one_ends_is_not_taken_for_it() -> None:
    """JSON allows trailing whitespace, so a header cut short can be a whole, cached one."""
    header = json.dumps(hdr(b"abc")).encode("utf-8")
    decoder = FrameDecoder()
    assert decoder.feed(raw_frame(header, b"abc"))[0].content == b"abc"  # caches `header`
    longer = raw_frame(header + b"  ", b"xyz")
    cut = 2 + len(header)
    frames = decoder.feed(longer[:cut]) + decoder.feed(longer[cut:])
    assert [frame.content for frame in frames] == [b"xyz"]
    assert not decoder.has_partial and decoder.buffered == 0


def test_a_known_header_over_the_limit_is_refused_when_more_bytes_follow() -> None:
    wire = raw_frame(hdr(b"0123456789"), b"0123456789")
    assert len(FrameDecoder().feed(wire)) == 1  # caches the header with a decoder that allows it
    decoder = FrameDecoder(max_content=9)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(wire + wire)
    assert info.value.code == ErrorCode.CONTENT_TOO_LARGE and info.value.frames == []  # type: ignore[attr-defined]


def test_a_broken_decoder_refuses_even_a_whole_frame_with_a_known_header() -> None:
    wire = raw_frame(hdr(b"ok"), b"ok")
    decoder = FrameDecoder()
    assert len(decoder.feed(wire)) == 1
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00\x00")
    with pytest.raises(ProtocolError) as info:
        decoder.feed(wire)
    assert info.value.code == ErrorCode.BAD_HEADER_LENGTH


# -- 3. decoder errors -----------------------------------------------------------


def test_bad_header_length_zero(mode: str) -> None:
    exc, got = feed_until_error(b"\x00\x00" + b"{}", mode)
    assert exc.code == ErrorCode.BAD_HEADER_LENGTH
    assert exc.request_id is None
    assert got == [] and exc.frames == []


def test_bad_header_length_zero_raised_after_two_bytes() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"\x00") == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"\x00")
    assert info.value.code == "bad-header-length"


def test_protocol_error_is_a_multiconn_error() -> None:
    with pytest.raises(MulticonnError):
        FrameDecoder().feed(b"\x00\x00")
    error = ProtocolError("bad-header", "msg", 4)
    assert (error.code, error.message, error.request_id) == ("bad-header", "msg", 4)
    assert "bad-header" in str(error)


VALID_JSON = hdr(b"")


def _dup(key: str) -> bytes:
    body = json.dumps(VALID_JSON)[1:-1]
    return ("{" + body + ", " + json.dumps(key) + ": " + json.dumps(VALID_JSON[key]) + "}").encode()


BAD_HEADER_CASES = {
    "not-utf8": b'{"byteorder": "big", "content-type": "\xff\xfe", "content-encoding": "b", "content-length": 0}',
    "lone-continuation-byte": b"\x80",
    "overlong-utf8": b'{"byteorder": "big", "content-type": "\xc0\xaf", "content-encoding": "b", "content-length": 0}',
    "not-json": b"{",
    "not-json-text": b"hello",
    "trailing-garbage": header_bytes(VALID_JSON) + b"x",
    "two-objects": header_bytes(VALID_JSON) * 2,
    "single-quotes": b"{'byteorder': 'big'}",
    "json-array": b"[]",
    "json-array-of-object": b"[" + header_bytes(VALID_JSON) + b"]",
    "json-number": b"5",
    "json-string": b'"x"',
    "json-null": b"null",
    "json-true": b"true",
    "utf8-bom": b"\xef\xbb\xbf" + header_bytes(VALID_JSON),
    "utf16-header": json.dumps(VALID_JSON).encode("utf-16"),
    "dup-byteorder": _dup("byteorder"),
    "dup-content-type": _dup("content-type"),
    "dup-content-encoding": _dup("content-encoding"),
    "dup-content-length": _dup("content-length"),
    "dup-required-key-with-id": _dup("content-length")[:-1] + b', "id": 7}',
    "space": b" ",
}


@pytest.mark.parametrize("raw", list(BAD_HEADER_CASES.values()), ids=list(BAD_HEADER_CASES))
def test_bad_header(raw: bytes, mode: str) -> None:
    exc, got = feed_until_error(raw_frame(raw), mode)
    assert exc.code == ErrorCode.BAD_HEADER
    assert exc.request_id is None
    assert got == [] and exc.frames == []


def test_duplicate_key_cases_really_are_duplicates() -> None:
    # Guard the test data: the duplicate header is valid JSON whose last value
    # equals the first, so only the duplication can be at fault.
    for key in REQUIRED:
        raw = _dup(key)
        assert json.loads(raw) == VALID_JSON
        assert raw.count(json.dumps(key).encode()) == 2


def test_duplicate_non_required_key_is_not_an_error() -> None:
    raw = header_bytes(VALID_JSON)[:-1] + b', "x": 1, "x": 2}'
    (frame,) = FrameDecoder().feed(raw_frame(raw))
    assert frame.header["x"] == 2


def test_duplicate_required_key_inside_nested_object_is_not_an_error() -> None:
    raw = header_bytes(VALID_JSON)[:-1] + b', "x": {"content-length": 1, "content-length": 2}}'
    (frame,) = FrameDecoder().feed(raw_frame(raw))
    assert frame.header["content-length"] == 0


@pytest.mark.parametrize("missing", REQUIRED)
@pytest.mark.parametrize("request_id", [None, 7, "x"])
def test_missing_header(missing: str, request_id: Any, mode: str) -> None:
    header = hdr(b"")
    if request_id is not None:
        header["id"] = request_id
    del header[missing]
    exc, _ = feed_until_error(raw_frame(header), mode)
    assert exc.code == ErrorCode.MISSING_HEADER
    assert exc.request_id == request_id
    assert missing in exc.message


def test_empty_object_header_is_missing_header(mode: str) -> None:
    exc, _ = feed_until_error(raw_frame(b"{}"), mode)
    assert exc.code == ErrorCode.MISSING_HEADER
    assert exc.request_id is None


BAD_VALUE_CASES = {
    "negative-length": {"content-length": -1},
    "float-length": {"content-length": 1.0},
    "float-zero-length": {"content-length": 0.0},
    "bool-true-length": {"content-length": True},
    "bool-false-length": {"content-length": False},
    "string-length": {"content-length": "5"},
    "null-length": {"content-length": None},
    "list-length": {"content-length": [5]},
    "byteorder-unknown": {"byteorder": "middle"},
    "byteorder-case": {"byteorder": "Big"},
    "byteorder-sys": {"byteorder": "native"},
    "byteorder-int": {"byteorder": 1},
    "byteorder-null": {"byteorder": None},
    "empty-content-type": {"content-type": ""},
    "int-content-type": {"content-type": 5},
    "null-content-type": {"content-type": None},
    "empty-content-encoding": {"content-encoding": ""},
    "int-content-encoding": {"content-encoding": 8},
    "list-content-encoding": {"content-encoding": ["utf-8"]},
    "null-content-encoding": {"content-encoding": None},
    "json-binary-encoding": {"content-type": "text/json", "content-encoding": "binary"},
    "json-utf7-encoding": {"content-type": "text/json", "content-encoding": "utf-7"},
    "json-cp1252-encoding": {"content-type": "text/json", "content-encoding": "cp1252"},
    "json-utf8-space": {"content-type": "text/json", "content-encoding": "utf 8"},
    "json-utf8-trailing-space": {"content-type": "text/json", "content-encoding": "utf-8 "},
    "json-latin1-alias": {"content-type": "text/json", "content-encoding": "latin1"},
    "json-bogus-encoding": {"content-type": "text/json", "content-encoding": "no-such-codec"},
}


@pytest.mark.parametrize("override", list(BAD_VALUE_CASES.values()), ids=list(BAD_VALUE_CASES))
@pytest.mark.parametrize("request_id", [None, "x", 12])
def test_bad_header_value(override: dict[str, Any], request_id: Any, mode: str) -> None:
    header = hdr(b"")
    header.update(override)
    if request_id is not None:
        header["id"] = request_id
    exc, got = feed_until_error(raw_frame(header), mode)
    assert exc.code == ErrorCode.BAD_HEADER_VALUE
    assert exc.request_id == request_id
    assert got == []


@pytest.mark.parametrize(
    "bad_id", [[1], [], 1.5, 1.0, True, False, None, {"a": 1}], ids=repr
)
def test_bad_id_is_bad_header_value_without_request_id(bad_id: Any, mode: str) -> None:
    exc, _ = feed_until_error(raw_frame(hdr(b"", id=bad_id)), mode)
    assert exc.code == ErrorCode.BAD_HEADER_VALUE
    assert exc.request_id is None


def test_bad_id_wins_over_missing_key(mode: str) -> None:
    header = hdr(b"", id=[1])
    del header["byteorder"]
    exc, _ = feed_until_error(raw_frame(header), mode)
    assert exc.code in (ErrorCode.BAD_HEADER_VALUE, ErrorCode.MISSING_HEADER)
    assert exc.request_id is None


def test_binary_content_type_accepts_any_encoding(mode: str) -> None:
    wire = b"".join(
        raw_frame(hdr(b"q", content_encoding=enc), b"q")
        for enc in ("binary", "utf-7", "gzip", "x", "🐶")
    )
    frames = feed_all(FrameDecoder(), wire, mode)
    assert [f.content_encoding for f in frames] == ["binary", "utf-7", "gzip", "x", "🐶"]


def test_content_type_text_json_is_case_sensitive(mode: str) -> None:
    # Only exactly "text/json" is JSON; anything else is binary, so any encoding.
    frames = feed_all(
        FrameDecoder(), raw_frame(hdr(b"{}", content_type="Text/JSON"), b"{}"), mode
    )
    assert len(frames) == 1 and not frames[0].is_json


TEXT_CODEC_SPELLINGS = [
    ("utf-8", "utf-8"), ("UTF_8", "utf-8"), ("utf8", "utf-8"), ("UTF8", "utf-8"),
    ("Utf-8", "utf-8"), ("utf-16", "utf-16"), ("UTF_16", "utf-16"),
    ("utf-16-le", "utf-16-le"), ("UTF_16_LE", "utf-16-le"), ("utf-16-be", "utf-16-be"),
    ("utf_16-BE", "utf-16-be"), ("utf-32", "utf-32"), ("UTF-32", "utf-32"),
    ("utf-32-le", "utf-32-le"), ("Utf_32_Le", "utf-32-le"), ("utf-32-be", "utf-32-be"),
    ("UTF-32-BE", "utf-32-be"), ("ascii", "ascii"), ("ASCII", "ascii"),
    ("latin-1", "latin-1"), ("LATIN_1", "latin-1"), ("iso-8859-1", "iso-8859-1"),
    ("ISO_8859_1", "iso-8859-1"),
]


def test_text_encoding_list_matches_the_spec() -> None:
    assert TEXT_ENCODINGS == {
        "utf-8", "utf8", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
        "utf-32-le", "utf-32-be", "ascii", "latin-1", "iso-8859-1",
    }
    assert {codec for _, codec in TEXT_CODEC_SPELLINGS} | {"utf8"} == TEXT_ENCODINGS


@pytest.mark.parametrize("spelling,codec", TEXT_CODEC_SPELLINGS)
def test_text_json_encodings_accepted(spelling: str, codec: str, mode: str) -> None:
    value = {"k": "caf\u00e9" if codec not in ("ascii",) else "cafe", "n": [1, None]}
    text = json.dumps(value, ensure_ascii=False)
    content = text.encode(codec)
    header = hdr(content, content_type="text/json", content_encoding=spelling, id=1)
    frames = feed_all(FrameDecoder(), raw_frame(header, content), mode)
    assert len(frames) == 1
    assert frames[0].content_encoding == spelling
    assert frames[0].json_content() == value


# -- content-too-large -------------------------------------------------------------


@pytest.mark.parametrize("request_id", [None, 3, "big"])
def test_content_too_large_raised_on_header_alone(request_id: Any, mode: str) -> None:
    header = hdr(b"", content_length=11)
    if request_id is not None:
        header["id"] = request_id
    wire = raw_frame(header)  # header only: no content bytes at all
    exc, got = feed_until_error(wire, mode, FrameDecoder(max_content=10))
    assert exc.code == ErrorCode.CONTENT_TOO_LARGE
    assert exc.request_id == request_id
    assert got == []


def test_content_too_large_raised_with_last_header_byte() -> None:
    wire = raw_frame(hdr(b"", content_length=11))
    decoder = FrameDecoder(max_content=10)
    assert decoder.feed(wire[:-1]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(wire[-1:])
    assert info.value.code == "content-too-large"


def test_content_too_large_default_limit(mode: str) -> None:
    assert DEFAULT_MAX_CONTENT == 16 * 1024 * 1024
    wire = raw_frame(hdr(b"", content_length=DEFAULT_MAX_CONTENT + 1, id=1))
    exc, _ = feed_until_error(wire, mode)
    assert exc.code == ErrorCode.CONTENT_TOO_LARGE and exc.request_id == 1
    huge = raw_frame(hdr(b"", content_length=10**40))
    exc, _ = feed_until_error(huge, mode)
    assert exc.code == ErrorCode.CONTENT_TOO_LARGE


def test_default_limit_itself_is_allowed() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(raw_frame(hdr(b"", content_length=DEFAULT_MAX_CONTENT, id=8))) == []
    assert decoder.has_partial and decoder.partial_id == 8


def test_content_too_large_limit_is_per_decoder() -> None:
    # The header cache is shared; the limit must not be.
    wire = raw_frame(hdr(b"12345"), b"12345")
    assert len(FrameDecoder(max_content=100).feed(wire)) == 1
    with pytest.raises(ProtocolError) as info:
        FrameDecoder(max_content=4).feed(wire)
    assert info.value.code == "content-too-large"
    assert len(FrameDecoder(max_content=5).feed(wire)) == 1


# -- error bookkeeping ------------------------------------------------------------


def test_frames_before_error_ride_on_exception() -> None:
    good = raw_frame(hdr(b"a", id=1), b"a") + raw_frame(hdr(b"", id=2))
    bad = raw_frame(b"[1]")
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(good + bad)
    assert info.value.code == ErrorCode.BAD_HEADER
    assert [(f.id, f.content) for f in info.value.frames] == [(1, b"a"), (2, b"")]


def test_frames_before_error_with_buffered_prefix() -> None:
    # The error is found while parsing out of the internal buffer.
    good = raw_frame(hdr(b"abc", id=1), b"abc")
    bad = raw_frame(hdr(b"", id="e", content_length=-1))
    decoder = FrameDecoder()
    assert decoder.feed(good[:4]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(good[4:] + bad)
    assert info.value.code == ErrorCode.BAD_HEADER_VALUE
    assert info.value.request_id == "e"
    assert [f.id for f in info.value.frames] == [1]


def test_frames_before_error_bytewise_are_returned_by_earlier_feeds() -> None:
    good = raw_frame(hdr(b"a", id=1), b"a")
    exc, got = feed_until_error(good + b"\x00\x00", "bytewise")
    assert [f.id for f in got] == [1]
    assert exc.frames == []
    assert exc.code == ErrorCode.BAD_HEADER_LENGTH


@pytest.mark.parametrize(
    "bad,code",
    [
        (b"\x00\x00", ErrorCode.BAD_HEADER_LENGTH),
        (raw_frame(b"nope"), ErrorCode.BAD_HEADER),
        (raw_frame({"id": 7}), ErrorCode.MISSING_HEADER),
        (raw_frame(hdr(b"", byteorder="x")), ErrorCode.BAD_HEADER_VALUE),
        (raw_frame(hdr(b"", content_length=10**9)), ErrorCode.CONTENT_TOO_LARGE),
    ],
)
def test_decoder_stays_broken(bad: bytes, code: str, mode: str) -> None:
    decoder = FrameDecoder()
    exc, _ = feed_until_error(bad, mode, decoder)
    assert exc.code == code
    for data in (raw_frame(hdr(b"ok"), b"ok"), b"", b"\x00"):
        with pytest.raises(ProtocolError) as again:
            decoder.feed(data)
        assert again.value.code == code


def test_no_error_on_incomplete_bad_header() -> None:
    # Nothing is judged before the header is complete.
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack(">H", 10) + b"[[[[") == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(b"[[[[[[")
    assert info.value.code == ErrorCode.BAD_HEADER


def test_deeply_nested_header_is_bad_header(mode: str) -> None:
    exc, _ = feed_until_error(raw_frame(b"[" * 60000), mode)
    assert exc.code == ErrorCode.BAD_HEADER


# -- 4. bad-content ------------------------------------------------------------------


BAD_CONTENT_CASES = [
    ("utf-8", b"\xff\xfe{}"),
    ("utf-8", b'{"a": "\xc3"}'),
    ("utf-8", b"{"),
    ("utf-8", b""),
    ("utf-8", b"{'a': 1}"),
    ("utf-8", b"[1] [2]"),
    ("utf-8", b"\xef\xbb\xbf{}"),  # BOM in utf-8 text
    ("utf-16-le", b"{\x00}"),  # odd length
    ("utf-16", b"\xff\xfe{\x00"),  # not JSON
    ("utf-32-be", b"\x00\x00\x00"),
    ("ascii", b'{"a": "\xe9"}'),
    ("latin-1", b"\xe9"),
    ("UTF_8", b"nul"),
]


@pytest.mark.parametrize("encoding,content", BAD_CONTENT_CASES)
@pytest.mark.parametrize("request_id", [None, 5, "r"])
def test_bad_content(encoding: str, content: bytes, request_id: Any, mode: str) -> None:
    header = hdr(content, content_type="text/json", content_encoding=encoding)
    if request_id is not None:
        header["id"] = request_id
    # The decoder itself accepts the frame: framing is intact.
    wire = raw_frame(header, content) + raw_frame(hdr(b"next"), b"next")
    frames = feed_all(FrameDecoder(), wire, mode)
    assert [f.content for f in frames] == [content, b"next"]
    with pytest.raises(ProtocolError) as info:
        frames[0].json_content()
    assert info.value.code == ErrorCode.BAD_CONTENT
    assert info.value.request_id == request_id
    assert frames[0].error_info is None


def test_bad_content_on_built_frame() -> None:
    frame = Frame({"content-type": "text/json", "content-encoding": "utf-8", "id": 4}, b"{x}")
    with pytest.raises(ProtocolError) as info:
        frame.json_content()
    assert (info.value.code, info.value.request_id) == ("bad-content", 4)


def test_json_content_is_cached() -> None:
    frame = FrameDecoder().feed(raw_frame(
        hdr(b'{"a": [1]}', content_type="text/json", content_encoding="utf-8"), b'{"a": [1]}'
    ))[0]
    first = frame.json_content()
    assert first == {"a": [1]}
    assert frame.json_content() is first


@pytest.mark.parametrize("value", [0, -1.5, "s", None, True, [], {}, [{"a": {"b": [None]}}]])
def test_json_content_any_json_value(value: Any) -> None:
    content = json.dumps(value).encode()
    frame = FrameDecoder().feed(
        raw_frame(hdr(content, content_type="text/json", content_encoding="ascii"), content)
    )[0]
    assert frame.json_content() == value


# -- 5. property tests ---------------------------------------------------------------

PROPS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=8), children, max_size=5),
    ),
    max_leaves=20,
)
ids = st.one_of(st.none(), st.integers(min_value=-(2**64), max_value=2**64), st.text(max_size=30))
extra_keys = st.text(max_size=12).filter(lambda k: k not in REQUIRED and k != "id")
extras = st.dictionaries(extra_keys, json_values, max_size=4)
UNICODE_CODECS = ["utf-8", "UTF_8", "utf8", "utf-16", "utf-16-le", "UTF-16-BE",
                  "utf-32", "utf_32_le", "utf-32-be"]
BYTE_CODECS = ["ascii", "ASCII", "latin-1", "iso-8859-1", "ISO_8859_1"]


@st.composite
def frames_strategy(draw: st.DrawFn) -> tuple[Frame, Any]:
    """A frame to encode, and its JSON value (or a sentinel for binary)."""
    header: dict[str, Any] = dict(draw(extras))
    request_id = draw(ids)
    if request_id is not None:
        header["id"] = request_id
    if draw(st.booleans()):
        value = draw(json_values)
        codec = draw(st.sampled_from(UNICODE_CODECS + BYTE_CODECS))
        ascii_only = codec in BYTE_CODECS
        content = json.dumps(value, ensure_ascii=ascii_only).encode(codec.replace("_", "-"))
        header["content-type"] = "text/json"
        header["content-encoding"] = codec
        return Frame(header, content), value
    header["content-type"] = draw(
        st.one_of(st.sampled_from(["binary/octet-stream", "binary/custom-client-binary-type",
                                   "Text/Json", "text/json2"]), st.text(min_size=1, max_size=20))
        .filter(lambda t: t != "text/json")
    )
    header["content-encoding"] = draw(st.text(min_size=1, max_size=12))
    content = draw(st.binary(max_size=draw(st.sampled_from([0, 16, 4096]))))
    return Frame(header, content), BINARY


BINARY = object()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


@PROPS
@given(st.lists(frames_strategy(), max_size=6), st.data())
def test_property_round_trip_any_split(items: list[tuple[Frame, Any]], data: st.DataObject) -> None:
    wire = encode_frames(f for f, _ in items)
    assert wire == b"".join(encode_frame(f) for f, _ in items)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12), label="cuts")
    decoder = FrameDecoder()
    decoded: list[Frame] = []
    for piece in split_at(wire, cuts):
        decoded.extend(decoder.feed(piece))
    assert not decoder.has_partial and decoder.partial_id is None
    assert len(decoded) == len(items)
    for (orig, value), got in zip(items, decoded):
        assert got.header["content-type"] == orig.header["content-type"]
        assert got.header["content-encoding"] == orig.header["content-encoding"]
        assert got.id == orig.id
        assert ("id" in got.header) == ("id" in orig.header)
        assert type(got.id) is type(orig.id)
        assert got.content == orig.content
        assert got.header["content-length"] == len(orig.content)
        assert got.header["byteorder"] in ("little", "big")
        assert set(got.header) == set(orig.header) | {"byteorder", "content-length"}
        if value is not BINARY:
            assert got.json_content() == value


def _feed_fuzz(decoder: FrameDecoder, pieces: list[bytes]) -> None:
    """Feed pieces; only ProtocolError with a decoder code may escape, and any
    decoded text/json frame may only fail json_content with bad-content."""
    try:
        for piece in pieces:
            for frame in decoder.feed(piece):
                _check_frame(frame)
    except ProtocolError as exc:
        assert exc.code in ErrorCode.ALL
        assert exc.code in DECODER_CODES
        for frame in getattr(exc, "frames", []):
            _check_frame(frame)
        with pytest.raises(ProtocolError):
            decoder.feed(b"")


def _check_frame(frame: Frame) -> None:
    assert isinstance(frame.content, bytes)
    assert len(frame.content) == frame.header["content-length"]
    if frame.is_json:
        try:
            frame.json_content()
        except ProtocolError as exc:
            assert exc.code == ErrorCode.BAD_CONTENT
        frame.error_info  # must not raise


header_like = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda h: header_bytes(h), st.dictionaries(
        st.sampled_from(list(REQUIRED) + ["id", "x"]),
        st.one_of(json_scalars, st.sampled_from(["big", "little", "text/json", "utf-8"])),
        max_size=6,
    )),
)


@st.composite
def fuzz_input(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "prefixed", "after-valid"]))
    if kind == "random":
        return draw(st.binary(max_size=2000))
    raw = draw(header_like)
    body = struct.pack(">H", len(raw) & 0xFFFF) + raw + draw(st.binary(max_size=64))
    if kind == "after-valid":
        frame, _ = draw(frames_strategy())
        return encode_frame(frame) + body + draw(st.binary(max_size=200))
    return body


@PROPS
@given(frames_strategy(), st.lists(ids.filter(lambda i: i is not None), min_size=2, max_size=4),
       st.sampled_from(["encoder", "json.dumps"]))
def test_property_frames_that_differ_only_in_their_id_decode_alike(
        item: tuple[Frame, Any], request_ids: list[Any], writer: str) -> None:
    """The same header with other ids, as multiconn's encoder or json.dumps
    (id last) writes it: every frame decodes to that header and its own id,
    whether its rest was known already or not."""
    frame, _ = item
    rest = {key: value for key, value in frame.header.items() if key != "id"}
    frames = [Frame({**rest, "id": request_id}, frame.content) for request_id in request_ids]
    if writer == "encoder":
        wire = encode_frames(frames)
    else:
        wire = b"".join(raw_frame({"byteorder": "big", **rest, "content-length": len(f.content),
                                   "id": f.header["id"]}, f.content) for f in frames)
    decoded = FrameDecoder().feed(wire)
    assert [(f.header["id"], type(f.header["id"])) for f in decoded] == [(i, type(i)) for i in request_ids]
    for got, sent in zip(decoded, frames):
        assert {k: v for k, v in got.header.items() if k not in ("byteorder", "content-length")} == sent.header
        assert got.content == sent.content


@given(fuzz_input(), st.data(), st.sampled_from([10, 1000, DEFAULT_MAX_CONTENT]))
def test_property_garbage_only_raises_protocol_error(
    blob: bytes, data: st.DataObject, max_content: int
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=10), label="cuts")
    _feed_fuzz(FrameDecoder(max_content=max_content), split_at(blob, cuts))


@PROPS
@given(st.lists(frames_strategy(), min_size=1, max_size=3), st.data())
def test_property_one_mutated_byte_only_raises_protocol_error(
    items: list[tuple[Frame, Any]], data: st.DataObject
) -> None:
    wire = bytearray(encode_frames(f for f, _ in items))
    # Bias towards the first frame's hlen + header, where mutations matter most.
    first_header_end = 2 + int.from_bytes(wire[:2], "big")
    index = data.draw(
        st.one_of(st.integers(0, min(first_header_end, len(wire)) - 1),
                  st.integers(0, len(wire) - 1)),
        label="index",
    )
    wire[index] = data.draw(st.integers(0, 255).filter(lambda b: b != wire[index]), label="byte")
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=6), label="cuts")
    _feed_fuzz(FrameDecoder(max_content=1 << 20), split_at(bytes(wire), cuts))


# -- regressions: bugs found by these tests, fixed ---------------------------------------


def test_regression_deeply_nested_content_is_bad_content() -> None:
    wire = raw_frame(hdr(b"[" * 100000, content_type="text/json", content_encoding="utf-8", id=1),
                     b"[" * 100000)
    (frame,) = FrameDecoder().feed(wire)
    with pytest.raises(ProtocolError) as info:
        frame.json_content()
    assert info.value.code == ErrorCode.BAD_CONTENT and info.value.request_id == 1


def test_regression_decoded_headers_do_not_share_nested_values() -> None:
    wire = raw_frame(hdr(b"", x_shared=[1]))
    (first,) = FrameDecoder().feed(wire)
    first.header["x-shared"].append(2)
    (second,) = FrameDecoder().feed(wire)
    assert second.header["x-shared"] == [1]


def test_regression_encoder_cache_conflates_equal_hashing_values() -> None:
    base = {"content-type": "t/bug-cache", "content-encoding": "binary"}
    encode_frame(Frame({**base, "x": 1}, b""))
    for value in (True, 1.0):
        _, header, _ = split_header(encode_frame(Frame({**base, "x": value}, b"")))
        assert type(header["x"]) is type(value) and header["x"] == value


@pytest.mark.parametrize("header", [
    {"content-type": "t/pair", "content-encoding": "binary"},
    {"content-encoding": "binary", "content-type": "t/pair"},  # the other order: the same object
    {"content-type": "t/pair", "content-encoding": 1},
    {"content-type": "t/pair", "content-encoding": True},
    {"content-type": "t/pair", "id": "binary"},
    {"content-type": "t/pair", "content-encoding": ["binary"]},
], ids=repr)
def test_two_key_headers_encode_their_own_values(header: dict[str, Any]) -> None:
    """Two-key headers are looked up by their values (encode_header's pair
    cache): whatever came before, each encodes exactly what it holds."""
    encode_frame(Frame({"content-type": "t/pair", "content-encoding": "binary"}, b"abc"))  # cached first
    for _ in range(2):  # encoded, then from the cache where it may be
        _, decoded, content = split_header(encode_frame(Frame(header, b"abc")))
        assert {k: v for k, v in decoded.items() if k not in ("byteorder", "content-length")} == header
        assert [type(v) for k, v in decoded.items() if k in header] == [type(header[k]) for k in decoded if k in header]
        assert decoded["content-length"] == 3 and content == b"abc"


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_regression_nan_in_header_is_bad_header(token: bytes) -> None:
    raw = header_bytes(VALID_JSON)[:-1] + b', "x": ' + token + b"}"
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(raw_frame(raw))
    assert info.value.code == ErrorCode.BAD_HEADER


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"[-Infinity]"])
def test_regression_nan_content_is_bad_content(token: bytes) -> None:
    frame = Frame({"content-type": "text/json", "content-encoding": "utf-8"}, token)
    with pytest.raises(ProtocolError) as info:
        frame.json_content()
    assert info.value.code == ErrorCode.BAD_CONTENT


# -- receiving large contents in place (recv_buffer / buffer_updated) ---------------------


def _decode_in_place(wire: bytes, chunk: int) -> list[Frame]:
    """Drive a decoder the way a connection does: recv_into when offered, else feed."""
    decoder = FrameDecoder()
    frames: list[Frame] = []
    pos = 0
    while pos < len(wire):
        view = decoder.recv_buffer()
        if view is None:
            frames += decoder.feed(wire[pos : pos + chunk])
            pos += chunk
            continue
        n = min(len(view), chunk, len(wire) - pos)
        view[:n] = wire[pos : pos + n]
        view.release()
        frames += decoder.buffer_updated(n)
        pos += n
    assert not decoder.has_partial
    return frames


@pytest.mark.parametrize("chunk", [1, 1000, 70_000, 1 << 22])
def test_large_contents_received_in_place(chunk: int) -> None:
    contents = [os.urandom(200_000), b"small", os.urandom(LARGE_CONTENT)]
    wire = b"".join(encode_frame(Frame.binary(c, id=i)) for i, c in enumerate(contents))
    frames = _decode_in_place(wire, chunk)
    assert [f.content for f in frames] == contents
    assert [f.id for f in frames] == [0, 1, 2]


def test_recv_buffer_never_reaches_past_the_frame() -> None:
    content = os.urandom(LARGE_CONTENT + 10)
    wire = encode_frame(Frame.binary(content))
    decoder = FrameDecoder()
    fed = len(wire) - len(content) + 5  # the header and 5 bytes of content
    assert decoder.feed(wire[:fed]) == []
    view = decoder.recv_buffer()
    assert view is not None and len(view) == len(content) - 5
    assert decoder.partial_id is None and decoder.has_partial


def test_feed_after_in_place_receive_finishes_the_frame_and_parses_on() -> None:
    content = os.urandom(LARGE_CONTENT)
    first = encode_frame(Frame.binary(content))
    wire = first + encode_frame(Frame.binary(b"next"))
    decoder = FrameDecoder()
    fed = len(first) - len(content) + 10  # the first frame's header and 10 bytes
    decoder.feed(wire[:fed])
    view = decoder.recv_buffer()
    view[:5] = wire[fed : fed + 5]
    view.release()
    assert decoder.buffer_updated(5) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(wire[fed + 5 :] + b"\x00\x00")
    assert info.value.code == ErrorCode.BAD_HEADER_LENGTH
    assert [f.content for f in info.value.frames] == [content, b"next"]

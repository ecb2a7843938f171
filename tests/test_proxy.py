"""Tests of the PROXY protocol (issue 13, sections 2 and 3): the sans-IO parser
in memory, the preamble stage over real loopback sockets, health checks, and
the command line.

Like tests/test_protocol.py, every parser case runs twice (the ``mode``
fixture): the whole input in one ``feed``, and one byte per ``feed``. A third
driver, `peek_feed`, does what `multiconn.proxy_stage` does on a socket: peek
at most ``wanted()`` bytes, feed them, and remove exactly ``consumed``.

Five bugs found while writing this file (an IPv6 zone and leading zeros
accepted in v1, v2 LOCAL with an empty address block refused, a trickled
header restarting the preamble deadline, an unused bad --proxy-trusted
ignored) are fixed; their tests stay.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multiconn import Frame, Limits
from multiconn.apps import echo
from multiconn.client import Client
from multiconn.protocol import ErrorCode, FrameDecoder, encode_frame, encode_frames
from multiconn.proxy import (
    V1_MAX_LENGTH,
    V1_PREFIX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderParser,
    encode,
    encode_v1,
    encode_v2,
)
from multiconn.responders import HEALTH_CONTENT_TYPE, InlineResponder, ServerStatus, health_answer
from multiconn.testing import ServerThread

from helpers import APPS, read_frames  # noqa: E402
sys.path.insert(0, str(APPS))
import pool_apps  # noqa: E402
import proxy_apps  # noqa: E402

PP2_ALPN, PP2_AUTHORITY, PP2_UNIQUE_ID = 0x01, 0x02, 0x05
TLVS = {PP2_ALPN: b"h2", PP2_AUTHORITY: b"api.example.com", PP2_UNIQUE_ID: b"\x00\x01req-42"}


# -- helpers: the parser ------------------------------------------------------


def v2(version_command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    """A hand-built v2 header (independent of `encode_v2`)."""
    return V2_SIGNATURE + struct.pack("!BBH", version_command, family, len(body) if length is None else length) + body


def inet_block(src: str = "192.0.2.1", dst: str = "198.51.100.2", sport: int = 1234, dport: int = 443) -> bytes:
    return socket.inet_pton(socket.AF_INET, src) + socket.inet_pton(socket.AF_INET, dst) + struct.pack("!HH", sport, dport)


def inet6_block(src: str = "2001:db8::1", dst: str = "2001:db8::2", sport: int = 1234, dport: int = 443) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def chunks(data: bytes, mode: str) -> list[bytes]:
    if mode == "whole":
        return [data]
    return [data[i : i + 1] for i in range(len(data))]


@pytest.fixture(params=["whole", "bytewise"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def feed_pieces(parser: ProxyHeaderParser, pieces: list[bytes]) -> tuple[ProxyHeader | None, bytes]:
    """Feed `pieces` in turn: (the header, every byte after it), checking
    `consumed` on the way. (None, b"") if the header never completed."""
    for i, piece in enumerate(pieces):
        consumed, header = parser.feed(piece)
        assert 0 <= consumed <= len(piece)
        if header is not None:
            return header, piece[consumed:] + b"".join(pieces[i + 1 :])
        # An incomplete header keeps everything it was given: the caller reads it all.
        assert consumed == len(piece), (piece, consumed)
    return None, b""


def feed(data: bytes, mode: str, accept: str = "any") -> tuple[ProxyHeader | None, bytes]:
    return feed_pieces(ProxyHeaderParser(accept), chunks(data, mode))


def peek_feed(parser: ProxyHeaderParser, arrivals: list[bytes]) -> tuple[ProxyHeader | None, bytes]:
    """The stage's way: bytes arrive in the socket as `arrivals`; each step
    peeks at most ``wanted()`` of them and removes exactly ``consumed``."""
    in_socket = bytearray()
    for i, arrival in enumerate(arrivals):
        in_socket += arrival
        while in_socket:
            wanted = parser.wanted()
            assert wanted >= 1
            peeked = bytes(in_socket[:wanted])
            consumed, header = parser.feed(peeked)
            assert 0 <= consumed <= len(peeked)
            del in_socket[:consumed]
            if header is not None:
                return header, bytes(in_socket) + b"".join(arrivals[i + 1 :])
            assert consumed == len(peeked)
    return None, b""


def refused(data: bytes, mode: str, accept: str = "any") -> ProxyHeaderError:
    """Feed `data`; a ProxyHeaderError must come, and no header before it."""
    parser = ProxyHeaderParser(accept)
    for piece in chunks(data, mode):
        try:
            consumed, header = parser.feed(piece)
        except ProxyHeaderError as exc:
            return exc
        assert header is None, f"{data!r} parsed as {header!r}"
        assert consumed == len(piece)
    pytest.fail(f"no ProxyHeaderError for {data!r} (still waiting for more)")


# -- A. the parser: valid headers ---------------------------------------------

# A frame and the start of a TLS ClientHello: what follows the header on the wire.
AFTER = {
    "nothing": b"",
    "frame": encode_frame(Frame.json({"action": "search", "value": "ring"}, id=1)),
    "client-hello": bytes.fromhex("16030100f8010000f40303") + os.urandom(32),
}

V1_MAX_TCP6 = b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"

VALID = {
    "v1-tcp4": (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        ProxyHeader(1, "PROXY", ("192.0.2.1", 56324), ("198.51.100.2", 443)),
    ),
    "v1-tcp4-port-0": (
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        ProxyHeader(1, "PROXY", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
    ),
    "v1-tcp6": (
        b"PROXY TCP6 2001:db8::1 2001:DB8:0:0:0:0:0:2 1 65535\r\n",
        ProxyHeader(1, "PROXY", ("2001:db8::1", 1), ("2001:db8::2", 65535)),
    ),
    "v1-tcp6-longest": (  # the specification's worst case: 104 bytes
        V1_MAX_TCP6,
        ProxyHeader(1, "PROXY", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
    ),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", ProxyHeader(1, "UNKNOWN")),
    "v1-unknown-with-addresses": (  # "the receiver must ignore anything presented before the CRLF"
        b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n", ProxyHeader(1, "UNKNOWN"),
    ),
    "v1-unknown-107-bytes": (
        b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n", ProxyHeader(1, "UNKNOWN"),
    ),
    "v2-inet": (  # hand-built like HAProxy's send-proxy-v2 (172.19.0.1:42578 -> 172.19.0.3:80)
        bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050"),
        ProxyHeader(2, "PROXY", ("172.19.0.1", 42578), ("172.19.0.3", 80)),
    ),
    "v2-inet-tlvs": (
        v2(0x21, 0x11, inet_block() + b"".join(tlv(k, v) for k, v in TLVS.items())),
        ProxyHeader(2, "PROXY", ("192.0.2.1", 1234), ("198.51.100.2", 443), TLVS),
    ),
    "v2-inet6-tlvs": (
        v2(0x21, 0x21, inet6_block() + b"".join(tlv(k, v) for k, v in TLVS.items())),
        ProxyHeader(2, "PROXY", ("2001:db8::1", 1234), ("2001:db8::2", 443), TLVS),
    ),
    "v2-inet-unknown-and-empty-tlvs": (
        v2(0x21, 0x11, inet_block() + tlv(0xE0, b"custom") + tlv(0x04, b"") + tlv(0x03, b"\x00" * 4)),
        ProxyHeader(2, "PROXY", ("192.0.2.1", 1234), ("198.51.100.2", 443),
                    {0xE0: b"custom", 0x04: b"", 0x03: b"\x00" * 4}),
    ),
    "v2-local": (v2(0x20, 0x00, b""), ProxyHeader(2, "LOCAL")),
    "v2-local-with-an-inet-block": (v2(0x20, 0x11, inet_block()), ProxyHeader(2, "LOCAL")),
    "v2-local-tlvs": (v2(0x20, 0x00, tlv(PP2_UNIQUE_ID, b"chk")), ProxyHeader(2, "LOCAL", tlvs={5: b"chk"})),
    "v2-unspec": (v2(0x21, 0x00, b""), ProxyHeader(2, "PROXY")),
    "v2-unspec-tlvs": (v2(0x21, 0x00, tlv(PP2_ALPN, b"h2")), ProxyHeader(2, "PROXY", tlvs={1: b"h2"})),
    "v2-inet-udp": (v2(0x21, 0x12, inet_block()), ProxyHeader(2, "PROXY")),
    "v2-unix": (v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")), ProxyHeader(2, "PROXY")),
}


@pytest.mark.parametrize("after", list(AFTER), ids=list(AFTER))
@pytest.mark.parametrize("name", list(VALID))
def test_valid_header_is_parsed_and_what_follows_is_left_over(name: str, after: str, mode: str) -> None:
    wire, expected = VALID[name]
    header, leftover = feed(wire + AFTER[after], mode)
    assert header == expected
    assert header.proxied == (expected.source is not None)
    assert leftover == AFTER[after]


@pytest.mark.parametrize("name", list(VALID))
def test_valid_header_through_peeks_leaves_the_rest_in_the_socket(name: str) -> None:
    wire, expected = VALID[name]
    rest = AFTER["frame"] * 3
    for arrivals in ([wire + rest], [wire[:5], wire[5:] + rest], [bytes([b]) for b in wire + rest]):
        header, leftover = peek_feed(ProxyHeaderParser(), arrivals)
        assert header == expected
        assert leftover == rest


def test_tlvs_are_kept_and_named(mode: str) -> None:
    for wire in (VALID["v2-inet-tlvs"][0], VALID["v2-inet6-tlvs"][0]):
        header, _ = feed(wire, mode)
        assert header.alpn == b"h2"
        assert header.authority == "api.example.com"
        assert header.unique_id == b"\x00\x01req-42"
        assert header.tlvs == TLVS
    header, _ = feed(VALID["v2-inet"][0], mode)
    assert (header.alpn, header.authority, header.unique_id, header.tlvs) == (None, None, None, {})


def test_local_and_unknown_carry_no_addresses(mode: str) -> None:
    for name in ("v2-local", "v2-local-with-an-inet-block", "v1-unknown", "v2-unspec"):
        header, _ = feed(VALID[name][0], mode)
        assert header.source is None and header.destination is None
        assert header.proxied is False


def test_encoders_match_the_hand_built_headers() -> None:
    assert encode_v1(("192.0.2.1", 56324), ("198.51.100.2", 443)) == VALID["v1-tcp4"][0]
    assert encode_v1(None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(("172.19.0.1", 42578), ("172.19.0.3", 80)) == VALID["v2-inet"][0]
    assert encode_v2(("192.0.2.1", 1234), ("198.51.100.2", 443), tlvs=TLVS) == VALID["v2-inet-tlvs"][0]
    assert encode_v2(None, local=True) == VALID["v2-local"][0]


@pytest.mark.parametrize("name", ["v1-tcp4", "v1-unknown", "v2-inet", "v2-inet-tlvs", "v2-local", "v2-local-tlvs"])
def test_encode_gives_a_parsed_header_its_wire_form_back(name: str) -> None:
    wire, header = VALID[name]
    assert encode(header) == wire


@pytest.mark.parametrize("name", ["v2-unspec", "v2-inet-udp", "v2-unix"])
def test_encode_says_none_for_headers_without_tcp_addresses(name: str) -> None:
    assert encode(VALID[name][1]) is None


@pytest.mark.parametrize("accept, wire", [
    ("v1", VALID["v2-inet"][0]),
    ("v1", VALID["v2-local"][0]),
    ("v2", VALID["v1-tcp4"][0]),
    ("v2", VALID["v1-unknown"][0]),
])
def test_accept_refuses_the_other_version(accept: str, wire: bytes, mode: str) -> None:
    assert "accepted" in str(refused(wire, mode, accept))


@pytest.mark.parametrize("accept, wire", [("v1", VALID["v1-tcp4"][0]), ("v2", VALID["v2-inet"][0]),
                                          ("any", VALID["v1-tcp6"][0]), ("any", VALID["v2-inet6-tlvs"][0])])
def test_accept_takes_its_own_version(accept: str, wire: bytes, mode: str) -> None:
    header, leftover = feed(wire, mode, accept)
    assert header is not None and leftover == b""


def test_unknown_accept_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="v3"):
        ProxyHeaderParser("v3")


def test_after_the_header_the_parser_takes_nothing_more() -> None:
    parser = ProxyHeaderParser()
    wire, expected = VALID["v1-tcp4"]
    assert parser.feed(wire) == (len(wire), expected)
    assert parser.feed(b"more bytes") == (0, expected)


def test_wanted_never_reaches_past_the_header() -> None:
    parser = ProxyHeaderParser()
    assert parser.wanted() == 16  # v2's fixed part; no v1 line is shorter than 16 bytes
    parser.feed(b"PROXY TCP4 ")
    assert parser.wanted() == V1_MAX_LENGTH - len(b"PROXY TCP4 ")
    parser = ProxyHeaderParser()
    wire = VALID["v2-inet-tlvs"][0]
    parser.feed(wire[:20])
    assert parser.wanted() == len(wire) - 20


# -- A. the parser: everything else is refused --------------------------------

RANDOM_12 = random.Random(13).randbytes(12)
assert RANDOM_12[:1] not in (b"P", b"\r")


def v1(src: str = "192.0.2.1", dst: str = "198.51.100.2", sport: str = "1234", dport: str = "443",
       proto: str = "TCP4", end: bytes = b"\r\n") -> bytes:
    return f"PROXY {proto} {src} {dst} {sport} {dport}".encode("utf-8") + end


MALFORMED = {
    # the line
    "v1-lf-without-cr": v1(end=b"\n"),
    "v1-unknown-lf-without-cr": b"PROXY UNKNOWN\n",
    "v1-cr-cr-lf": v1(end=b"\r\r\n"),
    "v1-no-crlf-within-107": b"PROXY UNKNOWN " + b"x" * 200,
    "v1-crlf-beyond-107": b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",
    "v1-108-bytes": b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n",
    "v1-not-ascii": v1(src="192.0.2.1\xe9"),
    # addresses
    "v1-three-octets": v1(src="1.2.3"),
    "v1-five-octets": v1(dst="1.2.3.4.5"),
    "v1-octet-256": v1(src="256.1.1.1"),
    "v1-leading-junk": v1(src="x1.2.3.4"),
    "v1-trailing-junk": v1(dst="1.2.3.4x"),
    "v1-octal-looking": v1(src="01.2.3.4"),
    "v1-cidr": v1(src="1.2.3.4/32"),
    "v1-hostname": v1(src="localhost"),
    "v1-tcp4-with-ipv6": v1(src="2001:db8::1"),
    "v1-tcp6-with-ipv4": v1(proto="TCP6", src="1.2.3.4", dst="::1"),
    "v1-tcp6-bad-literal": v1(proto="TCP6", src="2001:db8::g", dst="::1"),
    "v1-tcp6-nine-groups": v1(proto="TCP6", src="1:2:3:4:5:6:7:8:9", dst="::1"),
    "v1-tcp6-bracketed": v1(proto="TCP6", src="[::1]", dst="::1"),
    # ports
    "v1-port-65536": v1(sport="65536"),
    "v1-port-99999": v1(dport="99999"),
    "v1-port-minus-1": v1(sport="-1"),
    "v1-port-plus-1": v1(sport="+1"),
    "v1-port-hex": v1(dport="0x10"),
    "v1-port-arabic-indic-digit": v1(sport="\u0663"),
    "v1-port-fullwidth-digit": v1(sport="\uff18\uff10"),
    "v1-port-empty": b"PROXY TCP4 192.0.2.1 198.51.100.2  443\r\n",
    "v1-port-exponent": v1(sport="1e3"),
    "v1-port-space-inside": v1(dport="4 43"),
    # fields
    "v1-five-fields": b"PROXY TCP4 192.0.2.1 198.51.100.2 1234\r\n",
    "v1-seven-fields": v1(dport="443 80"),
    "v1-trailing-space": v1(dport="443 "),
    "v1-two-spaces": b"PROXY  TCP4 192.0.2.1 198.51.100.2 1234 443\r\n",
    "v1-tab": b"PROXY TCP4\t192.0.2.1 198.51.100.2 1234 443\r\n",
    "v1-only-proxy": b"PROXY \r\n",
    "v1-lowercase-proto": v1(proto="tcp4"),
    "v1-proto-tcp5": v1(proto="TCP5"),
    "v1-proto-udp4": v1(proto="UDP4"),
    # v2
    "v2-inet-length-11": v2(0x21, 0x11, inet_block()[:11]),
    "v2-inet6-length-35": v2(0x21, 0x21, inet6_block()[:35]),
    "v2-unix-length-215": v2(0x21, 0x31, bytes(215)),
    "v2-inet-length-0": v2(0x21, 0x11, b""),
    "v2-version-1": v2(0x11, 0x11, inet_block()),
    "v2-version-3": v2(0x31, 0x11, inet_block()),
    "v2-version-0": v2(0x01, 0x11, inet_block()),
    "v2-command-2": v2(0x22, 0x11, inet_block()),
    "v2-command-15": v2(0x2F, 0x11, inet_block()),
    "v2-family-4": v2(0x21, 0x41, inet_block()),
    "v2-transport-3": v2(0x21, 0x13, inet_block()),
    "v2-tlv-header-truncated": v2(0x21, 0x11, inet_block() + b"\x01\x00"),
    "v2-tlv-value-truncated": v2(0x21, 0x11, inet_block() + b"\x01\x00\x05ab"),
    "v2-second-tlv-truncated": v2(0x21, 0x11, inet_block() + tlv(1, b"h2") + b"\x02\x00\x10abc"),
    # not a PROXY header at all
    "http": b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "multiconn-frame": AFTER["frame"],
    "tls-client-hello": AFTER["client-hello"],
    "twelve-random-bytes": RANDOM_12,
    "lowercase-proxy": b"proxy TCP4 192.0.2.1 198.51.100.2 1234 443\r\n",
    "proxy-without-space": b"PROXY\r\n",
    "v2-signature-off-by-one": V2_SIGNATURE[:11] + b"\r" + bytes(16),
    "ssh": b"SSH-2.0-OpenSSH_9.6\r\n",
}


def test_v2_local_is_accepted_whatever_its_block() -> None:
    """LOCAL: the specification says to accept it and discard the block, so a
    truncated TLV or an empty address block of a named family is no reason to refuse."""
    for header in (v2(0x20, 0x00, b"\x05\x00\x09id"), v2(0x20, 0x11, b""), v2(0x20, 0x21, b"\x00" * 3)):
        consumed, parsed = ProxyHeaderParser().feed(header + b"rest")
        assert consumed == len(header)
        assert parsed == ProxyHeader(2, "LOCAL") and not parsed.proxied


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_header_is_refused(name: str, mode: str) -> None:
    exc = refused(MALFORMED[name], mode)
    assert str(exc)  # a reason for the log line


@pytest.mark.parametrize("name", ["v1-no-crlf-within-107", "http", "multiconn-frame", "twelve-random-bytes",
                                  "v2-version-1", "v2-command-15", "v2-inet-length-11"])
def test_hopeless_input_is_refused_without_waiting_for_more(name: str) -> None:
    """Refused as soon as it cannot become a header: a v2 address block too short
    for its family is refused from the fixed part, before its bytes arrive."""
    data = MALFORMED[name]
    cut = {"v1-no-crlf-within-107": V1_MAX_LENGTH, "v2-version-1": 16, "v2-command-15": 16,
           "v2-inet-length-11": 16}.get(name, len(data))
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyHeaderError):
        for byte in data[:cut]:
            parser.feed(bytes([byte]))


# Bugs found while writing these tests (see the report in the commit message).


@pytest.mark.parametrize("source", ["fe80::1%eth0", "::1%\x01", "fe80::1%1"])
def test_v1_ipv6_with_a_zone_index_is_refused(source: str, mode: str) -> None:
    refused(v1(proto="TCP6", src=source, dst="::1"), mode)


@pytest.mark.parametrize("port", ["00080", "01", "00000"])
def test_v1_port_with_leading_zeros_is_refused(port: str, mode: str) -> None:
    refused(v1(sport=port), mode)


@pytest.mark.parametrize("family", [0x11, 0x21, 0x31])
def test_v2_local_ignores_the_family(family: int, mode: str) -> None:
    header, leftover = feed(v2(0x20, family, b"") + b"after", mode)
    assert header == ProxyHeader(2, "LOCAL")
    assert leftover == b"after"


# -- A. hypothesis ------------------------------------------------------------

ports = st.integers(0, 65535)
tlv_maps = st.dictionaries(st.integers(0, 255), st.binary(max_size=40), max_size=5)


@st.composite
def valid_headers(draw: Any) -> tuple[bytes, ProxyHeader]:
    kind = draw(st.sampled_from(["v1-tcp4", "v1-tcp6", "v1-unknown", "v2-inet", "v2-inet6", "v2-local"]))
    if kind == "v1-unknown":
        return encode_v1(None), ProxyHeader(1, "UNKNOWN")
    tlvs = draw(tlv_maps) if kind.startswith("v2") else {}
    if kind == "v2-local":
        return encode_v2(None, local=True, tlvs=tlvs), ProxyHeader(2, "LOCAL", tlvs=tlvs)
    version = 4 if kind.endswith("4") or kind == "v2-inet" else 6
    addresses = st.ip_addresses(v=version).map(str)
    source, destination = (draw(addresses), draw(ports)), (draw(addresses), draw(ports))
    if kind.startswith("v1"):
        return encode_v1(source, destination), ProxyHeader(1, "PROXY", source, destination)
    return encode_v2(source, destination, tlvs=tlvs), ProxyHeader(2, "PROXY", source, destination, tlvs)


def split(data: bytes, draw: Any) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_headers(), st.binary(max_size=64), st.data())
def test_random_valid_header_then_random_bytes(header: tuple[bytes, ProxyHeader], trailing: bytes,
                                               data: st.DataObject) -> None:
    wire, expected = header
    pieces = split(wire + trailing, data.draw)
    assert feed_pieces(ProxyHeaderParser(), pieces) == (expected, trailing)
    assert peek_feed(ProxyHeaderParser(), pieces) == (expected, trailing)
    accept = "v1" if expected.version == 1 else "v2"
    assert feed_pieces(ProxyHeaderParser(accept), pieces) == (expected, trailing)


def round_trip(header: ProxyHeader) -> None:
    """Re-encode a parsed header where the encoders can represent it; it must parse the same."""
    wire = encode(header)
    if wire is not None:
        assert ProxyHeaderParser().feed(wire) == (len(wire), header)


random_inputs = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda rest: V1_PREFIX + rest),
    st.text(alphabet="PROXYTCP46UNKOW 0123456789.:abcdef\r\n-+", max_size=120).map(lambda t: t.encode()),
    st.binary(max_size=120).map(lambda rest: V2_SIGNATURE + rest),
    st.builds(lambda vc, fam, body: v2(vc, fam, body), st.sampled_from([0x20, 0x21, 0x22, 0x11]),
              st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x41]), st.binary(max_size=80)),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_inputs, st.sampled_from(["any", "v1", "v2"]), st.data())
def test_random_bytes_raise_only_proxy_header_error(raw: bytes, accept: str, data: st.DataObject) -> None:
    parser = ProxyHeaderParser(accept)
    total = 0
    header = None
    try:
        for piece in split(raw, data.draw):
            consumed, header = parser.feed(piece)
            assert 0 <= consumed <= len(piece)
            total += consumed
            if header is not None:
                break
            assert consumed == len(piece)
    except ProxyHeaderError:
        return
    assert total <= len(raw)
    if header is None:
        return
    if header.version == 1:
        assert raw[:total].endswith(b"\r\n") and total <= V1_MAX_LENGTH
    else:
        assert total == 16 + struct.unpack_from("!H", raw, 14)[0]
    # Split or whole, the same header from the same bytes.
    assert ProxyHeaderParser(accept).feed(raw) == (total, header)
    round_trip(header)


# -- B. real sockets: helpers -------------------------------------------------


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="multiconn")
    return caplog


def open_socket(server: ServerThread, *, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=timeout,
                                    source_address=(source, 0) if source else None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def proxied_client(server: ServerThread, header: bytes, *, source: str | None = None,
                   ssl_context: ssl.SSLContext | None = None, timeout: float = 5.0) -> Client:
    """A client that sends `header` first (then the TLS handshake, if any)."""
    sock = open_socket(server, source=source, timeout=timeout)
    sock.sendall(header)
    if ssl_context is not None:
        sock = ssl_context.wrap_socket(sock, server_hostname="localhost")
    sock.setblocking(False)
    return Client(sock, timeout=timeout)


def whoami(client: Client) -> dict[str, Any]:
    return client.request(Frame.json({})).json_content()


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Every byte until EOF (or a reset); fails if the connection stays open."""
    sock.settimeout(timeout)
    received = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return received
            received += data
    except ConnectionResetError:
        return received
    except socket.timeout:
        pytest.fail(f"still open after {timeout} s (received {received!r})")


def local_port(sock: socket.socket) -> int:
    return sock.getsockname()[1]


def lines_about(caplog: pytest.LogCaptureFixture, port: int) -> list[str]:
    """The captured log lines (``LEVEL logger:file:line message``) that name the
    connection from 127.0.0.1:`port`. The text as formatted when logged: the
    records' arguments include the live transport, whose repr changes once closed."""
    needle = f"<connection 127.0.0.1:{port} "
    return [line for line in caplog.text.splitlines() if needle in line]


def addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


SOURCE4, DEST4 = ("203.0.113.7", 56324), ("192.0.2.10", 443)
SOURCE6, DEST6 = ("2001:db8::7", 40000), ("2001:db8::10", 8443)


# -- B. through the stage ------------------------------------------------------


@pytest.mark.parametrize("accept", ["v1", "any"])
def test_whoami_through_a_v1_header(start_server, accept: str) -> None:
    server = start_server("whoami", proxy_protocol=accept)
    with proxied_client(server, encode_v1(SOURCE4, DEST4)) as client:
        assert whoami(client) == {"peer": addr(*SOURCE4), "local": addr(*DEST4),
                                  "worker": os.getpid(), "proxied": True}
        assert whoami(client)["peer"] == addr(*SOURCE4)  # every request on the connection


@pytest.mark.parametrize("accept", ["v2", "any"])
@pytest.mark.parametrize("source, destination", [(SOURCE4, DEST4), (SOURCE6, DEST6)], ids=["ipv4", "ipv6"])
def test_whoami_through_a_v2_header(start_server, accept: str, source: Any, destination: Any) -> None:
    server = start_server("whoami", proxy_protocol=accept)
    with proxied_client(server, encode_v2(source, destination, tlvs=TLVS)) as client:
        assert whoami(client) == {"peer": addr(*source), "local": addr(*destination),
                                  "worker": os.getpid(), "proxied": True}


@pytest.mark.parametrize("header", [encode_v2(None, local=True), encode_v2(None, local=True, tlvs={5: b"x"}),
                                    encode_v1(None)], ids=["v2-local", "v2-local-tlvs", "v1-unknown"])
def test_local_and_unknown_use_the_socket_addresses(start_server, header: bytes) -> None:
    server = start_server("whoami", proxy_protocol="any")
    with proxied_client(server, header) as client:
        answer = whoami(client)
        assert answer == {"peer": addr("127.0.0.1", local_port(client.sock)), "local": addr(*server.address),
                          "worker": os.getpid(), "proxied": False}


def test_header_sent_one_byte_at_a_time(start_server) -> None:
    server = start_server("whoami", proxy_protocol="any")
    for header, source in ((encode_v1(SOURCE6, DEST6), SOURCE6), (encode_v2(SOURCE4, DEST4, tlvs=TLVS), SOURCE4)):
        sock = open_socket(server)
        for byte in header:
            sock.send(bytes([byte]))
            time.sleep(0.003)
        sock.setblocking(False)
        with Client(sock, timeout=5) as client:
            assert whoami(client)["peer"] == addr(*source)


@pytest.mark.parametrize("header", [encode_v1(SOURCE4, DEST4), encode_v2(SOURCE6, DEST6, tlvs=TLVS)],
                         ids=["v1", "v2"])
def test_pipelined_frames_in_the_packet_of_the_header_are_all_answered(start_server, header: bytes) -> None:
    server = start_server("echo", proxy_protocol="any")
    frames = [Frame.binary(os.urandom(i * 37), id=i) for i in range(20)]
    with contextlib.closing(open_socket(server)) as sock:
        sock.sendall(header + encode_frames(frames))
        answers = read_frames(sock, len(frames))
    assert [a.id for a in answers] == list(range(20))
    assert [a.content for a in answers] == [f.content for f in frames]


def test_whoami_pipelined_in_the_header_packet(start_server) -> None:
    server = start_server("whoami", proxy_protocol="v2")
    with contextlib.closing(open_socket(server)) as sock:
        sock.sendall(encode_v2(SOURCE4, DEST4) + encode_frames([Frame.json({}, id=i) for i in range(5)]))
        answers = read_frames(sock, 5)
    assert {json.loads(a.content)["peer"] for a in answers} == {addr(*SOURCE4)}


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_connection_info_reaches_pooled_handlers(start_server, pool: str) -> None:
    server = start_server(proxy_apps.connection_details, handler_pool=pool, pool_size=1, proxy_protocol="v2")
    with proxied_client(server, encode_v2(SOURCE6, DEST6, tlvs=TLVS)) as client:
        answer = client.request(Frame.json({}, id=7)).json_content()
    assert answer["peer"] == addr(*SOURCE6) and answer["local"] == addr(*DEST6) and answer["proxied"]
    assert answer["proxy_tlvs"] == {str(k): v.hex() for k, v in TLVS.items()}
    assert answer["tls_version"] is None


@pytest.mark.parametrize("header", [encode_v1(SOURCE4, DEST4), encode_v2(SOURCE4, DEST4)], ids=["v1", "v2"])
def test_raw_echo_behind_proxy_never_echoes_the_header(start_server, header: bytes) -> None:
    server = start_server("raw-echo", proxy_protocol="any")
    with contextlib.closing(open_socket(server)) as sock:
        sock.sendall(header + b"hello")
        received = b""
        while len(received) < 5:
            data = sock.recv(100)
            assert data
            received += data
        assert received == b"hello"
        sock.sendall(b"x" * 100_000)
        received = b""
        while len(received) < 100_000:
            received += sock.recv(65536)
        assert received == b"x" * 100_000


def test_tls_behind_proxy(start_server, server_context, client_context) -> None:
    server = start_server(proxy_apps.connection_details, proxy_protocol="v2", ssl_context=server_context)
    header = encode_v2(SOURCE4, DEST4, tlvs={PP2_ALPN: b"h2", PP2_AUTHORITY: b"localhost"})
    with proxied_client(server, header, ssl_context=client_context) as client:
        answers = client.request_many([Frame.json({}, id=i) for i in range(3)])
        info = answers[0].json_content()
        socket_peer = addr("127.0.0.1", local_port(client.sock))
    assert [a.id for a in answers] == [0, 1, 2]
    assert info["peer"] == addr(*SOURCE4) and info["local"] == addr(*DEST4) and info["proxied"] is True
    assert info["socket_peer"] == socket_peer
    assert info["tls_version"] in ("TLSv1.2", "TLSv1.3") and info["tls_cipher"]
    assert info["proxy_tlvs"] == {"1": b"h2".hex(), "2": b"localhost".hex()}


def test_whoami_over_tls_behind_a_v1_header(start_server, server_context, client_context) -> None:
    server = start_server("whoami", proxy_protocol="v1", ssl_context=server_context)
    with proxied_client(server, encode_v1(SOURCE6, DEST6), ssl_context=client_context) as client:
        assert whoami(client)["peer"] == addr(*SOURCE6)


def test_tls_client_hello_in_the_packet_of_the_header(start_server, server_context, client_context) -> None:
    """The stage reads exactly the header: the ClientHello behind it stays for TLS."""
    server = start_server("whoami", proxy_protocol="any", ssl_context=server_context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.closing(open_socket(server)) as sock:

        def pump(call: Any) -> Any:
            while True:
                try:
                    result = call()
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        sock.sendall(outgoing.read())
                    data = sock.recv(65536)
                    assert data, "closed during the handshake"
                    incoming.write(data)
                    continue
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                return result

        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(encode_v2(SOURCE6, DEST6) + outgoing.read())  # one packet: header + ClientHello
        pump(tls.do_handshake)
        tls.write(encode_frame(Frame.json({}, id="tls")))
        sock.sendall(outgoing.read())
        decoder = FrameDecoder()
        frames: list[Frame] = []
        while not frames:
            frames = decoder.feed(pump(lambda: tls.read(65536)))
    assert frames[0].id == "tls"
    assert frames[0].json_content()["peer"] == addr(*SOURCE6)


def test_ipv6_listener_trusts_loopback_by_default(start_server) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = start_server("whoami", host="::1", proxy_protocol="any")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with proxied_client(server, encode_v1(SOURCE4, DEST4)) as client:
        assert whoami(client)["peer"] == addr(*SOURCE4)


# -- B. rejections: closed without a byte, one INFO line, the rest goes on -----

UNTRUSTED = dict(proxy_protocol="any", proxy_trusted="10.0.0.0/8,127.0.0.2")

REJECTED = {
    "untrusted-peer-valid-v1": (UNTRUSTED, encode_v1(SOURCE4, DEST4)),
    "untrusted-peer-valid-v2": (UNTRUSTED, encode_v2(SOURCE6, DEST6)),
    "untrusted-peer-v2-local": (UNTRUSTED, encode_v2(None, local=True)),
    "untrusted-peer-sends-nothing": (UNTRUSTED, b""),
    "v1-lf-without-cr": ({}, MALFORMED["v1-lf-without-cr"]),
    "v1-three-octets": ({}, MALFORMED["v1-three-octets"]),
    "v1-tcp4-with-ipv6": ({}, MALFORMED["v1-tcp4-with-ipv6"]),
    "v1-port-65536": ({}, MALFORMED["v1-port-65536"]),
    "v1-port-arabic-indic-digit": ({}, MALFORMED["v1-port-arabic-indic-digit"]),
    "v1-five-fields": ({}, MALFORMED["v1-five-fields"]),
    "v2-inet-length-11": ({}, MALFORMED["v2-inet-length-11"]),
    "v2-inet6-length-35": ({}, MALFORMED["v2-inet6-length-35"]),
    "v2-tlv-value-truncated": ({}, MALFORMED["v2-tlv-value-truncated"]),
    "v2-unknown-version": ({}, MALFORMED["v2-version-1"]),
    "v2-unknown-command": ({}, MALFORMED["v2-command-15"]),
    "v1-too-long": ({}, MALFORMED["v1-no-crlf-within-107"]),
    "v1-crlf-beyond-107": ({}, MALFORMED["v1-crlf-beyond-107"]),
    "no-header-a-frame": ({}, AFTER["frame"]),
    "no-header-http": ({}, MALFORMED["http"]),
    "no-header-tls": ({}, AFTER["client-hello"]),
    "v2-when-only-v1": ({"proxy_protocol": "v1"}, encode_v2(SOURCE4, DEST4)),
    "v1-when-only-v2": ({"proxy_protocol": "v2"}, encode_v1(SOURCE4, DEST4)),
    "header-then-garbage-line": ({}, MALFORMED["v1-port-minus-1"] + AFTER["frame"]),
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_rejected_connection_is_closed_without_a_byte(name: str, logs: pytest.LogCaptureFixture) -> None:
    server_args, payload = REJECTED[name]
    server_args = {"proxy_protocol": "any", **server_args}
    trusted_source = "127.0.0.2" if "proxy_trusted" in server_args else None
    with ServerThread("whoami", limits=Limits(error_linger=0.5), **server_args) as server:
        sock = open_socket(server)
        port = local_port(sock)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        assert read_until_closed(sock) == b""
        sock.close()
        # The server goes on: a good connection is served, before and after.
        good = encode_v1(SOURCE4, DEST4) if server_args["proxy_protocol"] != "v2" else encode_v2(SOURCE4, DEST4)
        with proxied_client(server, good, source=trusted_source) as client:
            assert whoami(client)["peer"] == addr(*SOURCE4)
    about = lines_about(logs, port)
    assert len(about) == 1 and about[0].startswith("INFO "), about
    assert not [r for r in logs.records if r.levelno >= logging.WARNING], logs.text


def test_peer_closing_inside_its_header_logs_one_line(logs: pytest.LogCaptureFixture) -> None:
    with ServerThread("whoami", proxy_protocol="any") as server:
        sock = open_socket(server)
        port = local_port(sock)
        sock.sendall(encode_v1(SOURCE4, DEST4)[:20])
        sock.shutdown(socket.SHUT_WR)
        assert read_until_closed(sock) == b""
        sock.close()
        with proxied_client(server, encode_v2(SOURCE4, DEST4)) as client:
            assert whoami(client)["proxied"] is True
    about = lines_about(logs, port)
    assert len(about) == 1 and about[0].startswith("INFO "), about


@pytest.mark.parametrize("partial", [encode_v1(SOURCE4, DEST4)[:25], encode_v2(SOURCE4, DEST4)[:20],
                                     V2_SIGNATURE[:6], b""], ids=["half-v1", "half-v2", "half-signature",
                                                                  "nothing"])
def test_header_not_complete_within_the_frame_timeout(partial: bytes, logs: pytest.LogCaptureFixture) -> None:
    with ServerThread("whoami", limits=Limits(frame_timeout=0.5), proxy_protocol="any") as server:
        sock = open_socket(server)
        port = local_port(sock)
        started = time.monotonic()
        sock.sendall(partial)
        assert read_until_closed(sock, timeout=5) == b""
        elapsed = time.monotonic() - started
        sock.close()
        with proxied_client(server, encode_v1(SOURCE4, DEST4)) as client:
            assert whoami(client)["proxied"] is True
    assert 0.4 <= elapsed <= 3.0, elapsed
    about = lines_about(logs, port)
    assert len(about) == 1 and about[0].startswith("INFO "), about
    assert "0.5 s" in about[0]


def test_header_trickled_slower_than_the_frame_timeout_is_cut() -> None:
    with ServerThread("whoami", limits=Limits(frame_timeout=0.5), proxy_protocol="any") as server:
        sock = open_socket(server)
        header = encode_v1(SOURCE4, DEST4)
        started = time.monotonic()
        closed_after = None
        try:
            for byte in header[:8]:  # 8 bytes over 1.6 s: far more than the 0.5 s allowed
                sock.send(bytes([byte]))
                time.sleep(0.2)
                readable, _, _ = select.select([sock], [], [], 0)
                if readable and sock.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - started
        sock.close()
    assert closed_after is not None and closed_after < 1.4, closed_after


@pytest.mark.parametrize("header", [encode_v1(SOURCE4, DEST4), encode_v2(SOURCE4, DEST4)], ids=["v1", "v2"])
def test_stage_off_a_proxy_header_is_a_protocol_error(start_server, header: bytes) -> None:
    """Without --proxy-protocol the header is never guessed: it is framed
    bytes like any other, and they are not a valid frame."""
    server = start_server("whoami", limits=Limits(frame_timeout=0.5))
    with contextlib.closing(open_socket(server)) as sock:
        sock.sendall(header + encode_frame(Frame.json({}, id=1)))
        received = read_until_closed(sock)
    frames = FrameDecoder().feed(received)
    assert len(frames) == 1
    code, _ = frames[0].error_info
    assert code in ErrorCode.FATAL


# -- B. health checks ------------------------------------------------------------


def health(id: Any = None, content: bytes = b"", encoding: str = "binary") -> Frame:
    return Frame.binary(content, content_type=HEALTH_CONTENT_TYPE, encoding=encoding, id=id)


@pytest.mark.parametrize("app, server_args", [
    ("whoami", {}), ("echo", {}), ("search", {}),
    ("echo", {"handler_pool": "thread"}),
    ("whoami", {"proxy_protocol": "v2"}),
], ids=["whoami", "echo", "search", "echo-thread-pool", "whoami-behind-proxy"])
def test_health_check_is_answered_ok_in_its_turn(start_server, app: str, server_args: dict) -> None:
    server = start_server(app, **server_args)
    requests = [Frame.binary(b"first", id="a"), health(id="h"), Frame.binary(b"third", id=3),
                health(), health(id=99)]
    if server_args.get("proxy_protocol"):
        client = proxied_client(server, encode_v2(None, local=True))
    else:
        client = server.connect()
    with client:
        answers = client.request_many(requests)
    assert [a.id for a in answers] == ["a", "h", 3, None, 99]
    for i in (1, 3, 4):
        assert answers[i].content == b"ok"
        assert answers[i].content_encoding == "binary"
    assert answers[0].content != b"ok" and answers[2].content != b"ok"
    if app == "echo":
        assert [answers[0].content, answers[2].content] == [b"first", b"third"]


def test_haproxy_style_check_local_header_and_health_in_one_packet(start_server) -> None:
    server = start_server("search", proxy_protocol="v2")
    with contextlib.closing(open_socket(server)) as sock:
        sock.sendall(encode_v2(None, local=True) + encode_frame(health()))
        answer = read_frames(sock, 1)[0]
    assert answer.content == b"ok"


def test_health_checks_between_slow_pooled_requests_keep_their_order(start_server) -> None:
    server = start_server(pool_apps.slow, handler_pool="thread", pool_size=2)
    requests = [Frame.binary(b"sleep:0.3", id=1), health(id=2), Frame.binary(b"sleep:0.05", id=3), health(id=4)]
    with server.connect() as client:
        answers = client.request_many(requests)
    assert [a.id for a in answers] == [1, 2, 3, 4]
    assert [a.content for a in answers] == [b"sleep:0.3", b"ok", b"sleep:0.05", b"ok"]


@pytest.mark.parametrize("frame", [health(content=b"x"), health(content=b"ok"), health(encoding="utf-8")],
                         ids=["content", "content-ok", "not-binary"])
def test_not_quite_a_health_check_goes_to_the_app(start_server, frame: Frame) -> None:
    server = start_server("echo")
    with server.connect() as client:
        answer = client.request(frame)
    assert answer.content == frame.content
    assert answer.content_type == HEALTH_CONTENT_TYPE  # echoed by the app, not the server's "ok"
    server = start_server("whoami")
    with server.connect() as client:
        assert client.request(frame).json_content()["worker"] == os.getpid()


def test_health_answer_says_draining_once_the_server_stops() -> None:
    status = ServerStatus()
    assert health_answer(health(id=5), status) == Frame.binary(b"ok", id=5)
    assert health_answer(health(content=b"x"), status) is None
    assert health_answer(Frame.binary(b""), status) is None
    status.draining = True
    assert health_answer(health(id=5), status) == Frame.binary(b"draining", id=5)
    responder = InlineResponder(echo, status)
    assert responder.respond(health(id="x")).content == b"draining"
    assert responder.respond(health(id="x", content=b"data")).content == b"data"


def test_health_check_held_during_the_drain_is_answered_draining() -> None:
    """A pooled connection at its in-flight limit holds a health check unread;
    the server starts to drain; the check is read and answered ``draining``."""
    server = ServerThread(pool_apps.slow, handler_pool="thread", pool_size=1,
                          limits=Limits(max_in_flight=1, drain_timeout=5)).start()
    try:
        with contextlib.closing(open_socket(server)) as sock:
            sock.sendall(encode_frame(Frame.binary(b"sleep:0.6", id=1)))
            time.sleep(0.15)  # the request is in the pool; reading is paused
            sock.sendall(encode_frame(health(id=2)))
            time.sleep(0.05)
            server.server.shutdown()
            answers = read_frames(sock, 2)
            assert read_until_closed(sock) == b""
    finally:
        server.stop()
    assert [(a.id, a.content) for a in answers] == [(1, b"sleep:0.6"), (2, b"draining")]


# -- C. the command line ---------------------------------------------------------


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    result = subprocess.run([sys.executable, "-m", "multiconn", *args], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=timeout, env=env, text=True)
    return result


@pytest.mark.parametrize("args, expected", [
    (["--proxy-protocol", "v3"], "--proxy-protocol"),
    (["--proxy-protocol", "v1", "--proxy-trusted", "nonsense"], "nonsense"),
    (["--proxy-protocol", "any", "--proxy-trusted", "10.0.0.0/33"], "10.0.0.0/33"),
    (["--proxy-protocol", "v2", "--proxy-trusted", ","], "trusted"),
])
def test_cli_refuses_bad_proxy_options(args: list[str], expected: str) -> None:
    result = run_cli("serve", "--port", "0", *args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert result.stderr.splitlines()[-1] == errors[0]
    assert "Traceback" not in result.stderr


def test_cli_refuses_bad_proxy_trusted_without_proxy_protocol() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "multiconn", "serve", "--port", "0", "--proxy-trusted",
                             "nonsense"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        first_line = proc.stderr.readline()  # the usage line, or "listening on" once it serves
        if "listening on" in first_line:
            proc.terminate()
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == 2, first_line


# -- D. the fuzz target over its seed corpus ---------------------------------------


def test_fuzz_target_passes_over_its_seed_corpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """fuzz/fuzz_proxy.py replays without atheris; every seed holds its invariants."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "atheris", None)  # the plain-Python path, atheris installed or not
    root = Path(__file__).parent.parent / "fuzz"
    spec = importlib.util.spec_from_file_location("fuzz_proxy", root / "fuzz_proxy.py")
    target = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(target)
    seeds = sorted((root / "corpus_proxy").iterdir())
    assert len(seeds) >= 8
    for seed in seeds:
        target.test_one_input(seed.read_bytes())
    # and the cases of this file, each in the target's own input format
    for wire, _ in VALID.values():
        for sizes in ((), (1,), (3, 17)):
            for peek in (False, True):
                target.test_one_input(target.encode_input(wire + AFTER["frame"], peek=peek, sizes=sizes))

"""Coverage-guided fuzzing of the PROXY protocol parser (`multiconn.proxy`) with atheris.

An input is a small prefix that says how to feed the rest, then the bytes a
connection would start with:

    byte 0      bits 0-1: accept ("any", "v1", "v2", "any"); bit 2: the driver
                (0: feed the pieces as they come; 1: the stage's way, peek at most
                ``wanted()`` bytes of what has arrived and remove ``consumed``)
    byte 1      N = byte % 8, the number of piece sizes that follow
    N bytes     piece sizes (each byte + 1), used in turn; none: one piece
    the rest    the stream

so every corpus file is a plain, readable case, and the target needs no
atheris to replay one. It fails (raises) on:

- any exception other than `ProxyHeaderError`;
- ``consumed`` outside 0..len(fed), or less than everything fed while the header
  is incomplete (the stage reads what the parser kept);
- a different outcome for the same stream fed in one piece (header and bytes
  consumed, refusal, or still waiting);
- a v1 header that is not a CRLF-ended line of at most 107 bytes, a v2 header
  whose consumed length is not 16 + its length field;
- a parsed header that, re-encoded with `multiconn.proxy.encode` (where it can
  represent it), does not parse back to an equal header;
- a v1 line on which the parser and an independent reading of HAProxy's
  specification disagree (addresses checked with ``socket.inet_pton``, ports
  decimal without heading zeroes), and a v2 LOCAL with an empty block refused
  (the specification: the receiver must accept LOCAL and ignore the family).

    python fuzz/fuzz_proxy.py -max_total_time=60 /tmp/corpus_proxy   # atheris
    python fuzz/fuzz_proxy.py fuzz/corpus_proxy/*                     # replay, atheris or not
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import sys

try:
    import atheris
except ImportError:  # replay only: python fuzz/fuzz_proxy.py FILE...
    atheris = None

with atheris.instrument_imports() if atheris is not None else contextlib.nullcontext():
    from multiconn.proxy import (
        V1_MAX_LENGTH,
        V2_SIGNATURE,
        ProxyHeader,
        ProxyHeaderError,
        ProxyHeaderParser,
        encode,
    )

ACCEPTS = ("any", "v1", "v2", "any")
PORT = re.compile(r"(0|[1-9][0-9]{0,4})\Z")

Outcome = tuple  # ("header", ProxyHeader, consumed) | ("refused",) | ("waiting", consumed)


def decode_input(raw: bytes) -> tuple[str, bool, list[int], bytes]:
    """(accept, peek driver?, piece sizes, stream) from a fuzzer input."""
    if len(raw) < 2:
        return "any", False, [], raw
    flags, count = raw[0], raw[1] % 8
    sizes = [b + 1 for b in raw[2 : 2 + count]]
    return ACCEPTS[flags & 3], bool(flags & 4), sizes, raw[2 + count :]


def encode_input(stream: bytes, accept: str = "any", peek: bool = False, sizes: tuple[int, ...] = ()) -> bytes:
    """The fuzzer input for `stream` (the inverse of `decode_input`), for seeds."""
    return bytes([ACCEPTS.index(accept) | (4 if peek else 0), len(sizes)]) + bytes(s - 1 for s in sizes) + stream


def pieces_of(stream: bytes, sizes: list[int]) -> list[bytes]:
    if not sizes:
        return [stream]
    pieces, pos, i = [], 0, 0
    while pos < len(stream):
        size = sizes[i % len(sizes)]
        pieces.append(stream[pos : pos + size])
        pos += size
        i += 1
    return pieces


def feed_pieces(parser: ProxyHeaderParser, pieces: list[bytes]) -> Outcome:
    total = 0
    try:
        for piece in pieces:
            consumed, header = parser.feed(piece)
            assert 0 <= consumed <= len(piece), (piece, consumed)
            total += consumed
            if header is not None:
                return ("header", header, total)
            assert consumed == len(piece), ("incomplete header kept only part of its input", piece, consumed)
    except ProxyHeaderError:
        return ("refused",)
    return ("waiting", total)


def peek_pieces(parser: ProxyHeaderParser, pieces: list[bytes]) -> Outcome:
    """What `multiconn.proxy_stage` does: peek at most ``wanted()``, remove ``consumed``."""
    in_socket = bytearray()
    total = 0
    try:
        for piece in pieces:
            in_socket += piece
            while in_socket:
                wanted = parser.wanted()
                assert wanted >= 1, wanted
                peeked = bytes(in_socket[:wanted])
                consumed, header = parser.feed(peeked)
                assert 0 <= consumed <= len(peeked), (peeked, consumed)
                del in_socket[:consumed]
                total += consumed
                if header is not None:
                    return ("header", header, total)
                assert consumed == len(peeked), ("incomplete header kept only part of its input", peeked, consumed)
    except ProxyHeaderError:
        return ("refused",)
    return ("waiting", total)


def check_round_trip(header: ProxyHeader) -> None:
    wire = encode(header)
    if wire is None:
        return  # PROXY without TCP addresses (UNSPEC, UNIX, UDP): the encoders cannot say it
    again = ProxyHeaderParser().feed(wire)
    assert again == (len(wire), header), (header, wire, again)


# -- an independent reading of the specification (doc/proxy-protocol.txt) ----------


def spec_v1(line: bytes) -> str:
    """"valid", "invalid" or "either" for a v1 line without its CRLF."""
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        return "valid" if line.isascii() else "either"  # "ignore anything presented before the CRLF"
    fields = line.split(b" ")
    if len(fields) != 6 or fields[0] != b"PROXY" or fields[1] not in (b"TCP4", b"TCP6"):
        return "invalid"
    if not line.isascii():
        return "invalid"
    family = socket.AF_INET if fields[1] == b"TCP4" else socket.AF_INET6
    for address in fields[2:4]:
        text = address.decode("ascii")
        try:
            socket.inet_pton(family, text)
        except (OSError, ValueError):
            return "invalid"
    for port in fields[4:6]:
        text = port.decode("ascii")
        if not PORT.match(text) or int(text) > 65535:
            return "invalid"
    return "valid"


def check_spec(stream: bytes, accept: str, outcome: Outcome) -> None:
    if accept != "v2" and stream.startswith(b"PROXY "):
        end = stream.find(b"\n")
        if 0 <= end < V1_MAX_LENGTH and stream[end - 1 : end] != b"\r":
            assert outcome[0] == "refused", ("v1 line ended by LF alone accepted", stream[: end + 1], outcome)
        elif 0 <= end < V1_MAX_LENGTH:
            verdict = spec_v1(stream[: end - 1])
            if verdict == "valid":
                assert outcome[0] == "header", ("valid v1 line refused", stream[: end + 1])
            elif verdict == "invalid":
                assert outcome[0] == "refused", ("invalid v1 line accepted", stream[: end + 1], outcome)
    if (accept != "v1" and len(stream) >= 16 and stream.startswith(V2_SIGNATURE)
            and stream[12] == 0x20 and struct.unpack_from("!H", stream, 14)[0] == 0
            and stream[13] >> 4 in (0, 1, 2, 3) and stream[13] & 0xF in (0, 1, 2)):
        assert outcome[0] == "header" and outcome[1].command == "LOCAL", ("v2 LOCAL refused", stream[:16], outcome)


def test_one_input(raw: bytes) -> None:
    accept, peek, sizes, stream = decode_input(raw)
    pieces = pieces_of(stream, sizes)
    outcome = (peek_pieces if peek else feed_pieces)(ProxyHeaderParser(accept), pieces)
    whole = feed_pieces(ProxyHeaderParser(accept), [stream] if stream else [])
    assert outcome == whole, ("split and whole differ", outcome, whole)
    if outcome[0] == "header":
        header, total = outcome[1], outcome[2]
        assert total <= len(stream)
        if header.version == 1:
            assert stream[:total].endswith(b"\r\n") and total <= V1_MAX_LENGTH, (stream[:total], header)
            assert stream[:total].count(b"\n") == 1
        else:
            assert total == 16 + struct.unpack_from("!H", stream, 14)[0], (total, header)
        assert header.proxied == (header.source is not None)
        check_round_trip(header)
    check_spec(stream, accept, outcome)


def main() -> None:
    if atheris is None:
        for path in sys.argv[1:]:
            if os.path.isfile(path):
                with open(path, "rb") as file:
                    test_one_input(file.read())
        print(f"replayed {len(sys.argv) - 1} inputs without atheris: no failure")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

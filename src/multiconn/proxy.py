"""The PROXY protocol (HAProxy's, versions 1 and 2), without any I/O.

A load balancer in TCP mode that speaks the PROXY protocol starts every
connection it opens to us with one header naming the real client: a text line
(v1, ``PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\\r\\n``) or a binary block
(v2, a 12-byte signature, then version/command, family, a length, addresses and
TLVs). The specification is HAProxy's ``doc/proxy-protocol.txt``.

Theory of operation
-------------------
`ProxyHeaderParser.feed(data)` takes bytes *peeked* from the socket and says
how many of them belong to the header (``consumed``): the caller then reads
exactly those, so whatever follows the header (a TLS ClientHello, the first
frame) stays in the socket for the next stage. It returns the parsed
`ProxyHeader` once the header is complete, ``None`` while more is needed, and
raises `ProxyHeaderError` (with a reason for the log) for anything that is not
a valid header. Consuming what is surely header bytes, even before the header
is complete, is what keeps a level-triggered poller from reporting the same
incomplete bytes forever.

The rules are strict, as the specification asks of a receiver: the header is
never guessed (a connection that must start with one and does not is
refused), a v1 line ends in CRLF within 107 bytes, addresses are full literals
of the announced family, ports are decimal numbers within 0-65535, and a v2
address block is at least as long as its family needs. v2 TLVs are kept.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Optional

from .errors import MulticonnError

__all__ = [
    "ProxyHeader", "ProxyHeaderError", "ProxyHeaderParser", "V1_MAX_LENGTH", "V2_SIGNATURE",
    "VERSIONS", "encode", "encode_v1", "encode_v2",
]

#: What ``--proxy-protocol`` accepts.
VERSIONS = ("v1", "v2", "any")
V1_PREFIX = b"PROXY "
#: The longest v1 line, CRLF included (the specification's 107 bytes).
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")
#: Address block sizes by v2 family: INET, INET6, UNIX.
V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}

# v2 TLV types this server names (others are kept by number).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_UNIQUE_ID = 0x05


class ProxyHeaderError(MulticonnError):
    """A connection did not start with a valid PROXY header; `reason` says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a PROXY header said.

    `source` and `destination` are ``(host, port)`` for a PROXY command over
    TCP, and None for v2 LOCAL (the balancer's own health check), v1 UNKNOWN
    and families without addresses: then the connection's own addresses apply
    (`proxied` is False).
    """

    version: int
    command: str  # "PROXY" or "LOCAL" ("UNKNOWN" for v1's TCP UNKNOWN)
    source: Optional[tuple[str, int]] = None
    destination: Optional[tuple[str, int]] = None
    tlvs: dict[int, bytes] = field(default_factory=dict)

    @property
    def proxied(self) -> bool:
        return self.source is not None

    @property
    def alpn(self) -> Optional[bytes]:
        return self.tlvs.get(PP2_TYPE_ALPN)

    @property
    def authority(self) -> Optional[str]:
        value = self.tlvs.get(PP2_TYPE_AUTHORITY)
        return value.decode("utf-8", "replace") if value is not None else None

    @property
    def unique_id(self) -> Optional[bytes]:
        return self.tlvs.get(PP2_TYPE_UNIQUE_ID)


class ProxyHeaderParser:
    """Incremental parser of one PROXY header (see the module's docstring).

    `accept` is ``"v1"``, ``"v2"`` or ``"any"``.
    """

    def __init__(self, accept: str = "any") -> None:
        if accept not in VERSIONS:
            raise ValueError(f"accept must be one of {', '.join(VERSIONS)}, not {accept!r}")
        self.accept = accept
        self._buffer = bytearray()
        self._version = 0  # 0 until the first bytes tell
        self.result: ProxyHeader | None = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def wanted(self) -> int:
        """The most bytes that can still belong to the header (what to peek at)."""
        if self._version == 1:
            return max(1, V1_MAX_LENGTH - len(self._buffer))
        if self._version == 2 and len(self._buffer) >= V2_HEADER.size:
            length: int = V2_HEADER.unpack_from(self._buffer)[3]
            return max(1, V2_HEADER.size + length - len(self._buffer))
        return max(1, V2_HEADER.size - len(self._buffer))

    def feed(self, data: bytes) -> tuple[int, ProxyHeader | None]:
        """(bytes of `data` that belong to the header, the header once complete)."""
        if self.result is not None:
            return 0, self.result
        if not data:
            return 0, None
        start = len(self._buffer)
        self._buffer += data
        if not self._version:
            self._version = self._detect()
            if not self._version:
                return len(data), None  # too short to tell: all of it is header so far
        if self._version == 1:
            consumed = self._feed_v1(start)
        else:
            consumed = self._feed_v2(start)
        return consumed, self.result

    def _detect(self) -> int:
        buffer = bytes(self._buffer)
        for version, prefix in ((1, V1_PREFIX), (2, V2_SIGNATURE)):
            if buffer[:len(prefix)] == prefix[:len(buffer)]:
                if len(buffer) < len(prefix):
                    return 0  # a prefix of this version's start: wait
                if self.accept not in ("any", f"v{version}"):
                    raise ProxyHeaderError(f"PROXY protocol v{version} header, but only {self.accept} is accepted")
                return version
        raise ProxyHeaderError(f"connection does not start with a PROXY header ({_excerpt(buffer)})")

    # -- version 1 --------------------------------------------------------

    def _feed_v1(self, start: int) -> int:
        buffer = self._buffer
        end = buffer.find(b"\n", start)
        if end < 0:
            if len(buffer) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
            return len(buffer) - start
        line = bytes(buffer[:end + 1])
        consumed = len(line) - start
        del buffer[len(line):]
        if len(line) > V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        if not line.endswith(b"\r\n"):
            raise ProxyHeaderError("PROXY v1 line ends with LF, not CRLF")
        self.result = _parse_v1(line[:-2])
        return consumed

    # -- version 2 --------------------------------------------------------

    def _feed_v2(self, start: int) -> int:
        buffer = self._buffer
        if len(buffer) < V2_HEADER.size:
            return len(buffer) - start
        _, version_command, family_transport, length = V2_HEADER.unpack_from(buffer)
        total: int = V2_HEADER.size + length
        consumed = min(len(buffer), total) - start
        del buffer[total:]
        if len(buffer) < total:
            self._check_v2_start(version_command, family_transport, length)
            return consumed
        self.result = _parse_v2(version_command, family_transport, bytes(buffer[V2_HEADER.size:total]))
        return consumed

    @staticmethod
    def _check_v2_start(version_command: int, family_transport: int, length: int) -> None:
        """Refuse early what cannot become valid, rather than wait for its length."""
        if _v2_command(version_command) == "LOCAL":
            return
        family = family_transport >> 4
        if version_command & 0xF == 0x1 and family in V2_ADDRESS_SIZES and length < V2_ADDRESS_SIZES[family]:
            raise ProxyHeaderError(f"PROXY v2 address block of {length} bytes is too short for its family")


def _parse_v1(line: bytes) -> ProxyHeader:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, "UNKNOWN")
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"malformed PROXY v1 line: {text!r}")
    kind = ipaddress.IPv4Address if parts[1] == "TCP4" else ipaddress.IPv6Address
    source = _v1_address(kind, parts[2], parts[4])
    destination = _v1_address(kind, parts[3], parts[5])
    return ProxyHeader(1, "PROXY", source, destination)


def _v1_address(kind: type, host: str, port: str) -> tuple[str, int]:
    try:
        if "%" in host:  # an IPv6 zone names an interface of the sender's, not an address
            raise ValueError(host)
        address = kind(host)
    except ValueError:
        family = "IPv4" if kind is ipaddress.IPv4Address else "IPv6"
        raise ProxyHeaderError(f"PROXY v1 address {host!r} is not a full {family} literal") from None
    return str(address), _port(port)


def _port(text: str) -> int:
    # Decimal digits, no sign, no leading zero (the specification forbids them), at most 65535.
    if (not text.isdigit() or not text.isascii() or len(text) > 5 or int(text) > 65535
            or (len(text) > 1 and text[0] == "0")):
        raise ProxyHeaderError(f"PROXY v1 port {text!r} is not a decimal number within 0-65535")
    return int(text)


def _v2_command(version_command: int) -> str:
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with unknown version {version_command >> 4}")
    command = version_command & 0xF
    if command == 0x0:
        return "LOCAL"
    if command == 0x1:
        return "PROXY"
    raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")


def _parse_v2(version_command: int, family_transport: int, body: bytes) -> ProxyHeader:
    command = _v2_command(version_command)
    family, transport = family_transport >> 4, family_transport & 0xF
    if family not in (0x0, *V2_ADDRESS_SIZES) or transport not in (0x0, 0x1, 0x2):
        raise ProxyHeaderError(f"PROXY v2 header with unknown family/transport {family_transport:#04x}")
    if command == "LOCAL":
        # The balancer's own connection (a health check): the specification says
        # to accept it whatever its family and block, which are discarded. TLVs
        # that parse are kept (HAProxy may send some); any that do not are dropped.
        size = V2_ADDRESS_SIZES.get(family, 0)
        try:
            tlvs = _parse_tlvs(body[size:]) if len(body) >= size else {}
        except ProxyHeaderError:
            tlvs = {}
        return ProxyHeader(2, command, tlvs=tlvs)
    size = V2_ADDRESS_SIZES.get(family, 0)
    if len(body) < size:
        raise ProxyHeaderError(f"PROXY v2 address block of {len(body)} bytes is too short for its family")
    tlvs = _parse_tlvs(body[size:])
    if transport != 0x1 or family not in (0x1, 0x2):
        return ProxyHeader(2, command, tlvs=tlvs)  # no TCP addresses to use: the socket's apply
    if family == 0x1:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
    else:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
    to_text = ipaddress.IPv4Address if family == 0x1 else ipaddress.IPv6Address
    return ProxyHeader(2, "PROXY", (str(to_text(src)), sport), (str(to_text(dst)), dport), tlvs)


def _parse_tlvs(data: bytes) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyHeaderError("PROXY v2 TLV truncated")
        kind, length = struct.unpack_from("!BH", data, offset)
        offset += 3
        if len(data) - offset < length:
            raise ProxyHeaderError("PROXY v2 TLV longer than the header")
        tlvs[kind] = data[offset:offset + length]
        offset += length
    return tlvs


def _excerpt(data: bytes) -> str:
    return repr(data[:16]) + ("..." if len(data) > 16 else "")


# -- encoding (for clients, tests and tools) --------------------------------------------


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None = None) -> bytes:
    """A v1 line for `source` -> `destination` (``PROXY UNKNOWN`` without addresses)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    kind = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {kind} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def encode_v2(source: tuple[str, int] | None, destination: tuple[str, int] | None = None, *,
              local: bool = False, tlvs: dict[int, bytes] | None = None) -> bytes:
    """A v2 header: PROXY over TCP for `source` -> `destination`, or LOCAL."""
    extra = b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in (tlvs or {}).items())
    if local or source is None or destination is None:
        return V2_HEADER.pack(V2_SIGNATURE, 0x20, 0x00, len(extra)) + extra
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + extra
    return V2_HEADER.pack(V2_SIGNATURE, 0x21, family, len(body)) + body


def encode(header: ProxyHeader) -> bytes | None:
    """`header` on the wire again, in its own version, or None where the
    encoders cannot say it (a v2 PROXY header without TCP addresses: UNSPEC,
    UNIX or UDP). A relay passing on what it was told, or a check that what
    was parsed means what was sent, starts here."""
    if header.version == 1:
        return encode_v1(header.source, header.destination)
    if header.command == "LOCAL":
        return encode_v2(None, local=True, tlvs=header.tlvs)
    if header.source is not None:
        return encode_v2(header.source, header.destination, tlvs=header.tlvs)
    return None

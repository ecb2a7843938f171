#!/usr/bin/env python3
"""A bounded soak test of ``multiconn serve --app echo``.

Usage::

    python scripts/soak.py [--duration SECONDS] [--json] [--seed N]

It starts ``python -m multiconn serve --port 0 --app echo --log-level info
--idle-timeout 30`` in a subprocess (`multiconn.testing.ServerProcess`: its
port read from the INFO line ``listening on 127.0.0.1:PORT (app ...)``, a
thread draining stderr and keeping every line), waits a second, records the
server's resident memory and open descriptor count, and then, for the
duration, runs five kinds of clients at once against it, over 127.0.0.1 only:

churn
    short connections: connect, 1-3 requests (random id, random binary or
    text/json content of 0..4 KiB in a random text codec), each answer checked
    byte for byte, then close (half the time after a half-close, expecting the
    server's EOF). Times connect() alone ("connect latency") and connect() up to
    the first complete answer ("accept latency").
pipeline
    long-lived connections (20) that each send batches of 1-32 pipelined frames
    (sometimes in random pieces) and check every answer in order by id and content.
garbage
    connections that send 0-3 valid frames and then a malformed frame (hlen 0,
    bad JSON, not UTF-8, a BOM, duplicate keys, missing keys, bad values, bad ids,
    content-too-large, random bytes), or a text/json frame whose content does not
    parse. They must get the valid answers, then the error frame with the code
    (and id) docs/protocol.md ("Errors") prescribes, then EOF for a fatal error, or,
    for ``bad-content``, a connection that still answers.
reset
    connections that send nothing, half a frame, or a whole pipeline (reading
    part of the answers or none) and then close with SO_LINGER 0 (a TCP reset).
slow
    a few connections that send their frames in 3-12 pieces with sleeps between
    them (sometimes the first bytes one at a time) and check the answers.

The clients run in two worker processes (``spawn``): one for churn, so its
latencies are not inflated by the other kinds' threads, one for the rest. The
parent only watches: it samples the server's RSS and descriptors once a second
and makes sure the server and the workers stay alive.

The clients share no code with multiconn: frames are encoded and decoded by
tests/reference_codec.py, written from docs/protocol.md (tests/test_stateful.py
uses it too), so a bug in the library's codec cannot hide itself.

At the end the load stops, the parent waits (up to 10 s) for the server's
descriptor count to come back to its baseline, measures RSS again, sends
SIGTERM and expects exit status 0 and a stderr without "Traceback" and without
ERROR or CRITICAL lines. The exit status is 0 only when every valid request was
answered correctly, nothing unexpected happened, the descriptors came back, RSS
grew by less than `RSS_TOLERANCE_MIB` (and, in runs of a minute or more, by
less than `RSS_GROWTH_LIMIT_MIB` after the warm-up: see there for the measured
figures behind both) and the server exited cleanly; otherwise 1 (130 on
Ctrl-C or SIGTERM). ``--json`` prints one JSON object on stdout (the readable
summary then goes to stderr). Every socket, thread and process is cleaned up in
``finally`` blocks, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import resource
import signal
import socket
import string
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the server's process helpers from this checkout
sys.path.insert(1, str(REPO / "tests"))  # the reference codec

from multiconn.errors import ServerStartError  # noqa: E402
from multiconn.testing import ServerProcess  # noqa: E402
from reference_codec import ERROR_CODES, FATAL_CODES, HLEN, NO_ID, REQUIRED_KEYS, TEXT_ENCODINGS  # noqa: E402
from reference_codec import FrameReader, Mismatch, PeerClosed, check_error_frame, encode, error_of  # noqa: E402
from reference_codec import make_header, raw_frame, same_id  # noqa: E402

HOST = "127.0.0.1"
SERVER_ARGS = ["--app", "echo", "--log-level", "info", "--idle-timeout", "30"]
START_DEADLINE = 15.0  # for the server's "listening" line
SETTLE = 1.0  # idle time before the baseline is taken
FD_WAIT = 10.0  # for the descriptors to come back after the load
WORKER_START = 60.0  # for the worker processes to start
EXIT_WAIT = 25.0  # for the server to exit after SIGTERM (its drain timeout is 10 s)
# Memory. Measured (Python 3.11, glibc, 2 cores): the idle server holds ~20.5 MiB.
# Under this load it gains ~15 MiB in the first 30 s (pymalloc arenas 15-16 MiB
# for ~8 MB of live small objects: the two 1024-entry header caches, frames in
# flight; glibc's heap ~10 MiB of which 3.5-4.5 MiB in use) and then creeps by
# ~1 MiB a minute, slowing: +15.5 MiB after 60 s, +17.7 and +21.9 MiB after
# 240 and 300 s. An instrumented 240 s run (5.7 million requests, 270,000
# connections) showed that creep to be fragmentation, not a leak: Python's
# allocated block count (78,000-100,000), glibc's in-use heap and the number of
# GC objects stayed flat without trend while only glibc's *free* heap grew.
#: End RSS minus the idle baseline must stay below this (twice the idle footprint).
RSS_TOLERANCE_MIB = 40.0
#: For runs of at least `LEAK_CHECK_MIN` seconds: RSS growth from the end of the
#: warm-up (30 s, or 20 % of the run if longer) to the end must stay below this.
#: Measured: +0.3 MiB (60 s run), +0.8 and +2.8 MiB (240 and 300 s runs). A leak of
#: one 64-byte object per connection adds ~15 MiB over the ~240,000 connections
#: of a 5-minute run after its warm-up; one per request adds hundreds.
RSS_GROWTH_LIMIT_MIB = 8.0
LEAK_CHECK_MIN = 60.0
IO_TIMEOUT = 20.0  # per blocking socket operation of a client
MAX_CONTENT = 16 * 1024 * 1024  # the server's default --max-content

# The load. Measured on 2 cores: ~23,000 requests and ~1,000 connections a second,
# the server at ~55 % of a core, the clients at ~60 % of one between them.
CHURN_THREADS = 4
PIPELINE_CONNECTIONS = 20
GARBAGE_THREADS = 2
RESET_THREADS = 2
SLOW_THREADS = 3
PIPELINE_PAUSE = (0.0, 0.02)  # seconds between a long-lived connection's batches
GARBAGE_PAUSE = (0.0, 0.01)
RESET_PAUSE = (0.0, 0.01)
SLOW_PIECE_SLEEP = (0.005, 0.12)

KINDS = ("churn", "pipeline", "garbage", "reset", "slow")
LINGER_RST = struct.pack("ii", 1, 0)
ASCII_TEXT = string.ascii_letters + string.digits + " _-.,:;!?'\"\\/{}[]\t\n"
UNICODE_TEXT = ASCII_TEXT + "éüßñøπλЖжদ世界中文日本\u00a0\u2028\U0001f436\U0001f430\U0001f48d\U0001f3d0"


# -- requests and answers ---------------------------------------------------------------


class Request:
    """A valid request: its header (without byteorder/content-length), content and wire bytes."""

    __slots__ = ("header", "content", "wire")

    def __init__(self, header: dict[str, Any], content: bytes, rng: random.Random) -> None:
        self.header = header
        self.content = content
        self.wire = encode(header, content, rng)

    @property
    def id(self) -> Any:
        return self.header.get("id", NO_ID)


def check_echo(request: Request, header: dict[str, Any], content: bytes) -> None:
    """The echo app's answer: same content-type, content-encoding, content and id."""
    for key in ("content-type", "content-encoding"):
        if header.get(key) != request.header[key]:
            raise Mismatch(f"{key} {header.get(key)!r} != {request.header[key]!r}"
                           f" (answer header {header!r}, error {error_of(header, content)})")
    got = header.get("id", NO_ID)
    if not same_id(request.id, got):
        raise Mismatch(f"answer id {got!r} != request id {request.id!r}")
    if content != request.content:
        raise Mismatch(f"content differs: {len(content)} bytes {content[:40]!r}... "
                       f"!= {len(request.content)} bytes {request.content[:40]!r}...")


# -- random requests ---------------------------------------------------------------------


def random_id(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.15:
        return NO_ID
    if r < 0.55:
        return rng.choice((rng.randint(-(2**63), 2**63), rng.randint(0, 10**6), 0, -1))
    return "".join(rng.choices(UNICODE_TEXT, k=rng.randint(0, 24)))


def random_encoding_spelling(rng: random.Random, name: str) -> str:
    """The codec name as a client may spell it: case and ``_`` for ``-`` are free."""
    r = rng.random()
    if r < 0.1:
        return name.upper()
    if r < 0.2:
        return name.replace("-", "_")
    return name


def json_value(rng: random.Random, text: str) -> Any:
    shape = rng.random()
    if shape < 0.3:
        return text
    if shape < 0.6:
        return {"action": "search", "value": text, "n": rng.randint(-(10**15), 10**15),
                "f": rng.random() * 1e6, "ok": rng.random() < 0.5, "none": None}
    if shape < 0.8:
        return [text[i : i + 16] for i in range(0, len(text), 16)] + [1, 2.5, None, True, {}]
    return {"nested": [{"k": text, "d": {"x": [1, [2, [3, []]]]}}]}


def random_request(rng: random.Random, limit: int = 4096, rid: Any = None) -> Request:
    """A valid request of 0..`limit` content bytes (binary or text/json).

    Contents come from a pool per thread (random.Random instance) and size class
    that is refreshed as it is used: making 4 KiB of random JSON text costs far
    more CPU than sending it, and the clients' CPU is the server's competition.
    Headers (id, key order, spacing) are made fresh for every request.
    """
    pools = _POOLS.setdefault(id(rng), {})
    pool = pools.setdefault(limit, [])
    if len(pool) < POOL_SIZE:
        pool.append(random_content(rng, limit))
    elif rng.random() < POOL_REFRESH:
        pool[rng.randrange(POOL_SIZE)] = random_content(rng, limit)
    content_type, encoding, content = rng.choice(pool)
    header: dict[str, Any] = {"content-type": content_type, "content-encoding": encoding}
    rid = random_id(rng) if rid is None else rid
    if rid is not NO_ID:
        header["id"] = rid
    if rng.random() < 0.05:
        header["x-soak-ignored"] = {"any": ["value", 1]}  # unknown keys are ignored
    return Request(header, content, rng)


_POOLS: dict[int, dict[int, list[tuple[str, str, bytes]]]] = {}
POOL_SIZE = 200
POOL_REFRESH = 0.05


def random_content(rng: random.Random, limit: int) -> tuple[str, str, bytes]:
    """``(content-type, content-encoding, content)``: binary or text/json, 0..`limit` bytes."""
    header: dict[str, Any] = {}
    if rng.random() < 0.5:
        header["content-type"] = rng.choice(
            ("binary/octet-stream", "binary/custom-client-binary-type", "image/png", "x/soak"))
        header["content-encoding"] = rng.choice(("binary", "binary", "gzip", "x-anything"))
        content = rng.randbytes(rng.randint(0, limit))
    else:
        name = rng.choice(TEXT_ENCODINGS)
        header["content-type"] = "text/json"
        header["content-encoding"] = random_encoding_spelling(rng, name)
        wide = name.startswith(("utf-16", "utf-32"))
        ascii_only = name in ("ascii", "latin-1", "iso-8859-1")
        width = 4 if name.startswith("utf-32") else 2 if wide else 1
        chars = rng.randint(0, max(0, limit // width - 40))
        while True:
            text = "".join(rng.choices(ASCII_TEXT if ascii_only else UNICODE_TEXT, k=chars))
            content = json.dumps(json_value(rng, text), ensure_ascii=ascii_only).encode(name)
            if len(content) <= max(limit, 8) or chars == 0:
                break
            chars //= 2
    return header["content-type"], header["content-encoding"], content


# -- malformed frames --------------------------------------------------------------------


def good_header(rng: random.Random, length: int = 0, rid: Any = NO_ID) -> dict[str, Any]:
    return make_header("binary/octet-stream", "binary", length, rid, rng.choice(("little", "big")))


def _valid_id(rng: random.Random) -> Any:
    rid = random_id(rng)
    return rng.randint(0, 1000) if rid is NO_ID else rid


def malformed(rng: random.Random) -> tuple[str, bytes, str | None, Any]:
    """``(case, wire bytes, expected code or None when any/no error frame is right, id)``.

    The expected code is what docs/protocol.md ("Errors") prescribes; the expected id
    is the request's when its header parsed and held a valid id.
    """
    case = rng.choice((
        "hlen-0", "bad-json", "not-utf8", "bom", "not-object", "duplicate-key",
        "missing-key", "bad-value", "bad-id", "too-large", "random-bytes", "random-header",
    ))
    tail = rng.randbytes(rng.randint(0, 64))
    dumps = json.dumps
    if case == "hlen-0":
        return case, b"\x00\x00" + tail, "bad-header-length", NO_ID
    if case == "bad-json":
        text = dumps(good_header(rng))
        return case, raw_frame(text[: rng.randint(1, len(text) - 1)].encode()) + tail, "bad-header", NO_ID
    if case == "not-utf8":
        return case, raw_frame(b'{"byteorder": "\xff\xfe", "x": "\xc3"}') + tail, "bad-header", NO_ID
    if case == "bom":
        return case, raw_frame(b"\xef\xbb\xbf" + dumps(good_header(rng)).encode()) + tail, "bad-header", NO_ID
    if case == "not-object":
        body = rng.choice(("[1, 2, 3]", '"a string"', "42", "null", "true", "[{}]"))
        return case, raw_frame(body.encode()) + tail, "bad-header", NO_ID
    if case == "duplicate-key":
        key = rng.choice(REQUIRED_KEYS)
        value = dumps(good_header(rng)[key])
        text = dumps(good_header(rng))[:-1] + f', "{key}": {value}}}'
        return case, raw_frame(text.encode()), "bad-header", NO_ID
    if case == "missing-key":
        rid = _valid_id(rng) if rng.random() < 0.7 else NO_ID
        header = good_header(rng, rid=rid)
        for key in rng.sample(REQUIRED_KEYS, rng.randint(1, len(REQUIRED_KEYS))):
            del header[key]
        return case, raw_frame(dumps(header).encode()) + tail, "missing-header", rid
    if case == "bad-value":
        rid = _valid_id(rng) if rng.random() < 0.7 else NO_ID
        header = good_header(rng, rid=rid)
        key, value = rng.choice((
            ("byteorder", "middle"), ("byteorder", 1), ("byteorder", None), ("byteorder", "LITTLE"),
            ("content-type", ""), ("content-type", 5), ("content-type", None), ("content-type", ["text/json"]),
            ("content-encoding", ""), ("content-encoding", 0), ("content-encoding", {}),
            ("content-length", -1), ("content-length", 1.5), ("content-length", "10"),
            ("content-length", True), ("content-length", None), ("content-length", 1e3),
            ("text/json", "binary"), ("text/json", "utf-7"), ("text/json", "base64"), ("text/json", "cp1252"),
        ))
        if key == "text/json":
            header["content-type"], header["content-encoding"] = "text/json", value
        else:
            header[key] = value
        return case, raw_frame(dumps(header).encode()) + tail, "bad-header-value", rid
    if case == "bad-id":
        header = good_header(rng)
        header["id"] = rng.choice((1.5, [1], {"a": 1}, True, False, None, 1e20))
        return case, raw_frame(dumps(header).encode()) + tail, "bad-header-value", NO_ID
    if case == "too-large":
        rid = _valid_id(rng) if rng.random() < 0.7 else NO_ID
        length = rng.choice((MAX_CONTENT + 1, MAX_CONTENT * 4, 2**40, 2**63))
        header = good_header(rng, length=length, rid=rid)
        return case, raw_frame(dumps(header).encode(), rng.randbytes(rng.randint(0, 4096))), "content-too-large", rid
    if case == "random-bytes":
        data = rng.randbytes(rng.randint(1, 2000))
        return case, data, expected_for_random(data), NO_ID
    # random-header: a plausible hlen, then random bytes as the header
    hlen = rng.randint(1, 300)
    data = HLEN.pack(hlen) + rng.randbytes(hlen + rng.randint(0, 64))
    return case, data, expected_for_random(data), NO_ID


def expected_for_random(data: bytes) -> str | None:
    """What random bytes must get: the code, "" for EOF without a frame, None if unclear."""
    hlen = HLEN.unpack_from(data)[0] if len(data) >= 2 else None
    if hlen is None:
        return ""  # a partial frame at EOF is dropped
    if hlen == 0:
        return "bad-header-length"
    if len(data) < 2 + hlen:
        return ""
    raw = data[2 : 2 + hlen]
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:
        return "bad-header"
    if raw.startswith(b"\xef\xbb\xbf") or not isinstance(value, dict):
        return "bad-header"
    return None  # random bytes that form a JSON object: not worth predicting


def bad_content_request(rng: random.Random) -> tuple[str, bytes, Any]:
    """A well-framed text/json request whose content does not decode or parse."""
    rid = _valid_id(rng) if rng.random() < 0.8 else NO_ID
    encoding, content = rng.choice((
        ("utf-8", b"{not json"), ("utf-8", b""), ("utf-8", b"\xff\xfe\xfd"), ("utf-8", b'{"a": 1'),
        ("utf-16-le", b"abc"), ("ascii", "\u00e9".encode("latin-1")), ("utf-32", b"\x00\x01"),
        ("utf-8", b"[1, 2,]"), ("latin-1", b"{'single': 'quotes'}"),
    ))
    header = {"content-type": "text/json", "content-encoding": encoding}
    if rid is not NO_ID:
        header["id"] = rid
    return f"bad-content/{encoding}", encode(header, content, rng), rid


# -- statistics --------------------------------------------------------------------------


class Stats:
    """One thread's counts; merged into one per worker and then in the parent."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.error_frames: collections.Counter[str] = collections.Counter()
        self.cases: collections.Counter[str] = collections.Counter()
        self.unexpected: collections.Counter[str] = collections.Counter()
        self.accept: list[float] = []
        self.connect: list[float] = []
        self.examples: list[str] = []

    def connection(self, kind: str) -> None:
        self.counts["conn:" + kind] += 1

    def failed(self, kind: str, exc: BaseException) -> None:
        if isinstance(exc, Mismatch):
            self.counts["mismatches"] += 1
            label = "mismatch"
        else:
            label = type(exc).__name__
            self.unexpected[f"{kind}:{label}"] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {label}: {exc}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts), "error_frames": dict(self.error_frames),
            "cases": dict(self.cases), "unexpected": dict(self.unexpected),
            "accept": self.accept, "connect": self.connect, "examples": self.examples,
        }

    def merge(self, other: dict[str, Any]) -> None:
        self.counts.update(other["counts"])
        self.error_frames.update(other["error_frames"])
        self.cases.update(other["cases"])
        self.unexpected.update(other["unexpected"])
        self.accept.extend(other["accept"])
        self.connect.extend(other["connect"])
        self.examples.extend(other["examples"][: max(0, 40 - len(self.examples))])


# -- the clients -------------------------------------------------------------------------


class Load:
    """What every client thread of a worker shares: where, until when, and a stop flag."""

    def __init__(self, port: int, deadline: float, stop: Any, seed: int) -> None:
        self.address = (HOST, port)
        self.deadline = deadline
        self.stop = stop  # a multiprocessing Event, set by the parent
        self.seed = seed
        self.parent = os.getppid()

    def running(self) -> bool:
        return time.monotonic() < self.deadline and not self.stop.is_set() and os.getppid() == self.parent

    def pause(self, bounds: tuple[float, float], rng: random.Random) -> None:
        delay = rng.uniform(*bounds)
        if delay > 0:
            time.sleep(min(delay, max(0.0, self.deadline - time.monotonic())))

    @contextlib.contextmanager
    def connection(self, stats: Stats, role: str) -> Iterator[socket.socket]:
        """A fresh client socket (not yet connected) for one connection of
        `role`: counted, always closed; a failure is counted, not raised, so
        the client thread goes on with its next connection."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(IO_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            stats.connection(role)
            yield sock
        except Exception as exc:
            stats.failed(role, exc)
        finally:
            sock.close()


def send_in_pieces(sock: socket.socket, data: bytes, pieces: int, rng: random.Random,
                   sleep: tuple[float, float] | None = None) -> None:
    cuts = sorted(rng.sample(range(1, len(data)), min(pieces - 1, len(data) - 1))) if len(data) > 1 else []
    start = 0
    for cut in cuts + [len(data)]:
        sock.sendall(data[start:cut])
        start = cut
        if sleep is not None and cut < len(data):
            time.sleep(rng.uniform(*sleep))


def exchange(sock: socket.socket, reader: FrameReader, requests: list[Request], stats: Stats) -> None:
    """Read and check the answers to `requests` (already sent), in order."""
    for request in requests:
        header, content = reader.frame()
        stats.counts["answered"] += 1
        check_echo(request, header, content)
        stats.counts["verified"] += 1


def finish(sock: socket.socket, reader: FrameReader, rng: random.Random) -> None:
    """End a connection cleanly: half the time half-close and expect the server's EOF."""
    if rng.random() < 0.5:
        sock.shutdown(socket.SHUT_WR)
        reader.eof()


def churn_thread(load: Load, stats: Stats, rng: random.Random) -> None:
    while load.running():
        with load.connection(stats, "churn") as sock:
            requests = [random_request(rng) for _ in range(rng.randint(1, 3))]
            started = time.perf_counter()
            sock.connect(load.address)
            connected = time.perf_counter()
            reader = FrameReader(sock)
            for index, request in enumerate(requests):
                sock.sendall(request.wire)
                stats.counts["sent"] += 1
                exchange(sock, reader, [request], stats)
                if index == 0:
                    stats.connect.append(connected - started)
                    stats.accept.append(time.perf_counter() - started)
            finish(sock, reader, rng)


def pipeline_thread(load: Load, stats: Stats, rng: random.Random) -> None:
    """One long-lived connection (reopened only after a failure)."""
    while load.running():
        with load.connection(stats, "pipeline") as sock:
            sock.connect(load.address)
            reader = FrameReader(sock)
            next_id = rng.randint(0, 10**6)
            while load.running():
                limit = rng.choice((0, 64, 512, 4096))
                batch = []
                for _ in range(rng.randint(1, 32)):
                    # Ids in sequence, alternately as int and str, a few missing: the order shows.
                    next_id += 1
                    rid = NO_ID if rng.random() < 0.1 else next_id if next_id % 2 else f"p{next_id}"
                    batch.append(random_request(rng, limit, rid=rid))
                wire = b"".join(request.wire for request in batch)
                if rng.random() < 0.3:
                    send_in_pieces(sock, wire, rng.randint(2, 8), rng)
                else:
                    sock.sendall(wire)
                stats.counts["sent"] += len(batch)
                stats.counts["batches"] += 1
                exchange(sock, reader, batch, stats)
                load.pause(PIPELINE_PAUSE, rng)
            sock.shutdown(socket.SHUT_WR)
            reader.eof()


def garbage_thread(load: Load, stats: Stats, rng: random.Random) -> None:
    while load.running():
        with load.connection(stats, "garbage") as sock:
            sock.connect(load.address)
            reader = FrameReader(sock)
            before = [random_request(rng, rng.choice((0, 256, 4096))) for _ in range(rng.randint(0, 3))]
            if rng.random() < 0.25:
                case, wire, rid = bad_content_request(rng)
                code: str | None = "bad-content"
            else:
                case, wire, code, rid = malformed(rng)
            stats.cases[case] += 1
            data = b"".join(request.wire for request in before) + wire
            if rng.random() < 0.3:
                send_in_pieces(sock, data, rng.randint(2, 6), rng)
            else:
                sock.sendall(data)
            stats.counts["sent"] += len(before)
            half_closed = code != "bad-content" and (code in ("", None) or rng.random() < 0.5)
            if half_closed:  # random bytes may be a partial frame: EOF tells the server it is over
                sock.shutdown(socket.SHUT_WR)
            exchange(sock, reader, before, stats)
            if code == "":
                reader.eof()  # a partial frame at EOF is dropped: no answer
                stats.cases["random: EOF, no frame"] += 1
            elif code is None:
                stats.cases["random: unpredictable"] += 1
                try:
                    header, content = reader.frame()
                except PeerClosed:
                    pass
                else:
                    got, _ = check_error_frame(header, content, None, NO_ID)
                    stats.error_frames[got] += 1
                    reader.eof()
            else:
                header, content = reader.frame()
                got, _ = check_error_frame(header, content, code, rid)
                stats.error_frames[got] += 1
                if got in FATAL_CODES:
                    reader.eof()
                else:  # bad-content: framing is intact and the connection still answers
                    after = [random_request(rng, 256) for _ in range(rng.randint(1, 3))]
                    sock.sendall(b"".join(request.wire for request in after))
                    stats.counts["sent"] += len(after)
                    exchange(sock, reader, after, stats)
                    finish(sock, reader, rng)
        load.pause(GARBAGE_PAUSE, rng)


def reset_thread(load: Load, stats: Stats, rng: random.Random) -> None:
    while load.running():
        with load.connection(stats, "reset") as sock:
            sock.connect(load.address)
            case = rng.choice(("at once", "half a frame", "pipeline unread", "pipeline half read"))
            stats.cases["reset: " + case] += 1
            if case == "half a frame":
                wire = random_request(rng, rng.choice((64, 4096, 100_000))).wire
                sock.sendall(wire[: rng.randint(1, len(wire) - 1)])
                stats.counts["abandoned"] += 1
            elif case.startswith("pipeline"):
                batch = [random_request(rng, rng.choice((512, 16384))) for _ in range(rng.randint(1, 16))]
                sock.sendall(b"".join(request.wire for request in batch))
                stats.counts["abandoned"] += len(batch)
                if case == "pipeline half read":
                    reader = FrameReader(sock)
                    read = rng.randint(0, len(batch) - 1)
                    stats.counts["sent"] += read
                    exchange(sock, reader, batch[:read], stats)
                    stats.counts["abandoned"] -= read
                elif rng.random() < 0.5:
                    time.sleep(0.005)  # let the server start answering into a connection about to die
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        load.pause(RESET_PAUSE, rng)


def slow_thread(load: Load, stats: Stats, rng: random.Random) -> None:
    while load.running():
        with load.connection(stats, "slow") as sock:
            sock.connect(load.address)
            reader = FrameReader(sock)
            for _ in range(rng.randint(1, 3)):
                if not load.running():
                    break
                batch = [random_request(rng, rng.choice((16, 512, 4096))) for _ in range(rng.randint(1, 4))]
                wire = b"".join(request.wire for request in batch)
                if rng.random() < 0.3:  # the first bytes one by one: split hlen, split header
                    for i in range(min(6, len(wire))):
                        sock.sendall(wire[i : i + 1])
                        time.sleep(rng.uniform(*SLOW_PIECE_SLEEP))
                    wire = wire[6:]
                if wire:
                    send_in_pieces(sock, wire, rng.randint(3, 12), rng, SLOW_PIECE_SLEEP)
                stats.counts["sent"] += len(batch)
                exchange(sock, reader, batch, stats)
            finish(sock, reader, rng)


ROLES: dict[str, list[tuple[Callable[[Load, Stats, random.Random], None], int]]] = {
    "churn": [(churn_thread, CHURN_THREADS)],
    "mixed": [
        (pipeline_thread, PIPELINE_CONNECTIONS),
        (garbage_thread, GARBAGE_THREADS),
        (reset_thread, RESET_THREADS),
        (slow_thread, SLOW_THREADS),
    ],
}


def worker_main(role: str, port: int, duration: float, ready: Any, stop: Any, results: Any,
                seed: int) -> None:
    """A worker process: run `role`'s client threads for `duration`, report stats.

    The clock starts when every worker and the parent have met at `ready`, so a
    slow start on a loaded machine does not eat into the run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and sets `stop`
    try:
        ready.wait(WORKER_START)
    except threading.BrokenBarrierError:
        return  # the parent gave up (or was interrupted) before the start
    deadline = time.monotonic() + duration
    load = Load(port, deadline, stop, seed)
    threads: list[tuple[threading.Thread, Stats]] = []
    crashed: list[str] = []

    def guarded(target: Callable[..., None], stats: Stats, rng: random.Random) -> None:
        try:
            target(load, stats, rng)
        except BaseException as exc:  # a bug in this script: say so, don't hide it
            crashed.append(f"{target.__name__}: {type(exc).__name__}: {exc}")
            stats.unexpected[f"{role}:script-crash"] += 1

    number = 0
    for target, count in ROLES[role]:
        for _ in range(count):
            number += 1
            stats = Stats()
            rng = random.Random(f"{seed}:{role}:{number}")
            thread = threading.Thread(target=guarded, args=(target, stats, rng),
                                      name=f"{target.__name__}-{number}", daemon=True)
            threads.append((thread, stats))
    try:
        for thread, _ in threads:
            thread.start()
        for thread, _ in threads:
            # Each thread ends within one cycle after the deadline; a cycle is bounded
            # by IO_TIMEOUT per operation.
            thread.join(max(0.0, deadline - time.monotonic()) + 4 * IO_TIMEOUT)
    finally:
        total = Stats()
        for thread, stats in threads:
            if thread.is_alive():  # its stats are still changing: count the hang only
                total.unexpected[f"{role}:thread-hung"] += 1
                total.examples.append(f"{thread.name} did not finish")
            else:
                total.merge(stats.to_dict())
        total.examples.extend(crashed)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        total.counts["cpu_ms:" + role] += round((usage.ru_utime + usage.ru_stime) * 1000)
        try:
            if os.getppid() == load.parent:  # else nobody reads: the parent is gone
                results.send((role, total.to_dict()))
        except OSError:  # the parent went away meanwhile (BrokenPipeError)
            pass
        finally:
            results.close()


# -- the server --------------------------------------------------------------------------


def _death_signal() -> Callable[[], None] | None:
    """A preexec_fn that has the server killed when we die (Linux PR_SET_PDEATHSIG).

    libc is loaded here, in the parent: the child between fork and exec must not import.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (ImportError, OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigkill)
    return preexec


def start_server() -> ServerProcess:
    """``multiconn serve`` from this checkout, in a session of its own (Ctrl-C is ours to handle)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env["PYTHONIOENCODING"] = "utf-8"
    server = ServerProcess(*SERVER_ARGS, env=env, start_new_session=True, preexec_fn=_death_signal())
    return server.start(START_DEADLINE)


def rss_mib(server: ServerProcess) -> float | None:
    rss = server.rss_bytes()
    return None if rss is None else rss / (1 << 20)


# -- the run -----------------------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of sorted values."""
    if not sorted_values:
        return None
    index = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[index]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def mib(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class Soak:
    def __init__(self, duration: float, seed: int) -> None:
        self.duration = duration
        self.seed = seed
        self.server: ServerProcess | None = None
        self.context = multiprocessing.get_context("spawn")
        self.stop = self.context.Event()
        self.ready = self.context.Barrier(len(ROLES) + 1)
        self.pipes: dict[str, Any] = {}  # role -> the reading end of its worker's results pipe
        self.workers: list[Any] = []
        self.failures: list[str] = []

    def run(self) -> dict[str, Any]:
        server = self.server = start_server()
        time.sleep(SETTLE)
        rss_base, fds_base, cpu_base = rss_mib(server), server.open_fds(), server.cpu_seconds()
        if rss_base is None or fds_base is None:
            raise RuntimeError("cannot read /proc for the server (Linux only)")
        timeline: list[tuple[float, float, int]] = []
        rss_peak, fds_peak = rss_base, fds_base

        # Workers start with SIGINT ignored (inherited through exec): a Ctrl-C is the
        # parent's to handle, also while a worker is still importing.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for role in ROLES:
                # One pipe per worker, its writing end only in the worker: a worker that
                # dies shows as EOF, and a worker whose parent died gets EPIPE, not a hang.
                reader, writer = self.context.Pipe(duplex=False)
                self.pipes[role] = reader
                worker = self.context.Process(
                    target=worker_main, name=f"soak-{role}", daemon=True,
                    args=(role, server.port, self.duration, self.ready, self.stop, writer, self.seed),
                )
                try:
                    worker.start()
                finally:
                    writer.close()
                self.workers.append(worker)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            self.ready.wait(WORKER_START)
        except threading.BrokenBarrierError:
            raise RuntimeError(f"the worker processes did not start within {WORKER_START:g} s") from None
        started = time.monotonic()
        deadline = started + self.duration

        stats = Stats()
        pending = {reader: role for role, reader in self.pipes.items()}
        last_sample = 0.0
        give_up = deadline + 4 * IO_TIMEOUT + 30
        while pending:
            for reader in multiprocessing.connection.wait(list(pending), timeout=0.25):
                role = pending.pop(reader)
                try:
                    stats.merge(reader.recv()[1])
                except EOFError:
                    self.failures.append(f"the {role} worker died without reporting")
            now = time.monotonic()
            if now - last_sample >= 1.0:
                last_sample = now
                rss, fds = rss_mib(server), server.open_fds()
                if rss is not None and fds is not None:
                    rss_peak, fds_peak = max(rss_peak, rss), max(fds_peak, fds)
                    timeline.append((round(now - started, 1), round(rss, 2), fds))
            if not server.alive() and not self.stop.is_set():
                self.failures.append(f"the server died during the load (status {server.proc.returncode})")
                self.stop.set()
            if now > give_up:
                if self.stop.is_set():
                    break  # close() terminates them
                self.failures.append(f"the {', '.join(pending.values())} worker(s) did not finish in time")
                self.stop.set()
                give_up = now + 30
        load_seconds = time.monotonic() - started
        for worker in self.workers:
            worker.join(10)

        # The load has stopped: descriptors must come back, memory must not have run away.
        fds_end = server.open_fds()
        waited_until = time.monotonic() + FD_WAIT
        while server.alive() and (fds_end is None or fds_end > fds_base) and time.monotonic() < waited_until:
            time.sleep(0.1)
            fds_end = server.open_fds()
        rss_end = rss_mib(server)
        cpu_end = server.cpu_seconds()
        exit_code: int | None = server.proc.returncode
        if server.alive():
            server.signal(signal.SIGTERM)
            try:
                exit_code = server.wait(EXIT_WAIT)
            except subprocess.TimeoutExpired:
                self.failures.append(f"the server did not exit within {EXIT_WAIT:g} s of SIGTERM")
        server.stop(0)
        return self.report(stats, load_seconds, rss_base, rss_end, rss_peak, fds_base, fds_end,
                           fds_peak, timeline, exit_code,
                           None if cpu_end is None or cpu_base is None else cpu_end - cpu_base)

    def report(self, stats: Stats, load_seconds: float, rss_base: float, rss_end: float | None,
               rss_peak: float, fds_base: int, fds_end: int | None, fds_peak: int,
               timeline: list[tuple[float, float, int]], exit_code: int | None,
               cpu: float | None) -> dict[str, Any]:
        assert self.server is not None
        counts = stats.counts
        connections = {kind: counts.get("conn:" + kind, 0) for kind in KINDS}
        connections["total"] = sum(connections.values())
        sent, answered, verified = counts.get("sent", 0), counts.get("answered", 0), counts.get("verified", 0)
        mismatches = counts.get("mismatches", 0)
        unexpected = sum(stats.unexpected.values())
        accept, connect = sorted(stats.accept), sorted(stats.connect)
        lines = self.server.lines
        tracebacks = sum("Traceback" in line for line in lines)
        errors = [line for line in lines if re.search(r" (ERROR|CRITICAL) ", line)]
        warnings = [line for line in lines if " WARNING " in line]
        rss_delta = None if rss_end is None else rss_end - rss_base
        # Growth after warm-up: from the first sample past the warm-up to the end.
        warm_up = max(30.0, 0.2 * self.duration)
        warm = [rss for t, rss, _ in timeline if t >= warm_up]
        growth = None if not warm or rss_end is None else rss_end - warm[0]

        failures = self.failures
        if sent == 0 or connections["churn"] == 0:
            failures.append("no load was generated")
        if not sent == answered == verified:
            failures.append(f"requests sent {sent}, answered {answered}, verified {verified}: not all equal")
        if mismatches:
            failures.append(f"{mismatches} mismatched answers")
        if unexpected:
            failures.append(f"{unexpected} unexpected errors")
        if fds_end is None or fds_end > fds_base:
            failures.append(f"server descriptors {fds_end} did not come back to {fds_base} within {FD_WAIT:g} s")
        if rss_delta is None or rss_delta >= RSS_TOLERANCE_MIB:
            failures.append(f"server RSS grew by {mib(rss_delta)} MiB (tolerance {RSS_TOLERANCE_MIB:g})")
        if self.duration >= LEAK_CHECK_MIN and (growth is None or growth >= RSS_GROWTH_LIMIT_MIB):
            failures.append(f"server RSS grew by {mib(growth)} MiB after the {warm_up:g} s warm-up "
                            f"(limit {RSS_GROWTH_LIMIT_MIB:g}): a leak?")
        if exit_code != 0:
            failures.append(f"server exit status {exit_code} after SIGTERM, wanted 0")
        if tracebacks:
            failures.append(f"server stderr holds {tracebacks} Traceback(s)")
        if errors:
            failures.append(f"server stderr holds {len(errors)} ERROR/CRITICAL line(s)")

        return {
            "ok": not failures,
            "failures": failures,
            "duration_s": round(load_seconds, 2),
            "seed": self.seed,
            "server": {
                "command": " ".join(["python", *self.server.command[1:]]),
                "port": self.server.port, "exit_code": exit_code,
                "cpu_s": None if cpu is None else round(cpu, 2),
                "client_cpu_s": {role: counts.get("cpu_ms:" + role, 0) / 1000 for role in ROLES},
                "tracebacks": tracebacks, "error_lines": errors[:10], "warning_lines": warnings[:10],
            },
            "connections": connections,
            "requests": {"sent": sent, "answered": answered, "verified": verified,
                         "batches": counts.get("batches", 0), "abandoned_by_resets": counts.get("abandoned", 0)},
            "mismatches": mismatches,
            "unexpected_errors": unexpected,
            "unexpected_by_kind": dict(stats.unexpected),
            "examples": stats.examples[:20],
            "error_frames": dict(sorted(stats.error_frames.items())),
            "cases": dict(sorted(stats.cases.items())),
            "latency_ms": {
                "samples": len(accept),
                "accept_p50": ms(percentile(accept, 0.50)), "accept_p99": ms(percentile(accept, 0.99)),
                "accept_max": ms(accept[-1] if accept else None),
                "connect_p50": ms(percentile(connect, 0.50)), "connect_p99": ms(percentile(connect, 0.99)),
                "connect_max": ms(connect[-1] if connect else None),
            },
            "rss_mib": {"baseline": mib(rss_base), "end": mib(rss_end), "delta": mib(rss_delta),
                        "peak": mib(rss_peak), "tolerance": RSS_TOLERANCE_MIB,
                        "warmup_s": warm_up, "growth_after_warmup": mib(growth),
                        "growth_limit": RSS_GROWTH_LIMIT_MIB if self.duration >= LEAK_CHECK_MIN else None},
            "fds": {"baseline": fds_base, "end": fds_end, "peak": fds_peak},
            "timeline": timeline[:: max(1, len(timeline) // 60)],  # (s, RSS MiB, fds), ~60 samples
        }

    def close(self) -> None:
        """Stop everything that is still running; safe to call at any point."""
        self.stop.set()
        self.ready.abort()  # releases workers still waiting to start
        for reader in self.pipes.values():
            reader.close()  # a worker sending its results now gets EPIPE instead of blocking
        for worker in self.workers:
            worker.join(IO_TIMEOUT + 5)
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
            if worker.is_alive():
                worker.kill()
                worker.join(5)
        if self.server is not None:
            self.server.stop(0)


def format_summary(r: dict[str, Any]) -> str:
    c, q, lat, rss, fds, srv = r["connections"], r["requests"], r["latency_ms"], r["rss_mib"], r["fds"], r["server"]
    per_second = q["sent"] / r["duration_s"] if r["duration_s"] else 0
    lines = [
        f"soak: {r['duration_s']:.1f} s against `{srv['command']}` (port {srv['port']}, seed {r['seed']})",
        "connections: " + ", ".join(f"{kind} {c[kind]}" for kind in KINDS) + f" (total {c['total']})",
        f"requests: sent {q['sent']}, answered {q['answered']}, verified {q['verified']} "
        f"({per_second:.0f}/s; {q['batches']} pipelined batches; {q['abandoned_by_resets']} abandoned by resets)",
        f"mismatches: {r['mismatches']}, unexpected errors: {r['unexpected_errors']}"
        + (f" {r['unexpected_by_kind']}" if r["unexpected_by_kind"] else ""),
        "error frames by code: " + (", ".join(f"{k} {v}" for k, v in r["error_frames"].items()) or "none"),
        f"accept latency (connect + first answer, {lat['samples']} connections): p50 {lat['accept_p50']} ms, "
        f"p99 {lat['accept_p99']} ms, max {lat['accept_max']} ms; connect p50 {lat['connect_p50']} ms, "
        f"p99 {lat['connect_p99']} ms, max {lat['connect_max']} ms",
        f"server RSS: baseline {rss['baseline']} MiB, end {rss['end']} MiB, delta {rss['delta']} MiB "
        f"(tolerance {rss['tolerance']:g}; peak {rss['peak']}); growth after the {rss['warmup_s']:g} s warm-up "
        f"{rss['growth_after_warmup']} MiB (limit {rss['growth_limit'] or 'n/a: run < %g s' % LEAK_CHECK_MIN})",
        f"server fds: baseline {fds['baseline']}, end {fds['end']} (peak {fds['peak']})",
        f"server: exit {srv['exit_code']}, cpu {srv['cpu_s']} s (clients: "
        + ", ".join(f"{role} {cpu:.1f} s" for role, cpu in srv["client_cpu_s"].items())
        + f"), {srv['tracebacks']} tracebacks, "
        f"{len(srv['error_lines'])} ERROR lines, {len(srv['warning_lines'])} WARNING lines",
    ]
    lines += [f"  server: {line}" for line in srv["error_lines"] + srv["warning_lines"]]
    lines += [f"  example: {line}" for line in r["examples"]]
    lines.append("result: PASS" if r["ok"] else "result: FAIL: " + "; ".join(r["failures"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, metavar="SECONDS",
                        help="how long to run the load (default 60)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout (the summary goes to stderr)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, reported)")
    args = parser.parse_args(argv)
    if not args.duration > 0:
        parser.error("--duration must be > 0")
    if not sys.platform.startswith("linux"):
        parser.error("needs Linux (/proc)")
    seed = args.seed if args.seed is not None else random.randrange(2**32)

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C

    signal.signal(signal.SIGTERM, terminated)
    soak = Soak(args.duration, seed)
    try:
        result = soak.run()
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, ServerStartError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    finally:
        try:
            soak.close()
        except KeyboardInterrupt:  # a second Ctrl-C during cleanup: finish it anyway
            soak.close()
    summary = format_summary(result)
    if args.json:
        print(summary, file=sys.stderr)
        print(json.dumps(result), flush=True)
    else:
        print(summary, flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

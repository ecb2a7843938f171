#!/usr/bin/env python3
"""TLS: multiconn's TLS server against asyncio and uvloop servers with ssl=, side by side.

    pip install -e '.[test,bench]'                        # trustme (the certificate), uvloop
    python benchmarks/tls.py --rounds 3 --out benchmarks/results/tls.md   # about 6 minutes on a quiet machine
    python benchmarks/tls.py --quick --rounds 1           # smoke test: about a minute
    python benchmarks/tls.py --scenarios handshake --servers multiconn,uvloop_protocol --profile none

Every server answers the framed echo (each frame with a frame of the same
content and id) over TLS 1.3, with the same ECDSA P-256 certificate, issued
for this run by a trustme CA (itself ECDSA P-256), and a server context made
the same way (`ssl.create_default_context(Purpose.CLIENT_AUTH)` +
`load_cert_chain`, as `multiconn serve --tls-cert` does):

- multiconn:        `multiconn serve --app echo --tls-cert C --tls-key K`
- asyncio_protocol: benchmarks/peers/asyncio_protocol.py --tls-cert C --tls-key K
                    (asyncio.Protocol, `loop.create_server(ssl=context)`)
- uvloop_protocol:  the same file with --loop uvloop

Three scenarios:

1. pingpong: 100 TLS connections, each with one 1 KiB framed echo request in
   flight (the next sent when its answer is in). Requests/s and the server's
   CPU microseconds per request.
2. handshake: 8 connectors, each in a loop: TCP connect, a full TLS 1.3
   handshake (no resumption), one 64-byte framed echo, close_notify, close.
   Handshakes (whole connection cycles) per second and the server's CPU
   microseconds per handshake.
3. pingpong-ids: pingpong with an integer id in every request (as a client
   that matches answers by id sends), because the server's cost of a header
   depends on it.

The load generator is this script: one epoll loop over non-blocking
`ssl.SSLSocket`s per load process (`--processes`, default 1), every answer
checked (its content and id; the first answer of each connection decoded with
multiconn's codec, later ones compared byte for byte with it). Requests are
the frames `multiconn bench` sends (binary content, no id: one request is in
flight per connection, so answers come in order), except in pingpong-ids. The
load generator requires TLS 1.3 (it fails the run otherwise) and does not
verify the certificate during the load (the server's work is the same either
way); a verifying handshake (the CA, the host name, TLS 1.3, an ECDSA P-256
key) checks every server before its load starts.

Every run starts a fresh server, pinned to the first allowed CPU; the load
processes (and this script) run on the second. A run first waits (up to 60 s)
for both CPUs to be nearly idle, and a run during which other processes used
more than --max-other % of a CPU is repeated (twice at most; the quietest
attempt is kept). Server CPU is utime + stime of the server process from
/proc/PID/stat, read at the start and the end of the measured window; the
load processes' CPU likewise, so the report says which side was the
bottleneck. Rounds are interleaved (each round runs every scenario on every
server, the server order rotated); tables hold medians over rounds, ratios are
medians of per-round ratios.

After the rounds (unless --profile none) the handshake load runs once more on
each server under `perf record -g` (cpu-clock sampling of the server process
only) and the report splits the server's samples between OpenSSL (libssl,
libcrypto), the kernel, the Python interpreter and the rest; `--profile
cprofile` (the default when perf is missing) also runs multiconn under
`python -m cProfile` for its Python-level functions.

Linux only (/proc, epoll, sched_setaffinity). Exit status 1 if a run failed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import math
import multiprocessing
import os
import platform
import pstats
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass

from multiconn.procstats import process_cpu_seconds as cpu_seconds

from benchutil import QUIET_BUSY_PCT, cpu_model, fmt, free_port, git_revision, median, per_cpu_busy, publish, wait_for_quiet

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = os.path.join(HERE, "peers", "asyncio_protocol.py")
HOST = "127.0.0.1"
SERVER_NAME = "localhost"      # the certificate's name (and 127.0.0.1)
TICK = os.sysconf("SC_CLK_TCK")

START_TIMEOUT = 20.0     # a server must complete a TLS handshake within this
STOP_GRACE = 5.0         # SIGTERM, then SIGKILL of the server's session after this
SETUP_TIMEOUT = 30.0     # the load processes must have connected (ping-pong) within this
DRAIN_TIMEOUT = 3.0      # after the window, answers still awaited for this long
STALL_TIMEOUT = 10.0     # a handshake cycle (or an answer) that takes longer is an error
QUIET_MAX_WAIT = 60.0    # ...for at most this many seconds
SATURATED_PCT = 90.0     # a server this busy limited the rate...
LOAD_BOUND_PCT = 85.0    # ...and a load generator this busy (with the server less so) did
RECV_SIZE = 65536

PINGPONG_CONNS, PINGPONG_SIZE = 100, 1024
HANDSHAKE_CONNECTORS, HANDSHAKE_SIZE = 8, 64


# --- what is measured -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple        # after the Python executable; {port}, {cert} and {key} are replaced
    what: str
    requires: str = ""  # a module that must import, or the server is skipped

    def command(self, port, certs):
        return [sys.executable] + [a.format(port=port, cert=certs.cert, key=certs.key) for a in self.argv]


SERVERS = (
    Server("multiconn", ("-m", "multiconn", "serve", "--port", "{port}", "--app", "echo", "--log-level", "warning",
                         "--tls-cert", "{cert}", "--tls-key", "{key}"),
           "`multiconn serve --app echo --tls-cert C --tls-key K`: `ssl.SSLSocket`s on multiconn's epoll loop, "
           "the handshake driven by `do_handshake()` on readiness (src/multiconn/tls.py)"),
    Server("asyncio_protocol", (PEER, "--port", "{port}", "--mode", "framed", "--tls-cert", "{cert}",
                                "--tls-key", "{key}"),
           "`peers/asyncio_protocol.py --tls-cert C --tls-key K`: `asyncio.Protocol` + incremental decoder, "
           "`loop.create_server(ssl=context)` (asyncio's SSL protocol over `ssl.MemoryBIO`)"),
    Server("uvloop_protocol", (PEER, "--port", "{port}", "--mode", "framed", "--tls-cert", "{cert}",
                               "--tls-key", "{key}", "--loop", "uvloop"),
           "the same file on uvloop's loop (`--loop uvloop`: uvloop's own SSL protocol over `ssl.MemoryBIO`)",
           requires="uvloop"),
)
TARGET_SERVER, TARGET_BASE, TARGET_RATIO = "multiconn", "uvloop_protocol", 1.2


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    unit: str        # what one operation is: "request" or "handshake"
    rate_label: str
    kind: str        # the load: "pingpong" or "handshake"
    ids: bool        # whether every request carries an integer id


SCENARIOS = (
    Scenario("pingpong", f"TLS framed ping-pong, {PINGPONG_CONNS} connections × {PINGPONG_SIZE // 1024} KiB",
             "request", "req/s", "pingpong", False),
    Scenario("handshake", f"New-connection TLS handshakes, {HANDSHAKE_CONNECTORS} connectors "
             f"(connect, handshake, one {HANDSHAKE_SIZE}-byte echo, close)", "handshake", "handshakes/s",
             "handshake", False),
    Scenario("pingpong-ids", f"TLS framed ping-pong with request ids, {PINGPONG_CONNS} connections × "
             f"{PINGPONG_SIZE // 1024} KiB", "request", "req/s", "pingpong", True),
)


# --- the machine and /proc ----------------------------------------------------------------------------

def log(message):
    print(message, file=sys.stderr, flush=True)


def self_cpu():
    t = os.times()
    return t.user + t.system



# --- the certificate ------------------------------------------------------------------------------------

class Certs:
    """A trustme CA and an ECDSA P-256 server certificate for localhost and 127.0.0.1, in a temporary folder."""

    def __init__(self):
        import trustme
        self.dir = tempfile.mkdtemp(prefix="multiconn-tls-bench-")
        self.ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
        issued = self.ca.issue_cert(SERVER_NAME, HOST, key_type=trustme.KeyType.ECDSA)
        self.cert = os.path.join(self.dir, "server.pem")  # the leaf, then the chain (the CA)
        self.key = os.path.join(self.dir, "server.key")
        for i, blob in enumerate(issued.cert_chain_pems):
            blob.write_to_path(self.cert, append=i > 0)
        issued.private_key_pem.write_to_path(self.key)
        self.describe = self._describe(issued)

    @staticmethod
    def _describe(issued):
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        leaf = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
        key = leaf.public_key()
        kind = f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        chain = len(issued.cert_chain_pems)
        return (f"{kind} key, signed with ECDSA-{leaf.signature_hash_algorithm.name.upper()} by a trustme CA "
                f"(ECDSA P-256) issued for this run; the server sends "
                + ("the leaf only (the CA is the client's trust anchor)" if chain == 1 else f"a chain of {chain}"))

    def verifying_context(self):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(context)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        return context

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def load_context():
    """The load generator's client context: TLS 1.3 only, no certificate verification (see the docstring)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_server(port, certs):
    """One verifying TLS handshake and echo; a description of what was negotiated.  Raises on any failure."""
    from multiconn import Frame, FrameDecoder, encode_frame
    context = certs.verifying_context()
    with socket.create_connection((HOST, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=SERVER_NAME) as sock:
            version, cipher = sock.version(), sock.cipher()
            der = sock.getpeercert(binary_form=True)
            sock.sendall(encode_frame(Frame.binary(b"probe", id=7)))
            decoder = FrameDecoder()
            frames = []
            while not frames:
                data = sock.recv(RECV_SIZE)
                if not data:
                    raise RuntimeError("the server closed the probe connection without answering")
                frames = decoder.feed(data)
    if version != "TLSv1.3":
        raise RuntimeError(f"negotiated {version}, not TLSv1.3")
    if frames[0].content != b"probe" or frames[0].header.get("id") != 7:
        raise RuntimeError(f"wrong answer to the probe: {frames[0].header!r}")
    from cryptography import x509
    key = x509.load_der_x509_certificate(der).public_key()
    curve = getattr(getattr(key, "curve", None), "name", None)
    if curve != "secp256r1":
        raise RuntimeError(f"the server's key is not ECDSA P-256: {type(key).__name__} {curve}")
    return f"{version} {cipher[0]}"


# --- servers ---------------------------------------------------------------------------------------------

def session_pids(sid):
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(b")") + 2:].split()[3]) == sid:
                pids.append(int(name))
    return pids


class ServerRun:
    """One server process in its own session, pinned to `cpu`: started, checked, stopped with all it started."""

    def __init__(self, server, certs, cpu, prefix=()):
        self.server = server
        self.port = free_port()
        self.stderr = tempfile.TemporaryFile()
        argv = server.command(self.port, certs)
        argv[1:1] = prefix  # e.g. python -m cProfile -o FILE -m multiconn serve ...
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, start_new_session=True, preexec_fn=preexec)
        self.log = ""

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, certs):
        """Wait until the server completes a verifying TLS handshake and an echo; what was negotiated."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with status {self.proc.returncode} before serving: "
                                   f"{self.read_log()[-300:] or 'no output'}")
            try:
                negotiated = check_server(self.port, certs)
                break
            except (ConnectionRefusedError, socket.timeout):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no TLS service on port {self.port} after {START_TIMEOUT:g} s") from None
                time.sleep(0.05)
            except (OSError, ssl.SSLError) as exc:
                raise RuntimeError(f"the verifying probe failed: {exc}") from None
        time.sleep(0.1)  # let it see the probe connection close
        return negotiated

    def read_log(self):
        try:
            self.stderr.flush()
            self.stderr.seek(0)
            return self.stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return self.log

    def stop(self):
        """SIGTERM, then SIGKILL of the session if it lingers."""
        if self.stderr.closed:
            return
        sid = self.proc.pid
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
        for _ in range(2):
            left = session_pids(sid)
            if not left and self.proc.poll() is not None:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.log = self.read_log()
        self.stderr.close()


# --- the load generator ------------------------------------------------------------------------------------

class LoadError(Exception):
    pass


class Errors:
    def __init__(self):
        self.counts = {}
        self.first = {}

    def add(self, kind, text):
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, text[:300])

    def total(self):
        return sum(self.counts.values())


class PingPongConn:
    __slots__ = ("sock", "fd", "ident", "request", "content", "raw_answer", "decoder", "sent_at", "waiting", "out",
                 "read", "write", "pending")

    def __init__(self, sock, ident, request, content, decoder):
        self.sock = sock
        self.fd = sock.fileno()
        # The SSL object's own methods, where there is one: SSLSocket.recv, send and pending are
        # Python wrappers around them (two or three calls each), a tenth of this loop's time per request.
        ssl_object = getattr(sock, "_sslobj", None)
        self.read = getattr(ssl_object, "read", sock.recv)
        self.write = getattr(ssl_object, "write", sock.send)
        self.pending = getattr(ssl_object, "pending", sock.pending)
        self.ident = ident
        self.request = request
        self.content = content
        self.raw_answer = None   # a verified answer's bytes: later answers are compared with them
        self.decoder = decoder
        self.sent_at = 0.0
        self.waiting = False
        self.out = None          # a request that SSL_write could not take yet


def check_answer(decoder, data, ident, content, errors):
    """Decode `data`; the number of right answers in it (None after counting an error)."""
    import multiconn
    try:
        frames = decoder.feed(data)
    except multiconn.ProtocolError as exc:
        errors.add("malformed answer", str(exc))
        return None
    for frame in frames:
        if frame.header.get("id") != ident:
            errors.add("wrong id", f"answer id {frame.header.get('id')!r} to request id {ident}")
            return None
        if frame.content != content:
            info = frame.error_info
            errors.add(f"error frame {info[0]}" if info else "wrong content",
                       info[1] if info else f"{bytes(frame.content[:40])!r}...")
            return None
    return len(frames)


class PingPong:
    """`count` TLS connections, one request in flight on each."""

    def __init__(self, port, count, first_id, ids):
        self.port, self.count, self.first_id, self.ids = port, count, first_id, ids
        self.errors = Errors()

    def setup(self):
        from multiconn import Frame, FrameDecoder, encode_frame
        context = load_context()
        self.poller = select.epoll()
        self.conns = {}
        deadline = time.monotonic() + SETUP_TIMEOUT
        for i in range(self.count):
            ident = self.first_id + i if self.ids else None
            raw = socket.create_connection((HOST, self.port), timeout=max(0.1, deadline - time.monotonic()))
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = context.wrap_socket(raw, server_hostname=SERVER_NAME)  # the handshake, blocking
            if sock.version() != "TLSv1.3":
                raise LoadError(f"negotiated {sock.version()}, not TLSv1.3")
            sock.setblocking(False)
            content = os.urandom(PINGPONG_SIZE)
            conn = PingPongConn(sock, ident, encode_frame(Frame.binary(content, id=ident)), content, FrameDecoder())
            self.conns[conn.fd] = conn
            self.poller.register(conn.fd, select.EPOLLIN)

    def close(self, conn):
        if self.conns.pop(conn.fd, None) is not None:
            try:
                self.poller.unregister(conn.fd)
            except OSError:
                pass
        conn.waiting = False
        try:
            conn.sock.close()
        except OSError:
            pass

    def fail(self, conn, kind, text):
        self.errors.add(kind, text)
        self.close(conn)

    def run(self, start, window_start, window_end):
        now = time.monotonic
        EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
        WantRead, WantWrite = ssl.SSLWantReadError, ssl.SSLWantWriteError
        conns, poller, errors = self.conns, self.poller, self.errors
        latencies = array("d")
        completed = total = 0

        def send(conn):
            conn.waiting = True
            conn.sent_at = now()
            try:
                conn.write(conn.request)  # SSL_write: all of it, or SSLWantWriteError
            except WantWrite:
                conn.out = conn.request
                poller.modify(conn.fd, EPOLLIN | EPOLLOUT)
            except OSError as exc:
                self.fail(conn, "send failed", str(exc))

        while now() < start:
            time.sleep(min(0.01, max(0.0, start - now())))
        gc.collect()
        gc.disable()
        drain_deadline = window_end + DRAIN_TIMEOUT
        try:
            for conn in list(conns.values()):
                send(conn)
            while True:
                t = now()
                if t >= window_end:
                    if not any(c.waiting for c in conns.values()):
                        break
                    if t >= drain_deadline:
                        for conn in list(conns.values()):
                            if conn.waiting:
                                self.fail(conn, "unanswered", f"no answer {DRAIN_TIMEOUT:g} s after the window")
                        break
                if not conns:
                    if t < window_end:
                        raise LoadError("every connection failed: " + "; ".join(
                            f"{k}: {v}" for k, v in errors.first.items()))
                    break
                for fd, event in poller.poll(0.05):
                    conn = conns.get(fd)
                    if conn is None:
                        continue
                    if event & EPOLLOUT and conn.out is not None:
                        try:
                            conn.write(conn.out)
                        except WantWrite:
                            continue
                        except OSError as exc:
                            self.fail(conn, "send failed", str(exc))
                            continue
                        conn.out = None
                        poller.modify(fd, EPOLLIN)
                    if not event & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        continue
                    read = conn.read
                    while True:  # one read returns at most one TLS record; more may be pending inside SSL
                        try:
                            data = read(RECV_SIZE)
                        except (WantRead, WantWrite):
                            break
                        except OSError as exc:
                            self.fail(conn, "connection reset", str(exc))
                            break
                        done = now()
                        if not data:
                            self.fail(conn, "closed by the server", "the server closed the connection")
                            break
                        if data == conn.raw_answer and not conn.decoder.has_partial:
                            answers = 1
                        else:
                            fresh = not conn.decoder.has_partial
                            answers = check_answer(conn.decoder, data, conn.ident, conn.content, errors)
                            if answers is None:
                                self.close(conn)
                                break
                            if answers == 1 and fresh and not conn.decoder.has_partial and conn.raw_answer is None:
                                conn.raw_answer = data
                        if answers:
                            if answers > 1 or not conn.waiting:
                                self.fail(conn, "answer to nothing", "more answers than requests")
                                break
                            conn.waiting = False
                            total += 1
                            if window_start <= conn.sent_at < window_end:
                                latencies.append(done - conn.sent_at)
                            if window_start <= done < window_end:
                                completed += 1
                            if done < window_end:
                                send(conn)
                                if fd not in conns:
                                    break
                        if not conn.pending():
                            break
        finally:
            gc.enable()
            for conn in list(conns.values()):
                self.close(conn)
            self.poller.close()
        return {"completed": completed, "total": total, "latencies": latencies.tobytes(), "errors": errors.counts,
                "first_error": errors.first}


class Connector:
    __slots__ = ("slot", "ident", "sock", "fd", "state", "begun", "request", "content", "decoder", "interest")

    def __init__(self, slot, ident, request, content):
        self.slot = slot
        self.ident = ident
        self.request = request
        self.content = content
        self.sock = None
        self.fd = -1
        self.state = 0
        self.begun = 0.0
        self.decoder = None
        self.interest = 0


CONNECTING, HANDSHAKING, ANSWERING = 1, 2, 3


class Handshakes:
    """`count` connectors, each in a loop: connect, TLS 1.3 handshake, one echo, close_notify, close."""

    def __init__(self, port, count, first_id, ids):
        self.port, self.count, self.first_id, self.ids = port, count, first_id, ids
        self.errors = Errors()

    def setup(self):
        from multiconn import Frame, encode_frame
        self.context = load_context()
        self.poller = select.epoll()
        self.by_fd = {}
        self.connectors = []
        for i in range(self.count):
            ident = self.first_id + i if self.ids else None
            content = os.urandom(HANDSHAKE_SIZE)
            self.connectors.append(Connector(i, ident, encode_frame(Frame.binary(content, id=ident)), content))
        self.raw_answers = {}

    def run(self, start, window_start, window_end):
        from multiconn import FrameDecoder
        now = time.monotonic
        EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
        WantRead, WantWrite = ssl.SSLWantReadError, ssl.SSLWantWriteError
        poller, by_fd, errors, context = self.poller, self.by_fd, self.errors, self.context
        raw_answers = self.raw_answers
        address = (HOST, self.port)
        latencies = array("d")
        completed = total = 0

        def watch(c, interest):
            if c.interest != interest:
                poller.modify(c.fd, interest)
                c.interest = interest

        def begin(c):
            c.begun = now()
            c.decoder = None
            try:
                sock = context.wrap_socket(socket.socket(socket.AF_INET, socket.SOCK_STREAM),
                                           server_hostname=SERVER_NAME, do_handshake_on_connect=False)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rc = sock.connect_ex(address)
            except OSError as exc:
                errors.add("connect failed", str(exc))
                c.sock = None
                return False
            if rc not in (0, 115):  # EINPROGRESS
                errors.add("connect failed", os.strerror(rc))
                sock.close()
                c.sock = None
                return False
            c.sock, c.fd, c.state = sock, sock.fileno(), CONNECTING
            by_fd[c.fd] = c
            c.interest = EPOLLOUT
            poller.register(c.fd, EPOLLOUT)
            return True

        def end(c, polite):
            sock = c.sock
            by_fd.pop(c.fd, None)
            c.sock, c.state = None, 0
            if polite:
                try:
                    sock.unwrap()  # sends close_notify; then wants the server's, which we do not wait for
                except (WantRead, WantWrite):
                    pass
                except (OSError, ValueError):
                    pass
            try:
                sock.close()  # also leaves the epoll set (the only reference to the file)
            except OSError:
                pass

        def fail(c, kind, text):
            errors.add(kind, text)
            end(c, False)

        def handshake(c):
            sock = c.sock
            try:
                sock.do_handshake()
            except WantRead:
                watch(c, EPOLLIN)
                return
            except WantWrite:
                watch(c, EPOLLOUT)
                return
            except (OSError, ValueError) as exc:
                fail(c, "handshake failed", f"{type(exc).__name__}: {exc}")
                return
            if sock.version() != "TLSv1.3":
                fail(c, "not TLS 1.3", f"negotiated {sock.version()}")
                return
            c.state = ANSWERING
            try:
                sock.send(c.request)
            except (WantRead, WantWrite):
                fail(c, "send failed", "SSL_write could not take 100 bytes on a fresh connection")
                return
            except OSError as exc:
                fail(c, "send failed", str(exc))
                return
            watch(c, EPOLLIN)

        def answer(c):
            """Read what came; True when the echo is in (and right)."""
            sock = c.sock
            while True:
                try:
                    data = sock.recv(RECV_SIZE)
                except (WantRead, WantWrite):
                    return False
                except OSError as exc:
                    fail(c, "connection reset", str(exc))
                    return False
                if not data:
                    fail(c, "closed by the server", "the server closed the connection before answering")
                    return False
                if c.decoder is None and data == raw_answers.get(c.slot):
                    return True
                fresh = c.decoder is None
                if fresh:
                    c.decoder = FrameDecoder()
                answers = check_answer(c.decoder, data, c.ident, c.content, errors)
                if answers is None:
                    end(c, False)
                    return False
                if answers:
                    if answers > 1 or c.decoder.has_partial:
                        fail(c, "answer to nothing", "more answers than requests")
                        return False
                    if fresh:
                        raw_answers[c.slot] = data
                    return True
                if not sock.pending():
                    return False

        while now() < start:
            time.sleep(min(0.01, max(0.0, start - now())))
        gc.collect()
        gc.disable()
        next_check = now() + 0.5
        drain_deadline = window_end + DRAIN_TIMEOUT
        try:
            for c in self.connectors:
                begin(c)
            while True:
                t = now()
                if t >= window_end:
                    if not by_fd:
                        break
                    if t >= drain_deadline:
                        for c in list(by_fd.values()):
                            fail(c, "unfinished", f"cycle not done {DRAIN_TIMEOUT:g} s after the window")
                        break
                elif t >= next_check:
                    next_check = t + 0.5
                    for c in self.connectors:
                        if c.sock is not None and t - c.begun > STALL_TIMEOUT:
                            fail(c, "stalled", f"a cycle took more than {STALL_TIMEOUT:g} s")
                        if c.sock is None and not begin(c):
                            if errors.total() > 1000:
                                raise LoadError("more than 1000 errors: " + "; ".join(
                                    f"{k}: {v}" for k, v in errors.first.items()))
                for fd, event in poller.poll(0.05):
                    c = by_fd.get(fd)
                    if c is None:
                        continue
                    state = c.state
                    if state == CONNECTING:
                        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            fail(c, "connect failed", os.strerror(err))
                            continue
                        c.state = HANDSHAKING
                        handshake(c)
                    elif state == HANDSHAKING:
                        handshake(c)
                    elif state == ANSWERING and answer(c):
                        done = now()
                        end(c, True)
                        total += 1
                        if window_start <= c.begun and done < window_end:
                            latencies.append(done - c.begun)
                        if window_start <= done < window_end:
                            completed += 1
                        if done < window_end:
                            begin(c)
                        continue
                    if c.sock is None and now() < window_end:  # failed: start again
                        begin(c)
        finally:
            gc.enable()
            for c in list(by_fd.values()):
                end(c, False)
            poller.close()
        return {"completed": completed, "total": total, "latencies": latencies.tobytes(), "errors": errors.counts,
                "first_error": errors.first}


def load_process(kind, port, count, first_id, ids, cpu, pipe):
    """The body of one load process (forked): set up, say ready, wait for the times, run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    try:
        load = (PingPong if kind == "pingpong" else Handshakes)(port, count, first_id, ids)
        load.setup()
        pipe.send(("ready", None))
        message = pipe.recv()
        if message[0] != "go":
            return
        pipe.send(("done", load.run(*message[1:])))
    except (LoadError, OSError, ssl.SSLError, RuntimeError) as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        pipe.close()


def split(total, parts):
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_load(scenario, server_pid, port, args, window_hook=None):
    """Run the load processes; sample the server's and their CPU at the window's edges; the merged figures.

    `window_hook(phase)` is called just after the window starts ("start") and
    just before it ends is measured ("end"): the profiler uses it.
    """
    kind = scenario.kind
    count = PINGPONG_CONNS if kind == "pingpong" else args.connectors
    processes = max(1, min(args.processes, count))
    mp = multiprocessing.get_context("fork")
    children = []
    try:
        first = 0
        for n in split(count, processes):
            ours, theirs = mp.Pipe()
            proc = mp.Process(target=load_process, args=(kind, port, n, first, scenario.ids, args.load_cpu, theirs),
                                  daemon=True)
            proc.start()
            theirs.close()
            children.append((proc, ours))
            first += n
        deadline = time.monotonic() + SETUP_TIMEOUT
        for proc, pipe in children:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise LoadError(f"a load process was not ready after {SETUP_TIMEOUT:g} s")
            status, detail = pipe.recv()
            if status != "ready":
                raise LoadError(f"load setup: {detail}")
        start = time.monotonic() + 0.05
        window_start = start + args.warmup
        window_end = window_start + args.duration
        for proc, pipe in children:
            pipe.send(("go", start, window_start, window_end))

        def sample():
            return (time.monotonic(), cpu_seconds(server_pid), [cpu_seconds(p.pid) for p, _ in children],
                    self_cpu(), per_cpu_busy())

        def sleep_until(t):
            while True:
                left = t - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(left, 0.2))

        sleep_until(window_start)
        first_mark = sample()
        if window_hook:
            window_hook("start")
        sleep_until(window_end)
        if window_hook:
            window_hook("end")
        last_mark = sample()
        results = []
        deadline = time.monotonic() + DRAIN_TIMEOUT + 15
        for proc, pipe in children:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise LoadError("a load process did not report after the window")
            status, detail = pipe.recv()
            if status != "done":
                raise LoadError(detail)
            results.append(detail)
    except EOFError:
        raise LoadError("a load process died") from None
    finally:
        for proc, pipe in children:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
            pipe.close()
    (t0, srv0, load0, me0, busy0), (t1, srv1, load1, me1, busy1) = first_mark, last_mark
    if srv0 is None or srv1 is None:
        raise RuntimeError("the server is gone (no /proc/PID/stat)")
    wall = t1 - t0
    errors, first_error = {}, {}
    latencies = array("d")
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r["first_error"].items():
            first_error.setdefault(k, v)
        part = array("d")
        part.frombytes(r["latencies"])
        latencies.extend(part)
    load_cpu = sum((b or 0) - (a or 0) for a, b in zip(load0, load1)) + (me1 - me0)
    server_cpu = srv1 - srv0
    cpus = [c for c in (args.server_cpu, args.load_cpu) if c is not None] or sorted(busy0)
    machine = sum(busy1[c] - busy0[c] for c in cpus)
    return {"wall": wall, "completed": sum(r["completed"] for r in results), "total": sum(r["total"] for r in results),
            "server_cpu": server_cpu,
            "load_cpu": load_cpu, "other_cpu": max(0.0, machine - server_cpu - load_cpu),
            "errors": errors, "first_error": first_error, "latencies": sorted(latencies)}


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    rank = math.ceil(q / 100 * len(sorted_values))  # nearest rank
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def run_one(scenario, server, args, certs):
    """A fresh server, one load; a record of the figures or of the error.  Never leaves the server running."""
    record = {"scenario": scenario.name, "server": server.name,
              "busy_before_pct": round(wait_for_quiet(args.all_cpus, args.quiet_wait), 1)}
    run = None
    try:
        run = ServerRun(server, certs, args.server_cpu)
        record["negotiated"] = run.wait_ready(certs)
        result = run_load(scenario, run.pid, run.port, args)
        if run.proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {run.proc.returncode} during the run")
        wall, done = result["wall"], result["completed"]
        lat = result["latencies"]
        record.update({
            "wall": round(wall, 3), "completed": done, "rate": done / wall,
            "server_cpu_us": 1e6 * result["server_cpu"] / done if done else None,
            "load_cpu_us": 1e6 * result["load_cpu"] / done if done else None,
            "server_cpu_pct": 100 * result["server_cpu"] / wall, "load_cpu_pct": 100 * result["load_cpu"] / wall,
            "other_cpu_pct": 100 * result["other_cpu"] / wall, "errors": result["errors"],
            "first_error": result["first_error"],
            "p50_ms": 1e3 * percentile(lat, 50) if lat else None, "p99_ms": 1e3 * percentile(lat, 99) if lat else None,
        })
        if not done:
            raise RuntimeError("nothing completed in the window: " + "; ".join(
                f"{k}: {v}" for k, v in result["first_error"].items()))
    except (RuntimeError, LoadError, OSError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if run is not None:
            run.stop()
            lines = [line for line in run.log.splitlines() if line.strip()]
            if lines:
                record["server_log"] = lines[:5] + ([f"... {len(lines) - 5} more lines"] if len(lines) > 5 else [])
    return record


# --- profiles --------------------------------------------------------------------------------------------

# Self time: the shared object a sample was in. `kind` names what each object is.
KINDS = (  # (kind, test on the object's file name), first match wins
    ("openssl", lambda d: d.startswith(("libssl", "libcrypto"))),
    ("kernel", lambda d: d.startswith("[kernel") or d == "[vdso]"),
    ("python", lambda d: d.startswith(("libpython", "python"))),
    ("_ssl", lambda d: d.startswith("_ssl.")),
    ("uvloop", lambda d: d.startswith("loop.cpython")),
    ("ext", lambda d: ".cpython-" in d),
    ("libc", lambda d: d.startswith(("libc.", "libc-", "ld-linux", "libm.", "libpthread"))),
)
KIND_LABELS = {
    "openssl": "OpenSSL (libssl, libcrypto)", "kernel": "kernel", "python": "Python interpreter (libpython)",
    "_ssl": "CPython `_ssl` module (the C glue to OpenSSL)", "uvloop": "uvloop's extension (Cython + libuv)",
    "ext": "other Python extension modules (`_json`, `select`, `_socket`, ...)",
    "libc": "libc (malloc, memcpy, locks, syscall stubs)", "other": "other / unknown",
}
# By caller: every sample with an OpenSSL function anywhere on its stack is the cost of calling
# OpenSSL (its code, the malloc and locks it calls, and, with ssl.SSLSocket, the socket reads and
# writes its BIO makes); the rest splits into the kernel and the Python side (interpreter, the
# loop's extension, libc), which is the loop's and the application's own overhead.
CALLER_ROWS = (
    ("in_openssl", "**inside OpenSSL calls**, all of it"),
    ("in_openssl:openssl", "— OpenSSL's own code"),
    ("in_openssl:kernel", "— kernel under OpenSSL (socket reads and writes by its BIO)"),
    ("in_openssl:libc", "— libc under OpenSSL (malloc, free, locks)"),
    ("in_openssl:other", "— other under OpenSSL"),
    ("kernel", "**kernel, outside OpenSSL calls** (accept, epoll, socket I/O by the loop, close, scheduling)"),
    ("python", "**Python side, outside OpenSSL calls** (the loop's and the app's overhead)"),
    ("python:python", "— Python interpreter"),
    ("python:libc", "— libc (malloc, free, memcpy)"),
    ("python:_ssl", "— CPython `_ssl` glue (SSLSocket/SSLObject methods, their exceptions)"),
    ("python:uvloop", "— uvloop's extension (Cython + libuv)"),
    ("python:ext", "— other extension modules"),
    ("python:other", "— other"),
)
FRAME = re.compile(r"^\s*[0-9a-f]+\s+(.*?)\s+\(([^()]*)\)\s*$")
SYSCALL = re.compile(r"^(?:__x64_sys_|__ia32_sys_|__do_sys_|__se_sys_)(\w+)$")


def dso_kind(dso):
    for kind, test in KINDS:
        if test(dso):
            return kind
    return "other"


def perf_samples(path):
    """The samples of a `perf record --call-graph dwarf` file: lists of (symbol, object), leaf first."""
    out = subprocess.run(["perf", "script", "-i", path, "-F", "tid,ip,sym,dso", "--no-inline"],
                         capture_output=True, text=True, timeout=900).stdout
    samples, frames = [], None
    for line in out.splitlines():
        if not line.strip():
            continue
        if line.startswith("\t"):
            m = FRAME.match(line)
            if m and frames is not None:
                frames.append((m.group(1), os.path.basename(m.group(2))))
        else:  # the tid line that starts a sample
            if frames:
                samples.append(frames)
            frames = []
    if frames:
        samples.append(frames)
    return samples


def attribute(samples, top):
    """Shares (%) of the samples: self time by kind, by caller (CALLER_ROWS), OpenSSL entry points,
    syscalls outside OpenSSL, and the top leaf symbols."""
    n = len(samples) or 1
    self_kind, caller, entries, syscalls, symbols = {}, {}, {}, {}, {}

    def add(table, key):
        table[key] = table.get(key, 0) + 1

    for frames in samples:
        kinds = [dso_kind(d) for _, d in frames]
        leaf_sym, leaf_dso = frames[0]
        add(self_kind, kinds[0])
        add(symbols, (leaf_dso, leaf_sym))
        ossl = [i for i, k in enumerate(kinds) if k == "openssl"]
        if ossl:
            add(caller, "in_openssl")
            sub = kinds[0] if kinds[0] in ("openssl", "kernel", "libc") else "other"
            add(caller, "in_openssl:" + sub)
            # the entry point: the outermost _ssl function above OpenSSL (what Python called), else
            # the outermost named OpenSSL function
            outer = ossl[-1]
            name = next((s for s, d in frames[outer + 1:] if dso_kind(d) == "_ssl" and s != "[unknown]"), None)
            if name is None:
                name = next((frames[i][0] for i in reversed(ossl) if frames[i][0] != "[unknown]"),
                            "(not unwound past OpenSSL's assembly)")
            add(entries, re.sub(r"^_ssl__", "", name).replace("_impl", ""))
        elif kinds[0] == "kernel":
            add(caller, "kernel")
            call = next((m.group(1) for m in (SYSCALL.match(s) for s, _ in frames) if m), None)
            add(syscalls, call or "no syscall (interrupts, softirq, scheduling)")
        else:
            add(caller, "python")
            add(caller, "python:" + (kinds[0] if kinds[0] in ("python", "libc", "_ssl", "uvloop", "ext")
                                     else "other"))

    def pct(table):
        return {k: 100.0 * v / n for k, v in table.items()}

    def ranked(table, limit):
        return sorted(((100.0 * v / n, k) for k, v in table.items()), reverse=True)[:limit]

    return {"samples": len(samples), "self": pct(self_kind), "caller": pct(caller),
            "entries": ranked(entries, 8), "syscalls": ranked(syscalls, 8),
            "symbols": [(p, d, s) for p, (d, s) in ranked(symbols, top)]}


def profile_perf(server, args, certs, scenario):
    """The scenario's load on a fresh server under perf record; where its samples were."""
    wait_for_quiet(args.all_cpus, args.quiet_wait)
    folder = tempfile.mkdtemp(prefix="tls-perf-")
    data = os.path.join(folder, "perf.data")
    run = None
    recorder = {}
    try:
        run = ServerRun(server, certs, args.server_cpu)
        run.wait_ready(certs)

        def hook(phase):
            if phase == "start":
                preexec = (lambda: os.sched_setaffinity(0, {args.load_cpu})) if args.load_cpu is not None else None
                recorder["log"] = tempfile.TemporaryFile()
                recorder["proc"] = subprocess.Popen(
                    ["perf", "record", "-e", "cpu-clock", "-F", str(args.perf_freq), "--call-graph",
                     "dwarf,16384", "-p", str(run.pid), "-o", data], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=recorder["log"], preexec_fn=preexec)
            else:
                proc = recorder["proc"]
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        saved = args.duration
        args.duration = args.profile_seconds
        try:
            result = run_load(scenario, run.pid, run.port, args, window_hook=hook)
        finally:
            args.duration = saved
        run.stop()
        samples = perf_samples(data) if os.path.exists(data) else []
        if not samples:
            log_text = ""
            if recorder.get("log"):
                recorder["log"].seek(0)
                log_text = recorder["log"].read().decode("utf-8", "replace")[-300:]
            raise RuntimeError("perf recorded no samples: " + log_text)
        done = result["completed"]
        out = attribute(samples, args.perf_top)
        out.update({"server": server.name, "scenario": scenario.name, "rate": done / result["wall"],
                    "server_cpu_us": 1e6 * result["server_cpu"] / done if done else None,
                    "server_cpu_pct": 100 * result["server_cpu"] / result["wall"],
                    "load_cpu_pct": 100 * result["load_cpu"] / result["wall"]})
        return out
    except (RuntimeError, LoadError, OSError, subprocess.SubprocessError) as exc:
        return {"server": server.name, "scenario": scenario.name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        proc = recorder.get("proc")
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if recorder.get("log"):
            recorder["log"].close()
        if run is not None:
            run.stop()
        shutil.rmtree(folder, ignore_errors=True)


def profile_cprofile(server, args, certs, scenario):
    """multiconn under python -m cProfile with the scenario's load; its top functions."""
    wait_for_quiet(args.all_cpus, args.quiet_wait)
    folder = tempfile.mkdtemp(prefix="tls-cprofile-")
    out = os.path.join(folder, "server.prof")
    run = None
    try:
        run = ServerRun(server, certs, args.server_cpu, prefix=("-m", "cProfile", "-o", out))
        run.wait_ready(certs)
        saved = args.duration
        args.duration = args.profile_seconds
        try:
            result = run_load(scenario, run.pid, run.port, args)
        finally:
            args.duration = saved
        run.stop()  # SIGTERM: multiconn shuts down and cProfile writes its file
        run = None
        if not os.path.exists(out):
            raise RuntimeError("cProfile wrote nothing (did the server exit on SIGTERM?)")
        stats = pstats.Stats(out, stream=io.StringIO())
        total = stats.total_tt
        rows = []
        for (filename, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
            rows.append((tt, ct, nc, f"{os.path.basename(filename)}:{line}({name})" if line else name))
        rows.sort(reverse=True)
        return {"server": server.name, "scenario": scenario.name, "total_s": total,
                "rows": rows[:args.perf_top], "operations": result["total"]}
    except (RuntimeError, LoadError, OSError) as exc:
        return {"server": server.name, "scenario": scenario.name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        if run is not None:
            run.stop()
        shutil.rmtree(folder, ignore_errors=True)


# --- the report ------------------------------------------------------------------------------------------

def runs_of(records, scenario, server):
    return [r for r in records if r["scenario"] == scenario and r["server"] == server and "error" not in r]


def paired(records, scenario, a, b, key, invert=False):
    """Per round: a's key ÷ b's key (b ÷ a with invert), by round."""
    out = {}
    for ra in runs_of(records, scenario, a):
        for rb in runs_of(records, scenario, b):
            if ra["round"] == rb["round"] and ra.get(key) and rb.get(key):
                out[ra["round"]] = rb[key] / ra[key] if invert else ra[key] / rb[key]
    return [out[k] for k in sorted(out)]


def build_report(args, meta, records, profiles):
    names = [s.name for s in args.servers]
    L = ["# TLS benchmarks: multiconn against asyncio and uvloop with `ssl=`", ""]
    L += [f"- Date: {meta['date']} ({meta['elapsed_min']:.0f} min); git commit {meta['git']}",
          f"- Machine: {meta['cpus']} CPUs, {meta['cpu_model']} (lscpu), {meta['os']}; shared with other "
          "work, so figures compare only within this report.",
          f"- {meta['pinning']}",
          f"- Python {meta['python']}, {meta['openssl']}; " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
          f"- Certificate: {meta['certificate']}. Negotiated: {meta['negotiated']}. Server contexts: "
          "`ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)` + `load_cert_chain` in every server (the "
          "defaults: TLS 1.2 minimum, so TLS 1.3 with this client; two session tickets sent per connection).",
          f"- Load generator: this script, {args.processes} process{'es' if args.processes > 1 else ''} "
          "(epoll + non-blocking `ssl.SSLSocket`, every answer checked; TLS 1.3 required; no certificate "
          "verification during the load, a verifying probe before it); requests as `multiconn bench` and the "
          "shared harness's C load generator send them (binary content, no id), except in pingpong-ids; "
          "loopback 127.0.0.1 only.",
          f"- {args.rounds} interleaved round{'s' if args.rounds > 1 else ''}, server order rotated per round; each "
          f"run: fresh server, {args.warmup:g} s warmup, {args.duration:g} s measured. Runs during which other "
          f"processes used more than {args.max_other:g} % of a CPU were repeated (at most {args.retries} times, the "
          "quietest attempt kept).",
          f"- Command: `{meta['command']}`"]
    L += [f"- {note}" for note in meta["notes"]]
    L += ["", "Servers:", ""]
    L += [f"- **{s.name}**: {s.what}" for s in args.servers]
    L.append("")

    for sc in args.scenarios:
        L += [f"## {sc.title}", ""]
        if sc.kind == "pingpong":
            L += [f"{PINGPONG_CONNS} TLS connections opened (and handshaken) before the warmup; each has one "
                  f"{PINGPONG_SIZE}-byte framed echo request in flight. Throughput: answers received in the "
                  "measured window per second. Server CPU: the server process's utime + stime in the window "
                  "(/proc/PID/stat) ÷ answers."
                  + (" Every request carries an integer id (the connection's number), as a client that matches "
                     "answers by id sends: each connection's header bytes are still the same from request to "
                     "request, but no longer all strings." if sc.ids else
                     " Requests carry no id (content-type, content-encoding, content-length only), as "
                     "`multiconn bench` and the shared harness send them."), ""]
        else:
            L += [f"{args.connectors} connectors, each in a loop: non-blocking TCP connect, a full TLS 1.3 "
                  f"handshake (new session, no resumption), one {HANDSHAKE_SIZE}-byte framed echo, close_notify, "
                  "close. A handshake here is that whole connection cycle: accept, handshake, echo and close are "
                  "all in the server's CPU per handshake. Latency: connect to close.", ""]
        L += [f"| server | {sc.rate_label} | ratio to {TARGET_BASE} | server CPU µs / {sc.unit} | 10⁶ ÷ CPU µs "
              f"| load generator CPU µs / {sc.unit} | p50 ms | p99 ms | CPU % server / load | errors |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            runs = runs_of(records, sc.name, name)
            all_runs = [r for r in records if r["scenario"] == sc.name and r["server"] == name]
            if not all_runs:
                continue
            if not runs:
                L.append(f"| {name} | FAILED | | | | | | | | |")
                continue
            ratio = median(paired(records, sc.name, name, TARGET_BASE, "rate")) if TARGET_BASE in names else None
            errs = sum(sum(r["errors"].values()) for r in runs)
            failed = len(all_runs) - len(runs)
            cpu_us = median(r['server_cpu_us'] for r in runs)
            L.append(f"| {name} | {fmt(median(r['rate'] for r in runs))} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}'} | {fmt(cpu_us, 1)} | "
                     f"{fmt(1e6 / cpu_us if cpu_us else None)} | {fmt(median(r['load_cpu_us'] for r in runs), 1)} | "
                     f"{fmt(median(r['p50_ms'] for r in runs), 2)} | {fmt(median(r['p99_ms'] for r in runs), 2)} | "
                     f"{fmt(median(r['server_cpu_pct'] for r in runs))} / {fmt(median(r['load_cpu_pct'] for r in runs))} | "
                     f"{errs}{f' ({failed} failed runs)' if failed else ''} |")
        L += ["", f"10⁶ ÷ CPU µs: the {sc.unit}s per second one core would serve at that cost, whoever limited "
              "the rate in the run.", ""]
        L += ["Per round (rate, server CPU µs per operation, CPU % server / load / other tenants):", ""]
        L += ["| round | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for rnd in range(args.rounds):
            row = []
            for name in names:
                r = next((r for r in records if r["scenario"] == sc.name and r["server"] == name
                          and r["round"] == rnd), None)
                if r is None:
                    row.append("not run")
                elif "error" in r:
                    row.append("FAILED")
                else:
                    row.append(f"{fmt(r['rate'])} /s, {fmt(r['server_cpu_us'], 1)} µs, "
                               f"{fmt(r['server_cpu_pct'])} / {fmt(r['load_cpu_pct'])} / {fmt(r['other_cpu_pct'])} %"
                               + (f" ({r['attempts']} attempts)" if r.get("attempts", 1) > 1 else ""))
            L.append(f"| {rnd + 1} | " + " | ".join(row) + " |")
        L.append("")
        for other in [n for n in names if n != TARGET_SERVER]:
            if TARGET_SERVER not in names:
                break
            rates = paired(records, sc.name, TARGET_SERVER, other, "rate")
            cpus = paired(records, sc.name, TARGET_SERVER, other, "server_cpu_us", invert=True)
            if rates:
                L.append(f"- {TARGET_SERVER} ÷ {other}, {sc.rate_label}: median **{median(rates):.2f}** "
                         f"(rounds: {', '.join(f'{x:.2f}' for x in rates)}); server CPU per {sc.unit}, "
                         f"{other} ÷ {TARGET_SERVER}: median {median(cpus):.2f} "
                         f"(rounds: {', '.join(f'{x:.2f}' for x in cpus)}).")
        ok = [r for r in records if r["scenario"] == sc.name and "error" not in r]
        if ok:
            server_bound = [r for r in ok if r["server_cpu_pct"] >= SATURATED_PCT]
            load_bound = [r for r in ok if r["server_cpu_pct"] < SATURATED_PCT and r["load_cpu_pct"] >= LOAD_BOUND_PCT]
            L.append(f"- Bottleneck: the server (≥ {SATURATED_PCT:g} % of its CPU) in {len(server_bound)} of {len(ok)} "
                     f"runs, the load generator (≥ {LOAD_BOUND_PCT:g} % of its CPU, the server less busy) in "
                     f"{len(load_bound)}, neither (other processes took CPU) in "
                     f"{len(ok) - len(server_bound) - len(load_bound)}; the load generator used "
                     f"{min(r['load_cpu_pct'] for r in ok):.0f}–{max(r['load_cpu_pct'] for r in ok):.0f} % of its CPU.")
            load_us = median(r["load_cpu_us"] for r in ok)
            server_us = [median(r["server_cpu_us"] for r in runs_of(records, sc.name, n)) for n in names]
            server_us = [u for u in server_us if u]
            if load_us and server_us and load_us > max(server_us):
                L.append(f"  The load generator needs more CPU per {sc.unit} (median {load_us:,.0f} µs) than any "
                         f"server ({min(server_us):,.0f}–{max(server_us):,.0f} µs), and it has one CPU as the server "
                         f"does (more load processes would share that CPU): so on a quiet machine it limits the "
                         f"rate, which says little about the servers. Compare the server CPU per {sc.unit} (and "
                         "10⁶ ÷ CPU µs).")
            elif load_bound:
                L.append(f"  In the load-bound runs ({', '.join(sorted({r['server'] for r in load_bound}))}) the "
                         f"rate is the load generator's; compare the server CPU per {sc.unit}.")
        if sc.ids and any(s.name == "pingpong" for s in args.scenarios):
            changes = []
            for name in names:
                with_ids = median(r["server_cpu_us"] for r in runs_of(records, sc.name, name))
                without = median(r["server_cpu_us"] for r in runs_of(records, "pingpong", name))
                if with_ids and without:
                    changes.append(f"{name} {without:.1f} → {with_ids:.1f} µs ({with_ids / without:.2f}×)")
            if changes:
                L.append("- Server CPU per request without → with request ids (medians, pingpong → pingpong-ids): "
                         + ", ".join(changes) + ". multiconn caches a parsed request header, and an encoded "
                         "answer header, by its bytes; with an id, whose bytes are new every time, it caches "
                         "the rest: a request header that ends in its id is looked up by the bytes before the "
                         "id (a whole JSON parse for the first only), and an answer header is a cached "
                         "template of the other keys with the id spliced in (src/multiconn/protocol.py); the "
                         "peers parse and encode every header with `json`.")
        if sc.name == "pingpong" and TARGET_SERVER in names and TARGET_BASE in names:
            rates = paired(records, sc.name, TARGET_SERVER, TARGET_BASE, "rate")
            if rates:
                met = median(rates) >= TARGET_RATIO
                L.append(f"- Target: {TARGET_SERVER} ≥ {TARGET_RATIO:g}× {TARGET_BASE} on TLS ping-pong req/s: "
                         f"**{'met' if met else 'not met'}** ({median(rates):.2f}×, every round "
                         f"{'above' if min(rates) >= TARGET_RATIO else 'not above'} {TARGET_RATIO:g}: "
                         f"min {min(rates):.2f}).")
        L.append("")

    if profiles:
        scen = next(sc for sc in SCENARIOS if sc.name == args.profile_scenario)
        L += ["## Where the handshake time goes" if scen.name == "handshake"
              else f"## Where the time goes: {scen.name}", ""]
        perf_rows = [p for p in profiles if p.get("kind") == "perf"]
        ok = [p for p in perf_rows if "error" not in p]
        if ok:
            L += [f"After the rounds, the {scen.name} load once more on a fresh server each, {args.warmup:g} s warmup, "
                  f"then `perf record -e cpu-clock -F {args.perf_freq} --call-graph dwarf -p SERVER_PID` for "
                  f"{args.profile_seconds:g} s (the server process only; DWARF unwinding because libpython and "
                  "libcrypto have no frame pointers). µs per "
                  f"{scen.unit} = the share of the samples × the server's median CPU per {scen.unit} in the rounds "
                  f"above (the profiled run's own CPU per {scen.unit}, which perf's sampling and the run's noise "
                  "make dearer, is in the last row of the first table).", ""]
            head = "| | " + " | ".join(p["server"] for p in ok) + " |"
            rule = "|---|" + "---:|" * len(ok)

            def cell(p, share):
                share = share or 0.0
                base = median(r["server_cpu_us"] for r in runs_of(records, scen.name, p["server"])) \
                    or p["server_cpu_us"] or 0
                return f"{share:.1f} % ({fmt(base * share / 100, 1)} µs)"

            L += ["Self time: which code the samples were in.", "", head, rule]
            for kind, label in KIND_LABELS.items():
                if any(p["self"].get(kind) for p in ok):
                    L.append(f"| {label} | " + " | ".join(cell(p, p["self"].get(kind)) for p in ok) + " |")
            L.append(f"| **server CPU µs per {scen.unit}** (profiled run) | " + " | ".join(
                f"**{fmt(p['server_cpu_us'], 1)}** ({fmt(p['rate'])}/s; server {fmt(p['server_cpu_pct'])} %, load "
                f"{fmt(p['load_cpu_pct'])} % CPU; {p['samples']:,} samples)" for p in ok) + " |")
            L += ["", "By caller: a sample with an OpenSSL function anywhere on its stack is the cost of calling "
                  "OpenSSL (its code and the malloc, locks and, through `ssl.SSLSocket`'s socket BIO, the socket "
                  "I/O it does); the rest is the kernel work the server asks for itself and the Python side: the "
                  "loop's and the application's own overhead, which is what the server's design controls.", "",
                  head, rule]
            for key, label in CALLER_ROWS:
                if any(p["caller"].get(key) for p in ok):
                    L.append(f"| {label} | " + " | ".join(cell(p, p["caller"].get(key)) for p in ok) + " |")
            L.append("")
            L += ["OpenSSL calls by entry point (the `_ssl` method Python called, or the outermost OpenSSL "
                  "function), and the kernel outside OpenSSL calls by system call (% of all samples):", "",
                  "| server | OpenSSL entry points | syscalls outside OpenSSL |", "|---|---|---|"]
            for p in ok:
                L.append(f"| {p['server']} | " + ", ".join(f"`{e}` {v:.1f}" for v, e in p["entries"][:6])
                         + " | " + ", ".join(f"{e} {v:.1f}" for v, e in p["syscalls"][:6]) + " |")
            L.append("")
            for p in ok:
                L += [f"<details><summary>Top symbols (self time), {p['server']}</summary>", "",
                      "| % | object | symbol |", "|---:|---|---|"]
                L += [f"| {v:.2f} | {dso} | `{sym[:90]}` |" for v, dso, sym in p["symbols"]]
                L += ["", "</details>", ""]
        for p in perf_rows:
            if "error" in p:
                L += [f"- perf profile of {p['server']} failed: {p['error'][:300]}", ""]
        for p in profiles:
            if p.get("kind") != "cprofile":
                continue
            if "error" in p:
                L += [f"- cProfile of {p['server']} failed: {p['error'][:300]}", ""]
                continue
            L += [f"cProfile of {p['server']}: `python -m cProfile -o FILE -m multiconn serve ...` under the "
                  f"{args.profile_scenario} load ({args.warmup:g} s warmup + {args.profile_seconds:g} s, "
                  f"{p['operations']:,} {scen.unit}s in all), stopped with SIGTERM. cProfile times wall clock and "
                  "adds its own cost to every Python call: read the calls per "
                  f"{scen.unit} and the shares, not the seconds. Total {p['total_s']:.2f} s profiled "
                  "(`epoll.poll` includes the idle waits).", "",
                  f"| self % | self s | cumulative s | calls per {scen.unit} | function |",
                  "|---:|---:|---:|---:|---|"]
            L += [f"| {100 * tt / p['total_s']:.1f} | {tt:.3f} | {ct:.3f} | {nc / max(1, p['operations']):.2f} | "
                  f"`{name[:100]}` |" for tt, ct, nc, name in p["rows"]]
            L.append("")

    L += ["## Errors, noise and failed runs", ""]
    ok = [r for r in records if "error" not in r]
    errs = {}
    for r in ok:
        for kind, n in r["errors"].items():
            key = (r["scenario"], r["server"], kind)
            errs[key] = errs.get(key, 0) + n
    if errs:
        for (scn, srv, kind), n in sorted(errs.items()):
            first = next(r["first_error"][kind] for r in ok if r["scenario"] == scn and r["server"] == srv
                         and kind in r["first_error"])
            L.append(f"- {scn} / {srv}: {n} × {kind} (first: {first})")
    else:
        L.append("- No errors: every answer had its request's id and content; every handshake was TLS 1.3.")
    if ok:
        other = [r["other_cpu_pct"] for r in ok]
        L.append(f"- Other processes' CPU use on the two CPUs during the measured windows (their busy time minus "
                 f"the server's and the load generator's): median {median(other):.0f} %, max {max(other):.0f} % "
                 "of one CPU.")
        spreads = []
        for sc in args.scenarios:
            for name in names:
                rates = [r["rate"] for r in runs_of(records, sc.name, name)]
                if len(rates) > 1:
                    spreads.append((max(rates) - min(rates)) / median(rates))
        if spreads:
            L.append(f"- Spread of a server's rate across rounds ((max − min) ÷ median): median "
                     f"{100 * median(spreads):.0f} %, worst {100 * max(spreads):.0f} %.")
    repeated = [r for r in records if r.get("attempts", 1) > 1]
    if repeated:
        still = [r for r in ok if r["other_cpu_pct"] > args.max_other]
        L.append(f"- {len(repeated)} of {len(records)} runs were repeated because other processes used more than "
                 f"{args.max_other:g} % of a CPU during them; {len(still)} still had more in the attempt kept"
                 + (": " + ", ".join(f"{r['scenario']} / {r['server']} round {r['round'] + 1} "
                                     f"({r['other_cpu_pct']:.0f} %)" for r in still) if still else "") + ".")
    busy = [r for r in records if r.get("busy_before_pct", 0) >= QUIET_BUSY_PCT]
    if busy:
        L.append(f"- {len(busy)} of {len(records)} runs started on a busy machine (after waiting "
                 f"{args.quiet_wait:g} s for the CPUs to fall below {QUIET_BUSY_PCT:g} % busy).")
    logged = {}
    for r in records:
        if r.get("server_log"):
            logged.setdefault((r["scenario"], r["server"]), r["server_log"][0])
    for (scn, srv), first in sorted(logged.items()):
        L.append(f"- {scn} / {srv}: the server wrote on stderr; the first line: `{first[-300:]}`")
    for r in records:
        if "error" in r:
            L.append(f"- FAILED {r['scenario']} / {r['server']} / round {r['round'] + 1}: {r['error'][:400]}")
    if meta.get("skipped"):
        L.append(f"- Not run (the --max-minutes limit was reached): {meta['skipped']} runs.")
    L.append("")
    return "\n".join(L)


# --- main -------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 s measured after 0.5 s warmup, 2 s profiles, shorter waits")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup seconds per run (default 1)")
    parser.add_argument("--scenarios", help="comma list (default all): " + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--servers", help="comma list (default all): " + ", ".join(s.name for s in SERVERS))
    parser.add_argument("--connectors", type=int, default=HANDSHAKE_CONNECTORS,
                        help=f"concurrent connectors in the handshake scenario (default {HANDSHAKE_CONNECTORS})")
    parser.add_argument("--processes", type=int, default=1,
                        help="load generator processes, sharing the connections (default 1; all on the load CPU)")
    parser.add_argument("--profile", default="auto",
                        help="after the rounds: perf, cprofile, both (perf,cprofile), or none; default auto: "
                             "perf if `perf` runs here, cprofile otherwise")
    parser.add_argument("--profile-scenario", default="handshake", choices=[s.name for s in SCENARIOS],
                        help="the load run under the profilers (default handshake)")
    parser.add_argument("--profile-only", action="store_true",
                        help="skip the measured rounds: only the profiles (for looking into one server)")
    parser.add_argument("--profile-seconds", type=float, default=4.0, help="recorded seconds per profile (default 4)")
    parser.add_argument("--perf-freq", type=int, default=1999, help="perf sampling frequency, Hz (default 1999)")
    parser.add_argument("--perf-top", type=int, default=25, help="symbols / functions listed per profile (default 25)")
    parser.add_argument("--max-other", type=float, default=25.0, metavar="PCT",
                        help="repeat a run when other processes used more than this %% of a CPU during it (default 25)")
    parser.add_argument("--retries", type=int, default=2, help="repeats of such a run at most (default 2)")
    parser.add_argument("--quiet-wait", type=float, default=QUIET_MAX_WAIT,
                        help=f"seconds to wait for idle CPUs before each run, at most (default {QUIET_MAX_WAIT:g})")
    parser.add_argument("--max-minutes", type=float, default=60.0,
                        help="stop starting runs (and repeats) after this many minutes; the report says what was "
                             "not run (default 60)")
    parser.add_argument("--out", help="also write the report (markdown) to this file, e.g. benchmarks/results/tls.md")
    parser.add_argument("--save", metavar="FILE", help="also write every run and profile as JSON to this file")
    parser.add_argument("--render", metavar="FILE",
                        help="measure nothing: write the report of a run saved with --save (with --out, to a file)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.profile_seconds = 1.0, 0.5, 2.0
        args.quiet_wait = min(args.quiet_wait, 20.0)
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0 or args.connectors < 1 or args.processes < 1:
        parser.error("--rounds, --connectors and --processes must be >= 1, --duration > 0, --warmup >= 0")

    def pick(text, known, what):
        if not text:
            return list(known)
        wanted = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in {k.name for k in known}]
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}; known: {', '.join(k.name for k in known)}")
        return [k for k in known if k.name in wanted]

    args.scenarios = pick(args.scenarios, SCENARIOS, "scenario")
    args.servers = pick(args.servers, SERVERS, "server")
    profile = {p.strip() for p in args.profile.replace("both", "perf,cprofile").split(",") if p.strip()}
    if not profile <= {"auto", "perf", "cprofile", "none"}:
        parser.error("--profile: perf, cprofile, both, none or auto")
    args.profile = profile - {"none"}
    return args


def perf_works():
    if not shutil.which("perf"):
        return False
    try:
        with tempfile.TemporaryDirectory() as d:
            probe = subprocess.run(["perf", "record", "-e", "cpu-clock", "-g", "-o", os.path.join(d, "p"), "--",
                                    "true"], capture_output=True, timeout=30)
        return probe.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM, like Ctrl-C, runs the finally blocks that stop the servers


def render(args):
    with open(args.render) as f:
        saved = json.load(f)
    saved_args = parse_args(saved["argv"])
    saved_args.profile_scenario = saved["profile_scenario"]
    report = build_report(saved_args, saved["meta"], saved["records"], saved["profiles"])
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
        log(f"wrote {args.out}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        return render(args)
    shown = list(sys.argv[1:] if argv is None else argv)
    if "--save" in shown[:-1]:  # where the JSON went is no part of what was measured
        del shown[shown.index("--save"):shown.index("--save") + 2]
    command = "python benchmarks/tls.py" + "".join(" " + shlex.quote(a) for a in shown)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        import trustme  # noqa: F401
        import multiconn
    except ImportError as exc:
        raise SystemExit(f"{exc.name} does not import: pip install -e '.[test,bench]'") from None
    notes, versions = [], {"multiconn": getattr(multiconn, "__version__", "?")}
    for server in list(args.servers):
        if server.requires:
            try:
                versions[server.requires] = getattr(__import__(server.requires), "__version__", "?")
            except ImportError:
                notes.append(f"{server.name}: skipped, `{server.requires}` does not import.")
                args.servers.remove(server)
    if "auto" in args.profile:
        args.profile.discard("auto")
        args.profile.add("perf" if perf_works() else "cprofile")
    if "perf" in args.profile and not perf_works():
        notes.append("perf does not run here (not installed, or perf_event_paranoid): no perf profile; "
                     "cProfile instead.")
        args.profile.discard("perf")
        args.profile.add("cprofile")

    allowed = sorted(os.sched_getaffinity(0))
    args.all_cpus = allowed
    if len(allowed) >= 2:
        args.server_cpu, args.load_cpu = allowed[0], allowed[1]
        pinning = (f"Server pinned to CPU {allowed[0]}, load generator (and this script) to CPU {allowed[1]} "
                   "(sched_setaffinity).")
    else:
        args.server_cpu = args.load_cpu = None
        pinning = "Not pinned: only one CPU is available, so the server and the load generator share it."

    log("making the certificate (trustme, ECDSA P-256) ...")
    certs = Certs()
    previous_affinity = os.sched_getaffinity(0)
    if args.load_cpu is not None:
        os.sched_setaffinity(0, {args.load_cpu})
    plan = []
    for rnd in range(0 if args.profile_only else args.rounds):
        for sc in args.scenarios:
            k = rnd % len(args.servers)
            plan += [(rnd, sc, s) for s in args.servers[k:] + args.servers[:k]]
    per_run = 2.5 + args.warmup + args.duration
    n_profiles = (len(args.servers) if "perf" in args.profile else 0) + \
        (1 if "cprofile" in args.profile and any(s.name == "multiconn" for s in args.servers) else 0)
    log(f"{len(plan)} runs + {n_profiles} profiles, about "
        f"{(len(plan) * per_run + n_profiles * (args.warmup + args.profile_seconds + 8)) / 60:.0f} min on a quiet "
        f"machine. {pinning}")
    for note in notes:
        log("note: " + note)
    started = datetime.datetime.now().astimezone()
    limit = time.monotonic() + 60 * args.max_minutes
    records, profiles, negotiated = [], [], set()
    skipped = 0
    try:
        for i, (rnd, sc, server) in enumerate(plan, 1):
            if time.monotonic() > limit:
                skipped = len(plan) - i + 1
                log(f"--max-minutes {args.max_minutes:g} reached: {skipped} runs not run")
                break
            label = f"[{i}/{len(plan)}] r{rnd + 1} {sc.name:9} {server.name:16}"
            record = None
            for attempt in range(1, args.retries + 2):
                this = run_one(sc, server, args, certs)
                this["attempts"] = attempt
                if record is None or ("error" in record and "error" not in this) or (
                        "error" not in this and this["other_cpu_pct"] < record["other_cpu_pct"]):
                    record = this
                if "error" in this or this["other_cpu_pct"] <= args.max_other or time.monotonic() > limit:
                    break
                if attempt <= args.retries:
                    log(f"{label} other processes used {this['other_cpu_pct']:.0f} % of a CPU: run again")
            record["attempts"] = attempt
            record["round"] = rnd
            records.append(record)
            if "error" in record:
                log(f"{label} FAILED: {record['error'][:300]}")
                continue
            negotiated.add(record["negotiated"])
            log(f"{label} {record['rate']:>9,.0f}/s  srv={fmt(record['server_cpu_us'], 1)}us/{sc.unit} "
                f"p99={fmt(record['p99_ms'], 2)}ms cpu% srv={record['server_cpu_pct']:.0f} "
                f"load={record['load_cpu_pct']:.0f} other={record['other_cpu_pct']:.0f} "
                f"errors={sum(record['errors'].values())}")
        profile_sc = next(s for s in SCENARIOS if s.name == args.profile_scenario)
        if "perf" in args.profile and time.monotonic() <= limit:
            for server in args.servers:
                log(f"perf record: {server.name}, {profile_sc.name} load ...")
                p = profile_perf(server, args, certs, profile_sc)
                p["kind"] = "perf"
                profiles.append(p)
                if "error" in p:
                    log(f"  failed: {p['error']}")
                else:
                    log(f"  {p['server_cpu_us']:.0f} us/{profile_sc.unit}; self: " + ", ".join(
                        f"{k} {v:.0f}%" for k, v in sorted(p["self"].items(), key=lambda kv: -kv[1]))
                        + "; by caller: " + ", ".join(f"{k} {p['caller'].get(k, 0):.0f}%"
                                                      for k in ("in_openssl", "kernel", "python")))
        multiconn_server = next((s for s in args.servers if s.name == "multiconn"), None)
        if "cprofile" in args.profile and multiconn_server and time.monotonic() <= limit:
            log(f"cProfile: multiconn, {profile_sc.name} load ...")
            p = profile_cprofile(multiconn_server, args, certs, profile_sc)
            p["kind"] = "cprofile"
            profiles.append(p)
            if "error" in p:
                log(f"  failed: {p['error']}")
    except KeyboardInterrupt:
        log("interrupted: no report written (every server was stopped)")
        return 130
    finally:
        certs.remove()
        os.sched_setaffinity(0, previous_affinity)
    meta = {"command": command, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION, "os": f"{platform.system()} {platform.release()}", "versions": versions,
            "git": git_revision(os.path.dirname(os.path.abspath(multiconn.__file__))), "pinning": pinning,
            "notes": notes, "date": started.strftime("%Y-%m-%d %H:%M %Z"), "certificate": certs.describe,
            "negotiated": ", ".join(sorted(negotiated)) or "–", "skipped": skipped,
            "elapsed_min": (datetime.datetime.now().astimezone() - started).total_seconds() / 60}
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else list(argv), "profile_scenario": args.profile_scenario,
                       "meta": meta, "records": records, "profiles": profiles}, f, indent=1)
        log(f"wrote {args.save}")
    report = build_report(args, meta, records, profiles)
    publish(report, args.out)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

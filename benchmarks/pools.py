#!/usr/bin/env python3
"""Handler pools: multiconn's inline, thread, process and async handlers against asyncio executors.

    python benchmarks/pools.py                              # 3 rounds: 7 minutes on a quiet machine, more on a busy one
    python benchmarks/pools.py --quick --rounds 1           # smoke test: about 1 minute
    python benchmarks/pools.py --rounds 3 --out benchmarks/results/pools.md
    python benchmarks/pools.py --scenarios cpu --servers multiconn-inline,multiconn-process

Three scenarios, each against servers that run the same application
(benchmarks/pool_apps.py; the peers in benchmarks/peers/pool_peers.py call the
very same functions in their executors):

1. hol (head-of-line blocking): the p50/p99 latency of 50 connections of fast
   ping-pong requests (16-byte binary frames; the handler answers at once),
   alone and while 10 other connections send requests whose handler sleeps
   50 ms. Reported: both p99s and the median over rounds of the per-round
   ratio p99(with slow) / p99(alone).
2. offload (thread offload overhead): framed ping-pong, 100 connections x
   1 KiB, an echo handler run in a 32-thread pool; req/s and the server's CPU
   microseconds per request (utime + stime of the server process during the
   measured window / requests answered in it).
3. cpu (CPU-bound handler): 8 connections ping-pong on a handler of about 2 ms
   of pure-Python arithmetic; req/s of multiconn inline, multiconn's process
   pool (2 workers) and an asyncio server with ProcessPoolExecutor(2)
   (forkserver). Nothing is pinned in this scenario, so that the two workers
   can run on the two CPUs.

The load generator is this script's own process: one epoll loop over every
connection, one request in flight per connection, each answer checked (its
id, and its content against what the application must answer), each
request's latency timed from just before its send to the receipt of its
complete answer. Requests are encoded and answers decoded with multiconn's
protocol codec (`encode_frame`, `FrameDecoder`). After the warmup the
measured window starts; after it no new requests are sent, the outstanding
ones are drained (up to DRAIN_TIMEOUT), and the connections are closed.
Latencies are those of the requests sent in the window; req/s counts the
answers received in it.

Every run starts a fresh server (its own session, stopped with SIGTERM and
then SIGKILL of the whole session, also on errors and Ctrl-C). In the hol
and offload scenarios the server is pinned to the first allowed CPU and the
load generator to the second. Rounds are interleaved: each round runs every
(scenario, server, variant), the server order rotated by one per round.
Tables hold medians over rounds; ratios are medians of per-round ratios.
Linux only (/proc). Exit status 1 if any run failed.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import resource
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field

from benchutil import QUIET_BUSY_PCT, cpu_model, free_port, git_revision, median, publish, wait_for_quiet
from benchutil import fmt as benchutil_fmt

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "peers")
HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")

START_TIMEOUT = 20.0    # a server must accept connections within this
STOP_GRACE = 5.0        # SIGTERM, then SIGKILL of the session after this
DRAIN_TIMEOUT = 3.0     # after the window, answers still awaited for this long
QUIET_MAX_WAIT = 60.0   # ...for at most this many seconds
RECV_SIZE = 65536

sys.path.insert(0, HERE)  # pool_apps, for its constants and the calibration


# --- what is measured -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    name: str
    argv: tuple             # after the Python executable; "{port}" is replaced
    what: str
    needs_pools: bool = False   # needs the --handler-pool flags (and async apps) of multiconn serve
    requires: str = ""          # a module that must import, or the server is skipped


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    servers: tuple
    variants: tuple          # ("alone", "with-slow") for hol; ("",) otherwise
    pinned: bool


def _multiconn(app, *extra):
    return ("-m", "multiconn", "serve", "--port", "{port}", "--app", f"pool_apps:{app}",
            "--log-level", "warning") + extra


def _peer(app, loop, executor, workers):
    return (os.path.join(PEERS, "pool_peers.py"), "--port", "{port}", "--app", app, "--loop", loop,
            "--executor", executor, "--workers", str(workers))


HOL_SERVERS = (
    Server("multiconn-inline", _multiconn("hol"), "`multiconn serve` (inline handler, the default), sync app"),
    Server("multiconn-thread", _multiconn("hol", "--handler-pool", "thread", "--pool-size", "32"),
           "`multiconn serve --handler-pool thread --pool-size 32`, sync app", needs_pools=True),
    Server("multiconn-async", _multiconn("hol_async"),
           "`multiconn serve`, `async def` app (`await asyncio.sleep`)", needs_pools=True),
    Server("asyncio-executor", _peer("hol", "asyncio", "thread", 32),
           "asyncio.Protocol, the sync app via `loop.run_in_executor(ThreadPoolExecutor(32))`"),
    Server("uvloop-executor", _peer("hol", "uvloop", "thread", 32),
           "the same on uvloop", requires="uvloop"),
)
OFFLOAD_SERVERS = (
    Server("multiconn-thread", _multiconn("echo", "--handler-pool", "thread", "--pool-size", "32"),
           "`multiconn serve --handler-pool thread --pool-size 32`, echo app", needs_pools=True),
    Server("uvloop-executor", _peer("echo", "uvloop", "thread", 32),
           "uvloop asyncio.Protocol, echo via `loop.run_in_executor(ThreadPoolExecutor(32))`", requires="uvloop"),
    Server("multiconn-inline", _multiconn("echo"),
           "`multiconn serve` with the same echo app inline (reference: no offload at all)"),
)
CPU_SERVERS = (
    Server("multiconn-inline", _multiconn("cpu"), "`multiconn serve`, the cpu app inline"),
    Server("multiconn-process", _multiconn("cpu", "--handler-pool", "process", "--pool-size", "2"),
           "`multiconn serve --handler-pool process --pool-size 2`", needs_pools=True),
    Server("asyncio-process", _peer("cpu", "asyncio", "process", 2),
           "asyncio.Protocol, `loop.run_in_executor(ProcessPoolExecutor(2))`, forkserver"),
)
SCENARIOS = (
    Scenario("hol", "Head-of-line blocking", HOL_SERVERS, ("alone", "with-slow"), pinned=True),
    Scenario("offload", "Thread offload overhead", OFFLOAD_SERVERS, ("",), pinned=True),
    Scenario("cpu", "CPU-bound handler", CPU_SERVERS, ("",), pinned=False),
)

FAST_CONNS, SLOW_CONNS = 50, 10
OFFLOAD_CONNS, OFFLOAD_SIZE = 100, 1024
CPU_CONNS = 8


@dataclass
class Group:
    """Connections that send the same kind of request."""
    name: str
    count: int
    content: object        # bytes, or a function of the connection index
    expect: object = None  # the answer's content; None: the request's content
    latencies: array = field(default_factory=lambda: array("d"))
    completed: int = 0     # answers received within the window

    def content_for(self, index):
        return self.content(index) if callable(self.content) else self.content


def groups_for(scenario, variant):
    import pool_apps
    if scenario.name == "hol":
        groups = [Group("fast", FAST_CONNS, b"fast-ping-16byte")]
        if variant == "with-slow":
            groups.append(Group("slow", SLOW_CONNS, pool_apps.SLOW_PREFIX + b"-ping-16byte"))
        return groups
    if scenario.name == "offload":
        return [Group("echo", OFFLOAD_CONNS, lambda i: os.urandom(OFFLOAD_SIZE))]
    return [Group("cpu", CPU_CONNS, b"cpu", expect=pool_apps.CPU_ANSWER)]


# --- processes and /proc ------------------------------------------------------------------------------

def log(message):
    print(message, file=sys.stderr, flush=True)


def proc_stat(pid):
    """(session id, utime + stime in seconds) of one process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[3]), (int(fields[11]) + int(fields[12])) / TICK


def session_pids(sid):
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None and stat[0] == sid:
                pids.append(int(name))
    return pids


def session_cpu(sid):
    """CPU seconds of the server (the session leader) and of its whole session (its workers too)."""
    own = proc_stat(sid)
    total = 0.0
    for pid in session_pids(sid):
        stat = proc_stat(pid)
        if stat is not None:
            total += stat[1]
    return (own[1] if own else None), total


def busy_seconds():
    """Busy CPU seconds of the whole machine so far (everything but idle, iowait and steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4] - v[7]) / TICK


def self_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime



def read_tail(f, limit=4000):
    try:
        f.flush()
        f.seek(0)
        return f.read().decode("utf-8", "replace")[-limit:]
    except (OSError, ValueError):
        return ""


class ServerRun:
    """One server process in its own session: started, waited for, stopped with everything it started."""

    def __init__(self, server, cpu, env):
        self.server = server
        self.port = free_port()
        self.stderr = tempfile.TemporaryFile()  # no name: nothing is left on disk, whatever happens
        argv = [sys.executable] + [a.format(port=self.port) for a in server.argv]
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr, start_new_session=True, preexec_fn=preexec)
        self.leftovers = 0

    def wait_listening(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                lines = read_tail(self.stderr).strip().splitlines()
                raise RuntimeError(f"exited with status {self.proc.returncode} before listening: "
                                   f"{lines[-1] if lines else 'no output'}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not listening on port {self.port} after {START_TIMEOUT:g} s") from None
                time.sleep(0.05)
        time.sleep(0.1)  # let it see the probe connection close

    def stop(self):
        """SIGTERM the server, SIGKILL its session if it lingers; the session must end up empty."""
        sid = self.proc.pid
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.kill_session(sid)
            self.proc.wait(5)
        deadline = time.monotonic() + STOP_GRACE  # workers exit after their server; wait, then kill
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = session_pids(sid)
        if left:
            self.leftovers = len(left)
            self.kill_session(sid)
            deadline = time.monotonic() + 5
            while session_pids(sid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.log = read_tail(self.stderr)
        self.stderr.close()

    @staticmethod
    def kill_session(sid):
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- the load generator -------------------------------------------------------------------------------

class Conn:
    __slots__ = ("sock", "group", "index", "request", "expect", "raw_answer", "decoder", "sent_at",
                 "waiting", "out")

    def __init__(self, sock, group, index, request, expect):
        self.sock = sock
        self.group = group
        self.index = index        # also the request id
        self.request = request
        self.expect = expect
        self.raw_answer = None    # the bytes of a verified answer: later ones are compared to it
        self.decoder = None
        self.sent_at = 0.0
        self.waiting = False
        self.out = b""


class LoadError(Exception):
    pass


def generate(port, groups, warmup, duration, server_sid):
    """Drive every connection of `groups` against the server; the measured figures.

    Fills each group's `latencies` and `completed`; returns a dict of the window's
    length, the server's and our CPU seconds in it, and the errors by kind.
    """
    import multiconn
    from multiconn import Frame, FrameDecoder, encode_frame

    poller = select.epoll()
    conns = {}
    errors = {}
    first_error = {}

    def fail(conn, kind, text):
        errors[kind] = errors.get(kind, 0) + 1
        first_error.setdefault(kind, text)
        close(conn)

    def close(conn):
        fd = conn.sock.fileno()
        if fd in conns:
            del conns[fd]
            try:
                poller.unregister(fd)
            except (OSError, ValueError):
                pass
        conn.sock.close()
        conn.waiting = False

    index = 0
    try:
        for group in groups:
            for _ in range(group.count):
                sock = socket.create_connection((HOST, port), timeout=10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                content = group.content_for(index)
                request = encode_frame(Frame.binary(content, id=index))
                conn = Conn(sock, group, index, request, content if group.expect is None else group.expect)
                conn.decoder = FrameDecoder()
                conns[sock.fileno()] = conn
                poller.register(sock.fileno(), select.EPOLLIN)
                index += 1
    except OSError as exc:
        for conn in list(conns.values()):
            close(conn)
        poller.close()
        raise LoadError(f"connecting: {exc}") from None

    perf = time.perf_counter
    EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT

    def send(conn):
        conn.waiting = True
        conn.sent_at = perf()
        try:
            n = conn.sock.send(conn.request)
        except OSError as exc:
            fail(conn, "send failed", str(exc))
            return
        if n < len(conn.request):
            conn.out = conn.request[n:]
            poller.modify(conn.sock.fileno(), EPOLLIN | EPOLLOUT)

    def check(conn, frame):
        """Whether one decoded answer is right; counts the error otherwise."""
        if frame.header.get("id") != conn.index:
            fail(conn, "wrong id", f"answer id {frame.header.get('id')!r} to request id {conn.index}")
            return False
        if frame.content != conn.expect:
            info = frame.error_info
            if info:
                fail(conn, f"error frame {info[0]}", info[1][:200])
            else:
                fail(conn, "wrong content", f"{bytes(frame.content[:40])!r}... instead of {conn.expect[:40]!r}...")
            return False
        return True

    gc.collect()
    gc.disable()  # no collector pauses in the latencies
    start = perf()
    warm_end = start + warmup
    window_end = warm_end + duration
    phase = 0  # 0 warmup, 1 measured, 2 draining
    marks = {}
    drain_deadline = None
    try:
        for conn in list(conns.values()):
            send(conn)
        while True:
            now = perf()
            if phase == 0 and now >= warm_end:
                phase = 1
                marks["start"] = (perf(), session_cpu(server_sid), self_cpu(), busy_seconds())
                warm_end = marks["start"][0]
            if phase == 1 and now >= window_end:
                phase = 2
                marks["end"] = (perf(), session_cpu(server_sid), self_cpu(), busy_seconds())
                window_end = marks["end"][0]
                drain_deadline = now + DRAIN_TIMEOUT
            if phase == 2:
                if not any(c.waiting for c in conns.values()):
                    break
                if now >= drain_deadline:
                    for conn in list(conns.values()):
                        if conn.waiting:
                            fail(conn, "unanswered", f"no answer {DRAIN_TIMEOUT:g} s after the window")
                    break
                timeout = min(0.05, drain_deadline - now)
            else:
                timeout = min(0.05, max(0.0, (warm_end if phase == 0 else window_end) - now))
            if not conns:
                if phase < 2:
                    raise LoadError("every connection failed: " + "; ".join(f"{k}: {v}" for k, v in first_error.items()))
                break
            for fd, event in poller.poll(timeout):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if event & EPOLLOUT and conn.out:
                    try:
                        n = conn.sock.send(conn.out)
                    except OSError as exc:
                        fail(conn, "send failed", str(exc))
                        continue
                    conn.out = conn.out[n:]
                    if not conn.out:
                        poller.modify(fd, EPOLLIN)
                if not event & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    continue
                try:
                    data = conn.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    fail(conn, "connection reset", str(exc))
                    continue
                done = perf()
                if not data:
                    fail(conn, "closed by the server", "the server closed the connection")
                    continue
                fresh = not conn.decoder.has_partial
                if fresh and data == conn.raw_answer:
                    answers = 1  # the very bytes of an answer verified before
                else:
                    try:
                        frames = conn.decoder.feed(data)
                    except multiconn.ProtocolError as exc:
                        fail(conn, "malformed answer", str(exc))
                        continue
                    answers = 0
                    for frame in frames:
                        if not check(conn, frame):
                            break
                        answers += 1
                    else:
                        if answers == 1 and fresh and not conn.decoder.has_partial and conn.raw_answer is None:
                            conn.raw_answer = data
                    if fd not in conns:
                        continue
                if answers == 0:
                    continue
                if answers > 1 or not conn.waiting:
                    fail(conn, "answer to nothing", "more answers than requests")
                    continue
                conn.waiting = False
                group = conn.group
                if warm_end <= conn.sent_at < window_end:  # sent within the window
                    group.latencies.append(done - conn.sent_at)
                if phase == 1 and done >= warm_end:
                    group.completed += 1
                if phase < 2:
                    send(conn)
    finally:
        gc.enable()
        for conn in list(conns.values()):
            close(conn)
        poller.close()
    (t0, (srv0, tree0), me0, busy0), (t1, (srv1, tree1), me1, busy1) = marks["start"], marks["end"]
    wall = t1 - t0
    server_cpu = None if srv0 is None or srv1 is None else srv1 - srv0
    return {"wall": wall, "server_cpu": server_cpu, "tree_cpu": tree1 - tree0, "load_cpu": me1 - me0,
            "machine_busy": busy1 - busy0, "errors": errors, "first_error": first_error}


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    rank = math.ceil(q / 100 * len(sorted_values))  # nearest rank
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def run_one(scenario, server, variant, args, env):
    """One fresh server, one load; a record of the figures or of the error."""
    record = {"scenario": scenario.name, "server": server.name, "variant": variant}
    server_cpu, load_cpu = (args.cpus[0], args.cpus[1]) if scenario.pinned and args.cpus else (None, None)
    record["busy_before_pct"] = wait_for_quiet(args.all_cpus, QUIET_MAX_WAIT)
    groups = groups_for(scenario, variant)
    run = None
    previous_affinity = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {load_cpu} if load_cpu is not None else set(args.all_cpus))
        run = ServerRun(server, server_cpu, env)
        run.wait_listening()
        result = generate(run.port, groups, args.warmup, args.duration, run.proc.pid)
        if run.proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {run.proc.returncode} during the run")
        wall = result["wall"]
        completed = sum(g.completed for g in groups)
        record.update({
            "wall": wall, "rps": completed / wall, "errors": result["errors"], "first_error": result["first_error"],
            "server_cpu_us": None if result["server_cpu"] is None or not completed
            else 1e6 * result["server_cpu"] / completed,
            "tree_cpu_us": 1e6 * result["tree_cpu"] / completed if completed else None,
            "server_cpu_pct": 100 * (result["server_cpu"] or 0) / wall,
            "tree_cpu_pct": 100 * result["tree_cpu"] / wall,
            "load_cpu_pct": 100 * result["load_cpu"] / wall,
            "other_cpu_pct": max(0.0, 100 * (result["machine_busy"] - result["tree_cpu"] - result["load_cpu"]) / wall),
        })
        for g in groups:
            lat = sorted(g.latencies)
            record[g.name] = {"rps": g.completed / wall, "n": len(lat),
                              "p50_ms": percentile(lat, 50) and 1e3 * percentile(lat, 50),
                              "p99_ms": percentile(lat, 99) and 1e3 * percentile(lat, 99)}
    except (RuntimeError, OSError, LoadError) as exc:
        record["error"] = str(exc)
    finally:
        if run is not None:
            run.stop()
            record["leftover_processes"] = run.leftovers
            record["server_log"] = [line for line in run.log.splitlines() if line.strip()]
        os.sched_setaffinity(0, previous_affinity)
    return record


# --- the report -----------------------------------------------------------------------------------------

def fmt(value, digits=0):
    return benchutil_fmt(value, digits, whole_from=1000)


def ratio_text(ratios, own=False):
    if own:
        return "1 (base)"
    return "–" if not ratios else f"{median(ratios):.2f}{spread(ratios)}"


def spread(values, digits=2):
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return ""
    return f" ({min(values):.{digits}f}–{max(values):.{digits}f})"


def verdict(value, target, text):
    if value is None:
        return f"- {text}: **not measured**"
    return f"- {text}: {value:.2f} → **{'met' if value >= target else 'not met'}**"


def by(records, scenario, server, variant=""):
    return [r for r in records if r["scenario"] == scenario and r["server"] == server
            and r["variant"] == variant and "error" not in r]


def paired_ratios(records, scenario, num, den, key, num_variant="", den_variant=""):
    """Per-round num/den of `key` (a function of a record), for the rounds where both ran."""
    a = {r["round"]: key(r) for r in by(records, scenario, num, num_variant)}
    b = {r["round"]: key(r) for r in by(records, scenario, den, den_variant)}
    return [a[k] / b[k] for k in sorted(a) if k in b and a[k] is not None and b[k]]


def build_report(args, meta, records):
    L = ["# multiconn handler pools: benchmarks", ""]
    L += [f"- Date: {meta['date']} ({meta['elapsed_min']:.0f} min); git commit {meta['git']}.",
          f"- Machine: {meta['cpus']} CPUs ({meta['cpu_model']}), {meta['os']}; shared with other tenants, so "
          "figures are comparable only within this report.",
          f"- Python {meta['python']}, " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
          f"- {args.rounds} interleaved round{'s' if args.rounds != 1 else ''}: each round runs every server "
          "of every scenario (the server order rotated by one per round), each run on a fresh server: "
          f"{args.warmup:g} s warmup, then {args.duration:g} s measured. Tables hold medians over rounds; "
          "ratios are medians of per-round ratios, with their range over rounds in brackets.",
          f"- Pinning: {meta['pinning']}",
          f"- Load generator: this script's own process (one epoll loop, one request in flight per "
          "connection, every answer's id and content checked, multiconn's codec), loopback 127.0.0.1.",
          f"- The cpu handler: {meta['cpu_iterations']:,} loop iterations, {meta['cpu_ms']:.2f} ms of CPU per call "
          "when calibrated (thread CPU time, median of 9), the same count in every server and worker (POOL_CPU_ITERATIONS).",
          f"- Command: `{meta['command']}`"]
    L += [f"- Note: {note}" for note in meta["notes"]]
    L.append("")

    def failed(scenario, server, variant=""):
        runs = [r for r in records if r["scenario"] == scenario and r["server"] == server and r["variant"] == variant]
        return runs and all("error" in r for r in runs)

    def cell(scenario, server, variant, key, digits=0):
        if failed(scenario, server, variant):
            return "FAILED"
        return fmt(median(key(r) for r in by(records, scenario, server, variant)), digits)

    names = {s.name for s in args.servers}
    # 1. head-of-line
    sc = next((s for s in args.scenarios if s.name == "hol"), None)
    if sc:
        servers = [s for s in sc.servers if s.name in names]
        L += ["## 1. Head-of-line blocking", "",
              f"{FAST_CONNS} connections ping-pong 16-byte requests whose handler answers at once; with "
              f"`with slow`, {SLOW_CONNS} more connections ping-pong requests whose handler sleeps 50 ms "
              "(`time.sleep` in the sync app, `await asyncio.sleep` in the async one). Latencies are those of "
              "the fast connections only, in ms. **p99 ratio** = p99 with slow ÷ p99 alone, per round. "
              "Server on one CPU, load generator on the other.", "",
              "| server | p50 alone | p99 alone | p50 with slow | p99 with slow | p99 ratio | fast req/s alone "
              "| fast req/s with slow | slow p50 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        p99 = lambda r: r["fast"]["p99_ms"]  # noqa: E731
        for s in servers:
            ratios = paired_ratios(records, "hol", s.name, s.name, p99, "with-slow", "alone")
            ratio = "FAILED" if failed("hol", s.name, "with-slow") or failed("hol", s.name, "alone") else (
                "–" if not ratios else f"{median(ratios):.2f}{spread(ratios)}")
            L.append(f"| {s.name} | {cell('hol', s.name, 'alone', lambda r: r['fast']['p50_ms'], 2)} "
                     f"| {cell('hol', s.name, 'alone', p99, 2)} "
                     f"| {cell('hol', s.name, 'with-slow', lambda r: r['fast']['p50_ms'], 2)} "
                     f"| {cell('hol', s.name, 'with-slow', p99, 2)} | {ratio} "
                     f"| {cell('hol', s.name, 'alone', lambda r: r['fast']['rps'])} "
                     f"| {cell('hol', s.name, 'with-slow', lambda r: r['fast']['rps'])} "
                     f"| {cell('hol', s.name, 'with-slow', lambda r: r['slow']['p50_ms'], 1)} |")
        L += ["", "Target: the thread pool and the async app keep the fast connections' p99 within 2x of "
              "their p99 alone (ratio ≤ 2).", ""]
        for name in ("multiconn-thread", "multiconn-async"):
            if name in names:
                ratios = paired_ratios(records, "hol", name, name, p99, "with-slow", "alone")
                value = median(ratios)
                L.append(f"- {name}: p99 ratio " + ("not measured" if value is None else
                         f"{value:.2f} → **{'met' if value <= 2 else 'not met'}**"))
        L.append("")
    # 2. offload
    sc = next((s for s in args.scenarios if s.name == "offload"), None)
    if sc:
        servers = [s for s in sc.servers if s.name in names]
        base = "uvloop-executor"
        L += ["## 2. Thread offload overhead", "",
              f"{OFFLOAD_CONNS} connections ping-pong {OFFLOAD_SIZE}-byte frames to an echo handler run in a "
              "32-thread pool. **server CPU µs/request**: utime + stime of the server process (all its "
              "threads) during the window ÷ the requests answered in it. Server on one CPU, load generator "
              "on the other; whichever CPU is near 100 % is the bottleneck.", "",
              f"| server | req/s | ratio to {base} | server CPU µs/request | p50 ms | p99 ms "
              "| CPU % server / load generator |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for s in servers:
            ratios = paired_ratios(records, "offload", s.name, base, lambda r: r["rps"])
            L.append(f"| {s.name} | {cell('offload', s.name, '', lambda r: r['rps'])} "
                     f"| {ratio_text(ratios, s.name == base)} "
                     f"| {cell('offload', s.name, '', lambda r: r['server_cpu_us'], 1)} "
                     f"| {cell('offload', s.name, '', lambda r: r['echo']['p50_ms'], 2)} "
                     f"| {cell('offload', s.name, '', lambda r: r['echo']['p99_ms'], 2)} "
                     f"| {cell('offload', s.name, '', lambda r: r['server_cpu_pct'])} / "
                     f"{cell('offload', s.name, '', lambda r: r['load_cpu_pct'])} |")
        L += ["", f"Target: multiconn's thread pool ≥ 1.5x the req/s of {base}.", ""]
        if "multiconn-thread" in names and base in names:
            L += [verdict(median(paired_ratios(records, "offload", "multiconn-thread", base, lambda r: r["rps"])),
                          1.5, f"multiconn-thread ÷ {base} req/s")]
        L.append("")
    # 3. cpu
    sc = next((s for s in args.scenarios if s.name == "cpu"), None)
    if sc:
        servers = [s for s in sc.servers if s.name in names]
        L += ["## 3. CPU-bound handler", "",
              f"{CPU_CONNS} connections ping-pong requests to a handler of about {meta['cpu_ms']:.1f} ms of "
              "pure-Python arithmetic. **Nothing is pinned** here (not the server, not its workers, not the "
              "load generator), so that two worker processes can run on the two CPUs. CPU µs/request: the "
              "server process alone, and its whole session (the pool's worker processes, and for the "
              "asyncio peer its forkserver, included).", "",
              "| server | req/s | ratio to multiconn-inline | ratio to asyncio-process | p50 ms | p99 ms "
              "| CPU µs/request: server / with workers |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        for s in servers:
            cols = []
            for base in ("multiconn-inline", "asyncio-process"):
                ratios = paired_ratios(records, "cpu", s.name, base, lambda r: r["rps"])
                cols.append(ratio_text(ratios, s.name == base))
            L.append(f"| {s.name} | {cell('cpu', s.name, '', lambda r: r['rps'])} | {cols[0]} | {cols[1]} "
                     f"| {cell('cpu', s.name, '', lambda r: r['cpu']['p50_ms'], 2)} "
                     f"| {cell('cpu', s.name, '', lambda r: r['cpu']['p99_ms'], 2)} "
                     f"| {cell('cpu', s.name, '', lambda r: r['server_cpu_us'])} / "
                     f"{cell('cpu', s.name, '', lambda r: r['tree_cpu_us'])} |")
        L += ["", "Targets: the process pool ≥ 1.6x inline, and ≥ 1.0x the asyncio peer.", ""]
        if "multiconn-process" in names:
            for base, target in (("multiconn-inline", 1.6), ("asyncio-process", 1.0)):
                if base in names:
                    L.append(verdict(median(paired_ratios(records, "cpu", "multiconn-process", base,
                                                          lambda r: r["rps"])), target,
                                     f"multiconn-process ÷ {base} req/s"))
        L.append("")
    # noise, errors, failures
    L += ["## Servers", ""]
    for sc in args.scenarios:
        for s in sc.servers:
            if s.name in names:
                L.append(f"- {sc.name} / **{s.name}**: {s.what}")
    L += ["", "## Errors, noise and failed runs", ""]
    ok = [r for r in records if "error" not in r]
    errs = {}
    for r in ok:
        for kind, n in r["errors"].items():
            key = (r["scenario"], r["server"], r["variant"], kind)
            errs[key] = errs.get(key, 0) + n
    if errs:
        for (scn, srv, var, kind), n in sorted(errs.items()):
            first = next(r["first_error"][kind] for r in ok if r["scenario"] == scn and r["server"] == srv
                         and r["variant"] == var and kind in r["first_error"])
            L.append(f"- {scn} / {srv}{' / ' + var if var else ''}: {n} × {kind} (first: {first})")
    else:
        L.append("- No errors: every answer had its request's id and the expected content.")
    other = [r["other_cpu_pct"] for r in ok]
    if other:
        L.append(f"- Other tenants' CPU use during the measured windows (the machine's busy time minus the "
                 f"servers' and the load generator's): median {median(other):.0f} %, max {max(other):.0f} % "
                 "of one CPU.")
    repeated = [r for r in records if r.get("attempts", 1) > 1]
    if repeated:
        still = [r for r in ok if r["other_cpu_pct"] > args.max_other]
        L.append(f"- {len(repeated)} of {len(records)} runs were repeated because other processes used more than "
                 f"{args.max_other:g} % of one CPU during their measured window (up to {args.retries} repeats, "
                 f"the quietest attempt kept); {len(still)} still had more in the attempt kept"
                 + (": " + ", ".join(f"{r['scenario']} / {r['server']}{' / ' + r['variant'] if r['variant'] else ''} "
                                     f"round {r['round'] + 1} ({r['other_cpu_pct']:.0f} %)" for r in still)
                    if still else "") + ".")
    busy = [r for r in records if r.get("busy_before_pct", 0) >= QUIET_BUSY_PCT]
    if busy:
        L.append(f"- {len(busy)} of {len(records)} runs started on a busy machine (after waiting "
                 f"{QUIET_MAX_WAIT:g} s for the CPUs to fall below {QUIET_BUSY_PCT:g} % busy).")
    leftovers = [r for r in records if r.get("leftover_processes")]
    if leftovers:
        L.append(f"- {len(leftovers)} runs left processes behind {STOP_GRACE:g} s after the server exited "
                 "(killed): " + ", ".join(f"{r['scenario']}/{r['server']} ({r['leftover_processes']})"
                                          for r in leftovers))
    logged = {}
    for r in records:
        lines = r.get("server_log") or []
        if lines:
            entry = logged.setdefault((r["scenario"], r["server"], r["variant"]), [0, 0, lines[0]])
            entry[0] += 1
            entry[1] += len(lines)
    for (scn, srv, var), (runs, n, first) in sorted(logged.items()):
        L.append(f"- {scn} / {srv}{' / ' + var if var else ''}: the server wrote {n} lines on stderr "
                 f"(at --log-level warning) in {runs} run{'s' if runs > 1 else ''}; the first: `{first[-300:]}`")
    for r in records:
        if "error" in r:
            L.append(f"- FAILED {r['scenario']} / {r['server']}{' / ' + r['variant'] if r['variant'] else ''} / "
                     f"round {r['round'] + 1}: {r['error'][:400]}")
    L.append("")
    return "\n".join(L)


# --- main -----------------------------------------------------------------------------------------------

def has_pool_flags(env):
    probe = subprocess.run([sys.executable, "-m", "multiconn", "serve", "--help"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        raise SystemExit(f"`multiconn serve --help` failed (exit status {probe.returncode}): "
                         f"{probe.stderr.strip()[-300:]}\nInstall the project first: pip install -e '.[bench]'")
    return "--handler-pool" in probe.stdout


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_servers = sorted({s.name for sc in SCENARIOS for s in sc.servers})
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 s measured after 0.5 s warmup")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup seconds per run (default 1)")
    parser.add_argument("--scenarios", help="comma list (default all): " + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--servers", help="comma list (default all): " + ", ".join(all_servers))
    parser.add_argument("--max-other", type=float, default=25.0, metavar="PCT",
                        help="repeat a run when other processes used more than this %% of one CPU during its "
                             "measured window (default 25)")
    parser.add_argument("--retries", type=int, default=2,
                        help="repeats of such a run at most; the quietest attempt is kept (default 2)")
    parser.add_argument("--out", help="also write the report (markdown) to this file, "
                                      "e.g. benchmarks/results/pools.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 1.0, 0.5
    if args.rounds < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("--rounds must be >= 1, --duration > 0, --warmup >= 0")
    if args.scenarios:
        wanted = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in {s.name for s in SCENARIOS}]
        if unknown:
            parser.error(f"unknown scenario {', '.join(unknown)}")
        args.scenarios = [s for s in SCENARIOS if s.name in wanted]
    else:
        args.scenarios = list(SCENARIOS)
    if args.servers:
        wanted = [n.strip() for n in args.servers.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in all_servers]
        if unknown:
            parser.error(f"unknown server {', '.join(unknown)}; known: {', '.join(all_servers)}")
        args.servers = [s for sc in args.scenarios for s in sc.servers if s.name in wanted]
    else:
        args.servers = [s for sc in args.scenarios for s in sc.servers]
    return args


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM, like Ctrl-C, runs the finally blocks that stop the servers


def main(argv=None):
    args = parse_args(argv)
    command = "python benchmarks/pools.py" + "".join(" " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if os.environ.get("PYTHONPATH"):
        command = f"PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])} " + command
    signal.signal(signal.SIGTERM, interrupted)
    notes, versions = [], {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("POOL_CPU_ITERATIONS", None)

    allowed = sorted(os.sched_getaffinity(0))
    args.all_cpus = allowed
    if len(allowed) >= 2:
        args.cpus = (allowed[0], allowed[1])
        pinning = (f"hol and offload: server pinned to CPU {allowed[0]} (with all its threads), load generator "
                   f"to CPU {allowed[1]} (sched_setaffinity). cpu: nothing pinned (not the server, not its "
                   "worker processes, not the load generator).")
    else:
        args.cpus = None
        pinning = "not pinned: only one CPU is available, so the servers and the load generator share it."

    # Calibrate the cpu handler once, here, for every server and worker.
    os.sched_setaffinity(0, {allowed[-1]})
    import pool_apps
    iterations = pool_apps.calibrate()
    times = []
    for _ in range(9):
        t0 = time.thread_time()
        pool_apps.spin(iterations)
        times.append(time.thread_time() - t0)
    os.sched_setaffinity(0, set(allowed))
    env["POOL_CPU_ITERATIONS"] = str(iterations)
    pool_apps.CPU_ITERATIONS = iterations
    pool_apps.CPU_ANSWER = str(pool_apps.spin_result(iterations)).encode()

    import multiconn
    versions["multiconn"] = getattr(multiconn, "__version__", "?")
    pools = has_pool_flags(env)
    if not pools:
        notes.append("`multiconn serve` has no --handler-pool flag yet: multiconn-thread, multiconn-process and "
                     "multiconn-async were not run.")
    for server in list(args.servers):
        if server.requires:
            try:
                module = __import__(server.requires)
                versions[server.requires] = getattr(module, "__version__", "?")
            except ImportError:
                notes.append(f"{server.name}: skipped, `{server.requires}` does not import.")
                args.servers = [s for s in args.servers if s.name != server.name]
    if not pools:
        args.servers = [s for s in args.servers if not s.needs_pools]
    names = {s.name for s in args.servers}

    plan = []
    for rnd in range(args.rounds):
        for sc in args.scenarios:
            servers = [s for s in sc.servers if s.name in names]
            if not servers:
                continue
            k = rnd % len(servers)
            servers = servers[k:] + servers[:k]
            variants = sc.variants if rnd % 2 == 0 else sc.variants[::-1]
            plan += [(rnd, sc, s, v) for s in servers for v in variants]
    per_run = 1.5 + args.warmup + args.duration
    log(f"{len(plan)} runs, about {len(plan) * per_run / 60:.0f} min; cpu handler {iterations:,} iterations "
        f"= {1e3 * statistics.median(times):.2f} ms. {pinning}")
    for note in notes:
        log("note: " + note)
    started = datetime.datetime.now().astimezone()
    records = []
    try:
        for i, (rnd, sc, server, variant) in enumerate(plan, 1):
            label = f"[{i}/{len(plan)}] r{rnd + 1} {sc.name:8} {server.name:18} {variant:10}"
            record = None
            for attempt in range(1, args.retries + 2):
                this = run_one(sc, server, variant, args, env)
                this["attempts"] = attempt
                if record is None or ("error" in record and "error" not in this) or (
                        "error" not in this and this["other_cpu_pct"] < record["other_cpu_pct"]):
                    record = this
                if "error" in this or this["other_cpu_pct"] <= args.max_other:
                    break
                if attempt <= args.retries:
                    log(f"{label} other processes used {this['other_cpu_pct']:.0f} % of a CPU: run again")
            record["attempts"] = attempt
            record["round"] = rnd
            records.append(record)
            if "error" in record:
                log(f"{label} FAILED: {record['error'][:300]}")
                continue
            groups = [k for k in ("fast", "slow", "echo", "cpu") if k in record]
            detail = " ".join(f"{g}: {record[g]['rps']:,.0f}/s p50={fmt(record[g]['p50_ms'], 2)}ms "
                              f"p99={fmt(record[g]['p99_ms'], 2)}ms" for g in groups)
            log(f"{label} {detail} srv={fmt(record['server_cpu_us'], 1)}us/req "
                f"cpu% srv={record['tree_cpu_pct']:.0f} load={record['load_cpu_pct']:.0f} "
                f"other={record['other_cpu_pct']:.0f} errors={sum(record['errors'].values())}"
                + (f" LEFTOVERS={record['leftover_processes']}" if record.get("leftover_processes") else ""))
    except KeyboardInterrupt:
        log("interrupted: no report written (every server was stopped)")
        return 130
    meta = {"command": command, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "versions": versions,
            "git": git_revision(os.path.dirname(os.path.abspath(multiconn.__file__))),
            "pinning": pinning, "notes": notes, "date": started.strftime("%Y-%m-%d %H:%M %Z"),
            "elapsed_min": (datetime.datetime.now().astimezone() - started).total_seconds() / 60,
            "cpu_iterations": iterations, "cpu_ms": 1e3 * statistics.median(times)}
    report = build_report(args, meta, records)
    publish(report, args.out)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Several worker processes on one port: ``multiconn serve --workers N``.

One multiconn process runs one event loop on one core. With ``--workers N``
(N > 1; ``auto`` is the number of CPUs this process may run on) the process
that was started becomes a supervisor: it runs no server itself but N worker
processes, each a plain ``multiconn serve`` with its own loop, and it
restarts, reloads and stops them. ``--workers 1``, the default, is one process
exactly as before, with no supervisor.

How connections reach the workers
---------------------------------
Each worker has a listening socket of its own, all bound to the same port
with ``SO_REUSEPORT``, so the kernel spreads new connections over them by a
hash of the connection's addresses and ports. The alternative, one socket
shared by every worker, each waiting on it with epoll, lets whichever worker
wakes first take the connection, and the wake-ups favour the same worker
(Cloudflare measured it; gunicorn #2670 saw 96/4/0/0/0). EPOLLEXCLUSIVE,
which wakes one waiter instead of all, is not something multiconn's poller
asks for, and it wakes the most recent waiter first: the same imbalance,
worse. Measured with a
throwaway script on the 2-core VM, loopback: worker processes each running
`multiconn.Server` on the socket(s) handed to them, connections per worker
(each connection asks its worker's pid):

=================================  ==================  ================
                                   one shared socket   SO_REUSEPORT
=================================  ==================  ================
1,000 connections, 2 workers       504 / 496           514 / 486
200 fresh connections in a row     177 / 23 (1 run     109 / 91
                                   of 4; others even)
1,000 at once (burst), 4 workers   440/203/203/154     262/252/251/235
=================================  ==================  ================

The price of SO_REUSEPORT is that a socket's accept queue belongs to that
socket: when the last process holding it closes it, the connections waiting
in it are reset. So the supervisor binds every worker's socket itself and
keeps holding it. A worker that dies, and a worker that is replaced at a
reload, only closes its own descriptor: the socket, and the connections
queued in it, stay, and its replacement (or successor) inherits the very
same socket and accepts them. Nothing waits on a socket nobody will serve
for long, either: when a slot's worker cannot be started three times in a
row, the supervisor closes that slot's socket (its share of new connections
then goes to the other workers) and binds a fresh one for the next attempt.
A worker calls ``listen()`` on its sockets itself, just before it serves, so
a fresh socket joins the port only when there is someone to accept from it.
What the hash does not know is load: a worker stuck in a long inline handler
still gets its share of new connections (run such handlers in a pool).

Workers are started with `subprocess.Popen` (fork + exec of
``python -m multiconn serve ... --workers 1``): the supervisor never forks a
copy of itself, and each worker imports the application afresh, so a reload
picks up new code. A worker finds its sockets, a control socket and the
supervisor's stderr in the environment variable `WORKER_ENV`
(`worker_role`); it reports "ready" on the control socket once its server
listens, and it stops (draining) when the control socket says the
supervisor is gone. Until it is ready its stderr goes to the supervisor,
which holds it back (a worker that cannot start says why once, not once per
attempt) and turns its "listening on" line into the supervisor's own, printed
once every worker serves.

Signals to the supervisor
-------------------------
* SIGTERM or SIGINT: every worker gets SIGTERM and drains as a single server
  does (``--drain-timeout``); the supervisor exits 0 when they are gone. A
  second signal aborts: the workers get it too, those still alive after
  `ABORT_GRACE` are killed, and the supervisor exits 1.
* SIGHUP: a zero-downtime reload. A new worker starts for every slot, on the
  slot's socket, and only once all of them are ready do the old ones get
  SIGTERM (they stop accepting and drain). If a new worker cannot start, the
  reload is abandoned and the old workers keep serving.
* A worker that exits, however, is restarted at once, then after
  0.1, 0.2, 0.4 ... up to `MAX_BACKOFF` seconds if it keeps dying. If no
  worker can be started at all (`MAX_START_FAILURES` attempts in a row with
  none serving: an import error in the app, a bad certificate), the
  supervisor gives up with the reason and the workers' exit status.

Workers run in sessions of their own, so a Ctrl-C in a terminal reaches only
the supervisor, which then stops them as above. Every log line carries the
pid of the process that wrote it (`LOG_FORMAT`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from typing import Any, Sequence

from .loop import EVENT_READ, EventLoop, TimerHandle
from .metrics import empty_snapshot, merge, render_snapshot
from .metrics_endpoint import MetricsEndpoint
from .server import DEFAULT_BACKLOG, bind_listeners, format_address

log = logging.getLogger("multiconn.supervisor")

#: The environment variable through which a supervisor hands a worker its descriptors.
WORKER_ENV = "MULTICONN_WORKER"
#: The log format of the supervisor and its workers: the pid names the process.
LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
#: Workers that exit before they are ready, in a row with none serving, before the supervisor gives up.
MAX_START_FAILURES = 3
#: A slot whose worker failed to start this many times in a row gets a fresh socket.
SLOT_FAILURES_BEFORE_REBIND = 3
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0
#: A worker that served this long before it died is restarted at once again.
BACKOFF_RESET = 10.0
#: A worker must be ready (serving) within this long of its start.
READY_TIMEOUT = 30.0
#: After its drain timeout, how long a stopping worker gets before it is killed.
STOP_GRACE = 5.0
#: After a second signal, how long the workers get to abort before they are killed.
ABORT_GRACE = 2.0
#: How often the supervisor looks for exited workers besides SIGCHLD.
POLL_INTERVAL = 1.0
#: How often a worker sends its metrics to the supervisor (with --metrics); what
#: a worker counted since its last snapshot is lost only if it dies unannounced.
METRICS_PUSH = 0.5

#: A socket address: (host, port) or IPv6's (host, port, flowinfo, scope_id).
Address = tuple[Any, ...]

_LISTENING = re.compile(rb"listening on (\S+) \((.*)\)\s*$")
#: A line in `LOG_FORMAT` (a worker's log): passed on as it is.
_LOG_LINE = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] ")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_count(text: str) -> int:
    """``--workers``: a number >= 1, or ``auto`` for one per CPU."""
    if text == "auto":
        return available_cpus()
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 or 'auto', got {text}")
    return count


def describe_status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


# -- the worker's side ------------------------------------------------------------


class WorkerRole:
    """What a supervisor handed this process; inert (`active` False) in a process not started by one.

    ``multiconn serve`` asks it for the sockets to serve on (`listen`) and tells
    it when the server is up (`started`).
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.active = config is not None
        self.slot = -1
        self._sockets: list[socket.socket] = []
        self._control: socket.socket | None = None
        self._stderr_fd = -1
        self._server: Any = None
        #: The supervisor serves --metrics: count, and send it snapshots (`METRICS_PUSH`).
        self.push_metrics = False
        if config is None:
            return
        self.slot = int(config["slot"])
        self.push_metrics = bool(config.get("metrics"))
        for fd in config["listeners"]:
            sock = socket.socket(fileno=fd)
            sock.set_inheritable(False)  # not into the app's own subprocesses
            self._sockets.append(sock)
        self._control = socket.socket(fileno=config["control"])
        self._control.set_inheritable(False)
        self._stderr_fd = int(config["stderr"])
        os.set_inheritable(self._stderr_fd, False)

    def listen(self, backlog: int = DEFAULT_BACKLOG) -> list[socket.socket] | None:
        """The supervisor's sockets for this worker, listening; None outside a supervisor."""
        if not self.active:
            return None
        for sock in self._sockets:
            sock.listen(backlog)  # on a socket that already listens, this only sets the backlog
        return list(self._sockets)

    def started(self, server: Any) -> None:
        """The server listens: write to the real stderr from now on and tell the supervisor."""
        if not self.active or self._control is None:
            return
        self._server = server
        sys.stderr.flush()
        os.dup2(self._stderr_fd, 2)
        os.close(self._stderr_fd)
        self._control.sendall(b"ready\n")
        self._control.setblocking(False)
        server.loop.register(self._control, EVENT_READ, self._on_control)
        if self.push_metrics:
            server.loop.call_later(METRICS_PUSH, self._push_metrics)

    def _push_metrics(self) -> None:
        """Send the supervisor this worker's metrics; again in `METRICS_PUSH` seconds."""
        server = self._server
        if server is None or server.metrics is None or self._control is None:
            return
        self._send_metrics()
        server.loop.call_later(METRICS_PUSH, self._push_metrics)

    def _send_metrics(self) -> None:
        assert self._control is not None
        line = b"metrics " + json.dumps(self._server.metrics.snapshot(self._server)).encode() + b"\n"
        try:
            self._control.settimeout(1.0)  # a line is never sent in part: framing on the control socket
            self._control.sendall(line)
        except OSError:
            pass  # the supervisor is gone or stuck: its counts are its own problem, not the worker's
        finally:
            self._control.setblocking(False)

    def finished(self) -> None:
        """The server has stopped: a last snapshot, so that no count is lost."""
        if self.active and self.push_metrics and self._server is not None and self._control is not None:
            self._send_metrics()

    def _on_control(self, mask: int) -> None:
        assert self._control is not None
        try:
            data = self._control.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return
        self._server.loop.unregister(self._control)
        log.warning("the supervisor is gone: stopping")
        self._server.shutdown()


def worker_role() -> WorkerRole:
    """This process's `WorkerRole`: set up from `WORKER_ENV` when a supervisor started it.

    The variable is removed from the environment (the app's subprocesses are
    not workers), the log format gains the pid, and SIGHUP is ignored (it is
    the supervisor's signal; a stray one must not end a worker).
    """
    raw = os.environ.pop(WORKER_ENV, None)
    if raw is None:
        return WorkerRole(None)
    logging.basicConfig(level=logging.getLogger().level, stream=sys.stderr, format=LOG_FORMAT, force=True)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return WorkerRole(json.loads(raw))


# -- the supervisor's side -----------------------------------------------------------


def resolve(host: str | None, port: int) -> list[tuple[int, Address]]:
    """(family, address) for every address `host` resolves to, each once."""
    seen = set()
    found: list[tuple[int, Address]] = []
    for family, _, _, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE):
        if (family, address[:2]) not in seen:
            seen.add((family, address[:2]))
            found.append((family, address))
    return found


def _socket_for(family: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def claim_addresses(host: str | None, port: int) -> list[tuple[int, Address]]:
    """The addresses the workers will share, with port 0 resolved to one free port.

    Bound once without ``SO_REUSEPORT``, so that a port anybody holds (another
    supervisor's workers included, which could otherwise join the group and
    take a share of the connections) is refused here: OSError.
    """
    addresses = resolve(host, port)
    probes: list[socket.socket] = []
    try:
        for family, address in addresses:
            if probes and port == 0:
                address = (address[0], probes[0].getsockname()[1], *address[2:])
            sock = _socket_for(family, reuse_port=False)
            probes.append(sock)
            sock.bind(address)
        return [(family, probe.getsockname()) for (family, _), probe in zip(addresses, probes)]
    finally:
        for sock in probes:
            sock.close()


def bind_slot(addresses: Sequence[tuple[int, Address]]) -> list[socket.socket]:
    """One worker's sockets: bound with ``SO_REUSEPORT``, not yet listening."""
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = _socket_for(family, reuse_port=True)
            sockets.append(sock)
            sock.bind(address)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Slot:
    """A place for one worker: its sockets, its worker, its restart state."""

    def __init__(self, index: int, sockets: list[socket.socket]) -> None:
        self.index = index
        self.sockets = sockets
        self.handed_out = False  # a worker got these sockets, so they may listen
        self.worker: _Worker | None = None  # the serving (or starting) worker
        self.delay = 0.0
        self.last_death: float | None = None
        self.start_failures = 0
        self.restart_timer: TimerHandle | None = None

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class _Worker:
    """One worker process as the supervisor sees it."""

    def __init__(self, slot: _Slot, proc: subprocess.Popen[bytes], control: socket.socket, capture: int,
                 role: str, now: float) -> None:
        self.slot = slot
        self.proc = proc
        self.pid = proc.pid
        self.control: socket.socket | None = control
        self.capture = capture  # read end of its stderr until it is ready; -1 once closed
        self.role = role  # "current", "next" (started by a reload), "retiring"
        self.started_at = now
        self.ready_at: float | None = None
        self.stopping = False
        self.held: list[bytes] = []  # its output before it was ready
        self.partial = b""
        self.description: str | None = None  # from its "listening on" line
        self.control_partial = b""  # an unfinished line from its control socket
        self.metrics: dict[str, Any] | None = None  # its latest snapshot (`METRICS_PUSH`)
        self.timer: TimerHandle | None = None  # ready timeout, then kill timeout

    @property
    def ready(self) -> bool:
        return self.ready_at is not None


class Supervisor:
    """Runs `count` workers of `command` on the sockets of `slots` (see the module docstring)."""

    def __init__(self, slots: list[_Slot], addresses: list[tuple[int, Address]], command: list[str],
                 *, drain_timeout: float, app: str, metrics_address: tuple[str, int] | None = None) -> None:
        self.slots = slots
        self.addresses = addresses
        self.command = command
        self.drain_timeout = drain_timeout
        self.app = app
        self.loop = EventLoop()
        self.workers: set[_Worker] = set()
        self.status = 0
        self._stderr_fd = os.dup(2)
        self._announced = False
        self._stopping = False
        self._aborting = False
        self._reloading = False
        self._reload_pending = False
        self._next: dict[_Slot, _Worker] = {}
        self._failures = 0  # workers in a row that exited before they were ready
        self._last_failure_output: list[bytes] | None = None
        self._poll_handle: TimerHandle | None = None
        # --metrics: the counters of workers that are gone, summed, so that
        # totals never go backwards; the endpoint, on this loop.
        self.metrics_address = metrics_address
        self._retired_metrics: dict[str, Any] | None = None
        self._restarts = 0
        self.metrics_endpoint: MetricsEndpoint | None = None

    # -- running ------------------------------------------------------------

    def run(self) -> int:
        loop = self.loop
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        try:
            if self.metrics_address is not None:
                self.metrics_endpoint = MetricsEndpoint(
                    loop, bind_listeners(*self.metrics_address, 16), self.render_metrics)
                for address in self.metrics_endpoint.addresses:
                    log.info("metrics on http://%s/metrics", format_address(address))
            log.info("starting %d workers", len(self.slots))
            for slot in self.slots:
                loop.call_soon(self._restart, slot)
            self._poll_handle = loop.call_later(POLL_INTERVAL, self._poll)
            loop.run_forever()
        finally:
            for worker in list(self.workers):  # only if something went wrong: never leave one behind
                self._kill(worker)
                worker.proc.wait()
            for slot in self.slots:
                slot.close()
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()
            os.close(self._stderr_fd)
            loop.close()
        log.info("stopped")
        return self.status

    def _poll(self) -> None:
        self._reap()
        self._poll_handle = self.loop.call_later(POLL_INTERVAL, self._poll)

    # -- starting a worker ----------------------------------------------------

    def _spawn(self, slot: _Slot, role: str) -> _Worker | None:
        control, child_control = socket.socketpair()
        capture, child_stderr = os.pipe()
        fds = [sock.fileno() for sock in slot.sockets]
        config = {"slot": slot.index, "listeners": fds, "control": child_control.fileno(),
                  "stderr": self._stderr_fd, "metrics": self.metrics_address is not None}
        env = dict(os.environ)
        env[WORKER_ENV] = json.dumps(config)
        try:
            proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stderr=child_stderr, env=env,
                pass_fds=(*fds, child_control.fileno(), self._stderr_fd), start_new_session=True)
        except OSError as exc:
            control.close()
            os.close(capture)
            log.error("cannot start a worker for slot %d: %s", slot.index, exc.strerror or exc)
            return None
        finally:
            child_control.close()
            os.close(child_stderr)
        slot.handed_out = True
        worker = _Worker(slot, proc, control, capture, role, self.loop.clock())
        control.setblocking(False)
        os.set_blocking(capture, False)
        self.loop.register(control, EVENT_READ, functools.partial(self._on_control, worker))
        self.loop.register(capture, EVENT_READ, functools.partial(self._on_capture, worker))
        worker.timer = self.loop.call_later(READY_TIMEOUT, self._not_ready, worker)
        self.workers.add(worker)
        log.info("worker %d started (slot %d%s)", worker.pid, slot.index, ", reload" if role == "next" else "")
        return worker

    def _on_control(self, worker: _Worker, mask: int) -> None:
        control = worker.control
        if control is None:
            return
        try:
            data = control.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_control(worker)
            return
        *lines, worker.control_partial = (worker.control_partial + data).split(b"\n")
        for line in lines:
            if line == b"ready":
                if not worker.ready and worker in self.workers:
                    self._on_ready(worker)
            elif line.startswith(b"metrics "):
                try:
                    worker.metrics = json.loads(line[8:])
                except ValueError:
                    log.warning("worker %d sent unreadable metrics", worker.pid)

    def _close_control(self, worker: _Worker) -> None:
        if worker.control is not None:
            self.loop.unregister(worker.control)
            worker.control.close()
            worker.control = None

    def _on_ready(self, worker: _Worker) -> None:
        self._read_capture(worker)  # what it wrote before it said ready (its "listening on" line)
        worker.ready_at = self.loop.clock()
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        for line in worker.held:
            self._relay(worker, line)
        worker.held = []
        self._failures = 0
        worker.slot.start_failures = 0
        log.info("worker %d ready (slot %d)", worker.pid, worker.slot.index)
        if worker.stopping:
            return
        if worker.role == "next":
            self._maybe_finish_reload()
        else:
            self._maybe_announce()

    def _not_ready(self, worker: _Worker) -> None:
        worker.timer = None
        if worker in self.workers and not worker.ready:
            log.error("worker %d (slot %d) not ready after %g s: killing it", worker.pid, worker.slot.index,
                      READY_TIMEOUT)
            worker.held.append(f"not ready after {READY_TIMEOUT:g} s".encode())
            self._kill(worker)

    def _maybe_announce(self) -> None:
        """Once every slot serves (or keeps failing), say where: the line `multiconn.testing` waits for."""
        if self._announced:
            return
        serving = [slot.worker for slot in self.slots if slot.worker is not None and slot.worker.ready]
        failing = [slot for slot in self.slots if slot.start_failures >= SLOT_FAILURES_BEFORE_REBIND]
        if not serving or len(serving) + len(failing) < len(self.slots):
            return
        self._announced = True
        description = next((w.description for w in serving if w.description), None) or f"app {self.app}"
        for _, address in self.addresses:
            log.info("listening on %s (%s, %d workers)", format_address(address), description, len(self.slots))
        if self._reload_pending:
            self._reload_pending = False
            self._begin_reload()

    # -- a worker's stderr until it is ready ------------------------------------

    def _on_capture(self, worker: _Worker, mask: int) -> None:
        self._read_capture(worker)

    def _read_capture(self, worker: _Worker) -> None:
        while worker.capture >= 0:
            try:
                data = os.read(worker.capture, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                if worker.partial:
                    self._take_line(worker, worker.partial)
                    worker.partial = b""
                self.loop.unregister(worker.capture)
                os.close(worker.capture)
                worker.capture = -1
                return
            *lines, worker.partial = (worker.partial + data).split(b"\n")
            for line in lines:
                self._take_line(worker, line)

    def _take_line(self, worker: _Worker, line: bytes) -> None:
        match = _LISTENING.search(line)
        if match:  # the supervisor says it, once, for all of them
            if worker.description is None:
                worker.description = match.group(2).decode("utf-8", "replace")
        elif worker.ready:
            self._relay(worker, line)  # from its handler pool's processes, which kept the pipe
        else:
            worker.held.append(line)

    def _relay(self, worker: _Worker, line: bytes, level: int = logging.WARNING) -> None:
        """A line of a worker's stderr: its log lines as they are, anything else (a usage
        error) in a log line of ours that names the worker."""
        if _LOG_LINE.match(line):
            self._write(line)
        elif line.strip():
            log.log(level, "worker %d: %s", worker.pid, line.decode("utf-8", "replace").rstrip())

    def _write(self, line: bytes) -> None:
        sys.stderr.flush()
        data = line + b"\n"
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(2, data):]

    # -- exits and restarts --------------------------------------------------

    def _reap(self) -> None:
        for worker in list(self.workers):
            if worker in self.workers:
                returncode = worker.proc.poll()
                if returncode is not None:
                    self._exited(worker, returncode)

    def _exited(self, worker: _Worker, returncode: int) -> None:
        self.workers.discard(worker)
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        while worker.control is not None:  # its last words (a final metrics snapshot), then EOF
            control = worker.control
            control.setblocking(True)
            control.settimeout(0.2)
            self._on_control(worker, EVENT_READ)
            if worker.control is control:
                try:
                    control.setblocking(False)
                except OSError:
                    pass
                break
        self._retire_metrics(worker)
        self._close_control(worker)
        self._read_capture(worker)  # all it wrote is in the pipe (unless its children keep it open)
        if worker.capture >= 0 and worker.partial:
            self._take_line(worker, worker.partial)
            worker.partial = b""
        slot = worker.slot
        status = describe_status(returncode)
        expected = worker.stopping or self._stopping
        if expected:
            level = logging.INFO if returncode in (0, -signal.SIGTERM) else logging.WARNING
            log.log(level, "worker %d (slot %d) %s", worker.pid, slot.index, status)
        if self._stopping:
            if not self.workers:
                self.loop.stop()
            return
        if worker.role == "retiring" or (expected and slot.worker is not worker):
            return
        if not worker.ready:
            self._start_failed(worker, status, returncode)
            return
        if not expected:
            log.warning("worker %d (slot %d) %s", worker.pid, slot.index, status)
        if worker.role == "next":
            self._abort_reload(f"new worker {worker.pid} {status}")
            return
        if slot.worker is worker:
            slot.worker = None
        if self._reloading and slot in self._next:
            return  # its successor is on the way
        self._back_off(slot)
        self._schedule_restart(slot)

    def _start_failed(self, worker: _Worker, status: str, returncode: int) -> None:
        slot = worker.slot
        output = [line for line in worker.held if line.strip()]
        reason = output[-1].decode("utf-8", "replace").strip() if output else "no output"
        if output != self._last_failure_output:  # all it said, unless the previous one said the same
            for line in worker.held:
                self._relay(worker, line, logging.ERROR)
            self._last_failure_output = output
        log.error("worker %d (slot %d) could not start: %s: %s", worker.pid, slot.index, status, reason)
        if worker.role == "next":
            self._abort_reload(f"new worker {worker.pid} could not start")
            return
        if slot.worker is worker:
            slot.worker = None
        self._count_failure(f"{status}: {reason}", returncode if returncode > 0 else 1)
        if self._stopping:
            return
        slot.start_failures += 1
        if slot.start_failures % SLOT_FAILURES_BEFORE_REBIND == 0:
            self._rebind(slot)
        self._back_off(slot)
        self._schedule_restart(slot)
        self._maybe_announce()

    def _count_failure(self, reason: str, status: int) -> None:
        """A worker could not start: after `MAX_START_FAILURES` in a row with none serving, give up."""
        self._failures += 1
        if self._failures >= MAX_START_FAILURES and not any(w.ready for w in self.workers):
            log.error("workers cannot start (%d attempts in a row failed; the last: %s): giving up",
                      self._failures, reason)
            self.status = status
            self._begin_stop()

    def _rebind(self, slot: _Slot) -> None:
        """The slot has had no worker for a while: let the other workers take its share."""
        if not slot.handed_out:
            return
        try:
            fresh = bind_slot(self.addresses)
        except OSError as exc:
            log.error("slot %d: cannot bind a fresh socket: %s", slot.index, exc.strerror or exc)
            return
        log.warning("slot %d has no worker: its socket is closed, so that new connections go to the "
                    "other workers until one starts", slot.index)
        slot.close()
        slot.sockets = fresh
        slot.handed_out = False

    def _schedule_restart(self, slot: _Slot) -> None:
        if slot.restart_timer is not None or self._stopping:
            return
        if slot.delay:
            log.warning("restarting slot %d in %g s (its workers keep dying)", slot.index, slot.delay)
        else:
            log.info("restarting slot %d", slot.index)
        slot.restart_timer = self.loop.call_later(slot.delay, self._restart, slot)

    # -- metrics ----------------------------------------------------------------

    def _retire_metrics(self, worker: _Worker) -> None:
        """Keep the counters of a worker that is gone (not its gauges: nothing is open there now)."""
        if worker.metrics is None:
            return
        counters = {key: value for key, value in worker.metrics.items() if key != "gauges"}
        retired = self._retired_metrics
        self._retired_metrics = counters if retired is None else merge(retired, counters)
        worker.metrics = None

    def render_metrics(self) -> str:
        """The whole server: every worker's counters, the gone ones' included, summed."""
        total = self._retired_metrics
        live = sorted((w for w in self.workers if w.metrics is not None), key=lambda w: w.slot.index)
        for worker in live:
            total = worker.metrics if total is None else merge(total, worker.metrics)  # type: ignore[arg-type]
        if total is None:
            total = empty_snapshot()
        extra = [
            "# HELP multiconn_worker_restarts_total Worker processes started again after one exited.",
            "# TYPE multiconn_worker_restarts_total counter",
            f"multiconn_worker_restarts_total {self._restarts}",
            "# HELP multiconn_worker_connections_open Connections open now, per worker.",
            "# TYPE multiconn_worker_connections_open gauge",
        ]
        for worker in live:
            open_now = worker.metrics.get("gauges", {}).get("open", 0)  # type: ignore[union-attr]
            extra.append(f'multiconn_worker_connections_open{{slot="{worker.slot.index}",pid="{worker.pid}"}} '
                         f"{open_now}")
        return render_snapshot(total, extra)

    def _restart(self, slot: _Slot) -> None:
        slot.restart_timer = None
        if self._stopping or slot.worker is not None or (self._reloading and slot in self._next):
            return
        if slot.handed_out:
            self._restarts += 1
        slot.worker = self._spawn(slot, "current")
        if slot.worker is None:
            self._count_failure("cannot start a worker", 1)
            if not self._stopping:
                self._back_off(slot)
                self._schedule_restart(slot)

    def _back_off(self, slot: _Slot) -> None:
        """A worker of `slot` died: at once the first time, then twice as long each time (up to
        `MAX_BACKOFF`) while they keep dying within `BACKOFF_RESET` of the previous death."""
        now = self.loop.clock()
        if slot.last_death is None or now - slot.last_death >= BACKOFF_RESET:
            slot.delay = 0.0
        else:
            slot.delay = min(max(slot.delay * 2, FIRST_BACKOFF), MAX_BACKOFF)
        slot.last_death = now

    # -- reload ----------------------------------------------------------------

    def _on_reload_signal(self) -> None:
        if self._stopping:
            return
        if self._reloading or not self._announced:
            log.info("SIGHUP: %s: reloading after it", "a reload is running" if self._reloading else "starting")
            self._reload_pending = True
            return
        self._begin_reload()

    def _begin_reload(self) -> None:
        self._reloading = True
        log.info("SIGHUP: reloading: starting %d new workers", len(self.slots))
        for slot in self.slots:
            worker = self._spawn(slot, "next")
            if worker is None:
                self._abort_reload(f"cannot start a worker for slot {slot.index}")
                return
            self._next[slot] = worker

    def _maybe_finish_reload(self) -> None:
        if not self._reloading or not all(w.ready for w in self._next.values()):
            return
        old = []
        for slot, worker in self._next.items():
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
            previous, slot.worker = slot.worker, worker
            worker.role = "current"
            slot.delay = 0.0
            slot.last_death = None
            slot.start_failures = 0
            if previous is not None:
                old.append(previous)
        self._next = {}
        self._reloading = False
        log.info("reloaded: %d new workers serve; the old ones (%s) stop accepting and drain",
                 len(self.slots), ", ".join(str(w.pid) for w in old) or "none")
        for worker in old:
            worker.role = "retiring"
            self._stop(worker)
        if self._reload_pending:
            self._reload_pending = False
            self._begin_reload()

    def _abort_reload(self, reason: str) -> None:
        log.error("reload failed (%s): the old workers keep serving", reason)
        for worker in self._next.values():
            worker.role = "retiring"
            if worker in self.workers:
                self._stop(worker)
        self._next = {}
        self._reloading = False
        self._reload_pending = False
        for slot in self.slots:
            if slot.worker is None:
                self._schedule_restart(slot)

    # -- stopping ----------------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stopping:
            self._abort(name)
            return
        log.info("%s: stopping %d workers (up to %g s to drain)", name, len(self.workers), self.drain_timeout)
        self._begin_stop()

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._reloading = False
        self._next = {}
        for slot in self.slots:
            if slot.restart_timer is not None:
                slot.restart_timer.cancel()
                slot.restart_timer = None
            slot.close()  # the workers close theirs as they stop: then the port refuses
        for worker in list(self.workers):
            self._stop(worker)
        if not self.workers:
            self.loop.stop()

    def _stop(self, worker: _Worker) -> None:
        """SIGTERM: it stops accepting and drains; killed if still there after the drain timeout."""
        worker.stopping = True
        self._signal(worker, signal.SIGTERM)
        if worker.timer is not None:
            worker.timer.cancel()
        worker.timer = self.loop.call_later(self.drain_timeout + STOP_GRACE, self._overdue, worker)

    def _overdue(self, worker: _Worker) -> None:
        worker.timer = None
        if worker in self.workers:
            log.warning("worker %d did not stop within %g s: killing it", worker.pid,
                        self.drain_timeout + STOP_GRACE)
            if self._stopping:
                self.status = self.status or 1
            self._kill(worker)

    def _abort(self, name: str) -> None:
        if self._aborting:
            return
        self._aborting = True
        self.status = self.status or 1
        log.warning("second %s: aborting %d workers", name, len(self.workers))
        for worker in list(self.workers):
            self._signal(worker, signal.SIGTERM)  # their second signal: they abort at once
            if worker.timer is not None:
                worker.timer.cancel()
            worker.timer = self.loop.call_later(ABORT_GRACE, self._overdue, worker)

    def _signal(self, worker: _Worker, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signum)

    def _kill(self, worker: _Worker) -> None:
        """SIGKILL to the worker and whatever it started (its process group)."""
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            self._signal(worker, signal.SIGKILL)


def _checked_argv(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The command line `args` came from, for the workers; a usage error if they are not from it."""
    argv = sys.argv[1:]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            again = parser.parse_args(argv)
    except SystemExit:
        again = None
    if again is None or vars(again) != vars(args):
        parser.error("--workers needs to be given on the command line (multiconn serve --workers N)")
    return argv


def run_supervisor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``multiconn serve --workers N`` with N > 1: bind, start the workers, supervise until stopped."""
    logging.basicConfig(level=logging.getLogger().level, stream=sys.stderr, format=LOG_FORMAT, force=True)
    argv = _checked_argv(args, parser)
    slots: list[_Slot] = []
    try:
        addresses = claim_addresses(args.host, args.port)
        for index in range(args.workers):
            slots.append(_Slot(index, bind_slot(addresses)))
    except (OSError, UnicodeError) as exc:
        for slot in slots:
            slot.close()
        reason = getattr(exc, "strerror", None) or "invalid host name"
        print(f"multiconn serve: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    port = addresses[0][1][1]
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]  # as multiprocessing does
    command = [sys.executable, *flags, "-m", "multiconn", *argv,
               "--workers", "1", "--port", str(port)]
    supervisor = Supervisor(slots, addresses, command, drain_timeout=args.drain_timeout, app=args.app,
                            metrics_address=getattr(args, "metrics", None))
    return supervisor.run()

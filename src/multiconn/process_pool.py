"""The process pool: CPU-bound handlers on every core, and a pool that heals.

``concurrent.futures.ProcessPoolExecutor`` is not used, on purpose: when one of
its workers dies, every pending future fails (``BrokenProcessPool``), and its
futures say nothing of which worker ran what. Here each worker process runs
one request at a time over a pipe of its own, which the server's event loop
watches like any socket, so:

* the parent always knows which request a worker is running: when a worker
  dies (``os._exit``, a signal, the OOM killer), only that request fails, with
  ``handler-error`` naming the exit code or signal; every other request waits
  in the parent's queue and is answered by the others and the replacement;
* a request past its deadline is answered ``handler-error`` and its worker is
  killed (SIGKILL) and replaced;
* an answer comes back as readiness on the pipe: no thread, no polling.

Workers are started with an explicit start method, ``forkserver`` where the
platform has it (else ``spawn``), never by forking the running server. They
load the application by unpickling it, which imports it by name: the app must
be importable (``--app module:attr``) and picklable, and both are checked at
start (`ProcessPoolResponder.start` raises `AppLoadError`), so that ``serve``
refuses at once instead of failing every request later.

A worker that dies is replaced within `RESTART_DELAY`; one that keeps dying
(more than the pool's size in `DEATH_WINDOW` seconds) is replaced with a delay
that doubles up to `MAX_RESTART_DELAY`. Workers ignore SIGINT and exit quietly
when their pipe closes, so a Ctrl-C or a shutdown prints no traceback.

Messages are pickles on a ``multiprocessing`` pipe: ``(header, content)`` in,
``(header, content)`` out (the worker builds the error frame itself when the
handler fails). A worker is sent a request only while idle, so the parent's
blocking ``send_bytes`` finds it reading.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, cast

from .errors import AppLoadError
from .loop import EVENT_READ
from .protocol import ErrorCode, Frame
from .responders import App, PooledResponder, app_name, deadline_answer, run_handler

if TYPE_CHECKING:
    from .session import Job

log = logging.getLogger("multiconn.server")

#: How long the first workers may take to start and load the app.
START_TIMEOUT = 30.0
RESTART_DELAY = 0.05
MAX_RESTART_DELAY = 5.0
DEATH_WINDOW = 10.0
#: Start methods in order of preference: never "fork" (a running loop's threads and locks).
START_METHODS = ("forkserver", "spawn")


def default_process_pool_size() -> int:
    return os.cpu_count() or 1


def check_picklable(app: Any) -> bytes:
    """The app pickled, or `AppLoadError` saying why the process pool cannot use it."""
    try:
        return pickle.dumps(app)
    except Exception as exc:
        raise AppLoadError(
            f"the app {app_name(app)} cannot be pickled, so the process pool cannot send it to its "
            f"workers (it must be importable by name, as --app module:attr): {type(exc).__name__}: {exc}"
        ) from None


def _start_context() -> Any:
    for method in START_METHODS:
        if method in multiprocessing.get_all_start_methods():
            return multiprocessing.get_context(method)
    raise RuntimeError("no safe multiprocessing start method (forkserver or spawn) on this platform")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# -- the worker process --------------------------------------------------------------


def worker_main(conn: Connection, app_blob: bytes, log_level: int) -> None:
    """A worker process: load the app, then answer requests until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        app = pickle.loads(app_blob)
    except BaseException as exc:
        _send(conn, ("error", f"{type(exc).__name__}: {exc}"))
        return
    if not _send(conn, ("ready", os.getpid())):
        return
    while True:
        try:
            header, content, connection = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the server closed the pipe: stop quietly
        request = Frame(header, content)
        if connection is not None:
            request.connection = connection
        response = run_handler(app, None, None, None, request)
        if not _send(conn, (response.header, bytes(response.content))):
            return


def _send(conn: Connection, message: Any) -> bool:
    try:
        conn.send_bytes(pickle.dumps(message))
        return True
    except (OSError, ValueError):
        return False


# -- the parent's side -------------------------------------------------------------


class _ProcessWorker:
    __slots__ = ("process", "conn", "ready", "job", "started", "killed")

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.ready = False
        self.job: Job | None = None
        self.started = 0.0
        self.killed = False


class ProcessPoolResponder(PooledResponder):
    """`size` worker processes, one request each at a time (see the module's docstring)."""

    kind = "process"

    def __init__(self, app: App, size: int | None = None, *, handler_timeout: float, max_queued: int,
                 log_level: int = logging.WARNING) -> None:
        super().__init__(app, handler_timeout=handler_timeout, max_queued=max_queued)
        self.size = self.capacity = size or default_process_pool_size()
        self.log_level = log_level
        self._app_blob = check_picklable(app)
        self._context = _start_context()
        self._workers: list[_ProcessWorker] = []
        self._waiting: deque[Job] = deque()
        self._deaths: deque[float] = deque()
        self._restart_delay = RESTART_DELAY
        self.restarts = 0

    # -- starting ---------------------------------------------------------

    def _start_workers(self) -> None:
        """Start every worker and wait until each has loaded the app (or one failed)."""
        workers = [self._spawn() for _ in range(self.size)]
        deadline = time.monotonic() + START_TIMEOUT
        pending = {worker.conn: worker for worker in workers}
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AppLoadError(f"the process pool's workers did not start within {START_TIMEOUT:g} s")
                # wait() returns some of the objects it was given: here, pipes.
                for conn in cast("list[Connection]", wait(list(pending), remaining)):
                    worker = pending.pop(conn)
                    message = self._receive(worker)
                    if message is None:
                        worker.process.join(1.0)
                        raise AppLoadError(f"a process pool worker {_describe_exit(worker.process.exitcode)} at start")
                    if message[0] == "error":
                        raise AppLoadError(f"a process pool worker cannot load the app: {message[1]}")
                    worker.ready = True
        except BaseException:
            for worker in workers:
                self._stop_worker(worker, kill=True)
            raise
        for worker in workers:
            self._adopt(worker)

    def _spawn(self) -> _ProcessWorker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(target=worker_main, args=(child_end, self._app_blob, self.log_level),
                                        name="multiconn-handler", daemon=True)
        process.start()
        child_end.close()
        return _ProcessWorker(process, parent_end)

    def _adopt(self, worker: _ProcessWorker) -> None:
        assert self.loop is not None
        self._workers.append(worker)
        self.loop.register(worker.conn, EVENT_READ, lambda mask: self._on_readable(worker))
        if worker.ready:
            self._dispatch()

    @staticmethod
    def _receive(worker: _ProcessWorker) -> Any:
        try:
            return pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            return None

    # -- requests ---------------------------------------------------------

    def _submit(self, job: "Job") -> None:
        self._waiting.append(job)
        self._dispatch()

    def _dispatch(self) -> None:
        waiting = self._waiting
        for worker in self._workers:
            if not waiting:
                return
            if not worker.ready or worker.job is not None:
                continue
            while waiting:
                job = waiting.popleft()
                if job.cancelled:
                    continue
                request = job.request
                try:
                    worker.conn.send_bytes(pickle.dumps(
                        (request.header, bytes(request.content), getattr(request, "connection", None))))
                except OSError:
                    waiting.appendleft(job)  # the worker is gone: its EOF comes next
                    worker.ready = False
                    break
                worker.job = job
                worker.started = job.started = time.monotonic()
                break

    def _on_readable(self, worker: _ProcessWorker) -> None:
        message = self._receive(worker)
        if message is None:
            self._worker_died(worker)
            return
        if not worker.ready:  # a replacement reporting in
            if message[0] == "error":
                log.error("a process pool worker cannot load the app: %s", message[1])
                self._worker_died(worker)
                return
            worker.ready = True
        else:
            job, worker.job = worker.job, None
            if job is not None:
                header, content = message
                self._complete(job, Frame(header, content))
        self._dispatch()

    def _cancel(self, job: "Job") -> None:
        pass  # a waiting job is skipped when its turn comes; a running one finishes unobserved

    # -- deadlines and deaths ---------------------------------------------

    def _expire(self, now: float) -> None:
        timeout = self.handler_timeout
        for worker in self._workers:
            job = worker.job
            if job is None or worker.killed or now - worker.started < timeout:
                continue
            worker.killed = True
            worker.ready = False  # nothing more for it: its EOF comes next
            log.warning("handler %s ran longer than %g s in worker process %d: killing it",
                        app_name(self.app), timeout, worker.process.pid)
            self._complete(job, deadline_answer(job.request, timeout, "worker process killed"))
            worker.job = None
            try:
                worker.process.kill()
            except OSError:
                pass  # already gone: its EOF is on its way

    def _worker_died(self, worker: _ProcessWorker) -> None:
        assert self.loop is not None
        self.loop.unregister(worker.conn)
        worker.conn.close()
        worker.process.join(1.0)
        how = _describe_exit(worker.process.exitcode)
        if worker in self._workers:
            self._workers.remove(worker)
        job, worker.job = worker.job, None
        if job is not None:
            log.warning("worker process %d %s while running a request", worker.process.pid, how)
            self._complete(job, Frame.error(
                ErrorCode.HANDLER_ERROR,
                f"the worker process running this request {how}",
                id=job.request.header.get("id"),
            ))
        elif not worker.killed and not self._closed:
            log.warning("worker process %d %s", worker.process.pid, how)
        if self._closed:
            return
        self.loop.call_later(self._next_restart_delay(), self._replace)

    def _next_restart_delay(self) -> float:
        now = time.monotonic()
        deaths = self._deaths
        deaths.append(now)
        while deaths and now - deaths[0] > DEATH_WINDOW:
            deaths.popleft()
        if len(deaths) > self.size:
            self._restart_delay = min(MAX_RESTART_DELAY, self._restart_delay * 2)
            log.warning("process pool workers keep dying (%d in %g s): next restart in %g s",
                        len(deaths), DEATH_WINDOW, self._restart_delay)
        else:
            self._restart_delay = RESTART_DELAY
        return self._restart_delay

    def _replace(self) -> None:
        if self._closed:
            return
        self.restarts += 1
        try:
            worker = self._spawn()
        except OSError as exc:
            log.error("cannot start a process pool worker: %s", exc)
            self.loop.call_later(self._next_restart_delay(), self._replace)  # type: ignore[union-attr]
            return
        self._adopt(worker)  # ready once it reports in (`_on_readable`)

    # -- stopping ---------------------------------------------------------

    def close(self, timeout: float) -> None:
        super().close(timeout)
        workers, self._workers = self._workers, []
        for worker in workers:
            if self.loop is not None:
                self.loop.unregister(worker.conn)
            worker.conn.close()  # the worker reads EOF and exits
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            self._stop_worker(worker, kill=True)

    @staticmethod
    def _stop_worker(worker: _ProcessWorker, *, kill: bool) -> None:
        if worker.process.is_alive() and kill:
            worker.process.kill()
        worker.process.join(1.0)
        try:
            worker.conn.close()
        except OSError:
            pass
        try:
            worker.process.close()
        except ValueError:
            pass  # still running (it ignored SIGKILL?): leave it to the OS

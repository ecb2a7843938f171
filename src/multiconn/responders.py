"""Responders: who runs the application's handler, and when its answer comes back.

A session hands each request to its server's responder. The inline responder
answers at once, in the event loop: no thread hop, no queue, no object per
request, which is why a fast handler is cheap. A handler that waits (a
database, another service) or computes would stall every connection there, so
the pooled responders run it elsewhere and answer later:

* `ThreadPoolResponder`: a fixed set of threads (I/O-bound, blocking handlers);
* `AsyncResponder`: one asyncio event loop in a helper thread, for
  ``async def`` handlers (many waiting requests cost a task each, not a thread);
* `multiconn.process_pool.ProcessPoolResponder`: worker processes, for
  CPU-bound handlers (the GIL does not share one core's worth of Python).

Theory of operation (pooled)
----------------------------
Everything a pool shares with the loop goes through two doors. Requests go in
with `submit(job)` on the loop's thread. Answers come back, from whatever
thread produced them, into one deque (`_completed`), and the first answer
after the loop last looked wakes it once (`call_soon_threadsafe`, the loop's
self-pipe); the loop then completes every answer queued by then, in one
callback. No polling, and a burst of answers costs one wake-up.

Bounds: each connection has at most `Limits.max_in_flight` jobs (the session
counts them); the whole server has at most `Limits.max_queued` waiting for a
worker (`capacity` more may be running). At that many the responder tells the
server (`on_saturated(True)`), which stops reading every connection until the
backlog falls to half (`on_saturated(False)`). Nothing is dropped and nothing
grows without bound.

Deadlines: a sweep on the loop, every quarter of `handler_timeout` (at most
0.25 s), finds jobs running past it. Their answer is ``handler-error`` at
once; what ran them is dealt with by the pool (a thread is abandoned and
replaced, a process killed and replaced, a task cancelled).

Cancellation: when a connection goes away, its jobs are cancelled: those not
started never run, an async one in progress is cancelled, and what a thread or
process was running finishes unobserved.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import queue
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Protocol

from .errors import ProtocolError
from .protocol import ErrorCode, Frame
from .watchdog import HandlerClock, HandlerTimeout

if TYPE_CHECKING:
    from .loop import EventLoop, TimerHandle
    from .metrics import InlineTiming
    from .session import Job

log = logging.getLogger("multiconn.server")

App = Callable[[Frame], Any]

#: Handler pool kinds, as ``--handler-pool`` spells them.
POOL_KINDS = ("inline", "thread", "process")
DEFAULT_THREAD_POOL_SIZE = 32
#: Async event loops ``--async-loop`` accepts.
ASYNC_LOOPS = ("asyncio", "uvloop")
_asyncio_timeout: Any = getattr(asyncio, "timeout", None)

#: Longest interval between two deadline sweeps.
DEADLINE_SWEEP = 0.25


# -- running one handler call -----------------------------------------------------


def app_name(app: Any) -> str:
    return getattr(app, "__qualname__", None) or repr(app)


def is_async_app(app: Any) -> bool:
    """True for an ``async def`` function, a callable object whose ``__call__`` is
    one, or a ``functools.partial`` of either."""
    while hasattr(app, "func") and hasattr(app, "args"):  # functools.partial
        app = app.func
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(getattr(app, "__call__", None))


def _not_a_frame(response: Any) -> TypeError:
    if inspect.isawaitable(response):
        if inspect.iscoroutine(response):
            response.close()  # never awaited: say so once, here, not as a RuntimeWarning
        return TypeError("handler returned an awaitable; declare it `async def` so the server awaits it")
    return TypeError(f"handler returned {type(response).__name__}, not a Frame")


def _with_id(request: Frame, response: Frame) -> Frame:
    """`response`, carrying the request's id (applications need not copy it)."""
    request_id = request.header.get("id")
    if request_id is not None and response.header.get("id") != request_id:
        response = Frame({**response.header, "id": request_id}, response.content)
    return response


def error_answer(app: Any, request: Frame, exc: BaseException) -> Frame:
    """The error frame that takes a failed handler call's place."""
    request_id = request.header.get("id")
    if isinstance(exc, ProtocolError):
        code = exc.code if exc.code not in ErrorCode.FATAL else ErrorCode.HANDLER_ERROR
        return Frame.error(code, exc.message, id=request_id)
    if isinstance(exc, HandlerTimeout):
        log.warning("handler %s interrupted: %s", app_name(app), exc)
        return Frame.error(ErrorCode.HANDLER_ERROR, str(exc), id=request_id)
    # One line per failure; the traceback too at --log-level debug.
    log.warning("handler %s raised %s: %s", app_name(app), type(exc).__name__, exc,
                exc_info=log.isEnabledFor(logging.DEBUG))
    return Frame.error(ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}", id=request_id)


class ServerStatus:
    """What the server itself says about its state (a record, read per request)."""

    __slots__ = ("draining",)

    def __init__(self) -> None:
        #: Set once the server is shutting down: health checks answer "draining".
        self.draining = False


#: A request with this content type, encoding ``binary`` and no content is a
#: health check, answered by the server whatever the app (docs/protocol.md).
HEALTH_CONTENT_TYPE = "binary/health"


def health_answer(request: Frame, status: ServerStatus) -> Frame | None:
    """The server's answer to a health check, or None if `request` is not one."""
    header = request.header
    if header["content-type"] != HEALTH_CONTENT_TYPE or header["content-encoding"] != "binary" or request.content:
        return None
    return Frame.binary(b"draining" if status.draining else b"ok", id=header.get("id"))


def run_handler(app: App, clock: HandlerClock | None, status: ServerStatus | None,
                timing: "InlineTiming | None", request: Frame) -> Frame:
    """The answer to one request: the app's, or the error frame in its place.

    With a `clock`, the call is marked for the inline watchdog; with a `status`,
    health checks are answered here; with a `timing` (``--metrics``), the
    answer is counted and timed. One flat function, because the inline
    responder calls it for every request: the timing was first a wrapper
    around it, whose call was an eighth of what ``--metrics`` added to a
    request (benchmarks/results/micro.md).
    """
    try:
        content_type = request.header["content-type"]
        if content_type == "text/json":
            request.json_content()  # bad-content is checked for every app
        if content_type != HEALTH_CONTENT_TYPE or status is None or (
                response := health_answer(request, status)) is None:
            if clock is None:
                response = app(request)
            else:
                clock.calls += 1  # see HandlerClock
                clock.running = True
                try:
                    response = app(request)
                finally:
                    clock.running = False
            if not isinstance(response, Frame):
                raise _not_a_frame(response)
    except Exception as exc:
        response = error_answer(app, request, exc)
    else:
        request_id = request.header.get("id")
        if request_id is not None and response.header.get("id") != request_id:
            response = Frame({**response.header, "id": request_id}, response.content)
    if timing is not None:  # see InlineTiming
        pending = timing.pending
        pending.append(timing.clock() - timing.loop.now)
        if len(pending) >= timing.fold_at:
            timing.fold()
        if response.header.get("content-type") == "text/json":
            timing.count_error(response)
    return response


async def run_async_handler(app: App, request: Frame, timeout: float, job: Any = None) -> Frame:
    """`run_handler` for an ``async def`` app, bounded by `timeout`."""
    if job is not None:
        job.started = time.monotonic()
    try:
        if request.header["content-type"] == "text/json":
            request.json_content()
        if _asyncio_timeout is not None:  # Python 3.11+: no second task per request
            async with _asyncio_timeout(timeout):
                response = await app(request)
        else:
            response = await asyncio.wait_for(app(request), timeout)
        if not isinstance(response, Frame):
            raise _not_a_frame(response)
    except asyncio.TimeoutError:
        log.warning("handler %s cancelled: ran longer than %g s", app_name(app), timeout)
        return deadline_answer(request, timeout, "cancelled")
    except Exception as exc:
        return error_answer(app, request, exc)
    return _with_id(request, response)


def deadline_answer(request: Frame, timeout: float, what: str) -> Frame:
    return Frame.error(ErrorCode.HANDLER_ERROR, f"handler ran longer than {timeout:g} s ({what})",
                       id=request.header.get("id"))


# -- the interface a session and a server see ---------------------------------------


class Responder(Protocol):
    """Turns requests into answers. See the module's docstring."""

    #: True: `respond` answers at once. False: `submit` a job, answered later.
    inline: bool

    def start(self, loop: "EventLoop", on_saturated: Callable[[bool], None]) -> None: ...
    def respond(self, request: Frame) -> Frame: ...
    def submit(self, job: "Job") -> None: ...
    def cancel(self, job: "Job") -> None: ...
    def close(self, timeout: float) -> None: ...


class InlineResponder:
    """Runs the handler in the loop, at once: the fast path.

    Each call is marked in `clock` so that the SIGALRM watchdog
    (`multiconn.watchdog`) can interrupt a handler that hangs.
    """

    inline = True

    def __init__(self, app: App, status: ServerStatus | None = None) -> None:
        self.app = app
        self.clock = HandlerClock()
        self.status = status if status is not None else ServerStatus()
        #: ``respond(request) -> Frame``: `run_handler` bound to the app and the
        #: clock (a C partial: the hot path pays one call for it, not two).
        self.respond: Callable[[Frame], Frame] = functools.partial(run_handler, app, self.clock, self.status, None)

    def time_requests(self, timing: "InlineTiming") -> None:
        """Count and time every answer from now on (``--metrics``)."""
        self.respond = functools.partial(run_handler, self.app, self.clock, self.status, timing)

    def start(self, loop: "EventLoop", on_saturated: Callable[[bool], None]) -> None:
        pass

    def submit(self, job: "Job") -> None:
        raise NotImplementedError("the inline responder answers at once (respond)")

    def cancel(self, job: "Job") -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


class PooledResponder:
    """What every pool shares: counting, the completion door, deadlines, saturation."""

    inline = False
    #: Jobs that may run at once (they are not counted as queued).
    capacity = 0
    kind = "pool"

    def __init__(self, app: App, *, handler_timeout: float, max_queued: int) -> None:
        self.app = app
        self.handler_timeout = handler_timeout
        self.max_queued = max_queued
        self.loop: EventLoop | None = None
        self._on_saturated: Callable[[bool], None] = lambda saturated: None
        #: True from the moment `max_queued` jobs wait until half of them are gone.
        self.saturated = False
        self._saturations = 0
        #: Sessions with requests they could not submit while saturated.
        self._waiting_sessions: list[Any] = []
        #: Jobs submitted and neither answered nor cancelled.
        self.outstanding = 0
        self._completed: deque[tuple[Job, Frame]] = deque()
        self._wake_pending = False
        self._deadline_timer: TimerHandle | None = None
        self._closed = False
        #: `multiconn.metrics.ServerMetrics` when the server counts, else None.
        self.metrics: Any = None

    # -- the loop's side --------------------------------------------------

    def start(self, loop: "EventLoop", on_saturated: Callable[[bool], None]) -> None:
        self.loop = loop
        self._on_saturated = on_saturated
        self._start_workers()
        self._schedule_deadline_sweep()

    def respond(self, request: Frame) -> Frame:
        raise NotImplementedError("a pool answers later (submit)")

    def submit(self, job: "Job") -> None:
        self.outstanding += 1
        job.submitted = time.monotonic()
        self._submit(job)
        if not self.saturated and self.outstanding >= self.max_queued + self.capacity:
            self.saturated = True
            self._saturations += 1
            # The first time at WARNING; a server that lives at its limit would say it forever.
            log.log(logging.WARNING if self._saturations == 1 else logging.DEBUG,
                    "handler queue full (%d waiting, --max-queued): pausing reads on every connection "
                    "(%d times so far)", self.outstanding - self.capacity, self._saturations)
            self._on_saturated(True)

    def wait_for_room(self, session: Any) -> None:
        """`session` has requests to submit once the queue is no longer full."""
        self._waiting_sessions.append(session)

    def cancel(self, job: "Job") -> None:
        if job.cancelled or job.response is not None:
            return
        job.cancelled = True
        self._cancel(job)
        self._settled()

    def _complete(self, job: "Job", response: Frame) -> None:
        """Answer `job` (on the loop's thread), unless it was answered or cancelled."""
        if job.cancelled or job.response is not None:
            return
        self._settled()
        metrics = self.metrics
        if metrics is not None:
            now = time.monotonic()
            metrics.answered(response, now - job.submitted)
            if job.started:
                metrics.pool_wait.observe(max(0.0, job.started - job.submitted))
        job.done(response)

    def _settled(self) -> None:
        self.outstanding -= 1
        if self.saturated and self.outstanding <= (self.max_queued // 2) + self.capacity:
            self.saturated = False
            log.debug("handler queue drained: reading again")
            waiting, self._waiting_sessions = self._waiting_sessions, []
            for session in waiting:
                session.room_available()
            self._on_saturated(False)

    def _drain_completed(self) -> None:
        self._wake_pending = False
        completed = self._completed
        while completed:
            job, response = completed.popleft()
            self._complete(job, response)

    def _schedule_deadline_sweep(self) -> None:
        if self._closed or self.loop is None:
            return
        interval = min(DEADLINE_SWEEP, self.handler_timeout / 4)
        self._deadline_timer = self.loop.call_later(interval, self._deadline_sweep)

    def _deadline_sweep(self) -> None:
        self._expire(time.monotonic())
        self._schedule_deadline_sweep()

    # -- any thread's side ------------------------------------------------

    def _post(self, job: "Job", response: Frame) -> None:
        """Hand an answer to the loop: safe from any thread."""
        self._completed.append((job, response))
        if not self._wake_pending:
            self._wake_pending = True
            loop = self.loop
            if loop is not None:
                loop.call_soon_threadsafe(self._drain_completed)

    # -- what each pool provides ------------------------------------------

    def _start_workers(self) -> None:
        raise NotImplementedError

    def _submit(self, job: "Job") -> None:
        raise NotImplementedError

    def _cancel(self, job: "Job") -> None:
        """Keep a cancelled job from running, or stop it (it is marked cancelled)."""

    def _expire(self, now: float) -> None:
        """Answer jobs running past the deadline, and deal with what ran them."""

    def close(self, timeout: float) -> None:
        self._closed = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()


class _ThreadWorker:
    """A pool thread's record: what it runs now, since when, and whether it was given up."""

    __slots__ = ("thread", "job", "started", "abandoned")

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.job: Job | None = None
        self.started = 0.0
        self.abandoned = False


class ThreadPoolResponder(PooledResponder):
    """A fixed number of threads take jobs from one queue.

    A thread whose handler runs past the deadline cannot be stopped (Python
    has no way to), so it is abandoned: its request is answered
    ``handler-error`` at the deadline, a new thread takes its place so the pool
    keeps its size, and whatever the old one returns later is dropped. Every
    abandoned thread is counted (`abandoned`) and logged once.
    """

    kind = "thread"

    def __init__(self, app: App, size: int = DEFAULT_THREAD_POOL_SIZE, *, handler_timeout: float,
                 max_queued: int) -> None:
        super().__init__(app, handler_timeout=handler_timeout, max_queued=max_queued)
        self.size = self.capacity = size
        self.abandoned = 0
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[_ThreadWorker] = []
        self._spawned = 0

    def _start_workers(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        worker = _ThreadWorker()
        self._spawned += 1
        worker.thread = threading.Thread(target=self._work, args=(worker,), daemon=True,
                                         name=f"multiconn-handler-{self._spawned}")
        self._workers.append(worker)
        worker.thread.start()

    def _work(self, worker: _ThreadWorker) -> None:
        app, jobs = self.app, self._queue
        while not worker.abandoned:
            job = jobs.get()
            if job is None:
                return
            if job.cancelled:
                continue
            worker.started = job.started = time.monotonic()
            worker.job = job
            response = run_handler(app, None, None, None, job.request)
            worker.job = None
            self._post(job, response)

    def _submit(self, job: "Job") -> None:
        self._queue.put(job)

    def _expire(self, now: float) -> None:
        timeout = self.handler_timeout
        for worker in list(self._workers):
            job = worker.job
            if job is None or now - worker.started < timeout:
                continue
            worker.abandoned = True
            self._workers.remove(worker)
            self.abandoned += 1
            log.warning("handler %s ran longer than %g s: its thread is abandoned and replaced "
                        "(%d abandoned so far)", app_name(self.app), timeout, self.abandoned)
            self._complete(job, deadline_answer(job.request, timeout, "thread abandoned"))
            if not self._closed:
                self._spawn()

    def close(self, timeout: float) -> None:
        super().close(timeout)
        workers, self._workers = self._workers, []
        for _ in workers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for worker in workers:
            assert worker.thread is not None
            worker.thread.join(max(0.0, deadline - time.monotonic()))


class AsyncResponder(PooledResponder):
    """``async def`` handlers on one asyncio event loop in a helper thread.

    Jobs cross to the asyncio thread in batches: `submit` appends to a deque and
    the first job since the asyncio loop last looked schedules one
    ``call_soon_threadsafe`` that starts a task for every job queued by then
    (the mirror image of how answers come back, `_post`). Each task runs the
    handler under ``asyncio.timeout`` (``wait_for`` on Python 3.10, which costs
    a second task per request) and posts its own answer.

    Deadlines hold even for a handler that blocks its event loop (``time.sleep``
    in an ``async def``): the server's own loop, in another thread, answers
    every job still unanswered `DEADLINE_GRACE` after its deadline with
    ``handler-error`` and says once what is wrong. Cancelling a job (its client
    went away) cancels its task. With `loop_kind` ``"uvloop"`` the loop is uvloop's.
    """

    kind = "async"
    #: How long past the handler timeout the server answers a job whose task
    #: did not (its handler blocks the asyncio loop).
    DEADLINE_GRACE = 0.5

    def __init__(self, app: App, *, handler_timeout: float, max_queued: int,
                 loop_kind: str = "asyncio") -> None:
        super().__init__(app, handler_timeout=handler_timeout, max_queued=max_queued)
        if loop_kind not in ASYNC_LOOPS:
            raise ValueError(f"async loop must be one of {', '.join(ASYNC_LOOPS)}, not {loop_kind!r}")
        self.loop_kind = loop_kind
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._incoming: deque[Job] = deque()
        self._start_pending = False
        #: Jobs handed to the asyncio thread and not answered (for the deadline sweep).
        self._running: set[Job] = set()
        self._blocked_warned = False

    def _new_loop(self) -> asyncio.AbstractEventLoop:
        if self.loop_kind == "uvloop":
            import uvloop  # checked by the caller; see check_async_loop
            # Typed the same whether or not uvloop (optional) is installed.
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
        return asyncio.new_event_loop()

    def _start_workers(self) -> None:
        self._aloop = self._new_loop()
        self._thread = threading.Thread(target=self._run_loop, name="multiconn-async", daemon=True)
        self._thread.start()

    def _run_loop(self) -> None:
        aloop = self._aloop
        assert aloop is not None
        asyncio.set_event_loop(aloop)
        try:
            aloop.run_forever()
        finally:
            tasks = asyncio.all_tasks(aloop)
            for task in tasks:
                task.cancel()
            if tasks:
                aloop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            aloop.run_until_complete(aloop.shutdown_asyncgens())
            aloop.close()

    # -- the server loop's side -------------------------------------------

    def _submit(self, job: "Job") -> None:
        assert self._aloop is not None
        self._running.add(job)
        self._incoming.append(job)
        if not self._start_pending:
            self._start_pending = True
            self._aloop.call_soon_threadsafe(self._start_incoming)

    def _cancel(self, job: "Job") -> None:
        self._running.discard(job)
        task = job.handle
        if task is not None and self._aloop is not None:
            self._aloop.call_soon_threadsafe(task.cancel)  # a task is cancelled in its own thread

    def _complete(self, job: "Job", response: Frame) -> None:
        self._running.discard(job)
        super()._complete(job, response)

    def _expire(self, now: float) -> None:
        overdue = now - self.handler_timeout - self.DEADLINE_GRACE
        for job in [job for job in self._running if job.submitted <= overdue]:
            if not self._blocked_warned:
                self._blocked_warned = True
                log.warning("async handler %s did not return %g s after its deadline: it blocks its event "
                            "loop (a blocking call in an async def?); such requests are answered "
                            "handler-error", app_name(self.app), self.DEADLINE_GRACE)
            self._cancel(job)
            self._complete(job, deadline_answer(job.request, self.handler_timeout, "its event loop was blocked"))

    # -- the asyncio thread's side ----------------------------------------

    def _start_incoming(self) -> None:
        self._start_pending = False
        aloop = self._aloop
        assert aloop is not None
        incoming = self._incoming
        while incoming:
            job = incoming.popleft()
            if not job.cancelled:
                job.handle = aloop.create_task(self._run(job))

    async def _run(self, job: "Job") -> None:
        response = await run_async_handler(self.app, job.request, self.handler_timeout, job)
        self._post(job, response)

    def close(self, timeout: float) -> None:
        super().close(timeout)
        if self._aloop is not None and self._thread is not None:
            self._aloop.call_soon_threadsafe(self._aloop.stop)
            self._thread.join(timeout)


def check_async_loop(loop_kind: str) -> str | None:
    """Why `loop_kind` cannot be used here, or None."""
    if loop_kind not in ASYNC_LOOPS:
        return f"unknown async loop {loop_kind!r} (use {' or '.join(ASYNC_LOOPS)})"
    if loop_kind == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop is not installed (pip install uvloop)"
    return None

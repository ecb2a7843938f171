"""A small selectors event loop: descriptors, timers, thread-safe calls, signals.

Theory of operation
-------------------
1. One poller (`multiconn.poller`): epoll on Linux, used directly, and any
   ``selectors`` selector elsewhere (kqueue on BSD/macOS). Each registered file
   object has one callback, which receives the ready mask in ``selectors``
   terms. The loop runs them itself: one object, one callback, one dict
   lookup per event, so the per-event cost is a Python call and nothing more.
2. Interest is the caller's business: a connection asks for EVENT_WRITE only
   while it has output pending, and calls `modify` only when that changes.
3. Time is read once per iteration into `now` (from an injectable clock), so
   callbacks that stamp activity do not each pay for a clock call.
4. Timers live in a heap; cancelling only marks a handle, and marked handles are
   dropped when they reach the top (no O(n) removal). The time by which the
   loop must next wake (the earliest timer's, or at most MAX_SELECT_TIMEOUT
   ahead) is kept in one float, `_due`, lowered by `call_later` and set again
   when timers run, so an iteration looks at the heap only when one is due.
5. Other threads and signal handlers never touch loop state directly: they
   append a callback to a deque (atomic in CPython) and write a byte into a
   socketpair the selector watches. ``signal.set_wakeup_fd`` points at the same
   socket, so a signal that lands just before ``select()`` blocks still wakes
   it: there is no window in which a signal can be missed.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

from .poller import EVENT_READ, EVENT_WRITE, EventCallback, Poller, SelectorPoller, default_poller

log = logging.getLogger("multiconn.loop")

__all__ = ["EVENT_READ", "EVENT_WRITE", "EventCallback", "EventLoop", "TimerHandle"]

#: Longest a select() blocks when no timer is due, so a stop is never missed.
MAX_SELECT_TIMEOUT = 3600.0
#: A timer due sooner than this (by the iteration's clock reading) is
#: measured against a fresh one; see `EventLoop.run_forever`.
CLOCK_RECHECK = 0.002


class TimerHandle:
    """A scheduled call; `cancel` it to keep it from running."""

    __slots__ = ("when", "callback", "args", "cancelled", "_seq")
    _counter = itertools.count()

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False
        self._seq = next(self._counter)

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: "TimerHandle") -> bool:
        return (self.when, self._seq) < (other.when, other._seq)


class EventLoop:
    """Runs callbacks when descriptors are ready, timers are due or threads ask."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 selector: selectors.BaseSelector | None = None) -> None:
        """`selector`, if given, is used (and closed) in place of the default,
        which on Linux is not a selector but epoll itself (`multiconn.poller`)."""
        self.clock = clock
        self.now = clock()
        self._poller: Poller = default_poller() if selector is None else SelectorPoller(selector)
        self._timers: list[TimerHandle] = []
        #: When the loop must wake next: the earliest timer's `when`, or at most
        #: MAX_SELECT_TIMEOUT after timers were last looked at (never later, so
        #: a poll's timeout never exceeds it).
        self._due = self.now + MAX_SELECT_TIMEOUT
        self._ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._poller.register(self._wake_recv, EVENT_READ, self._on_wake)
        self._running = False
        self._stopping = False
        self._closed = False
        self._thread_id: int | None = None
        self._old_signal_handlers: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None

    # -- descriptors ------------------------------------------------------

    def register(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        """Call ``callback(mask)`` whenever `fileobj` is ready for `events`."""
        self._poller.register(fileobj, events, callback)

    def modify(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        self._poller.modify(fileobj, events, callback)

    def unregister(self, fileobj: Any) -> None:
        """Stop watching `fileobj`; a no-op if it is not registered."""
        self._poller.unregister(fileobj)

    def is_registered(self, fileobj: Any) -> bool:
        return self._poller.is_registered(fileobj)

    # -- calls and timers -------------------------------------------------

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback` on the next iteration (from the loop's own thread)."""
        self._ready.append((callback, args))

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback` in the loop's thread; safe from any thread or signal handler."""
        self._ready.append((callback, args))
        self._wake()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run `callback` after `delay` seconds; returns a cancellable handle."""
        handle = TimerHandle(self.clock() + max(0.0, delay), callback, args)
        heapq.heappush(self._timers, handle)
        if handle.when < self._due:
            self._due = handle.when
        return handle

    def _wake(self) -> None:
        try:
            self._wake_send.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the pipe is full, so the loop is going to wake anyway
        except OSError:
            pass  # closed: the loop is gone and there is nobody to wake

    def _on_wake(self, mask: int) -> None:
        try:
            while self._wake_recv.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # -- signals ----------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callable[..., Any], *args: Any,
                           immediate: bool = False) -> None:
        """Run ``callback(*args)`` in the loop when `signum` arrives (main thread only).

        With `immediate`, the callback runs in the signal handler itself, at
        whatever point the main thread was (even inside a callback): use it only
        to set flags, schedule calls, or raise to abort.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        if self._old_wakeup_fd is None:
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_send.fileno(), warn_on_full_buffer=False)

        def handler(_signum: int, _frame: Any) -> None:
            if immediate:
                callback(*args)
            else:
                self._ready.append((callback, args))

        self._old_signal_handlers.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handler)

    def remove_signal_handlers(self) -> None:
        """Restore the handlers and wake-up fd that were there before."""
        for signum, old in self._old_signal_handlers.items():
            signal.signal(signum, old)
        self._old_signal_handlers.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None

    # -- running ----------------------------------------------------------

    def run_forever(self) -> None:
        """Run until `stop` is called: wait, dispatch, run due timers and queued calls.

        Under light load every request is an iteration of its own, so the
        iteration's fixed cost is paid per request, and this loop is written
        for that (benchmarks/results/micro.md has the instruction counts):

        - an iteration is not a method call of its own, nor is running the
          ready descriptors' callbacks (the poller's ``dispatch`` once: a
          fifth of a raw echo's instructions), and what it uses is looked up
          once, before the first. Even a call that never runs (a helper for
          the ready queue) made every iteration dearer;
        - the clock is read once per iteration, after the wait. The timeout
          is computed from that reading of the previous iteration, so a timer
          can fire late by as long as that iteration's callbacks ran, never
          early; a timer due within `CLOCK_RECHECK` is measured against a
          fresh reading, so one already due does not wait out the poll's
          rounding up to a whole millisecond;
        - no ``min``/``max`` builtins (they parse keyword arguments on every
          call); the ready-queue step costs a truth test when there is nothing
          for it, and the timer step one comparison with `_due` until a timer
          is due: reading the heap's top and clamping the timeout every
          iteration was 732 of a raw echo's 7,635 instructions
          (benchmarks/results/micro.md).
        """
        if self._running:
            raise RuntimeError("the loop is already running")
        self._running = True
        self._stopping = False
        self._thread_id = threading.get_ident()
        timers, ready, clock, poller = self._timers, self._ready, self.clock, self._poller
        poll, ready_mask, callbacks = poller.poll, poller.ready_mask, poller.callbacks
        self.now = now = clock()  # the first wait counts from now, not from __init__ or an earlier run
        try:
            while not self._stopping:
                if ready:
                    timeout = 0.0
                else:
                    timeout = self._due - now  # at most MAX_SELECT_TIMEOUT (see _due)
                    if timeout < CLOCK_RECHECK:
                        timeout = self._due - clock()
                        if timeout < 0.0:
                            timeout = 0.0
                events = poll(timeout, poller.max_events)
                self.now = now = clock()
                for fd, mask in events:  # as the poller's module docstring says to
                    if mask != EVENT_READ:
                        mask = ready_mask(fd, mask)
                        if not mask:
                            continue
                    try:
                        callback = callbacks[fd]
                    except KeyError:
                        continue  # unregistered by a callback earlier in this batch
                    try:
                        callback(mask)
                    except Exception:  # one bad callback must not take the loop down
                        log.exception("event callback %r failed", callback)
                if self._due <= now:
                    while timers and timers[0].when <= now:
                        handle = heapq.heappop(timers)
                        if not handle.cancelled:
                            ready.append((handle.callback, handle.args))
                    due = now + MAX_SELECT_TIMEOUT
                    if timers and timers[0].when < due:
                        due = timers[0].when
                    self._due = due
                if ready:
                    for _ in range(len(ready)):  # what these queue waits for the next iteration
                        callback, args = ready.popleft()
                        try:
                            callback(*args)
                        except Exception:
                            log.exception("callback %r failed", callback)
        finally:
            self._running = False
            self._stopping = False

    def stop(self) -> None:
        """Make `run_forever` return after the current iteration (thread-safe)."""
        self._stopping = True
        self._wake()

    def close(self) -> None:
        """Release the selector and the wake-up sockets (idempotent)."""
        if self._closed:
            return
        if self._running:
            raise RuntimeError("cannot close a running loop")
        self._closed = True
        self.remove_signal_handlers()
        self._poller.close()
        self._wake_recv.close()
        self._wake_send.close()

    def __enter__(self) -> "EventLoop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""A deadline for application handlers, so one hung handler cannot stall the server.

Handlers run inline in the event loop: that is what makes a fast handler cheap
(no thread hop, no queue, responses in order for free). The price is that a
handler that hangs would hold up every connection. The watchdog bounds that
price without touching the hot path beyond three attribute stores per request:

* the server marks each handler call in a `HandlerClock`, counting calls;
* a daemon thread samples the mark every quarter of the deadline; when the same
  call is still running after `deadline` seconds it sends SIGALRM to the main
  thread;
* the signal handler, which Python runs in the main thread between bytecodes,
  raises `HandlerTimeout` inside the handler if, and only if, that same call is
  still running. The server answers ``handler-error`` and carries on.

A real signal also interrupts blocking calls such as ``time.sleep`` or a
``recv`` (PEP 475 retries only when the handler does not raise). A handler stuck
inside C code that never returns to the interpreter cannot be interrupted this
way; for such work use a process pool. Signals reach only the main thread, so
the deadline is enforced when the server runs there (as ``multiconn serve``
does), and not for a server in a background thread.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

WATCHDOG_SIGNAL = signal.SIGALRM


class HandlerTimeout(Exception):
    """Raised inside a handler that ran past the handler deadline."""


class HandlerClock:
    """Marks handler calls: a record, not an object with methods, because the
    server marks every request. Before a handler call the server adds one to
    `calls` and sets `running`; after it, it clears `running`."""

    __slots__ = ("calls", "running")

    def __init__(self) -> None:
        self.calls = 0
        self.running = False


class Watchdog:
    """Interrupts a handler call that has run for longer than `deadline` seconds."""

    def __init__(self, clock: HandlerClock, deadline: float) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the handler watchdog needs the main thread")
        self.clock = clock
        self.deadline = deadline
        self._target_call: int | None = None
        self._main_thread = threading.main_thread().ident
        self._stop = threading.Event()
        self._old_handler: Any = signal.signal(WATCHDOG_SIGNAL, self._on_signal)
        self._thread = threading.Thread(target=self._watch, name="multiconn-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        interval = min(0.25, self.deadline / 4)
        seen_call, seen_for = -1, 0.0
        while not self._stop.wait(interval):
            clock = self.clock
            call = clock.calls
            if not clock.running or call != seen_call:
                seen_call, seen_for = call, 0.0
                continue
            seen_for += interval
            if seen_for >= self.deadline:
                self._target_call = call
                signal.pthread_kill(self._main_thread, WATCHDOG_SIGNAL)  # type: ignore[arg-type]
                seen_for = 0.0  # ask again after another deadline if it is still stuck

    def _on_signal(self, signum: int, frame: Any) -> None:
        clock = self.clock
        if clock.running and clock.calls == self._target_call:
            raise HandlerTimeout(f"handler ran longer than {self.deadline:g} s")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        signal.signal(WATCHDOG_SIGNAL, self._old_handler)

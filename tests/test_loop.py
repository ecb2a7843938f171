"""Tests of `multiconn.loop.EventLoop` on its own (no server).

Every test owns its loop through the `loop` fixture, which closes it; tests
that could block forever if the loop were broken run it with a watchdog timer
or in a helper thread that is joined with a deadline.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time
from typing import Any, Iterator

import pytest

from multiconn.loop import EVENT_READ, EVENT_WRITE, EventLoop

WATCHDOG = 5.0  # seconds: no test here needs the loop to run longer


@pytest.fixture(params=["default", "selectors"])
def loop(request: pytest.FixtureRequest) -> Iterator[EventLoop]:
    """Each test runs on the default poller (epoll on Linux) and on `selectors`."""
    ev = EventLoop() if request.param == "default" else EventLoop(selector=selectors.DefaultSelector())
    try:
        yield ev
    finally:
        if not ev._running:
            ev.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def run_with_watchdog(loop: EventLoop, timeout: float = WATCHDOG) -> float:
    """Run `loop` until stopped; fail (rather than hang) after `timeout` s."""
    fired = []

    def watchdog() -> None:
        fired.append(True)
        loop.stop()

    handle = loop.call_later(timeout, watchdog)
    start = time.monotonic()
    loop.run_forever()
    handle.cancel()
    assert not fired, f"the loop was still running after {timeout} s"
    return time.monotonic() - start


# -- call_soon, call_later, stop ------------------------------------------


def test_call_soon_runs_callbacks_in_order_with_args(loop: EventLoop) -> None:
    calls: list[Any] = []
    loop.call_soon(calls.append, 1)
    loop.call_soon(calls.append, 2)
    loop.call_soon(lambda a, b: calls.append(a + b), 10, 20)
    loop.call_soon(calls.append, 4)
    loop.call_soon(loop.stop)
    run_with_watchdog(loop)
    assert calls == [1, 2, 30, 4]


def test_call_soon_from_a_callback_runs_on_a_later_iteration(loop: EventLoop) -> None:
    calls: list[str] = []

    def first() -> None:
        calls.append("first")
        loop.call_soon(third)

    def third() -> None:
        calls.append("third")
        loop.stop()

    loop.call_soon(first)
    loop.call_soon(calls.append, "second")
    run_with_watchdog(loop)
    assert calls == ["first", "second", "third"]


def test_call_later_runs_in_time_order_and_cancel_prevents_a_call(loop: EventLoop) -> None:
    calls: list[tuple[str, float]] = []
    start = time.monotonic()

    def record(name: str) -> None:
        calls.append((name, time.monotonic() - start))

    loop.call_later(0.15, record, "c")
    loop.call_later(0.05, record, "a")
    cancelled = loop.call_later(0.08, record, "cancelled")
    loop.call_later(0.10, record, "b")
    loop.call_later(0.10, record, "b2")  # same deadline: scheduling order breaks the tie
    loop.call_later(0.20, loop.stop)
    cancelled.cancel()
    assert cancelled.cancelled is True
    run_with_watchdog(loop)
    assert [name for name, _ in calls] == ["a", "b", "b2", "c"]
    for (name, at), due in zip(calls, (0.05, 0.10, 0.10, 0.15)):
        assert at >= due - 0.005, f"{name} ran early, at {at:.3f} s instead of {due} s"
        assert at < due + 1.0, f"{name} ran late, at {at:.3f} s"


def test_call_later_with_negative_delay_runs_on_the_next_iteration(loop: EventLoop) -> None:
    calls: list[str] = []
    loop.call_later(-5, calls.append, "neg")
    loop.call_later(0, calls.append, "zero")
    loop.call_later(0.01, loop.stop)
    elapsed = run_with_watchdog(loop)
    assert calls == ["neg", "zero"]
    assert elapsed < 1.0


def test_stop_ends_run_forever_and_the_loop_can_run_again(loop: EventLoop) -> None:
    calls: list[int] = []
    loop.call_soon(loop.stop)
    loop.call_soon(calls.append, 1)  # same iteration as stop(): still runs
    run_with_watchdog(loop)
    assert calls == [1]
    assert loop._running is False
    loop.call_soon(calls.append, 2)
    loop.call_soon(loop.stop)
    run_with_watchdog(loop)
    assert calls == [1, 2]


def test_run_forever_is_not_reentrant(loop: EventLoop) -> None:
    errors: list[BaseException] = []

    def nested() -> None:
        try:
            loop.run_forever()
        except RuntimeError as exc:
            errors.append(exc)
        loop.stop()

    loop.call_soon(nested)
    run_with_watchdog(loop)
    assert len(errors) == 1
    assert "already running" in str(errors[0])


# -- other threads ----------------------------------------------------------


def test_call_soon_threadsafe_wakes_a_loop_blocked_with_no_timers(loop: EventLoop) -> None:
    """No timers and nothing ready: select() blocks for up to an hour unless woken."""
    started = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        started.set()
        t0 = time.monotonic()
        try:
            loop.run_forever()
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc
        result["ran_for"] = time.monotonic() - t0

    calls: list[str] = []

    def in_loop() -> None:
        calls.append(threading.current_thread().name)
        loop.stop()

    thread = threading.Thread(target=run, name="loop-thread", daemon=True)
    thread.start()
    try:
        assert started.wait(5)
        time.sleep(0.2)  # let it block in select()
        assert thread.is_alive()
        t0 = time.monotonic()
        loop.call_soon_threadsafe(in_loop)
        thread.join(1.0)
        woke_after = time.monotonic() - t0
        assert not thread.is_alive(), "call_soon_threadsafe did not wake the blocked loop within 1 s"
        assert woke_after < 1.0
        assert calls == ["loop-thread"], "the callback must run in the loop's own thread"
        assert "error" not in result
    finally:
        if thread.is_alive():
            loop.stop()
            thread.join(5)


def test_stop_from_another_thread_wakes_a_blocked_loop(loop: EventLoop) -> None:
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        time.sleep(0.1)
        loop.stop()
        thread.join(1.0)
        assert not thread.is_alive()
    finally:
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)


# -- failing callbacks ------------------------------------------------------


def test_a_raising_callback_is_logged_and_the_loop_keeps_running(
    loop: EventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def bad() -> None:
        raise ValueError("callback exploded")

    loop.call_soon(bad)
    loop.call_soon(calls.append, "after-soon")
    loop.call_later(0.01, bad)
    loop.call_later(0.02, calls.append, "after-timer")
    loop.call_later(0.03, loop.stop)
    with caplog.at_level(logging.ERROR, logger="multiconn.loop"):
        run_with_watchdog(loop)
    assert calls == ["after-soon", "after-timer"]
    failures = [r for r in caplog.records if r.name == "multiconn.loop" and r.levelno == logging.ERROR]
    assert len(failures) == 2
    for record in failures:
        assert record.exc_info is not None
        assert record.exc_info[0] is ValueError
        assert "callback exploded" in str(record.exc_info[1])


def test_a_raising_event_callback_is_logged_and_the_loop_keeps_running(
    loop: EventLoop, pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    a.setblocking(False)
    calls: list[int] = []

    def on_read(mask: int) -> None:
        calls.append(mask)
        a.recv(100)
        if len(calls) == 1:
            raise RuntimeError("event callback exploded")
        loop.stop()

    loop.register(a, EVENT_READ, on_read)
    b.send(b"1")
    loop.call_later(0.05, b.send, b"2")
    with caplog.at_level(logging.ERROR, logger="multiconn.loop"):
        run_with_watchdog(loop)
    assert calls == [EVENT_READ, EVENT_READ]
    errors = [r for r in caplog.records if r.name == "multiconn.loop" and r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is RuntimeError


def test_a_callback_that_unregisters_another_stops_its_event_in_the_same_iteration(
    loop: EventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    """Both sockets are readable in one poll; whichever callback runs first
    unregisters the other, whose event must then be skipped, not run."""
    ran: list[str] = []
    (a, b), (c, d) = socket.socketpair(), socket.socketpair()
    with a, b, c, d:
        def on_first(mask: int) -> None:
            ran.append("first")
            loop.unregister(c)
            loop.stop()

        def on_second(mask: int) -> None:
            ran.append("second")
            loop.unregister(a)
            loop.stop()

        loop.register(a, EVENT_READ, on_first)
        loop.register(c, EVENT_READ, on_second)
        b.sendall(b"x")
        d.sendall(b"x")
        time.sleep(0.01)  # both readable before the first poll
        with caplog.at_level(logging.ERROR, logger="multiconn.loop"):
            run_with_watchdog(loop)
        loop.unregister(a)
        loop.unregister(c)
    assert ran in (["first"], ["second"])
    assert caplog.records == []


# -- descriptors ------------------------------------------------------------


def test_register_fires_reader_with_event_read_when_data_arrives(
    loop: EventLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    a.setblocking(False)
    received: list[tuple[int, bytes]] = []

    def on_read(mask: int) -> None:
        received.append((mask, a.recv(100)))
        loop.stop()

    loop.register(a, EVENT_READ, on_read)
    assert loop.is_registered(a)
    loop.call_later(0.05, b.sendall, b"ping")
    elapsed = run_with_watchdog(loop)
    assert received == [(EVENT_READ, b"ping")]
    assert elapsed >= 0.04  # it waited for the data, it did not fire early
    assert elapsed < 1.0


def test_reader_does_not_fire_without_data(loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    calls: list[int] = []
    loop.register(a, EVENT_READ, calls.append)
    loop.call_later(0.1, loop.stop)
    run_with_watchdog(loop)
    assert calls == []


def test_modify_changes_events_and_callback(loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    reads: list[int] = []
    writes: list[int] = []

    def on_write(mask: int) -> None:
        writes.append(mask)
        loop.stop()

    loop.register(a, EVENT_READ, reads.append)
    loop.modify(a, EVENT_WRITE, on_write)  # a socketpair end is writable at once
    run_with_watchdog(loop)
    assert writes == [EVENT_WRITE]
    assert reads == []

    both: list[int] = []

    def on_both(mask: int) -> None:
        both.append(mask)
        loop.stop()

    b.sendall(b"x")
    loop.modify(a, EVENT_READ | EVENT_WRITE, on_both)
    run_with_watchdog(loop)
    assert both == [EVENT_READ | EVENT_WRITE]


def test_unregister_stops_callbacks_and_is_a_no_op_when_not_registered(
    loop: EventLoop, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    calls: list[int] = []
    loop.register(a, EVENT_READ, calls.append)
    loop.unregister(a)
    assert not loop.is_registered(a)
    b.sendall(b"data")
    loop.call_later(0.1, loop.stop)
    run_with_watchdog(loop)
    assert calls == []
    # Again, on a socket never registered, and on a closed socket: no error.
    loop.unregister(a)
    loop.unregister(b)
    c, d = socket.socketpair()
    c.close()
    d.close()
    loop.unregister(c)
    assert not loop.is_registered(c)
    assert not loop.is_registered(b)


def test_register_twice_raises(loop: EventLoop, pair: tuple[socket.socket, socket.socket]) -> None:
    a, _b = pair
    loop.register(a, EVENT_READ, lambda mask: None)
    with pytest.raises(KeyError):
        loop.register(a, EVENT_READ, lambda mask: None)


# -- injectable clock -------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_injected_clock_drives_timers_and_now() -> None:
    clock = FakeClock(1000.0)
    with EventLoop(clock=clock) as loop:
        assert loop.now == 1000.0
        fired: list[float] = []
        ticks: list[float] = []
        loop.call_later(10, lambda: fired.append(loop.now))
        loop.call_later(3, lambda: fired.append(-loop.now))  # an earlier one, to check order

        def tick() -> None:
            ticks.append(loop.now)
            if len(fired) == 2 or len(ticks) > 100:
                loop.stop()
                return
            clock.advance(1.0)
            loop.call_soon(tick)

        loop.call_soon(tick)
        start = time.monotonic()
        loop.run_forever()
        wall = time.monotonic() - start
        # The timers fired at the first iteration whose fake time reached their deadline...
        assert fired == [-1003.0, 1010.0]
        # ...not before: every earlier iteration saw a time below 1010.
        assert ticks[:4] == [1000.0, 1001.0, 1002.0, 1003.0]
        assert max(t for t in ticks if t < 1010.0) == 1009.0
        # and no real 10 s passed.
        assert wall < 2.0


def test_injected_clock_timer_does_not_fire_before_its_time() -> None:
    clock = FakeClock(0.0)
    with EventLoop(clock=clock) as loop:
        fired: list[float] = []
        loop.call_later(10, fired.append, "late")
        steps = 0

        def tick() -> None:
            nonlocal steps
            steps += 1
            if steps == 20:
                loop.stop()
                return
            clock.advance(0.49)  # 19 * 0.49 = 9.31 < 10
            loop.call_soon(tick)

        loop.call_soon(tick)
        loop.run_forever()
        assert clock.now == pytest.approx(9.31)
        assert fired == []


class TimeoutRecordingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The default selector, noting every timeout the loop waits with."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def select(self, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        return super().select(timeout)


def test_a_timer_that_fell_due_during_callbacks_does_not_wait_for_the_poll() -> None:
    """The timeout comes from the iteration's clock reading; a timer due within
    CLOCK_RECHECK of it is measured against a fresh one, so a timer that fell
    due while callbacks ran gets a zero timeout, not the poll's rounded-up ms."""
    clock = FakeClock(0.0)
    selector = TimeoutRecordingSelector()
    with EventLoop(clock=clock, selector=selector) as loop:
        fired: list[float] = []

        def slow_callback() -> None:
            loop.call_later(0.001, lambda: (fired.append(clock.now), loop.stop()))
            clock.advance(0.01)  # the callback "runs" 10 ms, past the timer's 1 ms

        loop.call_soon(slow_callback)
        loop.run_forever()
    assert fired == [0.01]
    assert selector.timeouts == [0.0, 0.0]  # the ready call, then the due timer


class FakeWaitSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Waits by moving a `FakeClock` on by the timeout (when nothing is ready),
    noting every timeout: the loop's timing without real seconds."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.timeouts: list[float | None] = []

    def select(self, timeout: float | None = None) -> Any:
        self.timeouts.append(timeout)
        ready = super().select(0)
        if not ready and timeout:
            self.clock.advance(timeout)
        return ready


def test_a_loop_run_long_after_it_was_made_waits_from_the_time_it_runs() -> None:
    clock = FakeClock(0.0)
    selector = FakeWaitSelector(clock)
    with EventLoop(clock=clock, selector=selector) as loop:
        clock.advance(100.0)  # made, then run 100 s later
        fired: list[float] = []
        loop.call_later(1.0, lambda: (fired.append(clock.now), loop.stop()))
        loop.run_forever()
    assert fired == [101.0]
    assert selector.timeouts == [1.0]


def test_timers_far_and_near_wake_the_loop_in_order_and_never_early() -> None:
    """The loop's next wake-up (`_due`) is lowered by each nearer timer, set
    again after timers run, and never more than MAX_SELECT_TIMEOUT ahead."""
    from multiconn.loop import MAX_SELECT_TIMEOUT

    clock = FakeClock(0.0)
    selector = FakeWaitSelector(clock)
    with EventLoop(clock=clock, selector=selector) as loop:
        fired: list[tuple[str, float]] = []
        far = 3 * MAX_SELECT_TIMEOUT + 5
        loop.call_later(far, lambda: (fired.append(("far", clock.now)), loop.stop()))
        loop.call_later(50.0, lambda: fired.append(("50", clock.now)))
        cancelled = loop.call_later(20.0, lambda: fired.append(("cancelled", clock.now)))
        cancelled.cancel()
        loop.call_later(30.0, lambda: loop.call_later(5.0, lambda: fired.append(("35", clock.now))))
        loop.run_forever()
    assert fired == [("35", 35.0), ("50", 50.0), ("far", far)]
    assert all(t is not None and 0.0 <= t <= MAX_SELECT_TIMEOUT for t in selector.timeouts)
    assert selector.timeouts[:4] == [20.0, 10.0, 5.0, 15.0]  # the cancelled one's wake-up costs one poll


# -- signals ----------------------------------------------------------------


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
def test_signal_handler_runs_in_the_loop_and_is_removed(loop: EventLoop) -> None:
    assert threading.current_thread() is threading.main_thread()
    previous_calls: list[int] = []

    def previous_handler(signum: int, frame: Any) -> None:
        previous_calls.append(signum)

    original = signal.signal(signal.SIGUSR1, previous_handler)
    original_wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(original_wakeup)
    try:
        got: list[tuple[str, int]] = []

        def on_signal(tag: str) -> None:
            got.append((tag, threading.get_ident()))
            loop.stop()

        loop.add_signal_handler(signal.SIGUSR1, on_signal, "usr1")
        assert signal.getsignal(signal.SIGUSR1) is not previous_handler

        def send() -> None:
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGUSR1)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            elapsed = run_with_watchdog(loop)  # no other timer: blocks in select()
        finally:
            sender.join(5)
        assert got == [("usr1", threading.get_ident())]
        assert 0.15 <= elapsed < 2.0
        assert previous_calls == []

        loop.remove_signal_handlers()
        assert signal.getsignal(signal.SIGUSR1) is previous_handler
        # the wake-up fd is the one that was there before, too
        current = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(current)
        assert current == original_wakeup
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 2
        while not previous_calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert previous_calls == [signal.SIGUSR1]
    finally:
        loop.remove_signal_handlers()
        signal.signal(signal.SIGUSR1, original)
        signal.set_wakeup_fd(original_wakeup)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
def test_add_signal_handler_outside_the_main_thread_raises(loop: EventLoop) -> None:
    errors: list[BaseException] = []
    original = signal.getsignal(signal.SIGUSR1)

    def attempt() -> None:
        try:
            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join(5)
    assert len(errors) == 1
    assert "main thread" in str(errors[0])
    assert signal.getsignal(signal.SIGUSR1) is original
    assert loop._old_signal_handlers == {}


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
def test_close_restores_signal_handlers_and_is_idempotent() -> None:
    original = signal.getsignal(signal.SIGUSR1)
    original_wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(original_wakeup)
    loop = EventLoop()
    try:
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)
        assert signal.getsignal(signal.SIGUSR1) is not original
        loop.close()
        assert signal.getsignal(signal.SIGUSR1) is original
        current = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(current)
        assert current == original_wakeup
        loop.close()  # idempotent
        loop.close()
        assert loop._wake_send.fileno() == -1
        assert loop._wake_recv.fileno() == -1
    finally:
        loop.remove_signal_handlers()
        signal.signal(signal.SIGUSR1, original)
        signal.set_wakeup_fd(original_wakeup)


def test_close_is_idempotent_and_refused_while_running() -> None:
    loop = EventLoop()
    errors: list[BaseException] = []

    def try_close() -> None:
        try:
            loop.close()
        except RuntimeError as exc:
            errors.append(exc)
        loop.stop()

    loop.call_soon(try_close)
    run_with_watchdog(loop)
    assert len(errors) == 1
    loop.close()
    loop.close()
    # after close, waking it is harmless (nobody to wake)
    loop.call_soon_threadsafe(lambda: None)
    loop.stop()


def test_context_manager_closes(pair: tuple[socket.socket, socket.socket]) -> None:
    with EventLoop() as loop:
        loop.register(pair[0], EVENT_READ, lambda mask: None)
    assert loop._closed is True
    assert loop._wake_recv.fileno() == -1

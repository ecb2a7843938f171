"""One suite for every poller, as the standard library tests its selectors:
epoll used directly (`EpollPoller`) and `SelectorPoller` over the default and
the poll selector. They must be interchangeable under the event loop, so every
test asserts the same masks and errors for all of them. Real sockets only.
"""

from __future__ import annotations

import select
import selectors
import socket
import struct
import time
from typing import Any, Callable, Iterator

import pytest

from multiconn.poller import EVENT_READ, EVENT_WRITE, EpollPoller, Poller, SelectorPoller

POLLERS: dict[str, Callable[[], Poller]] = {
    "selectors-default": lambda: SelectorPoller(selectors.DefaultSelector()),
    "selectors-poll": lambda: SelectorPoller(selectors.PollSelector()),
}
if hasattr(select, "epoll"):
    POLLERS["epoll"] = EpollPoller


@pytest.fixture(params=sorted(POLLERS))
def poller(request: pytest.FixtureRequest) -> Iterator[Poller]:
    p = POLLERS[request.param]()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def pairs() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    """``pairs()`` -> a connected socketpair, both ends closed after the test."""
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair()
        made.extend((a, b))
        return a, b

    yield make
    for sock in made:
        sock.close()


def poll_once(poller: Poller, timeout: float = 1.0) -> None:
    """One poll, its events run as the event loop runs them (the poller module's contract)."""
    for fd, mask in poller.poll(timeout, poller.max_events):
        mask = poller.ready_mask(fd, mask)
        if mask and fd in poller.callbacks:
            poller.callbacks[fd](mask)


def test_readable_reports_event_read(poller: Poller, pairs: Any) -> None:
    a, b = pairs()
    calls: list[int] = []
    poller.register(a, EVENT_READ, calls.append)
    poll_once(poller, 0)
    assert calls == []  # nothing to read yet
    b.sendall(b"x")
    poll_once(poller)
    assert calls == [EVENT_READ]


def test_masks_are_limited_to_the_interest(poller: Poller, pairs: Any) -> None:
    a, b = pairs()
    b.sendall(b"x")  # `a` is now readable and, as always, writable
    calls: list[int] = []
    poller.register(a, EVENT_WRITE, calls.append)
    poll_once(poller)
    poller.modify(a, EVENT_READ | EVENT_WRITE, calls.append)
    poll_once(poller)
    poller.modify(a, EVENT_READ, calls.append)
    poll_once(poller)
    assert calls == [EVENT_WRITE, EVENT_READ | EVENT_WRITE, EVENT_READ]


def test_modify_with_the_same_events_changes_the_callback(poller: Poller, pairs: Any) -> None:
    a, b = pairs()
    first: list[int] = []
    second: list[int] = []
    poller.register(a, EVENT_READ, first.append)
    poller.modify(a, EVENT_READ, second.append)
    b.sendall(b"x")
    poll_once(poller)
    assert (first, second) == ([], [EVENT_READ])


@pytest.mark.parametrize("interest", [EVENT_READ, EVENT_WRITE, EVENT_READ | EVENT_WRITE])
def test_a_reset_is_reported_as_the_registered_interest(poller: Poller, interest: int) -> None:
    """An error or hang-up must reach the callback as something it asked for:
    a connection waiting only to write must hear of a reset, or a level-triggered
    poller would report it forever to a callback that ignores it."""
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            fill_send_buffer(client)  # so EVENT_WRITE is not simply "writable"
            calls: list[int] = []
            poller.register(client, interest, calls.append)
            poll_once(poller, 0)
            ready_before = list(calls)
            accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            accepted.close()  # RST
            time.sleep(0.05)
            calls.clear()
            poll_once(poller)
            assert calls == [interest], f"before the reset: {ready_before}"
            poller.unregister(client)


def fill_send_buffer(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"\0" * 65536)
    except BlockingIOError:
        pass


def test_bad_arguments_raise_like_selectors(poller: Poller, pairs: Any) -> None:
    a, b = pairs()
    poller.register(a, EVENT_READ, print)
    with pytest.raises(KeyError):
        poller.register(a, EVENT_WRITE, print)
    with pytest.raises(KeyError):
        poller.modify(b, EVENT_READ, print)
    for events in (0, 4, EVENT_READ | 8):
        with pytest.raises(ValueError):
            poller.register(b, events, print)
    for fileobj in (object(), -1, "3"):
        with pytest.raises(ValueError):
            poller.register(fileobj, EVENT_READ, print)
    assert not poller.is_registered(b)
    poller.unregister(b)  # never registered: a no-op


def test_a_descriptor_number_and_a_closed_socket_can_be_unregistered(poller: Poller) -> None:
    a, b = socket.socketpair()
    with b:
        poller.register(a.fileno(), EVENT_READ, print)
        assert poller.is_registered(a.fileno())
        poller.unregister(a.fileno())
        assert not poller.is_registered(a.fileno())
        # Registered by number (as a transport registers), found by the open socket too.
        poller.register(a.fileno(), EVENT_READ, print)
        assert poller.is_registered(a)
        poller.modify(a, EVENT_READ | EVENT_WRITE, print)
        poller.unregister(a)
        assert not poller.is_registered(a.fileno())
        poller.register(a, EVENT_READ, print)
        a.close()  # closed before unregister: found by identity, as selectors does
        assert poller.is_registered(a)
        poller.unregister(a)
        assert not poller.is_registered(a)
        # Its descriptor number is free for a new socket to register.
        c, d = socket.socketpair()
        with c, d:
            poller.register(c, EVENT_READ, print)
            poller.register(d, EVENT_READ, print)


def test_poll_waits_at_least_its_timeout(poller: Poller, pairs: Any) -> None:
    """epoll counts milliseconds: 0.4 ms must round up to 1, not down to a busy 0."""
    a, _b = pairs()
    poller.register(a, EVENT_READ, print)
    for timeout in (0.0004, 0.002):
        start = time.monotonic()
        assert list(poller.poll(timeout, poller.max_events)) == []
        assert time.monotonic() - start >= timeout
    assert list(poller.poll(0, poller.max_events)) == []


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="epoll only")
def test_epoll_asks_for_as_many_events_as_there_are_registrations(pairs: Any) -> None:
    """epoll's event buffer is allocated per poll: sized by the registrations,
    it stays small (CPython's small-object allocator) for a few connections."""
    poller = EpollPoller()
    try:
        assert poller.max_events == 1
        socks = [pairs()[0] for _ in range(3)]
        for sock in socks:
            poller.register(sock, EVENT_READ, print)
        assert poller.max_events == 3
        poller.unregister(socks[0])
        assert poller.max_events == 2
        for sock in socks[1:]:
            poller.unregister(sock)
        assert poller.max_events == 1
    finally:
        poller.close()

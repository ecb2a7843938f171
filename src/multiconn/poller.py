"""Readiness for the event loop: which descriptors are ready, and for what.

Theory of operation
-------------------
A poller keeps one callback per registered file object (`callbacks`, by
descriptor) and waits for readiness (`poll`, a list of ``(fd, mask)``); the
event loop runs the callbacks itself, in its own loop, because under light
load every request is an iteration and a dispatch method of the poller's cost
a fifth of a small echo's instructions (benchmarks/results/micro.md). Both
pollers speak the vocabulary of `selectors`: interest and ready masks are
EVENT_READ / EVENT_WRITE, and an error or hang-up on a descriptor is reported
as whichever of the two it is registered for, as `selectors` does.

Why not `selectors` alone: ``EpollSelector.select()`` pays, in Python, for every
ready descriptor (a `SelectorKey` lookup, the mask translated bit by bit, a
tuple appended to a list that the loop unpacks again). For a server of small
messages, where one ready event is one request, that is a large share of its
own work (the measured difference: benchmarks/results/micro.md). So on Linux
`EpollPoller` owns the `select.epoll` object itself (the one
`selectors.EpollSelector` wraps; trio's ``_io_epoll.py`` does the same), its
`poll` is the kernel's ``(fd, events)`` list as it comes, and EPOLLIN equals
EVENT_READ, so the common event needs no translation; any other mask goes
through `ready_mask`. Elsewhere (kqueue, poll, select) `SelectorPoller` runs
on any `selectors` selector and hands out the same ``(fd, mask)`` pairs.

Maintenance contract for whoever dispatches (`EventLoop.run_forever`, and the
poller tests): a mask equal to EVENT_READ is used as it is, any other goes
through `ready_mask` (0: skip the event), and an event whose descriptor is no
longer in `callbacks` (unregistered by a callback earlier in the same batch)
is skipped. A plain EPOLLIN thus reaches its callback without a look at the
current interest: if that interest lost EVENT_READ earlier in the same batch,
or the descriptor was closed and its number reused by a new registration, the
callback sees one stale readiness. Readiness is only a hint anyway, and every
callback of this package tolerates a read that finds nothing.
"""

from __future__ import annotations

import select
import selectors
from typing import Any, Callable, Protocol

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

EventCallback = Callable[[int], None]

#: The most events one poll asks for (``select.epoll``'s own default).
MAX_EVENTS = 1023


class Poller(Protocol):
    """What the event loop needs from a readiness mechanism."""

    #: The callback of each registration, by descriptor (the loop's to read, not to change).
    callbacks: dict[int, EventCallback]
    #: What to pass `poll` as `max_events`: for epoll, the registrations (at
    #: least 1, at most MAX_EVENTS), so that its event buffer stays small.
    max_events: int

    def register(self, fileobj: Any, events: int, callback: EventCallback) -> None: ...
    def modify(self, fileobj: Any, events: int, callback: EventCallback) -> None: ...
    def unregister(self, fileobj: Any) -> None: ...
    def is_registered(self, fileobj: Any) -> bool: ...

    def poll(self, timeout: float | None, max_events: int, /) -> list[tuple[int, int]]:
        """``(fd, mask)`` of what is ready, after waiting up to `timeout` seconds,
        at least 0 (None: until something is ready), for at most `max_events`
        events (more stay ready for the next call). A negative timeout is the
        caller's to clamp: epoll reads it as forever, a selector as "do not block"."""

    def ready_mask(self, fd: int, mask: int, /) -> int:
        """`mask` from `poll` in EVENT_* terms, limited to the interest (0: none)."""

    def close(self) -> None: ...


def default_poller() -> Poller:
    """`EpollPoller` where the platform has epoll, else the default selector."""
    if hasattr(select, "epoll"):
        return EpollPoller()
    return SelectorPoller(selectors.DefaultSelector())


class SelectorPoller:
    """Any `selectors` selector, its keys turned into ``(fd, mask)`` pairs."""

    #: Selectors size their own batch: `poll` ignores its `max_events`.
    max_events = MAX_EVENTS

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self.callbacks: dict[int, EventCallback] = {}

    def register(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        key = self._selector.register(fileobj, events)
        self.callbacks[key.fd] = callback

    def modify(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        key = self._selector.modify(fileobj, events)
        self.callbacks[key.fd] = callback

    def unregister(self, fileobj: Any) -> None:
        try:
            key = self._selector.unregister(fileobj)
        except (KeyError, ValueError):
            return
        del self.callbacks[key.fd]

    def is_registered(self, fileobj: Any) -> bool:
        try:
            self._selector.get_key(fileobj)
        except (KeyError, ValueError):
            return False
        return True

    def poll(self, timeout: float | None, max_events: int = MAX_EVENTS, /) -> list[tuple[int, int]]:
        return [(key.fd, mask) for key, mask in self._selector.select(timeout)]

    def ready_mask(self, fd: int, mask: int, /) -> int:
        return mask  # a selector's masks are EVENT_* already, limited to the interest

    def close(self) -> None:
        self._selector.close()
        self.callbacks.clear()


class EpollPoller:
    """`select.epoll` with a dict of callbacks by descriptor (Linux)."""

    #: ``select.epoll.poll`` itself, bound: under light load every request is
    #: a poll of its own, and a Python method around it cost about 4 % of a
    #: raw echo's instructions (benchmarks/results/micro.md). It rounds a
    #: timeout up to whole milliseconds (a wait for a timer 0.4 ms away does
    #: not return at once and spin), retries on EINTR (PEP 475) and reads a
    #: negative timeout as forever. It allocates its buffer of `max_events`
    #: events per call: a few come from CPython's small-object allocator,
    #: hundreds from malloc, which is worth it only when that many may be ready.
    poll: Callable[[float | None, int], list[tuple[int, int]]]

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.poll = self._epoll.poll
        self.max_events = 1
        self.callbacks: dict[int, EventCallback] = {}
        # fd -> interest in EVENT_* terms, for the rarer paths: an int, not a
        # tuple with the file object, which would cost a connection 56 bytes.
        self._registered: dict[int, int] = {}
        # fd -> file object, for those registered as objects rather than by
        # descriptor: how one is found once closed (`_registered_fd`).
        self._files: dict[int, Any] = {}

    def register(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        """Like `selectors`: KeyError if registered, ValueError for bad arguments."""
        fd = _fileno(fileobj)
        if fd in self._registered:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._epoll.register(fd, _epoll_mask(events))
        self._registered[fd] = events
        if fd is not fileobj:
            self._files[fd] = fileobj
        self.callbacks[fd] = callback
        self.max_events = min(len(self.callbacks), MAX_EVENTS)

    def modify(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        fd = self._registered_fd(fileobj)
        if fd is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if events != self._registered[fd]:
            self._epoll.modify(fd, _epoll_mask(events))
            self._registered[fd] = events
        self.callbacks[fd] = callback

    def unregister(self, fileobj: Any) -> None:
        """Forget `fileobj`, even one closed meanwhile; a no-op if unknown."""
        fd = self._registered_fd(fileobj)
        if fd is None:
            return
        del self._registered[fd]
        self._files.pop(fd, None)
        del self.callbacks[fd]
        self.max_events = max(1, min(len(self.callbacks), MAX_EVENTS))
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the epoll set itself

    def is_registered(self, fileobj: Any) -> bool:
        return self._registered_fd(fileobj) is not None

    def _registered_fd(self, fileobj: Any) -> int | None:
        """The descriptor `fileobj` is registered under, found as selectors finds it:
        by its fileno, or, once it is closed, by identity (a scan, so only then)."""
        try:
            fd = _fileno(fileobj)
        except ValueError:
            for fd, registered in self._files.items():
                if registered is fileobj:
                    return fd
            return None
        return fd if fd in self._registered else None

    def ready_mask(self, fd: int, events: int, /) -> int:
        """An epoll mask in EVENT_* terms; errors and hang-ups count as both."""
        entry = self._registered.get(fd)
        if entry is None:
            return 0
        mask = 0
        if events & ~select.EPOLLIN:
            mask |= EVENT_WRITE
        if events & ~select.EPOLLOUT:
            mask |= EVENT_READ
        return mask & entry

    def close(self) -> None:
        self._epoll.close()
        self._registered.clear()
        self._files.clear()
        self.callbacks.clear()


def _fileno(fileobj: Any) -> int:
    try:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
    except (AttributeError, TypeError, ValueError):
        raise ValueError(f"invalid file object {fileobj!r}") from None
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"invalid file object {fileobj!r} (fd {fd!r})")
    return fd


def _epoll_mask(events: int) -> int:
    if not events or events & ~(EVENT_READ | EVENT_WRITE):
        raise ValueError(f"invalid events: {events!r}")
    return (select.EPOLLIN if events & EVENT_READ else 0) | (select.EPOLLOUT if events & EVENT_WRITE else 0)

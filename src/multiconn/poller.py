"""Readiness for the event loop: which descriptors are ready, and whose callback runs.

Theory of operation
-------------------
A poller keeps one callback per registered file object, waits for readiness
(`poll`) and runs the callbacks of what is ready (`dispatch`). Both pollers
speak the vocabulary of `selectors` to their callers: interest and ready masks
are EVENT_READ / EVENT_WRITE, and an error or hang-up on a descriptor is
reported as whichever of the two it is registered for, as `selectors` does.

Why not `selectors` alone: ``EpollSelector.select()`` pays, in Python, for every
ready descriptor (a `SelectorKey` lookup, the mask translated bit by bit, a
tuple appended to a list that the loop unpacks again). For a server of small
messages, where one ready event is one request, that is a large share of its
own work (the measured difference: benchmarks/results/micro.md). So on Linux
`EpollPoller` owns the `select.epoll` object itself (the one
`selectors.EpollSelector` wraps; trio's ``_io_epoll.py`` does the same) and
dispatches straight from the kernel's ``(fd, events)`` list through one dict
of callbacks. EPOLLIN equals EVENT_READ, so the common event needs no
translation; any other mask takes one method call. Elsewhere (kqueue, poll,
select) `SelectorPoller` runs on any `selectors` selector.

A plain EPOLLIN reaches its callback as EVENT_READ without a look at the
current interest. If that interest lost EVENT_READ earlier in the same batch,
the callback sees one stale readiness; readiness is only a hint anyway, and
every callback of this package tolerates a read that finds nothing.
"""

from __future__ import annotations

import logging
import select
import selectors
from typing import Any, Callable, Iterable, Protocol

log = logging.getLogger("multiconn.loop")

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

EventCallback = Callable[[int], None]

#: The most events one poll asks for (``select.epoll``'s own default).
MAX_EVENTS = 1023


class Poller(Protocol):
    """What the event loop needs from a readiness mechanism."""

    def register(self, fileobj: Any, events: int, callback: EventCallback) -> None: ...
    def modify(self, fileobj: Any, events: int, callback: EventCallback) -> None: ...
    def unregister(self, fileobj: Any) -> None: ...
    def is_registered(self, fileobj: Any) -> bool: ...
    #: What to pass `poll` as `max_events`: for epoll, the registrations (at
    #: least 1, at most MAX_EVENTS), so that its event buffer stays small.
    max_events: int

    def poll(self, timeout: float | None, max_events: int, /) -> Iterable[Any]:
        """Wait up to `timeout` seconds, at least 0 (None: until something is
        ready), for at most `max_events` events (more stay ready for the next
        call). A negative timeout is the caller's to clamp: epoll reads it as
        forever, where a selector reads it as "do not block"."""

    def dispatch(self, events: Iterable[Any]) -> None: ...
    def close(self) -> None: ...


def default_poller() -> Poller:
    """`EpollPoller` where the platform has epoll, else the default selector."""
    if hasattr(select, "epoll"):
        return EpollPoller()
    return SelectorPoller(selectors.DefaultSelector())


def _callback_failed(callback: EventCallback) -> None:
    log.exception("event callback %r failed", callback)


class SelectorPoller:
    """Any `selectors` selector; the callback rides along as the key's data.

    ``select()`` hands out its keys before any callback runs, so an unregistered
    key is remembered (by identity, until the end of the next dispatch) and a
    callback's event skipped once its key is gone, as `EpollPoller` skips it by
    its absence.
    """

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._dropped: dict[int, selectors.SelectorKey] = {}  # id(key) -> key, kept alive

    def register(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        self._selector.register(fileobj, events, callback)

    def modify(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        self._selector.modify(fileobj, events, callback)

    def unregister(self, fileobj: Any) -> None:
        try:
            key = self._selector.unregister(fileobj)
        except (KeyError, ValueError):
            return
        self._dropped[id(key)] = key

    def is_registered(self, fileobj: Any) -> bool:
        try:
            self._selector.get_key(fileobj)
        except (KeyError, ValueError):
            return False
        return True

    #: Selectors size their own batch: `poll` ignores its `max_events`.
    max_events = MAX_EVENTS

    def poll(self, timeout: float | None, max_events: int = MAX_EVENTS, /) -> list[tuple[selectors.SelectorKey, int]]:
        return self._selector.select(timeout)

    def dispatch(self, events: Iterable[tuple[selectors.SelectorKey, int]]) -> None:
        dropped = self._dropped
        try:
            for key, mask in events:
                if dropped and id(key) in dropped:
                    continue  # unregistered by a callback earlier in this batch
                try:
                    key.data(mask)
                except Exception:  # one bad callback must not take the loop down
                    _callback_failed(key.data)
        finally:
            dropped.clear()

    def close(self) -> None:
        self._selector.close()


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
        self._callbacks: dict[int, EventCallback] = {}
        # fd -> (file object, interest in EVENT_* terms), for the rarer paths.
        self._registered: dict[int, tuple[Any, int]] = {}

    def register(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        """Like `selectors`: KeyError if registered, ValueError for bad arguments."""
        fd = _fileno(fileobj)
        if fd in self._registered:
            raise KeyError(f"{fileobj!r} (fd {fd}) is already registered")
        self._epoll.register(fd, _epoll_mask(events))
        self._registered[fd] = (fileobj, events)
        self._callbacks[fd] = callback
        self.max_events = min(len(self._callbacks), MAX_EVENTS)

    def modify(self, fileobj: Any, events: int, callback: EventCallback) -> None:
        fd = self._registered_fd(fileobj)
        if fd is None:
            raise KeyError(f"{fileobj!r} is not registered")
        if events != self._registered[fd][1]:
            self._epoll.modify(fd, _epoll_mask(events))
            self._registered[fd] = (fileobj, events)
        self._callbacks[fd] = callback

    def unregister(self, fileobj: Any) -> None:
        """Forget `fileobj`, even one closed meanwhile; a no-op if unknown."""
        fd = self._registered_fd(fileobj)
        if fd is None:
            return
        del self._registered[fd]
        del self._callbacks[fd]
        self.max_events = max(1, min(len(self._callbacks), MAX_EVENTS))
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
            for fd, (registered, _events) in self._registered.items():
                if registered is fileobj:
                    return fd
            return None
        return fd if fd in self._registered else None

    def dispatch(self, events: Iterable[tuple[int, int]]) -> None:
        callbacks = self._callbacks
        epollin = select.EPOLLIN
        for fd, mask in events:
            if mask != epollin:
                mask = self._ready_mask(fd, mask)
                if not mask:
                    continue
            try:
                callback = callbacks[fd]
            except KeyError:
                continue  # unregistered by a callback earlier in this batch
            try:
                callback(mask)
            except Exception:  # one bad callback must not take the loop down
                _callback_failed(callback)

    def _ready_mask(self, fd: int, events: int) -> int:
        """An epoll mask in EVENT_* terms; errors and hang-ups count as both."""
        entry = self._registered.get(fd)
        if entry is None:
            return 0
        mask = 0
        if events & ~select.EPOLLIN:
            mask |= EVENT_WRITE
        if events & ~select.EPOLLOUT:
            mask |= EVENT_READ
        return mask & entry[1]

    def close(self) -> None:
        self._epoll.close()
        self._registered.clear()
        self._callbacks.clear()


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

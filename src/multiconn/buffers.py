"""Large content buffers, reused once nothing holds them any more.

A large content (`multiconn.protocol.LARGE_CONTENT` and up) is received
straight into a ``bytearray`` of its exact size (``recv_into``), which becomes
the request's ``content``. Allocating a fresh one per frame costs more than the
copy it saves: a 1 MiB ``bytearray`` is zero-filled, then faulted in page by
page, then unmapped again when freed. A `BufferPool` keeps the buffers it hands
out and gives one back for a later frame of the same size once it is free.

"Free" is decided by reference count, not by bookkeeping: a buffer is reused
only when the pool's own reference is the last one. Whoever else may still
hold it (the request `Frame` while its handler runs, an application that kept
the content, an answer queued for sending or a memoryview of it on the output
queue, a pooled job) keeps it out of reuse, so nobody ever sees its bytes
change. This is CPython's reference counting, checked with `sys.getrefcount`;
the pool is used by one thread (the server's event loop) only.

Bounds: at most `max_buffers` buffers and `max_bytes` bytes are kept. A
request for a size with no free buffer allocates a new one and keeps it,
forgetting, when the pool is full, a free buffer of another size or else the
oldest one (a buffer still held stays with its holder: the pool only lets go).
"""

from __future__ import annotations

import sys

#: How many references a free pooled buffer has inside `BufferPool.take`'s
#: loop: the pool's list, the loop variable, and getrefcount's own argument.
_FREE_REFCOUNT = 3


class BufferPool:
    """Reusable ``bytearray`` buffers for large contents (see the module's docstring)."""

    __slots__ = ("max_buffers", "max_bytes", "_buffers", "_bytes", "reused", "allocated")

    def __init__(self, max_buffers: int = 16, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_buffers = max_buffers
        self.max_bytes = max_bytes
        self._buffers: list[bytearray] = []
        self._bytes = 0
        #: Buffers handed out again, and buffers newly allocated (for tests and benchmarks).
        self.reused = 0
        self.allocated = 0

    def take(self, size: int) -> bytearray:
        """A buffer of exactly `size` bytes (its old contents, to be overwritten)."""
        getrefcount = sys.getrefcount
        evictable = -1
        index = -1
        for buffer in self._buffers:  # not enumerate(): its tuple would hold a reference
            index += 1
            if getrefcount(buffer) != _FREE_REFCOUNT:
                continue
            if len(buffer) == size:
                self.reused += 1
                return buffer
            if evictable < 0:
                evictable = index
        self.allocated += 1
        fresh = bytearray(size)
        buffers = self._buffers
        while buffers and (len(buffers) >= self.max_buffers or self._bytes + size > self.max_bytes):
            # Forget a free buffer of another size, else the oldest: one still
            # held (say, kept by the app) stays with its holder, just not here.
            self._bytes -= len(buffers.pop(evictable if evictable >= 0 else 0))
            evictable = -1
        if size <= self.max_bytes:
            self._buffers.append(fresh)
            self._bytes += size
        return fresh

    def __len__(self) -> int:
        return len(self._buffers)
